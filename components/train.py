"""Component: continued pretraining with Ray Train (stage ``train``)."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    store: str,
    ray_jobs: Optional[str],  # noqa: UP045 (KFP reads typing annotations)
    rerun: list,
    runtime: str,
    train_config: str,
    tune_config: str,
    model: Input[Artifact],
    data: Input[Artifact],
    tune: Input[Artifact],
    result: Output[Artifact],
):
    """Train the injected model (with the tune stage's learning rate when it searched one)."""
    from tli.pipeline.runner import run_component

    result.metadata.update(
        run_component(
            "train",
            store=store,
            ray_jobs=ray_jobs,
            runtime=runtime,
            sections={"train": train_config, "tune": tune_config},
            inputs={"model": model.path, "data": data.path, "tune": tune.path},
            rerun=rerun,
            output=result.path,
        )
    )
