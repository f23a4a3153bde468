"""The local-process Ray cluster (tests/_cluster.py) behaves like a KubeRay cluster would."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from tests._cluster import ProcessCluster

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster() -> Iterator[ProcessCluster]:
    """One head (0 CPUs) for this module; each test adds and removes its own workers."""
    with ProcessCluster() as c:
        yield c


@pytest.fixture
def connected(cluster: ProcessCluster) -> Iterator[ProcessCluster]:
    """``cluster`` with this process connected as a driver; disconnected afterwards."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()


def _until(pred: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Wait for ``pred`` (cluster state settles asynchronously; a loaded machine is slow)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def _res(name: str) -> float:
    return ray.cluster_resources().get(name, 0.0)


@ray.remote
def _where() -> str:
    return ray.get_runtime_context().get_node_id()


def test_head_alone_offers_no_cpus(connected: ProcessCluster) -> None:
    assert _res("CPU") == 0 and _res("GPU") == 0
    head = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] == connected.head_node_id]
    assert len(head) == 1 and "node:__internal_head__" in head[0]["Resources"]
    assert connected.jobs_url.startswith("http://127.0.0.1:")


def test_worker_joins_runs_tasks_and_leaves(connected: ProcessCluster) -> None:
    worker = connected.add_worker(num_cpus=2)
    try:
        assert worker.node_id and worker.node_id != connected.head_node_id
        _until(lambda: _res("CPU") == 2, "the worker's 2 CPUs")
        # num_cpus=1: only the worker can run it (the head has none).
        assert ray.get(_where.options(num_cpus=1).remote(), timeout=120) == worker.node_id
    finally:
        connected.remove_worker(worker)
    _until(lambda: _res("CPU") == 0, "the worker's CPUs to go")
    assert [n.node_name for n in connected.nodes()] == ["tc-head"]


def test_advertised_gpu_and_custom_resources(connected: ProcessCluster) -> None:
    worker = connected.add_worker(
        num_cpus=1, num_gpus=1, resources={"trainer": 2}, labels={"pool": "gpu"}
    )
    try:
        _until(lambda: _res("GPU") == 1, "the advertised GPU")
        assert _res("trainer") == 2
        node = next(n for n in ray.nodes() if n["NodeID"] == worker.node_id)
        assert node["Labels"]["pool"] == "gpu"
        # Placement only: the GPU does not exist, but Ray schedules onto it.
        task = _where.options(num_cpus=0, num_gpus=1).remote()
        assert ray.get(task, timeout=120) == worker.node_id
    finally:
        connected.remove_worker(worker)
    _until(lambda: _res("GPU") == 0, "the GPU to go")


def test_job_api_runs_the_driver_on_a_worker(cluster: ProcessCluster) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    worker = cluster.add_worker(num_cpus=1)
    try:
        client = JobSubmissionClient(cluster.jobs_url)
        job = client.submit_job(
            entrypoint="python -c \"import ray; ray.init(); print('JOB', ray.cluster_resources()['CPU'])\"",
            entrypoint_num_cpus=1,  # the head has 0 CPUs: the driver must land on the worker
        )
        _until(lambda: client.get_job_status(job).is_terminal(), "the job", timeout=180)
        logs = client.get_job_logs(job)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs
        assert "JOB 1.0" in logs
        # (The driver's own get_node_id() is not telling here: every raylet of this machine
        # has the same address, and ray.init() inside the job may attach to any of them.)
        assert client.get_job_info(job).driver_node_id == worker.node_id
    finally:
        cluster.remove_worker(worker)


@pytest.mark.slow
def test_killed_worker_is_noticed(connected: ProcessCluster) -> None:
    """A pod that dies (SIGKILL, no goodbye) leaves through the GCS's missed health checks."""
    worker = connected.add_worker(num_cpus=1)
    try:
        _until(lambda: _res("CPU") == 1, "the worker's CPU")
    finally:
        connected.remove_worker(worker, kill=True, wait=False)
    connected.wait_for_nodes(1, timeout=180)
    _until(lambda: _res("CPU") == 0, "the dead worker's CPU to go", timeout=180)
