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
    """The training corpus: its sources and how documents are split (blocks are cut by the
    stages that read them, each at its own sequence length)."""

    sources: list[str] = Field(
        ["wiki", "shakespeare"], description="bundled corpora to use (wiki, shakespeare)"
    )
    extra: list[str] = Field([], description="extra local text / jsonl / parquet files")
    dataset: str | None = Field(None, description="an HF datasets name (needs network)")
    val_fraction: float = Field(0.02, gt=0, lt=0.5, description="share of documents for validation")
    heldout_fraction: float = Field(
        0.02, gt=0, lt=0.5, description="share of documents for held-out loss"
    )
    split_seed: int = Field(0, description="seed of the deterministic split")


class SplitBlocks(Section):
    """How many blocks of one corpus split a loss is measured on (the first N, always the same)."""

    blocks: int = Field(64, ge=1, description="blocks of the split (the first N: always the same)")


class Validation(SplitBlocks):
    """The loss on the validation split while training: how many blocks, and how often."""

    every: int | None = Field(
        None, ge=1, description="steps between validation losses; None = only at the end"
    )


class Heldout(SplitBlocks):
    """The loss on the held-out split in an evaluation (never used for any choice)."""

    seq_len: int = Field(256, ge=8, description="tokens per held-out block")
    bf16: bool = Field(True, description="bf16 autocast forward where supported (loss in fp32)")


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
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        description="steps between checkpoints (resume is exact, so not in the version)",
        json_schema_extra={"versioned": False},
    )
    validation: Validation = Field(Validation(), description="validation loss during training")


class TrialConfig(Section):
    """What a Tune trial changes in the train section: its budget and validation cadence."""

    steps: int = Field(20, ge=1, description="max training steps per trial")
    validation: Validation = Field(
        Validation(blocks=32, every=5),
        description="validation loss per trial: the objective; its cadence is ASHA's rungs",
    )


class TuneConfig(Section):
    """Ray Tune search over the injection and training hyperparameters.

    Each trial trains with the ``train`` section, overridden by ``trial``.
    """

    intervals: list[int] = Field([5, 10, 15], description="injection intervals K to try")
    inits: list[Literal["identity", "copy", "interpolate"]] = Field(
        ["identity"], description="inits to try"
    )
    alphas: list[float] | None = Field(
        None, description="output-projection scales to try; None = each init's own"
    )
    lrs: list[float] | None = Field(None, description="learning rates to try; None = train.lr")
    concurrency: int = Field(1, ge=1, description="trials at once")
    asha: bool = Field(True, description="stop poor trials early with ASHA")
    objective: Literal["loss", "loss_at_equal_compute"] = Field(
        "loss",
        description="what the search minimises: validation loss, or the same with each "
        "trial's steps cut by its parameter count relative to the smallest trial's",
    )
    trial: TrialConfig = Field(TrialConfig(), description="what each trial changes in train")


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
    heldout: Heldout | None = Field(
        Heldout(), description="held-out loss when data is given; None = none"
    )

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1 or 'auto'")
        return v


class RunConfig(Section):
    """A whole run: one section per stage."""

    base: BaseModelConfig = BaseModelConfig()
    inject: InjectConfig = InjectConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("*", mode="before")
    @classmethod
    def _none_is_default(cls, v: Any) -> Any:
        # An empty section in YAML ("train:") parses as None: treat it as "all defaults".
        return {} if v is None else v


def versioned(section: BaseModel) -> dict[str, Any]:
    """A section as JSON without the fields that change no output (they stay out of versions)."""
    out = section.model_dump(mode="json")
    for name, field in type(section).model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get("versioned") is False:
            out.pop(name, None)
    return out


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


# ---------------------------------------------------------------------------- runtime


def parse_size(text: str | int) -> int:
    """'5GB', '512MB', '1000000' -> bytes (KB/MB/GB/TB are powers of 1024)."""
    import re

    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a size like 5GB or 500MB")
    unit = (m.group(2) or "").upper().replace("I", "").rstrip("B")
    mult = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[unit]
    return int(float(m.group(1)) * mult)


