"""`tli pipeline submit` and the cluster defaults, as far as they go without a KFP server.

No Kubeflow Pipelines API exists here: these check the client's arguments, the run's parameters,
the compiled defaults, the one-line errors for a host that refuses or never answers (a real
listening socket whose backlog is full), and the step states printed while following a run
(through a stand-in client that returns KFP's own API objects). What only a real cluster shows
is listed in the README.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tli.errors import TliError
from tli.pipeline.jobs import CLUSTER_JOBS_API
from tli.rayenv import free_ports

ROOT = Path(__file__).resolve().parents[1]
TLI = [sys.executable, "-m", "tli.cli"]


def _tli(*args: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items()
         if k not in ("KF_PIPELINES_ENDPOINT", "KUBERNETES_SERVICE_HOST")}  # fmt: skip
    return subprocess.run([*TLI, *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**e, "HF_HUB_OFFLINE": "1", **env})  # fmt: skip


@pytest.fixture
def silent_host() -> Iterator[str]:
    """``http://127.0.0.1:P`` where a socket listens but never accepts: connects time out."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)  # fills the backlog
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        filler.close()
        srv.close()


def test_the_client_gets_one_kind_of_credentials() -> None:
    from kfp.client import ServiceAccountTokenVolumeCredentials

    from pipelines.local import client_kwargs

    assert client_kwargs("http://h:8080") == {"host": "http://h:8080"}
    assert client_kwargs("http://h", namespace="team-a")["namespace"] == "team-a"
    assert client_kwargs("http://h", token="T")["existing_token"] == "T"
    assert client_kwargs("http://h", cookies="authservice_session=C")["cookies"] == (
        "authservice_session=C"
    )
    sa = client_kwargs(None, sa_token=True)
    assert sa["host"] is None
    assert isinstance(sa["credentials"], ServiceAccountTokenVolumeCredentials)


def test_the_run_parameters_carry_the_runtime_and_the_drivers() -> None:
    from tli.cli.pipeline import drivers_of, pipeline_arguments
    from tli.config import RunConfig, Runtime

    drivers = drivers_of(["eval.gpus=1", "import-base.memory=8GB", "inject.resources={pool: 2}"])
    assert drivers == {"eval": {"gpus": 1}, "import_base": {"memory": "8GB"},
                       "inject": {"resources": {"pool": 2}}}  # fmt: skip
    rt = Runtime.model_validate({"storage": "s3://bucket1/ray", "drivers": drivers})
    args = pipeline_arguments(RunConfig(), "/mnt/tli/runs", CLUSTER_JOBS_API, [], rt)
    runtime = json.loads(args["runtime"])
    assert runtime["storage"] == "s3://bucket1/ray" and runtime["scale_timeout_s"] == 900
    assert runtime["drivers"]["import_base"]["memory"] == 8 * 1024**3
    assert runtime["drivers"]["eval"]["gpus"] == 1 and "store" not in runtime
    with pytest.raises(TliError, match="unknown stage 'evals'"):
        drivers_of(["evals.gpus=1"])
    with pytest.raises(TliError, match="STAGE.FIELD=VALUE"):
        drivers_of(["eval=1"])


def test_driver_values_are_the_flags_not_config_overrides() -> None:
    """`--driver eval.gpus=1` (as the help writes it): the word after --driver is its value,
    while a KEY=VALUE elsewhere stays a config override; --export-to and tracking reach the
    pipeline's parameters."""
    from tli.cli import _parse
    from tli.cli.flags import resolve_args
    from tli.cli.pipeline import pipeline_arguments
    from tli.config import Runtime

    _, args = _parse(["pipeline", "run", "--driver", "eval.gpus=1", "eval.limit=3",
                      "--driver=inject.cpus=2", "--export-to", "s3://b/m",
                      "tracking.mlflow_uri=sqlite:///m.db"])  # fmt: skip
    assert args.driver == ["eval.gpus=1", "inject.cpus=2"]
    cfg = resolve_args(args).config
    assert cfg.eval.limit == 3
    params = pipeline_arguments(cfg, "/s", None, [], Runtime(), args.export_to)
    assert params["export_to"] == "s3://b/m"
    assert json.loads(params["tracking_config"])["mlflow_uri"] == "sqlite:///m.db"


