"""tli.tracking against real stores: MLflow ``file:`` and ``sqlite:`` stores, a real ``mlflow server``
on 127.0.0.1, TensorBoard event files read back byte by byte, and a tiny real Ray Tune search.

Every check reads back what was written (``MlflowClient``, the event files) and compares it with
the records it came from: same runs, names, tags, nesting, params, and every metric history
point for point (steps, values, timestamps).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tli import tracking
from tli.errors import TliError

# Read when mlflow is first imported (by the client reading back): no phoning home from tests.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parents[1]
VERSION = "a83d030fd66ac503"
TAGS = tracking.stage_tags("train", VERSION, pipeline_run_id="run-7", pipeline_run_name="demo")
FLOAT_MAX = sys.float_info.max  # SQL stores keep +-inf as +-max float

CONFIG = {
    "train": {"lr": 0.001, "steps": 200, "bf16": True, "freeze": "original", "resume": None},
    "inject": {"method": "tli", "interval": 5, "init": "identity", "positions": [5, 11]},
    "data": {"seq_len": 128, "notes": "x" * 7000},
    "big": {f"p{i:03d}": i for i in range(150)},  # > 100 params: several log_batch calls
}
# What MLflow must hold: written out by hand, not computed by the code under test.
CONFIG_PARAMS = {
    "train.lr": "0.001",
    "train.steps": "200",
    "train.bf16": "True",
    "train.freeze": "original",
    "inject.method": "tli",
    "inject.interval": "5",
    "inject.init": "identity",
    "inject.positions": "[5, 11]",
    "data.seq_len": "128",
    "data.notes": "x" * 6000,  # MLflow's param value limit
    **{f"big.p{i:03d}": str(i) for i in range(150)},
}


def train_history(steps: int = 200) -> list[dict[str, Any]]:
    """Records shaped like tli train's: 200 steps x 7 metrics = 1400 points (> 1000 per batch)."""
    t0 = 1_764_000_000.0
    out = []
    for s in range(steps):
        rec = {
            "step": s,
            "loss": 3.5 - 0.004 * s + 0.01 * math.sin(s),
            "lr": 0.001 * min(1.0, (s + 1) / 10),
            "grad_norm": 1.0 / (s + 1) ** 0.5,
            "tokens": 512 * (s + 1),
            "tokens_per_s": 300.0 + s / 7,
            "mfu": None if s % 2 else 0.0123 + s * 1e-6,  # None on odd steps: skipped
            "elapsed": 1.5 * (s + 1),
            "wall_time": t0 + 1.5 * (s + 1) + 0.000123 * s,
        }
        if s % 50 == 49:
            rec["val_loss"] = 3.3 - 0.002 * s
        out.append(rec)
    return out


FINAL = {
    "final_loss": 2.71,
    "final_val_loss": 2.9,
    "steps": 200,
    "tokens": 102400,
    "train_seconds": 300.0,
}

TRIALS = [
    {
        "name": "K5-identity-lr0.001",
        "params": {"interval": 5, "init": "identity", "alpha": None, "lr": 0.001, "steps": 20},
        "status": "completed",
        "history": [
            {"step": 10, "loss": 3.1, "val_loss": 3.2, "objective": 3.2, "nonfinite": False},
            {"step": 20, "loss": 2.9, "val_loss": 3.0, "objective": 3.0, "nonfinite": False},
        ],
    },
    {
        "name": "K5-alpha-lr0.003",
        "params": {"interval": 5, "init": "alpha", "alpha": 0.5, "lr": 0.003, "steps": 20},
        "status": "stopped",
        "history": [
            {"step": 10, "loss": 3.4, "val_loss": 3.5, "objective": 3.5, "nonfinite": False}
        ],
    },
    {
        "name": "K10-copy-lr0.001",
        "params": {"interval": 10, "init": "copy", "alpha": None, "lr": 0.001, "steps": 20},
        "status": "failed",
        "error": "non-finite loss at step 10",
        "history": [
            {
                "step": 10,
                "loss": math.nan,
                "val_loss": math.nan,
                "objective": math.inf,
                "nonfinite": True,
            }
        ],
    },
]
TRIAL_PARAMS = {
    "K5-identity-lr0.001": {"interval": "5", "init": "identity", "lr": "0.001", "steps": "20"},
    "K5-alpha-lr0.003": {
        "interval": "5",
        "init": "alpha",
        "alpha": "0.5",
        "lr": "0.003",
        "steps": "20",
    },
    "K10-copy-lr0.001": {"interval": "10", "init": "copy", "lr": "0.001", "steps": "20"},
}
TRIAL_STATUS = {
    "K5-identity-lr0.001": "FINISHED",
    "K5-alpha-lr0.003": "FINISHED",
    "K10-copy-lr0.001": "FAILED",
}

