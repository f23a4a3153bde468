"""What each pipeline step shows in the Kubeflow UI: typed artifacts read from the stored version.

The stage store stays the source of truth: every value here is read from a version's output
folder (and its manifest) after the stage ran or was found cached, never computed anew. Each
step's main artifact keeps the small JSON reference (stage, version, path, content hash) that
the next steps read, as its file; its *metadata* says what the version holds:

===============  ======================  ==================================================
stage            main artifact           also
===============  ======================  ==================================================
import-base      ``Model``               architecture, layers, parameters, source (the Hub
inject           ``Model``               commit when it came from the Hub), plan summary
train            ``Model``               + steps, tokens, final training/validation loss
data             ``Dataset``             documents, tokens and sha256 per split
tune             ``Artifact``            ``Metrics`` of the best trial, ``Markdown`` table
eval             ``Artifact``            ``Metrics``: every task metric and held-out loss
report           ``Artifact``            ``HTML`` (plots inline) and ``Markdown``
===============  ======================  ==================================================

Metric names are those of :func:`tli.tracking.eval_metrics` (``arc_easy/acc``,
``heldout/loss``...), so the KFP run view and MLflow show the same names and values.

Nothing here imports kfp: :func:`publish` fills objects with KFP's artifact interface
(``metadata``, ``path``, ``log_metric``) that the components pass in.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tli.tracking import eval_metrics

# Keys of the reference every main artifact's metadata starts with.
REF_KEYS = ("stage", "version", "status", "sha256")
TRIAL_COLUMNS = ("rank", "trial", "interval", "init", "alpha", "lr", "layers_added",
                 "params_added", "steps_run", "best_loss", "final_loss", "status")  # fmt: skip
# trials.csv columns that are numbers: the best trial's Metrics.
TRIAL_METRICS = ("objective", "best_loss", "final_loss", "best_step", "steps_run", "interval",
                 "alpha", "lr", "layers_out", "layers_added", "params_added",
                 "params_total")  # fmt: skip
_IMG = re.compile(r'<img src="([^"/\\]+\.png)"')
_MD_IMG = re.compile(r"^!\[([^\]]*)\]\(([^)/\\]+\.png)\)$", re.MULTILINE)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(text: Any) -> float | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if v == v and abs(v) != float("inf") else None


# ---------------------------------------------------------------------------- metadata


def model_metadata(folder: Path) -> dict[str, Any]:
    """What a model folder is: architecture, layers, parameters, dtype, plan, source."""
    from tli.modelfolder import ModelFolder

    m = ModelFolder.open(folder, decoder=False)  # headers only: no tensor is read
    cfg = m.config
    arch = (cfg.get("architectures") or [None])[0]
    out: dict[str, Any] = {
        "architecture": arch or cfg.get("model_type") or "unknown",
        "model_type": cfg.get("model_type") or "unknown",
        "layers": m.num_layers,
        "parameters": m.parameters,
        "hidden_size": cfg.get("hidden_size") or 0,
        "dtype": str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
    }
    plan = _json(folder / "tli_plan.json")
    if plan:
        params = plan.get("params") or {}
        shown = ", ".join(f"{k}={v}" for k, v in params.items() if v is not None)
        out["method"] = str(plan.get("method"))
        out["plan"] = (f"{plan.get('method')} ({shown}): {plan.get('num_layers_in')} -> "
                       f"{plan.get('num_layers_out')} layers, new "
                       f"{plan.get('new_layers')}")  # fmt: skip
        out["new_layers"] = ",".join(str(i) for i in plan.get("new_layers") or [])
        out["function_preserving"] = bool(plan.get("function_preserving"))
    else:
        out["method"] = "none (a base model)"
    hub = _json(folder / "tli_hub.json")
    if hub:
        out["source"] = f"hf:{hub.get('repo_id')}@{hub.get('commit')}"
    return out


def _source_of(version_dir: Path) -> str | None:
    """import-base: where the base came from (its external input), from the manifest."""
    src = (_json(version_dir / "manifest.json").get("inputs") or {}).get("source") or {}
    path = src.get("path")
    return f"{Path(path).name} (sha256 {str(src.get('sha256'))[:12]})" if path else None


def train_metadata(out: Path) -> dict[str, Any]:
    """A trained model: the model folder's metadata and the training's result."""
    md = model_metadata(out / "model")
    prov = _json(out / "tli_train.json")
    for key, value in (prov.get("result") or {}).items():
        if value is not None:
            md[key] = value
    new = prov.get("new_layers")
    freeze = (prov.get("config") or {}).get("freeze")
    md["trained"] = "all layers" if freeze == "none" or not new else f"layers {new}"
    return md


def dataset_metadata(out: Path) -> dict[str, Any]:
    """A corpus: its sources and, per split, documents, tokens and the file's sha256."""
    man = _json(out / "manifest.json")
    md: dict[str, Any] = {"format": man.get("format", "")}
    for split, info in (man.get("splits") or {}).items():
        for key in ("documents", "tokens", "sha256"):
            if key in info:
                md[f"{split}_{key}"] = info[key]
    md["sources"] = ", ".join(str(s.get("name")) for s in man.get("sources") or [])
    hubs = [s["hub"] for s in man.get("sources") or [] if s.get("hub")]
    if hubs:
        md["hub"] = ", ".join(f"hf:{h.get('repo_id')}@{h.get('commit')}" for h in hubs)
    tok = man.get("tokenizer") or {}
    md["tokenizer_sha256"] = str(tok.get("fingerprint", ""))
    return md


