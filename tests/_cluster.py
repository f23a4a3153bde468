"""A real Ray cluster made of local processes: the stand-in for KubeRay in tests.

One ``ray start --head --block`` process (0 CPUs, like KubeRay's head pod) plus any number of
``ray start --block --address ...`` worker raylets that join and leave at any time, the way the
autoscaler adds and removes pods. Every process runs in a session of its own and is stopped by
its own process id (SIGTERM, then SIGKILL to its process group): never ``ray stop``, which
kills every Ray on the machine.

Ray reports this machine's interface address for its nodes whatever ``--node-ip-address``
says; all traffic stays on this machine, but clients must use 127.0.0.1 (``address``,
``jobs_url``). Nodes are told apart by ``--node-name`` (``tc-head``, ``tc-w1``, ...).

Importing this module has no side effects beyond defining a pytest fixture.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# The project's own: ports picked together (never the same twice) and token auth set up for
# this process and everything it starts (tests/_s3.py and others import free_ports from here).
from tli.rayenv import ensure_auth, free_ports

__all__ = ["NodeInfo", "ProcessCluster", "WorkerHandle", "free_ports", "process_cluster"]

# Ray's own names for the ports we choose; one start takes all of them at once.
_HEAD_PORTS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
_WORKER_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
# A port picked by bind-and-close can still be taken by someone else before Ray binds it;
# Ray then fails at start-up with one of these. Seen here ~0.1% of starts: retry once.
_PORT_CLASH = ("is used by other components", "address already in use", "port conflict")
# Ray gives a raylet a fixed 30 s to register with the GCS; under heavy load that can pass.
_RETRYABLE = (*_PORT_CLASH, "timed out during startup")

_counter = itertools.count()


def _session_members(sid: int) -> list[int]:
    """PIDs of the live processes in session ``sid`` (Linux /proc; empty elsewhere)."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after the command name: state, ppid, pgrp, session, ...; zombies need no signal
        if len(fields) > 3 and fields[3] == str(sid) and fields[0] != "Z":
            out.append(int(d.name))
    return out


