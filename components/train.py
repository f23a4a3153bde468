"""Component: continued pretraining with Ray Train (stage ``train``)."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    store: str,
    ray_jobs: Optional[str],  # noqa: UP045 (KFP reads typing annotations)
    rerun: list,
    runtime: str,
    train_config: str,
    tune_config: str,
    tracking_config: str,
    pipeline_run: str,
    pipeline_run_id: str,
    model: Input[Model],
    data: Input[Dataset],
    tune: Input[Artifact],
    trained: Output[Model],
):
    """Train the injected model (with the tune stage's learning rate when it searched one)."""
    from tli.pipeline.runner import run_component

    run_component(
        "train",
        store=store,
        ray_jobs=ray_jobs,
        runtime=runtime,
        sections={"train": train_config, "tune": tune_config, "tracking": tracking_config},
        inputs={"model": model.path, "data": data.path, "tune": tune.path},
        rerun=rerun,
        output=trained.path,
        pipeline_run={"name": pipeline_run, "id": pipeline_run_id},
        artifacts={"ref": trained},
    )
