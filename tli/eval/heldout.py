"""Held-out loss: the number Ray Tune minimises and the quickest signal of a short training run.

It is the mean next-token cross-entropy over a fixed set of blocks from the corpus's held-out
split (see :func:`tli.data.blocks.load_blocks`), never a benchmark's test set.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _autocast(device: torch.device, bf16: bool):
    import contextlib

    import torch

    if not bf16:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _token_bytes_for(model: Any) -> torch.Tensor | None:
    """Byte lengths of the model's tokenizer's tokens, when the model folder is known."""
    from tli.data.blocks import token_byte_lengths

    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    if not name:
        return None
    d = Path(name)
    if not ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file()):
        return None
    return token_byte_lengths(d)


def heldout_loss(
    model: Any,
    blocks: torch.Tensor,
    *,
    batch_size: int = 8,
    bf16: bool = True,
    token_bytes: torch.Tensor | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Mean next-token loss of ``model`` over ``blocks``.

    Every position but the first of each block is predicted; the loss is averaged over all of
    them (so every token weighs the same, whatever the batch size). The model is put in eval
    mode for the measurement and returned to its previous mode afterwards.

    Args:
        model: a causal LM (``model(input_ids=...).logits``), on any device.
        blocks: int64 ``[n_blocks, seq_len]`` from :func:`tli.data.blocks.load_blocks`.
        batch_size: blocks per forward pass.
        bf16: run the forward in bf16 autocast (the loss itself is computed in fp32).
        token_bytes: int64 ``[vocab]`` UTF-8 byte length of each token
            (:func:`tli.data.blocks.token_byte_lengths`); None = found from the model's folder
            when it was loaded from one with its tokenizer, else no bits per byte.
        progress: show a progress bar.

    Returns:
        ``loss`` (nats per token), ``perplexity``, ``tokens`` (predicted tokens), ``blocks``,
        and ``bits_per_byte`` when the tokens' byte lengths are known.
    """
    import torch

    if blocks.ndim != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [n_blocks, seq_len >= 2], got {tuple(blocks.shape)}")
    if token_bytes is None:
        token_bytes = _token_bytes_for(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nats = 0.0  # summed in float64 on the host: exact enough for any corpus size
    total_tokens = 0
    total_bytes = 0
    n = blocks.shape[0]
    bar = _bar(n) if progress else None
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                ids = blocks[i : i + batch_size].to(device)  # [b, t]
                nats, targets = _nats(model, ids, device, bf16)
                total_nats += nats
                total_tokens += targets.numel()
                if token_bytes is not None:
                    total_bytes += int(token_bytes[targets.cpu()].sum())
                if bar is not None:
                    bar.update(ids.shape[0])
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    loss = total_nats / total_tokens
    out: dict[str, float] = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),  # exp overflows float above ~709
        "tokens": total_tokens,
        "blocks": n,
    }
    if token_bytes is not None and total_bytes > 0:
        out["bits_per_byte"] = total_nats / math.log(2) / total_bytes
    return out


def _nats(model: Any, ids: torch.Tensor, device: Any, bf16: bool) -> tuple[float, torch.Tensor]:
    """Summed next-token cross-entropy of one batch ``[b, t]``, and its targets ``[b, t-1]``."""
    import torch.nn.functional as F

    with _autocast(device, bf16):
        logits = model(input_ids=ids).logits  # [b, t, vocab]
    logits = logits[:, :-1].float()  # [b, t-1, vocab]: position j predicts j+1
    targets = ids[:, 1:]  # [b, t-1]
    nats = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    return float(nats), targets


def _bar(n: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=n, desc="held-out loss", unit="block")
