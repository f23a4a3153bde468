"""The checks and data a training run needs, shared by ``tli train`` and every Tune trial.

Both read their blocks here, so a run and a trial of the same config see the same rows and are
refused for the same reasons with the same words.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tli.config import TrainConfig
from tli.errors import TliError
from tli.modelfolder import ModelFolder

if TYPE_CHECKING:
    import torch


def check_context(model: ModelFolder, seq_len: int) -> None:
    """Refuse sequences longer than the model's context."""
    ctx = model.context
    if ctx is not None and seq_len > ctx:
        raise TliError(
            f"--seq-len {seq_len} is longer than the model's context ({ctx} tokens): "
            f"use --seq-len {ctx} or less"
        )


def trained_layers(model: ModelFolder, freeze: str) -> tuple[int, ...] | None:
    """The decoder layers the freeze policy trains (``original``: the injected ones)."""
    plan = model.plan
    if freeze != "original":
        return tuple(plan.new_layers) if plan is not None else None
    if plan is None:
        raise TliError(
            f"{model.path} has no tli_plan.json, so --freeze original cannot know which "
            "layers are new: train an injected model (tli inject) or use --freeze none"
        )
    if not plan.new_layers:
        raise TliError(f"the plan in {model.path} injects no new layers: use --freeze none")
    return tuple(plan.new_layers)


def training_blocks(data: Any, tokenizer_dir: Path, cfg: TrainConfig) -> torch.Tensor:
    """The training split as ``[n, seq_len]`` blocks: at least one global batch of them."""
    from tli.data.blocks import load_blocks

    blocks = load_blocks(data, tokenizer_dir, cfg.seq_len, "train")  # [n, T]
    if blocks.shape[0] < cfg.batch_size * cfg.workers:
        raise TliError(
            f"the training split has {blocks.shape[0]} blocks of {cfg.seq_len} tokens, "
            f"fewer than one global batch ({cfg.batch_size} x {cfg.workers} workers): "
            "use more data, a shorter --seq-len, a smaller --batch-size or fewer --workers"
        )
    return blocks


def validation_blocks(
    data: Any, tokenizer_dir: Path, cfg: TrainConfig, *, required: bool
) -> torch.Tensor | None:
    """The first ``cfg.validation.blocks`` validation blocks, a multiple of the workers (each
    gets a share).

    Args:
        required: a search needs them (its objective): none is an error. Training can go
            without: none is a note on stderr and no held-out loss.
    """
    from tli.data.blocks import load_blocks

    try:
        val = load_blocks(data, tokenizer_dir, cfg.seq_len, "validation")  # [m, T]
    except TliError as e:
        if required or "fewer than one block" not in str(e):
            raise
        print(f"note: no held-out loss during training ({e})", file=sys.stderr)
        return None
    n = min(cfg.validation.blocks, val.shape[0]) // cfg.workers * cfg.workers
    if n == 0:
        if required:
            raise TliError(
                f"{val.shape[0]} validation blocks cannot be shared by {cfg.workers} workers: "
                "use more data or a shorter --seq-len"
            )
        print(f"note: no held-out loss: {val.shape[0]} validation blocks for {cfg.workers} "
              "workers", file=sys.stderr)  # fmt: skip
        return None
    return val[:n].clone()  # [n, T]
