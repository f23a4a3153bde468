"""Component: the base model as a stage version (bundled SmolLM2, a folder, or a Hub repo)."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def import_base(
    store: str,
    ray_jobs: Optional[str],  # noqa: UP045 (KFP reads typing annotations)
    rerun: list,
    runtime: str,
    base_config: str,
    model: Output[Model],
):
    """Import the base model into the store (stage ``import-base``)."""
    from tli.pipeline.runner import run_component

    run_component(
        "import-base",
        store=store,
        ray_jobs=ray_jobs,
        runtime=runtime,
        sections={"base": base_config},
        inputs={},
        rerun=rerun,
        output=model.path,
        artifacts={"ref": model},
    )
