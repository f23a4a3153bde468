"""The Ray environment: auth, ports, temp dirs, sessions, worker settings and resource checks.

Everything tli needs to know about running under Ray lives here, so train, tune and the
pipeline's local head make the same choices:

- **Auth.** Ray 2.60 heads use token auth; a client, a head and the GCS must agree on the mode,
  which Ray reads once per process, so :func:`ensure_auth` fixes it (and creates the token a
  fresh machine lacks: ``ray start`` never creates one) before anything imports ray.
- **Temp dirs and ports.** Unix socket paths must stay under 107 bytes, and another Ray may
  own /tmp/ray and the default ports: every Ray tli starts gets a short temp dir of its own and
  free ports picked together (:func:`free_ports`).
- **Sessions.** :func:`session` joins the Ray of this process, a given address or
  ``RAY_ADDRESS``, or starts a private local one (with its dashboard: Ray Train's
  placement-group cleaner needs the State API, or a trial that ASHA stops leaks its placement
  group and the next one waits forever).
- **Workers.** Train workers run at niceness 0 (:data:`WORKER_RUNTIME_ENV`), and their CPUs are
  planned once (:func:`plan_workers`), for training and for each trial of a search.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tli import drills
from tli.errors import TliError

# Ray Train V2 polls its workers at this interval and each ray.train.report() waits for a poll
# (default 2 s: 20 steps took 40 s); must be in the environment before the controller starts.
HEALTH_CHECK_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
# Environment of every stage job (and of the local heads): offline hubs, fast Train reports.
JOB_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    **HEALTH_CHECK_ENV,
    # A stage that calls ray.init(runtime_env=...) itself merges it with the job's.
    "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
}
# Ray starts task and actor processes at niceness 15 so that its own services stay responsive;
# a training worker is the job itself, and at 15 it yields the CPU to anything else on the node
# (SmolLM2 on 2 CPUs: 0.87x a plain loop at 15). Train workers run at 0, as torchrun's would.
WORKER_NICENESS = {"RAY_worker_niceness": "0"}
DRIVER_CPUS = 0.1  # what a Tune trial's driver function reserves: it only waits on its trainer


def worker_runtime_env() -> dict[str, Any]:
    """The runtime env of Train workers: niceness 0, and the fault drill when one is set."""
    return {"env_vars": {**WORKER_NICENESS, **drills.env()}}


# ---------------------------------------------------------------------------- auth


def token_path() -> Path:
    """Where Ray looks for its auth token (``RAY_AUTH_TOKEN_PATH``, else ~/.ray/auth_token)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def ensure_auth() -> None:
    """Token auth for every Ray client and head of this process, with a token to use.

    Ray reads the mode once per process, so this runs before ray is imported. ``ray.init()``
    creates a missing token but ``ray start`` does not: on a fresh machine the local head would
    refuse to start. A token given by ``RAY_AUTH_TOKEN`` (e.g. from a Kubernetes secret) is used
    as it is.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = token_path()
    if path.is_file() and path.stat().st_size > 0:
        return
    with contextlib.suppress(OSError):  # a read-only home: Ray then names what is missing
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # Ray's own generator: 256 bits as hex
        os.replace(tmp, path)


# ---------------------------------------------------------------------------- ports, dirs


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on the loopback interface.

    All are bound at once before any is released: picking them one by one (bind, close, bind)
    can return the same port twice (Ray then refuses to start: "the same port is used by
    multiple components").
    """
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """One free TCP port on the loopback interface."""
    return free_ports(1)[0]


def temp_dir(tag: str) -> str:
    """A short private Ray temp dir for this process (never the shared default /tmp/ray)."""
    base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    return os.path.join(base, f"tli_{tag}_{os.getpid()}")


def remove_temp_dir(path: str) -> None:
    """Remove a Ray temp dir; Ray's last processes may still be writing logs there."""
    for _ in range(3):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            return
        time.sleep(1)


# ---------------------------------------------------------------------------- sessions


def is_initialized() -> bool:
    """Whether this process is connected to Ray (without importing ray)."""
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized()


def will_start_local(address: str | None) -> bool:
    """Whether :func:`session` would start a private local Ray (no Ray, no address given)."""
    return not is_initialized() and not (address or os.environ.get("RAY_ADDRESS"))


