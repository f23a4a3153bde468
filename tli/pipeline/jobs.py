"""A stage as a Ray job: idempotent submission, placement of its driver, following it to the end.

- **One job per version.** A stage's submission id is ``tli-<stage>-<version>-<store>-<n>``
  (:func:`submission_prefix`; ``<store>`` tells two stores on one cluster apart). Before
  submitting, the runner looks for the latest job of that prefix: one still pending or running
  is *followed* (a KFP retry, or a rerun after the pipeline process was killed, never starts a
  second job for the same version); one that succeeded gives its result; after a failed or
  stopped one, job ``n + 1`` is submitted, and the stage resumes from what the failed one left
  (the store keeps a resumable stage's partial folder). Ray itself refuses a second submission
  with the same id, so two submitters racing for ``n + 1`` end up following one job.
- **Placement.** The driver reserves what :func:`driver_resources` gives for the stage
  (``runtime.drivers``, else :data:`tli.config.DRIVER_DEFAULTS`) as the job's entrypoint
  resources, so it runs on a node that has them: never on a head that offers none.
- **Following.** The job's log is echoed as it grows. While it is pending (waiting for a node
  that can hold its driver), a line every few seconds says what it waits for; past
  ``runtime.scale_timeout_s`` it is stopped with one clear error. A job API that stops
  answering is retried for ``runtime.connect_timeout_s``, then one line says the job may still
  run and a rerun follows it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from tli import rayenv
from tli.config import DRIVER_DEFAULTS, Runtime
from tli.errors import TliError

# The job API of the cluster in infra/ (RayCluster tli-raycluster: KubeRay names its head
# service <name>-head-svc; 8265 is the dashboard): the compiled pipeline's default ray_jobs.
CLUSTER_JOBS_API = "http://tli-raycluster-head-svc:8265"
_POLL_S = 1.0
_REPORT_EVERY_S = 10.0
_LIVE = ("PENDING", "RUNNING")


def dashboard_url(address: str) -> str:
    """The Jobs API URL of a Ray head: ``host:port`` becomes ``http://host:port``."""
    return address if "://" in address else f"http://{address}"


def job_client(address: str, timeout_s: float | None = None) -> Any:
    """A :class:`JobSubmissionClient` for the head at ``address``, or a one-line error.

    The address is probed first (``timeout_s``, default the runtime's ``connect_timeout_s``):
    the client's own first request has no timeout of its own.
    """
    rayenv.ensure_auth()  # Ray 2.60 heads use token auth; the client reads the token from ~/.ray
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(address)
    hint = "give the head's dashboard address (e.g. http://127.0.0.1:8265) or leave --ray-jobs out"
    timeout = rayenv.default_connect_timeout() if timeout_s is None else timeout_s
    rayenv.probe(url, timeout, "the Ray head's job API", hint)
    try:
        return JobSubmissionClient(url)
    except Exception as e:  # ConnectionError, auth errors, bad URLs: all mean "cannot use it"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = f"cannot reach the Ray head's job API at {url} ({first[:160]})"
        raise TliError(f"{why}: {hint}") from None


# ---------------------------------------------------------------------------- ids, resources


def submission_prefix(stage: str, version: str, store: Path) -> str:
    """``tli-<stage>-<version>-<store>-``: the ids of every job of one stage version."""
    tag = hashlib.sha256(str(Path(store).absolute()).encode()).hexdigest()[:8]
    return f"tli-{stage}-{version}-{tag}-"


def _number(sid: str, prefix: str) -> int | None:
    rest = sid[len(prefix) :] if sid.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else None


def latest_job(client: Any, prefix: str) -> tuple[int, Any | None]:
    """``(n, details)`` of the newest job whose id is ``prefix + n``; ``(0, None)`` if none."""
    best: tuple[int, Any | None] = (0, None)
    for job in client.list_jobs():
        n = _number(job.submission_id or "", prefix)
        if n is not None and n > best[0]:
            best = (n, job)
    return best


