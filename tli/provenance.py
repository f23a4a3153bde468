"""Provenance: what every artifact records about how it was made, computed in one place.

- :func:`package_versions`: tli, Python and the packages that can change a result;
- :func:`sha256_file` / :func:`hash_tree`: content hashes of files and folders (the store's
  versions depend on content, never on paths);
- :func:`header_fingerprint`: a model folder identified without reading its weights;
- :func:`code_hash`: the tli source a stage runs, so that changed code never reuses an output
  that older code computed.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import sys
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from tli import __version__

# Packages whose versions can change a stage's result; recorded in every store manifest.
PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "ray",
    "lm_eval",
    "datasets",
    "kfp",
    "numpy",
)
TLI_ROOT = Path(__file__).resolve().parent


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """``{"tli": ..., "python": ..., name: version or None}``, in that order."""
    out: dict[str, str | None] = {"tli": __version__, "python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The sha256 of one file, read in 1 MiB chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_volatile(rel: str, volatile: Iterable[str]) -> bool:
    """Whether the relative path ``rel`` matches one of the ``volatile`` glob patterns."""
    return any(fnmatch.fnmatch(rel, pat) for pat in volatile)


def hash_tree(
    root: Path,
    volatile: tuple[str, ...] = (),
    file_hash: Callable[[Path], str] = sha256_file,
) -> tuple[list[dict[str, Any]], str]:
    """Hash every file under ``root``.

    Args:
        root: a folder, or a single file.
        volatile: glob patterns (relative paths) left out of the content hash.
        file_hash: how one file is hashed (a cached variant for large external inputs).

    Returns:
        ``(files, content_hash)``: one ``{path, size, sha256[, volatile]}`` per file, sorted by
        path; the content hash covers the non-volatile files' paths and hashes.
    """
    root = Path(root)
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    files = []
    h = hashlib.sha256()
    for p in paths:
        rel = p.name if p == root else p.relative_to(root).as_posix()
        digest = file_hash(p)
        entry: dict[str, Any] = {"path": rel, "size": p.stat().st_size, "sha256": digest}
        if is_volatile(rel, volatile):
            entry["volatile"] = True
        else:
            h.update(f"{rel}\0{digest}\n".encode())
        files.append(entry)
    return files, h.hexdigest()


def header_fingerprint(files: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """Identify safetensors files without reading their tensors: each one's size and header hash."""
    out = {}
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h = hashlib.sha256(fh.read(n)).hexdigest()
        out[Path(f).name] = {"size": Path(f).stat().st_size, "header_sha256": h}
    return out


# ---------------------------------------------------------------------------- code hash


def _module_file(name: str) -> Path | None:
    """The source file of tli module ``name`` (a package's ``__init__.py``), if it exists."""
    rel = Path(*name.split(".")[1:])
    for cand in (TLI_ROOT / rel / "__init__.py", (TLI_ROOT / rel).with_suffix(".py")):
        if cand.is_file():
            return cand
    return None


def _imported(path: Path, name: str) -> set[str]:
    """tli modules that ``path`` (module ``name``) imports anywhere, lazy imports included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m == "tli" or m.startswith("tli.")}


def code_files(module: str, extra: Sequence[str] = ()) -> list[Path]:
    """The tli source files module ``module`` runs: it, every tli module it imports
    (transitively, function-level imports too) and their parent packages, plus ``extra`` globs
    (relative to the tli folder) for data files such as task definitions."""
    todo, seen = [module], set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
        path = _module_file(name)
        if path is None:
            continue  # an attribute imported with `from tli.x import y`, not a module
        files.add(path)
        todo += sorted(_imported(path, name) - seen)
    for pattern in extra:
        files.update(p for p in TLI_ROOT.glob(pattern) if p.is_file())
    return sorted(files)


@lru_cache(maxsize=64)
def code_hash(module: str, extra: tuple[str, ...] = ()) -> str:
    """sha256 over the source of :func:`code_files` (paths relative to the tli folder).

    Independent of where tli is installed, so one commit gives the same hash on every machine.
    """
    h = hashlib.sha256()
    for path in code_files(module, extra):
        h.update(path.relative_to(TLI_ROOT).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()
