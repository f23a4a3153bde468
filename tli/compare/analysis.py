"""The numbers of a comparison, from the stages' own files, and the verdicts on the claims.

:func:`collect` reads what the runs wrote (held-out losses of the eval stages, the train stage's
``metrics.jsonl`` and ``tli_train.json``, the inject stage's provenance and plan) into one
JSON-able summary; :func:`claims` judges the abstract's claims on it. Nothing is invented: a
number that is not there is None, and a claim it would need is "not measurable here".

Statistics. Seeds: mean, sample standard deviation and range of the final numbers over the
seeds (the spread of training). Accuracy: lm-eval's per-item standard error, a 95% interval of
+-1.96 SE; every model answers the same items, so the seeds do not narrow it, and a difference
between two methods counts only when it exceeds 1.96 * sqrt(SE_a^2 + SE_b^2). Losses are
measured on the same held-out blocks for every model; two within :data:`EQUAL_LOSS` are equal
(bf16 rounding separates function-preserving inits by ~1e-3).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

EQUAL_LOSS = 0.005  # nats/token: below this, two held-out losses count as equal
Z95 = 1.96


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def spread(xs: list[float]) -> dict[str, Any] | None:
    """mean, std (sample; 0 for one value), min, max and n of ``xs``; None when empty."""
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}  # fmt: skip


def accuracies(results: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """task -> {acc, se, items} from lm-eval's results.json (tasks without ``acc`` left out)."""
    out: dict[str, dict[str, float]] = {}
    if not results:
        return out
    n = results.get("n-samples") or {}
    for task, m in (results.get("results") or {}).items():
        acc, se = m.get("acc,none"), m.get("acc_stderr,none")
        if isinstance(acc, int | float):
            items = (n.get(task) or {}).get("effective")
            se_ok = isinstance(se, int | float) and math.isfinite(se)
            out[task] = {"acc": float(acc), "se": float(se) if se_ok else None, "items": items}
    return out


def _eval(folder: Path) -> dict[str, Any]:
    held = _json(folder / "heldout.json")
    return {"heldout": held.get("loss"), "heldout_blocks": held.get("blocks"),
            "heldout_seq_len": held.get("seq_len"),
            "acc": accuracies(_json(folder / "results.json") or None)}  # fmt: skip


