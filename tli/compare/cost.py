"""What training a model costs: its parameters, the trained ones, and FLOPs per token.

Computed from the config alone, on PyTorch's meta device (no weights are read or allocated), by
the very functions training uses (:func:`tli.train.step.apply_freeze`,
:func:`tli.train.step.flops_per_token`), so the figures in a comparison or a search report are
those of the run. ``tune`` uses it for each trial's FLOPs, ``compare`` for each method's.

MoE: :func:`~tli.train.step.flops_per_token` counts every weight of a layer, but a token runs
through only ``top_k`` of the ``E`` experts; the ``E - top_k`` it skips cost it no forward, no
backward and no weight gradient, so their share is taken off here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Cost:
    """Parameters and training FLOPs of one model under one freeze policy.

    Attributes:
        parameters: all of them (a tied embedding counts once).
        trainable: those the freeze policy trains.
        active: those one token uses (= parameters, except for MoE).
        flops_per_token: training FLOPs per token (forward + backward), as training counts them
            for MFU, with MoE's skipped experts taken off.
    """

    parameters: int
    trainable: int
    active: int
    flops_per_token: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def _experts(config: dict[str, Any]) -> tuple[int, int]:
    """(experts per layer, experts per token) of an MoE config; (0, 0) for a dense one."""
    e = config.get("num_local_experts") or config.get("num_experts") or 0
    return int(e), int(config.get("num_experts_per_tok") or 0)


def training_cost(
    config: dict[str, Any], freeze: str, new_layers: Sequence[int] | None, seq_len: int
) -> Cost:
    """The :class:`Cost` of training a model of ``config`` (a config.json dict).

    Args:
        config: the model's config.json as a dict (an upscaled model's, or one rewritten by a
            plan before anything is written).
        freeze: ``none`` or ``original`` (then ``new_layers`` are the trained decoder layers).
        new_layers: the plan's new layers (None for a model without a plan).
        seq_len: tokens per sequence (attention's FLOPs grow with it).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tli.train.step import apply_freeze, decoder_layers, flops_per_token

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = AutoModelForCausalLM.from_config(cfg)
    trainable, total = apply_freeze(model, freeze, list(new_layers) if new_layers else None)
    fpt = flops_per_token(model, seq_len)
    experts, top_k = _experts(config)
    active = total
    if experts and top_k:
        layers = decoder_layers(model)
        skipped = trained_skipped = 0
        for layer in layers:
            ex = [p for n, p in layer.named_parameters() if ".experts." in f".{n}"]
            per_expert = sum(p.numel() for p in ex) // experts
            skipped += per_expert * (experts - top_k)
            trained_skipped += per_expert * (experts - top_k) if ex and ex[0].requires_grad else 0
        active = total - skipped
        # Skipped experts: no forward (2 per weight), no activation gradient through them, no
        # weight gradient (2 each) when they are trained.
        fpt -= 2.0 * skipped + 4.0 * trained_skipped
    return Cost(total, trainable, active, fpt)
