"""Component: build the training / validation / held-out corpus (stage ``data``)."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def build_data(
    store: str,
    ray_jobs: Optional[str],  # noqa: UP045 (KFP reads typing annotations)
    rerun: list,
    runtime: str,
    data_config: str,
    base: Input[Model],
    dataset: Output[Dataset],
):
    """Build the corpus with the base model's tokenizer (stage ``data``)."""
    from tli.pipeline.runner import run_component

    run_component(
        "data",
        store=store,
        ray_jobs=ray_jobs,
        runtime=runtime,
        sections={"data": data_config},
        inputs={"base": base.path},
        rerun=rerun,
        output=dataset.path,
        artifacts={"ref": dataset},
    )
