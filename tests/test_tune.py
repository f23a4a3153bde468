"""Ray Tune search: grid + ASHA on a tiny model, failed trials, interrupt and resume, bad input.

One local Ray (module-scoped, started the way ``tli tune`` starts it) serves every Ray test.
Trials are tiny (seq 32, batch 2, 4 steps); speed is never asserted here.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from ray import tune

from tli.cli import main as tli_main
from tli.config import RunConfig, load_run_config
from tli.output import partial_of
from tli.tune.space import SearchPoint, search_points
from tli.tune.stage import TuneInterrupted, run_tune

SEQ = 32


@pytest.fixture(scope="module")
def ray_tune():
    """A local Ray for this module, started the way ``tli tune`` starts it (with its dashboard)."""
    from tli.rayenv import session

    with session(None):
        yield


def _cfg(steps: int = 4, **tune) -> RunConfig:
    t = dict(intervals=[1, 2, 4], trial={"steps": steps, "validation": {"blocks": 4, "every": 2}},
             concurrency=2)  # fmt: skip
    t.update(tune)
    return RunConfig.model_validate(
        {"train": {"seq_len": SEQ, "batch_size": 2, "warmup": 1, "lr": 3e-3}, "tune": t}
    )


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


class _InterruptOnce(tune.Callback):
    """Sends this process SIGUSR1 (Tune's Ctrl-C) once, when the first trial completes."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if not self.marker.exists():  # the callback is saved with the experiment: fire once
            self.marker.write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGUSR1)


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "trials.csv").open() as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------ pure parts


def test_grid_names_are_deterministic_and_budgets_follow_compute() -> None:
    cfg = _cfg(intervals=[4, 2, 2], inits=["identity", "copy"], alphas=[0.5], lrs=[1e-3])
    pts = search_points(cfg, num_layers=4, layer_params=10, base_params=100)
    assert [p.name for p in pts] == [
        "K4-identity-a0.5-lr0.001", "K4-copy-a0.5-lr0.001",
        "K2-identity-a0.5-lr0.001", "K2-copy-a0.5-lr0.001",
    ]  # fmt: skip
    assert all(p.steps == 4 for p in pts)
    eq = search_points(
        _cfg(intervals=[1, 4], steps=10, objective="loss_at_equal_compute"), 4, 10, 100
    )
    # K=1 adds 4 layers (140 params) vs K=4's 1 (110): 10 * 110 / 140 = 7.9 -> 8 steps.
    assert [(p.interval, p.steps) for p in eq] == [(1, 8), (4, 10)]
    assert SearchPoint(2, "identity", None, 0.003, 4).name == "K2-identity-lr0.003"


def test_placements_are_a_grid_dimension_with_flops_ratios() -> None:
    from tli.config import InjectConfig
    from tli.inject.plan import make_plan

    cfg = _cfg(intervals=[2], placements=["uniform", "top", "bottom"], steps=12,
               objective="loss_at_equal_compute")  # fmt: skip

    # FLOPs per token of a made-up cost: a new layer near the input back-propagates through
    # more layers, as flops_per_token counts it: here 10 + (layers from the lowest new one).
    def flops(inj: InjectConfig) -> float:
        plan = make_plan(4, inj)
        return 10.0 + plan.num_layers_out - min(plan.new_layers)

    pts = search_points(cfg, num_layers=4, layer_params=10, base_params=100, flops_of=flops)
    assert [p.name for p in pts] == ["K2-identity-lr0.003", "K2-top-identity-lr0.003",
                                     "K2-bottom-identity-lr0.003"]  # fmt: skip
    assert [p.flops_per_token for p in pts] == [14.0, 13.0, 15.0]
    # Equal compute: the cheapest (top) gets the budget, the others proportionally fewer steps.
    assert [p.steps for p in pts] == [round(12 * 13 / 14), 12, round(12 * 13 / 15)]
    top = pts[1].inject_config(cfg.inject)
    assert top.placement == "top" and make_plan(4, top).params["positions"] == [2, 3]
    assert pts[0].inject_config(cfg.inject).placement is None  # uniform = today's config
    with pytest.raises(Exception, match="empty search space: --placements"):
        search_points(_cfg(placements=[]), 4, 10, 100)