@contextlib.contextmanager
def session(address: str | None, *, num_cpus: int | None = None) -> Iterator[bool]:
    """Join Ray: the one in this process, ``address`` / ``RAY_ADDRESS``, or a new local one.

    Yields True when it started a local Ray (shut down, and its temp dir removed, on exit).
    The local one gets its dashboard (the State API) on a free port; its address goes to every
    worker in ``RAY_API_SERVER_ADDRESS``, since the placement-group cleaner finds it by
    auto-detection, which fails when several Rays run on one machine.
    """
    ensure_auth()
    for k, v in HEALTH_CHECK_ENV.items():
        os.environ.setdefault(k, v)
    # Ray Train's print patch sends each worker print() to its log as well: lines show twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray

    if ray.is_initialized():
        yield False
        return
    env = dict(HEALTH_CHECK_ENV)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        try:
            yield False
        finally:
            ray.shutdown()
        return
    tmp = temp_dir("ray")
    port = free_port()
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=port, _temp_dir=tmp,
             runtime_env={"env_vars": env}, log_to_driver=True)  # fmt: skip
    try:
        yield True
    finally:
        ray.shutdown()
        remove_temp_dir(tmp)


# ---------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class WorkerPlan:
    """How many CPUs each Train worker reserves, and its torch threads."""

    cpus_per_worker: float
    threads: int


def check_local_capacity(workers: int, concurrency: int, gpu: bool) -> None:
    """Refuse, before Ray starts, what this machine alone can never run (a local Ray)."""
    ncpu = os.cpu_count() or 1
    slots = workers * concurrency
    if concurrency == 1 and workers > ncpu:
        raise TliError(
            f"--workers {workers} is more than this machine's {ncpu} CPUs: use --workers "
            f"{ncpu} or less, or join a cluster with --ray-address"
        )
    if slots > ncpu:
        raise TliError(
            f"{concurrency} concurrent trials x {workers} workers need {slots} CPUs, this "
            f"machine has {ncpu}: lower --concurrency or --workers, or join a cluster with "
            "--ray-address"
        )
    if gpu:
        import torch

        if torch.cuda.device_count() < slots:
            raise TliError(
                f"--gpu with {slots} workers at once needs {slots} GPUs, this machine has "
                f"{torch.cuda.device_count()}: lower --workers or --concurrency"
            )


def plan_workers(
    total_cpus: float,
    workers: int,
    *,
    concurrency: int = 1,
    driver_cpus: float = 0.0,
    share_all: bool,
    cpus_per_worker: float | None = None,
    threads: int | None = None,
) -> WorkerPlan:
    """CPUs per Train worker: the given value, an even share of ``total_cpus``, or 1.

    Args:
        total_cpus: the CPUs of the Ray this runs on.
        workers: Train workers per run (per trial).
        concurrency: runs at once (Tune trials).
        driver_cpus: what each run's driver reserves besides its workers (a Tune trial's).
        share_all: True when the whole Ray is ours (a local Ray, or a job's cluster): workers
            share it evenly; False on a shared cluster: one CPU each unless told otherwise.
        cpus_per_worker: the user's choice, if any.
        threads: torch threads per worker; default: its CPUs, rounded.

    Raises:
        TliError: the plan does not fit ``total_cpus``.
    """
    if cpus_per_worker is not None and cpus_per_worker <= 0:
        raise TliError(f"--cpus-per-worker must be positive, got {cpus_per_worker}")
    if threads is not None and threads < 1:
        raise TliError(f"--threads must be at least 1, got {threads}")
    slots = workers * concurrency
    if cpus_per_worker is not None:
        cpw = cpus_per_worker
    elif share_all:
        cpw = math.floor(100 * (total_cpus - driver_cpus * concurrency) / slots) / 100
    else:
        cpw = 1.0
    need = concurrency * driver_cpus + slots * cpw
    if cpw <= 0 or need > total_cpus + 1e-9:
        raise TliError(
            f"{concurrency} x {workers} workers x {cpw:g} CPUs need {need:g} CPUs, the Ray "
            f"cluster has {total_cpus:g}: lower --workers, --concurrency or --cpus-per-worker"
        )
    return WorkerPlan(cpw, threads or max(1, round(cpw)))