RESULTS = {
    "results": {
        "arc_easy": {
            "alias": "arc_easy",
            "acc,none": 0.48,
            "acc_stderr,none": 0.0714,
            "acc_norm,none": 0.44,
            "acc_norm_stderr,none": 0.0709,
        },
        "lambada_openai": {
            "alias": "lambada",
            "acc,none": 0.34,
            "acc_stderr,none": "N/A",
            "perplexity,none": 25.25,
        },
        "gsm8k": {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.12},
    },
    "n-samples": {
        "arc_easy": {"original": 2376, "effective": 50},
        "lambada_openai": {"original": 5153, "effective": 50},
    },
    "config": {"model": "hf", "limit": 50},
}
HELDOUT = {
    "loss": 2.75,
    "perplexity": 15.642,
    "bits_per_byte": 1.0123,
    "tokens": 8192,
    "blocks": 32,
    "seq_len": 256,
}
EVAL_METRICS = {
    "arc_easy/acc": 0.48,
    "arc_easy/acc_stderr": 0.0714,
    "arc_easy/acc_norm": 0.44,
    "arc_easy/acc_norm_stderr": 0.0709,
    "arc_easy/n_samples": 50.0,
    "lambada_openai/acc": 0.34,
    "lambada_openai/perplexity": 25.25,
    "lambada_openai/n_samples": 50.0,
    "gsm8k/strict-match/exact_match": 0.1,
    "gsm8k/flexible-extract/exact_match": 0.12,
    "heldout/loss": 2.75,
    "heldout/perplexity": 15.642,
    "heldout/bits_per_byte": 1.0123,
    "heldout/tokens": 8192.0,
    "heldout/blocks": 32.0,
    "heldout/seq_len": 256.0,
}


# --------------------------------------------------------------------------------------------
# Helpers: stores, read-back, comparisons


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating one runs MLflow's migrations: ~10 s)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow_db') / 'mlflow.db'}"


