"""`tli pipeline compile|run|submit`: the KFP pipeline, compiled, run locally, or submitted.

``run`` uses KFP's local runner on this machine with a real local Ray head that it starts and
stops (or the head at ``--ray-address``); ``submit`` sends the same pipeline and parameters to a
Kubeflow Pipelines API. kfp is imported only inside the handlers, through ``pipelines/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tli.config import RunConfig, read_yaml, validate
from tli.errors import TliError

PRESETS = ("default", "smoke")
DEFAULT_STORE = RunConfig().pipeline.store


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
    r.add_argument(
        "--ray-address",
        help="job API of a running Ray head (e.g. http://127.0.0.1:8265); "
        "default: start a local head for this run and stop it at the end",
    )
    r.set_defaults(func=_run)

    s = ps.add_parser("submit", help="send the pipeline to a Kubeflow Pipelines API")
    s.add_argument("--host", required=True, help="the KFP API, e.g. http://localhost:8888")
    add_run_flags(s, store_default=None)
    s.add_argument(
        "--ray-address",
        default="http://tli-raycluster-head-svc:8265",
        help="job API of the Ray head as the steps see it "
        "(default: http://tli-raycluster-head-svc:8265)",
    )
    s.add_argument("--store-pvc", default="tli-store", help="PVC holding the store")
    s.add_argument("--image", help="the project image every step runs in")
    s.add_argument("--experiment", help="KFP experiment name")
    s.set_defaults(func=_submit)


def add_run_flags(p: argparse.ArgumentParser, store_default: str | None = DEFAULT_STORE) -> None:
    """The flags that choose a run's configuration (shared by run, submit and demo)."""
    p.add_argument("--config", help="run config YAML laid over the preset")
    p.add_argument(
        "--preset",
        default="default",
        help=f"embedded configuration: {' | '.join(PRESETS)} (default: default)",
    )
    p.add_argument("--base", help="an HF model folder to upscale instead of the bundled SmolLM2")
    p.add_argument(
        "--store",
        default=store_default,
        help=f"stage store folder (default: {store_default or 'the mounted volume'})",
    )
    p.add_argument(
        "--rerun",
        action="append",
        default=[],
        metavar="STAGE",
        help="recompute this stage even if stored (repeatable or a,b)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set eval.limit=20 (repeatable)",
    )


# ---------------------------------------------------------------------------- config


def preset_data(name: str) -> dict[str, Any]:
    """The YAML of an embedded preset as a dict (not yet validated)."""
    if name not in PRESETS:
        raise TliError(f"unknown preset {name!r}: choose from {', '.join(PRESETS)}")
    text = resources.files("tli.presets").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def resolve_config(preset: str, config: str | None, base: str | None, sets: list[str]) -> RunConfig:
    """Preset, then ``--config`` (by section), then ``--base`` and ``--set``; validated once."""
    data = preset_data(preset)
    origin = f"preset {preset}"
    if config:
        for section, fields in read_yaml(config).items():
            if isinstance(fields, dict) and isinstance(data.get(section), dict):
                data[section] = {**data[section], **fields}
            else:
                data[section] = fields
        origin += f" + {config}"
    if base:
        data["base"] = {**(data.get("base") or {}), "model": str(Path(base).absolute())}
    for item in sets:
        key, eq, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not eq or not dot or not section or not field:
            raise TliError(f"--set {item!r}: write SECTION.FIELD=VALUE, e.g. eval.limit=20")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise TliError(f"--set {item!r}: the value is not valid YAML") from None
        data[section] = {**(data.get(section) or {}), field: parsed}
    if sets:
        origin += " + --set"
    return validate(RunConfig, data, origin)  # type: ignore[return-value]


def rerun_stages(values: list[str]) -> list[str]:
    """The ``--rerun`` names, checked against the stage table."""
    from tli.pipeline.stages import get_stage

    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    for n in names:
        get_stage(n)
    return names


def pipeline_arguments(
    cfg: RunConfig, store: str, ray_address: str | None, rerun: list[str]
) -> dict[str, Any]:
    """The pipeline's parameters for a resolved run config."""
    args: dict[str, Any] = {"store": store, "ray_address": ray_address, "rerun": rerun}
    for section in ("base", "data", "inject", "tune", "train", "eval"):
        args[f"{section}_config"] = json.dumps(getattr(cfg, section).model_dump(mode="json"))
    return args


def check_run_inputs(args: argparse.Namespace) -> tuple[RunConfig, list[str]]:
    """Every check that needs no Ray and writes nothing (bad input -> one line, exit 2)."""
    from tli.pipeline.stages import check_model_folder

    if args.base:
        check_model_folder(Path(args.base))  # named as the user gave it
    cfg = resolve_config(args.preset, args.config, args.base, args.set)
    rerun = rerun_stages(args.rerun)
    if cfg.base.model:
        check_model_folder(Path(cfg.base.model))
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
    cfg, rerun = check_run_inputs(args)
    from tli.pipeline.store import Store

    store = Store(args.store or cfg.pipeline.store)
    store.check_writable()
    from tli.pipeline.runner import job_client

    if args.ray_address:
        job_client(args.ray_address)  # unreachable -> one line, exit 2, before any work
    store.create()
    return run_pipeline(cfg, store.root, rerun, args.ray_address)


def run_pipeline(cfg: RunConfig, store: Path, rerun: list[str], ray_address: str | None) -> int:
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
    head = contextlib.nullcontext(ray_address) if ray_address else local_head()
    from pipelines.local import run_local

    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        with head as address:
            ref = run_local(
                pipeline_arguments(cfg, str(store), address, rerun), pipeline_root=store / ".kfp"
            )
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
    cfg, rerun = check_run_inputs(args)
    from pipelines.local import IMAGE, submit
    from pipelines.tli_pipeline import DEFAULT_STORE as K8S_STORE

    arguments = pipeline_arguments(cfg, args.store or K8S_STORE, args.ray_address, rerun)
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
