"""The one run configuration: a single pydantic model with a section per stage.

YAML is its on-disk form. Unknown keys are errors everywhere. The CLI generates its flags from
these fields (see :mod:`tli.cli.flags`), so a default lives in exactly one place: here.

Options that do not change a result (device, threads, shard size, Ray addresses, timeouts,
storage) are the :class:`Runtime` model beside it: never part of a stage's version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tli.errors import TliError


def _takes_bool(tp: Any) -> bool:
    """Whether a field of annotation ``tp`` accepts a boolean as itself (not as 0/1)."""
    import types
    import typing

    if tp is bool or tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(isinstance(a, bool) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(_takes_bool(a) for a in typing.get_args(tp))
    return False


def _list_item(tp: Any) -> Any:
    """The item type of ``list[X]`` (also inside ``list[X] | None``), else None."""
    import types
    import typing

    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        items = [_list_item(a) for a in typing.get_args(tp)]
        return next((i for i in items if i is not None), None)
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


class Section(BaseModel):
    """Base of every section: frozen, unknown keys are errors, and values are what they say.

    Two of pydantic's lax conversions would accept a wrong value silently, so both are off in
    every section: a YAML ``interval: true`` (or ``--alpha`` as a bool in JSON) is not the
    number 1, and NaN or infinity is never a valid setting (a non-finite ``alpha`` wrote NaN
    tensors and a provenance file with bare ``NaN``, which is not JSON).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: Any) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is None:
            return v
        tp = field.annotation
        item = _list_item(tp)
        if isinstance(v, bool) and not _takes_bool(tp):
            bad = v
        elif isinstance(v, list) and item is not None and not _takes_bool(item):
            bad = next((x for x in v if isinstance(x, bool)), None)
        else:
            bad = None
        if bad is not None:
            raise PydanticCustomError(
                "bool_not_value",
                "expected {what}, got the boolean {value}",
                {"what": _expected(item or tp), "value": str(bad).lower()},
            )
        return v


def _expected(tp: Any) -> str:
    """A short name of what a field takes, for error messages."""
    import typing

    names = {int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, args))
    return " or ".join(_expected(a) for a in args) if args else "a value of another type"


class BaseModelConfig(Section):
    """Where the base model comes from."""

    model: str | None = Field(
        None,
        description="HF folder of the base model, or a Hub repo org/name[@revision] "
        "(needs runtime.offline: false); None = the bundled SmolLM2-135M-Instruct",
    )


InjectMethod = Literal["tli", "llama-pro", "dus", "stack", "moe"]
Placement = Literal["uniform", "top", "middle", "bottom"]
_TLI_LAYOUT = ("interval", "placement", "new_layers", "positions")
# The fields each method reads: any other inject field set to a value other than its default
# is an error, not a silent no-op (and on the command line, `tli inject` refuses it whenever
# it is given).
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "tli": (*_TLI_LAYOUT, "init", "alpha", "source"),
    "llama-pro": _TLI_LAYOUT,  # identity init, copy of the layer before: nothing to choose
    "dus": ("overlap",),
    "stack": ("repeat",),
    "moe": ("experts", "top_k", "router_init", "expert_noise", "shared_expert_size",
            "aux_loss_coef", "moe_seed"),
}  # fmt: skip


def methods_using(field: str) -> list[str]:
    """The inject methods that read ``field`` (in the order of :data:`METHOD_FIELDS`)."""
    return [m for m, fields in METHOD_FIELDS.items() if field in fields]


