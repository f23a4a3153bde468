"""Kill -9 drills: a real SIGKILL of the real command at several points of every stage.

A ``kill`` drill (:mod:`tli.drills`) SIGKILLs the process at a named point: nothing gets to
clean up, as when a node dies or the OOM killer strikes. After each kill: the target never
appears half-written (only the hidden partial folder and its lock are there), the store never
lists the version, and a rerun completes with the same sha256 as an uninterrupted run (for
train and tune: by resuming, not starting over). Train and tune are also killed from outside,
by their process id, while they run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tli.output import lock_of, partial_of
from tli.provenance import hash_tree
from tli.train.checkpoint import CKPT_STATE

KILLED = -signal.SIGKILL


def tli(*args: str | Path, drill: str | None = None, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """``tli ARGS`` as a real process (a drill armed when given)."""
    e = {**os.environ, **(env or {})}
    e.pop("TLI_DRILL", None)
    if drill:
        e["TLI_DRILL"] = drill
    return subprocess.run([sys.executable, "-m", "tli.cli", *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def content(path: Path, volatile: tuple[str, ...] = ()) -> str:
    """The content hash of a folder, the store's way (volatile files left out)."""
    return hash_tree(path, volatile)[1]


def assert_killed_cleanly(r: subprocess.CompletedProcess, target: Path) -> None:
    """The process died by SIGKILL and left no target: at most its partial folder and lock."""
    assert r.returncode == KILLED, f"rc {r.returncode}: {r.stderr[-2000:]}"
    assert not target.exists(), f"{target} appeared although the run was killed"
    left = {p.name for p in target.parent.iterdir()} - {"ref", "src"}
    assert left <= {partial_of(target).name, lock_of(partial_of(target)).name}, left


# ---------------------------------------------------------------------------- inject

SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INJECT = ("--interval", "2", "--shard-size", "1MB", "--writers", "1", "--quiet")


