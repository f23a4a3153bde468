"""`tli compare`: TLI vs LLaMA Pro vs DUS vs MoE upcycling vs G_stack, measured, with seeds."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from tli.errors import TliError

RUNTIME_FLAGS = ["store", "ray_address", "ray_jobs", "threads", "cpus_per_worker", "device",
                 "report_every", "progress"]  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``compare`` sub-command."""
    from tli.cli.flags import add_runtime_flags
    from tli.cli.jobs import add_dry_run

    p = sub.add_parser(
        "compare",
        help="compare upscaling methods on one base, data and budget, with seeds; report",
        description="Run every method x seed of an experiment file (experiments/NAME.yaml) "
        "from the same base, on the same data, step budget, lr schedule and seeds, through the "
        "pipeline's stages and store (a rerun is cached; a method added later runs alone), "
        "then write the report (Markdown, HTML, PNG, with a verdict on each of the paper's "
        "claims) into the store and into --results.",
        epilog="Experiment values can be overridden as SECTION.FIELD=VALUE (e.g. train.steps=5 "
        "eval.limit=10 match.experts=8).",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="the experiment YAML")
    p.add_argument("--methods", metavar="A,B", help="only these of the experiment's methods")
    p.add_argument("--seeds", metavar="0,1", help="these seeds instead of the experiment's")
    p.add_argument("--results", metavar="DIR",
                   help="where the report is copied (default: results/<experiment>)")  # fmt: skip
    p.add_argument("--no-results", action="store_true", help="leave the report in the store only")
    p.add_argument("--force", action="store_true", help="replace an existing --results folder")
    p.add_argument("--rerun", action="append", default=[], metavar="STAGE",
                   help="recompute this stage even if stored (repeatable or a,b)")  # fmt: skip
    p.add_argument("--kfp", action="store_true",
                   help="run the experiment's KFP pipeline with the local runner (every method "
                   "and seed a branch; a local Ray head unless --ray-jobs)")  # fmt: skip
    p.add_argument("--compile", metavar="FILE", help="write the experiment's KFP pipeline YAML")
    p.add_argument("--image", help="the image of every pipeline step (with --compile)")
    add_dry_run(p)
    add_runtime_flags(p, RUNTIME_FLAGS)
    p.set_defaults(func=handler, overrides=[])


def experiment_of(args: argparse.Namespace) -> Any:
    """The experiment file, with ``--methods``, ``--seeds`` and the overrides, validated."""
    from tli.compare.spec import Experiment, load_experiment
    from tli.config import validate

    exp = load_experiment(args.config, list(args.overrides))
    data = exp.to_json()
    if args.methods:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        known = [m.name for m in exp.entries]
        bad = [n for n in names if n not in known]
        if bad or not names:
            raise TliError(f"--methods {args.methods}: the experiment has {', '.join(known)}")
        data["methods"] = [m for m, e in zip(data["methods"], exp.entries, strict=True)
                           if e.name in names]  # fmt: skip
        if exp.reference not in names:
            data["reference"] = None
    if args.seeds:
        try:
            data["seeds"] = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            raise TliError(f"--seeds {args.seeds}: give integers, e.g. 0,1,2") from None
    return validate(Experiment, data, f"{args.config} with --methods/--seeds")


def handler(args: argparse.Namespace) -> int:
    """Check everything, then run the comparison (or its pipeline) and copy the report."""
    from tli.cli.flags import runtime_of
    from tli.cli.pipeline import rerun_stages
    from tli.compare.run import match_base
    from tli.pipeline.store import Store

    exp = experiment_of(args)
    runtime = runtime_of(args)
    rerun = rerun_stages(args.rerun)
    matched = match_base(exp)  # every method checked against the base before anything runs
    if args.compile or args.dry_run:
        if args.compile:
            return _compile(exp, matched, Path(args.compile), args.image)
        _print_plan(exp, matched)
        return 0
    results = None if args.no_results else Path(args.results or f"results/{exp.name}")
    if results is not None:
        from tli.output import precheck

        precheck(results, force=args.force)
    store = Store(runtime.store)
    store.check_writable()
    if runtime.ray_jobs:
        from tli.pipeline.runner import job_client

        job_client(runtime.ray_jobs)  # unreachable -> one line, exit 2, before any work
    store.create()
    if args.kfp:
        report = _run_kfp(exp, matched, store.root, runtime, rerun)
    else:
        from tli.compare.run import run_compare

        report = run_compare(exp, store=store.root, runtime=runtime, ray_jobs=runtime.ray_jobs,
                             rerun=tuple(rerun), matched=matched).report  # fmt: skip
    print_verdicts(report.output)
    if results is not None:
        copy_results(report, results, args, force=args.force)
        print(f"results: {results}/report.md, {results}/report.html")
    return 0