def _stop_process(proc: subprocess.Popen, timeout_s: float) -> None:
    """Stop a process we started in a session of its own, and everything left in that session.

    SIGTERM first: ``ray start --block`` then stops what it started, in order. SIGKILL to its
    process group if it has not exited after ``timeout_s``; then SIGKILL to whatever is still
    in its session (Ray's core workers each sit in a process group of their own, but never
    leave the session). Only processes of our own session are ever signalled.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while (left := _session_members(proc.pid)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


@dataclass(frozen=True)
class NodeInfo:
    """One node of the cluster, from the GCS."""

    node_id: str  # hex, as ray.get_runtime_context().get_node_id() gives it
    node_name: str  # tc-head, tc-w1, ...
    alive: bool
    resources_total: dict[str, float]
    labels: dict[str, str]


@dataclass
class WorkerHandle:
    """One worker raylet of a :class:`ProcessCluster` (returned by ``add_worker``)."""

    name: str
    proc: subprocess.Popen | None
    log_path: Path
    num_cpus: float
    num_gpus: float
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    node_id: str | None = None  # known once the node has registered (wait_for_nodes)

    @property
    def alive(self) -> bool:
        """Whether its ``ray start`` process still runs."""
        return self.proc is not None and self.proc.poll() is None


class ProcessCluster:
    """A Ray head (0 CPUs by default) and worker raylets, each a local process of its own.

    Use as a context manager; on exit every worker, then the head, is stopped and the temp
    dir removed.

    Args:
        head_cpus: CPUs the head offers (0, like a KubeRay head).
        object_store_memory: bytes of object store per node (kept small: several raylets
            share this machine's memory).
        env: extra environment variables for every Ray process.
        start_timeout_s: how long to wait for the head's job API and for nodes to join.
        stop_timeout_s: how long SIGTERM gets before SIGKILL.
    """

    def __init__(
        self,
        head_cpus: float = 0,
        object_store_memory: int = 256 * 1024**2,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 180.0,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.head_cpus = head_cpus
        self.object_store_memory = object_store_memory
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        # Short on purpose: unix socket paths below it must stay under 107 bytes.
        self.temp_dir = Path(f"/tmp/tc_{os.getpid()}_{next(_counter)}")
        self.workers: list[WorkerHandle] = []
        self._extra_env = dict(env or {})
        self._head: subprocess.Popen | None = None
        self._gcs_port: int | None = None
        self._dash_port: int | None = None
        self._worker_count = itertools.count(1)
        self._head_node_id: str | None = None
        self._gcs = None  # a GcsClient, made on first use

    # -- addresses ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The GCS address for ``ray.init(address=...)`` and ``ray start --address``."""
        assert self._gcs_port is not None, "the cluster is not started"
        return f"127.0.0.1:{self._gcs_port}"

    @property
    def jobs_url(self) -> str:
        """The head's dashboard, i.e. the Job API (``JobSubmissionClient(jobs_url)``)."""
        assert self._dash_port is not None, "the cluster is not started"
        return f"http://127.0.0.1:{self._dash_port}"

    @property
    def head_node_id(self) -> str:
        """The node id of the head (the node whose resources include node:__internal_head__)."""
        if self._head_node_id is None:
            for n in self.nodes():
                if "node:__internal_head__" in (n.resources_total or {}):
                    self._head_node_id = n.node_id
        assert self._head_node_id is not None, "the head has not registered"
        return self._head_node_id

    # -- life cycle --------------------------------------------------------------------------

    def __enter__(self) -> ProcessCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Every process of the cluster and its clients must agree (tli.rayenv.ensure_auth).
        env["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE", "token")
        # Jobs and workers run `python ...`: this interpreter's environment first.
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        # Anything that reads the default temp dir (e.g. ray_current_cluster) stays in ours, so
        # a plain ray.init() elsewhere on this machine never finds and joins this cluster.
        env["RAY_TMPDIR"] = str(self.temp_dir)
        env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
        env.update(self._extra_env)
        return env

    def _ray_start(
        self,
        args: list[str],
        ports: tuple[str, ...],
        log_path: Path,
        ready: Callable[[subprocess.Popen, dict[str, int]], None],
    ) -> tuple[subprocess.Popen, dict[str, int]]:
        """Start one ``ray start --block`` with fresh ports and wait with ``ready``.

        ``ready(proc, ports)`` returns once the process serves, or raises. If the process died
        of a port clash, or of Ray's fixed 30 s wait for a raylet to register (which a loaded
        machine can exceed), the whole start is retried once with new ports.
        """
        for attempt in range(2):
            chosen = dict(zip(ports, free_ports(len(ports)), strict=True))
            cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *args]
            for flag, port in chosen.items():
                cmd += [f"--{flag}", str(port)]
            with open(log_path, "w") as log:
                proc = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=self._env(),
                    start_new_session=True,
                )
            try:
                ready(proc, chosen)
                return proc, chosen
            except BaseException:
                text = _read(log_path)
                _stop_process(proc, 5)
                if attempt == 0 and any(m in text.lower() for m in _RETRYABLE):
                    continue
                raise
        raise AssertionError("unreachable")

    def start(self) -> None:
        """Start the head and wait until its job API answers."""
        ensure_auth()
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.temp_dir / "head.log"
        args = [
            "--head",
            "--node-ip-address", "127.0.0.1",
            "--node-name", "tc-head",
            "--num-cpus", _num(self.head_cpus),
            "--num-gpus", "0",  # as KubeRay's head; and never the real GPUs of a GPU machine
            "--object-store-memory", str(self.object_store_memory),
            "--dashboard-host", "127.0.0.1",
            "--temp-dir", str(self.temp_dir),
            "--include-dashboard", "true",
            "--disable-usage-stats",
        ]  # fmt: skip

        def ready(proc: subprocess.Popen, ports: dict[str, int]) -> None:
            self._head = proc
            self._gcs_port, self._dash_port = ports["port"], ports["dashboard-port"]
            self._wait_jobs_api(log_path)
            self.wait_for_nodes(1)

        try:
            self._ray_start(args, _HEAD_PORTS, log_path, ready)
        except BaseException:
            self.stop()
            raise

    def _wait_jobs_api(self, log_path: Path) -> None:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + self.start_timeout_s
        last = ""
        while time.monotonic() < deadline:
            assert self._head is not None
            if self._head.poll() is not None:
                raise RuntimeError(f"the Ray head exited at start-up:\n{_tail(_read(log_path))}")
            try:
                JobSubmissionClient(self.jobs_url).list_jobs()
                return
            except Exception as e:  # not up yet
                last = (str(e).splitlines() or [type(e).__name__])[0]
                time.sleep(1.0)
        raise TimeoutError(f"the Ray head's job API did not answer in time: {last}")

    def add_worker(
        self,
        num_cpus: float = 2,
        num_gpus: float = 0,
        resources: dict[str, float] | None = None,
        labels: dict[str, str] | None = None,
        wait: bool = True,
    ) -> WorkerHandle:
        """Join a worker raylet (the autoscaler adding a pod); wait until it is registered.

        Args:
            num_cpus: CPUs it advertises (may exceed the machine's: Ray only counts).
            num_gpus: GPUs it advertises (need not exist: enough for placement tests).
            resources: custom resources, e.g. ``{"trainer": 1}``.
            labels: node labels (``key=value``), e.g. ``{"pool": "gpu"}``.
            wait: wait until the node is alive in the cluster (and its node id is known).
        """
        assert self._head is not None, "the cluster is not started"
        name = f"tc-w{next(self._worker_count)}"
        log_path = self.temp_dir / f"{name}.log"
        args = [
            "--address", self.address,
            "--node-ip-address", "127.0.0.1",
            "--node-name", name,
            "--num-cpus", _num(num_cpus),
            # Always explicit: 0 must not become "detect this machine's GPUs".
            "--num-gpus", _num(num_gpus),
            "--object-store-memory", str(self.object_store_memory),
            "--temp-dir", str(self.temp_dir),
            "--disable-usage-stats",
        ]  # fmt: skip
        if resources:
            args += ["--resources", json.dumps(resources)]
        if labels:
            args += ["--labels", ",".join(f"{k}={v}" for k, v in labels.items())]
        handle = WorkerHandle(
            name, None, log_path, num_cpus, num_gpus, dict(resources or {}), dict(labels or {})
        )

        def ready(proc: subprocess.Popen, ports: dict[str, int]) -> None:
            handle.proc = proc
            if handle not in self.workers:
                self.workers.append(handle)
            if wait:
                self.wait_for_nodes()

        try:
            self._ray_start(args, _WORKER_PORTS, log_path, ready)
        except BaseException:
            if handle in self.workers:
                self.workers.remove(handle)
            raise
        return handle

    def add_worker_later(self, delay_s: float, **kwargs: object) -> threading.Thread:
        """Join a worker from a thread after ``delay_s`` (the autoscaler answering a demand).

        The thread is started and returned; join it before the cluster stops. An error in
        ``add_worker`` is kept on the thread as ``thread.error``.
        """

        def later() -> None:
            time.sleep(delay_s)
            try:
                self.add_worker(**kwargs)  # type: ignore[arg-type]
            except BaseException as e:  # seen by the test through thread.error
                thread.error = e  # type: ignore[attr-defined]

        thread = threading.Thread(target=later, name=f"add-worker-in-{delay_s:g}s", daemon=True)
        thread.error = None  # type: ignore[attr-defined]
        thread.start()
        return thread

    def remove_worker(self, handle: WorkerHandle, kill: bool = False, wait: bool = True) -> None:
        """Stop a worker raylet (the autoscaler removing a pod, or with ``kill`` a pod dying).

        Args:
            handle: what ``add_worker`` returned.
            kill: SIGKILL its whole process group at once instead of a graceful SIGTERM; the
                GCS then only notices through missed health checks (tens of seconds).
            wait: wait until the cluster no longer counts it as alive.
        """
        if handle.proc is not None:
            if kill:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(handle.proc.pid, signal.SIGKILL)
            _stop_process(handle.proc, self.stop_timeout_s)
        if handle in self.workers:
            self.workers.remove(handle)
        if wait:
            self.wait_for_nodes()

    def stop(self) -> None:
        """Stop every worker, then the head; remove the temp dir. Safe to call twice."""
        for w in list(self.workers):
            if w.proc is not None:
                _stop_process(w.proc, self.stop_timeout_s)
        self.workers.clear()
        if self._head is not None:
            _stop_process(self._head, self.stop_timeout_s)
            self._head = None
        self._gcs = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    # -- state -------------------------------------------------------------------------------

    def nodes(self, alive_only: bool = True) -> list[NodeInfo]:
        """The cluster's nodes, as the GCS (the source of truth) knows them.

        Asks the GCS directly rather than the dashboard's State API: on a loaded machine the
        dashboard's state module can stay unavailable for minutes after the job API answers.
        """
        from ray._raylet import GcsClient  # what `ray start` itself uses to find nodes
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        if self._gcs is None:
            self._gcs = GcsClient(address=self.address)
        alive = GcsNodeInfo.GcsNodeState.ALIVE
        out = [
            NodeInfo(
                node_id=info.node_id.hex(),
                node_name=info.node_name,
                alive=info.state == alive,
                resources_total=dict(info.resources_total),
                labels=dict(info.labels),
            )
            for info in self._gcs.get_all_node_info(timeout=30).values()
        ]
        return [n for n in out if n.alive or not alive_only]

    def wait_for_nodes(self, n: int | None = None, timeout: float | None = None) -> None:
        """Wait until exactly ``n`` nodes (head included) are alive.

        Args:
            n: node count; default: the head plus every worker added and not removed, each of
                them under its own name.
            timeout: seconds (default ``start_timeout_s``); raises TimeoutError after it.
        """
        deadline = time.monotonic() + (self.start_timeout_s if timeout is None else timeout)
        want_names = {"tc-head", *(w.name for w in self.workers)} if n is None else None
        seen: list = []
        last_error = ""
        while time.monotonic() < deadline:
            for w in self.workers:
                if not w.alive:
                    raise RuntimeError(f"worker {w.name} exited:\n{_tail(_read(w.log_path))}")
            try:
                seen = self.nodes()
            except Exception as e:  # the GCS may not answer yet
                last_error = f" ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
                time.sleep(0.5)
                continue
            names = [x.node_name for x in seen]
            if want_names is None:
                done = len(seen) == n
            else:
                done = len(names) == len(want_names) and set(names) == want_names
            if done:
                by_name = {x.node_name: x.node_id for x in seen}
                for w in self.workers:
                    w.node_id = by_name.get(w.name, w.node_id)
                return
            time.sleep(0.5)
        got = sorted(x.node_name for x in seen)
        raise TimeoutError(
            f"wanted {n or sorted(want_names or [])} alive nodes, got {got}{last_error}"
        )


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(text: str, n: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


@pytest.fixture
def process_cluster() -> Iterator[ProcessCluster]:
    """A started :class:`ProcessCluster` (head only, 0 CPUs); the test adds workers."""
    import ray

    with ProcessCluster() as cluster:
        try:
            yield cluster
        finally:
            if ray.is_initialized():
                ray.shutdown()