class InjectConfig(Section):
    """How layers are injected (see tli.inject.plan for the exact meaning of each field).

    Each method reads only its own fields (:data:`METHOD_FIELDS`); a field of another method set
    to anything but its default is an error.
    """

    method: InjectMethod = Field(
        "tli",
        description="tli | llama-pro (tli identity, only the new layers trained) | dus | stack "
        "| moe (MoE upcycling)",
    )
    interval: int = Field(5, ge=1, description="TLI: one new layer after every K layers")
    placement: Placement | None = Field(
        None,
        description="TLI: where the new layers go: uniform (one after every K layers), top "
        "(after the last ones, near the output), middle (around the middle), bottom (after the "
        "first ones); None = uniform",
    )
    new_layers: int | None = Field(
        None, ge=1, description="TLI: how many layers to add; None = N // interval"
    )
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
    experts: int | None = Field(
        None, ge=2, description="MoE: experts per layer, each a copy of the dense MLP (required)"
    )
    top_k: int | None = Field(
        None, ge=1, description="MoE: experts each token is routed to (required)"
    )
    router_init: Literal["random", "zero"] | None = Field(
        None,
        description="MoE: router weights: random (seeded normal, std = initializer_range) or "
        "zero; None = random",
    )
    expert_noise: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="MoE: Drop-Upcycling share of each expert's neurons re-initialised; "
        "None = 0 (the dense function, exactly)",
    )
    shared_expert_size: int | None = Field(
        None, ge=1, description="MoE (Qwen2 only): shared expert width; None = the dense MLP's"
    )
    aux_loss_coef: float | None = Field(
        None, ge=0, description="MoE: weight of the load-balancing loss in training; None = 0.001"
    )
    moe_seed: int | None = Field(
        None, description="MoE: seed of the router and the expert noise; None = 0"
    )

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> InjectConfig:
        uses = METHOD_FIELDS[self.method]
        for name, field in type(self).model_fields.items():
            if name == "method" or name in uses or getattr(self, name) == field.default:
                continue
            raise PydanticCustomError(
                "method_field",
                "{field} applies to method {owners} only, not {method}: remove it or choose "
                "that method",
                {"field": name, "owners": " / ".join(methods_using(name)), "method": self.method},
            )
        if self.method == "moe" and (self.experts is None or self.top_k is None):
            raise PydanticCustomError(
                "moe_size", "method moe needs experts and top_k (e.g. --experts 8 --top-k 2)"
            )
        if self.positions is not None and (self.placement or self.new_layers is not None):
            raise PydanticCustomError(
                "positions", "positions lists the new layers itself: remove placement/new_layers"
            )
        return self


