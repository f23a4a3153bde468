"""Run one stage through the store: here, or as a Ray job on the head at ``ray_address``.

The KFP components call :func:`run_component`; it works out the stage's version from its
resolved config and its inputs' content hashes and, unless the store already holds that version,
submits the stage as a Ray job (``python -m tli.pipeline.runner STAGE``) to the cluster's head with
:class:`ray.job_submission.JobSubmissionClient`. The job runs the same :func:`run_stage` on the
cluster (so a KFP pod stays light, and the same path serves KubeRay), writes the version into the
store (a shared volume on Kubernetes, a folder locally) and prints its result as one
``TLI_RESULT {...}`` line that the component reads back from the job's logs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tli.config import RunConfig, Runtime, validate
from tli.errors import TliError
from tli.pipeline.stages import STAGES, Stage, get_stage, model_dir
from tli.pipeline.store import InputRef, StageResult, Store, version_key
from tli.rayenv import JOB_ENV, ensure_auth

RESULT_TAG = "TLI_RESULT "
SPEC_ENV = "TLI_STAGE_SPEC"


def _log(msg: str) -> None:
    print(f"tli: {msg}", flush=True)


def dashboard_url(address: str) -> str:
    """The Jobs API URL of a Ray head: ``host:port`` becomes ``http://host:port``."""
    return address if "://" in address else f"http://{address}"


def job_client(address: str):
    """A :class:`JobSubmissionClient` for the head at ``address``, or a one-line error."""
    ensure_auth()  # Ray 2.60 heads use token auth; the client reads the token from ~/.ray
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(address)
    try:
        return JobSubmissionClient(url)
    except Exception as e:  # ConnectionError, auth errors, bad URLs: all mean "cannot use it"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TliError(
            f"cannot reach the Ray head's job API at {url} ({first[:160]}): give the head's "
            "dashboard address (e.g. http://127.0.0.1:8265) or leave --ray-jobs out"
        ) from None


# ---------------------------------------------------------------------------- one stage


def _inputs(spec: Stage, cfg: RunConfig, refs: dict[str, dict[str, Any]], store: Store):
    missing = [n for n in spec.inputs if n not in refs]
    if missing:
        raise TliError(f"stage {spec.name} needs inputs {', '.join(missing)}")
    inputs = [
        InputRef(
            name=n,
            path=refs[n]["output"],
            sha256=refs[n]["sha256"],
            stage=refs[n]["stage"],
            version=refs[n]["version"],
        )
        for n in spec.inputs
    ]
    # Inputs from outside the store (the base model): their content hash enters the version,
    # so a changed base folder (or bundled package) gives a new version.
    for name, path in spec.external_inputs(cfg).items():
        inputs.append(store.external_ref(name, path))
    return inputs


def _input_dirs(inputs: list[InputRef]) -> dict[str, Path]:
    """Input folders as the stages take them (a model input is the model folder inside)."""
    return {i.name: model_dir(Path(i.path)) if i.name == "model" else Path(i.path) for i in inputs}


def prepare(
    stage: str, store: str | Path, sections: dict[str, Any], refs: dict[str, dict[str, Any]]
) -> tuple[Store, RunConfig, list[InputRef], dict[str, Any], str]:
    """Validate a stage call and work out its params and version key (no stage work yet)."""
    spec = get_stage(stage)
    st = Store(store)
    cfg: RunConfig = validate(RunConfig, dict(sections), f"stage {stage}")  # type: ignore[assignment]
    inputs = _inputs(spec, cfg, refs, st)
    params = spec.params(cfg, _input_dirs(inputs))
    key = version_key(stage, params, {i.name: i.sha256 for i in inputs}, spec.code())
    return st, cfg, inputs, params, key


def run_stage(
    stage: str,
    *,
    store: str | Path,
    sections: dict[str, Any],
    refs: dict[str, dict[str, Any]],
    rerun: bool = False,
    ray_jobs: str | None = None,
    runtime: Runtime | None = None,
) -> StageResult:
    """Run ``stage`` through the store; as a Ray job on the head at ``ray_jobs`` when given.

    Args:
        stage: a name from :data:`tli.pipeline.stages.STAGES`.
        store: the stage store folder (the same path on every machine of the cluster).
        sections: the run config sections the stage reads (others take their defaults).
        refs: its inputs: ``{name: StageResult.to_dict() of the stage that made it}``.
        rerun: recompute even when the store holds this version.
        ray_jobs: the Ray head's Jobs API; None = run in this process.
        runtime: how to run it (threads, shard size, ...); None = the defaults.

    Returns:
        The :class:`StageResult` (``status`` cached, ran or reproduced).
    """
    st, cfg, inputs, params, key = prepare(stage, store, sections, refs)
    spec = get_stage(stage)
    runtime = runtime or Runtime()
    if not rerun and (hit := st._cached(stage, key, _log)):
        return hit
    if ray_jobs:
        return _run_as_job(stage, st, sections, refs, rerun, ray_jobs, runtime)
    dirs = _input_dirs(inputs)
    job = spec.prepare(cfg, dirs, runtime)  # every check, before anything is written
    seed = None
    if spec.seed_of:
        seed = getattr(getattr(cfg, spec.seed_of[0]), spec.seed_of[1])
    _log(f"{stage}: running version {key}")
    return st.run(
        stage,
        params,
        inputs,
        lambda out: spec.execute(job, out),
        code=spec.code(),
        seed=seed,
        rerun=rerun,
        volatile=spec.volatile,
        resumable=spec.resume_state(),
        log=_log,
    )


