"""The one run configuration: a single pydantic model with a section per stage.

YAML is its on-disk form. Unknown keys are errors everywhere. The CLI generates its flags from
these fields (see :mod:`tli.cli.flags`), so a default lives in exactly one place: here.

Runtime options that do not change a result (device, threads, output paths, shard size, Ray
address) are *not* part of this model; they are plain CLI flags of the command that needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tli.errors import TliError


class Section(BaseModel):
    """Base of every section: frozen, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelConfig(Section):
    """Where the base model comes from."""

    model: str | None = Field(
        None,
        description="HF folder of the base model; None = the bundled SmolLM2-135M-Instruct",
    )


class InjectConfig(Section):
    """How layers are injected (see tli.inject.plan for the exact meaning of each field)."""

    method: Literal["tli", "dus", "stack"] = Field("tli", description="tli | dus | stack")
    interval: int = Field(5, ge=1, description="TLI: one new layer after every K layers")
    init: Literal["identity", "copy", "interpolate"] = Field(
        "identity", description="TLI: how a new layer is initialised"
    )
    alpha: float | None = Field(
        None,
        description="TLI: scale on the copied output projections (0 = identity, 1 = copy); "
        "None = the init's own (identity 0, copy/interpolate 1)",
    )
    source: Literal["prev", "next"] = Field(
        "prev", description="TLI: copy the layer before (prev) or after (next) the new one"
    )
    positions: list[int] | None = Field(
        None,
        description="TLI: explicit original-layer indices to insert a new layer after "
        "(0-based); replaces interval",
    )
    overlap: int | None = Field(
        None, ge=0, description="DUS: layers dropped from each copy's seam; None = N // 4"
    )
    repeat: int = Field(2, ge=2, description="stack: how many times the stack is repeated")


class DataConfig(Section):
    """The training corpus and how it is cut into blocks."""

    sources: list[str] = Field(
        ["wiki", "shakespeare"], description="bundled corpora to use (wiki, shakespeare)"
    )
    extra: list[str] = Field([], description="extra local text / jsonl / parquet files")
    dataset: str | None = Field(None, description="an HF datasets name (needs network)")
    seq_len: int = Field(256, ge=8, description="tokens per packed block")
    val_fraction: float = Field(0.02, gt=0, lt=0.5, description="share of documents for validation")
    heldout_fraction: float = Field(
        0.02, gt=0, lt=0.5, description="share of documents for held-out loss"
    )
    seed: int = Field(0, description="seed of the deterministic split")


class TrainConfig(Section):
    """Continued pretraining with Ray Train."""

    steps: int = Field(120, ge=1, description="optimizer steps")
    workers: int = Field(1, ge=1, description="Ray Train workers")
    gpu: bool = Field(False, description="one GPU per worker")
    fsdp: bool = Field(False, description="FSDP2 instead of DDP")
    freeze: Literal["none", "original"] = Field(
        "original", description="none trains all; original trains only injected layers"
    )
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    warmup: int = Field(10, ge=0, description="linear warmup steps")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="cosine decay ends at this fraction of lr"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="gradient norm clip")
    seq_len: int = Field(256, ge=8, description="tokens per sequence")
    batch_size: int = Field(4, ge=1, description="sequences per worker per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    seed: int = Field(0, description="seed for init, data order and dropout")
    bf16: bool = Field(True, description="bf16 autocast where the device supports it")
    grad_checkpointing: bool = Field(False, description="recompute activations in backward")
    checkpoint_every: int | None = Field(None, ge=1, description="steps between checkpoints")
    eval_every: int | None = Field(None, ge=1, description="steps between held-out evals")
    heldout_blocks: int = Field(64, ge=1, description="held-out blocks per evaluation")


class TuneConfig(Section):
    """Ray Tune search over the injection and training hyperparameters."""

    intervals: list[int] = Field([5, 10, 15], description="injection intervals K to try")
    inits: list[Literal["identity", "copy", "interpolate"]] = Field(
        ["identity"], description="inits to try"
    )
    alphas: list[float] | None = Field(
        None, description="output-projection scales to try; None = each init's own"
    )
    lrs: list[float] | None = Field(None, description="learning rates to try; None = train.lr")
    steps: int = Field(20, ge=1, description="max training steps per trial")
    concurrency: int = Field(1, ge=1, description="trials at once")
    asha: bool = Field(True, description="stop poor trials early with ASHA")
    eval_every: int = Field(
        5, ge=1, description="steps between validation-loss reports (ASHA's rungs)"
    )
    heldout_blocks: int = Field(
        32, ge=1, description="validation-split blocks per report (the objective)"
    )
    objective: Literal["loss", "loss_at_equal_compute"] = Field(
        "loss",
        description="what the search minimises: validation loss, or the same with each "
        "trial's steps cut by its parameter count relative to the smallest trial's",
    )


class EvalConfig(Section):
    """Held-out loss and lm-eval benchmarks."""

    tasks: list[str] = Field(
        ["arc_easy", "piqa", "hellaswag", "lambada"], description="lm-eval task names"
    )
    limit: int | None = Field(50, ge=1, description="items per task; None = all")
    batch_size: int | Literal["auto"] = Field(
        "auto", description="lm-eval batch size; auto = 16 on CPU, lm-eval's search on GPU"
    )
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples")
    heldout_loss: bool = Field(True, description="report held-out loss when data is given")
    heldout_blocks: int = Field(64, ge=1, description="held-out blocks")
    seq_len: int = Field(256, ge=8, description="tokens per held-out block")
    bf16: bool = Field(True, description="held-out loss in bf16 autocast where supported")

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1 or 'auto'")
        return v


class PipelineConfig(Section):
    """How the pipeline runs (what is recorded in the store's versions is per stage)."""

    store: str = Field("runs", description="stage store folder")


class RunConfig(Section):
    """A whole run: one section per stage."""

    base: BaseModelConfig = BaseModelConfig()
    inject: InjectConfig = InjectConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    eval: EvalConfig = EvalConfig()
    pipeline: PipelineConfig = PipelineConfig()

    @field_validator("*", mode="before")
    @classmethod
    def _none_is_default(cls, v: Any) -> Any:
        # An empty section in YAML ("train:") parses as None: treat it as "all defaults".
        return {} if v is None else v


SECTIONS: dict[str, type[Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in RunConfig.model_fields.items()
}


def _one_line(err: ValidationError) -> str:
    """Condense a pydantic error into one line: 'where: what' for each problem."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def validate(model: type[Section], data: dict[str, Any], origin: str) -> Section:
    """Validate ``data`` as ``model``; bad input becomes one-line :class:`TliError`."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise TliError(f"invalid config ({origin}): {_one_line(e)}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run-config YAML file as a plain dict (not yet validated)."""
    import yaml  # here, not at the top: most commands never read YAML

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise TliError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise TliError(f"invalid YAML in {p}{where}: fix the file's syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TliError(f"invalid config {p}: the top level must be a mapping of sections")
    return data


def load_run_config(path: str | Path | None) -> RunConfig:
    """Load and validate a whole run config (all sections; missing ones take defaults)."""
    data = read_yaml(path) if path else {}
    return validate(RunConfig, data, str(path or "defaults"))  # type: ignore[return-value]


def dump_yaml(cfg: BaseModel) -> str:
    """The YAML form of a config (round-trips through :func:`load_run_config`)."""
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
