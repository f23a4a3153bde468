"""The stage store: versioned, immutable stage outputs under ``<store>/<stage>/<version>/``.

A stage's *version* is a hash of what determines its result: the stage name, its resolved config
section(s), the content hashes of its input artifacts and the tli version. Running a stage
through :meth:`Store.run` writes into a temporary sibling folder and renames it to the version
when complete, so a folder named like a version is always whole. Each version holds::

    manifest.json   inputs (with their versions), params, seed, package versions, start/end
                    time, every output file with its sha256, and the output's content hash
    output/         what the stage function wrote

A complete version is reused, never rewritten: running the same stage with the same inputs
again logs "cached". ``rerun=True`` recomputes it; if the new output has the same content hash
the existing version is kept (and the rerun confirmed reproducible), else the new output is
stored as ``<version>-2`` (``-3``, ...) and, because downstream versions hash their inputs'
*content*, every stage after it gets a new version too.

Files that legitimately differ between identical runs (timings, lm-eval's dates, Ray's
experiment folders) are listed per stage as *volatile*: they are hashed and listed, but left out
of the content hash that downstream versions depend on.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from tli import __version__
from tli.errors import TliError

MANIFEST = "manifest.json"
OUTPUT = "output"
FORMAT = "tli-store/1"
_HASH_CACHE = ".cache/hashes.json"
# Packages whose versions can change a stage's result; recorded in every manifest.
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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The sha256 of one file, read in 1 MiB chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_volatile(rel: str, volatile: tuple[str, ...]) -> bool:
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
        if _is_volatile(rel, volatile):
            entry["volatile"] = True
        else:
            h.update(f"{rel}\0{digest}\n".encode())
        files.append(entry)
    return files, h.hexdigest()


def package_versions() -> dict[str, str | None]:
    """Versions of tli, Python and the packages that can change a result."""
    out: dict[str, str | None] = {"tli": __version__, "python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class InputRef:
    """One input artifact of a stage: another stage's version, or an external file/folder."""

    name: str
    path: str  # absolute path of the artifact (a version's output/, or the external path)
    sha256: str  # content hash: what the consumer's version depends on
    stage: str | None = None  # None = external (e.g. a user's model folder)
    version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "version": self.version,
            "sha256": self.sha256,
            "path": self.path,
        }


@dataclass(frozen=True)
class StageResult:
    """What running a stage through the store gave."""

    stage: str
    version: str
    path: Path  # the version folder
    sha256: str  # content hash of its output
    status: str  # "cached" | "ran" | "reproduced" (a rerun that gave identical output)

    @property
    def output(self) -> Path:
        return self.path / OUTPUT

    def ref(self, name: str) -> InputRef:
        """This result as an input of another stage."""
        return InputRef(
            name=name,
            path=str(self.output),
            sha256=self.sha256,
            stage=self.stage,
            version=self.version,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "version": self.version,
            "path": str(self.path),
            "output": str(self.output),
            "sha256": self.sha256,
            "status": self.status,
        }


