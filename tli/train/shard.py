"""Building a model for training without holding more of it than the worker trains.

Today's path (DDP, one worker) loads the whole model in every worker. With FSDP that costs every
worker the full fp32 model before ``fully_shard`` cuts it down (an 8B model: 32 GB per worker,
times the workers of a node). Here instead a worker

1. builds the model on the ``meta`` device (:func:`skeleton`: no parameter memory; the small
   computed buffers such as rotary frequencies stay real),
2. shards it with ``fully_shard`` (done by :class:`tli.train.step.StepRunner`), and
3. allocates only its own shards and fills them from a :class:`RowSource`
   (:func:`materialise`): FSDP2 shards every parameter by rows (dim 0), and rows of a
   row-major tensor are one contiguous byte range of a safetensors file, read with ``pread``
   as :mod:`tli.inject.stio` reads tensors, converted to the training dtype (fp32 masters)
   row range by row range.

A :class:`RowSource` serves rows of named tensors: an HF folder (:class:`FolderWeights`), an
upscaled model computed from its base folder and a plan (:class:`InjectedWeights`, what Tune
trials train: no per-trial copy of the base anywhere), or a sharded training checkpoint
(:class:`tli.train.checkpoint.CheckpointTensors`), whatever the number of workers that wrote it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tli.errors import TliError
from tli.inject.stio import DTYPE_BYTES, TensorRef, read_checkpoint

if TYPE_CHECKING:
    import torch

_READ_CHUNK = 64 * 1024 * 1024  # bytes per pread: bounds the syscall, not the memory
ST_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
            "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
            "BOOL": "bool"}  # fmt: skip


def torch_dtype(st_dtype: str, name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code."""
    import torch

    dt = getattr(torch, ST_TORCH.get(st_dtype, ""), None)
    if dt is None:
        raise TliError(f"tensor {name} has dtype {st_dtype}, which tli cannot train")
    return dt


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``F32`` for ``torch.float32``)."""
    name = str(dtype).removeprefix("torch.")
    for code, tname in ST_TORCH.items():
        if tname == name:
            return code
    raise TliError(f"dtype {dtype} has no safetensors code")


# ----------------------------------------------------------------------------- row sources


class RowSource(Protocol):
    """Rows ``[start, stop)`` along dim 0 of named tensors (a 0-d tensor is read whole)."""

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The full tensor's shape, or None when the source has no such tensor."""
        ...

    def names(self) -> set[str]:
        """Every tensor name the source serves."""
        ...

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Fill ``out`` (``[stop - start, *shape[1:]]``, any float dtype) with those rows."""
        ...


def _row_range(ref: TensorRef, start: int, stop: int) -> tuple[int, int]:
    """Absolute byte offset and length of rows ``[start, stop)`` of ``ref``."""
    if not ref.shape:
        return ref.start, ref.nbytes
    if not 0 <= start <= stop <= ref.shape[0]:
        raise TliError(f"rows [{start}, {stop}) are outside {ref.name} {list(ref.shape)}")
    row = ref.nbytes // ref.shape[0] if ref.shape[0] else 0
    return ref.start + start * row, (stop - start) * row


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done : done + _READ_CHUNK]], offset + done)
        if n == 0:
            raise TliError("a weights file shrank while it was being read")
        done += n


def read_ref_into(ref: TensorRef, start: int, stop: int, out: torch.Tensor) -> None:
    """Read rows ``[start, stop)`` of a safetensors tensor into ``out`` (converting the dtype).

    Same dtype and a contiguous ``out``: the bytes go straight into ``out`` (no buffer);
    otherwise one row range is read into a buffer and converted.
    """
    import torch

    offset, nbytes = _row_range(ref, start, stop)
    want = (stop - start) * math.prod(ref.shape[1:]) if ref.shape else 1
    if out.numel() != want:
        raise TliError(f"{ref.name}: rows [{start}, {stop}) hold {want} values, not {out.numel()}")
    if nbytes == 0:
        return
    src_dtype = torch_dtype(ref.dtype, ref.name)
    fd = os.open(ref.file, os.O_RDONLY)
    try:
        if out.dtype == src_dtype and out.is_contiguous() and out.device.type == "cpu":
            _pread_into(fd, memoryview(out.detach().view(-1).view(torch.uint8).numpy()), offset)
            return
        buf = torch.empty(nbytes, dtype=torch.uint8)  # [nbytes]
        _pread_into(fd, memoryview(buf.numpy()), offset)
    finally:
        os.close(fd)
    out.copy_(buf.view(src_dtype).view(out.shape))


def read_ref(ref: TensorRef, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``[start, stop)`` of a safetensors tensor, in its own dtype."""
    import torch

    stop = (ref.shape[0] if ref.shape else 0) if stop is None else stop
    shape = (stop - start, *ref.shape[1:]) if ref.shape else ()
    out = torch.empty(shape, dtype=torch_dtype(ref.dtype, ref.name))
    read_ref_into(ref, start, stop, out)
    return out


