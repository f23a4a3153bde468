"""`tli inject`: upscale a model folder by a streaming injection plan."""

from __future__ import annotations

import argparse
import re

from tli.cli.flags import add_section_flags
from tli.errors import TliError


def parse_size(text: str) -> int:
    """'5GB', '512MB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB or 500MB")
    unit = (m.group(2) or "").upper().replace("I", "").rstrip("B")
    mult = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[unit]
    return int(float(m.group(1)) * mult)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inject",
        help="inject layers into a model (TLI, DUS, stack), streaming",
        description="Upscale an HF model folder in depth. Tensors are streamed shard by shard: "
        "the model is never held in memory. Writes the folder atomically.",
    )
    p.add_argument(
        "--model",
        required=False,
        help="input HF model folder (default: base.model from --config, else the bundled SmolLM2)",
    )
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--config", help="run-config YAML; its inject section is used, flags override")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--shard-size", type=parse_size, default="5GB", help="max output shard size (default: 5GB)"
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="output shards written at once (default: one per CPU, at most 4)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_section_flags(p, "inject")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tli.cli.flags import resolve_run_config
    from tli.inject.stage import plan_for_model_dir, run_inject

    run = resolve_run_config(args, ["inject"])
    cfg = run.inject
    if cfg.method != "tli":
        set_tli = [
            k
            for k in ("init", "alpha", "source", "positions")
            if getattr(args, f"inject__{k}", None) is not None
        ]
        if set_tli:
            raise TliError(f"--{set_tli[0]} applies to --method tli only, not {cfg.method}")
    model = args.model or run.base.model
    if model is None:
        from tli.base import import_base

        model = import_base()
    if args.dry_run:
        plan = plan_for_model_dir(model, cfg)
        _print_plan(plan)
        return 0
    out = run_inject(
        Path(model),
        Path(args.out),
        cfg,
        force=args.force,
        max_shard_bytes=args.shard_size,
        progress=not args.quiet,
        threads=args.threads,
    )
    _print_summary(out)
    return 0


def _print_plan(plan) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"plan: {plan.method} {plan.num_layers_in} -> {plan.num_layers_out} layers")
    for col in ("out", "from", "init", "out_scale"):
        t.add_column(col, justify="right" if col != "init" else "left")
    for s in plan.layers:
        style = "bold" if s.new else None
        t.add_row(
            str(s.index), "+".join(map(str, s.sources)), s.init, f"{s.out_scale:g}", style=style
        )
    Console().print(t)


def ranges(xs: list[int]) -> str:
    """[5, 11, 24, 25, 26] -> '5,11,24-26'."""
    parts: list[str] = []
    for x in xs:
        if parts and parts[-1].split("-")[-1] == str(x - 1):
            parts[-1] = parts[-1].split("-")[0] + f"-{x}"
        else:
            parts.append(str(x))
    return ",".join(parts)


def _print_summary(out) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    prov = json.loads((out / "tli_provenance.json").read_text())
    plan = prov["plan"]
    t = Table(title=f"tli inject: {plan['method']} -> {out}")
    t.add_column("")
    t.add_column("base", justify="right")
    t.add_column("upscaled", justify="right")
    t.add_row("layers", str(plan["num_layers_in"]), str(plan["num_layers_out"]))
    t.add_row("parameters", f"{prov['parameters']['before']:,}", f"{prov['parameters']['after']:,}")
    t.add_row("new layers", "", ranges(plan["new_layers"]))
    t.add_row("function-preserving", "", "yes" if plan["function_preserving"] else "no")
    Console().print(t)