def run_component(
    stage: str,
    *,
    store: str,
    ray_jobs: str | None,
    sections: dict[str, Any],
    inputs: dict[str, str],
    rerun: list[str],
    output: str,
    runtime: str | dict[str, Any] = "{}",
) -> dict[str, str]:
    """What a KFP component does: run ``stage``, write its reference for the next stages.

    Args:
        stage: the stage name.
        store: the stage store folder.
        ray_jobs: the Ray head's Jobs API, or None to run in the component's own process.
        sections: the config sections the stage reads (dicts, or their JSON text).
        inputs: ``{name: path of the upstream component's output artifact}``.
        rerun: stage names to recompute.
        output: path of this component's output artifact (a small JSON reference).
        runtime: the :class:`tli.config.Runtime` options (a dict or its JSON text).

    Returns:
        String metadata for the output artifact (stage, version, path, status).
    """
    refs = {name: json.loads(Path(p).read_text()) for name, p in inputs.items()}
    sections = {k: json.loads(v) if isinstance(v, str) else v for k, v in sections.items()}
    for name in rerun:
        get_stage(name)
    result = run_stage(
        stage,
        store=store,
        sections=sections,
        refs=refs,
        rerun=stage in rerun,
        ray_jobs=ray_jobs or None,
        runtime=validate(Runtime, json.loads(runtime) if isinstance(runtime, str) else runtime,
                         "the pipeline's runtime parameter"),  # fmt: skip
    )
    ref = result.to_dict()
    if stage == "report":  # the report's reference carries the whole run's lineage
        ref["inputs"] = refs
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(ref, indent=2) + "\n")
    return {k: str(v) for k, v in result.to_dict().items()}


# ---------------------------------------------------------------------------- Ray jobs


def _run_as_job(
    stage: str,
    st: Store,
    sections: dict[str, Any],
    refs: dict[str, dict[str, Any]],
    rerun: bool,
    ray_jobs: str,
    runtime: Runtime,
) -> StageResult:
    client = job_client(ray_jobs)
    spec = {
        "stage": stage,
        "store": str(st.root),
        "sections": sections,
        "refs": refs,
        "rerun": rerun,
        "runtime": runtime.model_dump(mode="json"),
    }
    env = {
        **JOB_ENV,
        SPEC_ENV: json.dumps(spec),  # the job's whole input, so its command line stays short
        # Ray Train's placement-group cleaner finds the State API by auto-detection, which
        # fails when several Rays share a machine: name it.
        "RAY_API_SERVER_ADDRESS": dashboard_url(ray_jobs),
    }
    job_id = client.submit_job(
        entrypoint=f"python -m tli.pipeline.runner {stage}",
        runtime_env={"env_vars": env},
        metadata={"tli_stage": stage},
    )
    _log(f"{stage}: submitted as Ray job {job_id} to {dashboard_url(ray_jobs)}")
    logs = _follow(client, job_id)
    status = client.get_job_status(job_id)
    if str(status) != "SUCCEEDED" and getattr(status, "value", "") != "SUCCEEDED":
        info = client.get_job_info(job_id)
        tail = [x for x in logs.splitlines() if x.strip()][-1:] or [info.message or ""]
        raise RuntimeError(f"stage {stage}: Ray job {job_id} {status}: {tail[0][:300]}")
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_TAG):
            d = json.loads(line[len(RESULT_TAG) :])
            return StageResult(d["stage"], d["version"], Path(d["path"]), d["sha256"], d["status"])
    raise RuntimeError(f"stage {stage}: Ray job {job_id} printed no {RESULT_TAG.strip()} line")


def _follow(client: Any, job_id: str, poll_s: float = 1.0) -> str:
    """Echo a job's log as it grows; return the whole log once the job is over."""
    shown = 0
    while True:
        done = client.get_job_status(job_id).is_terminal()
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if done:
            return logs
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    """Entry point of a stage job on the Ray cluster: ``python -m tli.pipeline.runner STAGE``.

    The stage's inputs come as JSON in the job's environment (``TLI_STAGE_SPEC``).
    """
    argv = sys.argv[1:] if argv is None else argv
    raw = os.environ.get(SPEC_ENV)
    if len(argv) != 1 or not raw:
        sys.stderr.write(
            f"usage: {SPEC_ENV}='<JSON stage spec>' python -m tli.pipeline.runner STAGE\n"
        )
        return 2
    spec = json.loads(raw)
    if spec["stage"] != argv[0]:
        sys.stderr.write(f"tli runner: {SPEC_ENV} is for stage {spec['stage']}, not {argv[0]}\n")
        return 2
    for k, v in JOB_ENV.items():
        os.environ.setdefault(k, v)
    try:
        # Inside a Ray job RAY_ADDRESS names the cluster, so the stages that use Ray (tune,
        # train) join it rather than starting their own.
        result = run_stage(
            spec["stage"],
            store=spec["store"],
            sections=spec["sections"],
            refs=spec["refs"],
            rerun=spec["rerun"],
            runtime=Runtime.model_validate(spec.get("runtime") or {}),
        )
    except TliError as e:
        sys.stderr.write(f"tli {spec['stage']}: error: {e}\n")
        return e.exit_code
    print(RESULT_TAG + json.dumps(result.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["STAGES", "run_component", "run_stage", "prepare", "job_client", "main"]
