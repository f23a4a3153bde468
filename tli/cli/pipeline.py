"""`tli pipeline compile|run|submit`: the KFP pipeline, compiled, run locally, or submitted.

``run`` uses KFP's local runner on this machine with a real local Ray head that it starts and
stops (or the head whose Jobs API is ``--ray-jobs``); ``submit`` sends the same pipeline and
parameters to a Kubeflow Pipelines API. kfp is imported only inside the handlers, through
``pipelines/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tli.cli.flags import add_config_args, add_runtime_flags
from tli.config import Resolved, RunConfig, Runtime
from tli.errors import TliError

# Runtime options that reach the stages; the store and the Ray head are pipeline parameters.
STAGE_RUNTIME = [
    "threads", "cpus_per_worker", "writers", "shard_size", "report_every", "max_failures",
    "keep_checkpoints", "compile", "peak_tflops", "device",
]  # fmt: skip
K8S_RAY_JOBS = "http://tli-raycluster-head-svc:8265"


def register(sub: argparse._SubParsersAction) -> None:
    from tli.cli import OneLineParser

    p = sub.add_parser("pipeline", help="compile, run locally, or submit the KFP pipeline")
    ps = p.add_subparsers(
        dest="action", metavar="ACTION", parser_class=OneLineParser, required=True
    )

    c = ps.add_parser("compile", help="write the pipeline's KFP IR YAML")
    c.add_argument("--out", default="pipeline.yaml", help="output file (default: pipeline.yaml)")
    c.add_argument("--image", help="the project image every step runs in (default: tli:VERSION)")
    c.set_defaults(func=_compile)

    r = ps.add_parser("run", help="run the pipeline here with KFP's local runner and local Ray")
    add_run_flags(r)
    add_runtime_flags(r, ["store", "ray_jobs", *STAGE_RUNTIME])
    r.set_defaults(func=_run)

    s = ps.add_parser("submit", help="send the pipeline to a Kubeflow Pipelines API")
    s.add_argument("--host", required=True, help="the KFP API, e.g. http://localhost:8888")
    add_run_flags(s)
    add_runtime_flags(s, STAGE_RUNTIME)
    s.add_argument("--store", help="stage store folder as the steps see it (default: the volume)")
    s.add_argument(
        "--ray-jobs",
        default=K8S_RAY_JOBS,
        help=f"Ray Jobs API of the head as the steps see it (default: {K8S_RAY_JOBS})",
    )
    s.add_argument("--store-pvc", default="tli-store", help="PVC holding the store")
    s.add_argument("--image", help="the project image every step runs in")
    s.add_argument("--experiment", help="KFP experiment name")
    s.set_defaults(func=_submit)


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags that choose a run's configuration (shared by run, submit and demo)."""
    add_config_args(p, preset="default")
    p.add_argument("--base", help="an HF model folder to upscale instead of the bundled SmolLM2")
    p.add_argument(
        "--rerun",
        action="append",
        default=[],
        metavar="STAGE",
        help="recompute this stage even if stored (repeatable or a,b)",
    )


# ---------------------------------------------------------------------------- config


def resolve_run(args: argparse.Namespace) -> Resolved:
    """The pipeline's config: preset, files, overrides, and ``--base`` as ``base.model``."""
    from tli.cli.flags import resolve_args

    if args.base:
        from tli.modelfolder import ModelFolder

        ModelFolder.open(args.base, decoder=False)  # named as the user gave it
        args.overrides = [*args.overrides, (("base", "model"), str(Path(args.base).absolute()),
                                            "--base")]  # fmt: skip
    return resolve_args(args)


def rerun_stages(values: list[str]) -> list[str]:
    """The ``--rerun`` names, checked against the stage table."""
    from tli.pipeline.stages import get_stage

    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    for n in names:
        get_stage(n)
    return names


def pipeline_arguments(
    cfg: RunConfig, store: str, ray_jobs: str | None, rerun: list[str], runtime: Runtime
) -> dict[str, Any]:
    """The pipeline's parameters for a resolved run config."""
    stage_rt = runtime.model_dump(mode="json", include=set(STAGE_RUNTIME))
    args: dict[str, Any] = {"store": store, "ray_jobs": ray_jobs, "rerun": rerun,
                            "runtime": json.dumps(stage_rt)}  # fmt: skip
    for section in ("base", "data", "inject", "tune", "train", "eval"):
        args[f"{section}_config"] = json.dumps(getattr(cfg, section).model_dump(mode="json"))
    return args


