"""Component: lm-eval benchmarks and held-out loss of one model (stage ``eval``)."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    store: str,
    ray_jobs: Optional[str],  # noqa: UP045 (KFP reads typing annotations)
    rerun: list,
    runtime: str,
    eval_config: str,
    tracking_config: str,
    pipeline_run: str,
    pipeline_run_id: str,
    model: Input[Model],
    data: Input[Dataset],
    result: Output[Artifact],
    metrics: Output[Metrics],
):
    """Evaluate a model (base, injected or trained) (stage ``eval``)."""
    from tli.pipeline.runner import run_component

    run_component(
        "eval",
        store=store,
        ray_jobs=ray_jobs,
        runtime=runtime,
        sections={"eval": eval_config, "tracking": tracking_config},
        inputs={"model": model.path, "data": data.path},
        rerun=rerun,
        output=result.path,
        pipeline_run={"name": pipeline_run, "id": pipeline_run_id},
        artifacts={"ref": result, "metrics": metrics},
    )
