"""Run one stage through the store: here, or as a Ray job on the head at ``ray_jobs``.

The KFP components call :func:`run_component`; it works out the stage's version from its
resolved config and its inputs' content hashes (``s3://`` inputs by their content too,
:mod:`tli.sources`) and, unless the store already holds that version, submits the stage as a
Ray job (``python -m tli.pipeline.runner STAGE``) to the cluster's head with
:class:`ray.job_submission.JobSubmissionClient`: one job per version, its driver placed on a node
with the stage's resources (:mod:`tli.pipeline.jobs`). The job runs the same :func:`run_stage` on
the cluster (so a KFP pod stays light, and the same path serves KubeRay), writes the version into
the store (a shared volume on Kubernetes, a folder locally; its manifest records the Ray node
the driver ran on as ``ray_node_id``) and prints its result as one ``TLI_RESULT {...}`` line
that the component reads back from the job's logs. In a Kubernetes pod a step without a job API
fails with one line rather than run a stage in the step's own small pod.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tli import drills, hub, rayenv, sources, tracking
from tli.config import RunConfig, Runtime, validate
from tli.errors import TliError
from tli.pipeline import jobs
from tli.pipeline.jobs import dashboard_url, job_client
from tli.pipeline.stages import STAGES, Stage, get_stage, model_dir
from tli.pipeline.store import InputRef, StageResult, Store, version_key
from tli.rayenv import JOB_ENV, job_env

RESULT_TAG = "TLI_RESULT "
SPEC_ENV = "TLI_STAGE_SPEC"


def _log(msg: str) -> None:
    print(f"tli: {msg}", flush=True)


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
    # so a changed base folder (or bundled package) gives a new version. An s3:// one is
    # identified by its content too (from its upload marker when it has one: no download here).
    for name, path in spec.external_inputs(cfg).items():
        if sources.is_uri(path):
            inputs.append(InputRef(name=name, path=str(path), sha256=sources.identify(str(path))))
        else:
            inputs.append(store.external_ref(name, path))
    return inputs


def _input_dirs(inputs: list[InputRef]) -> dict[str, Path]:
    """Input folders as the stages take them (a model input is the model folder inside).

    An ``s3://`` input stays a URI here: the stage fetches it when it runs, on its node.
    """
    return {
        i.name: i.path if sources.is_uri(i.path)  # type: ignore[misc]
        else model_dir(Path(i.path)) if i.name == "model" else Path(i.path)
        for i in inputs
    }  # fmt: skip


def prepare(
    stage: str, store: str | Path, sections: dict[str, Any], refs: dict[str, dict[str, Any]]
) -> tuple[Store, RunConfig, list[InputRef], dict[str, Any], str]:
    """Validate a stage call and work out its params and version key (no stage work yet)."""
    spec = get_stage(stage)
    st = Store(store)
    cfg: RunConfig = validate(RunConfig, dict(sections), f"stage {stage}")  # type: ignore[assignment]
    inputs = _inputs(spec, cfg, refs, st)
    # s3:// values (data.extra) enter the version by content, not by URI.
    params, _ = sources.by_content(spec.params(cfg, _input_dirs(inputs)))
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
    runtime = runtime or Runtime()
    # Hub names: online mode only; s3:// inputs: fetched into the store's cache.
    with hub.mode(offline=runtime.offline, store=store), sources.store_cache(store):
        sections = hub.pin(sections)  # a Hub name's commit, so that it enters the version
        return _run_stage(stage, store, sections, refs, rerun, ray_jobs, runtime)


def _run_stage(stage: str, store: str | Path, sections: dict[str, Any],
               refs: dict[str, dict[str, Any]], rerun: bool, ray_jobs: str | None,
               runtime: Runtime) -> StageResult:  # fmt: skip
    st, cfg, inputs, params, key = prepare(stage, store, sections, refs)
    spec = get_stage(stage)
    if not rerun and (hit := st._cached(stage, key, _log)):
        return hit
    if ray_jobs:
        return _run_as_job(stage, st, key, sections, refs, rerun, ray_jobs, runtime)
    dirs = _input_dirs(inputs)
    job = spec.prepare(cfg, dirs, runtime)  # every check, before anything is written
    seed = None
    if spec.seed_of:
        seed = getattr(getattr(cfg, spec.seed_of[0]), spec.seed_of[1])
    _log(f"{stage}: running version {key}")
    with tracking.tracking_stage(tracking.for_stage(cfg.tracking, stage, key, inputs, st.root)):
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
            extra=lambda: _manifest_extra(cfg, spec, inputs),
            log=_log,
        )


def _manifest_extra(cfg: RunConfig, spec: Stage, inputs: list[InputRef]) -> dict[str, Any]:
    """What a manifest records besides the store's own entries: where it ran, what it read."""
    _, uris = sources.by_content(spec.params(cfg, _input_dirs(inputs)))  # identified: cached
    remote_inputs = {i.path: i.sha256 for i in inputs if sources.is_uri(i.path)}
    # The Ray node of this stage job's driver (None when the stage ran outside a Ray job).
    return {"ray_node_id": rayenv.driver_node_id(), "sources": {**uris, **remote_inputs}}


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
    pipeline_run: dict[str, str] | None = None,
    artifacts: dict[str, Any] | None = None,
) -> dict[str, Any]:
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
        pipeline_run: ``{"name": ..., "id": ...}`` of the KFP run: tags of the tracking runs.
        artifacts: the component's KFP output artifacts by role, filled from the stored
            version (:func:`tli.pipeline.artifacts.publish`).

    Returns:
        The main output artifact's metadata (stage, version, status, what the version holds).
    """
    from tli.pipeline import artifacts as typed

    refs = {name: json.loads(Path(p).read_text()) for name, p in inputs.items()}
    sections = {k: json.loads(v) if isinstance(v, str) else v for k, v in sections.items()}
    if pipeline_run and "tracking" in sections:
        sections["tracking"] = tracking.with_pipeline_run(sections["tracking"], **pipeline_run)
    for name in rerun:
        get_stage(name)
    if not ray_jobs and jobs.kubernetes_pod():
        raise TliError(
            f"stage {stage}: no Ray job API (the pipeline parameter ray_jobs is empty) in a "
            "Kubernetes pod: set ray_jobs to the Ray head's job API, e.g. "
            f"{jobs.CLUSTER_JOBS_API}, rather than run the stage in this step's pod"
        )
    result = run_stage(
        stage,
        store=store,
        sections=sections,
        refs=refs,
        rerun=stage in rerun,
        ray_jobs=ray_jobs or None,
        runtime=validate(
            Runtime,
            json.loads(runtime) if isinstance(runtime, str) else runtime,
            "the pipeline's runtime parameter",
        ),  # fmt: skip
    )
    ref = result.to_dict()
    if stage == "report":  # the report's reference carries the whole run's lineage
        ref["inputs"] = refs
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(ref, indent=2) + "\n")
    return typed.publish(stage, result.to_dict(), artifacts or {})


# ---------------------------------------------------------------------------- Ray jobs


def _run_as_job(
    stage: str,
    st: Store,
    key: str,
    sections: dict[str, Any],
    refs: dict[str, dict[str, Any]],
    rerun: bool,
    ray_jobs: str,
    runtime: Runtime,
) -> StageResult:
    """Run the stage version ``key`` as a Ray job (at most one per version) and read its result."""
    client = job_client(ray_jobs, runtime.connect_timeout_s)
    spec = {
        "stage": stage,
        "store": str(st.root),
        "sections": sections,
        "refs": refs,
        "rerun": rerun,
        "runtime": runtime.model_dump(mode="json"),
    }
    resources = jobs.driver_resources(stage, runtime)
    env = {
        **job_env(runtime.offline),
        **drills.env(),  # a fault drill reaches the job's driver and its workers
        SPEC_ENV: json.dumps(spec),  # the job's whole input, so its command line stays short
        # Ray Train's placement-group cleaner finds the State API by auto-detection, which
        # fails when several Rays share a machine: name it (the driver also reads its own
        # job record there: the node it runs on).
        rayenv.JOBS_API_ENV: dashboard_url(ray_jobs),
        rayenv.DRIVER_CPUS_ENV: str(resources["entrypoint_num_cpus"] or 0),
    }
    sid, logs = jobs.submit_or_follow(
        client, stage=stage, prefix=jobs.submission_prefix(stage, key, st.root), rerun=rerun,
        entrypoint=f"python -m tli.pipeline.runner {stage}", env=env, resources=resources,
        runtime=runtime, url=dashboard_url(ray_jobs), log=_log,
    )  # fmt: skip
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_TAG):
            d = json.loads(line[len(RESULT_TAG) :])
            return StageResult(d["stage"], d["version"], Path(d["path"]), d["sha256"], d["status"])
    raise RuntimeError(f"stage {stage}: Ray job {sid} printed no {RESULT_TAG.strip()} line")


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
