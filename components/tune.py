"""Component: Ray Tune search over the injection interval (stage ``tune``)."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tune(
    store: str,
    ray_jobs: Optional[str],  # noqa: UP045 (KFP reads typing annotations)
    rerun: list,
    runtime: str,
    inject_config: str,
    train_config: str,
    tune_config: str,
    base: Input[Artifact],
    data: Input[Artifact],
    result: Output[Artifact],
):
    """Search injection intervals (and inits, alphas, learning rates) on held-out loss."""
    from tli.pipeline.runner import run_component

    result.metadata.update(
        run_component(
            "tune",
            store=store,
            ray_jobs=ray_jobs,
            runtime=runtime,
            sections={"inject": inject_config, "train": train_config, "tune": tune_config},
            inputs={"base": base.path, "data": data.path},
            rerun=rerun,
            output=result.path,
        )
    )
