"""`tli runs list|show|clean`: what the stage store holds, a result's lineage, and leftovers."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tli.errors import TliError


def register(sub: argparse._SubParsersAction) -> None:
    from tli.cli import OneLineParser

    p = sub.add_parser("runs", help="list stored stage versions and show a result's lineage")
    ps = p.add_subparsers(
        dest="action", metavar="ACTION", parser_class=OneLineParser, required=True
    )
    from tli.cli.flags import add_runtime_flags

    ls = ps.add_parser("list", help="every stored version, oldest first")
    add_runtime_flags(ls, ["store"])
    ls.add_argument("--stage", help="only this stage")
    ls.set_defaults(func=_list)
    sh = ps.add_parser("show", help="one version: its parameters, files and lineage")
    sh.add_argument("version", help="a version (a unique prefix is enough; or STAGE/VERSION)")
    add_runtime_flags(sh, ["store"])
    sh.set_defaults(func=_show)
    cl = ps.add_parser(
        "clean",
        help="remove folders left by stages and commands that were killed",
        description="Remove the unfinished folders that killed runs left: in the stage store "
        "(default), or with --dir beside the --out of standalone commands (.NAME.partial). "
        "A folder a live process holds is never touched. Interrupted train/tune runs are "
        "removed too (their checkpoints with them): resume them first if you want them.",
    )
    add_runtime_flags(cl, ["store"])
    cl.add_argument("--dir", action="append", default=[], metavar="DIR",
                    help="a folder where standalone commands wrote their --out (repeatable); "
                    "the store is then cleaned only when --store is also given")  # fmt: skip
    cl.add_argument("--dry-run", action="store_true", help="list them, remove nothing")
    cl.set_defaults(func=_clean)


def _open(args: argparse.Namespace):
    from tli.cli.flags import runtime_of
    from tli.pipeline.store import Store

    store = Store(runtime_of(args).store)
    if not store.root.is_dir():
        raise TliError(f"no store at {store.root}: run `tli pipeline run` or give --store")
    return store


def _inputs_text(m: dict[str, Any]) -> str:
    parts = []
    for name, i in m.get("inputs", {}).items():
        if i.get("stage"):
            parts.append(f"{name}={i['stage']}/{i['version']}")
        else:
            parts.append(f"{name}=<{Path(i['path']).name}>")
    return " ".join(parts)


def code_of(m: dict[str, Any]) -> str:
    """``current`` when a stored version was made by the code installed now, else ``other``."""
    from tli.errors import TliError
    from tli.pipeline.stages import get_stage

    try:
        stage = get_stage(m.get("stage", ""))  # pipeline stages and compare's own (method, ...)
    except TliError:
        return "other"  # a stage this tli does not have
    return "current" if m.get("code") == stage.code() else "other"


def _list(args: argparse.Namespace) -> int:
    store = _open(args)
    rows = [m for m in store.manifests() if not args.stage or m["stage"] == args.stage]
    if args.stage:
        from tli.pipeline.stages import get_stage

        get_stage(args.stage)
    if not rows:
        print(f"{store.root}: no stored versions")
    else:
        print(f"{'stage':<12} {'version':<20} {'finished':<26} {'seconds':>8}  code     inputs")
    for m in rows:
        print(
            f"{m['stage']:<12} {m['version']:<20} {m.get('ended', ''):<26} "
            f"{m.get('seconds', 0):>8.1f}  {code_of(m):<8} {_inputs_text(m)}"
        )
    other = sum(code_of(m) == "other" for m in rows)
    if other:
        print(
            f"{other} version(s) came from other tli code than the installed one: a run of the "
            "same config computes new versions (the old ones stay as they are)"
        )
    stale = store.stale_temps()
    if stale:
        size = sum(n for _, n in stale) / 1e6
        print(
            f"{len(stale)} unfinished folder(s) from killed stages ({size:,.1f} MB): "
            "`tli runs clean` removes them"
        )
    return 0


def _clean(args: argparse.Namespace) -> int:
    from tli import output

    found: list[tuple[Path, int, str, Any]] = []  # (folder, bytes, shown as, remover)
    if not args.dir or getattr(args, "runtime__store", None):
        store = _open(args)
        for tmp, size in store.stale_temps():
            found.append((tmp, size, str(tmp.relative_to(store.root)), store.remove_temp))
    for d in map(Path, args.dir):
        if not d.is_dir():
            raise TliError(f"--dir {d} is not a folder")
        for tmp, size in output.stale(d, include_resumable=True):
            found.append((tmp, size, str(tmp), output.remove_stale))
    verb = "would remove" if args.dry_run else "removed"
    for tmp, size, shown, remove in found:
        what = " (an interrupted train/tune run)" if output.is_resumable(tmp) else ""
        if not args.dry_run:
            remove(tmp)
        print(f"{verb} {shown} ({size / 1e6:,.1f} MB){what}")
    total = sum(n for _, n, _, _ in found) / 1e6
    print(
        f"{len(found)} unfinished folder(s), {total:,.1f} MB"
        + (" (dry run)" if args.dry_run else "")
    )
    return 0


def lineage(store: Any, m: dict[str, Any], indent: int = 0, seen: set | None = None) -> list[str]:
    """The tree of versions that produced ``m``, one line per node."""
    seen = set() if seen is None else seen
    key = (m["stage"], m["version"])
    pad = "  " * indent
    lines = []
    for name, i in m.get("inputs", {}).items():
        if not i.get("stage"):
            where = Path(i["path"]).name  # the full path is in the manifest
            lines.append(f"{pad}{name}: external {where} (sha256 {i['sha256'][:12]})")
            continue
        node = (i["stage"], i["version"])
        label = f"{pad}{name}: {i['stage']}/{i['version']}"
        if node in seen:
            lines.append(label + " (above)")
            continue
        seen.add(node)
        try:
            up = store.manifest(i["stage"], i["version"])
        except OSError:
            lines.append(label + " (missing from the store)")
            continue
        lines.append(label + f"  {_params_text(up)}")
        lines += lineage(store, up, indent + 1, seen)
    seen.add(key)
    return lines


def _params_text(m: dict[str, Any], width: int = 90) -> str:
    flat = []
    for section, fields in (m.get("params") or {}).items():
        if isinstance(fields, dict):
            flat += [f"{section}.{k}={v}" for k, v in fields.items() if v not in (None, [], {})]
    text = " ".join(flat)
    return text if len(text) <= width else text[: width - 3] + "..."


def _show(args: argparse.Namespace) -> int:
    import json

    store = _open(args)
    m = store.lookup(args.version)
    out = store.stage_dir(m["stage"]) / m["version"]
    print(f"{m['stage']}/{m['version']}  ({shown_path(out)})")
    print(
        f"  finished {m.get('ended')} after {m.get('seconds')} s on {m.get('host')}; "
        f"seed {m.get('seed')}; output sha256 {m['output_sha256'][:16]}"
    )
    if m.get("rerun_of"):
        print(f"  a rerun of {m['rerun_of']} that gave a different output")
    code = m.get("code") or "not recorded"
    print(
        f"  code {code[:16]} ({code_of(m)}: "
        + ("the installed tli" if code_of(m) == "current" else "not the installed tli")
        + ")"
    )
    print("  params: " + json.dumps(m.get("params"), sort_keys=True))
    pk = m.get("packages") or {}
    print("  packages: " + ", ".join(f"{k} {v}" for k, v in pk.items() if v))
    files = m.get("files", [])
    print(f"  files: {len(files)}, {sum(f['size'] for f in files) / 1e6:.1f} MB")
    print("lineage:")
    for line in lineage(store, m, 1) or ["  (no inputs)"]:
        print(line)
    return 0


def shown_path(p: Path) -> str:
    """``p`` relative to the working directory when it is under it (shorter, shareable)."""
    try:
        return str(Path(p).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(p)