def _row(trial: str, status: str, curve: list[tuple[int, float]], fpt: float) -> dict:
    hist = [{"step": s, "val_loss": v} for s, v in curve]
    return {"trial": trial, "status": status, "history": hist, "flops_per_token": fpt,
            "tokens_per_step": 10, "objective": curve[-1][1], "steps_run": curve[-1][0]}  # fmt: skip


def test_trials_are_compared_rung_by_rung_at_equal_steps_and_flops(tmp_path) -> None:
    from tli.tune.results import rank_trials, rung_report, search_markdown, write_rungs_csv

    # ASHA stopped C at step 2 with a lower loss than A's final one: C must not win on it.
    rows = rank_trials([
        _row("A", "completed", [(2, 3.0), (4, 2.5)], fpt=2.0),   # twice B's FLOPs per token
        _row("B", "completed", [(2, 2.9), (4, 2.6)], fpt=1.0),
        _row("C", "stopped", [(2, 2.4)], fpt=1.0),
    ])  # fmt: skip
    assert [r["trial"] for r in rows] == ["A", "B", "C"]
    rep = rung_report(rows, "loss")
    assert rep["winner"] == "A" and "equal steps" in rep["chosen_by"]
    assert "ASHA stopped C" in rep["chosen_by"]
    assert [(x["step"], x["best"]) for x in rep["at_steps"]] == [(2, "C"), (4, "A")]
    assert rep["steps_best"] == "A"
    # Equal FLOPs: A's budgets 40 and 80 FLOPs; B reaches 40 at step 4 (2.6); C at step 2 only
    # (20 FLOPs) is outside; at 80 only A measured.
    (at40, at80) = rep["at_flops"]
    assert at40["flops"] == 40.0 and at40["losses"] == {"A": 3.0, "B": 2.6}
    assert at80["losses"] == {"A": 2.5}
    assert rep["flops_best"] == "B" and rep["agree"] is False
    md = search_markdown(rows, rep)
    assert "Winner: **A**" in md and "disagrees: B is best there" in md
    write_rungs_csv(rows, tmp_path / "rungs.csv")
    with (tmp_path / "rungs.csv").open() as fh:
        got = list(csv.DictReader(fh))
    assert [(r["trial"], r["step"], r["rank_at_step"]) for r in got] == [
        ("A", "2", "3"), ("A", "4", "1"), ("B", "2", "2"), ("B", "4", "2"), ("C", "2", "1"),
    ]  # fmt: skip
    assert got[0]["train_flops"] == "40"