def version_key(stage: str, params: dict[str, Any], inputs: dict[str, str]) -> str:
    """hash(stage name, resolved params, input content hashes, tli version), 16 hex digits."""
    doc = {
        "stage": stage,
        "params": params,
        "inputs": dict(sorted(inputs.items())),
        "tli": __version__,
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _run_number(name: str, key: str) -> int | None:
    """1 for ``key``, N for ``key-N``, None for anything else."""
    if name == key:
        return 1
    if name.startswith(key + "-") and name[len(key) + 1 :].isdigit():
        return int(name[len(key) + 1 :])
    return None


class Store:
    """A stage store rooted at ``root`` (a local folder or a mounted volume)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()

    # ------------------------------------------------------------------ checks

    def check_writable(self) -> None:
        """Raise a one-line :class:`TliError` unless the store can be created and written.

        Writes nothing: a missing store is checked through its nearest existing parent.
        """
        p = self.root
        while not p.exists() and p != p.parent:
            p = p.parent
        if p == self.root and not p.is_dir():
            raise TliError(f"the store {self.root} is not a folder: choose another --store")
        if not p.is_dir():
            raise TliError(f"cannot create the store {self.root}: {p} is not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            what = "is not writable" if p == self.root else f"cannot be created in {p}"
            raise TliError(f"the store {self.root} {what}: choose another --store")

    def create(self) -> None:
        """Create the store folder (after :meth:`check_writable`), or a one-line error."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{uuid.uuid4().hex[:8]}"
            probe.mkdir()
            probe.rmdir()
        except OSError as e:
            raise TliError(
                f"cannot write the store {self.root} ({e.strerror}): choose another --store"
            ) from None

    # ------------------------------------------------------------------ lookup

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def find(self, stage: str, key: str) -> Path | None:
        """The latest complete version for ``key`` (``key``, or ``key-N`` after reruns)."""
        d = self.stage_dir(stage)
        if not d.is_dir():
            return None
        best: tuple[int, Path] | None = None
        for p in d.iterdir():
            n = _run_number(p.name, key)
            if n is not None and (p / MANIFEST).is_file() and (best is None or n > best[0]):
                best = (n, p)
        return best[1] if best else None

    def manifest(self, stage: str, version: str) -> dict[str, Any]:
        return json.loads((self.stage_dir(stage) / version / MANIFEST).read_text())

    def manifests(self) -> list[dict[str, Any]]:
        """Every complete version's manifest, oldest first."""
        out = []
        if not self.root.is_dir():
            return out
        for sd in sorted(self.root.iterdir()):
            if sd.name.startswith(".") or not sd.is_dir():
                continue
            for vd in sorted(sd.iterdir()):
                m = vd / MANIFEST
                if not vd.name.startswith(".") and m.is_file():
                    with contextlib.suppress(ValueError, OSError):
                        out.append(json.loads(m.read_text()))
        out.sort(key=lambda m: (m.get("ended") or "", m.get("stage", ""), m.get("version", "")))
        return out

    def versions(self) -> set[tuple[str, str]]:
        """``{(stage, version)}`` of every complete version (for tests and listings)."""
        return {(m["stage"], m["version"]) for m in self.manifests()}

    def lookup(self, version: str) -> dict[str, Any]:
        """The manifest of a version given by a unique prefix (or ``stage/version``)."""
        stage, _, ver = version.rpartition("/")
        hits = [
            m
            for m in self.manifests()
            if m["version"].startswith(ver) and (not stage or m["stage"] == stage)
        ]
        if not hits:
            raise TliError(f"no version {version!r} in the store {self.root}: see `tli runs list`")
        if len(hits) > 1 and not any(m["version"] == ver for m in hits):
            names = ", ".join(f"{m['stage']}/{m['version']}" for m in hits[:5])
            raise TliError(f"version {version!r} is ambiguous ({names}): give more digits")
        exact = [m for m in hits if m["version"] == ver]
        return (exact or hits)[0]

    # ------------------------------------------------------------------ external inputs

    def external_ref(self, name: str, path: str | Path) -> InputRef:
        """An input from outside the store (a user's model folder, a bundled file).

        Its content is hashed once per (path, size, mtime): a cache in ``<store>/.cache``
        keeps large base models from being re-read on every run.
        """
        path = Path(path).absolute()
        if not path.exists():
            raise TliError(f"{path} does not exist")
        cache_file = self.root / _HASH_CACHE
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        dirty = False

        def cached_hash(p: Path) -> str:
            nonlocal dirty
            st = p.stat()
            k = str(p)
            hit = cache.get(k)
            if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
                return hit["sha256"]
            digest = sha256_file(p)
            cache[k] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
            dirty = True
            return digest

        _, digest = hash_tree(path, file_hash=cached_hash)
        if dirty:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            os.replace(tmp, cache_file)
        return InputRef(name=name, path=str(path), sha256=digest)

    # ------------------------------------------------------------------ running

    @contextlib.contextmanager
    def _temp_version(self, stage: str, key: str) -> Iterator[Path]:
        """A temporary version folder, locked by this process until it is renamed or removed.

        A stage killed outright (SIGKILL, OOM, pod eviction) cannot remove its folder; the lock
        file beside it (``<tmp>.lock``, held with ``flock``, released by the kernel when the
        process dies) is how :meth:`stale_temps` tells such a leftover from a running stage.
        """
        import fcntl

        d = self.stage_dir(stage)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        lock = _lock_of(tmp)
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            with contextlib.suppress(OSError):
                # A volume without locks (NFS mounted nolock): the stage runs all the same, and
                # stale_temps leaves its folder alone, since it cannot tell it is dead.
                fcntl.flock(fd, fcntl.LOCK_EX)
            tmp.mkdir()
            try:
                yield tmp
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # gone once renamed; removed on failure
        finally:
            lock.unlink(missing_ok=True)
            os.close(fd)

    def stale_temps(self) -> list[tuple[Path, int]]:
        """Temporary version folders no running process holds, with their sizes in bytes.

        They are what a killed stage left behind (nothing else points at them).
        """
        import fcntl

        out: list[tuple[Path, int]] = []
        if not self.root.is_dir():
            return out
        for sd in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for tmp in sorted(sd.glob(".tmp-*")):
                if not tmp.is_dir():
                    continue
                try:
                    fd = os.open(_lock_of(tmp), os.O_RDONLY)
                except FileNotFoundError:
                    fd = None  # the stage died before it could lock, or never locked
                if fd is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        continue  # a running stage holds it (or locks do not work here)
                    finally:
                        os.close(fd)
                size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
                out.append((tmp, size))
        return out

    def remove_temp(self, tmp: Path) -> None:
        """Remove one folder listed by :meth:`stale_temps`, and its lock file."""
        shutil.rmtree(tmp, ignore_errors=True)
        _lock_of(tmp).unlink(missing_ok=True)

    def run(
        self,
        stage: str,
        params: dict[str, Any],
        inputs: list[InputRef],
        fn: Callable[[Path], Any],
        *,
        seed: int | None = None,
        rerun: bool = False,
        volatile: tuple[str, ...] = (),
        log: Callable[[str], None] = print,
    ) -> StageResult:
        """Run ``fn(output_dir)`` as version ``hash(stage, params, inputs, tli)`` unless cached.

        Args:
            stage: the stage name (the store's first level).
            params: the stage's resolved config, JSON-serialisable.
            inputs: its input artifacts.
            fn: writes the stage's output into the folder it is given (which does not exist
                yet; ``fn`` creates it, as every ``run_*`` function does).
            seed: recorded in the manifest.
            rerun: recompute even when a complete version exists.
            volatile: glob patterns of output files left out of the content hash.
            log: where the one-line status goes.

        Returns:
            The :class:`StageResult`.
        """
        key = version_key(stage, params, {i.name: i.sha256 for i in inputs})
        existing = self.find(stage, key)
        if existing is not None and not rerun:
            m = json.loads((existing / MANIFEST).read_text())
            log(f"{stage}: cached {existing.name} ({existing})")
            return StageResult(stage, existing.name, existing, m["output_sha256"], "cached")

        started, t0 = _now(), time.time()
        with self._temp_version(stage, key) as tmp:
            fn(tmp / OUTPUT)
            if not (tmp / OUTPUT).exists():
                raise RuntimeError(f"stage {stage} wrote no output")
            files, content = hash_tree(tmp / OUTPUT, volatile)
            if existing is not None:
                old = json.loads((existing / MANIFEST).read_text())
                if old["output_sha256"] == content:
                    log(f"{stage}: rerun of {existing.name} gave identical output ({content[:12]})")
                    return StageResult(stage, existing.name, existing, content, "reproduced")
                n = _run_number(existing.name, key) or 1
                name = f"{key}-{n + 1}"
            else:
                name = key
            manifest = {
                "format": FORMAT,
                "stage": stage,
                "version": name,
                "key": key,
                "rerun_of": existing.name if existing is not None else None,
                "params": params,
                "inputs": {
                    i.name: {
                        "stage": i.stage,
                        "version": i.version,
                        "sha256": i.sha256,
                        "path": _rel(i.path, self.root),
                    }
                    for i in inputs
                },
                "seed": seed,
                "packages": package_versions(),
                "host": socket.gethostname(),
                "started": started,
                "ended": _now(),
                "seconds": round(time.time() - t0, 1),
                "output_sha256": content,
                "volatile": list(volatile),
                "files": files,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            target = self.stage_dir(stage) / name
            try:
                tmp.rename(target)
            except OSError:
                # Another run finished the same version first: keep theirs (never rewrite).
                found = self.find(stage, key)
                if found is None:
                    raise
                m = json.loads((found / MANIFEST).read_text())
                log(f"{stage}: cached {found.name} (finished by another run)")
                return StageResult(stage, found.name, found, m["output_sha256"], "cached")
        log(f"{stage}: stored {name} ({target})")
        return StageResult(stage, name, target, content, "ran")


def _lock_of(tmp: Path) -> Path:
    """The lock file beside a temporary version folder (held while its stage runs)."""
    return tmp.with_name(tmp.name + ".lock")


def _rel(path: str, root: Path) -> str:
    """``path`` relative to the store when inside it (a store can be moved), else absolute."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)
