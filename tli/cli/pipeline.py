"""`tli pipeline compile|run|submit`: the KFP pipeline, compiled, run locally, or submitted.

``run`` uses KFP's local runner on this machine with a real local Ray head that it starts and
stops (or the head whose Jobs API is ``--ray-jobs``); ``submit`` sends the same pipeline and
parameters to a Kubeflow Pipelines API (namespace, experiment, run name and the credentials
``kfp.Client`` takes: a bearer token, session cookies or the in-cluster service account), prints
the run's URL and, with ``--wait``, follows it to the end. ``--driver STAGE.FIELD=VALUE`` sets
where a stage's Ray job driver runs (``runtime.drivers``). kfp is imported only inside the
handlers, through ``pipelines/``.
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
from tli.pipeline.jobs import CLUSTER_JOBS_API

# Runtime options that reach the stages; the store and the Ray head are pipeline parameters.
STAGE_RUNTIME = [
    "threads", "cpus_per_worker", "writers", "shard_size", "report_every", "max_failures",
    "keep_checkpoints", "compile", "peak_tflops", "device", "storage", "connect_timeout_s",
    "scale_timeout_s", "offline",
]  # fmt: skip
# The job API of the cluster in infra/, as the pipeline's steps see it (the compiled default).
K8S_RAY_JOBS = CLUSTER_JOBS_API


def register(sub: argparse._SubParsersAction) -> None:
    from tli.cli import OneLineParser

    p = sub.add_parser("pipeline", help="compile, run locally, or submit the KFP pipeline")
    ps = p.add_subparsers(
        dest="action", metavar="ACTION", parser_class=OneLineParser, required=True
    )

    c = ps.add_parser(
        "compile",
        help="write the pipeline's KFP IR YAML",
        description="Write the pipeline as KFP IR YAML, to upload to Kubeflow Pipelines. Its "
        "ray_jobs parameter defaults to the head of the cluster in infra/.",
    )
    c.add_argument("--out", default="pipeline.yaml", help="output file (default: pipeline.yaml)")
    c.add_argument("--image", help="the project image every step runs in (default: tli:VERSION)")
    c.add_argument(
        "--online",
        action="store_true",
        help="the online variant: steps may reach the Hugging Face Hub (HF_HUB_OFFLINE=0, "
        "HF_TOKEN from the optional secret tli-hf-token) and runtime defaults to offline: false",
    )
    c.set_defaults(func=_compile)

    r = ps.add_parser(
        "run",
        help="run the pipeline here with KFP's local runner and local Ray",
        description="Run every stage here with KFP's local runner, each as a Ray job on a local "
        "head that this command starts and stops, or on the head whose Jobs API is --ray-jobs. "
        "Stored versions are reused; --rerun recomputes a stage.",
    )
    add_run_flags(r)
    add_runtime_flags(r, ["store", "ray_jobs", *STAGE_RUNTIME])
    add_driver_flag(r)
    r.set_defaults(func=_run)

    s = ps.add_parser(
        "submit",
        help="send the pipeline to a Kubeflow Pipelines API",
        description="Compile the pipeline and create a run of it on a Kubeflow Pipelines API, "
        "with this run's config as its parameters; print the run's URL (--wait: follow it).",
    )
    s.add_argument(
        "--host",
        help="the KFP API, e.g. http://localhost:8080 (a port-forward of ml-pipeline-ui); "
        "default: $KF_PIPELINES_ENDPOINT, else the in-cluster service (inside a pod)",
    )
    add_run_flags(s)
    add_runtime_flags(s, STAGE_RUNTIME)
    add_driver_flag(s)
    add_submit_flags(s)
    s.add_argument("--store", help="stage store folder as the steps see it (default: the volume)")
    s.add_argument(
        "--ray-jobs",
        default=K8S_RAY_JOBS,
        help=f"Ray Jobs API of the head as the steps see it (default: {K8S_RAY_JOBS})",
    )
    s.add_argument("--store-pvc", default="tli-store", help="PVC holding the store")
    s.add_argument("--image", help="the project image every step runs in")
    s.set_defaults(func=_submit)


def add_driver_flag(p: argparse.ArgumentParser) -> None:
    """``--driver STAGE.FIELD=VALUE``: a stage's Ray job driver resources (runtime.drivers)."""
    p.add_argument(
        "--driver",
        action="append",
        default=[],
        metavar="STAGE.FIELD=VALUE",
        help="where a stage's Ray job driver runs: cpus, gpus, memory (e.g. 16GB) or resources "
        "({name: amount}) of a stage, e.g. eval.gpus=1, inject.cpus=4, import-base.memory=8GB "
        "(repeatable; default: 1 CPU, eval also a GPU on cuda, train/tune 0.1 CPU)",
    )