class DataConfig(Section):
    """The training corpus: its sources and how documents are split (blocks are cut by the
    stages that read them, each at its own sequence length)."""

    sources: list[str] = Field(
        ["wiki", "shakespeare"], description="bundled corpora to use (wiki, shakespeare)"
    )
    extra: list[str] = Field([], description="extra local text / jsonl / parquet files")
    dataset: str | None = Field(
        None,
        description="a Hub dataset org/name[@revision][:config] (its train split; needs "
        "runtime.offline: false)",
    )
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
    feed: Literal["memory", "stream"] = Field(
        "memory",
        description="how blocks reach the workers: memory (the whole split in every worker) or "
        "stream (Ray Data reads each worker's own batches from the token cache); both give the "
        "same batches, so not in the version",
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
    placements: list[Placement] = Field(
        ["uniform"],
        description="where the N // K new layers go, to try: uniform, top, middle, bottom",
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
        "trial's steps cut so that every trial spends the training FLOPs of the cheapest",
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


class TrackingConfig(Section):
    """Experiment tracking (MLflow, TensorBoard): where the stages' records are also logged.

    Tracking changes no output, so no stage version reads this section; a stage logs when it
    runs (a cached stage logged when it ran). See :mod:`tli.tracking`.
    """

    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI (http://host:5000, sqlite:///mlflow.db, file:...); "
        "default: $MLFLOW_TRACKING_URI, else no MLflow",
    )
    experiment: str | None = Field(
        None, description="MLflow experiment; default: $MLFLOW_EXPERIMENT_NAME, else tli"
    )
    tensorboard: str | None = Field(
        None,
        description="folder for TensorBoard event files (<dir>/<stage>/<version>/); relative "
        "to the store in a pipeline; None = none",
    )
    tags: dict[str, str] = Field(
        {}, description="extra tags on every tracking run (the pipeline adds its run's name)"
    )


class RunConfig(Section):
    """A whole run: one section per stage (and ``tracking``, which no stage version reads)."""

    base: BaseModelConfig = BaseModelConfig()
    inject: InjectConfig = InjectConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("*", mode="before")
    @classmethod
    def _none_is_default(cls, v: Any) -> Any:
        # An empty section in YAML ("train:") parses as None: treat it as "all defaults".
        return {} if v is None else v

    @model_validator(mode="after")
    def _llama_pro_trains_the_new_layers(self) -> RunConfig:
        # LLaMA Pro is TLI identity + training only the new layers: one method name for both.
        if self.inject.method == "llama-pro" and self.train.freeze != "original":
            raise PydanticCustomError(
                "llama_pro",
                "inject.method llama-pro trains only the injected layers, but train.freeze is "
                "{freeze}: use train.freeze original (or method tli to train them all)",
                {"freeze": self.train.freeze},
            )
        return self


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
        msg = msg.removeprefix("Value error, ")  # our own validators' words stand alone
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
    except UnicodeDecodeError:
        raise TliError(f"config file {p} is not text (not UTF-8): give a YAML file") from None
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


class DriverResources(Section):
    """What one stage's Ray job driver reserves (Ray's job entrypoint resources).

    The driver runs on a node where these fit, so a head that offers no CPUs (KubeRay's) never
    runs a stage's work. A field left None takes the stage's default (:data:`DRIVER_DEFAULTS`).
    """

    cpus: float | None = Field(None, ge=0, description="CPUs; None = the stage's default")
    gpus: float | None = Field(
        None, ge=0, description="GPUs; None = the stage's default (eval: 1 on cuda, else 0)"
    )
    memory: int | None = Field(
        None, ge=1, description="bytes of Ray's memory resource (16GB, 500MB); None = none"
    )
    resources: dict[str, float] = Field(
        {}, description="custom resources, e.g. {'accelerator_type:A100': 0.001}"
    )

    @field_validator("memory", mode="before")
    @classmethod
    def _memory_size(cls, v: Any) -> Any:
        return None if v is None else parse_size(v)


class StageDrivers(Section):
    """Where each stage's Ray job driver runs (placement); changes no output, so in no version."""

    import_base: DriverResources = DriverResources()
    data: DriverResources = DriverResources()
    tune: DriverResources = DriverResources()
    inject: DriverResources = DriverResources()
    train: DriverResources = DriverResources()
    eval: DriverResources = DriverResources()
    report: DriverResources = DriverResources()


# The stages' drivers by default. Import, data, inject, eval and report do their work in the
# driver itself: a whole CPU (eval a GPU too when runtime.device is cuda). Train and tune drivers
# only steer Ray Train / Tune workers, which reserve their own CPUs and GPUs: a tenth of a CPU,
# enough to keep them off a head that offers none.
DRIVER_DEFAULTS: dict[str, dict[str, float]] = {
    "import-base": {"cpus": 1},
    "data": {"cpus": 1},
    "tune": {"cpus": 0.1},
    "inject": {"cpus": 1},
    "train": {"cpus": 0.1},
    "eval": {"cpus": 1},
    "report": {"cpus": 1},
}


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
    sharded_load: bool = Field(
        True,
        description="FSDP workers build the model on the meta device and read only their own "
        "shards; false: each loads the whole model first, then shards it",
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="peak bf16 TFLOP/s of one device, for MFU; default: known GPUs"
    )
    progress: bool = Field(True, description="show progress bars")
    offline: bool = Field(
        True,
        description="never reach the Hugging Face Hub; false lets base.model / data.dataset "
        "name Hub repos (org/name[@revision]), downloaded once into the cache",
    )
    storage: str | None = Field(
        None,
        description="Ray Train/Tune storage (checkpoints, trial state) that every node sees: "
        "a shared folder or s3://bucket/prefix (credentials from AWS_* variables); default: "
        "inside the output being written",
    )
    connect_timeout_s: float = Field(
        30.0, gt=0, description="seconds to wait for a first answer from Ray or a job/KFP API"
    )
    scale_timeout_s: float = Field(
        900.0,
        gt=0,
        description="seconds train/tune wait for a cluster that can grow to offer their workers",
    )
    drivers: StageDrivers = Field(
        StageDrivers(), description="each stage's Ray job driver resources (placement)"
    )

    @field_validator("storage")
    @classmethod
    def _storage_uri(cls, v: str | None) -> str | None:
        if v is not None and "://" in v:
            from tli import remote

            if not remote.is_remote(v):
                raise ValueError(f"{v!r}: give a folder or an s3://bucket/prefix URI")
            try:
                remote.parse(v)
            except TliError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str | None) -> str | None:
        import re

        if v is not None and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"{v!r} is not a device: use cpu, cuda, cuda:N or mps")
        return v


def check_device(device: str) -> str:
    """``device`` if this machine has it, else a one-line :class:`TliError` (imports torch)."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (index and int(index) >= n):
            have = f"{n} CUDA device(s)" if n else "no CUDA GPU"
            raise TliError(f"--device {device}: this machine has {have}: use --device cpu")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise TliError(f"--device {device}: MPS is not available here: use --device cpu")
    return device


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
