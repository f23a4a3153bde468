"""The checks and data a training run needs, shared by ``tli train`` and every Tune trial.

Both read their blocks here, so a run and a trial of the same config see the same rows and are
refused for the same reasons with the same words.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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


def check_step_batch(n_blocks: int, cfg: TrainConfig) -> None:
    """Refuse a training split that cannot fill one optimizer step."""
    need = cfg.batch_size * cfg.workers * cfg.grad_accum
    if n_blocks < need:
        raise TliError(
            f"the training split has {n_blocks} blocks of {cfg.seq_len} tokens, "
            f"fewer than one global batch ({cfg.batch_size} x {cfg.workers} workers"
            f"{f' x {cfg.grad_accum} micro-steps' if cfg.grad_accum > 1 else ''}): "
            "use more data, a shorter --seq-len, a smaller --batch-size or fewer --workers"
        )


def training_blocks(data: Any, tokenizer_dir: Path, cfg: TrainConfig) -> torch.Tensor:
    """The training split as ``[n, seq_len]`` blocks: at least one global batch of them."""
    from tli.data.blocks import load_blocks

    blocks = load_blocks(data, tokenizer_dir, cfg.seq_len, "train")  # [n, T]
    check_step_batch(int(blocks.shape[0]), cfg)
    return blocks


def count_training_blocks(data: Any, tokenizer_dir: Path, cfg: TrainConfig) -> int | None:
    """How many training blocks there are (checked: at least one global batch).

    With ``train.feed: stream`` nothing is tokenised here: the count comes from the token
    cache, or is None when the cache lacks shards (the run tokenises them with Ray Data and
    checks then); the shards are checked to exist either way.
    """
    if cfg.feed == "memory":
        return int(training_blocks(data, tokenizer_dir, cfg).shape[0])
    from tli.data.stream import token_index

    index = token_index(data, tokenizer_dir, "train", tokenise_missing=False)
    if index is None:
        return None
    check_step_batch(index.n_blocks(cfg.seq_len), cfg)
    return index.n_blocks(cfg.seq_len)


def training_stream(data: Any, tokenizer_dir: Path, cfg: TrainConfig) -> Any:
    """The training split's :class:`tli.data.stream.TokenIndex` (tokenising what the cache
    lacks, with Ray Data when Ray is up), checked to fill one global batch."""
    from tli.data.stream import token_index

    index = token_index(data, tokenizer_dir, "train")
    check_step_batch(index.n_blocks(cfg.seq_len), cfg)
    return index


def validation_blocks(
    data: Any, tokenizer_dir: Path, cfg: TrainConfig, *, required: bool
) -> torch.Tensor | None:
    """The first ``cfg.validation.blocks`` validation blocks, a multiple of the workers (each
    gets a share).

    With ``train.feed: stream`` only those blocks are read (from the token cache), never the
    whole split.

    Args:
        required: a search needs them (its objective): none is an error. Training can go
            without: none is a note on stderr and no held-out loss.
    """
    try:
        available, take = _validation_source(data, tokenizer_dir, cfg)
    except TliError as e:
        if required or "fewer than one block" not in str(e):
            raise
        print(f"note: no held-out loss during training ({e})", file=sys.stderr)
        return None
    n = min(cfg.validation.blocks, available) // cfg.workers * cfg.workers
    if n == 0:
        if required:
            raise TliError(
                f"{available} validation blocks cannot be shared by {cfg.workers} workers: "
                "use more data or a shorter --seq-len"
            )
        print(f"note: no held-out loss: {available} validation blocks for {cfg.workers} "
              "workers", file=sys.stderr)  # fmt: skip
        return None
    return take(n)  # [n, T]


def _validation_source(
    data: Any, tokenizer_dir: Path, cfg: TrainConfig
) -> tuple[int, Callable[[int], torch.Tensor]]:
    """(validation blocks available, a function giving the first n); an error, as
    ``load_blocks`` words it, when there is not one block."""
    if cfg.feed == "memory":
        from tli.data.blocks import load_blocks

        val = load_blocks(data, tokenizer_dir, cfg.seq_len, "validation")  # [m, T]
        return int(val.shape[0]), lambda n: val[:n].clone()
    from tli.data.stream import token_index

    index = token_index(data, tokenizer_dir, "validation")
    if index.n_blocks(cfg.seq_len) == 0:
        raise TliError(
            f"the validation split has {index.n_tokens} tokens, fewer than one block of "
            f"{cfg.seq_len}: use more data or a shorter --seq-len"
        )
    return index.n_blocks(cfg.seq_len), lambda n: index.head(n, cfg.seq_len)


def check_validation(data: Any, tokenizer_dir: Path, cfg: TrainConfig) -> None:
    """Refuse a search whose validation split cannot give its objective (before Ray starts).

    With ``train.feed: stream`` and a token cache that lacks shards, nothing is tokenised here:
    the search checks when it has tokenised them (with Ray Data).
    """
    if cfg.feed == "stream":
        from tli.data.stream import token_index

        if token_index(data, tokenizer_dir, "validation", tokenise_missing=False) is None:
            return
    validation_blocks(data, tokenizer_dir, cfg, required=True)