def _print_plan(exp: Any, matched: list[Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = exp.train
    tokens = t.steps * t.seq_len * t.batch_size * t.workers * t.grad_accum
    table = Table(title=f"tli compare {exp.name}: {len(matched)} methods x {len(exp.seeds)} "
                  f"seeds, {tokens:,} training tokens each (dry run: nothing runs)")  # fmt: skip
    for col in ("method", "layers", "parameters", "active", "freeze", "matching"):
        left = col in ("method", "freeze", "matching")
        table.add_column(col, justify="left" if left else "right")
    for m in matched:
        table.add_row(m.name, str(m.layers), f"{m.parameters:,}", f"{m.active:,}",
                      m.train.freeze, m.note)  # fmt: skip
    Console(width=160).print(table)


def print_verdicts(report_dir: Path) -> None:
    """The claims and their verdicts, and where the report is."""
    import json

    s = json.loads((report_dir / "summary.json").read_text())
    print(f"\ntli compare {s['experiment']['name']}:")
    for m in s["methods"]:
        fin = m["final_heldout"]
        print(f"  {m['name']:<12} held-out loss step 0 {m['init']['heldout'] or float('nan'):.4f}"
              f" -> {fin['mean'] if fin else float('nan'):.4f}")  # fmt: skip
    for c in s["claims"]:
        print(f"  [{c['verdict']}] {c['claim']}: {c['figure']}")
    print(f"report: {report_dir / 'report.md'}\n        {report_dir / 'report.html'}")


def copy_results(report: Any, results: Path, args: argparse.Namespace, *, force: bool) -> None:
    """Copy the report's files to ``results`` (staged), with a README saying how it was made."""
    import platform
    import shutil
    from datetime import UTC, datetime

    from tli import __version__
    from tli.output import staged

    command = command_line(args)
    with staged(results, force=force) as st:
        for f in sorted(report.output.iterdir()):
            if f.is_file():
                shutil.copyfile(f, st.path / f.name)
        shutil.copyfile(args.config, st.path / "experiment.yaml")
        (st.path / "README.md").write_text(
            f"# Results: tli compare {_name(report)}\n\n"
            f"Made by `{command}` with tli {__version__} on {datetime.now(UTC):%Y-%m-%d} "
            f"({platform.machine()}, {_cpus()} CPUs); store version "
            f"`compare/{report.version}`.\n\n"
            "- `report.md`, `report.html`: the report; `summary.json`: every number in it\n"
            "- `experiment.yaml`: the experiment file as given (overrides are in the "
            "command)\n"
        )  # fmt: skip


def _name(report: Any) -> str:
    import json

    return json.loads((report.output / "summary.json").read_text())["experiment"]["name"]


def command_line(args: argparse.Namespace) -> str:
    """The ``tli compare`` command that gives this experiment (the flags that change a result)."""
    parts = ["tli", "compare", "--config", args.config]
    for flag in ("methods", "seeds"):
        if getattr(args, flag):
            parts += [f"--{flag}", getattr(args, flag)]
    parts += list(args.overrides)
    if args.results:
        parts += ["--results", args.results]
    return " ".join(shlex.quote(str(x)) for x in parts)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _compile(exp: Any, matched: list[Any], out: Path, image: str | None) -> int:
    import os

    from pipelines.compare_pipeline import compile_compare

    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise TliError(f"cannot write {out}: {out.parent} is not a writable folder")
    compile_compare(exp, matched, out, image=image)
    print(out)
    return 0


def _run_kfp(exp: Any, matched: list[Any], store: Path, runtime: Any, rerun: list[str]) -> Any:
    import contextlib

    from pipelines.compare_pipeline import run_compare_local
    from tli.pipeline.head import local_head

    head = contextlib.nullcontext(runtime.ray_jobs) if runtime.ray_jobs else local_head()
    with head as address:
        return run_compare_local(exp, matched, store=store, ray_jobs=address, rerun=rerun,
                                 runtime=runtime)  # fmt: skip
