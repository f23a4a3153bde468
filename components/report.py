"""Component: the run's report, as HTML (plots inline) and Markdown (stage ``report``)."""

from typing import Optional

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def report(
    store: str,
    ray_jobs: Optional[str],  # noqa: UP045 (KFP reads typing annotations)
    rerun: list,
    runtime: str,
    base: Input[Model],
    data: Input[Dataset],
    tune: Input[Artifact],
    inject: Input[Model],
    train: Input[Model],
    eval_base: Input[Artifact],
    eval_injected: Input[Artifact],
    eval_trained: Input[Artifact],
    result: Output[Artifact],
    html: Output[HTML],
    markdown: Output[Markdown],
):
    """Write the report of the run (stage ``report``)."""
    from tli.pipeline.runner import run_component

    inputs = {
        "base": base.path,
        "data": data.path,
        "tune": tune.path,
        "inject": inject.path,
        "train": train.path,
        "eval_base": eval_base.path,
        "eval_injected": eval_injected.path,
        "eval_trained": eval_trained.path,
    }
    run_component(
        "report",
        store=store,
        ray_jobs=ray_jobs,
        runtime=runtime,
        sections={},
        inputs=inputs,
        rerun=rerun,
        output=result.path,
        artifacts={"ref": result, "html": html, "markdown": markdown},
    )
