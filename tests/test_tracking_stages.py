"""Tracking wired into the stages: real train, tune and eval runs (tiny model) logged to real MLflow
stores (SQLite, a ``file:`` store, a real ``mlflow server``) and TensorBoard event files.

Every check reads back what was logged and compares it with what the stage itself wrote: the
train stage's ``metrics.jsonl`` and ``tli_train.json``, Ray Tune's own ``result.json`` of each
trial and the tune stage's ``trials.csv``, the eval stage's ``results.json`` and
``heldout.json``. Runs through :func:`tli.pipeline.runner.run_component` (what a KFP step calls)
carry the stage's store version and the pipeline run's name and id as tags.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from tests.test_tracking import (  # noqa: F401  (mlflow_server is a fixture)
    assert_histories,
    client_for,
    mlflow_server,
    read_events,
    runs_of,
    scalars,
)
from tli import tracking
from tli.config import RunConfig, Runtime, TrainConfig
from tli.errors import TliError
from tli.pipeline.runner import run_component
from tli.pipeline.store import Store

SEQ = 32
VERSION = "0123456789abcdef"
RUN = {"name": "tli-depth-upscaling-2026-12-01-12-00-00-000000", "id": "7f3c-run-uuid"}
TRAIN = {"steps": 4, "seq_len": SEQ, "batch_size": 2, "warmup": 1, "lr": 3e-3,
         "validation": {"blocks": 2, "every": 2}}  # fmt: skip
EVAL = {
    "tasks": ["arc_easy"],
    "limit": 4,
    "batch_size": 4,
    "heldout": {"blocks": 2, "seq_len": SEQ},
}
DATA = {"sources": [], "val_fraction": 0.1, "heldout_fraction": 0.1}


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating one runs MLflow's migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def ray_here():
    """A local Ray for this module, started the way the stages start it (with its dashboard)."""
    from tli.rayenv import session

    with session(None):
        yield


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _tli_tags(run: Any) -> dict[str, str]:
    return {k: v for k, v in run.data.tags.items() if k.startswith("tli.")}


# ---------------------------------------------------------------------------- train


def test_train_logs_its_records(ray_here, sqlite_uri, tiny_injected_dir, corpus, tmp_path) -> None:
    """Params = the resolved train section; every metrics.jsonl point; final = tli_train.json."""
    from tli.train.stage import run_train

    cfg = TrainConfig(**TRAIN)
    settings = tracking.stage_tracking(
        {"mlflow_uri": sqlite_uri, "experiment": "train", "tensorboard": str(tmp_path / "tb")},
        stage="train", version=VERSION,
    )  # fmt: skip
    with tracking.tracking_stage(settings):
        out = run_train(tiny_injected_dir, tmp_path / "out", corpus, cfg,
                        runtime=Runtime(threads=1, report_every=1))  # fmt: skip
    history = _jsonl(out / "metrics.jsonl")
    result = json.loads((out / "tli_train.json").read_text())["result"]
    client = client_for(sqlite_uri)
    (run,) = runs_of(client, "train")
    assert run.info.run_name == f"train-{VERSION[:8]}" and run.info.status == "FINISHED"
    assert _tli_tags(run) == {"tli.stage": "train", "tli.version": VERSION}
    params = tracking.flatten_params({"train": cfg.model_dump(mode="json")})
    assert {k: v for k, v in run.data.params.items() if k.startswith("train.")} == {
        k: tracking.param_value(v) for k, v in params.items()
    }
    assert run.data.params["train.lr"] == "0.003" and run.data.params["model"] == "model"
    # loss, lr, tokens/s, grad norm, val_loss (on its steps only) ... exactly as recorded
    assert_histories(client, run.info.run_id, history, sqlite_uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [2, 4]
    finals = {k: v for k, v in run.data.metrics.items() if k.startswith("final/")}
    want = {f"final/{k.removeprefix('final_')}": float(v) for k, v in result.items()
            if v is not None}  # fmt: skip
    assert finals == want and finals["final/val_loss"] == history[-1]["val_loss"]
    # TensorBoard: the same points, float64-exact
    events = read_events(tmp_path / "tb" / "train" / VERSION)
    got = scalars(events)
    for key in ("loss", "lr", "tokens_per_s", "val_loss"):
        want_points = [(h["step"], float(h[key])) for h in history if h.get(key) is not None]
        assert [(s, v) for s, v, _ in got[key]] == want_points, key


# ---------------------------------------------------------------------------- tune


def _result_records(trial_dir: Path) -> list[dict[str, Any]]:
    """Ray Tune's own records of a trial, as the live logger sees them (tli's keys only)."""
    keep = []
    for rec in _jsonl(trial_dir / "result.json"):
        keep.append({k: v for k, v in rec.items() if k not in tracking._RAY_RESULT_KEYS})
    return keep


def test_tune_logs_one_nested_run_per_trial(
    ray_here, sqlite_uri, tiny_model_dir, corpus, tmp_path
) -> None:
    """Live runs per trial (histories = Ray's result.json), completed with tli's statuses and
    the best trial from trials.csv; TensorBoard: one folder per trial."""
    from tli.tune.stage import run_tune

    cfg = RunConfig.model_validate({
        "train": TRAIN,
        "tune": {"intervals": [2, 4], "asha": False, "concurrency": 2,
                 "trial": {"steps": 4, "validation": {"blocks": 2, "every": 2}}},
    })  # fmt: skip
    settings = tracking.stage_tracking(
        {"mlflow_uri": sqlite_uri, "experiment": "tune", "tensorboard": str(tmp_path / "tb")},
        stage="tune", version=VERSION,
    )  # fmt: skip
    with tracking.tracking_stage(settings):
        out = run_tune(tiny_model_dir, tmp_path / "tune", corpus, cfg,
                       runtime=Runtime(threads=1))  # fmt: skip
    with (out / "trials.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    client = client_for(sqlite_uri)
    runs = runs_of(client, "tune")
    (parent,) = [r for r in runs if tracking.TAG_PARENT not in r.data.tags]
    assert parent.info.run_name == f"tune-{VERSION[:8]}" and parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.TAG_BEST_TRIAL] == rows[0]["trial"]
    assert parent.data.params["tune.intervals"] == "[2, 4]"
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert set(children) == {r["trial"] for r in rows}
    for row in rows:
        run = children[row["trial"]]
        assert run.data.tags[tracking.TAG_PARENT] == parent.info.run_id
        assert run.data.tags[tracking.TAG_TRIAL_STATUS] == row["status"] == "completed"
        assert run.data.tags[tracking.TAG_VERSION] == VERSION
        assert run.info.status == "FINISHED"
        assert run.data.params["interval"] == row["interval"]
        assert float(run.data.params["lr"]) == float(row["lr"])
        assert run.data.params["steps"] == "4"
        records = _result_records(out / "ray" / row["trial"])
        assert [r["step"] for r in records] == [2, 4]
        assert_histories(client, run.info.run_id, records, sqlite_uri)
        # the objective the search ranked on, at the last step = trials.csv's
        last = client.get_metric_history(run.info.run_id, "objective")[-1]
        assert f"{last.value:.6g}" == row["objective"]  # trials.csv keeps 6 digits
        tb = scalars(read_events(tmp_path / "tb" / "tune" / VERSION / row["trial"]))
        assert [(s, v) for s, v, _ in tb["val_loss"]] == [(r["step"], r["val_loss"])
                                                          for r in records]  # fmt: skip


# ---------------------------------------------------------------------------- eval, as a KFP step


def _artifact(kind: str, path: Path) -> Any:
    """What a KFP step hands a component: kfp's own artifact class, at a local path."""
    from kfp import dsl

    return getattr(dsl, kind)(name=path.name, uri=str(path))


@pytest.fixture(scope="module")
def base_and_data(tiny_model_dir, corpus, tmp_path_factory) -> dict[str, Any]:
    """import-base and data versions in a store, through run_component (their JSON refs)."""
    d = tmp_path_factory.mktemp("evalstore")
    store = d / "store"
    refs = {}
    for stage, sections, inputs in (
        ("import-base", {"base": {"model": str(tiny_model_dir)}}, {}),
        ("data", {"data": {**DATA, "extra": [str(corpus)]}}, {"base": "import-base"}),
    ):
        refs[stage] = d / f"{stage}.json"
        run_component(stage, store=str(store), ray_jobs=None, sections=sections,
                      inputs={k: str(refs[v]) for k, v in inputs.items()}, rerun=[],
                      output=str(refs[stage]))  # fmt: skip
    return {"store": store, "refs": refs, "dir": d}


def _eval_step(data: dict[str, Any], tracking_cfg: dict[str, Any], tag: str, limit: int = 4):
    """The eval step as a KFP component runs it (another ``limit``: another version)."""
    d, refs = data["dir"], data["refs"]
    out = d / tag
    out.mkdir()
    result, metrics = _artifact("Artifact", out / "result"), _artifact("Metrics", out / "metrics")
    md = run_component(
        "eval", store=str(data["store"]), ray_jobs=None,
        sections={"eval": json.dumps({**EVAL, "limit": limit}),
                  "tracking": json.dumps(tracking_cfg)},
        inputs={"model": str(refs["import-base"]), "data": str(refs["data"])}, rerun=[],
        output=result.path, runtime="{}", pipeline_run=RUN,
        artifacts={"ref": result, "metrics": metrics},
    )  # fmt: skip
    ref = json.loads(Path(result.path).read_text())
    return md, ref, metrics


def _check_eval_run(
    uri: str, experiment: str, ref: dict[str, Any], store: Path, limit: int = 4
) -> Any:
    out = Path(ref["output"])
    results = json.loads((out / "results.json").read_text())
    heldout = json.loads((out / "heldout.json").read_text())
    client = client_for(uri)
    (run,) = runs_of(client, experiment)
    base_version = json.loads((store / "eval" / ref["version"] / "manifest.json").read_text())
    up = base_version["inputs"]["model"]
    assert run.info.run_name == f"eval-import-base-{up['version'][:8]}"
    assert _tli_tags(run) == {
        "tli.stage": "eval", "tli.version": ref["version"],
        "tli.pipeline_run_name": RUN["name"], "tli.pipeline_run_id": RUN["id"],
        "tli.input.model": f"import-base/{up['version']}",
        "tli.input.data": f"data/{base_version['inputs']['data']['version']}",
    }  # fmt: skip
    acc = results["results"]["arc_easy"]["acc,none"]
    assert run.data.metrics["arc_easy/acc"] == acc
    assert run.data.metrics["heldout/loss"] == heldout["loss"]
    assert run.data.metrics["heldout/perplexity"] == heldout["perplexity"]
    assert run.data.metrics == tracking.eval_metrics(results, heldout)
    assert run.data.params["eval.limit"] == str(limit)
    return run


def test_eval_step_logs_its_results_with_the_pipeline_run(
    base_and_data, sqlite_uri, monkeypatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = {"mlflow_uri": sqlite_uri, "experiment": "eval-sqlite", "tags": {"team": "tests"}}
    md, ref, metrics = _eval_step(base_and_data, cfg, "sqlite")
    run = _check_eval_run(sqlite_uri, "eval-sqlite", ref, base_and_data["store"])
    assert run.data.tags["team"] == "tests"
    # The step's Metrics artifact: the same names and values as the MLflow run
    assert metrics.metadata == run.data.metrics
    assert md["version"] == ref["version"] and md["stage"] == "eval"
    # Run again: cached, so the stage does not run and nothing new is logged
    _, again, _ = _eval_step(base_and_data, cfg, "sqlite-again")
    assert again["status"] == "cached" and len(runs_of(client_for(sqlite_uri), "eval-sqlite")) == 1


def test_eval_step_logs_to_a_file_store(base_and_data, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the reading client needs it too
    uri = (tmp_path / "mlruns").as_uri()
    # Another eval version (limit 3), so the stage runs again and logs to this store.
    _, ref, _ = _eval_step(base_and_data, {"mlflow_uri": uri, "experiment": "f"}, "file", 3)
    _check_eval_run(uri, "f", ref, base_and_data["store"], 3)


def test_eval_step_logs_to_an_mlflow_server(base_and_data, mlflow_server) -> None:  # noqa: F811
    uri = f"http://{mlflow_server}"
    _, ref, _ = _eval_step(base_and_data, {"mlflow_uri": uri, "experiment": "srv"}, "srv", 2)
    _check_eval_run(uri, "srv", ref, base_and_data["store"], 2)


def test_unreachable_server_fails_before_the_stage_runs(base_and_data, tmp_path) -> None:
    """A bad tracking URI is one line before any work: no eval version is stored."""
    from tli.rayenv import free_port

    before = Store(base_and_data["store"]).versions()
    cfg = {"mlflow_uri": f"http://127.0.0.1:{free_port()}", "experiment": "x"}
    with pytest.raises(TliError, match="does not answer") as e:
        _eval_step(base_and_data, cfg, "dead", 1)
    assert len(str(e.value).splitlines()) == 1
    assert Store(base_and_data["store"]).versions() == before


def test_tracking_is_not_in_any_version() -> None:
    """The tracking section changes no output: two configs differing only there hash the same."""
    from tli.pipeline.stages import STAGES

    a = RunConfig()
    b = RunConfig.model_validate({"tracking": {"mlflow_uri": "sqlite:///x.db", "tags": {"a": "b"},
                                               "tensorboard": "tb"}})  # fmt: skip
    for stage in STAGES.values():
        assert "tracking" not in stage.sections
        assert stage.params(a, {}) == stage.params(b, {}), stage.name
