"""Executing an injection plan: streaming on disk (`run_inject`) or in memory (Tune trials).

The streaming executor never holds the model: unchanged tensors are copied as byte ranges,
zeroed projections are holes in the output file, and only tensors that must be computed
(interpolation, a fractional ``alpha``) are read, one at a time. torch is imported only in that
last case.
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from tli import __version__
from tli.errors import TliError
from tli.inject.arch import ArchSpec, arch_for
from tli.inject.plan import PLAN_FILE, LayerSpec, Plan, make_plan
from tli.inject.stio import (
    INDEX_FILE,
    OutTensor,
    TensorRef,
    checkpoint_files,
    read_checkpoint,
    read_header,
    write_checkpoint,
)

PROVENANCE_FILE = "tli_provenance.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3
# Files of the input folder that are never carried over: weights (rewritten), pickles (never
# touched), remote code (never run), and our own outputs (rewritten).
_SKIP_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".py", ".gguf"}
_SKIP_NAMES = {"config.json", INDEX_FILE, "README.md", PLAN_FILE, PROVENANCE_FILE}
# Families whose config class derives `layer_types` when config.json does not list it.
_DERIVES_LAYER_TYPES = {"qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text", "smollm3", "cohere2"}
_ST_TO_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


# ---------------------------------------------------------------------------- inputs


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of an HF folder, with one-line errors for every way it can be wrong."""
    if not model_dir.exists():
        raise TliError(f"model dir {model_dir} does not exist")
    if not model_dir.is_dir():
        raise TliError(f"model dir {model_dir} is not a folder")
    path = model_dir / "config.json"
    if not path.is_file():
        raise TliError(f"{model_dir} has no config.json: point --model at an HF model folder")
    try:
        cfg = json.loads(path.read_text())
    except OSError as e:
        raise TliError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise TliError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise TliError(f"{path} is not a JSON object")
    return cfg


def layer_count(config: dict[str, Any], spec: ArchSpec) -> int:
    n = config.get(spec.layer_count_field)
    if not isinstance(n, int) or n < 1:
        raise TliError(f"config.json has no valid {spec.layer_count_field}: got {n!r}")
    return n


def _resolved_layer_lists(model_dir: Path, config: dict[str, Any], spec: ArchSpec, n: int):
    """Per-layer list fields, including ones the config class derives but config.json omits."""
    lists = {k: config[k] for k in spec.per_layer_lists if isinstance(config.get(k), list)}
    if "layer_types" not in lists and config.get("model_type") in _DERIVES_LAYER_TYPES:
        from transformers import AutoConfig  # only for these families: the import is slow

        derived = getattr(AutoConfig.from_pretrained(model_dir), "layer_types", None)
        if isinstance(derived, list):
            lists["layer_types"] = list(derived)
    for k, v in lists.items():
        if len(v) != n:
            raise TliError(f"config.json field {k} has {len(v)} entries for {n} layers")
    return lists


def rewrite_config(
    config: dict[str, Any], plan: Plan, spec: ArchSpec, lists: dict[str, list]
) -> dict[str, Any]:
    """The output config.json: layer count and every per-layer field follow the plan."""
    out = dict(config)
    out[spec.layer_count_field] = plan.num_layers_out
    for key, values in lists.items():
        out[key] = [values[s.source] for s in plan.layers]
    mwl = config.get("max_window_layers")
    if isinstance(mwl, int):
        # Layers below the threshold use full attention; keep each layer's own behaviour. For a
        # non-monotone plan (DUS) the explicit layer_types written above are what counts.
        out["max_window_layers"] = sum(1 for s in plan.layers if s.source < mwl)
    return out


# ---------------------------------------------------------------------------- tensors


def blend(sources: list, out_scale: float, residual_out: bool):
    """A new layer's tensor from its source tensors (same shape): mean, then output scale.

    Args:
        sources: one tensor (copy) or two (interpolate), [*shape] each.
        out_scale: applied only to residual-writing projections.
        residual_out: whether this tensor is such a projection.
    """
    import torch

    x = (
        sources[0].float()
        if len(sources) == 1
        else torch.stack([s.float() for s in sources]).mean(0)
    )
    if residual_out:
        x = x * out_scale  # [*shape]
    return x.to(sources[0].dtype)


def _load(ref: TensorRef):
    """One tensor from its byte range (no pickle, no mmap of the whole file)."""
    import os

    import torch

    dtype = getattr(torch, _ST_TO_TORCH.get(ref.dtype, ""), None)
    if dtype is None:
        raise TliError(f"tensor {ref.name} has dtype {ref.dtype}, which tli cannot interpolate")
    fd = os.open(ref.file, os.O_RDONLY)
    try:
        buf = bytearray(os.pread(fd, ref.nbytes, ref.start))
    finally:
        os.close(fd)
    return torch.frombuffer(buf, dtype=dtype).reshape(ref.shape)