def _has_gpu_here() -> bool:
    """Whether this machine has an NVIDIA GPU (its driver lists one), without importing torch."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def driver_resources(stage: str, runtime: Runtime) -> dict[str, Any]:
    """The entrypoint resources of ``stage``'s job: ``runtime.drivers``, else the defaults.

    Eval's driver does the evaluation: one GPU when ``runtime.device`` is cuda (unset: when the
    submitting machine has one, as for ``tli pipeline run``'s local head), else none. The
    result's keys are :meth:`JobSubmissionClient.submit_job`'s.
    """
    given = getattr(runtime.drivers, stage.replace("-", "_"))
    default = DRIVER_DEFAULTS[stage]
    gpus = given.gpus
    if gpus is None:
        device = runtime.device
        on_gpu = device.startswith("cuda") if device else _has_gpu_here()
        gpus = 1.0 if stage == "eval" and on_gpu else default.get("gpus", 0.0)
    return {
        "entrypoint_num_cpus": given.cpus if given.cpus is not None else default.get("cpus", 1),
        "entrypoint_num_gpus": gpus,
        "entrypoint_memory": given.memory,
        "entrypoint_resources": dict(given.resources) or None,
    }


def shown(resources: dict[str, Any]) -> str:
    """``{CPU: 1, GPU: 1}``: entrypoint resources as a person reads them."""
    res = {"CPU": resources.get("entrypoint_num_cpus") or 0,
           "GPU": resources.get("entrypoint_num_gpus") or 0,
           "memory": resources.get("entrypoint_memory") or 0,
           **(resources.get("entrypoint_resources") or {})}  # fmt: skip
    return rayenv.shown_resources({k: float(v) for k, v in res.items() if v})


# ---------------------------------------------------------------------------- running


def submit_or_follow(
    client: Any,
    *,
    stage: str,
    prefix: str,
    rerun: bool,
    entrypoint: str,
    env: dict[str, str],
    resources: dict[str, Any],
    runtime: Runtime,
    url: str,
    log: Any,
) -> tuple[str, str]:
    """Run ``stage``'s job once per version; ``(submission id, its whole log)`` when it succeeded.

    Long because it is the one decision, read top to bottom: follow a live job of this version,
    reuse a succeeded one, or submit the next; a lost race for the id means following the
    winner's job.

    Args:
        client: the head's job client.
        stage: the stage name (messages).
        prefix: :func:`submission_prefix` of the stage version.
        rerun: recompute: a succeeded job of this version is not reused.
        entrypoint: the job's command.
        env: its environment (``runtime_env.env_vars``); the submission id is added.
        resources: :func:`driver_resources`.
        runtime: timeouts.
        url: the job API's address (messages).
        log: where the one-line status goes.

    Raises:
        TliError: the job could not be placed in time, or the job API stopped answering.
        RuntimeError: the job failed (its last log line says why).
    """
    n, job = latest_job(client, prefix)
    status = str(getattr(job, "status", "")).rpartition(".")[2] if job is not None else ""
    sid = f"{prefix}{n}"
    if job is not None and status in _LIVE:
        log(f"{stage}: following Ray job {sid} ({status.lower()}): another submission of this "
            "version is running")  # fmt: skip
    elif job is not None and status == "SUCCEEDED" and not rerun:
        log(f"{stage}: Ray job {sid} of this version already succeeded: reading its result")
        return sid, client.get_job_logs(sid)
    else:
        sid = f"{prefix}{n + 1}"
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=sid,
                              runtime_env={"env_vars": {**env, rayenv.SUBMISSION_ENV: sid}},
                              metadata={"tli_stage": stage}, **resources)  # fmt: skip
            after = f" after {status.lower()} job {prefix}{n}" if job is not None else ""
            log(f"{stage}: submitted as Ray job {sid}{after} to {url}, its driver "
                f"on a node with {shown(resources)}")  # fmt: skip
        except RuntimeError as e:
            if "already exists" not in str(e):
                raise
            log(f"{stage}: following Ray job {sid}: submitted by another process just now")
    logs = follow(client, sid, stage=stage, resources=resources, runtime=runtime)
    final = client.get_job_info(sid)
    if str(final.status).rpartition(".")[2] != "SUCCEEDED":
        tail = [x for x in logs.splitlines() if x.strip()][-1:] or [final.message or ""]
        raise RuntimeError(f"stage {stage}: Ray job {sid} {final.status}: {tail[0][:300]}")
    return sid, logs


def follow(client: Any, sid: str, *, stage: str, resources: dict[str, Any],
           runtime: Runtime) -> str:  # fmt: skip
    """Echo job ``sid``'s log as it grows; return the whole log once the job is over.

    A pending job (no node can hold its driver yet) gets a line every few seconds and is stopped
    after ``runtime.scale_timeout_s``; a job API that stops answering is retried for
    ``runtime.connect_timeout_s``.
    """
    # A job is pending for a few seconds anyway (its runtime env): say so only when it lasts.
    shown_len, t0, said, lost = 0, time.monotonic(), 0.0, None
    while True:
        try:
            status = str(client.get_job_status(sid)).rpartition(".")[2]
            logs = client.get_job_logs(sid)
            lost = None
        except Exception as e:  # the head restarting, a network blip
            lost = lost or time.monotonic()
            if time.monotonic() - lost > runtime.connect_timeout_s:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
                raise TliError(
                    f"stage {stage}: lost the job API while following Ray job {sid} ({first}): "
                    "the job may still run; run the pipeline again to follow it"
                ) from None
            time.sleep(_POLL_S)
            continue
        if len(logs) > shown_len:
            sys.stdout.write(logs[shown_len:])
            sys.stdout.flush()
            shown_len = len(logs)
        if status not in _LIVE:
            return logs
        if status == "PENDING":
            waited = time.monotonic() - t0
            if waited > runtime.scale_timeout_s:
                client.stop_job(sid)
                raise TliError(
                    f"stage {stage}: Ray job {sid} waited {waited:.0f} s for a node with "
                    f"{shown(resources)} for its driver, and none came: add such a node, change "
                    "runtime.drivers, or raise --scale-timeout-s"
                )
            if waited - said >= _REPORT_EVERY_S:
                said = waited
                print(f"tli: {stage}: Ray job {sid} pending: waiting for a node with "
                      f"{shown(resources)} ({waited:.0f} of {runtime.scale_timeout_s:g} s)",
                      flush=True)  # fmt: skip
        time.sleep(_POLL_S)


def kubernetes_pod() -> bool:
    """Whether this process runs in a Kubernetes pod (the service host is in its environment)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