def read_trials(out: Path) -> list[dict[str, str]]:
    """The tune stage's ``trials.csv`` rows (best first)."""
    f = out / "trials.csv"
    if not f.is_file():
        return []
    with f.open(newline="") as fh:
        return list(csv.DictReader(fh))


def tune_metrics(out: Path) -> dict[str, float]:
    """The best trial's numbers from ``trials.csv`` and how the trials ended."""
    rows = read_trials(out)
    best = next((r for r in rows if _number(r.get("objective")) is not None), None)
    metrics: dict[str, float] = {}
    if best is not None:
        for key in TRIAL_METRICS:
            v = _number(best.get(key))
            if v is not None:
                metrics[key] = v
    metrics["trials"] = float(len(rows))
    for status in ("completed", "stopped", "failed"):
        metrics[f"trials_{status}"] = float(sum(r.get("status") == status for r in rows))
    return metrics


def eval_record(out: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(results.json, heldout.json)`` of an evaluation folder (``{}`` / None when absent)."""
    heldout = _json(out / "heldout.json")
    return _json(out / "results.json"), heldout or None


def metadata(stage: str, ref: Mapping[str, Any]) -> dict[str, Any]:
    """The main artifact's metadata: the reference, then what the stored version holds."""
    md: dict[str, Any] = {k: ref[k] for k in REF_KEYS if k in ref}
    md["store_path"] = str(ref.get("path", ""))
    out = Path(ref["output"])
    if stage in ("import-base", "inject"):
        md.update(model_metadata(out))
        if stage == "import-base" and "source" not in md:
            md["source"] = _source_of(Path(ref["path"])) or "unknown"
    elif stage == "train":
        md.update(train_metadata(out))
    elif stage == "data":
        md.update(dataset_metadata(out))
    elif stage == "tune":
        rows = read_trials(out)
        best = next((r for r in rows if _number(r.get("objective")) is not None), None)
        md["best_trial"] = best["trial"] if best else "none (every trial failed)"
        md["trials"] = len(rows)
    elif stage == "eval":
        results, heldout = eval_record(out)
        md["tasks"] = ", ".join(sorted(results.get("results") or {}))
        if heldout:
            md["heldout_loss"] = heldout.get("loss")
    return md


# ---------------------------------------------------------------------------- documents


def trials_markdown(out: Path) -> str:
    """The table of every trial (``trials.csv``), best first, as Markdown."""
    rows = read_trials(out)
    if not rows:
        return "# Tune: trials\n\nNo trials.csv in the tune stage's output.\n"
    lines = ["# Tune: trials, best first", "", "| " + " | ".join(TRIAL_COLUMNS) + " |",
             "|" + "---|" * len(TRIAL_COLUMNS)]  # fmt: skip
    for r in rows:
        lines.append("| " + " | ".join(r.get(c, "") or "-" for c in TRIAL_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def inline_html(out: Path) -> str:
    """``report.html`` with its PNG plots inline (base64 data URIs): one self-contained page."""
    page = (out / "report.html").read_text()

    def inline(m: re.Match[str]) -> str:
        png = out / m.group(1)
        if not png.is_file():
            return m.group(0)
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        return f'<img src="data:image/png;base64,{data}"'

    return _IMG.sub(inline, page)


def report_markdown(out: Path) -> str:
    """``report.md``, its image lines pointing at the HTML artifact (which has the plots)."""
    text = (out / "report.md").read_text()
    return _MD_IMG.sub(lambda m: f"*({html.escape(m.group(1))}: plot in the HTML artifact)*", text)


def eval_kfp_metrics(out: Path) -> dict[str, float]:
    """The eval step's Metrics: :func:`tli.tracking.eval_metrics` of the stored records."""
    results, heldout = eval_record(out)
    return eval_metrics(results, heldout)


def publish(stage: str, ref: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, Any]:
    """Fill a step's KFP output artifacts from its stored version.

    Args:
        stage: the stage name.
        ref: the stage's reference (:meth:`tli.pipeline.store.StageResult.to_dict`).
        outputs: KFP artifacts by role: ``ref`` (the main one: gets :func:`metadata`),
            ``metrics`` (``log_metric`` for each value), ``table`` (the trials as Markdown),
            ``html`` and ``markdown`` (the report).

    Returns:
        The main artifact's metadata.
    """
    out = Path(ref["output"])
    md = metadata(stage, ref)
    if "ref" in outputs:
        outputs["ref"].metadata.update(md)
    if "metrics" in outputs:
        values = eval_kfp_metrics(out) if stage == "eval" else tune_metrics(out)
        for name, value in values.items():
            outputs["metrics"].log_metric(name, value)
    documents = {"table": trials_markdown, "html": inline_html, "markdown": report_markdown}
    for role, make in documents.items():
        if role in outputs:
            Path(outputs[role].path).parent.mkdir(parents=True, exist_ok=True)
            Path(outputs[role].path).write_text(make(out))
    return md
