"""The ``compare`` stage: the comparison's report, ``report.md`` + ``report.html`` + PNGs.

Its inputs are every run of the comparison (:class:`tli.compare.run.Runs`); it reads their
files (:mod:`tli.compare.analysis`), writes ``summary.json`` (every number, for tools and
tests), the plots, and the report: how the methods were matched, what they cost, the held-out
loss at step 0 and at the end, the validation curves (mean and spread over the seeds), the
steps each needs to reach the reference's final loss, 0-shot accuracy with 95% intervals and
the items behind them, and the checklist of the paper's claims with a verdict each.
``report.html`` is self-contained (the plots inline), for a browser, a KFP HTML artifact or a
commit.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tli.compare.analysis import EQUAL_LOSS, claims, collect
from tli.errors import TliError

SUMMARY = "summary.json"
PLOTS = ("curves.png", "loss.png", "accuracy.png")


@dataclass(frozen=True)
class CompareJob:
    """The comparison's settings and every run's output folder, by input name."""

    params: dict[str, Any]
    inputs: dict[str, Path]

    def describe(self) -> dict[str, Any]:
        """What ``--dry-run`` would show: the runs the report reads."""
        return {"stage": "compare", "inputs": {k: str(v) for k, v in self.inputs.items()}}


def prepare(params: Any, inputs: dict[str, Path], runtime: Any) -> CompareJob:
    """Check that every run the report reads is there.

    Args:
        params: :func:`tli.compare.run.report_params` (the experiment and the matched methods).
        inputs: output folders by input name (:meth:`tli.compare.run.Runs.inputs`).
        runtime: unused.
    """
    if not isinstance(params, dict) or "methods" not in params:
        raise TliError("the compare report is made by tli compare (it needs every run)")
    seeds = params["experiment"]["seeds"]
    want = ["base", "data", "eval_base"]
    for m in params["methods"]:
        n = m["name"]
        want += [f"{n}/inject", f"{n}/eval_init"]
        want += [f"{n}/s{s}/{role}" for s in seeds for role in ("train", "eval_final")]
    missing = [k for k in want if k not in inputs or not Path(inputs[k]).is_dir()]
    if missing:
        raise TliError(f"the compare report needs the runs {', '.join(missing[:4])}")
    return CompareJob(params, {k: Path(v) for k, v in inputs.items()})


def execute(job: CompareJob, out: Path) -> None:
    """Write ``summary.json``, the plots, ``report.md`` and ``report.html`` into ``out``."""
    summary = collect(job.params, job.inputs)
    summary["claims"] = claims(summary)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    pngs = plots(summary, out)
    md = markdown(summary, pngs)
    (out / "report.md").write_text(md)
    title = f"tli compare: {job.params['experiment']['name']}"
    (out / "report.html").write_text(to_html(md, out, title=title))


# ---------------------------------------------------------------------------- formatting


def _f(x: float | None, nd: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _i(x: int | None) -> str:
    return "n/a" if x is None else f"{x:,}"


def _m(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 1e6:,.2f}M"


def _sp(s: dict[str, Any] | None, nd: int = 4) -> str:
    """mean ± std (min..max) over the seeds."""
    if not s:
        return "n/a"
    if s["n"] == 1:
        return f"{s['mean']:.{nd}f}"
    return f"{s['mean']:.{nd}f} ± {s['std']:.{nd}f} ({s['min']:.{nd}f}..{s['max']:.{nd}f})"


def _acc(a: dict[str, Any] | None) -> str:
    if not a:
        return "n/a"
    ci = f" ± {1.96 * a['se']:.3f}" if a.get("se") is not None else ""
    return f"{a['acc']:.3f}{ci}"


def _flops(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


# ---------------------------------------------------------------------------- markdown


def _setup(s: dict[str, Any]) -> list[str]:
    e, b = s["experiment"], s["base"]
    t = e["train"]
    tokens_step = t["seq_len"] * t["batch_size"] * t["workers"] * t["grad_accum"]
    data = s["data"]
    ev = e["eval"]
    lines = [
        "## Setup", "",
        f"- base: {e['base']['model'] or 'bundled SmolLM2-135M-Instruct'} "
        f"({b['layers']} layers, {_i(b['parameters'])} parameters)",
        "- data: " + ", ".join(e["data"]["sources"] + e["data"]["extra"]) + "; tokens: "
        + ", ".join(f"{k} {_i(v.get('tokens'))}" for k, v in data.items()),
        f"- training, the same for every method and seed: {t['steps']} steps x {tokens_step:,} "
        f"tokens ({t['steps'] * tokens_step:,} tokens), lr {t['lr']:g} (warmup {t['warmup']}, "
        f"cosine to {t['min_lr_ratio']:g}x), seq {t['seq_len']} x batch {t['batch_size']}, "
        f"bf16 {'on' if t['bf16'] else 'off'}; validation loss every "
        f"{t['validation']['every'] or t['steps']} steps on {t['validation']['blocks']} blocks",
        f"- seeds: {', '.join(map(str, e['seeds']))}"
        + (" (fewer than 3: the spread over seeds means little)" if len(e["seeds"]) < 3 else ""),
        f"- evaluation: held-out loss on {ev['heldout']['blocks'] if ev['heldout'] else 0} "
        f"blocks; 0-shot tasks {', '.join(ev['tasks']) or 'none'}"
        + (f", {ev['limit']} items each" if ev["limit"] else ""),
    ]  # fmt: skip
    return lines + [""]


def _methods(s: dict[str, Any]) -> list[str]:
    lines = ["## Methods and how they are matched", "",
             "Equal added parameters where the method allows it (TLI, LLaMA Pro and DUS add the "
             "same layers), MoE at the nearest equal active parameters, G_stack as it comes; "
             "every method trains on the same tokens.", "",
             "| method | recipe | layers | parameters | active / token | added | trained | "
             "matching |", "|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for m in s["methods"]:
        c = m["cost"]
        lines.append(
            f"| {m['name']} | {m['title']} ({m['paper']}): {m['what']} | {m['layers']} | "
            f"{_m(c['parameters'])} | {_m(c['active'])} | {_m(m['added'])} | "
            f"{_m(c['trainable'])} | {m['note']} |"
        )
    return [*lines, ""]


def _cost(s: dict[str, Any]) -> list[str]:
    lines = ["## Cost", "", "| method | trained parameters | FLOPs / token | training FLOPs | "
             "training s (steps) | wall s (with start-up) |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for m in s["methods"]:
        lines.append(
            f"| {m['name']} | {_m(m['cost']['trainable'])} | "
            f"{_flops(m['cost']['flops_per_token'])} | {_flops(m['train_flops'])} | "
            f"{_sp(m['train_s'], 0)} | {_sp(m['wall_s'], 0)} |"
        )
    return [*lines, "", "FLOPs: forward + backward as training counts them for MFU "
            "(`tli.train.step.flops_per_token`), MoE's skipped experts taken off; "
            "times: mean ± std (min..max) over the seeds.", ""]  # fmt: skip


def _loss(s: dict[str, Any], pngs: list[str]) -> list[str]:
    b = s["base"]
    lines = ["## Held-out loss: step 0 and after training", "",
             f"Base: {_f(b['heldout'])} nats/token ({b['heldout_blocks']} blocks x "
             f"{b['heldout_seq_len']} tokens of the held-out split, the same for every model).",
             "", "| method | step 0 | after training (mean ± std (min..max)) | change |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for m in s["methods"]:
        a, f = m["init"]["heldout"], m["final_heldout"]
        change = _f(f["mean"] - a) if f and a is not None else "n/a"
        lines.append(f"| {m['name']} | {_f(a)} | {_sp(f)} | {change} |")
    if "loss.png" in pngs:
        lines += ["", "![held-out loss at step 0 and after training](loss.png)"]
    return [*lines, ""]


def _curves(s: dict[str, Any], pngs: list[str]) -> list[str]:
    ref = s["reference"]
    lines = ["## Validation loss during training", ""]
    if "curves.png" in pngs:
        lines += ["![validation loss vs step: mean over seeds, band = min..max](curves.png)", ""]
    if ref["name"]:
        lines += [f"Steps to reach {ref['name']}'s final validation loss "
                  f"({_f(ref['final_val_loss'])}, mean over seeds; the validation split, "
                  "measured every "
                  f"{s['experiment']['train']['validation']['every'] or 'end'} steps):", "",
                  "| method | steps | final validation loss |", "|---|---:|---:|"]  # fmt: skip
        for m in s["methods"]:
            st = m["steps_to_reference"]
            last = m["curve"][-1]["mean"] if m["curve"] else None
            lines.append(f"| {m['name']} | {st if st is not None else 'not reached'} | "
                         f"{_f(last)} |")  # fmt: skip
    return [*lines, ""]


def _accuracy(s: dict[str, Any], pngs: list[str]) -> list[str]:
    tasks = sorted({t for m in s["methods"] for t in m["init"]["acc"]} | set(s["base"]["acc"]))
    if not tasks:
        return ["## 0-shot accuracy", "", "No benchmark tasks in this experiment (eval.tasks).", ""]
    lines = ["## 0-shot accuracy", "", "Accuracy ± the 95% interval (1.96 x lm-eval's per-item "
             "standard error); after training: the mean over the seeds.", "",
             "| task | items | base | " + " | ".join(
                 f"{m['name']} step 0 | {m['name']} trained" for m in s["methods"]) + " |",
             "|---|---:|---:|" + "---:|---:|" * len(s["methods"])]  # fmt: skip
    for t in tasks:
        items = next((a[t]["items"] for a in [s["base"]["acc"]] + [m["init"]["acc"]
                      for m in s["methods"]] if t in a), None)  # fmt: skip
        cells = [_acc(s["base"]["acc"].get(t))]
        for m in s["methods"]:
            cells += [_acc(m["init"]["acc"].get(t)), _acc(m["final_acc"].get(t))]
        lines.append(f"| {t} | {items if items is not None else 'n/a'} | " + " | ".join(cells)
                     + " |")  # fmt: skip
    if "accuracy.png" in pngs:
        lines += ["", "![0-shot accuracy at step 0 and after training](accuracy.png)"]
    return [*lines, ""]


def _claims(s: dict[str, Any]) -> list[str]:
    e = s["experiment"]
    t, ev = e["train"], e["eval"]
    lines = ["## The abstract's claims, checked", "",
             "The paper (arXiv 2410.11654; only its abstract is available to us) reports these "
             "for Llama 3 1B/3B/8B against DUS and MoE upcycling on Korean benchmarks. Our "
             "verdicts come from this experiment's numbers alone.", "",
             "| claim | verdict | figure | caveats |", "|---|---|---|---|"]  # fmt: skip
    for c in s["claims"]:
        lines.append(f"| {c['claim']} | **{c['verdict']}** | {c['figure']} | "
                     f"{c['caveat'] or '-'} |")  # fmt: skip
    size = s["base"]["parameters"]
    lines += ["", f"Caveats for all of them: a {_m(size)}-parameter base (the paper's are 1B-8B); "
              f"{t['steps']} training steps of {t['seq_len'] * t['batch_size']} tokens; "
              f"{len(e['seeds'])} seed(s); {ev['limit'] or 'all'} items per task; the corpus "
              f"above. Two losses within {EQUAL_LOSS} nats count as equal.", ""]  # fmt: skip
    return lines


def _versions(s: dict[str, Any]) -> list[str]:
    lines = ["## Runs", "", "| method | seed | final held-out loss | train s | tokens |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for m in s["methods"]:
        for seed, r in m["runs"].items():
            lines.append(f"| {m['name']} | {seed} | {_f(r['heldout'])} | {_f(r['train_s'], 0)} | "
                         f"{_i(r['tokens'])} |")  # fmt: skip
    return [*lines, ""]


def markdown(s: dict[str, Any], pngs: list[str]) -> str:
    """The report as Markdown (``pngs``: the plots that were drawn)."""
    lines = [f"# tli compare: {s['experiment']['name']}", ""]
    if s["experiment"].get("description"):
        lines += [s["experiment"]["description"].strip(), ""]
    for part in (_setup(s), _methods(s), _cost(s), _loss(s, pngs), _curves(s, pngs),
                 _accuracy(s, pngs), _claims(s), _versions(s)):  # fmt: skip
        lines += part
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots


def plots(s: dict[str, Any], out: Path) -> list[str]:
    """Draw the PNGs into ``out``; return the names of those drawn."""
    from tli.figures import pyplot, save_all

    plt = pyplot()
    draws = (_plot_curves, _plot_loss, _plot_accuracy)
    return save_all(
        out, [(name, lambda d=d: d(plt, s)) for name, d in zip(PLOTS, draws, strict=True)]
    )


def _plot_curves(plt: Any, s: dict[str, Any]) -> Any:
    ms = [m for m in s["methods"] if m["curve"]]
    if not ms:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in ms:
        xs = [p["step"] for p in m["curve"]]
        (line,) = ax.plot(xs, [p["mean"] for p in m["curve"]], marker="o", ms=3, label=m["name"])
        ax.fill_between(xs, [p["min"] for p in m["curve"]], [p["max"] for p in m["curve"]],
                        color=line.get_color(), alpha=0.2)  # fmt: skip
    target = s["reference"]["final_val_loss"]
    if target is not None:
        ax.axhline(target, ls="--", c="#555", lw=1, label=f"{s['reference']['name']} final")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"mean over {len(s['experiment']['seeds'])} seed(s); band: min..max")
    ax.legend(fontsize=8)
    return fig


def _plot_loss(plt: Any, s: dict[str, Any]) -> Any:
    ms = [m for m in s["methods"] if m["init"]["heldout"] is not None]
    if not ms:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(len(ms))
    ax.bar([x - 0.2 for x in xs], [m["init"]["heldout"] for m in ms], 0.4, label="step 0",
           color="#999")  # fmt: skip
    fin = [m["final_heldout"] for m in ms]
    ax.bar([x + 0.2 for x in xs], [f["mean"] if f else 0 for f in fin], 0.4,
           yerr=[[f["mean"] - f["min"] if f else 0 for f in fin],
                 [f["max"] - f["mean"] if f else 0 for f in fin]],
           label="after training (range over seeds)", color="#4c72b0")  # fmt: skip
    if s["base"]["heldout"] is not None:
        ax.axhline(s["base"]["heldout"], ls="--", c="#c44e52", lw=1, label="base")
    ax.set_xticks(list(xs), [m["name"] for m in ms])
    ax.set_ylabel("held-out loss (nats/token)")
    lo = min([m["init"]["heldout"] for m in ms] + [f["min"] for f in fin if f])
    ax.set_ylim(lo * 0.9, None)
    ax.legend(fontsize=8)
    return fig


def _plot_accuracy(plt: Any, s: dict[str, Any]) -> Any:
    tasks = sorted(set(s["base"]["acc"]))
    if not tasks:
        return None
    ms = s["methods"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1, 3.6), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        for j, (key, label) in enumerate((("init", "step 0"), ("final_acc", "trained"))):
            vals = [(m[key]["acc"] if key == "init" else m[key]).get(t) for m in ms]
            ax.bar([i + (j - 0.5) * 0.4 for i in range(len(ms))],
                   [v["acc"] if v else 0 for v in vals], 0.4,
                   yerr=[1.96 * v["se"] if v and v.get("se") else 0 for v in vals],
                   label=label, color=("#999", "#4c72b0")[j])  # fmt: skip
        ax.axhline(s["base"]["acc"][t]["acc"], ls="--", c="#c44e52", lw=1, label="base")
        ax.set_xticks(range(len(ms)), [m["name"] for m in ms], rotation=30, fontsize=8)
        ax.set_title(t)
    axes[0][0].set_ylabel("0-shot accuracy (95% CI)")
    axes[0][-1].legend(fontsize=7)
    return fig


# ---------------------------------------------------------------------------- HTML


def to_html(md: str, folder: Path, *, title: str) -> str:
    """A self-contained HTML page of the Markdown report (its PNGs inline, as base64)."""
    body: list[str] = []
    table = False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= set("-:") and c for c in cells):
                continue
            tag = "th" if not table else "td"
            if not table:
                body.append("<table>")
                table = True
            body.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if table:
            body.append("</table>")
            table = False
        body.append(_block(line, folder))
    if table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
             "padding:.2em .5em;vertical-align:top}img{max-width:100%}")  # fmt: skip
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(b for b in body if b)
            + "\n</body></html>\n")  # fmt: skip


def _inline(text: str) -> str:
    out = html.escape(text)
    parts = out.split("**")
    out = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = out.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _block(line: str, folder: Path) -> str:
    if line.startswith("!["):
        alt, _, rest = line[2:].partition("](")
        png = folder / rest.rstrip(")")
        data = base64.b64encode(png.read_bytes()).decode() if png.is_file() else ""
        return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'
    if line.startswith("#"):
        level = len(line) - len(line.lstrip("#"))
        return f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>"
    if line.startswith("- "):
        return f"<li>{_inline(line[2:])}</li>"
    return f"<p>{_inline(line)}</p>" if line.strip() else ""
