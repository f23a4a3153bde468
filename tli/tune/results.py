"""The search's results: one row per trial, ``trials.csv``, ``tune.png``, a table, and the fair
comparison of the trials rung by rung (``search.md``, ``rungs.csv``).

Fairness. A trial ASHA stopped at step 5 must not be set against one that ran 20 steps on the
loss each happened to end with: trials are ranked as ASHA promoted them (those that completed
their budget first, by validation loss; then the stopped ones, deepest first), and
:func:`rung_report` compares them at every rung at equal steps and at equal training FLOPs
(a smaller K adds more layers, and a placement near the input back-propagates through more of
them, so a step of one trial is not a step of another), and says which comparison chose the
winner and whether the other agrees.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

from tli.tune.space import SearchPoint
from tli.tune.trial import METRIC

CSV_FIELDS = (
    "rank", "trial", "interval", "placement", "init", "alpha", "lr", "layers_in", "layers_out",
    "layers_added", "params_added", "params_total", "flops_per_token", "train_flops",
    "steps_budget", "steps_run", "best_loss", "best_step", "final_loss", "objective",
    "stopped_early", "status", "error",
)  # fmt: skip
RUNGS_FIELDS = ("trial", "step", "train_flops", "val_loss", "rank_at_step")


def _first_line(err: BaseException | None) -> str:
    """The most telling line of a trial's error (the innermost exception's message)."""
    if err is None:
        return ""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]:
            return ln[:300]
    return (lines[-1] if lines else type(err).__name__)[:300]


def _history(df: Any) -> list[dict[str, Any]]:
    """A trial's reports (step, loss, val_loss, objective, compute, nonfinite) as dicts."""
    if df is None or len(df) == 0:
        return []
    keep = [c for c in ("step", "loss", "val_loss", METRIC, "compute", "nonfinite") if c in df]
    out = []
    for row in df[keep].to_dict("records"):
        out.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
    return out


def collect_trials(
    result_grid: Any,
    points: list[SearchPoint],
    num_layers: int,
    layer_params: int,
    base_params: int,
    tokens_per_step: int | None = None,
) -> list[dict[str, Any]]:
    """One row per grid point from Ray Tune's results, best first (failed and unrun last).

    Best first as ASHA promoted them: trials that completed their budget, by validation loss,
    then those it stopped, the deepest first (a loss after 5 steps is not set against one after
    20); ``tokens_per_step`` gives each trial's training FLOPs.
    """
    by_name: dict[str, Any] = {}
    for r in result_grid:
        name = (r.config or {}).get("point", {}).get("name") or Path(r.path).name
        by_name[name] = r
    rows = [
        _trial_row(pt, by_name.get(pt.name), num_layers, layer_params, base_params) for pt in points
    ]
    for row, pt in zip(rows, points, strict=True):
        fpt = pt.flops_per_token
        row["flops_per_token"] = fpt
        row["train_flops"] = fpt * tokens_per_step * row["steps_run"] if fpt and \
            tokens_per_step else None  # fmt: skip
        row["tokens_per_step"] = tokens_per_step
    return rank_trials(rows)


def rank_trials(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sort trial rows best first and number them (``rank``), as ASHA promoted them."""
    rows = sorted(rows, key=_rank_key)
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def _rank_key(row: dict[str, Any]) -> tuple:
    """Completed trials first (by loss), then stopped ones by depth, then the failed."""
    has = row["objective"] is not None
    depth = math.inf if row["status"] == "completed" else row["steps_run"]
    # Then the grid order (the sort is stable).
    return (not has, -depth if has else 0.0, row["objective"] if has else 0.0)


def _trial_row(
    pt: SearchPoint, r: Any, num_layers: int, layer_params: int, base_params: int
) -> dict[str, Any]:
    """One trial's row: its point, sizes, history, best and final loss, status, objective."""
    hist = _history(r.metrics_dataframe) if r is not None else []
    added = num_layers // pt.interval
    row: dict[str, Any] = {
        "trial": pt.name,
        "interval": pt.interval,
        "placement": pt.placement,
        "init": pt.init,
        "alpha": pt.alpha,
        "lr": pt.lr,
        "layers_in": num_layers,
        "layers_out": num_layers + added,
        "layers_added": added,
        "params_added": added * layer_params,
        "params_total": base_params + added * layer_params,
        "steps_budget": pt.steps,
        "steps_run": int(hist[-1]["step"]) if hist else 0,
        "history": hist,
    }
    finite = [h for h in hist if h.get("val_loss") is not None and not h.get("nonfinite")
              and math.isfinite(h["val_loss"])]  # fmt: skip
    best = min(finite, key=lambda h: h["val_loss"]) if finite else None
    row["best_loss"] = best["val_loss"] if best else None
    row["best_step"] = int(best["step"]) if best else None
    last = hist[-1] if hist else None
    row["final_loss"] = last.get("val_loss") if last else None
    status, err = _status(r, hist, pt)
    row["status"] = status
    row["error"] = err
    row["stopped_early"] = status == "stopped"
    # The objective: the last finite validation loss the trial reached (ASHA compared
    # trials on it at each rung); failed trials have none.
    ok = status in ("completed", "stopped") and row["final_loss"] is not None
    row["objective"] = row["final_loss"] if ok and math.isfinite(row["final_loss"]) else None
    return row


def _status(r: Any, hist: list[dict[str, Any]], pt: SearchPoint) -> tuple[str, str]:
    """(status, error line) of one trial."""
    last = hist[-1] if hist else None
    if r is not None and r.error is not None:
        return "failed", _first_line(r.error)
    if last is not None and last.get("nonfinite"):
        return "failed", f"non-finite loss at step {int(last['step'])}"
    if r is None or not hist:
        return "not run", ""
    if int(last["step"]) < pt.steps:
        return "stopped", ""
    return "completed", ""


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_trials_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """``trials.csv``: one row per trial, every hyperparameter and result, best first."""
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(row.get(k)) for k in CSV_FIELDS})


