"""Shared Ray fixtures helpers: a private local Ray and a two-raylet cluster, both on this machine.

Never `ray stop` (it kills every Ray on the machine): each helper shuts down only what it
started, and uses a short temp dir of its own (unix socket paths must stay under 107 bytes,
pytest's tmp_path is too long).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

# Ray Train V2 waits for a controller poll in every ray.train.report(); the default interval
# (2 s) dominates short test runs. Must be set before Ray (and the Train controller) starts.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else each worker line shows twice


def short_temp_dir(area: str) -> str:
    """A short, private Ray temp dir for this test process."""
    return f"/tmp/ray_{area}_{os.getpid()}"


@contextlib.contextmanager
def local_ray(area: str, num_cpus: int = 2) -> Iterator[None]:
    """A local Ray owned by this process; shut down (and its temp dir removed) on exit."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    tmp = short_temp_dir(area)
    ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=tmp, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def two_node_cluster(area: str, cpus_per_node: int = 1) -> Iterator[object]:
    """Two raylets on this machine (``ray.cluster_utils.Cluster``), connected as the driver."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # Cluster writes the head's address to <default temp dir>/ray/ray_current_cluster, which a
    # plain ray.init() elsewhere on this machine would join: point the default at our own dir.
    tmp = short_temp_dir(area + "c")
    os.makedirs(tmp, exist_ok=True)
    old_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": cpus_per_node,
                "temp_dir": os.path.join(tmp, "ray"),
                "include_dashboard": False,
            },
        )
        cluster.add_node(num_cpus=cpus_per_node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=True)
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if old_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old_tmpdir
        shutil.rmtree(tmp, ignore_errors=True)
