"""The search's results: one row per trial, ``trials.csv``, ``tune.png`` and a table."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

from tli.tune.space import SearchPoint
from tli.tune.trial import METRIC

CSV_FIELDS = (
    "rank", "trial", "interval", "init", "alpha", "lr", "layers_in", "layers_out",
    "layers_added", "params_added", "params_total", "steps_budget", "steps_run", "best_loss",
    "best_step", "final_loss", "objective", "stopped_early", "status", "error",
)  # fmt: skip



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
) -> list[dict[str, Any]]:
    """One row per grid point from Ray Tune's results, best first (failed and unrun last)."""
    by_name: dict[str, Any] = {}
    for r in result_grid:
        name = (r.config or {}).get("point", {}).get("name") or Path(r.path).name
        by_name[name] = r
    rows = [
        _trial_row(pt, by_name.get(pt.name), num_layers, layer_params, base_params)
        for pt in points
    ]

    def key(row: dict[str, Any]) -> tuple:
        has = row["objective"] is not None
        # Completed trials before stopped ones of equal loss; then the grid order (stable sort).
        return (not has, row["objective"] if has else 0.0, row["status"] != "completed")

    rows.sort(key=key)
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def _trial_row(
    pt: SearchPoint, r: Any, num_layers: int, layer_params: int, base_params: int
) -> dict[str, Any]:
    """One trial's row: its point, sizes, history, best and final loss, status, objective."""
    hist = _history(r.metrics_dataframe) if r is not None else []
    added = num_layers // pt.interval
    row: dict[str, Any] = {
        "trial": pt.name,
        "interval": pt.interval,
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


def write_plot(rows: list[dict[str, Any]], path: Path, objective: str) -> None:
    """``tune.png``: validation loss vs step per trial; best loss vs interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in sorted(rows, key=lambda r: r["trial"]):
        pts = [(h["step"], h["val_loss"]) for h in row["history"]
               if h.get("val_loss") is not None and math.isfinite(h["val_loss"])]  # fmt: skip
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        style = "-" if row["status"] == "completed" else "--"
        label = f"{row['trial']} ({row['status']})"
        ax1.plot(xs, ys, style, marker="o", markersize=3, label=label)
    ax1.set_xlabel("training step")
    ax1.set_ylabel("validation loss (nats/token)")
    ax1.set_title("validation loss per trial (dashed: stopped or failed)")
    if ax1.lines:
        ax1.legend(fontsize=7)
    groups: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row["best_loss"] is None:
            continue
        g = row["init"] + (f" a{row['alpha']:g}" if row["alpha"] is not None else "")
        g += f" lr{row['lr']:g}"
        groups.setdefault(g, []).append((row["interval"], row["best_loss"]))
    for g, pts in sorted(groups.items()):
        pts.sort()
        xs, ys = zip(*pts, strict=True)
        ax2.plot(xs, ys, marker="o", label=g)
    ax2.set_xlabel("injection interval K")
    ax2.set_ylabel("best validation loss")
    ax2.set_title("best loss vs interval" + (" (equal compute)" if objective != "loss" else ""))
    if ax2.lines:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(rows: list[dict[str, Any]], file: Any = None) -> None:
    """The trials as a table, best first."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tli tune: trials, best first")
    for col in ("#", "trial", "K", "init", "alpha", "lr", "+layers", "+params", "steps",
                "best loss", "final loss", "status"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("trial", "init", "status") else "right")
    for row in rows:
        status = row["status"] + (f": {row['error']}" if row["error"] else "")
        table.add_row(
            str(row["rank"]), row["trial"], str(row["interval"]), row["init"],
            _fmt(row["alpha"]) or "-", f"{row['lr']:g}", str(row["layers_added"]),
            f"{row['params_added']:,}", f"{row['steps_run']}/{row['steps_budget']}",
            _fmt(row["best_loss"]), _fmt(row["final_loss"]), status[:80],
        )  # fmt: skip
    Console(file=file or sys.stdout, width=160).print(table)
