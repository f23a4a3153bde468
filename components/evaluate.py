"""Component: lm-eval benchmarks and held-out loss of one model (stage ``eval``)."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    store: str,
    ray_jobs: Optional[str],  # noqa: UP045 (KFP reads typing annotations)
    rerun: list,
    runtime: str,
    eval_config: str,
    model: Input[Artifact],
    data: Input[Artifact],
    result: Output[Artifact],
):
    """Evaluate a model (base, injected or trained) (stage ``eval``)."""
    from tli.pipeline.runner import run_component

    result.metadata.update(
        run_component(
            "eval",
            store=store,
            ray_jobs=ray_jobs,
            runtime=runtime,
            sections={"eval": eval_config},
            inputs={"model": model.path, "data": data.path},
            rerun=rerun,
            output=result.path,
        )
    )