def add_submit_flags(s: argparse.ArgumentParser) -> None:
    """Where a submitted run goes and how ``kfp.Client`` authenticates."""
    s.add_argument("--namespace", help="Kubernetes namespace of the run (multi-user Kubeflow: "
                   "your profile's); default: the KFP client's")  # fmt: skip
    s.add_argument("--experiment", help="KFP experiment name (created if missing)")
    s.add_argument("--run-name", help="the run's name (default: tli-<date>-<time>)")
    auth = s.add_mutually_exclusive_group()
    auth.add_argument("--token-file", metavar="FILE", help="a bearer token for the KFP API, "
                      "read from FILE (kfp.Client existing_token)")  # fmt: skip
    auth.add_argument("--cookies-file", metavar="FILE", help="session cookies for the KFP API "
                      "(e.g. authservice_session=...), read from FILE")  # fmt: skip
    auth.add_argument(
        "--sa-token",
        action="store_true",
        help="the in-cluster service account's token ($KF_PIPELINES_SA_TOKEN_PATH, else KFP's "
        "default path)",
    )
    s.add_argument("--wait", action="store_true",
                   help="follow the run to its end, printing its steps' states")  # fmt: skip


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags that choose a run's configuration (shared by run, submit and demo)."""
    add_config_args(p, preset="default")
    p.add_argument("--base", help="an HF model folder (or s3://bucket/prefix) to upscale "
                   "instead of the bundled SmolLM2")  # fmt: skip
    p.add_argument(
        "--rerun",
        action="append",
        default=[],
        metavar="STAGE",
        help="recompute this stage even if stored (repeatable or a,b)",
    )
    p.add_argument(
        "--export-to",
        default="",
        metavar="DEST",
        help="last step: export the trained model with its model card to DEST (a folder, "
        "s3://bucket/prefix, or hf://org/name when online); default: no export",
    )


# ---------------------------------------------------------------------------- config


def resolve_run(args: argparse.Namespace) -> Resolved:
    """The pipeline's config: preset, files, overrides, and ``--base`` as ``base.model``."""
    from tli.cli.flags import resolve_args

    if args.base:
        from tli import hub

        check_base(args.base)  # named as the user gave it
        named = "://" in args.base or hub.is_hub_name(args.base)  # s3://, a Hub repo
        base = args.base if named else str(Path(args.base).absolute())
        args.overrides = [*args.overrides, (("base", "model"), base, "--base")]
    return resolve_args(args)


def rerun_stages(values: list[str]) -> list[str]:
    """The ``--rerun`` names, checked against the pipeline's stages (not compare's own)."""
    from tli.pipeline.stages import STAGES

    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    for n in names:
        if n not in STAGES:
            raise TliError(f"--rerun {n}: not a stage of the pipeline: choose from "
                           f"{', '.join(STAGES)}")  # fmt: skip
    return names


def pipeline_arguments(
    cfg: RunConfig,
    store: str,
    ray_jobs: str | None,
    rerun: list[str],
    runtime: Runtime,
    export_to: str = "",
) -> dict[str, Any]:
    """The pipeline's parameters for a resolved run config."""
    stage_rt = runtime.model_dump(mode="json", include={*STAGE_RUNTIME, "drivers"})
    args: dict[str, Any] = {"store": store, "ray_jobs": ray_jobs, "rerun": rerun,
                            "runtime": json.dumps(stage_rt), "export_to": export_to}  # fmt: skip
    for section in ("base", "data", "inject", "tune", "train", "eval", "tracking"):
        args[f"{section}_config"] = json.dumps(getattr(cfg, section).model_dump(mode="json"))
    return args


def check_run_inputs(args: argparse.Namespace) -> tuple[RunConfig, list[str]]:
    """Every check that needs no Ray and writes nothing (bad input -> one line, exit 2)."""
    cfg = resolve_run(args).config
    rerun = rerun_stages(args.rerun)
    check_base(cfg.base.model)
    return cfg, rerun


def check_base(model: str | None) -> None:
    """A local base folder is opened and checked; an s3:// one must exist (not fetched here)."""
    from tli import hub, remote

    if not model or hub.is_hub_name(model):
        return  # the bundled base; a Hub name is resolved by the stage (online mode)
    if remote.is_remote(model):
        if not remote.exists(model):
            raise TliError(f"base.model {model}: no such object or prefix")
        return
    from tli.modelfolder import ModelFolder

    ModelFolder.open(model, decoder=False)