class Runtime(Section):
    """How this run executes: never part of a stage's version (the results do not depend on it).

    Each command exposes the fields it uses as flags (``--shard-size`` for ``shard_size``).
    """

    store: str = Field("runs", description="stage store folder")
    ray_address: str | None = Field(
        None,
        description="Ray cluster to join (host:port, ray://..., auto); default: $RAY_ADDRESS, "
        "else a private local Ray",
    )
    ray_jobs: str | None = Field(
        None,
        description="Ray Jobs API of a running head (http://host:8265) that runs the pipeline's "
        "stages; default: a local head started for the run",
    )
    threads: int | None = Field(
        None, ge=1, description="torch threads per worker; default: its CPUs"
    )
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs each Train worker reserves; default: an even share"
    )
    writers: int | None = Field(
        None, ge=1, description="output shards written at once; default: one per CPU, at most 4"
    )
    shard_size: int = Field(
        5 * 1024**3, ge=1, description="max output shard size in bytes (5GB, 500MB, ...)"
    )
    device: str | None = Field(None, description="cpu or cuda; default: cuda when there is a GPU")
    report_every: int = Field(10, ge=1, description="steps between metric reports to Ray Train")
    max_failures: int = Field(
        1, ge=0, description="worker failures Ray Train recovers from (from the last checkpoint)"
    )
    keep_checkpoints: bool = Field(False, description="keep Ray Train's checkpoints in the output")
    compile: bool = Field(False, description="torch.compile the model in each worker (GPUs)")
    peak_tflops: float | None = Field(
        None, gt=0, description="peak bf16 TFLOP/s of one device, for MFU; default: known GPUs"
    )
    progress: bool = Field(True, description="show progress bars")

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)


# ---------------------------------------------------------------------------- resolve

PRESETS = ("default", "smoke")


def preset_data(name: str) -> dict[str, Any]:
    """The YAML of an embedded preset as a dict (not yet validated)."""
    from importlib import resources

    import yaml

    if name not in PRESETS:
        raise TliError(f"unknown preset {name!r}: choose from {', '.join(PRESETS)}")
    text = resources.files("tli.presets").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """``section.field=value`` (YAML value; nested fields with more dots) -> (key path, value)."""
    import yaml

    key, eq, value = item.partition("=")
    path = tuple(key.strip().split("."))
    if not eq or len(path) < 2 or not all(path):
        raise TliError(f"override {item!r}: write SECTION.FIELD=VALUE, e.g. eval.limit=20")
    try:
        return path, yaml.safe_load(value)
    except yaml.YAMLError:
        raise TliError(f"override {item!r}: the value is not valid YAML") from None


def _lay(
    data: dict[str, Any], layer: dict[str, Any], origin: str, sources: dict[str, str], at=()
) -> None:
    """Lay ``layer`` over ``data`` (mappings merge key by key), noting each leaf's origin."""
    for k, v in layer.items():
        here = (*at, str(k))
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            _lay(data[k], v, origin, sources, here)
        else:
            data[k] = v
            _note(here, v, origin, sources)


def _note(at: tuple[str, ...], v: Any, origin: str, sources: dict[str, str]) -> None:
    if isinstance(v, dict) and v:
        for k, x in v.items():
            _note((*at, str(k)), x, origin, sources)
    else:
        for key in [s for s in sources if s == ".".join(at) or s.startswith(".".join(at) + ".")]:
            del sources[key]
        sources[".".join(at)] = origin


class Resolved(BaseModel):
    """A resolved run config and, for every value not at its default, where it came from."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    config: RunConfig
    sources: dict[str, str]

    def origin(self, key: str) -> str:
        """Where ``key`` (``section.field``) came from: a layer's name, or ``default``."""
        while key:
            if key in self.sources:
                return self.sources[key]
            key = key.rpartition(".")[0]
        return "default"


def resolve(
    preset: str | None = None,
    files: list[str | Path] = (),  # type: ignore[assignment]
    overrides: list[str] | list[tuple[tuple[str, ...], Any, str]] = (),  # type: ignore[assignment]
) -> Resolved:
    """The run config: an embedded preset, then YAML files, then overrides, validated once.

    Args:
        preset: an embedded preset's name (``default``, ``smoke``) or None.
        files: run-config YAML files, laid over the preset in order; each is first validated
            alone, so an error names its file.
        overrides: ``section.field=value`` strings, or ``(key path, value, origin)`` triples
            (what the CLI's typed flags become), laid over everything else in order.
    """
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if preset:
        _lay(data, preset_data(preset), f"preset {preset}", sources)
    for f in files:
        layer = read_yaml(f)
        validate(RunConfig, layer, str(f))
        _lay(data, layer, str(f), sources)
    names = []
    for item in overrides:
        path, value, origin = (*parse_override(item), item) if isinstance(item, str) else item
        nested: dict[str, Any] = {}
        cur = nested
        for k in path[:-1]:
            cur = cur.setdefault(k, {})
        cur[path[-1]] = value
        _lay(data, nested, origin, sources)
        names.append(origin)
    where = " + ".join(
        [x for x in (f"preset {preset}" if preset else "", *map(str, files)) if x]
        + (["overrides"] if names else [])
    )
    cfg = validate(RunConfig, data, where or "defaults")
    return Resolved(config=cfg, sources=sources)  # type: ignore[arg-type]