class FolderWeights:
    """An HF folder's safetensors tensors, read by byte range (headers parsed once)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.path = Path(model_dir)
        self.refs = read_checkpoint(self.path)

    def shape(self, name: str) -> tuple[int, ...] | None:
        ref = self.refs.get(name)
        return ref.shape if ref is not None else None

    def names(self) -> set[str]:
        return set(self.refs)

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        read_ref_into(self.refs[name], start, stop, out)


class InjectedWeights:
    """The tensors of ``plan`` applied to the base folder, computed row range by row range.

    An original layer's tensor is the base's, renamed; a new layer's is :func:`blend` of its
    source layers' tensors in fp32 (the mean for ``interpolate``, the output scale on the
    residual-writing projections), exactly as :func:`tli.inject.memory.inject_in_memory` does
    on the whole tensor: both are elementwise, so a row range of the result is the result of
    the row range.
    """

    def __init__(self, base_dir: str | Path, plan: Any) -> None:
        from tli.inject.arch import arch_for
        from tli.modelfolder import read_config

        self.base = FolderWeights(base_dir)
        self.config = read_config(Path(base_dir))
        self.spec = arch_for(self.config, list(self.base.refs))
        self.plan = plan
        rx = self.spec.layer_re()
        self._map: dict[str, tuple[list[str], float, bool]] = {}
        per_layer: dict[int, list[str]] = {}
        for name in self.base.refs:
            m = rx.fullmatch(name)
            if m is None:
                self._map[name] = ([name], 1.0, False)
            else:
                per_layer.setdefault(int(m.group(1)), []).append(m.group(2))
        for s in plan.layers:
            for suffix in per_layer.get(s.source, []):
                srcs = [self.spec.name(i, suffix) for i in s.sources]
                scale = s.out_scale if s.new else 1.0
                out = self.spec.name(s.index, suffix)
                self._map[out] = (srcs, scale, s.new and self.spec.is_residual_out(suffix))

    def injected_config(self) -> dict[str, Any]:
        """config.json of the upscaled model (layer count and per-layer fields follow the plan)."""
        from tli.inject.surgery import layer_lists, rewrite_config

        n = int(self.config[self.spec.layer_count_field])
        lists = layer_lists(self.base.path, self.config, self.spec, n)
        return rewrite_config(self.config, self.plan, self.spec, lists)

    def shape(self, name: str) -> tuple[int, ...] | None:
        src = self._map.get(name)
        return self.base.shape(src[0][0]) if src is not None else None

    def names(self) -> set[str]:
        return set(self._map)

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        from tli.inject.surgery import blend

        srcs, scale, residual_out = self._map[name]
        if len(srcs) == 1 and scale == 1.0:
            self.base.read_into(srcs[0], start, stop, out)
            return
        rows = [read_ref(self.base.refs[s], start, stop).float() for s in srcs]  # [r, ...] each
        out.copy_(blend(rows, scale, residual_out))


# ----------------------------------------------------------------------------- the model


def skeleton(config: dict[str, Any]) -> Any:
    """The HF causal LM of ``config`` on the meta device: parameters without memory.

    Buffers (rotary frequencies and the like) are computed by the modules' constructors and
    are not in checkpoints, so they are built for real (they are small). Tied weights are tied
    again afterwards (building parameters on meta unties them).
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = dict(config)
    model_type = config.pop("model_type", None)
    if not model_type:
        raise TliError("config.json has no model_type: cannot build the model to train")
    cfg = AutoConfig.for_model(model_type, **config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, trust_remote_code=False)
    model.tie_weights()
    return model


