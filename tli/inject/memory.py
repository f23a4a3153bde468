"""Injection in memory: a plan applied to a loaded model (Ray Tune trials build theirs so).

Writing a folder per trial would be waste: a trial builds its upscaled model from the shared
base. The new layers are made by the same :func:`tli.inject.surgery.blend` as the streaming
path, so both give the same weights.
"""

from __future__ import annotations

from typing import Any

from tli.errors import TliError
from tli.inject.arch import arch_for
from tli.inject.plan import Plan
from tli.inject.surgery import blend, rewrite_config


def inject_in_memory(model: Any, plan: Plan) -> Any:
    """Apply ``plan`` to a loaded HF causal LM (in place) and return it.

    An ``moe`` plan returns a new model instead (the family's MoE sibling, built by
    :func:`tli.inject.moe.moe_in_memory`; the dense model is left as it is).

    Used where writing a folder would be waste (a Tune trial builds its model from the shared
    base). Original layers are reused as they are; every new layer is a deep copy, blended and
    scaled by the same :func:`blend` as the streaming path. Each attention module's ``layer_idx``
    is renumbered, or cached generation would read the wrong cache slot.
    """
    import copy

    import torch

    if plan.method == "moe":  # a new model: the MoE sibling, from the same tensor functions
        from tli.inject.moe import MoeSpec, moe_in_memory

        return moe_in_memory(model, MoeSpec(**plan.params))
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