def _curve(train_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (train_dir / "metrics.jsonl").read_text().splitlines()
            if x.strip()] if (train_dir / "metrics.jsonl").is_file() else []  # fmt: skip
    return [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss") is not None]


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[dict[str, float]]:
    """Per step that every seed measured: mean, min and max validation loss."""
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    by = [dict(c) for c in curves]
    out = []
    for s in steps:
        xs = [d[s] for d in by]
        out.append({"step": s, "mean": statistics.fmean(xs), "min": min(xs), "max": max(xs)})
    return out


def steps_to_reach(curve: list[dict[str, float]], target: float | None) -> int | None:
    """The first step at which the mean curve is at or below ``target`` (None: never)."""
    if target is None:
        return None
    return next((int(p["step"]) for p in curve if p["mean"] <= target + 1e-9), None)


def _run(train_dir: Path, eval_dir: Path) -> dict[str, Any]:
    """One seed's run: its final evaluation, validation curve, tokens and times."""
    prov = _json(train_dir / "tli_train.json")
    res, timing = prov.get("result") or {}, prov.get("timing") or {}
    return {**_eval(eval_dir), "curve": _curve(train_dir), "tokens": res.get("tokens"),
            "steps": res.get("steps"), "train_s": res.get("train_seconds"),
            "wall_s": timing.get("wall_s")}  # fmt: skip


def _acc_over_seeds(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """task -> mean accuracy over the seeds, the mean per-item SE, the seeds' spread, items."""
    tasks = sorted(set.intersection(*(set(r["acc"]) for r in runs))) if runs else []
    out = {}
    for t in tasks:
        accs = [r["acc"][t]["acc"] for r in runs]
        ses = [r["acc"][t]["se"] for r in runs if r["acc"][t]["se"] is not None]
        out[t] = {"acc": statistics.fmean(accs), "se": statistics.fmean(ses) if ses else None,
                  "seeds": spread(accs), "items": runs[0]["acc"][t]["items"]}  # fmt: skip
    return out


def method_summary(m: dict[str, Any], inputs: dict[str, Path], seeds: list[int],
                   seq_len: int) -> dict[str, Any]:  # fmt: skip
    """Everything the report says about one method (``m``: its matched settings)."""
    from tli.compare.cost import training_cost

    name = m["name"]
    inject = inputs[f"{name}/inject"]
    plan = _json(inject / "tli_plan.json")
    prov = _json(inject / "tli_provenance.json")
    cost = training_cost(_json(inject / "config.json"), m["freeze"], plan.get("new_layers"),
                         seq_len)  # fmt: skip
    runs = {s: _run(inputs[f"{name}/s{s}/train"], inputs[f"{name}/s{s}/eval_final"])
            for s in seeds}  # fmt: skip
    tokens = [r["tokens"] for r in runs.values() if r["tokens"] is not None]
    params = prov.get("parameters") or {}
    return {
        **m,
        "cost": cost.to_dict(),
        "added": (params.get("after") or 0) - (params.get("before") or 0),
        "function_preserving": plan.get("function_preserving"),
        "init": _eval(inputs[f"{name}/eval_init"]),
        "final_heldout": spread([r["heldout"] for r in runs.values() if r["heldout"] is not None]),
        "curve": mean_curve([r["curve"] for r in runs.values() if r["curve"]]),
        "final_acc": _acc_over_seeds(list(runs.values())),
        "tokens": max(tokens) if tokens else None,
        "train_flops": cost.flops_per_token * max(tokens) if tokens else None,
        "train_s": spread([r["train_s"] for r in runs.values() if r["train_s"] is not None]),
        "wall_s": spread([r["wall_s"] for r in runs.values() if r["wall_s"] is not None]),
        "runs": {str(s): r for s, r in runs.items()},
    }


def collect(params: dict[str, Any], inputs: dict[str, Path]) -> dict[str, Any]:
    """The summary of a comparison (``params``: :func:`tli.compare.run.report_params`)."""
    exp = params["experiment"]
    seq_len = exp["train"]["seq_len"]
    methods = [method_summary(m, inputs, exp["seeds"], seq_len) for m in params["methods"]]
    ref = next((m for m in methods if m["name"] == exp.get("reference")), None)
    target = ref["curve"][-1]["mean"] if ref and ref["curve"] else None
    for m in methods:
        m["steps_to_reference"] = steps_to_reach(m["curve"], target)
    base_prov = _json(inputs["base"] / "config.json")
    data = _json(inputs["data"] / "manifest.json")
    return {
        "experiment": exp,
        "base": {
            **_eval(inputs["eval_base"]),
            "layers": base_prov.get("num_hidden_layers"),
            "parameters": methods[0]["cost"]["parameters"] - methods[0]["added"]
            if methods
            else None,
        },  # fmt: skip
        "data": {
            s: {k: v.get(k) for k in ("documents", "tokens")}
            for s, v in (data.get("splits") or {}).items()
        },  # fmt: skip
        "reference": {"name": exp.get("reference"), "final_val_loss": target},
        "methods": methods,
    }


# ---------------------------------------------------------------------------- claims


def _pick(summary: dict[str, Any], recipe: str) -> dict[str, Any] | None:
    """The method of a recipe: the one named after it, else the first that uses it."""
    ms = [m for m in summary["methods"] if m["recipe"] == recipe]
    return next((m for m in ms if m["name"] == recipe), ms[0] if ms else None)


def _mean_acc(accs: dict[str, dict[str, Any]]) -> tuple[float, float | None] | None:
    """(mean accuracy over tasks, its SE) or None without tasks."""
    if not accs:
        return None
    ses = [a["se"] for a in accs.values()]
    se = math.sqrt(sum(s * s for s in ses)) / len(ses) if all(s is not None for s in ses) else None
    return statistics.fmean(a["acc"] for a in accs.values()), se


def _compare_acc(a: tuple[float, float | None], b: tuple[float, float | None]):
    """("holds" | "does not hold" | "not measurable here", diff, 95% half-width)."""
    d = a[0] - b[0]
    if a[1] is None or b[1] is None:
        return "not measurable here", d, None
    h = Z95 * math.sqrt(a[1] ** 2 + b[1] ** 2)
    return ("holds" if d > h else "does not hold" if d < -h else "not measurable here"), d, h


def _claim(claim: str, verdict: str, figure: str, caveat: str) -> dict[str, str]:
    return {"claim": claim, "verdict": verdict, "figure": figure, "caveat": caveat}


def _init_claim(tli: dict | None, other: dict | None, label: str) -> dict[str, str]:
    claim = f"Better initialisation than {label}: lower loss at step 0"
    if tli is None or other is None or None in (tli["init"]["heldout"], other["init"]["heldout"]):
        return _claim(claim, "not measurable here", f"TLI or {label} is not in this experiment "
                      "(or has no held-out loss)", "")  # fmt: skip
    a, b = tli["init"]["heldout"], other["init"]["heldout"]
    verdict = "holds" if a < b - EQUAL_LOSS else "does not hold"
    caveat = ""
    if abs(a - b) <= EQUAL_LOSS:
        caveat = (f"equal within {EQUAL_LOSS} nats: "
                  + ("both start from the base's function" if tli["function_preserving"]
                     and other["function_preserving"] else "the same loss"))  # fmt: skip
    return _claim(claim, verdict, f"held-out loss at step 0: TLI {a:.4f}, {label} {b:.4f}", caveat)


def _steps_claim(s: dict[str, Any], tli: dict | None, dus: dict | None) -> dict[str, str]:
    claim = "Fewer training steps: TLI reaches DUS's final loss sooner"
    every = s["experiment"]["train"]["validation"]["every"]
    if tli is None or dus is None or not tli["curve"] or not dus["curve"]:
        return _claim(claim, "not measurable here", "no validation curves of TLI and DUS "
                      "(set train.validation.every)", "")  # fmt: skip
    target = dus["curve"][-1]["mean"]
    a, b = steps_to_reach(tli["curve"], target), steps_to_reach(dus["curve"], target)
    fig = (f"steps to DUS's final validation loss {target:.4f} (mean of the seeds): TLI "
           f"{a if a is not None else 'not reached'}, DUS {b}")  # fmt: skip
    first = tli["curve"][0]["step"]
    if a is not None and a == b == first:
        return _claim(claim, "not measurable here", fig, f"both at the first validation point "
                      f"(step {first}): validate more often (train.validation.every)")  # fmt: skip
    verdict = "holds" if a is not None and a < b else "does not hold"
    return _claim(claim, verdict, fig, f"validation every {every} steps")


def _acc_claim(tli: dict | None, others: list[tuple[str, dict | None]]) -> dict[str, str]:
    present = [label for label, o in others if o is not None] or [label for label, _ in others]
    claim = f"Higher benchmark accuracy after training (than {' and '.join(present)})"
    mine = _mean_acc(tli["final_acc"]) if tli else None
    rows = [(label, _mean_acc(o["final_acc"])) for label, o in others if o is not None]
    rows = [(label, v) for label, v in rows if v is not None]
    if mine is None or not rows:
        return _claim(claim, "not measurable here", "no accuracies (eval.tasks) for TLI and a "
                      "baseline", "")  # fmt: skip
    verdicts, parts = [], [f"mean 0-shot accuracy over tasks: TLI {mine[0]:.3f}"]
    for label, v in rows:
        verdict, d, h = _compare_acc(mine, v)
        verdicts.append(verdict)
        ci = f" (95% CI of the difference ±{h:.3f})" if h is not None else ""
        parts.append(f"{label} {v[0]:.3f}: {d:+.3f}{ci}")
    verdict = ("holds" if all(v == "holds" for v in verdicts) else "does not hold"
               if "does not hold" in verdicts else "not measurable here")  # fmt: skip
    caveat = "" if verdict != "not measurable here" else "the differences are within the noise "\
        "of this many items: more items (eval.limit) or more tasks would decide"  # fmt: skip
    return _claim(claim, verdict, "; ".join(parts), caveat)


def _untrained_claim(s: dict[str, Any], tli: dict | None) -> dict[str, str]:
    claim = "Useful without training: the injected model is as good as the base"
    base = s["base"]
    if tli is None or tli["init"]["heldout"] is None or base["heldout"] is None:
        return _claim(claim, "not measurable here", "no held-out loss of TLI and the base", "")
    a, b = tli["init"]["heldout"], base["heldout"]
    ok = a <= b + EQUAL_LOSS
    fig = f"held-out loss at step 0: TLI {a:.4f}, base {b:.4f}"
    mine, ref = _mean_acc(tli["init"]["acc"]), _mean_acc(base["acc"])
    if mine is not None and ref is not None:
        verdict, d, h = _compare_acc(mine, ref)
        ok = ok and verdict != "does not hold"
        fig += f"; mean accuracy TLI {mine[0]:.3f}, base {ref[0]:.3f} ({d:+.3f})"
    caveat = ("TLI's identity init computes the base's function exactly: it is as useful as the "
              "base by construction, and says nothing of what the added depth brings without "
              "training") if tli["function_preserving"] else ""  # fmt: skip
    return _claim(claim, "holds" if ok else "does not hold", fig, caveat)


def claims(s: dict[str, Any]) -> list[dict[str, str]]:
    """The abstract's claims, each with its verdict from ``s``, the figure and the caveats."""
    tli, dus, moe = _pick(s, "tli"), _pick(s, "dus"), _pick(s, "moe")
    return [
        _init_claim(tli, dus, "DUS"),
        _init_claim(tli, moe, "MoE upcycling"),
        _steps_claim(s, tli, dus),
        _acc_claim(tli, [("DUS", dus), ("MoE upcycling", moe)]),
        _untrained_claim(s, tli),
    ]