def _curve(row: dict[str, Any]) -> list[tuple[int, float]]:
    """(step, validation loss) of one trial, finite values only."""
    return [(int(h["step"]), float(h["val_loss"])) for h in row["history"]
            if h.get("val_loss") is not None and math.isfinite(h["val_loss"])]  # fmt: skip


def _flops_at(row: dict[str, Any], step: float) -> float | None:
    fpt, tps = row.get("flops_per_token"), row.get("tokens_per_step")
    return fpt * tps * step if fpt and tps else None


def _loss_at_flops(row: dict[str, Any], budget: float) -> float | None:
    """The trial's validation loss at ``budget`` training FLOPs, linear between its reports;
    None outside the range it measured (nothing is extrapolated)."""
    pts = [(_flops_at(row, s), v) for s, v in _curve(row)]
    if not pts or pts[0][0] is None:
        return None
    for (f0, v0), (f1, v1) in zip(pts, pts[1:], strict=False):
        if f0 <= budget <= f1:  # type: ignore[operator]
            return v0 + (v1 - v0) * (budget - f0) / (f1 - f0)  # type: ignore[operator]
    return pts[0][1] if abs(pts[0][0] - budget) <= 1e-9 * budget else None  # type: ignore[operator]


def _best(losses: dict[str, float]) -> str | None:
    return min(losses, key=lambda t: losses[t]) if losses else None


def rung_report(rows: list[dict[str, Any]], objective: str) -> dict[str, Any]:
    """The trials compared rung by rung, at equal steps and at equal training FLOPs.

    Equal steps: every step at which trials reported a validation loss. Equal FLOPs: the
    training FLOPs the costliest trial had spent at each of its reports; each other trial's
    loss there is interpolated between its own reports (a cheaper trial gets there later).

    Returns:
        ``at_steps`` and ``at_flops`` (lists of ``{step|flops, losses: {trial: loss}, best}``),
        the ``winner`` (rank 1), ``chosen_by`` (which comparison ranked it first, in words),
        ``steps_best`` / ``flops_best`` (the best at the last rung that two or more trials
        reached in each comparison) and ``agree``.
    """
    ok = [r for r in rows if _curve(r)]
    steps = sorted({s for r in ok for s, _ in _curve(r)})
    at_steps = []
    for st in steps:
        losses = {r["trial"]: v for r in ok for s, v in _curve(r) if s == st}
        at_steps.append({"step": st, "losses": losses, "best": _best(losses)})
    at_flops: list[dict[str, Any]] = []
    costly = max(ok, key=lambda r: r.get("flops_per_token") or 0.0, default=None)
    if costly is not None and costly.get("flops_per_token") and costly.get("tokens_per_step"):
        for st, _ in _curve(costly):
            budget = _flops_at(costly, st)
            losses = {r["trial"]: v for r in ok if (v := _loss_at_flops(r, budget)) is not None}
            at_flops.append({"flops": budget, "step_of_costliest": st, "losses": losses,
                             "best": _best(losses)})  # fmt: skip
    steps_best = next((x["best"] for x in reversed(at_steps) if len(x["losses"]) >= 2), None)
    flops_best = next((x["best"] for x in reversed(at_flops) if len(x["losses"]) >= 2), None)
    winner = rows[0]["trial"] if rows and rows[0]["objective"] is not None else None
    return {
        "winner": winner,
        "chosen_by": _chosen_by(rows, objective),
        "steps_best": steps_best,
        "flops_best": flops_best,
        "agree": None if winner is None or flops_best is None else flops_best == winner,
        "at_steps": at_steps,
        "at_flops": at_flops,
    }


def _chosen_by(rows: list[dict[str, Any]], objective: str) -> str:
    """Which comparison put the winner first, in words."""
    if not rows or rows[0]["objective"] is None:
        return "no trial succeeded"
    done = [r for r in rows if r["status"] == "completed"]
    stopped = [r for r in rows if r["status"] == "stopped"]
    unit = "training compute (steps x FLOPs ratio)" if objective != "loss" else "steps"
    how = (f"validation loss at equal {unit}: the last rung, which {len(done)} of "
           f"{len(rows)} trials completed")  # fmt: skip
    if stopped:
        how += f" (ASHA stopped {', '.join(r['trial'] for r in stopped)} earlier)"
    return how