def plan_tensors(refs: dict[str, TensorRef], plan: Plan, spec: ArchSpec) -> list[OutTensor]:
    """Every output tensor with how its bytes are produced and the input file it comes from.

    Non-layer tensors (embeddings, final norm, lm_head if untied) come first, then the layers in
    output order, each with its tensors in name order; `tli.inject.stio.plan_shards` decides the order
    in the files.
    """
    rx = spec.layer_re()
    by_layer: dict[int, dict[str, TensorRef]] = {}
    head: list[OutTensor] = []
    for name in sorted(refs):
        m = rx.fullmatch(name)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = refs[name]
        else:
            r = refs[name]
            head.append(OutTensor(name, r.dtype, r.shape, r.nbytes, "copy", src=r, home=r.file))
    if sorted(by_layer) != list(range(plan.num_layers_in)):
        raise TliError(
            f"the checkpoint has layers {sorted(by_layer)[:3]}...{len(by_layer)} in all, "
            f"but config.json says {plan.num_layers_in}"
        )
    out = list(head)
    for s in plan.layers:
        suffixes = by_layer[s.source]
        for other in s.sources[1:]:
            if by_layer[other].keys() != suffixes.keys():
                raise TliError(
                    f"layers {s.source} and {other} differ in tensors: cannot interpolate"
                )
        for sfx in sorted(suffixes):
            out.append(_out_tensor(spec.name(s.index, sfx), s, sfx, by_layer, spec))
    return out


def _out_tensor(
    name: str, s: LayerSpec, sfx: str, by_layer: dict[int, dict[str, TensorRef]], spec: ArchSpec
) -> OutTensor:
    src = by_layer[s.source][sfx]
    resid = spec.is_residual_out(sfx)
    scale = s.out_scale if resid else 1.0
    if resid and scale == 0.0:
        return OutTensor(name, src.dtype, src.shape, src.nbytes, "zeros", src=src, home=src.file)
    if len(s.sources) == 1 and scale == 1.0:
        return OutTensor(name, src.dtype, src.shape, src.nbytes, "copy", src=src, home=src.file)
    refs = [by_layer[i][sfx] for i in s.sources]

    def compute() -> memoryview:
        t = blend([_load(r) for r in refs], s.out_scale, resid)
        return memoryview(t.contiguous().view(-1).view(__import__("torch").uint8).numpy())

    return OutTensor(
        name, src.dtype, src.shape, src.nbytes, "compute", compute=compute, home=src.file
    )


# ---------------------------------------------------------------------------- output folder


@contextmanager
def atomic_dir(out: Path, *, force: bool):
    """Yield a temporary sibling of ``out``; rename it to ``out`` only if the block succeeds."""
    if out.exists() and not force:
        raise TliError(f"output dir {out} exists: choose another --out or pass --force")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise TliError(f"cannot write to {out.parent}: {e.strerror}") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, out)


def swap_in(done: Path, out: Path) -> None:
    """Rename the complete folder ``done`` to ``out``; an existing ``out`` (--force) is replaced.

    The old folder is renamed aside first, so ``out`` never names a half-removed folder.
    """
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        done.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        done.rename(out)


def package_versions(*names: str) -> dict[str, str]:
    out = {"tli": __version__, "python": sys.version.split()[0]}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def _fingerprint(model_dir: Path) -> dict[str, Any]:
    """Identify the input without reading its bytes: each shard's size and header hash."""
    import hashlib

    files = {}
    for f in checkpoint_files(model_dir):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h = hashlib.sha256(fh.read(n)).hexdigest()
        files[f.name] = {"size": f.stat().st_size, "header_sha256": h}
    return files