def drivers_of(items: list[str]) -> dict[str, Any]:
    """``--driver STAGE.FIELD=VALUE`` items as ``runtime.drivers`` (validated with the runtime)."""
    from tli.config import StageDrivers, parse_override
    from tli.pipeline.stages import get_stage

    out: dict[str, Any] = {}
    for item in items:
        try:
            path, value = parse_override(item)
        except TliError:
            path, value = (), None
        if len(path) != 2:
            raise TliError(f"--driver {item!r}: write STAGE.FIELD=VALUE, e.g. eval.gpus=1")
        stage = get_stage(path[0]).name.replace("-", "_")
        assert stage in StageDrivers.model_fields, stage
        out.setdefault(stage, {})[path[1]] = value
    return out


# ---------------------------------------------------------------------------- handlers


def _compile(args: argparse.Namespace) -> int:
    from pipelines.local import IMAGE, compile_pipeline

    out = Path(args.out)
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise TliError(f"cannot write {out}: {out.parent} is not a writable folder")
    try:
        compile_pipeline(out, image=args.image or IMAGE, offline=not args.online)
    except OSError as e:
        raise TliError(f"cannot write {out}: {e.strerror}: choose another --out") from None
    print(out)
    return 0


def _run(args: argparse.Namespace) -> int:
    from tli.cli.flags import runtime_of

    cfg, rerun = check_run_inputs(args)
    drivers = drivers_of(getattr(args, "driver", []))  # `tli demo` has no --driver
    export_to = getattr(args, "export_to", "")
    return run_checked(cfg, rerun, runtime_of(args, drivers=drivers), export_to)


def run_checked(cfg: RunConfig, rerun: list[str], runtime: Runtime, export_to: str = "") -> int:
    """Run the pipeline here on a checked config: the store, the Ray head, then the stages."""
    from tli.pipeline.store import Store

    store = Store(runtime.store)
    store.check_writable()
    if runtime.ray_jobs:
        from tli.pipeline.runner import job_client

        # unreachable -> one line, exit 2, before any work
        job_client(runtime.ray_jobs, runtime.connect_timeout_s)
    store.create()
    return run_pipeline(cfg, store.root, rerun, runtime, export_to)


def run_pipeline(
    cfg: RunConfig, store: Path, rerun: list[str], runtime: Runtime, export_to: str = ""
) -> int:
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
            arguments = pipeline_arguments(cfg, str(store), address, rerun, runtime, export_to)
            ref = run_local(arguments, pipeline_root=store / ".kfp", offline=runtime.offline)
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
    """Compile and submit the pipeline; print the run's URL; with ``--wait``, follow it."""
    from tli.cli.flags import runtime_of

    cfg, rerun = check_run_inputs(args)
    runtime = runtime_of(args, drivers=drivers_of(args.driver))
    from pipelines import local
    from pipelines.tli_pipeline import DEFAULT_STORE as K8S_STORE

    arguments = pipeline_arguments(cfg, args.store or K8S_STORE, args.ray_jobs, rerun, runtime,
                                   args.export_to)  # fmt: skip
    arguments["store_pvc"] = args.store_pvc
    name = args.run_name or f"tli-{time.strftime('%Y%m%d-%H%M%S')}"
    client = local.kfp_client(args.host, timeout_s=runtime.connect_timeout_s,
                              namespace=args.namespace, **_credentials(args))  # fmt: skip
    run_id, url = local.submit(client, arguments, image=args.image or local.IMAGE,
                               experiment=args.experiment, run_name=name,
                               namespace=args.namespace, offline=runtime.offline)  # fmt: skip
    print(f"submitted run {name} ({run_id})")
    print(f"run: {url}")
    if not args.wait:
        return 0
    state = local.follow_run(client, run_id)
    print(f"run {name}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def _credentials(args: argparse.Namespace) -> dict[str, Any]:
    """The KFP client's credentials from the flags (files are read; their text is never shown)."""
    out: dict[str, Any] = {"sa_token": args.sa_token}
    for flag, key in (("token_file", "token"), ("cookies_file", "cookies")):
        path = getattr(args, flag)
        if path:
            try:
                out[key] = Path(path).read_text().strip()
            except OSError as e:
                opt = "--" + flag.replace("_", "-")
                raise TliError(f"{opt} {path}: cannot read it ({e.strerror})") from None
            if not out[key]:
                raise TliError(f"--{flag.replace('_', '-')} {path} is empty")
    return out
