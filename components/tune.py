"""Component: Ray Tune search over the injection interval (stage ``tune``)."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

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
    tracking_config: str,
    pipeline_run: str,
    pipeline_run_id: str,
    base: Input[Model],
    data: Input[Dataset],
    result: Output[Artifact],
    metrics: Output[Metrics],
    trials: Output[Markdown],
):
    """Search injection intervals (and inits, alphas, learning rates) on validation loss."""
    from tli.pipeline.runner import run_component

    run_component(
        "tune",
        store=store,
        ray_jobs=ray_jobs,
        runtime=runtime,
        sections={
            "inject": inject_config,
            "train": train_config,
            "tune": tune_config,
            "tracking": tracking_config,
        },
        inputs={"base": base.path, "data": data.path},
        rerun=rerun,
        output=result.path,
        pipeline_run={"name": pipeline_run, "id": pipeline_run_id},
        artifacts={"ref": result, "metrics": metrics, "table": trials},
    )
