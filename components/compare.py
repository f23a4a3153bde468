"""Components of `tli compare`'s pipeline: a method's settings, and the comparison's report.

The other steps of that pipeline are the pipeline's own components (import base, data, inject,
train, evaluate): the same stages, versions and store.
"""

from typing import Optional

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def method(
    store: str,
    ray_jobs: Optional[str],  # noqa: UP045 (KFP reads typing annotations)
    rerun: list,
    runtime: str,
    inject_config: str,
    base: Input[Model],
    result: Output[Artifact],
):
    """One method's matched settings on the base, for inject and train (stage ``method``)."""
    from tli.pipeline.runner import run_component

    run_component(
        "method",
        store=store,
        ray_jobs=ray_jobs,
        runtime=runtime,
        sections={"inject": inject_config},
        inputs={"base": base.path},
        rerun=rerun,
        output=result.path,
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def compare_report(
    store: str,
    rerun: list,
    experiment: str,
    result: Output[Artifact],
    html: Output[HTML],
    markdown: Output[Markdown],
):
    """The comparison's report from every run its branches stored (stage ``compare``)."""
    from tli.compare.run import report_component

    report_component(experiment, store=store, rerun=rerun, output=result.path,
                     html=html.path, markdown=markdown.path)  # fmt: skip
