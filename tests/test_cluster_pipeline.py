"""The production path on a real Ray cluster of local processes (tests/_cluster.py).

The head offers 0 CPUs, like KubeRay's; worker raylets join it as the autoscaler would add pods.
Stages run as Ray jobs through :mod:`tli.pipeline.runner` (the path every KFP step takes), or as
`tli train` / `tli tune` joining the cluster. Covered: every stage's driver on a worker (the
manifest's ``ray_node_id``), placement by custom resources, one job per version, train and tune
waiting for a worker that joins later, the timeout errors, and a kill -9 during train inside
``tli pipeline run`` that a rerun resumes to the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import _s3
from tests._cluster import ProcessCluster
from tli import remote
from tli.config import DataConfig, Runtime, StageDrivers
from tli.pipeline.head import descendants
from tli.pipeline.jobs import driver_resources, submission_prefix
from tli.pipeline.runner import run_stage
from tli.pipeline.store import Store
from tli.rayenv import free_ports

ROOT = Path(__file__).resolve().parents[1]
TLI = [sys.executable, "-m", "tli.cli"]
SPECIAL = "tli_test_pool"  # a custom resource only one worker offers
s3_server = _s3.s3_server  # fixtures
s3_env = _s3.s3_env


@pytest.fixture(scope="module")
def cluster() -> Iterator[ProcessCluster]:
    """A head with 0 CPUs, a 2-CPU worker and a 1-CPU worker that alone offers ``SPECIAL``."""
    with ProcessCluster() as c:
        c.add_worker(num_cpus=2)
        c.add_worker(num_cpus=1, resources={SPECIAL: 1})
        yield c


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)


def _sections(tiny_model_dir: Path, corpus: Path) -> dict[str, dict]:
    return {
        "base": {"model": str(tiny_model_dir)},
        "data": DataConfig(sources=[], extra=[str(corpus)]).model_dump(mode="json"),
    }


def _stage(name: str, store: Path, sections: dict, refs: dict, cluster: ProcessCluster,
           runtime: Runtime | None = None):  # fmt: skip
    keep = {"import-base": ("base",), "data": ("data",)}[name]
    return run_stage(name, store=store, sections={k: sections[k] for k in keep}, refs=refs,
                     ray_jobs=cluster.jobs_url, runtime=runtime or Runtime(progress=False))  # fmt: skip


# ---------------------------------------------------------------------------- placement


def test_driver_resources_follow_the_stage_and_the_config() -> None:
    cuda = driver_resources("eval", Runtime(device="cuda"))
    assert cuda["entrypoint_num_gpus"] == 1 and cuda["entrypoint_num_cpus"] == 1
    assert driver_resources("eval", Runtime(device="cpu"))["entrypoint_num_gpus"] == 0
    assert driver_resources("train", Runtime())["entrypoint_num_cpus"] == 0.1
    given = Runtime.model_validate(
        {"drivers": {"inject": {"cpus": 4, "memory": "2GB", "resources": {"pool": 1}}}}
    )
    inject = driver_resources("inject", given)
    assert inject["entrypoint_num_cpus"] == 4 and inject["entrypoint_memory"] == 2 * 1024**3
    assert inject["entrypoint_resources"] == {"pool": 1}
    assert set(StageDrivers.model_fields) == {
        "import_base", "data", "tune", "inject", "train", "eval", "report"
    }  # fmt: skip


def test_every_stage_driver_runs_on_a_worker_and_its_manifest_says_where(
    cluster: ProcessCluster, tiny_model_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    sections = _sections(tiny_model_dir, corpus)
    base = _stage("import-base", store, sections, {}, cluster)
    # The data driver asks for the custom resource: only the second worker has it.
    special = Runtime.model_validate(
        {"progress": False, "drivers": {"data": {"cpus": 1, "resources": {SPECIAL: 1}}}}
    )
    data = _stage("data", store, sections, {"base": base.to_dict()}, cluster, special)
    st = Store(store)
    w_any, w_special = cluster.workers
    nodes = {r.stage: st.manifest(r.stage, r.version)["ray_node_id"] for r in (base, data)}
    assert cluster.head_node_id not in nodes.values(), nodes
    assert nodes["import-base"] in (w_any.node_id, w_special.node_id), nodes
    assert nodes["data"] == w_special.node_id, nodes
    # Placement is in no version: the same stage run here (no Ray job) finds it stored.
    assert data.status == "ran"
    again = run_stage("data", store=store, sections={"data": sections["data"]},
                      refs={"base": base.to_dict()})  # fmt: skip
    assert (again.version, again.status) == (data.version, "cached")
    # Outside a job nothing says where it ran.
    plain = run_stage("import-base", store=tmp_path / "store2", sections={"base": sections["base"]},
                      refs={})  # fmt: skip
    assert plain.version == base.version
    assert Store(tmp_path / "store2").manifest("import-base", plain.version)["ray_node_id"] is None


def test_two_submissions_of_one_version_run_one_job(
    cluster: ProcessCluster, tiny_model_dir: Path, corpus: Path, tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from ray.job_submission import JobSubmissionClient

    store = tmp_path / "store"
    sections = _sections(tiny_model_dir, corpus)
    results: list = []
    errors: list = []
    barrier = threading.Barrier(2)

    def submit() -> None:
        try:
            barrier.wait()
            results.append(_stage("import-base", store, sections, {}, cluster))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len({(r.version, str(r.path)) for r in results}) == 1
    prefix = submission_prefix("import-base", results[0].version, Store(store).root)
    jobs = [j for j in JobSubmissionClient(cluster.jobs_url).list_jobs()
            if (j.submission_id or "").startswith(prefix)]  # fmt: skip
    assert [j.submission_id for j in jobs] == [prefix + "1"], jobs
    out = capfd.readouterr().out
    assert out.count(f"submitted as Ray job {prefix}1") == 1, out[-3000:]
    assert f"following Ray job {prefix}1" in out, out[-3000:]
    # A third call finds the version in the store: no job at all.
    third = _stage("import-base", store, sections, {}, cluster)
    assert third.status == "cached"


# ---------------------------------------------------------------------------- first contact


def test_nothing_answering_is_one_line_and_fast(
    tiny_injected_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    (closed,) = free_ports(1)  # nothing listens there once the probe socket is closed
    out = tmp_path / "trained"
    proc = subprocess.run(
        [*TLI, "train", "--model", str(tiny_injected_dir), "--data", str(corpus), "--out",
         str(out), "--ray-address", f"127.0.0.1:{closed}", "--steps", "2"],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and f"127.0.0.1:{closed}" in err, err
    assert "cannot reach the Ray cluster" in err and "--ray-address" in err
    assert not out.exists() and not list(tmp_path.glob(".trained*"))
    # The job API alike: `tli pipeline run --ray-jobs` at a closed port, before any work.
    proc = subprocess.run(
        [*TLI, "pipeline", "run", "--ray-jobs", f"http://127.0.0.1:{closed}", "--store",
         str(tmp_path / "store"), "--connect-timeout-s", "3"],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "job API" in proc.stderr
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------------------- growing clusters

SMALL_TRAIN = ["--steps", "4", "--seq-len", "32", "--batch-size", "2", "--warmup", "1",
               "--validation-blocks", "2", "--threads", "1", "--report-every", "2"]  # fmt: skip


def _error_lines(stderr: str) -> list[str]:
    """tli's own error lines (Ray logs its connection to a cluster on stderr as well)."""
    return [x for x in stderr.splitlines() if x.startswith("tli ") and ": error: " in x]


