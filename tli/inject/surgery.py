"""Tensor surgery: an injection plan turned into output tensors and an output config.

Pure functions over safetensors headers (:class:`tli.inject.stio.TensorRef`) and config
dicts; tensors are read only for the ones that must be computed (interpolation, a fractional
``alpha``), one at a time, and torch is imported only then. The streaming executor
(:mod:`tli.inject.stage`) and the in-memory one (:mod:`tli.inject.memory`) share them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from tli.errors import TliError
from tli.inject.arch import ArchSpec
from tli.inject.plan import LayerSpec, Plan
from tli.inject.stio import OutTensor, TensorRef, tensor_bytes

# Families whose config class derives `layer_types` when config.json does not list it.
_DERIVES_LAYER_TYPES = {"qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text", "smollm3", "cohere2"}
_ST_TO_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


# ---------------------------------------------------------------------------- config


def layer_lists(model_dir: Path, config: dict[str, Any], spec: ArchSpec, n: int):
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


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


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
    output order, each with its tensors in name order; :func:`tli.inject.stio.plan_shards`
    decides the order in the files.
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
        return tensor_bytes(t)

    return OutTensor(
        name, src.dtype, src.shape, src.nbytes, "compute", compute=compute, home=src.file
    )
