"""The stage store: versioned, immutable stage outputs under ``<store>/<stage>/<version>/``.

A stage's *version* is a hash of what determines its result: the stage name, its resolved
config, the content hashes of its input artifacts and the hash of the tli code the stage runs
(:func:`tli.provenance.code_hash`): changed code never reuses an output that older code
computed. Running a stage through :meth:`Store.run` writes into a staged folder
(:mod:`tli.output`: a locked ``.<version>.partial`` sibling, renamed when complete), so a folder
named like a version is always whole; a resumable stage (train, tune) killed mid-run resumes
from its partial folder when it is run again. Each version holds::

    manifest.json   inputs (with their versions), params, code hash, seed, package versions,
                    start/end time, every output file with its sha256, and the output's content
                    hash
    output/         what the stage wrote

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
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tli import output
from tli.errors import TliError
from tli.provenance import hash_tree, package_versions, sha256_file

MANIFEST = "manifest.json"
OUTPUT = "output"
FORMAT = "tli-store/2"
_HASH_CACHE = ".cache/hashes.json"


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "version": self.version,
            "path": str(self.path),
            "output": str(self.output),
            "sha256": self.sha256,
            "status": self.status,
        }


def version_key(stage: str, params: dict[str, Any], inputs: dict[str, str], code: str) -> str:
    """hash(stage name, resolved params, input content hashes, code hash), 16 hex digits."""
    doc = {
        "stage": stage,
        "params": params,
        "inputs": dict(sorted(inputs.items())),
        "code": code,
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

    def stale_temps(self) -> list[tuple[Path, int]]:
        """Partial version folders no running process holds, with their sizes in bytes.

        They are what killed stages left behind: a resumable stage's (train, tune) is resumed
        by the next run of the same version, anything else is removed by it; ``tli runs
        clean`` removes them all. Folders of the store's first format (``.tmp-*``) count too.
        """
        out: list[tuple[Path, int]] = []
        if not self.root.is_dir():
            return out
        for sd in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name[0] != "."):
            out += output.stale(sd, include_resumable=True)
            for tmp in sorted(sd.glob(".tmp-*")):
                lock = tmp.with_name(tmp.name + ".lock")
                if tmp.is_dir() and not output.is_held(lock):
                    out.append((tmp, sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())))
        return out

    def remove_temp(self, tmp: Path) -> None:
        """Remove one folder listed by :meth:`stale_temps`, and its lock file."""
        output.remove_stale(tmp)
        tmp.with_name(tmp.name + ".lock").unlink(missing_ok=True)

    def _inputs(self, inputs: list[InputRef]) -> dict[str, Any]:
        return {
            i.name: {"stage": i.stage, "version": i.version, "sha256": i.sha256,
                     "path": _rel(i.path, self.root)}
            for i in inputs
        }  # fmt: skip

    def _cached(self, stage: str, key: str, log: Callable[[str], None]) -> StageResult | None:
        found = self.find(stage, key)
        if found is None:
            return None
        m = json.loads((found / MANIFEST).read_text())
        log(f"{stage}: cached {found.name} ({found})")
        return StageResult(stage, found.name, found, m["output_sha256"], "cached")

    def run(self, stage: str, params: dict[str, Any], inputs: list[InputRef],
            execute: Callable[[Path], Any], *, code: str, seed: int | None = None,
            rerun: bool = False, volatile: tuple[str, ...] = (),
            resumable: output.Resumable | None = None, wait_s: float = 0.0,
            extra: Callable[[], dict[str, Any]] | None = None,
            log: Callable[[str], None] = print) -> StageResult:  # fmt: skip
        """Run ``execute(output_dir)`` as version ``hash(stage, params, inputs, code)``.

        Long because it is the store's one transaction, read top to bottom: cached? lock,
        cached now? resume, execute, hash, reproduced or a new run number, manifest, rename.

        Args:
            stage: the stage name (the store's first level).
            params: what the stage's output depends on (its resolved config), JSON-able.
            inputs: its input artifacts.
            execute: writes the stage's output into the (existing) folder it is given.
            code: the hash of the code the stage runs (:func:`tli.provenance.code_hash`).
            seed: recorded in the manifest.
            rerun: recompute even when a complete version exists.
            volatile: glob patterns of output files left out of the content hash.
            resumable: the stage's resume predicate on its output folder (train, tune): a
                partial version it left when killed is resumed, not restarted.
            wait_s: how long to wait for another process running the same version.
            extra: more manifest entries, computed once the stage has run.
            log: where the one-line status goes.

        Returns:
            The :class:`StageResult`.
        """
        key = version_key(stage, params, {i.name: i.sha256 for i in inputs}, code)
        if not rerun and (hit := self._cached(stage, key, log)):
            return hit
        target = self.stage_dir(stage) / key
        pred = (lambda p: resumable(p / OUTPUT)) if resumable else None
        started, t0 = _now(), time.time()
        with output.staged(target, exists_ok=True, resume=None, resumable=pred,
                           wait_s=wait_s) as st:  # fmt: skip
            if not rerun and (hit := self._cached(stage, key, log)):
                st.abandon()  # another run finished it while this one waited
                return hit
            if st.resumed:
                log(f"{stage}: resuming {key} ({st.resumed})")
            (st.path / OUTPUT).mkdir(exist_ok=True)
            execute(st.path / OUTPUT)
            files, content = hash_tree(st.path / OUTPUT, volatile)
            existing = self.find(stage, key)
            if existing is not None:
                old = json.loads((existing / MANIFEST).read_text())
                if old["output_sha256"] == content:
                    log(f"{stage}: rerun of {existing.name} gave identical output ({content[:12]})")
                    st.abandon()
                    return StageResult(stage, existing.name, existing, content, "reproduced")
                name = f"{key}-{(_run_number(existing.name, key) or 1) + 1}"
            else:
                name = key
            manifest = {
                "format": FORMAT,
                "stage": stage,
                "version": name,
                "key": key,
                "code": code,
                "rerun_of": existing.name if existing is not None else None,
                "params": params,
                "inputs": self._inputs(inputs),
                "seed": seed,
                "packages": package_versions(),
                "host": socket.gethostname(),
                **(extra() if extra else {}),
                "started": started,
                "ended": _now(),
                "seconds": round(time.time() - t0, 1),
                "output_sha256": content,
                "volatile": list(volatile),
                "files": files,
            }
            (st.path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            target = st.commit(self.stage_dir(stage) / name)
        log(f"{stage}: stored {name} ({target})")
        return StageResult(stage, name, target, content, "ran")


def _rel(path: str, root: Path) -> str:
    """``path`` relative to the store when inside it (a store can be moved), else absolute."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)
