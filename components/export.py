"""Component: the last, optional step: export the trained model with its model card."""

from kfp import dsl
from kfp.dsl import Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def export_model(
    store: str,
    runtime: str,
    export_to: str,
    model: Input[Model],
    exported: Output[Model],
):
    """Export the trained model to ``export_to`` (a folder, s3://... or hf://org/name)."""
    from tli.export import export_component

    export_component(store=store, runtime=runtime, to=export_to, model=model.path,
                     exported=exported)  # fmt: skip