def test_the_compiled_default_is_the_clusters_job_api(tmp_path: Path) -> None:
    import yaml

    from pipelines.local import compile_pipeline

    out = compile_pipeline(tmp_path / "p.yaml")
    spec = next(yaml.safe_load_all(out.read_text()))
    param = spec["root"]["inputDefinitions"]["parameters"]["ray_jobs"]
    assert param["defaultValue"] == CLUSTER_JOBS_API == "http://tli-raycluster-head-svc:8265"


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_a_kfp_host_that_does_not_answer_is_one_line(kind: str, silent_host: str) -> None:
    host = f"http://127.0.0.1:{free_ports(1)[0]}" if kind == "refused" else silent_host
    proc = _tli("pipeline", "submit", "--host", host, "--connect-timeout-s", "2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Kubeflow Pipelines API" in err, err
    assert host.split("//")[1] in err
    assert ("no answer within 2 s" in err) == (kind == "silent"), err


def test_submit_says_what_to_give_and_never_shows_a_token(tmp_path: Path) -> None:
    proc = _tli("pipeline", "submit")
    assert proc.returncode == 2 and "give --host" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    empty = tmp_path / "token"
    empty.write_text("\n")
    for flag, path, what in (("--token-file", tmp_path / "none", "cannot read"),
                             ("--token-file", empty, "is empty")):  # fmt: skip
        proc = _tli("pipeline", "submit", "--host", "http://127.0.0.1:1", flag, str(path))
        assert proc.returncode == 2 and what in proc.stderr, proc.stderr
    secret = tmp_path / "secret"
    secret.write_text("TOKEN-" + "s3cr3t" * 4)
    (closed,) = free_ports(1)
    proc = _tli("pipeline", "submit", "--host", f"http://127.0.0.1:{closed}", "--token-file",
                str(secret), "--connect-timeout-s", "2")  # fmt: skip
    assert proc.returncode == 2 and "s3cr3t" not in proc.stdout + proc.stderr


def test_following_a_run_prints_each_step_state_once_until_the_end(capsys) -> None:
    import kfp_server_api as api

    from pipelines.local import follow_run

    def task(name: str, state: str) -> api.V2beta1PipelineTaskDetail:
        return api.V2beta1PipelineTaskDetail(display_name=name, state=state)

    states = [
        ("RUNNING", [task("import base", "RUNNING")]),
        ("RUNNING", [task("import base", "RUNNING")]),
        ("RUNNING", [task("import base", "SUCCEEDED"), task("data", "RUNNING")]),
        ("FAILED", [task("import base", "SUCCEEDED"), task("data", "FAILED")]),
    ]

    class Scripted:  # stands in for kfp.Client: only get_run, with KFP's own objects
        _uihost = "http://ui:8080"

        def get_run(self, run_id: str) -> api.V2beta1Run:
            state, tasks = states.pop(0)
            return api.V2beta1Run(run_id=run_id, state=state,
                                  run_details=api.V2beta1RunDetails(task_details=tasks))  # fmt: skip

    assert follow_run(Scripted(), "r1", poll_s=0) == "FAILED"
    lines = [x.split() for x in capsys.readouterr().out.splitlines()]
    assert lines == [["import", "base", "RUNNING"], ["import", "base", "SUCCEEDED"],
                     ["data", "RUNNING"], ["data", "FAILED"]]  # fmt: skip


def test_a_step_in_a_pod_without_a_job_api_refuses_to_run_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tli.pipeline.runner import run_component

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with pytest.raises(TliError, match="ray_jobs") as e:
        run_component("import-base", store=str(tmp_path / "store"), ray_jobs=None,
                      sections={"base": "{}"}, inputs={}, rerun=[],
                      output=str(tmp_path / "out.json"))  # fmt: skip
    assert "\n" not in str(e.value) and CLUSTER_JOBS_API in str(e.value)
    assert not (tmp_path / "store").exists() and not (tmp_path / "out.json").exists()