@pytest.fixture(scope="module")
def inject_ref(tiny_model_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inject") / "ref"
    r = tli("inject", "--model", tiny_model_dir, "--out", out, *INJECT)
    assert r.returncode == 0, r.stderr
    assert (out / SHARD_2).is_file(), "the drills below expect two shards"
    return out


@pytest.mark.parametrize(
    "point",
    [
        f"inject.run={SHARD_1}",
        f"inject.shard={SHARD_1}",
        f"inject.run={SHARD_2}",
        f"inject.shard={SHARD_2}",
    ],  # fmt: skip
)
def test_inject_killed_then_rerun_gives_the_same_bytes(
    point: str, tiny_model_dir: Path, inject_ref: Path, tmp_path: Path
) -> None:
    out = tmp_path / "up"
    r = tli("inject", "--model", tiny_model_dir, "--out", out, *INJECT, drill=f"{point}:kill")
    assert_killed_cleanly(r, out)
    assert partial_of(out).is_dir(), "the killed run's partial folder should be there to sweep"
    r = tli("inject", "--model", tiny_model_dir, "--out", out, *INJECT)
    assert r.returncode == 0, r.stderr
    assert content(out) == content(inject_ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["up"], "leftovers beside --out"


def test_stale_partials_are_swept_by_any_later_run_and_by_runs_clean(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A killed run's leftover goes when any later run writes beside it, or with `tli runs
    clean --dir`; a partial folder whose lock a live process holds is never touched."""
    from tli.output import staged

    def killed(out: Path) -> None:
        r = tli("inject", "--model", tiny_model_dir, "--out", out, *INJECT,
                drill=f"inject.run={SHARD_1}:kill")  # fmt: skip
        assert r.returncode == KILLED and partial_of(out).is_dir()

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    with staged(tmp_path / "live") as live:  # held by this (live) process
        (live.path / "x").write_text("in use")
        killed(a)
        r = tli("runs", "clean", "--dir", tmp_path, "--dry-run")
        assert r.returncode == 0 and "1 unfinished folder(s)" in r.stdout, r.stdout + r.stderr
        assert f"would remove {partial_of(a)}" in r.stdout and partial_of(a).is_dir()
        r = tli("inject", "--model", tiny_model_dir, "--out", c, *INJECT)  # sweeps a
        assert r.returncode == 0, r.stderr
        assert not partial_of(a).exists() and not lock_of(partial_of(a)).exists()
        assert (live.path / "x").is_file(), "a sweep removed a partial folder in use"
        killed(b)
        r = tli("runs", "clean", "--dir", tmp_path)
        assert r.returncode == 0 and "1 unfinished folder(s)" in r.stdout, r.stdout
        assert not partial_of(b).exists()
        assert (live.path / "x").is_file(), "runs clean removed a partial folder in use"
        live.abandon()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


# ---------------------------------------------------------------------------- data build

DATA = ("--sources", "shakespeare")


@pytest.fixture(scope="module")
def data_ref(tiny_model_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ref"
    r = tli("data", "build", "--out", out, "--tokenizer", tiny_model_dir, *DATA)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("point", ["data.split=train", "data.split=heldout",
                                   "data.tokens=validation"])  # fmt: skip
def test_data_build_killed_then_rerun_gives_the_same_bytes(
    point: str, tiny_model_dir: Path, data_ref: Path, tmp_path: Path
) -> None:
    out = tmp_path / "corpus"
    args = ("data", "build", "--out", out, "--tokenizer", tiny_model_dir, *DATA)
    assert_killed_cleanly(tli(*args, drill=f"{point}:kill"), out)
    r = tli(*args)
    assert r.returncode == 0, r.stderr
    assert content(out) == content(data_ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


# ---------------------------------------------------------------------------- eval

EVAL_VOLATILE = ("results.json", "provenance.json")  # dates and durations (as the store says)


@pytest.mark.parametrize(
    "tasks",
    [(), pytest.param(("--tasks", "piqa", "--limit", "4"), marks=pytest.mark.slow)],
    ids=["heldout", "heldout+lm-eval"],
)
def test_eval_killed_then_rerun_gives_the_same_scores(
    tasks: tuple, tiny_model_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    def args(out: Path) -> tuple:
        return ("eval", "--model", tiny_model_dir, "--out", out, "--heldout", corpus,
                "--heldout-seq-len", "32", *(tasks or ("--tasks", "")))  # fmt: skip

    ref = tmp_path / "ref"
    assert tli(*args(ref)).returncode == 0
    (tmp_path / "runs").mkdir()
    out = tmp_path / "runs" / "e"
    for point in ("eval.loaded=1", "eval.written=1"):
        assert_killed_cleanly(tli(*args(out), drill=f"{point}:kill"), out)
    r = tli(*args(out))
    assert r.returncode == 0, r.stderr
    assert content(out, EVAL_VOLATILE) == content(ref, EVAL_VOLATILE)
    assert (out / "heldout.json").read_text() == (ref / "heldout.json").read_text()
    if tasks:
        ref_acc = json.loads((ref / "results.json").read_text())["results"]
        assert json.loads((out / "results.json").read_text())["results"] == ref_acc
    assert sorted(p.name for p in out.parent.iterdir()) == ["e"]


# ---------------------------------------------------------------------------- a pipeline stage


def _stage_job(stage: str, store: Path, sections: dict, refs: dict, drill: str | None = None):
    """The stage as the pipeline runs it: ``python -m tli.pipeline.runner STAGE``."""
    spec = {"stage": stage, "store": str(store), "sections": sections, "refs": refs,
            "rerun": False, "runtime": {"progress": False}}  # fmt: skip
    env = {**os.environ, "TLI_STAGE_SPEC": json.dumps(spec)}
    env.pop("TLI_DRILL", None)
    if drill:
        env["TLI_DRILL"] = drill
    return subprocess.run([sys.executable, "-m", "tli.pipeline.runner", stage], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def test_pipeline_stage_killed_is_never_listed_and_rerun_gives_the_same_version(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    from tli.pipeline.runner import run_stage
    from tli.pipeline.store import Store

    sections = {"data": {"sources": [], "extra": [str(corpus)]}}
    stores = {}
    for name in ("ref", "drilled"):
        store = tmp_path / name
        base = run_stage("import-base", store=store, sections={"base": {"model":
                         str(tiny_model_dir)}}, refs={})  # fmt: skip
        stores[name] = (store, {"base": base.to_dict()})
    ref_store, refs = stores["ref"]
    assert _stage_job("data", ref_store, sections, refs).returncode == 0
    store, refs = stores["drilled"]
    r = _stage_job("data", store, sections, refs, drill="data.split=validation:kill")
    assert r.returncode == KILLED, r.stderr
    assert {s for s, _ in Store(store).versions()} == {"import-base"}, "a killed version listed"
    listing = tli("runs", "list", "--store", store)
    assert "1 unfinished folder(s) from killed stages" in listing.stdout, listing.stdout
    r = _stage_job("data", store, sections, refs)
    assert r.returncode == 0, r.stderr
    ((_, ref_v),) = [v for v in Store(ref_store).versions() if v[0] == "data"]
    ((_, v),) = [v for v in Store(store).versions() if v[0] == "data"]
    assert v == ref_v
    m, ref_m = Store(store).manifest("data", v), Store(ref_store).manifest("data", ref_v)
    assert m["output_sha256"] == ref_m["output_sha256"]
    assert Store(store).stale_temps() == [], "the rerun left the killed run's folder"


# ---------------------------------------------------------------------------- train and tune

TRAIN_VOLATILE = ("tli_train.json", "model/tli_train.json", "metrics.jsonl", "ray/*")
STEPS = 30  # a tiny model's steps take milliseconds: enough of them to be killed in the middle


def _train_args(model: Path, data: Path, out: Path) -> tuple:
    return ("train", "--model", model, "--data", data, "--out", out, "--steps", str(STEPS),
            "--checkpoint-every", "2", "--seq-len", "32", "--batch-size", "2", "--warmup", "1",
            "--freeze", "none", "--threads", "1", "--report-every", "1",
            "--max-failures", "0")  # fmt: skip


def _wait_for(path_glob: tuple[Path, str], proc: subprocess.Popen, timeout: float) -> Path:
    folder, pattern = path_glob
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = sorted(folder.glob(pattern)) if folder.is_dir() else []
        if hits:
            return hits[0]
        assert proc.poll() is None, f"ended before the point was reached: {proc.stderr.read()}"
        time.sleep(0.2)
    raise AssertionError(f"{folder}/{pattern} did not appear in {timeout} s")


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the command by its id, then reap whatever it started (its own session)."""
    proc.kill()
    proc.wait(timeout=60)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the local Ray it started, if still there
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_train_killed_twice_resumes_and_ends_with_the_same_weights(
    tiny_injected_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    """SIGKILL from outside once the step-4 checkpoint is there, and by a drill after the model
    was written: each rerun with --resume continues from a checkpoint (never from step 0) and
    the result equals an uninterrupted run's."""
    import re

    ref = tmp_path / "ref"
    r = tli(*_train_args(tiny_injected_dir, corpus, ref))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "runs" / "t"
    out.parent.mkdir()
    env = {**os.environ}
    env.pop("TLI_DRILL", None)
    proc = subprocess.Popen([sys.executable, "-m", "tli.cli", *map(str, _train_args(
        tiny_injected_dir, corpus, out))], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        _wait_for((partial_of(out) / "ray" / "step_000004", CKPT_STATE), proc, 600)
    finally:
        _kill_session(proc)
    assert proc.returncode == KILLED and not out.exists()
    r = tli(*_train_args(tiny_injected_dir, corpus, out), "--resume",
            drill="train.finish=1:kill")  # fmt: skip
    resumed = re.findall(r"resuming from step (\d+)", r.stdout + r.stderr)
    assert resumed and int(resumed[0]) >= 4, r.stdout[-3000:] + r.stderr[-3000:]
    assert_killed_cleanly(r, out)
    r = tli(*_train_args(tiny_injected_dir, corpus, out), "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {STEPS}" in r.stdout + r.stderr
    assert content(out, TRAIN_VOLATILE) == content(ref, TRAIN_VOLATILE)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_tune_killed_resumes_without_rerunning_finished_trials(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    args = ("--data", corpus, "--intervals", "2,4", "--trial-steps", "3",
            "--trial-validation-blocks", "2", "--trial-validation-every", "3", "--seq-len", "32",
            "--batch-size", "2", "--warmup", "0", "--no-asha", "--threads", "1")  # fmt: skip
    ref = tmp_path / "ref"
    r = tli("tune", "--model", tiny_model_dir, "--out", ref, *args)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "runs" / "s"
    out.parent.mkdir()
    env = {**os.environ}
    env.pop("TLI_DRILL", None)
    proc = subprocess.Popen([sys.executable, "-m", "tli.cli", "tune", "--model",
                             str(tiny_model_dir), "--out", str(out), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    first = None
    try:
        # The first trial's last result: a finished trial that a resume must not rerun.
        deadline = time.monotonic() + 600
        while first is None and time.monotonic() < deadline:
            for f in (partial_of(out) / "ray").glob("*/result.json"):
                rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
                if rows and rows[-1].get("step") == 3:
                    first = f
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
    finally:
        _kill_session(proc)
    assert first is not None and not out.exists()
    done_before = first.read_text()
    r = tli("tune", "--resume", "--out", out, drill="tune.results=1:kill")
    assert_killed_cleanly(r, out)
    r = tli("tune", "--resume", "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / "ray" / first.parent.name / "result.json").read_text() == done_before

    def rows(d: Path) -> dict[str, str]:
        import csv

        with (d / "trials.csv").open() as fh:
            return {r["trial"]: r["objective"] for r in csv.DictReader(fh)}

    assert rows(out) == rows(ref)
    assert (out / "best.yaml").read_text() == (ref / "best.yaml").read_text()