def _model_card(plan: Plan, base_name: str, params_in: int, params_out: int) -> str:
    p = plan.params
    lines = [
        f"# {base_name}, upscaled with tli ({plan.method})",
        "",
        f"Made with tli {__version__} (Transformer Layer Injection) from `{base_name}`.",
        "",
        "| | base | upscaled |",
        "|---|---:|---:|",
        f"| layers | {plan.num_layers_in} | {plan.num_layers_out} |",
        f"| parameters | {params_in:,} | {params_out:,} |",
        "",
        f"- method: `{plan.method}`; parameters: "
        + ", ".join(f"{k}={v}" for k, v in p.items() if v is not None),
        f"- injected layers (output indices): {list(plan.new_layers)}",
        f"- function-preserving: {'yes' if plan.function_preserving else 'no'}",
        "",
        "The full plan (each output layer's source and init) is in `tli_plan.json`; the config "
        "and input fingerprint in `tli_provenance.json`.",
        "",
    ]
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run_inject(
    model_dir: str | Path,
    out_dir: str | Path,
    cfg: Any,
    *,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    threads: int | None = None,
) -> Path:
    """Inject layers into the HF model at ``model_dir`` and write the result to ``out_dir``.

    Args:
        model_dir: an HF folder with config.json and safetensors weights.
        out_dir: where the upscaled folder goes (created atomically).
        cfg: the ``inject`` section (:class:`tli.config.InjectConfig`).
        force: replace ``out_dir`` if it exists.
        max_shard_bytes: output shard size limit.
        progress: show a progress bar on stderr.
        threads: output shards written at once (default: one per CPU, at most 4).

    Returns:
        ``out_dir``.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = read_config(model_dir)
    refs = read_checkpoint(model_dir)
    spec = arch_for(config, list(refs))
    n = layer_count(config, spec)
    plan = make_plan(n, cfg)
    lists = _resolved_layer_lists(model_dir, config, spec, n)
    tensors = plan_tensors(refs, plan, spec)
    if out_dir.resolve() == model_dir.resolve():
        raise TliError("--out is the input model folder: choose another folder")
    new_config = rewrite_config(config, plan, spec, lists)
    params_in = sum(r.numel for r in refs.values())
    params_out = sum(_numel(t.shape) for t in tensors)
    total = sum(t.nbytes for t in tensors)
    _, meta = read_header(checkpoint_files(model_dir)[0])

    with atomic_dir(out_dir, force=force) as tmp, _bar(total, progress) as advance:
        write_checkpoint(tmp, tensors, max_shard_bytes=max_shard_bytes, metadata=meta,
                         progress=advance, threads=threads)  # fmt: skip
        for f in sorted(model_dir.iterdir()):
            if f.is_file() and f.suffix not in _SKIP_SUFFIXES and f.name not in _SKIP_NAMES:
                shutil.copyfile(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        (tmp / PLAN_FILE).write_text(plan.to_json())
        prov = {
            "stage": "inject",
            "config": cfg.model_dump(mode="json"),
            "plan": plan.to_dict(),
            "base": {"name": model_dir.name, "files": _fingerprint(model_dir)},
            "parameters": {"before": params_in, "after": params_out},
            "versions": package_versions("safetensors", "torch", "transformers"),
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(plan, model_dir.name, params_in, params_out))
    return out_dir


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@contextmanager
def _bar(total: int, enabled: bool):
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("inject"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as prog:
        task = prog.add_task("inject", total=total)
        yield lambda n: prog.advance(task, n)


# ---------------------------------------------------------------------------- in memory


def inject_in_memory(model: Any, plan: Plan) -> Any:
    """Apply ``plan`` to a loaded HF causal LM (in place) and return it.

    Used where writing a folder would be waste (a Tune trial builds its model from the shared
    base). Original layers are reused as they are; every new layer is a deep copy, blended and
    scaled by the same :func:`blend` as the streaming path. Each attention module's ``layer_idx``
    is renumbered, or cached generation would read the wrong cache slot.
    """
    import copy

    import torch

    spec = arch_for(model.config.to_dict(), [n for n, _ in model.named_parameters()])
    layers = model.model.layers
    if len(layers) != plan.num_layers_in:
        raise TliError(f"plan is for {plan.num_layers_in} layers, model has {len(layers)}")
    resid = tuple(spec.residual_out)
    new_layers = []
    used: set[int] = set()
    for s in plan.layers:
        if not s.new and s.source not in used:
            layer = layers[s.source]
            used.add(s.source)
        else:
            layer = copy.deepcopy(layers[s.source])
            if s.new:
                srcs = [dict(layers[i].named_parameters()) for i in s.sources]
                with torch.no_grad():
                    for pname, p in layer.named_parameters():
                        is_out = any(pname.startswith(m + ".") for m in resid)
                        p.copy_(blend([d[pname] for d in srcs], s.out_scale, is_out))
        new_layers.append(layer)
    for i, layer in enumerate(new_layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = i
    model.model.layers = torch.nn.ModuleList(new_layers)
    cfg = model.config
    lists = {
        k: getattr(cfg, k) for k in spec.per_layer_lists if isinstance(getattr(cfg, k, None), list)
    }
    for k, v in rewrite_config(cfg.to_dict(), plan, spec, lists).items():
        if k in lists or k in (spec.layer_count_field, "max_window_layers"):
            setattr(cfg, k, v)
    return model


def plan_for_model_dir(model_dir: str | Path, cfg: Any) -> Plan:
    """The plan ``run_inject`` would follow for this folder (no tensors read)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    refs = read_checkpoint(model_dir)
    spec = arch_for(config, list(refs))
    return make_plan(layer_count(config, spec), cfg)


__all__ = ["run_inject", "inject_in_memory", "plan_for_model_dir", "blend"]