@pytest.fixture(params=["file", "sqlite"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str]:
    """(tracking URI, a fresh experiment name) for a file store and a SQLite store."""
    # The reading client needs this too: MLflow 3.x refuses file stores without it.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    if request.param == "file":
        uri = (tmp_path / "mlruns").as_uri()
    else:
        uri = request.getfixturevalue("sqlite_uri")
    return uri, f"exp-{request.node.name}"


def client_for(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_of(client: Any, experiment: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} was not created"
    return client.search_runs([exp.experiment_id], max_results=1000)


def same_value(got: float, want: float, sql: bool) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    if math.isinf(want) and sql:
        return got == math.copysign(FLOAT_MAX, want)
    return got == want


def assert_histories(
    client: Any,
    run_id: str,
    records: Sequence[Mapping[str, Any]],
    uri: str,
    skip: Sequence[str] = (),
) -> None:
    """Every metric of the run equals the records: same keys, steps, values and timestamps."""
    sql = not uri.startswith("file:")
    want: dict[str, list[tuple[int, float, int | None]]] = {}
    for rec in records:
        for key, value in rec.items():
            if key in ("step", "wall_time", *skip) or value is None or isinstance(value, bool):
                continue
            stamp = round(rec["wall_time"] * 1000) if "wall_time" in rec else None
            want.setdefault(key, []).append((rec["step"], float(value), stamp))
    run = client.get_run(run_id)
    have_keys = {k for k in run.data.metrics if k.split("/")[0] != "final"}
    assert have_keys == set(want), f"metric keys {sorted(have_keys)} != records' {sorted(want)}"
    for key, points in want.items():
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in hist] == [p[0] for p in points], f"{key}: steps differ"
        for m, (step, value, stamp) in zip(hist, points, strict=True):
            assert same_value(m.value, value, sql), f"{key} at step {step}: {m.value} != {value}"
            if stamp is not None:
                assert m.timestamp == stamp, (
                    f"{key} at step {step}: timestamp {m.timestamp} != {stamp}"
                )


# TensorBoard event files are TFRecords: u64 length, masked crc32c of it, data, masked crc32c.
def _masked_crc(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(folder: Path) -> list[Any]:
    """The events of the one event file in ``folder`` (checksums verified)."""
    from tensorboardX.proto.event_pb2 import Event

    files = sorted(folder.glob("events.out.tfevents.*"))
    assert len(files) == 1, f"expected one event file in {folder}, found {files}"
    data, pos, events = files[0].read_bytes(), 0, []
    while pos < len(data):
        head = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", head)
        (head_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        body = data[pos + 12 : pos + 12 + length]
        (body_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert head_crc == _masked_crc(head) and body_crc == _masked_crc(body), "bad checksum"
        events.append(Event.FromString(body))
        pos += 16 + length
    assert events and events[0].file_version == "brain.Event:2"
    return events


def scalars(events: Sequence[Any]) -> dict[str, list[tuple[int, float, float]]]:
    """tag -> [(step, value, wall_time)] of the scalar summaries."""
    out: dict[str, list[tuple[int, float, float]]] = {}
    for ev in events:
        for v in ev.summary.value:
            if v.metadata.plugin_data.plugin_name == "scalars":
                assert v.tensor.dtype == 2, (
                    "scalars must be DT_DOUBLE"
                )  # types.proto: DT_DOUBLE = 2
                out.setdefault(v.tag, []).append((ev.step, v.tensor.double_val[0], ev.wall_time))
    return out


def tb_expected(records: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float, float]]]:
    out: dict[str, list[tuple[int, float, float]]] = {}
    for rec in records:
        for key, value in rec.items():
            if key in ("step", "wall_time") or value is None or isinstance(value, bool):
                continue
            out.setdefault(key, []).append((rec["step"], float(value), rec["wall_time"]))
    return out


def hparams_of(events: Sequence[Any]) -> tuple[dict[str, Any], int]:
    """(hyperparameters, session-end status) from the HParams plugin's summaries."""
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    params: dict[str, Any] = {}
    status = None
    for ev in events:
        for v in ev.summary.value:
            if v.metadata.plugin_data.plugin_name != "hparams":
                continue
            data = HParamsPluginData.FromString(v.metadata.plugin_data.content)
            if data.HasField("session_start_info"):
                for k, val in data.session_start_info.hparams.items():
                    params[k] = getattr(val, val.WhichOneof("kind"))
            if data.HasField("session_end_info"):
                status = data.session_end_info.status
    assert status is not None, "no hparams session end"
    return params, status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Pure parts


def test_tracking_uri_is_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(None) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "  ")
    assert tracking.tracking_uri(None) is None  # blank = unset
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(None) == "http://127.0.0.1:5000"
    assert tracking.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"  # the config wins


def test_mask_uri_hides_credentials() -> None:
    assert tracking.mask_uri("http://u:p4ss@host:5000/x") == "http://***@host:5000/x"
    assert tracking.mask_uri("https://token@h") == "https://***@h"
    assert tracking.mask_uri("sqlite:///a/b.db") == "sqlite:///a/b.db"
    msg = "to http://a:b@h1 failed; tried https://c:d@h2/api"
    assert tracking.mask_uri(msg) == "to http://***@h1 failed; tried https://***@h2/api"


def test_flatten_params_and_eval_metrics() -> None:
    flat = tracking.flatten_params(CONFIG)
    assert {k: tracking.param_value(v)[:6000] for k, v in flat.items()} == CONFIG_PARAMS
    assert tracking.eval_metrics(RESULTS, HELDOUT) == EVAL_METRICS
    assert tracking.record_metrics(
        {"step": 3, "wall_time": 1.0, "a": 1, "b": None, "c": True, "d": "x"}
    ) == {"a": 1.0}


def test_tracking_off_imports_and_writes_nothing(tmp_path: Path) -> None:
    """No URI: every entry point returns at once; mlflow, tensorboardX and ray stay unimported."""
    code = textwrap.dedent(
        """
        import sys
        from tli import tracking as t
        uri = t.tracking_uri(None)
        assert uri is None
        got = [
            t.log_train(uri, run_name="r", params={"a": 1}, history=[{"step": 0, "loss": 1.0}],
                        final={"final_loss": 1.0}, tags={}),
            t.log_tune(uri, search_name="s", params={}, trials=[], best=None, tags={}),
            t.log_eval(uri, run_name="e", results={}, heldout={"loss": 1.0}, tags={}),
            t.open_tracker(uri),
        ]
        assert got == [None, None, None, None], got
        assert t.tune_callbacks(uri, search_name="s", tags={}) == []
        heavy = sorted({m.split(".")[0] for m in sys.modules} & {"mlflow", "tensorboardX", "ray"})
        assert not heavy, heavy
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == [], "tracking off wrote files"


# --------------------------------------------------------------------------------------------
# MLflow stores


def test_log_train_equals_records(store: tuple[str, str]) -> None:
    uri, exp = store
    history = train_history()
    handle = tracking.log_train(
        uri,
        run_name="train",
        params=CONFIG,
        history=history,
        final=FINAL,
        tags=TAGS,
        experiment=exp,
    )
    assert handle is not None and handle.mlflow_run_id and not handle.reused
    client = client_for(uri)
    (run,) = runs_of(client, exp)
    assert run.info.run_id == handle.mlflow_run_id
    assert run.info.run_name == "train" and run.info.status == "FINISHED"
    assert {k: v for k, v in run.data.tags.items() if k.startswith("tli.")} == TAGS
    assert run.data.params == CONFIG_PARAMS
    assert_histories(client, run.info.run_id, history, uri)
    # mfu was None on odd steps: those steps are absent, not zero
    assert [m.step for m in client.get_metric_history(run.info.run_id, "mfu")] == list(
        range(0, 200, 2)
    )
    finals = {k: v for k, v in run.data.metrics.items() if k.startswith("final/")}
    assert finals == {
        "final/loss": 2.71,
        "final/val_loss": 2.9,
        "final/steps": 200.0,
        "final/tokens": 102400.0,
        "final/train_seconds": 300.0,
    }
    assert client.get_metric_history(run.info.run_id, "final/loss")[0].step == 199
    # The run spans the training: start = first step's end minus its elapsed, end = last step's
    assert run.info.start_time == round((history[0]["wall_time"] - history[0]["elapsed"]) * 1000)
    assert run.info.end_time == round(history[-1]["wall_time"] * 1000)

    # The same stage version again (a retried component): the finished run is returned
    again = tracking.log_train(
        uri,
        run_name="train",
        params=CONFIG,
        history=history,
        final=FINAL,
        tags=TAGS,
        experiment=exp,
    )
    assert again is not None and again.reused and again.mlflow_run_id == handle.mlflow_run_id
    assert len(runs_of(client, exp)) == 1
    # Another pipeline run of the same version is a run of its own
    other = {**TAGS, tracking.TAG_PIPELINE_RUN_ID: "run-8"}
    third = tracking.log_train(
        uri,
        run_name="train",
        params=CONFIG,
        history=history[:3],
        final=None,
        tags=other,
        experiment=exp,
    )
    assert third is not None and not third.reused
    assert len(runs_of(client, exp)) == 2


def test_log_tune_nests_trials(store: tuple[str, str]) -> None:
    uri, exp = store
    tags = tracking.stage_tags("tune", VERSION)
    search = {"tune": {"intervals": [5, 10], "lrs": [0.001, 0.003], "asha": True}}
    parent = tracking.log_tune(
        uri,
        search_name="tune",
        params=search,
        trials=TRIALS,
        best="K5-identity-lr0.001",
        tags=tags,
        experiment=exp,
    )
    assert parent is not None
    client = client_for(uri)
    runs = {r.info.run_name: r for r in runs_of(client, exp)}
    assert set(runs) == {"tune", *TRIAL_PARAMS}
    top = runs["tune"]
    assert top.info.run_id == parent.mlflow_run_id and top.info.status == "FINISHED"
    assert tracking.TAG_PARENT not in top.data.tags
    assert top.data.tags[tracking.TAG_BEST_TRIAL] == "K5-identity-lr0.001"
    assert top.data.params == {
        "tune.intervals": "[5, 10]",
        "tune.lrs": "[0.001, 0.003]",
        "tune.asha": "True",
    }
    assert top.data.metrics == {}
    for trial in TRIALS:
        run = runs[trial["name"]]
        assert run.data.tags[tracking.TAG_PARENT] == parent.mlflow_run_id
        assert run.data.tags[tracking.TAG_TRIAL_STATUS] == trial["status"]
        assert run.data.tags[tracking.TAG_VERSION] == VERSION
        assert run.info.status == TRIAL_STATUS[trial["name"]]
        assert run.data.params == TRIAL_PARAMS[trial["name"]]
        assert run.data.tags.get(tracking.TAG_ERROR) == trial.get("error")
        assert_histories(client, run.info.run_id, trial["history"], uri)


def test_log_eval_equals_results(store: tuple[str, str]) -> None:
    uri, exp = store
    tags = tracking.stage_tags("eval", VERSION)
    handle = tracking.log_eval(
        uri, run_name="eval-trained", results=RESULTS, heldout=HELDOUT, tags=tags, experiment=exp,
        params={"eval": {"tasks": ["arc_easy", "lambada_openai"], "limit": 50}},
    )  # fmt: skip
    assert handle is not None
    client = client_for(uri)
    (run,) = runs_of(client, exp)
    assert run.info.run_name == "eval-trained" and run.info.status == "FINISHED"
    assert run.data.metrics == EVAL_METRICS
    assert run.data.params == {"eval.tasks": '["arc_easy", "lambada_openai"]', "eval.limit": "50"}
    for key in EVAL_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0]


def test_fan_out_and_failed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow and TensorBoard together; a run that raises ends FAILED in both."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    tracker = tracking.open_tracker(uri, tmp_path / "tb", experiment="fan")
    assert isinstance(tracker, tracking.FanOutTracker)
    records = train_history(5)
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.tracked_run(
            tracker, "train", params={"train": {"lr": 0.001}}, tags=TAGS
        ) as handle:
            assert handle.mlflow_run_id and handle.tensorboard_dir == tmp_path / "tb"
            tracker.log_history(records[:3])
            for rec in records[3:]:
                tracker.log_metrics(
                    tracking.record_metrics(rec), rec["step"], wall_time=rec["wall_time"]
                )
            raise RuntimeError("boom")
    client = client_for(uri)
    (run,) = runs_of(client, "fan")
    assert run.info.status == "FAILED" and run.data.params == {"train.lr": "0.001"}
    assert_histories(client, run.info.run_id, records, uri)
    events = read_events(tmp_path / "tb")
    assert scalars(events) == tb_expected(records)
    params, status = hparams_of(events)
    assert params == {"train.lr": 0.001} and status == 2  # STATUS_FAILURE
    # A second run into the same folder would mix two runs: refused
    with pytest.raises(TliError, match="already has TensorBoard event files"):
        tracking.tensorboard_train(tmp_path / "tb", records)


def test_unreachable_server_is_one_quick_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed port: one TliError line, credentials masked (MLflow alone retries ~4 minutes)."""
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    uri = f"http://tli:s3cret@127.0.0.1:{free_port()}"
    with pytest.raises(TliError) as err:
        tracking.log_eval(uri, run_name="e", results=RESULTS, heldout=HELDOUT, tags={})
    msg = str(err.value)
    assert "\n" not in msg and "s3cret" not in msg and "tli:" not in msg, msg
    assert (
        "http://***@127.0.0.1" in msg and "does not answer" in msg and "Connection refused" in msg
    ), msg
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained URI
    # tli's bounds are lifted again afterwards
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


# --------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_train_equals_records_and_is_deterministic(tmp_path: Path) -> None:
    history = train_history(30)
    a = tracking.tensorboard_train(
        tmp_path / "a", history, params={"train": {"lr": 0.001, "bf16": True}}
    )
    b = tracking.tensorboard_train(
        tmp_path / "b", history, params={"train": {"lr": 0.001, "bf16": True}}
    )
    ev_a, ev_b = read_events(a), read_events(b)
    assert scalars(ev_a) == tb_expected(history)  # exact float64 values, steps, wall times
    assert hparams_of(ev_a) == ({"train.lr": 0.001, "train.bf16": True}, 1)  # STATUS_SUCCESS
    # Same records, same bytes: only the file-version event carries the time of writing
    assert [e.SerializeToString() for e in ev_a[1:]] == [e.SerializeToString() for e in ev_b[1:]]


def test_tensorboard_tune_one_folder_per_trial(tmp_path: Path) -> None:
    root = tracking.tensorboard_tune(tmp_path / "tb", TRIALS)
    assert sorted(p.name for p in root.iterdir()) == sorted(TRIAL_PARAMS)
    for trial in TRIALS:
        events = read_events(root / trial["name"])
        got = scalars(events)
        assert set(got) == {"loss", "val_loss", "objective"}  # the bool "nonfinite" is no series
        for key, points in got.items():
            want = [(r["step"], r[key]) for r in trial["history"]]
            assert [s for s, _, _ in points] == [s for s, _ in want], (trial["name"], key)
            for (_, value, _), (_, expected) in zip(points, want, strict=True):
                assert same_value(value, expected, sql=False), (trial["name"], key, value)
        params, status = hparams_of(events)
        expected_params = {k: v for k, v in trial["params"].items() if v is not None}
        assert params == {**expected_params, "status": trial["status"]}
        assert status == (2 if trial["status"] == "failed" else 1)  # FAILURE / SUCCESS


# --------------------------------------------------------------------------------------------
# A real MLflow server


def _server_command() -> list[str] | None:
    """An ``mlflow`` executable that has the server: $TLI_MLFLOW_SERVER, .venv-mlflow, this venv."""
    candidates = [
        os.environ.get("TLI_MLFLOW_SERVER"),
        str(ROOT / ".venv-mlflow" / "bin" / "mlflow"),
    ]
    try:
        import flask  # noqa: F401  (full mlflow in this venv: its own CLI serves)

        candidates.append(str(Path(sys.executable).parent / "mlflow"))
    except ImportError:
        pass
    for exe in candidates:
        if exe and os.access(exe, os.X_OK):
            return [exe]
    return None


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """``mlflow server`` on a free 127.0.0.1 port, in its own session; stopped by its process id."""
    cmd = _server_command()
    if cmd is None:
        pytest.skip(
            "no mlflow server: create .venv-mlflow with mlflow==3.17.2 (or set TLI_MLFLOW_SERVER)"
        )
    port = free_port()
    log = tmp_path / "server.log"
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*cmd, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--default-artifact-root", str(tmp_path / "artifacts")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300  # a wait limit, not a timing check: it starts in ~30 s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.read().strip() == b"OK":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        # Its own session: the process group is exactly the server and its workers.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_real_mlflow_server(mlflow_server: str) -> None:
    """All three stages through HTTP, with credentials in the URI (masked in the run URL)."""
    uri = f"http://tli:s3cret@{mlflow_server}"  # the server has no auth: it ignores them
    history = train_history(40)
    train = tracking.log_train(
        uri,
        run_name="train",
        params=CONFIG,
        history=history,
        final=FINAL,
        tags=TAGS,
        experiment="srv",
    )
    parent = tracking.log_tune(
        uri,
        search_name="tune",
        params={},
        trials=TRIALS,
        best="K5-identity-lr0.001",
        tags=TAGS,
        experiment="srv",
    )
    ev = tracking.log_eval(
        uri, run_name="eval", results=RESULTS, heldout=HELDOUT, tags=TAGS, experiment="srv"
    )
    assert train is not None and parent is not None and ev is not None
    assert (
        train.url
        == f"http://***@{mlflow_server}/#/experiments/{train.mlflow_experiment_id}/runs/{train.mlflow_run_id}"
    )
    client = client_for(f"http://{mlflow_server}")
    runs = {r.info.run_name: r for r in runs_of(client, "srv")}
    assert set(runs) == {"train", "tune", "eval", *TRIAL_PARAMS}
    assert runs["train"].data.params == CONFIG_PARAMS
    assert_histories(client, train.mlflow_run_id, history, "http://")
    for trial in TRIALS:
        run = runs[trial["name"]]
        assert run.data.tags[tracking.TAG_PARENT] == parent.mlflow_run_id
        assert_histories(client, run.info.run_id, trial["history"], "http://")
    assert runs["eval"].data.metrics == EVAL_METRICS


# --------------------------------------------------------------------------------------------
# Ray Tune, live


def test_tune_callbacks_log_trials_live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real 2-trial Tune search: one nested run per trial, histories at the reported steps."""
    from tests._ray import local_ray

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()

    def trainable(config: dict) -> None:
        from ray import tune

        lr = config["point"]["lr"]
        for step in (0, 2, 4):  # not Tune's iterations 1, 2, 3
            loss = 3.0 - lr * step
            tune.report({"step": step, "loss": loss, "val_loss": loss + 0.1, "objective": loss + 0.1,
                         "wall_time": 1_764_000_000.0 + step + lr})  # fmt: skip

    def expected(lr: float) -> list[dict[str, float]]:
        return [
            {"step": s, "loss": 3.0 - lr * s, "val_loss": 3.0 - lr * s + 0.1,
             "objective": 3.0 - lr * s + 0.1, "wall_time": 1_764_000_000.0 + s + lr}
            for s in (0, 2, 4)
        ]  # fmt: skip

    tags = tracking.stage_tags("tune", VERSION)
    with local_ray("trk"):
        from ray import tune

        callbacks = tracking.tune_callbacks(
            uri,
            experiment="live",
            search_name="search",
            tags=tags,
            params={"tune": {"asha": False}},
        )
        name = lambda trial: trial.config["point"]["name"]  # noqa: E731
        tuner = tune.Tuner(
            trainable,
            param_space={
                "point": tune.grid_search(
                    [{"name": "a-lr0.1", "lr": 0.1}, {"name": "b-lr0.2", "lr": 0.2}]
                )
            },
            tune_config=tune.TuneConfig(trial_name_creator=name, trial_dirname_creator=name),
            run_config=tune.RunConfig(
                name="search", storage_path=str(tmp_path / "ray"), callbacks=callbacks, verbose=0
            ),
        )
        grid = tuner.fit()
        assert not grid.errors
    client = client_for(uri)
    runs = {r.info.run_name: r for r in runs_of(client, "live")}
    assert set(runs) == {"search", "a-lr0.1", "b-lr0.2"}
    parent = runs["search"]
    assert parent.info.status == "FINISHED" and parent.data.params == {"tune.asha": "False"}
    for trial, lr in (("a-lr0.1", 0.1), ("b-lr0.2", 0.2)):
        run = runs[trial]
        assert run.info.status == "FINISHED"
        assert run.data.tags[tracking.TAG_PARENT] == parent.info.run_id
        assert run.data.tags[tracking.TAG_VERSION] == VERSION
        assert run.data.params == {"point.name": trial, "point.lr": str(lr)}
        # Only what the trial reported: Ray's bookkeeping (time_this_iter_s, pid...) stays out
        assert_histories(client, run.info.run_id, expected(lr), uri)


def test_tune_callbacks_survive_pickling() -> None:
    """Tune pickles its run config (callbacks included) for resuming."""
    import ray.cloudpickle as pickle

    (cb,) = tracking.tune_callbacks("sqlite:////nonexistent/x.db", search_name="s", tags={"a": "b"})
    clone = pickle.loads(pickle.dumps(cb))
    assert (clone.uri, clone.search_name, clone.tags) == (
        "sqlite:////nonexistent/x.db",
        "s",
        {"a": "b"},
    )


def test_bad_records_are_refused_before_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    bad = [{"step": 0, "loss": 1.0}, {"loss": 0.9}]
    with pytest.raises(TliError, match="integer 'step'"):
        tracking.log_train(
            uri, run_name="r", params={}, history=bad, final=None, tags=TAGS, experiment="bad"
        )
    with pytest.raises(TliError, match="integer 'step'"):
        tracking.log_tune(
            uri,
            search_name="s",
            params={},
            trials=[{"name": "t", "history": bad}],
            best=None,
            tags=TAGS,
            experiment="bad",
        )
    assert runs_of(client_for(uri), "bad") == []  # nothing half-logged
    with pytest.raises(TliError, match="integer 'step'"):
        tracking.tensorboard_train(tmp_path / "tb", [{"step": 1.5, "loss": 1.0}])
