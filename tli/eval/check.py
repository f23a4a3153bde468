"""Before/after comparison of a base model and its upscaled version on a real sentence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_TEXT = (
    "The Eiffel Tower, completed in 1889 for the World's Fair, is a wrought-iron lattice tower "
    "on the Champ de Mars in Paris."
)


def run_check(
    base_dir: str | Path, upscaled_dir: str | Path, text: str = DEFAULT_TEXT
) -> dict[str, Any]:
    """Layers, parameters and the largest logit difference between two models on ``text``.

    Both are loaded in fp32 from their folders and run on the same tokens (the upscaled
    folder's tokenizer). An identity injection gives a difference of exactly 0.
    """
    from tli.modelfolder import ModelFolder

    # Both folders checked before any heavy import, and never looked up on a Hub.
    ModelFolder.open(base_dir, decoder=False)
    ModelFolder.open(upscaled_dir, tokenizer=True, decoder=False)
    import torch
    from transformers import AutoTokenizer

    from tli.modelfolder import load_causal_lm

    tok = AutoTokenizer.from_pretrained(upscaled_dir, trust_remote_code=False)
    ids = tok(text, return_tensors="pt").input_ids  # [1, seq]
    rows: dict[str, Any] = {}
    logits = []
    for key, d in (("base", base_dir), ("upscaled", upscaled_dir)):
        model = load_causal_lm(d).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits[0])  # [seq, vocab]
        rows[key] = {
            "layers": model.config.num_hidden_layers,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        del model
    a, b = logits
    rows["tokens"] = int(ids.shape[1])
    rows["max_abs_logit_diff"] = float((a - b).abs().max())
    rows["top1_agreement"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    return rows


def check_table(rows: dict[str, Any], title: str) -> Any:
    """A rich Table of :func:`run_check`'s result."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("")
    t.add_column("base", justify="right")
    t.add_column("upscaled", justify="right")
    t.add_row("layers", str(rows["base"]["layers"]), str(rows["upscaled"]["layers"]))
    t.add_row(
        "parameters", f"{rows['base']['parameters']:,}", f"{rows['upscaled']['parameters']:,}"
    )
    t.add_row(
        f"max |logit diff| ({rows['tokens']} tokens)", "", f"{rows['max_abs_logit_diff']:.3g}"
    )
    t.add_row("top-1 token agreement", "", f"{rows['top1_agreement']:.0%}")
    return t
