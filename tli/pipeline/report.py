"""The run report: ``report.md`` and ``report.html`` with PNG plots, from the stages' outputs.

It reads what the other stages wrote (the tune stage's ``trials.csv``, the train stage's
``metrics.jsonl``, the eval stages' results, the injected model's provenance) and draws:
held-out loss per trial, held-out and training loss during training, and the parameters
added; plus the eval table base vs injected vs trained. Missing pieces are stated in the
report, never invented.
"""

from __future__ import annotations

import csv
import html
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tli.errors import TliError


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _float(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v else None  # NaN -> None


def read_trials(tune_out: Path) -> list[dict[str, str]]:
    """The rows of the tune stage's ``trials.csv`` (empty when there is none)."""
    f = tune_out / "trials.csv"
    if not f.is_file():
        return []
    with f.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _trial_label(row: dict[str, str]) -> str:
    parts = []
    for k in ("interval", "init", "alpha", "lr"):
        v = row.get(k)
        if v not in (None, ""):
            parts.append(f"{'K' if k == 'interval' else k}={v}")
    return " ".join(parts) or row.get("trial", "?")


def _trial_loss(row: dict[str, str]) -> float | None:
    for k in ("best_loss", "best_heldout_loss", "final_loss", "final_heldout_loss", "loss"):
        v = _float(row.get(k))
        if v is not None:
            return v
    return None


def read_metrics(train_out: Path) -> list[dict[str, Any]]:
    """The train stage's per-step metrics."""
    f = train_out / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]


def _parameters(inject_out: Path) -> tuple[int | None, int | None]:
    prov = _json(inject_out / "tli_provenance.json") or {}
    p = prov.get("parameters") or {}
    return p.get("before"), p.get("after")


def _heldout(ev: Path) -> float | None:
    h = _json(ev / "heldout.json") or {}
    return _float(h.get("loss"))


# ---------------------------------------------------------------------------- plots


def _plots(
    out: Path,
    trials: list[dict[str, str]],
    metrics: list[dict[str, Any]],
    params: tuple[int | None, int | None],
    heldout: dict[str, float | None],
) -> list[str]:
    """Draw the PNGs into ``out``; return their file names in order."""
    from tli.figures import pyplot, save_all

    plt = pyplot()
    return save_all(out, [
        ("tune_trials.png", lambda: _plot_trials(plt, trials)),
        ("train_loss.png", lambda: _plot_training(plt, metrics)),
        ("models.png", lambda: _plot_models(plt, heldout, params)),
    ])  # fmt: skip


def _plot_trials(plt: Any, trials: list[dict[str, str]]) -> Any:
    rows = [(r, _trial_loss(r)) for r in trials]
    rows = [(r, v) for r, v in rows if v is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = [_trial_label(r) for r, _ in rows]
    ax.bar(range(len(rows)), [v for _, v in rows], color="#4c72b0")
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("held-out loss (best)")
    ax.set_title("Tune: held-out loss per trial")
    lo = min(v for _, v in rows)
    ax.set_ylim(lo * 0.95, max(v for _, v in rows) * 1.02)
    return fig


def _plot_training(plt: Any, metrics: list[dict[str, Any]]) -> Any:
    if not metrics:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    steps = [m["step"] for m in metrics]
    ax.plot(steps, [m.get("loss") for m in metrics], label="training loss", alpha=0.6)
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    if val:
        label = "held-out loss (validation split)"
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training")
    ax.legend()
    return fig


def _plot_models(
    plt: Any, heldout: dict[str, float | None], params: tuple[int | None, int | None]
) -> Any:
    known = {k: v for k, v in heldout.items() if v is not None}
    before, after = params
    if not (known or (before and after)):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(7, 3))
    if known:
        axes[0].bar(
            list(known),
            list(known.values()),
            color=["#999", "#4c72b0", "#55a868"][: len(known)],
        )
        axes[0].set_ylim(min(known.values()) * 0.95, max(known.values()) * 1.02)
    axes[0].set_title("held-out loss")
    if before and after:
        axes[1].bar(
            ["base", "added"], [before / 1e6, (after - before) / 1e6], color=["#999", "#c44e52"]
        )
        axes[1].set_ylabel("parameters (M)")
    axes[1].set_title("parameters")
    return fig


# ---------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ReportJob:
    """The stages' output folders the report reads (base, data, tune, inject, train, evals)."""

    inputs: dict[str, Path]

    def describe(self) -> dict[str, Any]:
        return {"stage": "report", "inputs": {k: str(v) for k, v in self.inputs.items()}}


REPORT_INPUTS = ("tune", "inject", "train", "eval_base", "eval_injected", "eval_trained")


def prepare(cfg: Any, inputs: dict[str, Path], runtime: Any) -> ReportJob:
    """Check that every stage output the report reads is there (the report has no config)."""
    missing = [k for k in REPORT_INPUTS if k not in inputs or not Path(inputs[k]).is_dir()]
    if missing:
        raise TliError(f"the report needs the outputs of {', '.join(missing)}")
    return ReportJob({k: Path(v) for k, v in inputs.items()})


