"""Shared storage on S3 (a real SeaweedFS server on 127.0.0.1, tests/_s3.py).

Covered: an ``s3://`` base model and corpus through the store (versioned by content, not by
URI; nothing downloaded to work out a version when the prefix is a tli upload), Ray Train
checkpoints under ``--storage s3://`` (a worker failure resumes from them; none are left
afterwards), Tune's experiment state there (an interrupted search resumes keeping its finished
trial), and no credential in any file written, any object stored or any line printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests import _s3
from tests._s3 import S3Server
from tli import remote, sources
from tli.config import DataConfig, Runtime
from tli.pipeline.runner import run_stage
from tli.pipeline.store import Store

s3_server = _s3.s3_server  # fixtures
s3_env = _s3.s3_env

ROOT = Path(__file__).resolve().parents[1]
TLI = [sys.executable, "-m", "tli.cli"]
SMALL_TRAIN = ["--steps", "6", "--seq-len", "32", "--batch-size", "2", "--warmup", "1",
               "--validation-blocks", "2", "--threads", "1", "--report-every", "1",
               "--freeze", "none"]  # fmt: skip


def _bucket(server: S3Server) -> str:
    return server.make_bucket(f"t{secrets.token_hex(6)}")


def _secrets(server: S3Server) -> list[bytes]:
    return [server.secret_key.encode(), server.access_key.encode()]


def assert_no_credentials(server: S3Server, *roots: Path, texts: tuple[str, ...] = (),
                          buckets: tuple[str, ...] = ()) -> int:  # fmt: skip
    """No credential in any file under ``roots``, any of ``texts``, any object of ``buckets``.

    Returns how many files and objects were read (so a test can tell it looked at something).
    """
    seen = 0
    for root in roots:
        for f in [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]:
            data = f.read_bytes()
            seen += 1
            for s in _secrets(server):
                assert s not in data, f"a credential in {f}"
    for text in texts:
        for s in _secrets(server):
            assert s.decode() not in text, "a credential in the output"
    fs = server.filesystem()
    for bucket in buckets:
        for uri in remote.list(f"s3://{bucket}"):
            with fs.open_input_stream(uri[len("s3://") :], compression=None) as f:
                data = f.read()
            seen += 1
            for s in _secrets(server):
                assert s not in data, f"a credential in {uri}"
    return seen


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _env(server: S3Server, **extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    env.update(server.env())
    return env


# ---------------------------------------------------------------------------- inputs


def test_s3_base_model_and_corpus_are_versioned_by_content(
    s3_env: S3Server, tiny_model_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    bucket = _bucket(s3_env)
    model_uri = f"s3://{bucket}/models/tiny"
    remote.upload(tiny_model_dir, model_uri)
    corpus_uri = f"s3://{bucket}/data/{corpus.name}"
    remote.upload(corpus, corpus_uri)
    store = tmp_path / "store"

    local = run_stage("import-base", store=store, sections={"base": {"model": str(tiny_model_dir)}},
                      refs={})  # fmt: skip
    # Working out the version reads the upload's marker only: no model byte leaves the server.
    sent = s3_env.bytes_sent(bucket)
    assert sources.identify(model_uri) == Store(store).external_ref("x", tiny_model_dir).sha256
    assert s3_env.bytes_sent(bucket) - sent < 10_000
    from_s3 = run_stage("import-base", store=store, sections={"base": {"model": model_uri}},
                        refs={})  # fmt: skip
    # The same bytes: the same version, whatever the URI.
    assert (from_s3.version, from_s3.status) == (local.version, "cached")
    other = run_stage("import-base", store=tmp_path / "store2",
                      sections={"base": {"model": model_uri}}, refs={})  # fmt: skip
    assert other.version == local.version and other.status == "ran"
    assert _files(other.output) == _files(local.output)
    manifest = Store(tmp_path / "store2").manifest("import-base", other.version)
    digest = Store(store).manifest("import-base", local.version)["inputs"]["source"]["sha256"]
    assert manifest["sources"] == {model_uri: digest}  # where it came from, and what it held
    assert manifest["inputs"]["source"] == {"stage": None, "version": None, "sha256": digest,
                                            "path": model_uri}  # fmt: skip

    data_cfg = DataConfig(sources=[], extra=[corpus_uri]).model_dump(mode="json")
    data = run_stage(
        "data", store=store, sections={"data": data_cfg}, refs={"base": local.to_dict()}
    )
    corpus_manifest = json.loads((data.output / "manifest.json").read_text())
    assert corpus_manifest["config"]["extra"] == [corpus_uri]  # as given, not the cache path
    assert corpus_manifest["sources"][0]["name"] == corpus.name
    # The same corpus under another key: the same version; changed bytes: a new one.
    copy_uri = f"s3://{bucket}/elsewhere/{corpus.name}"
    remote.upload(corpus, copy_uri)
    same = run_stage("data", store=store, refs={"base": local.to_dict()},
                     sections={"data": {**data_cfg, "extra": [copy_uri]}})  # fmt: skip
    assert (same.version, same.status) == (data.version, "cached")
    changed = tmp_path / corpus.name
    changed.write_text(corpus.read_text() + '{"text": "one more record, a new one."}\n')
    remote.upload(changed, corpus_uri)
    new = run_stage(
        "data", store=store, sections={"data": data_cfg}, refs={"base": local.to_dict()}
    )
    assert new.version != data.version
    assert assert_no_credentials(s3_env, store, tmp_path / "store2") > 10


# ---------------------------------------------------------------------------- Ray state


def _train(server: S3Server, model: Path, corpus: Path, out: Path, *more: str,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    return subprocess.run(
        [*TLI, "train", "--model", str(model), "--data", str(corpus), "--out", str(out),
         *SMALL_TRAIN, *more],
        capture_output=True, text=True, env=env or _env(server), cwd=ROOT, timeout=900,
    )  # fmt: skip


@pytest.mark.slow
def test_train_checkpoints_on_s3_carry_a_worker_failure_to_the_same_weights(
    s3_env: S3Server, tiny_injected_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    bucket = _bucket(s3_env)
    storage = f"s3://{bucket}/ray"
    out = tmp_path / "trained"
    drills = {"TLI_DRILL": "train.step=3:raise-once", "TLI_DRILL_DIR": str(tmp_path / "d")}
    # The worker fails at step 3; Ray Train restarts it from the step-2 checkpoint on S3.
    proc = _train(
        s3_env,
        tiny_injected_dir,
        corpus,
        out,
        "--storage",
        storage,
        "--checkpoint-every",
        "2",
        "--max-failures",
        "1",
        env=_env(s3_env, **drills),
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "resuming from step 2" in text, text[-4000:]
    assert (tmp_path / "d").is_dir()  # the drill did fire
    assert s3_env.bytes_sent(bucket) > 0  # the restart read its checkpoint back from S3
    assert remote.list(storage) == []  # no checkpoint left behind on S3 ...
    assert not (out / "ray").exists()  # ... nor in the output
    # The same weights as an uninterrupted run with Ray's storage in the output folder.
    ref = tmp_path / "ref"
    proc = _train(s3_env, tiny_injected_dir, corpus, ref, "--checkpoint-every", "2")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    weights = [f for f in _files(ref / "model") if f.endswith(".safetensors")]
    assert weights and {f: _files(out / "model")[f] for f in weights} == {
        f: _files(ref / "model")[f] for f in weights
    }
    assert assert_no_credentials(s3_env, out, texts=(text,), buckets=(bucket,)) > 3


@pytest.mark.slow
def test_interrupted_search_on_s3_resumes_keeping_its_finished_trial(
    s3_env: S3Server, tiny_model_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    from ray import tune

    from tli.config import RunConfig
    from tli.output import partial_of
    from tli.tune.stage import TuneInterrupted, run_tune

    class InterruptOnce(tune.Callback):  # Tune's Ctrl-C once the first trial is done
        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            fired = tmp_path / "fired"
            if not fired.exists():
                fired.write_text(trial.trial_id)
                os.kill(os.getpid(), signal.SIGUSR1)

    bucket = _bucket(s3_env)
    storage = f"s3://{bucket}/tune"
    cfg = RunConfig.model_validate({
        "train": {"seq_len": 32, "batch_size": 2, "warmup": 1, "lr": 3e-3},
        "tune": {"intervals": [2, 4], "concurrency": 1, "asha": False,
                 "trial": {"steps": 2, "validation": {"blocks": 2, "every": 2}}},
    })  # fmt: skip
    rt = Runtime(storage=storage, threads=1, progress=False)
    out = tmp_path / "tune"
    with pytest.raises(TuneInterrupted):
        run_tune(tiny_model_dir, out, corpus, cfg, runtime=rt, callbacks=[InterruptOnce()])
    pointer = json.loads((partial_of(out) / "ray" / "tli_storage.json").read_text())
    assert pointer["run"].startswith(storage + "/")
    finished = [u for u in remote.list(pointer["run"]) if u.endswith("/result.json")]
    assert len(finished) == 1, finished  # the experiment lives on S3, one trial done
    before = remote.read_text(finished[0])
    run_tune(None, out, None, None, resume=True, runtime=rt)
    rows = (out / "trials.csv").read_text()
    assert "K2-identity" in rows and "K4-identity" in rows
    trial = finished[0][len(pointer["run"]) + 1 :]  # <trial>/result.json
    assert (out / "ray" / trial).read_text() == before  # not run again; copied into the output
    assert [u for u in remote.list(storage) if "/train_runs/" in u] == []
    assert assert_no_credentials(s3_env, out, buckets=(bucket,)) > 5