def is_meta(model: Any) -> bool:
    """Whether ``model``'s parameters are still on the meta device (not yet materialised)."""
    p = next(iter(model.parameters()), None)
    return p is not None and p.is_meta


def unique_parameters(model: Any) -> Iterator[tuple[str, Any]]:
    """``(name, parameter)`` once per parameter (a tied weight under its first name)."""
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p


def local_rows(t: Any) -> tuple[Any, int, int]:
    """``(local tensor, first row, end row)`` of a parameter or state tensor.

    An FSDP2 DTensor holds rows ``[start, stop)`` of dim 0 (``Shard(0)``); a plain tensor all
    of them. A 0-d tensor is ``(t, 0, 0)``.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(t, DTensor):
        return t, 0, (t.shape[0] if t.ndim else 0)
    if t.ndim == 0 or all(isinstance(p, Replicate) for p in t.placements):
        return t.to_local(), 0, (t.shape[0] if t.ndim else 0)
    if len(t.placements) != 1 or t.placements[0] != Shard(0):
        raise TliError(f"cannot read rows of a tensor sharded as {t.placements}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), offset[0], offset[0] + shape[0]


def check_names(model: Any, source: RowSource) -> None:
    """The source must serve every parameter with its shape, and nothing the model lacks."""
    want = {n: tuple(p.shape) for n, p in unique_parameters(model)}
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(want)
    missing = sorted(n for n in want if source.shape(n) is None)
    if missing:
        raise TliError(f"the weights lack {len(missing)} of the model's tensors, e.g. {missing[0]}")
    wrong = sorted(n for n, s in want.items() if tuple(source.shape(n) or ()) != s)
    if wrong:
        n = wrong[0]
        raise TliError(f"{n} is {list(source.shape(n) or ())} in the weights, {list(want[n])} "
                       "in the model: the weights do not belong to this config")  # fmt: skip
    buffers = {n for n, _ in model.named_buffers()}
    extra = sorted(source.names() - set(want) - tied - buffers)
    if extra:
        raise TliError(f"the weights hold {len(extra)} tensors the model has not, e.g. {extra[0]}")


def materialise(model: Any, source: RowSource, device: Any) -> None:
    """Allocate ``model``'s meta parameters on ``device`` and fill them from ``source``.

    Under FSDP2 (after ``fully_shard``) each parameter is a DTensor: only this rank's rows are
    allocated and read. Otherwise every row is. Buffers keep the values their constructors
    computed, unless the source holds them (persistent buffers).
    """
    import torch

    check_names(model, source)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    tied = _tied_groups(model)
    model.to_empty(device=device)
    if _tied_groups(model) != tied:
        # Moving a plain module off meta makes new parameters, one per module: tie them again
        # (FSDP2's sharded parameters keep theirs).
        model.tie_weights()
        if _tied_groups(model) != tied:
            raise TliError("the model's tied weights came apart while it was materialised")
    with torch.no_grad():
        for name, b in model.named_buffers():
            if source.shape(name) is not None:
                _fill(b, name, source)
            else:
                b.copy_(buffers[name])
        for name, p in unique_parameters(model):
            _fill(p, name, source)


def _tied_groups(model: Any) -> list[list[str]]:
    """Names that share one parameter (two or more), in a fixed order."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return sorted(g for g in groups.values() if len(g) > 1)


def _fill(t: Any, name: str, source: RowSource) -> None:
    local, start, stop = local_rows(t)
    if local.numel() == 0:
        return
    if local.device.type == "cpu":
        source.read_into(name, start, stop, local)
        return
    import torch

    host = torch.empty(local.shape, dtype=local.dtype)  # one tensor's rows pass through RAM
    source.read_into(name, start, stop, host)
    local.copy_(host)


def weights_config(source_dir: Path) -> dict[str, Any]:
    """The config.json dict of a folder (an HF folder or a training checkpoint)."""
    from tli.modelfolder import read_config

    return read_config(source_dir)


def write_config(config: dict[str, Any], folder: Path) -> None:
    """Write ``config`` as ``folder/config.json`` (sorted, as HF writes it)."""
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of safetensors dtype ``dtype`` and ``shape``."""
    return DTYPE_BYTES[dtype] * math.prod(shape)
