"""Component: inject layers with the tune stage's winning plan (stage ``inject``)."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def inject(
    store: str,
    ray_jobs: Optional[str],  # noqa: UP045 (KFP reads typing annotations)
    rerun: list,
    runtime: str,
    inject_config: str,
    base: Input[Model],
    tune: Input[Artifact],
    model: Output[Model],
):
    """Write the upscaled model (stage ``inject``)."""
    from tli.pipeline.runner import run_component

    run_component(
        "inject",
        store=store,
        ray_jobs=ray_jobs,
        runtime=runtime,
        sections={"inject": inject_config},
        inputs={"base": base.path, "tune": tune.path},
        rerun=rerun,
        output=model.path,
        artifacts={"ref": model},
    )