def _train_args(model: Path, corpus: Path, out: Path, address: str, *more: str) -> list[str]:
    return [*TLI, "train", "--model", str(model), "--data", str(corpus), "--out", str(out),
            "--ray-address", address, *SMALL_TRAIN, *more]  # fmt: skip


def test_what_the_cluster_does_not_offer_in_time_is_one_clear_error(
    cluster: ProcessCluster, tiny_injected_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    # Two workers of 2 CPUs packed together: no node of this cluster has 4 CPUs, and without an
    # autoscaler config it cannot say it never will: tli waits, then says what it asked for.
    out = tmp_path / "trained"
    proc = subprocess.run(
        _train_args(tiny_injected_dir, corpus, out, cluster.address, "--workers", "2",
                    "--cpus-per-worker", "2", "--scale-timeout-s", "4"),
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    err = _error_lines(proc.stderr)
    assert len(err) == 1 and proc.stderr.strip().endswith(err[0]), proc.stderr[-3000:]
    assert "did not offer 2 x {CPU: 2} within 4 s" in err[0], err[0]
    assert "it has {CPU: 3" in err[0] and "--scale-timeout-s" in err[0], err[0]
    assert "waiting for the cluster to offer 2 x {CPU: 2}" in proc.stdout, proc.stdout[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".trained.partial/ray/step_*"))


def test_what_no_node_type_could_ever_give_is_refused_at_once(
    cluster: ProcessCluster, tiny_injected_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    """The cluster says what its node types are (as KubeRay's autoscaler v2 reports them to the
    GCS): 1 GPU per worker is refused before any wait."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY as KEY
    from ray._raylet import GCS_AUTOSCALER_STATE_NAMESPACE as NS
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add()
    group.name, group.min_count, group.max_count = "cpu", 0, 4
    group.resources.update({"CPU": 2, "memory": 8 * 1024**3})
    gcs = GcsClient(address=cluster.address)
    gcs.internal_kv_put(KEY.encode(), config.SerializeToString(), True, NS.encode())
    try:
        proc = subprocess.run(
            _train_args(tiny_injected_dir, corpus, tmp_path / "t", cluster.address, "--gpu",
                        "--scale-timeout-s", "600"),
            capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600,
        )  # fmt: skip
    finally:
        gcs.internal_kv_del(KEY.encode(), False, NS.encode())
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    (err,) = _error_lines(proc.stderr)
    assert "can never be placed" in err, err
    assert "{CPU: 1, GPU: 1}" in err and "{CPU: 2, memory: 8.0 GiB}" in err, err
    assert "waiting for the cluster" not in proc.stdout


class _Reader:
    """A process's output, read line by line from a thread (so a test can wait for a line)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float) -> str:
        self.proc.wait(timeout=timeout)
        self.thread.join(timeout=60)
        return self.text()


@pytest.mark.slow
def test_train_and_tune_wait_for_a_worker_that_joins_later(
    tiny_model_dir: Path, tiny_injected_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    """A head with no workers at all: both start, ask, wait; 20 s after both said so a worker
    joins (the autoscaler adding a pod); both complete on it."""
    with ProcessCluster() as empty:
        tune_args = [*TLI, "tune", "--model", str(tiny_model_dir), "--data", str(corpus), "--out",
                     str(tmp_path / "tune"), "--ray-address", empty.address, "--intervals", "2",
                     "--no-asha", "--trial-steps", "2", "--trial-validation-blocks", "2",
                     "--trial-validation-every", "2", "--seq-len", "32", "--batch-size", "2",
                     "--warmup", "1", "--threads", "1"]  # fmt: skip
        train_args = _train_args(tiny_injected_dir, corpus, tmp_path / "train", empty.address)
        runs = {
            what: _Reader(subprocess.Popen(args, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True, env=_env(),
                                           cwd=ROOT))
            for what, args in (("train", train_args), ("tune", tune_args))
        }  # fmt: skip
        for what, run in runs.items():
            _wait(lambda r=run, w=what: f"tli {w}: waiting for the cluster" in r.text()
                  or r.proc.poll() is not None, f"{what} to wait", timeout=600)  # fmt: skip
            assert run.proc.poll() is None, run.text()[-3000:]
        # 1 CPU for the train worker, 0.1 + 1 for the trial: advertised, not all real.
        joiner = empty.add_worker_later(20, num_cpus=3)
        logs = {what: run.wait(timeout=900) for what, run in runs.items()}
        joiner.join(timeout=300)
        assert joiner.error is None, joiner.error
        (worker,) = empty.workers
        for what, text in logs.items():
            assert runs[what].proc.returncode == 0, f"{what}:\n{text[-3000:]}"
            waited = re.search(rf"tli {what}: the cluster offers it after (\d+) s", text)
            assert waited and int(waited.group(1)) >= 20, text[-3000:]
    provenance = json.loads((tmp_path / "train" / "tli_train.json").read_text())
    assert [w["node_id"] for w in provenance["workers"]] == [worker.node_id]
    assert (tmp_path / "tune" / "best.yaml").is_file()


# ---------------------------------------------------------------------------- kill -9, resume


def _wait(pred, what: str, timeout: float = 900.0, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def _summary(text: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in text.split("tli pipeline: done")[-1].splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[1] in ("import-base", "data", "tune", "inject", "train",
                                            "eval", "report"):  # fmt: skip
            rows[parts[0]] = (parts[2], parts[3])
    return rows


@pytest.mark.slow
def test_kill_9_during_train_in_a_pipeline_run_then_a_rerun_resumes_to_the_same_bytes(
    tiny_model_dir: Path, tmp_path: Path, s3_env
) -> None:
    """The production path end to end: stages as Ray jobs on a cluster whose head has no CPUs,
    Ray state on S3. Mid-train, the pipeline process and the train job's driver are SIGKILLed
    (a KFP step pod and a Ray pod evicted at once); the rerun follows nothing, submits the train
    job's second attempt, which resumes from its last checkpoint on S3; a third run recomputing
    train uninterrupted reproduces the same output bytes."""
    from ray.job_submission import JobSubmissionClient

    bucket = s3_env.make_bucket(f"k{os.getpid()}x{int(time.time())}")
    storage = f"s3://{bucket}/ray"
    store = tmp_path / "store"
    args = [*TLI, "pipeline", "run", "--preset", "smoke", "--base", str(tiny_model_dir),
            "--store", str(store), "--storage", storage, "--threads", "1", "--report-every", "1",
            "train.steps=30", "train.checkpoint_every=2", "eval.limit=2"]  # fmt: skip
    env = _env()  # with the server's AWS_* variables (s3_env): every Ray process gets them
    with ProcessCluster() as c:
        c.add_worker(num_cpus=3)
        head = c.head_node_id
        args += ["--ray-jobs", c.jobs_url]
        client = JobSubmissionClient(c.jobs_url)
        log1 = tmp_path / "run1.log"
        with open(log1, "w") as fh:
            run1 = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    start_new_session=True)  # fmt: skip

        def checkpointed() -> bool:  # Ray Train's checkpoint of step 4 or later, on S3
            late = re.compile(r"/ray/step_0000(0[4-9]|[1-9]\d)/")
            return any(late.search(u) for u in remote.list(storage) if "/train-" in u)

        _wait(lambda: run1.poll() is not None or checkpointed(), "a train checkpoint on S3")
        assert run1.poll() is None, log1.read_text()[-4000:]
        (train_job,) = [j for j in client.list_jobs()
                        if (j.submission_id or "").startswith("tli-train-")]  # fmt: skip
        driver = int(client.get_job_info(train_job.submission_id).driver_info.pid)
        for pid in [run1.pid, *descendants(run1.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.kill(driver, signal.SIGKILL)
        run1.wait(timeout=60)
        _wait(lambda: str(client.get_job_status(train_job.submission_id)).endswith(
            ("FAILED", "STOPPED")), "the killed job to end", timeout=300)  # fmt: skip
        assert list((store / "train").glob(".*.partial")), "the partial train version is kept"

        run2 = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
        text2 = run2.stdout + run2.stderr
        (tmp_path / "run2.log").write_text(text2)
        assert run2.returncode == 0, text2[-5000:]
        step = int(re.search(r"resuming from step (\d+)", text2).group(1))
        assert 4 <= step < 30, text2[-5000:]
        assert re.search(r"train: submitted as Ray job tli-train-\S+-2 after failed job", text2)
        rows2 = _summary(text2)
        assert rows2["train"][1] == "ran" and rows2["tune"][1] == "cached", rows2

        # The reference: the same version trained again without interruption.
        run3 = subprocess.run([*args, "--rerun", "train"], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=1800)  # fmt: skip
        text3 = run3.stdout + run3.stderr
        (tmp_path / "run3.log").write_text(text3)
        assert run3.returncode == 0, text3[-5000:]
        assert "resuming from step" not in text3.split("train: submitted")[-1].split("eval")[0]
        rows3 = _summary(text3)
        assert rows3["train"] == (rows2["train"][0], "reproduced"), rows3
    manifest = Store(store).manifest("train", rows2["train"][0])
    assert manifest["ray_node_id"] not in (None, head)
    weights = [f for f in manifest["files"] if f["path"].endswith(".safetensors")]
    assert weights and not any(f.get("volatile") for f in weights)