def check_run_inputs(args: argparse.Namespace) -> tuple[RunConfig, list[str]]:
    """Every check that needs no Ray and writes nothing (bad input -> one line, exit 2)."""
    cfg = resolve_run(args).config
    rerun = rerun_stages(args.rerun)
    if cfg.base.model:
        from tli.modelfolder import ModelFolder

        ModelFolder.open(cfg.base.model, decoder=False)
    return cfg, rerun


# ---------------------------------------------------------------------------- handlers


def _compile(args: argparse.Namespace) -> int:
    from pipelines.local import IMAGE, compile_pipeline

    out = Path(args.out)
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise TliError(f"cannot write {out}: {out.parent} is not a writable folder")
    compile_pipeline(out, image=args.image or IMAGE)
    print(out)
    return 0


def _run(args: argparse.Namespace) -> int:
    from tli.cli.flags import runtime_of

    cfg, rerun = check_run_inputs(args)
    return run_checked(cfg, rerun, runtime_of(args))


def run_checked(cfg: RunConfig, rerun: list[str], runtime: Runtime) -> int:
    """Run the pipeline here on a checked config: the store, the Ray head, then the stages."""
    from tli.pipeline.store import Store

    store = Store(runtime.store)
    store.check_writable()
    if runtime.ray_jobs:
        from tli.pipeline.runner import job_client

        job_client(runtime.ray_jobs)  # unreachable -> one line, exit 2, before any work
    store.create()
    return run_pipeline(cfg, store.root, rerun, runtime)


def run_pipeline(cfg: RunConfig, store: Path, rerun: list[str], runtime: Runtime) -> int:
    """Run the pipeline locally (inputs already checked); print the stages and the report."""
    import contextlib
    import signal

    from tli.pipeline.head import local_head, terminate_children

    def _terminated(signum: int, frame: Any) -> None:
        # SIGTERM (a scheduler, `kill`): end the running step (KFP waits for it), then unwind
        # like Ctrl-C so the local Ray head is stopped too.
        terminate_children()
        raise SystemExit(128 + signum)

    t0 = time.time()
    head = contextlib.nullcontext(runtime.ray_jobs) if runtime.ray_jobs else local_head()
    from pipelines.local import run_local

    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        with head as address:
            arguments = pipeline_arguments(cfg, str(store), address, rerun, runtime)
            ref = run_local(arguments, pipeline_root=store / ".kfp")
    except TliError:
        raise
    except Exception as e:  # a stage failed: its log is above
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        sys.stderr.write(f"tli pipeline: the run failed: {msg[:300]} (see the log above)\n")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_summary(ref, time.time() - t0)
    return 0


def print_summary(ref: dict[str, Any], seconds: float) -> None:
    """One line per stage (version, cached or ran) and where the report is."""
    rows = [(name, r) for name, r in ref.get("inputs", {}).items()] + [("report", ref)]
    print(f"\ntli pipeline: done in {seconds:.0f} s")
    print(f"  {'step':<14} {'stage':<12} {'version':<20} status")
    for name, r in rows:
        print(f"  {name:<14} {r['stage']:<12} {r['version']:<20} {r['status']}")
    from tli.cli.runs import shown_path

    print(f"report: {shown_path(Path(ref['output']) / 'report.md')}")
    print(f"        {shown_path(Path(ref['output']) / 'report.html')}")


def _submit(args: argparse.Namespace) -> int:
    from tli.cli.flags import runtime_of

    cfg, rerun = check_run_inputs(args)
    from pipelines.local import IMAGE, submit
    from pipelines.tli_pipeline import DEFAULT_STORE as K8S_STORE

    arguments = pipeline_arguments(cfg, args.store or K8S_STORE, args.ray_jobs, rerun,
                                   runtime_of(args))  # fmt: skip
    arguments["store_pvc"] = args.store_pvc
    name = f"tli-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        run_id = submit(
            args.host,
            arguments,
            image=args.image or IMAGE,
            experiment=args.experiment,
            run_name=name,
        )
    except Exception as e:
        why = "connection refused" if "NewConnectionError" in str(e) else type(e).__name__
        raise TliError(
            f"cannot submit to the Kubeflow Pipelines API at {args.host} ({why}): "
            "check --host (the KFP API, e.g. a port-forward of ml-pipeline-ui)"
        ) from None
    print(f"submitted run {name} ({run_id}) to {args.host}")
    return 0
