"""`tli inject`: upscale a model folder by a streaming injection plan."""

from __future__ import annotations

import argparse

from tli.cli.flags import add_config_args, add_runtime_flags, add_section_flags
from tli.cli.jobs import add_dry_run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inject",
        help="inject layers into a model (TLI, LLaMA Pro, DUS, stack) or upcycle it to MoE",
        description="Upscale an HF model folder in depth (--method tli, llama-pro, dus, stack), "
        "or upcycle its MLPs into experts (--method moe --experts E --top-k K: the family's MoE "
        "sibling, e.g. Llama -> Mixtral). Tensors are streamed shard by shard: the model is "
        "never held in memory. Writes the folder atomically. A flag of another method than the "
        "chosen one is an error.",
    )
    p.add_argument(
        "--model",
        required=False,
        help="input HF model folder (default: base.model from --config, else the bundled SmolLM2)",
    )
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar (= --no-progress)")
    add_dry_run(p)
    add_config_args(p)
    add_runtime_flags(p, ["writers", "shard_size", "progress"])
    add_section_flags(p, "inject")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tli.cli.flags import given_flags, resolve_args, runtime_of
    from tli.cli.jobs import model_or_base
    from tli.config import METHOD_FIELDS, methods_using
    from tli.errors import TliError
    from tli.inject.stage import prepare, run_inject
    from tli.output import precheck

    run = resolve_args(args)
    cfg = run.config.inject
    # A flag the chosen method ignores is an error even when it repeats the default (the
    # config's own check can only see values that differ from it).
    for name in given_flags(args, "inject"):
        if name != "method" and name not in METHOD_FIELDS[cfg.method]:
            flag = "--" + name.replace("_", "-")
            owners = " / ".join(methods_using(name))
            raise TliError(f"{flag} applies to --method {owners} only, not {cfg.method}")
    runtime = runtime_of(args, **({"progress": False} if args.quiet else {}))
    model = model_or_base(args.model, run.config.base.model)
    if args.dry_run:
        job = prepare(cfg, {"base": model}, runtime)
        precheck(Path(args.out), force=args.force, protect=[model])  # what the run would refuse
        if job.moe is not None:
            _print_moe(job.describe())
        else:
            _print_plan(job.plan)
        print(f"would write {job.describe()['bytes_out']:,} bytes to {args.out} (dry run)")
        return 0
    out = run_inject(model, Path(args.out), cfg, force=args.force, runtime=runtime)
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


def _print_moe(d: dict) -> None:
    """The MoE upcycling a dry run would write: the sibling, its settings and sizes."""
    from rich.console import Console
    from rich.table import Table

    moe, params = d["moe"], d["parameters"]
    t = Table(title=f"plan: moe {d['plan']['num_layers_in']} layers -> {moe['architecture']}")
    t.add_column("")
    t.add_column("value", justify="right")
    for k, v in moe["spec"].items():
        t.add_row(k, "none" if v is None else str(v))
    t.add_row("parameters (dense)", f"{params['before']:,}")
    t.add_row("parameters (total)", f"{params['after']:,}")
    t.add_row("parameters (active per token)", f"{params['active']:,}")
    t.add_row("function-preserving", "yes" if d["plan"]["function_preserving"] else "no")
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
    if "moe" in prov:
        t.add_row("architecture", "", prov["moe"]["architecture"])
        t.add_row("experts / top-k", "", f"{prov['moe']['spec']['experts']} / "
                  f"{prov['moe']['spec']['top_k']}")  # fmt: skip
        t.add_row("active parameters", "", f"{prov['parameters']['active']:,}")
    else:
        t.add_row("new layers", "", ranges(plan["new_layers"]))
    t.add_row("function-preserving", "", "yes" if plan["function_preserving"] else "no")
    Console().print(t)