def test_nonfinite_losses_rank_last_and_stop_the_trial() -> None:
    from tli.tune.trial import stop_nonfinite as _stop_nonfinite
    from tli.tune.trial import trial_metrics

    ok = trial_metrics({"step": 4, "loss": 2.5, "val_loss": 2.4}, compute_ratio=1.5)
    assert ok == {"objective": 2.4, "compute": 6.0, "nonfinite": False}
    assert not _stop_nonfinite("t", ok)
    for bad in ({"step": 2, "loss": float("nan"), "val_loss": 2.4},
                {"step": 2, "loss": 2.5, "val_loss": float("inf")}):  # fmt: skip
        m = trial_metrics(bad, compute_ratio=1.0)
        assert m["nonfinite"] and _stop_nonfinite("t", m)
    assert trial_metrics({"step": 2, "loss": 1.0, "val_loss": float("nan")}, 1.0)["objective"] == (
        float("inf")
    )


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--intervals", ","], "empty search space: --intervals"),
        (["--intervals", "2,9"], "interval 9 is outside 1..4"),
        (["--intervals", "0"], "interval 0 is outside 1..4"),
        (["--intervals", "2,x"], "'x' is not a valid int"),
        (["--lrs", "1e-3,fast"], "'fast' is not a valid float"),
        (["--alphas", ","], "empty search space: --alphas"),
        (["--intervals", "2", "--concurrency", "3"], "need 3 CPUs"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_ray_starts(
    tiny_model_dir, corpus, tmp_path, capsys, flags, needle
) -> None:
    out = tmp_path / "out"
    argv = ["tune", "--model", str(tiny_model_dir), "--out", str(out), "--data", str(corpus),
            "--seq-len", str(SEQ), *flags]  # fmt: skip
    if "--concurrency" in flags and (os.cpu_count() or 1) >= 3:
        pytest.skip("this machine has enough CPUs for 3 trials")
    rc = _cli(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert needle in err
    assert len(err.splitlines()) == 1, err
    assert not out.exists() and not partial_of(out).exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def _cli(argv: list[str]) -> int:
    """``tli`` in-process; argparse's usage errors exit through SystemExit."""
    try:
        return tli_main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def test_resume_without_an_interrupted_search_is_refused(tmp_path, capsys) -> None:
    rc = _cli(["tune", "--resume", "--out", str(tmp_path / "none")])
    assert rc == 2
    assert "nothing to resume" in capsys.readouterr().err


# ------------------------------------------------------------------------------ Ray searches


def test_intervals_and_placements_with_asha(
    ray_tune, tiny_model_dir, corpus, tmp_path, capsys
) -> None:
    cfg = _cfg(intervals=[2, 4], placements=["uniform", "bottom"])
    out = run_tune(tiny_model_dir, tmp_path / "tune", corpus, cfg)
    rows = _rows(out)
    assert len(rows) == 4
    assert {r["trial"] for r in rows} == {
        "K2-identity-lr0.003", "K2-bottom-identity-lr0.003", "K4-identity-lr0.003",
        "K4-bottom-identity-lr0.003",
    }  # fmt: skip
    # Best first as ASHA promoted them: the completed trials by loss, then the stopped ones.
    done = [r for r in rows if r["status"] == "completed"]
    assert rows[: len(done)] == done and done, "completed trials rank first"
    losses = [float(r["objective"]) for r in done]
    assert losses == sorted(losses), "trials.csv is best first"
    for r in rows:
        assert r["status"] in ("completed", "stopped"), r
        assert int(r["layers_out"]) == 4 + 4 // int(r["interval"])
        assert int(r["steps_run"]) in (2, 4)
        assert (r["stopped_early"] == "True") == (int(r["steps_run"]) < 4)
        # Bottom placement back-propagates through every layer: more FLOPs than uniform's.
        assert float(r["train_flops"]) == pytest.approx(
            float(r["flops_per_token"]) * SEQ * 2 * int(r["steps_run"]), rel=1e-4
        )
    fpt = {r["trial"]: float(r["flops_per_token"]) for r in rows}
    assert fpt["K4-bottom-identity-lr0.003"] > fpt["K4-identity-lr0.003"]
    # The fair report: rung by rung, and which comparison chose the winner.
    search = (out / "search.md").read_text()
    assert f"Winner: **{rows[0]['trial']}**" in search and "At equal training FLOPs" in search
    assert "# chosen by validation loss at equal steps" in (out / "best.yaml").read_text()
    state = json.loads((out / "tli_tune.json").read_text())["result"]
    assert state["chosen_by"].startswith("validation loss at equal steps")
    assert (out / "rungs.csv").read_text().startswith("trial,step,train_flops,val_loss")
    # Ray's experiment folder, one sub-folder per trial named after it; the plot.
    assert {p.name for p in (out / "ray").iterdir() if p.is_dir()} == {r["trial"] for r in rows}
    assert (out / "tune.png").stat().st_size > 10_000
    assert not (out / "train_runs").exists()
    # best.yaml: the winner's inject + train sections, accepted by tli inject and tli train.
    best = load_run_config(out / "best.yaml")
    assert best.inject.interval == int(rows[0]["interval"])
    assert best.train.lr == pytest.approx(3e-3) and best.train.seq_len == SEQ
    injected = tmp_path / "injected"
    rc = tli_main(["inject", "--config", str(out / "best.yaml"), "--model", str(tiny_model_dir),
                   "--out", str(injected), "--quiet"])  # fmt: skip
    assert rc == 0
    cfg_json = json.loads((injected / "config.json").read_text())
    assert cfg_json["num_hidden_layers"] == int(rows[0]["layers_out"])
    from tli.cli import build_parser
    from tli.cli.flags import resolve_args

    args = build_parser().parse_args(["train", "--config", str(out / "best.yaml"), "--model",
                                      str(injected), "--out", "x", "--data", str(corpus)])  # fmt: skip
    assert resolve_args(args).config.train == best.train
    # The summary table, best first.
    printed = capsys.readouterr().out
    assert printed.index(rows[0]["trial"]) < printed.index(rows[-1]["trial"])


def test_failed_trial_is_recorded_and_the_others_finish(
    ray_tune, tiny_model_dir, corpus, tmp_path
) -> None:
    # lr 1e38 overflows AdamW's step size at step 1: an exception in the worker errors the
    # trial (as an out-of-memory would). The sane trial must still finish and win.
    cfg = _cfg(intervals=[2], lrs=[3e-3, 1e38], asha=False)
    out = run_tune(tiny_model_dir, tmp_path / "tune", corpus, cfg)
    rows = {r["trial"]: r for r in _rows(out)}
    assert len(rows) == 2
    good, boom = rows["K2-identity-lr0.003"], rows["K2-identity-lr1e+38"]
    assert good["status"] == "completed" and good["steps_run"] == "4" and good["rank"] == "1"
    assert boom["status"] == "failed" and "overflow" in boom["error"], boom
    assert boom["objective"] == "" and boom["rank"] == "2"
    assert load_run_config(out / "best.yaml").train.lr == pytest.approx(3e-3)
    state = json.loads((out / "tli_tune.json").read_text())
    assert state["result"]["status"] == {"completed": 1, "failed": 1}


@pytest.mark.slow
def test_nan_loss_trial_is_recorded_as_failed(ray_tune, tiny_model_dir, corpus, tmp_path) -> None:
    # lr 1e37 drives the loss to NaN by step 4: the trial is stopped and marked failed.
    cfg = _cfg(intervals=[2], lrs=[3e-3, 1e37], asha=False)
    out = run_tune(tiny_model_dir, tmp_path / "tune", corpus, cfg)
    rows = {r["trial"]: r for r in _rows(out)}
    nan = rows["K2-identity-lr1e+37"]
    assert nan["status"] == "failed" and "non-finite loss" in nan["error"], nan
    assert nan["objective"] == "" and nan["rank"] == "2"
    assert rows["K2-identity-lr0.003"]["status"] == "completed"


def test_interrupted_search_resumes_without_rerunning_finished_trials(
    ray_tune, tiny_model_dir, corpus, tmp_path, capsys
) -> None:
    out = tmp_path / "tune"
    partial = partial_of(out)
    first = partial / "ray" / "K2-identity-lr0.003" / "result.json"
    cfg = _cfg(intervals=[2, 4], concurrency=1, asha=False)
    with pytest.raises(TuneInterrupted, match="tli tune --resume"):
        stop = _InterruptOnce(tmp_path / "fired")
        run_tune(tiny_model_dir, out, corpus, cfg, callbacks=[stop])
    assert not out.exists() and partial.is_dir()
    done_before = first.read_text()
    # Resume through the CLI with only --out: the saved inputs are used.
    rc = tli_main(["tune", "--resume", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = {r["trial"]: r for r in _rows(out)}
    assert set(rows) == {"K2-identity-lr0.003", "K4-identity-lr0.003"}
    assert all(r["status"] == "completed" for r in rows.values())
    # The finished trial was not run again: its results are exactly those from before.
    assert (out / "ray" / "K2-identity-lr0.003" / "result.json").read_text() == done_before
