"""A real local Ray head for one pipeline run, stopped by its own process at the end.

``ray start --head --block`` runs in the foreground and, on SIGTERM, stops every process it
started, and only those: we start it as our child and terminate it, never with ``ray stop``
(which would kill every Ray on the machine). It gets a short temp dir of its own (unix socket
paths must stay under 107 bytes) and free ports, so it can run beside other Rays. It carries the
node label :data:`tli.rayenv.FIXED_LABEL`: the stages that run on it know it never grows, and
refuse at once what does not fit rather than wait for nodes. On Linux it is also told to stop
when its parent dies (``PR_SET_PDEATHSIG``), so a ``tli pipeline run`` killed with SIGKILL does
not leave a head running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tli import rayenv
from tli.errors import TliError

# The `ray start --block` processes this process started (see terminate_children).
HEAD_PIDS: set[int] = set()


@contextlib.contextmanager
def local_head(num_cpus: int | None = None, timeout_s: float = 180.0) -> Iterator[str]:
    """Start a Ray head on this machine; yield its job API address; stop it on exit.

    Args:
        num_cpus: CPUs the head offers (default: all of this machine's).
        timeout_s: how long to wait for its job API.

    Yields:
        ``http://127.0.0.1:<port>``, the head's dashboard (Jobs API) address.
    """
    rayenv.ensure_auth()
    tmp = rayenv.temp_dir("head")
    env = dict(os.environ)
    # Jobs run `python -m tli.pipeline.runner`: put this interpreter first on the head's PATH so
    # the jobs run in this environment (in the project image `python` is already the right one).
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for k, v in rayenv.HEALTH_CHECK_ENV.items():
        env.setdefault(k, v)
    os.makedirs(tmp, exist_ok=True)
    log_path = os.path.join(tmp, "head.log")
    for attempt in range(2):
        proc, address = _start(tmp, env, log_path, num_cpus)
        try:
            _wait_ready(proc, address, log_path, timeout_s)
            break
        except BaseException as e:  # Ctrl-C included: the head is ours to stop
            _stop(proc)
            HEAD_PIDS.discard(proc.pid)
            # Ray's own start-up races on a busy machine (a port taken between our pick and
            # Ray's bind; a raylet that misses Ray's fixed 30 s to register): once more.
            log = Path(log_path).read_text(errors="replace")
            if not isinstance(e, TliError) or attempt == 1 or not lost_start_race(log):
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    try:
        yield address
    finally:
        _stop(proc)
        HEAD_PIDS.discard(proc.pid)
        shutil.rmtree(tmp, ignore_errors=True)
        print("tli: local Ray head stopped", flush=True)


# What `ray start` says when it lost one of those races.
_RETRYABLE = ("is used by other components", "address already in use", "port conflict",
              "timed out during startup")  # fmt: skip


def lost_start_race(log: str) -> bool:
    """Whether a Ray start-up log says it lost a race worth one more try (see _RETRYABLE)."""
    return any(m in log.lower() for m in _RETRYABLE)


def _start(
    tmp: str, env: dict[str, str], log_path: str, num_cpus: int | None
) -> tuple[subprocess.Popen, str]:
    """Start ``ray start --head`` on fresh ports; ``(process, its job API address)``."""
    names = ("port", "dash", "client", "agent_http", "agent_grpc", "runtime_env", "metrics")
    ports = dict(zip(names, rayenv.free_ports(len(names)), strict=True))
    cmd = _head_command(tmp, ports, num_cpus or os.cpu_count() or 1)
    address = f"http://127.0.0.1:{ports['dash']}"
    print(f"tli: starting a local Ray head (job API {address}, temp dir {tmp})", flush=True)
    with open(log_path, "w") as log:
        # Own session: a Ctrl-C in the terminal reaches us, and we stop the head in order.
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_stop_with_parent,
        )
    HEAD_PIDS.add(proc.pid)
    return proc, address


def _head_command(tmp: str, ports: dict[str, int], num_cpus: int) -> list[str]:
    """``ray start --head --block`` on 127.0.0.1 with its own temp dir and ports."""
    flags = {
        "--temp-dir": tmp,
        "--node-ip-address": "127.0.0.1",
        "--port": ports["port"],
        "--dashboard-host": "127.0.0.1",
        "--dashboard-port": ports["dash"],
        "--ray-client-server-port": ports["client"],
        "--dashboard-agent-listen-port": ports["agent_http"],
        "--dashboard-agent-grpc-port": ports["agent_grpc"],
        "--runtime-env-agent-port": ports["runtime_env"],
        "--metrics-export-port": ports["metrics"],
        "--num-cpus": num_cpus,
        "--include-dashboard": "true",
        # This head is the whole cluster and never grows: train/tune plan on it as it is.
        "--labels": f"{rayenv.FIXED_LABEL}=true",
    }
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block"]
    for k, v in flags.items():
        cmd += [k, str(v)]
    return [*cmd, "--disable-usage-stats"]


def _stop_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux; a no-op elsewhere)."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _wait_ready(proc: subprocess.Popen, address: str, log_path: str, timeout_s: float) -> None:
    from ray.job_submission import JobSubmissionClient

    t0 = time.time()
    last = ""
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            tail = Path(log_path).read_text().strip().splitlines()[-1:] or [""]
            raise TliError(f"the local Ray head exited at start-up: {tail[0][:200]}")
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception as e:  # not up yet
            last = str(e).splitlines()[0] if str(e) else type(e).__name__
            time.sleep(1.0)
    raise RuntimeError(f"the local Ray head's job API did not come up in {timeout_s:.0f} s: {last}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the ``ray start --block`` process: it stops the processes it started."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        # Last resort, still only ours: the head's own process group (its own session).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def descendants(root: int) -> list[int]:
    """PIDs of every process below ``root`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def terminate_children() -> None:
    """SIGTERM this process's descendants except the Ray heads it started (stopped in order).

    Used when ``tli pipeline run`` itself is told to stop: KFP's local runner waits for its
    task subprocess, which waits for its Ray job; ending them lets the run unwind at once.
    """
    keep = set(HEAD_PIDS)
    for pid in HEAD_PIDS:
        keep.update(descendants(pid))
    for pid in descendants(os.getpid()):
        if pid not in keep:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