def write_rungs_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """``rungs.csv``: every trial's validation loss at every report, with its FLOPs and rank."""
    rank: dict[tuple[str, int], int] = {}
    for st in sorted({s for r in rows for s, _ in _curve(r)}):
        at = sorted((v, r["trial"]) for r in rows for s, v in _curve(r) if s == st)
        rank.update({(t, st): i for i, (_, t) in enumerate(at, 1)})
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RUNGS_FIELDS)
        w.writeheader()
        for r in rows:
            for st, v in _curve(r):
                w.writerow({"trial": r["trial"], "step": st, "val_loss": _fmt(v),
                            "train_flops": _fmt(_flops_at(r, st)),
                            "rank_at_step": rank[r["trial"], st]})  # fmt: skip


def search_markdown(rows: list[dict[str, Any]], rep: dict[str, Any]) -> str:
    """``search.md``: the rung-by-rung tables and which comparison chose the winner."""
    names = [r["trial"] for r in rows]
    lines = ["# tli tune: the trials compared rung by rung", "",
             f"Winner: **{rep['winner']}**, chosen by {rep['chosen_by']}.", ""]  # fmt: skip
    if rep["flops_best"] is not None:
        verdict = "agrees" if rep["agree"] else f"disagrees: {rep['flops_best']} is best there"
        lines += [f"At equal training FLOPs (the last budget two or more trials reached) the "
                  f"comparison {verdict}.", ""]  # fmt: skip
    for title, key, col in (("At equal steps", "at_steps", "step"),
                            ("At equal training FLOPs", "at_flops", "flops")):  # fmt: skip
        if not rep[key]:
            continue
        lines += [f"## {title}", "", f"| {col} | " + " | ".join(names) + " | best |",
                  "|---:|" + "---:|" * len(names) + "---|"]  # fmt: skip
        for x in rep[key]:
            at = f"{x[col]:.3g}" if col == "flops" else str(x[col])
            cells = [f"{x['losses'][n]:.4f}" if n in x["losses"] else "-" for n in names]
            lines.append(f"| {at} | " + " | ".join(cells) + f" | {x['best']} |")
        lines.append("")
    if rep["at_flops"]:
        lines += ["Losses at equal FLOPs are interpolated linearly between a trial's reports; "
                  "'-' = outside what it measured.", ""]  # fmt: skip
    return "\n".join(lines)


def write_plot(rows: list[dict[str, Any]], path: Path, objective: str) -> None:
    """``tune.png``: validation loss per trial vs step and vs training FLOPs (equal compute)."""
    from tli.figures import pyplot, save

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in sorted(rows, key=lambda r: r["trial"]):
        pts = _curve(row)
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        style = "-" if row["status"] == "completed" else "--"
        label = f"{row['trial']} ({row['status']})"
        (line,) = ax1.plot(xs, ys, style, marker="o", markersize=3, label=label)
        flops = [_flops_at(row, x) for x in xs]
        if all(f is not None for f in flops):
            ax2.plot(flops, ys, style, marker="o", markersize=3, label=label,
                     color=line.get_color())  # fmt: skip
    ax1.set_xlabel("training step")
    ax1.set_ylabel("validation loss (nats/token)")
    ax1.set_title("at equal steps (dashed: stopped or failed)")
    ax2.set_xlabel("training FLOPs")
    ax2.set_ylabel("validation loss (nats/token)")
    chosen = "equal compute" if objective != "loss" else "equal steps"
    ax2.set_title(f"at equal training FLOPs (the search chose at {chosen})")
    for ax in (ax1, ax2):
        if ax.lines:
            ax.legend(fontsize=7)
    save(fig, path, dpi=110)


def print_summary(rows: list[dict[str, Any]], file: Any = None) -> None:
    """The trials as a table, best first."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tli tune: trials, best first")
    for col in ("#", "trial", "K", "where", "init", "alpha", "lr", "+layers", "+params",
                "steps", "best loss", "final loss", "status"):  # fmt: skip
        left = col in ("trial", "where", "init", "status")
        table.add_column(col, justify="left" if left else "right")
    for row in rows:
        status = row["status"] + (f": {row['error']}" if row["error"] else "")
        table.add_row(
            str(row["rank"]), row["trial"], str(row["interval"]), row["placement"], row["init"],
            _fmt(row["alpha"]) or "-", f"{row['lr']:g}", str(row["layers_added"]),
            f"{row['params_added']:,}", f"{row['steps_run']}/{row['steps_budget']}",
            _fmt(row["best_loss"]), _fmt(row["final_loss"]), status[:80],
        )  # fmt: skip
    Console(file=file or sys.stdout, width=160).print(table)