def execute(job: ReportJob, out: Path) -> None:
    """Write ``report.md``, ``report.html`` and the PNG plots into ``out``."""
    from tli.eval.tables import read_eval_dir, results_table

    inputs = job.inputs
    trials = read_trials(inputs["tune"])
    metrics = read_metrics(inputs["train"])
    before, after = _parameters(inputs["inject"])
    evals = {label: inputs[f"eval_{label}"] for label in ("base", "injected", "trained")}
    heldout = {label: _heldout(p) for label, p in evals.items()}
    table = results_table({label: read_eval_dir(p) for label, p in evals.items()})
    plan = _json(inputs["inject"] / "tli_plan.json") or {}
    train_prov = _json(inputs["train"] / "tli_train.json") or {}
    pngs = _plots(out, trials, metrics, (before, after), heldout)
    if (inputs["tune"] / "tune.png").is_file():  # the tune stage's loss-vs-step curves
        shutil.copyfile(inputs["tune"] / "tune.png", out / "tune.png")
        pngs.append("tune.png")
    md = _markdown(trials, metrics, before, after, plan, _chosen(inputs["tune"]), table, heldout,
                   train_prov, pngs)  # fmt: skip
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(_html(md))


def _chosen(tune_out: Path) -> str | None:
    """Only what the search chose (``best.yaml``): the inject section and the learning rate."""
    if not (tune_out / "best.yaml").is_file():
        return None
    import yaml

    doc = yaml.safe_load((tune_out / "best.yaml").read_text()) or {}
    chosen = {"inject": doc.get("inject"), "train": {"lr": (doc.get("train") or {}).get("lr")}}
    return yaml.safe_dump(chosen, sort_keys=False)


def _int(x: int | None) -> str:
    return "n/a" if x is None else f"{x:,}"


def _fmt(x: float | None, nd: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _markdown(trials, metrics, before, after, plan, best, table, heldout, train_prov, pngs) -> str:
    lines = ["# tli run report", ""]
    lines += ["## Models", ""]
    lines.append("| model | layers | parameters | held-out loss |")
    lines.append("|---|---|---|---|")
    n_in, n_out = plan.get("num_layers_in"), plan.get("num_layers_out")
    lines.append(f"| base | {n_in or 'n/a'} | {_int(before)} | {_fmt(heldout['base'])} |")
    lines.append(f"| injected | {n_out or 'n/a'} | {_int(after)} | {_fmt(heldout['injected'])} |")
    lines.append(f"| trained | {n_out or 'n/a'} | {_int(after)} | {_fmt(heldout['trained'])} |")
    if before and after:
        lines += ["", f"Parameters added: {after - before:,} (+{(after - before) / before:.1%})."]
    if "models.png" in pngs:
        lines += ["", "![held-out loss and parameters](models.png)"]
    lines += ["", "## Interval search (Ray Tune)", ""]
    if trials:
        lines.append("| trial | held-out loss | steps | status |")
        lines.append("|---|---|---|---|")
        for r in sorted(trials, key=lambda r: _trial_loss(r) or float("inf")):
            lines.append(
                f"| {_trial_label(r)} | {_fmt(_trial_loss(r))} | "
                f"{r.get('steps', r.get('steps_run', ''))} | {r.get('status', '')} |"
            )
        if "tune_trials.png" in pngs:
            lines += ["", "![held-out loss per trial](tune_trials.png)"]
        if "tune.png" in pngs:
            lines += ["", "![held-out loss vs step, every trial](tune.png)"]
    else:
        lines.append("No trials.csv in the tune stage's output.")
    if best:
        lines += ["", "Chosen by the search (`best.yaml`):", "", "```yaml", best.rstrip(), "```"]
    lines += ["", "## Training (Ray Train)", ""]
    if metrics:
        res = train_prov.get("result") or {}
        lines.append(
            f"Steps: {metrics[-1].get('step')}, tokens: {metrics[-1].get('tokens')}, "
            f"final training loss {_fmt(res.get('final_loss'))}, final held-out loss "
            f"{_fmt(res.get('final_val_loss'))}."
        )
        if "train_loss.png" in pngs:
            lines += ["", "![loss during training](train_loss.png)"]
    else:
        lines.append("No metrics.jsonl in the train stage's output.")
    lines += ["", "## Evaluation (lm-eval): base vs injected vs trained", "", table, ""]
    return "\n".join(lines)


def _html(md: str) -> str:
    """A self-contained HTML page for the Markdown above (tables, images, code, headings)."""
    body: list[str] = []
    in_table = in_code = False
    for line in md.splitlines():
        if line.startswith("```"):
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            body.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            alt, _, rest = line[2:].partition("](")
            body.append(
                f'<p><img src="{html.escape(rest.rstrip(")"))}" alt="{html.escape(alt)}"></p>'
            )
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em}"
        "pre{background:#f4f4f4;padding:.5em}"
    )
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>tli run report</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
