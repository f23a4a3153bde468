"""Evaluation tables: one column per evaluated model, and ``tli eval --compare``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tli.errors import TliError

RESULTS_FILE = "results.json"
HELDOUT_FILE = "heldout.json"
# Metrics shown in tables, in this order (results.json keeps all of them).
TABLE_METRICS = ("acc", "acc_norm", "perplexity", "word_perplexity", "bits_per_byte")
HELDOUT_METRICS = ("loss", "perplexity", "bits_per_byte")


def read_eval_dir(path: Path) -> dict[str, Any]:
    """The results of an evaluation folder: ``{"results": ..., "heldout": ...}``."""
    path = Path(path)
    res = path / RESULTS_FILE
    held = path / HELDOUT_FILE
    if not res.is_file() and not held.is_file():
        raise TliError(f"{path} is not an evaluation folder (no {RESULTS_FILE} or {HELDOUT_FILE})")
    return {
        "results": json.loads(res.read_text()) if res.is_file() else None,
        "heldout": json.loads(held.read_text()) if held.is_file() else None,
    }


def _rows(ev: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(task, metric) -> formatted value for one evaluation."""
    rows: dict[tuple[str, str], str] = {}
    res = ev.get("results")
    if res:
        subs = res.get("group_subtasks") or {}
        # A group's member tasks (MMLU's 57 subjects) stay in results.json; the table shows the
        # group and its sub-groups.
        hidden = {t for members in subs.values() for t in members if t not in subs}
        for task, metrics in res.get("results", {}).items():
            if task in hidden:
                continue
            for m in TABLE_METRICS:
                key = f"{m},none"
                if key not in metrics or not isinstance(metrics[key], int | float):
                    continue
                err = metrics.get(f"{m}_stderr,none")
                txt = f"{metrics[key]:.4f}"
                if isinstance(err, int | float):
                    txt += f" ± {err:.4f}"
                rows[(task, m)] = txt
    held = ev.get("heldout")
    if held:
        for m in HELDOUT_METRICS:
            if m in held:
                rows[(f"held-out ({held.get('blocks')}x{held.get('seq_len')})", m)] = (
                    f"{held[m]:.4f}"
                )
    return rows


def results_table(evals: dict[str, dict[str, Any]]) -> str:
    """A Markdown table with one column per evaluation (name -> ``{"results", "heldout"}``)."""
    per = {name: _rows(ev) for name, ev in evals.items()}
    keys: list[tuple[str, str]] = []
    for rows in per.values():
        keys += [k for k in rows if k not in keys]
    names = list(evals)
    head = "| task | metric | " + " | ".join(names) + " |"
    sep = "|---|---|" + "---|" * len(names)
    lines = [head, sep]
    for task, metric in keys:
        cells = [per[n].get((task, metric), "") for n in names]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    n_items = _items(evals)
    if n_items:
        lines.append("")
        lines.append(f"Items per task: {n_items}.")
    return "\n".join(lines)


def _items(evals: dict[str, dict[str, Any]]) -> str:
    seen = set()
    for ev in evals.values():
        res = ev.get("results") or {}
        for task, n in (res.get("n-samples") or {}).items():
            seen.add((task, n.get("effective")))
    by_task: dict[str, set] = {}
    for task, n in seen:
        by_task.setdefault(task, set()).add(n)
    vals = {n for ns in by_task.values() for n in ns}
    if len(vals) == 1:
        return str(vals.pop())
    return ", ".join(
        f"{t} {'/'.join(str(x) for x in sorted(ns))}" for t, ns in sorted(by_task.items())
    )
