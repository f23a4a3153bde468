"""`tli check`: base vs upscaled, side by side, on a real sentence."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="compare a base and an upscaled model: layers, parameters, logit difference",
        description="Load both models (fp32) and print layers, parameters and the largest "
        "logit difference on a real sentence. Identity injection gives exactly 0.",
    )
    p.add_argument("base", help="base HF model folder")
    p.add_argument("upscaled", help="upscaled HF model folder")
    p.add_argument("--text", help="the sentence (default: one about the Eiffel Tower)")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tli.eval.check import DEFAULT_TEXT, check_table, run_check

    rows = run_check(args.base, args.upscaled, args.text or DEFAULT_TEXT)
    Console().print(check_table(rows, "tli check: base vs upscaled"))
    return 0
