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
  planned once (:func:`plan_on_cluster`), for training and for each trial of a search.
- **Clusters that grow.** On a cluster that can still add nodes (KubeRay's autoscaler), nothing
  is refused for lack of resources *now*: the autoscaler is asked for the bundles and they are
  awaited (:func:`await_bundles`, a live line every few seconds), up to a timeout that ends in
  one clear error. A Ray that cannot grow (a private local one, or the local head of
  ``tli pipeline run``, which says so with the node label :data:`FIXED_LABEL`) is refused up
  front, and so is what no node type of a cluster could ever give, when the cluster says so.
- **First contact.** Every address is probed with a short timeout before ``ray.init`` (which
  would otherwise retry for minutes where nothing answers): one line says what did not answer.
- **Storage.** Ray Train / Tune keep their state in the output being written, or under
  ``runtime.storage`` (a shared folder or ``s3://``) at a sub-path that is a pure function of
  that output (:func:`ray_storage`), so a rerun resumes from the same place.
"""

from __future__ import annotations

import contextlib
import json
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
# The variables that keep huggingface_hub, datasets and transformers off the network.
HUB_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# Environment of every stage job (and of the local heads): offline hubs, fast Train reports.
JOB_ENV = {
    **dict.fromkeys(HUB_OFFLINE_VARS, "1"),
    "TOKENIZERS_PARALLELISM": "false",
    **HEALTH_CHECK_ENV,
    # A stage that calls ray.init(runtime_env=...) itself merges it with the job's.
    "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
}
# Ray starts task and actor processes at niceness 15 so that its own services stay responsive;
# a training worker is the job itself, and at 15 it yields the CPU to anything else on the node
# (SmolLM2 on 2 CPUs: 0.87x a plain loop at 15). Train workers run at 0, as torchrun's would.
WORKER_NICENESS = {"RAY_worker_niceness": "0"}
# glibc's malloc serves blocks under its mmap threshold from per-thread heaps, and raises that
# threshold (up to 32 MiB) each time a larger block is freed: a training step's MiB-sized
# tensors then come from heaps that keep them after free. An FSDP worker's resident memory grew
# from 1.2 to 2.0 GiB over three steps (docs/benchmarks.md). A fixed 1 MiB threshold maps every
# larger tensor on its own and returns it to the system on free; the cost, a few page faults
# per MiB tensor, is far below a step's compute.
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
DRIVER_CPUS = 0.1  # what a Tune trial's driver function reserves: it only waits on its trainer


def job_env(offline: bool = True) -> dict[str, str]:
    """:data:`JOB_ENV` for a stage job of ``runtime.offline``: online, the hub variables are "0"
    (an HF_TOKEN comes from the Ray pods' own environment, never from here)."""
    return {**JOB_ENV, **dict.fromkeys(HUB_OFFLINE_VARS, "1" if offline else "0")}


def worker_runtime_env() -> dict[str, Any]:
    """The runtime env of Train workers: niceness 0, glibc's fixed mmap threshold, and the fault
    drill when one is set."""
    return {"env_vars": {**WORKER_NICENESS, **WORKER_MALLOC, **drills.env()}}


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
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray" in sys.modules:
            # Ray caches its config (the auth mode with it) once imported: refresh it, or this
            # process's clients would talk to a token-auth head without a token.
            with contextlib.suppress(ImportError, AttributeError):
                from ray._private.authentication import authentication_token_setup as ats

                ats._enable_token_auth()
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


# ---------------------------------------------------------------------------- first contact


def default_connect_timeout() -> float:
    """The runtime's default first-contact timeout (:class:`tli.config.Runtime`)."""
    from tli.config import Runtime

    return float(Runtime.model_fields["connect_timeout_s"].default)


def host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port``, ``ray://host:port`` or ``http(s)://host:port/...``.

    None for ``auto`` / ``local`` (Ray finds those itself) and for an address without a port.
    """
    import urllib.parse

    if address in ("auto", "local"):
        return None
    parts = urllib.parse.urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parts.port
    except ValueError:
        raise TliError(f"{address!r} has a bad port: write host:port") from None
    if parts.scheme in ("http", "https") and port is None:
        port = 443 if parts.scheme == "https" else 80
    if not parts.hostname or port is None:
        return None
    return parts.hostname, port


def probe(address: str, timeout_s: float, what: str, hint: str) -> None:
    """Raise a one-line :class:`TliError` unless the service at ``address`` answers in time.

    A first contact that would otherwise hang or retry for minutes (``ray.init`` at an address
    where nothing answers retries its GCS connection for longer than 6 minutes here) fails
    within ``timeout_s`` instead. Answering means more than accepting a TCP connection (a hung
    process's socket still does that): an HTTP(S) address must send back an HTTP response, and
    a Ray address (GCS, or ``ray://`` client server) must complete gRPC's HTTP/2 handshake.

    Args:
        address: ``host:port``, ``ray://host:port`` or ``http(s)://host:port``.
        timeout_s: seconds to wait for the answer.
        what: what is contacted ("the Ray cluster"), for the message.
        hint: what to check, for the message.
    """
    hp = host_port(address)
    if hp is None:
        return
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
        left = max(0.1, deadline - time.monotonic())
        if address.startswith(("http://", "https://")):
            _http_answers(address, left)
        elif os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
            _grpc_answers(hp, left)  # (a TLS cluster's handshake needs its certificates)
        return
    except TimeoutError:
        why = f"no answer within {timeout_s:g} s"
    except OSError as e:
        why = e.strerror or type(e).__name__
    raise TliError(f"cannot reach {what} at {address} ({why}): {hint}")


def _http_answers(url: str, timeout_s: float) -> None:
    """Any HTTP response (an error status included) is an answer; silence is TimeoutError."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s):  # noqa: S310 (the user's own URL)
            pass
    except urllib.error.HTTPError:
        pass  # it answered (401, 404, ...): what follows says what is wrong
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError | socket.timeout):
            raise TimeoutError from None
        raise OSError(str(e.reason)) from None


def _grpc_answers(hp: tuple[str, int], timeout_s: float) -> None:
    """gRPC's channel becomes ready only once the server has done the HTTP/2 handshake."""
    import grpc

    channel = grpc.insecure_channel(f"{hp[0]}:{hp[1]}")
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise TimeoutError from None
    finally:
        channel.close()


def check_runtime(ray_address: str | None, storage: str | None, timeout_s: float) -> None:
    """Before anything is written: the Ray cluster answers, the storage can be reached.

    A bad ``--ray-address`` or ``--storage`` is one line and exit 2, not a partial output.
    """
    if ray_address:
        probe(ray_address, timeout_s, "the Ray cluster",
              "check --ray-address (the head's host:port, or ray://host:10001)")  # fmt: skip
    if storage:
        from tli import remote

        if remote.is_remote(storage):
            remote.exists(storage)  # one line on bad credentials or an unreachable endpoint
        elif not Path(storage).is_absolute():
            raise TliError(
                f"--storage {storage}: give an absolute path of a folder every node shares "
                "(or s3://bucket/prefix)"
            )


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
def session(
    address: str | None, *, num_cpus: int | None = None, timeout_s: float | None = None
) -> Iterator[bool]:
    """Join Ray: the one in this process, ``address`` / ``RAY_ADDRESS``, or a new local one.

    Yields True when it started a local Ray (shut down, and its temp dir removed, on exit).
    The local one gets its dashboard (the State API) on a free port; its address goes to every
    worker in ``RAY_API_SERVER_ADDRESS``, since the placement-group cleaner finds it by
    auto-detection, which fails when several Rays run on one machine. A given address is
    probed first (``timeout_s``, default the runtime's ``connect_timeout_s``).
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
        timeout = default_connect_timeout() if timeout_s is None else timeout_s
        hint = "check --ray-address (the head's host:port, e.g. 10.0.0.5:6379, or ray://host:10001)"
        probe(address, timeout, "the Ray cluster", hint)
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        except ConnectionError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise TliError(f"cannot join the Ray cluster at {address} ({first}): {hint}") from None
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


# ---------------------------------------------------------------------------- the job's driver

# Set in a stage job's environment by the pipeline runner (tli.pipeline.runner).
SUBMISSION_ENV = "TLI_SUBMISSION_ID"  # the job's own submission id
DRIVER_CPUS_ENV = "TLI_DRIVER_CPUS"  # CPUs its driver reserves (entrypoint_num_cpus)
JOBS_API_ENV = "RAY_API_SERVER_ADDRESS"  # the head's job API, as the job sees it


def job_driver_cpus() -> float:
    """CPUs this process's Ray job driver holds (0 outside a stage job)."""
    try:
        return max(0.0, float(os.environ.get(DRIVER_CPUS_ENV) or 0))
    except ValueError:
        return 0.0


def driver_node_id() -> str | None:
    """The Ray node this stage job's driver runs on; None outside a job.

    Read from the job's own record (``JobInfo.driver_node_id``, set where Ray placed the driver),
    not from ``ray.init()`` inside the job: on a machine whose raylets share one address (tests)
    that attaches to whichever raylet comes first.
    """
    sid, api = os.environ.get(SUBMISSION_ENV), os.environ.get(JOBS_API_ENV)
    if not sid or not api:
        return None
    try:
        from ray.job_submission import JobSubmissionClient

        probe(api, default_connect_timeout(), "the job API", "")
        return JobSubmissionClient(api).get_job_info(sid).driver_node_id or None
    except Exception:  # a record is a nicety: never fail a finished stage over it
        return None


# ---------------------------------------------------------------------------- resources

# A node label that says "this Ray never grows": the local head of `tli pipeline run` carries it.
FIXED_LABEL = "tli-fixed-size"
_REPORT_EVERY_S = 10.0  # how often the live line while waiting for the cluster repeats


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
    must_fit: bool = True,
) -> WorkerPlan:
    """CPUs per Train worker: the given value, an even share of ``total_cpus``, or 1.

    Args:
        total_cpus: the CPUs of the Ray this runs on (less what this job's driver holds).
        workers: Train workers per run (per trial).
        concurrency: runs at once (Tune trials).
        driver_cpus: what each run's driver reserves besides its workers (a Tune trial's).
        share_all: True when the whole Ray is ours (a local Ray, or a job's cluster): workers
            share it evenly; False on a shared cluster: one CPU each unless told otherwise.
        cpus_per_worker: the user's choice, if any.
        threads: torch threads per worker; default: its CPUs, rounded.
        must_fit: refuse a plan larger than ``total_cpus`` (False on a cluster that can grow:
            :func:`await_bundles` waits for it instead).

    Raises:
        TliError: the plan does not fit ``total_cpus`` (and must).
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
    if cpw <= 0 or (must_fit and need > total_cpus + 1e-9):
        raise TliError(
            f"{concurrency} x {workers} workers x {cpw:g} CPUs need {need:g} CPUs, the Ray "
            f"cluster has {total_cpus:g}: lower --workers, --concurrency or --cpus-per-worker"
        )
    return WorkerPlan(cpw, threads or max(1, round(cpw)))


def _cluster_config() -> Any:
    """The autoscaler's cluster config as the GCS holds it (KubeRay + autoscaler v2), or None.

    Its node groups say what each node type offers and how many of it may exist: the one
    source that can tell "not yet" from "never".
    """
    try:
        from ray._private.state import state

        return state.get_cluster_config()
    except Exception:  # no autoscaler v2, another Ray layout: the cluster says nothing
        return None


def cluster_can_grow(started: bool) -> bool:
    """Whether the Ray this process is connected to may still add nodes.

    Not when this process started it (a private local Ray, or a test's ``ray.init()``), nor when
    a node carries :data:`FIXED_LABEL` (the local head of ``tli pipeline run``), nor when the
    autoscaler's config says every node group is at a fixed size. Any other cluster may grow
    (KubeRay's autoscaler, or a person adding nodes; a cluster without an autoscaler cannot say).
    """
    import ray

    if started:
        return False
    try:
        node = ray._private.worker._global_node
    except AttributeError:  # another Ray layout
        node = None
    if node is not None and getattr(node, "head", False):
        return False  # this very process started this Ray
    for n in ray.nodes():
        if n.get("Alive") and (n.get("Labels") or {}).get(FIXED_LABEL) == "true":
            return False
    cfg = _cluster_config()
    if cfg is not None and cfg.node_group_configs:
        return any(g.max_count == -1 or g.max_count > g.min_count for g in cfg.node_group_configs)
    return True


def shown_resources(res: dict[str, float]) -> str:
    """``{CPU: 2, GPU: 1, memory: 16.0 GiB}``: the resources a person asks for (no node ids)."""
    hidden = ("node:", "object_store_memory")
    keys = [k for k in res if not k.startswith(hidden)]
    out = []
    for k in sorted(keys, key=lambda k: (k not in ("CPU", "GPU", "memory"), k)):
        v = float(res[k])
        out.append(f"{k}: {v / 1024**3:.1f} GiB" if k == "memory" else f"{k}: {v:g}")
    return "{" + ", ".join(out) + "}"


def shown_bundles(bundles: list[dict[str, float]]) -> str:
    groups: dict[str, int] = {}
    for b in bundles:
        groups[shown_resources(b)] = groups.get(shown_resources(b), 0) + 1
    return " + ".join(f"{n} x {s}" for s, n in groups.items())


def never_fits(bundles: list[dict[str, float]]) -> str | None:
    """Why no node type of the cluster could ever hold ``bundles``, when the cluster says so.

    Only the autoscaler's config (:func:`_cluster_config`) and the nodes alive now count; a
    cluster that says nothing about its node types may grow into anything.
    """
    import ray

    cfg = _cluster_config()
    if cfg is None or not cfg.node_group_configs:
        return None
    shapes = [dict(g.resources) for g in cfg.node_group_configs if g.max_count != 0]
    shapes += [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    for b in bundles:
        if not any(all(s.get(k, 0) >= v for k, v in b.items()) for s in shapes):
            offered = ", ".join(sorted({shown_resources(s) for s in shapes}))
            wanted = shown_resources(b)
            return f"no node type of this cluster offers {wanted} (its node types: {offered})"
    return None


def await_bundles(
    bundles: list[dict[str, float]],
    *,
    timeout_s: float,
    what: str,
    ask: list[dict[str, float]] | None = None,
) -> None:
    """Wait until the cluster can place ``bundles`` (packed), asking its autoscaler for them.

    A placement group of ``bundles`` is the test: Ray places it as soon as the nodes exist (the
    autoscaler sees its demand as well), and it is removed again at once, before Train or Tune
    make their own. A line says what is awaited every few seconds.

    Args:
        bundles: what one run needs now (a trial's driver and workers, or a run's workers).
        timeout_s: how long to wait before one clear error.
        what: who waits ("train", "tune"), for the messages.
        ask: what to ask the autoscaler for (default ``bundles``; tune: every concurrent trial).

    Raises:
        TliError: no node type could ever hold them (when the cluster says so), or they were
            not placed within ``timeout_s``.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    why = never_fits(bundles)
    if why:
        raise TliError(f"{what}: {shown_bundles(bundles)} can never be placed: {why}")
    with contextlib.suppress(Exception):  # a hint to an autoscaler; a no-op without one
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=ask or bundles)
    pg = placement_group(bundles, strategy="PACK", name=f"tli-{what}-probe")
    t0 = time.monotonic()
    shown_at: float | None = None
    try:
        while not pg.wait(timeout_seconds=1):
            waited = time.monotonic() - t0
            have = shown_resources(ray.cluster_resources())
            if waited >= timeout_s:
                raise TliError(
                    f"{what}: the cluster did not offer {shown_bundles(bundles)} within "
                    f"{timeout_s:g} s (it has {have}; the autoscaler was asked): add nodes, "
                    "lower --workers or --cpus-per-worker, or raise --scale-timeout-s"
                )
            if shown_at is None or waited - shown_at >= _REPORT_EVERY_S:
                shown_at = waited
                print(
                    f"tli {what}: waiting for the cluster to offer {shown_bundles(bundles)} "
                    f"({waited:.0f} of {timeout_s:g} s; it has {have} now)",
                    flush=True,
                )
        if shown_at is not None:
            print(f"tli {what}: the cluster offers it after {time.monotonic() - t0:.0f} s",
                  flush=True)  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            remove_placement_group(pg)


def plan_on_cluster(
    workers: int,
    *,
    gpu: bool,
    started: bool,
    timeout_s: float,
    what: str,
    concurrency: int = 1,
    driver_cpus: float = 0.0,
    cpus_per_worker: float | None = None,
    threads: int | None = None,
) -> WorkerPlan:
    """The Train workers' plan on the Ray this process is connected to, once it can be placed.

    A Ray that cannot grow (:func:`cluster_can_grow`) is all ours: the workers share its CPUs
    evenly and what does not fit is refused now. On one that can grow, each worker takes one
    CPU (or ``cpus_per_worker``) and :func:`await_bundles` waits for one run's worth.

    Args:
        workers: Train workers per run (per trial).
        gpu: one GPU per worker.
        started: this process started the Ray (:func:`session` yielded True).
        timeout_s: how long to wait for a cluster that can grow.
        what: who plans ("train", "tune"), for the messages.
        concurrency: runs at once (Tune trials).
        driver_cpus: what each run's own driver reserves (a Tune trial's).
        cpus_per_worker: the user's choice, if any.
        threads: torch threads per worker.
    """
    import ray

    grow = cluster_can_grow(started)
    total = max(0.0, ray.cluster_resources().get("CPU", 0.0) - job_driver_cpus())
    plan = plan_workers(total, workers, concurrency=concurrency, driver_cpus=driver_cpus,
                        share_all=not grow, cpus_per_worker=cpus_per_worker, threads=threads,
                        must_fit=not grow)  # fmt: skip
    worker = {"CPU": plan.cpus_per_worker, **({"GPU": 1.0} if gpu else {})}
    one = ([{"CPU": driver_cpus}] if driver_cpus else []) + [dict(worker)] * workers
    if grow:
        await_bundles(one, timeout_s=timeout_s, what=what, ask=one * concurrency)
    elif gpu and ray.cluster_resources().get("GPU", 0) < workers * concurrency:
        raise TliError(
            f"--gpu with {workers * concurrency} workers at once needs as many GPUs, the Ray "
            f"cluster has {ray.cluster_resources().get('GPU', 0):g}: lower --workers"
        )
    return plan


# ---------------------------------------------------------------------------- storage

STORAGE_POINTER = "tli_storage.json"  # in <out>/<run name>/: where the run's state really is


def _sub_path(out: Path) -> str:
    """A storage sub-path that is a pure function of the output folder being written.

    ``<name>-<hash of its absolute path>``: the name is the output's (``<stage>-<version>`` for
    a store version, the ``--out`` name for a command), the hash keeps two outputs of the same
    name apart.
    """
    import hashlib

    out = Path(out).absolute()
    if out.name == "output":  # a store version: <store>/<stage>/.<version>.partial/output
        version = out.parent.name.lstrip(".").removesuffix(".partial")
        name = f"{out.parent.parent.name}-{version}"
    else:
        name = out.name.lstrip(".").removesuffix(".partial") or "run"
    return f"{name}-{hashlib.sha256(str(out).encode()).hexdigest()[:12]}"


def ray_storage(out: Path, storage: str | None, name: str) -> str:
    """Ray's ``storage_path`` for run ``name`` of the output being written into ``out``.

    Without ``storage``: ``out`` itself (the run in ``out/<name>``). With it (a shared folder or
    ``s3://``): ``<storage>/<sub-path of out>``, recorded in ``out/<name>/tli_storage.json`` so
    that :func:`ray_run` (and a resume) finds it; a pointer left by an earlier attempt wins, so a
    rerun resumes where the state is.
    """
    pointer = Path(out) / name / STORAGE_POINTER
    if pointer.is_file():
        return json.loads(pointer.read_text())["storage_path"]
    if storage is None:
        return str(Path(out).resolve())
    from tli import remote

    if remote.is_remote(storage):
        base = remote.join(storage, _sub_path(out))
    else:
        base = str(Path(storage).resolve() / _sub_path(out))
    # No pointer: this output starts afresh, and whatever lies at its sub-path is a discarded
    # run's (--force, `tli runs clean`): Ray would restore from it, so it goes first.
    remote.remove_tree(base)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    doc = {"storage_path": base, "run": f"{base.rstrip('/')}/{name}"}
    pointer.write_text(json.dumps(doc, indent=2) + "\n")
    return base


def ray_run(out: Path, name: str) -> str:
    """Where run ``name`` of ``out`` keeps its state: ``out/<name>`` or what its pointer says."""
    pointer = Path(out) / name / STORAGE_POINTER
    if pointer.is_file():
        return json.loads(pointer.read_text())["run"]
    return str((Path(out) / name).resolve())


def stored_at(out: Path, name: str) -> str:
    """The ``storage_path`` run ``name`` of ``out`` used: its pointer's, else ``out``."""
    return ray_storage(out, None, name)
