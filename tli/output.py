"""Staged output folders: the one place that makes writing a result atomic.

Every command and every store version writes its result the same way: into a *partial* folder
beside the target (``.<name>.partial``), held with a lock (``.<name>.partial.lock``, ``flock``:
the kernel releases it when the process dies, however it dies), and renamed to the target only
when complete. So a folder under a target's name is always whole, a killed run leaves nothing
under that name, and a later run can tell a dead run's leftover (its lock is free) from a live
one (its lock is held).

- ``--force`` replaces an existing target only by rename, after the new folder is complete.
- Resumable stages (training, search) keep their partial folder when they fail or are killed;
  the next run resumes from it (``resume=None``: automatically, as the pipeline does;
  ``True``: only with ``--resume``) or refuses to overwrite it without ``--force``.
- Stale partial folders of non-resumable runs are removed by any later run in the same folder
  (:func:`sweep`), never one whose lock is held.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tli.errors import TliError

MARKER = ".tli-partial"  # inside every partial folder: who made it, and whether it resumes
# A resumable stage's predicate: a short description of the state it can resume from, or None.
Resumable = Callable[[Path], "str | None"]


def partial_of(target: Path) -> Path:
    """The partial folder of ``target``: a hidden sibling."""
    return target.parent / f".{target.name}.partial"


def lock_of(partial: Path) -> Path:
    """The lock file of a partial folder."""
    return partial.with_name(partial.name + ".lock")


# ---------------------------------------------------------------------------- locks


class Busy(TliError):
    """Another live process holds the target's lock."""


def _try_lock(path: Path) -> int | None:
    """Lock ``path`` (created if missing); the fd, or None when another process holds it.

    The lock file is unlinked when released; a process that opened it before the unlink would
    lock a dead inode, so the lock only counts if the path still names the locked file.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            # A volume without locks (NFS mounted nolock): run all the same; sweep() then leaves
            # the folder alone, since it cannot tell it is dead.
            return fd
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text() or "{}")
        return f"pid {info.get('pid')} on {info.get('host')}"
    except (OSError, ValueError):
        return "another process"


def _acquire(lock: Path, target: Path, wait_s: float) -> int:
    deadline = time.monotonic() + wait_s
    while True:
        fd = _try_lock(lock)
        if fd is not None:
            info = {"pid": os.getpid(), "host": socket.gethostname()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            return fd
        if time.monotonic() >= deadline:
            raise Busy(
                f"{target} is being written by {_holder(lock)}: wait for it to finish, "
                "or stop that process"
            )
        time.sleep(0.5)


def _release(lock: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
    os.close(fd)


def is_held(lock: Path) -> bool:
    """Whether a live process holds ``lock`` (a missing lock file is not held)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True  # locks do not work here: assume it is alive
    finally:
        os.close(fd)
    return False


# ---------------------------------------------------------------------------- targets


def check_target(target: Path, protect: list[Path]) -> None:
    """Refuse a target whose replacement could destroy an input or a whole tree.

    A target may not be the filesystem root, the home folder or the current folder, nor be,
    contain or lie inside any of ``protect`` (the command's inputs): ``--force`` replaces the
    target, and replacing a folder that holds the input deletes the input.
    """
    t = target.absolute().resolve()
    for special, what in ((Path("/"), "the filesystem root"), (Path.home(), "your home folder"),
                          (Path.cwd(), "the current folder")):  # fmt: skip
        if t == special.resolve():
            raise TliError(f"--out {target} is {what}: give a new folder for the output")
    for p in protect:
        q = Path(p).absolute().resolve()
        if t == q:
            raise TliError(f"--out {target} is the input {p}: choose another folder")
        if q.is_relative_to(t):
            raise TliError(f"--out {target} contains the input {p}: choose another folder")
        if t.is_relative_to(q):
            raise TliError(f"--out {target} lies inside the input {p}: choose a folder outside it")


_VERSION_NAME = re.compile(r"[0-9a-f]{16}(-\d+)?")
# Trees a store never lives in, and too large to scan for one.
_NOT_STORES = (Path("/proc"), Path("/sys"), Path("/dev"))


def is_store(folder: Path) -> bool:
    """Whether ``folder`` is a tli stage store (:mod:`tli.pipeline.store`).

    A store is recognised by its hash cache or KFP root, or by a version folder (16 hex
    digits) holding a store manifest, one level below a stage folder.
    """
    folder = Path(folder)
    if (folder / ".cache" / "hashes.json").is_file() or (folder / ".kfp").is_dir():
        return True
    if any(folder == p or folder.is_relative_to(p) for p in _NOT_STORES):
        return False
    try:
        stages = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    except OSError:
        return False
    for stage in stages:
        try:
            versions = [v for v in stage.iterdir() if _VERSION_NAME.fullmatch(v.name)]
        except OSError:
            continue
        for v in versions[:3]:
            try:
                with open(v / "manifest.json", "rb") as f:
                    if b'"tli-store/' in f.read(512):
                        return True
            except OSError:
                continue
    return False


def store_root_of(target: Path) -> Path | None:
    """The stage store that ``target`` is, or lies inside, if any."""
    t = Path(target).absolute().resolve()
    for p in (t, *t.parents):
        if p == p.parent:  # the filesystem root: never scanned
            break
        if p.is_dir() and is_store(p):
            return p
    return None


def precheck(target: Path, *, force: bool = False, protect: list[Path] = ()) -> None:  # type: ignore[assignment]
    """What :func:`staged` refuses, checked before any work (nothing written)."""
    check_target(Path(target), list(protect))
    if Path(target).exists() and not force:
        raise TliError(f"output dir {target} exists: choose another --out or pass --force")


# ---------------------------------------------------------------------------- staged output


@dataclass
class Staged:
    """An output being written: ``path`` is the partial folder to write into."""

    target: Path
    path: Path
    resumed: str | None  # the state it resumes from, or None for a fresh start
    _fd: int
    done: bool = False

    def commit(self, target: Path | None = None) -> Path:
        """Rename the complete partial folder to ``target`` (default: the staged target).

        An existing folder there (``--force``) is renamed aside first and removed after, so
        the name never points at a half-removed folder.
        """
        dest = Path(target) if target is not None else self.target
        (self.path / MARKER).unlink(missing_ok=True)
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            dest.rename(old)
            self.path.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.path.rename(dest)
        self._finish()
        return dest

    def abandon(self) -> None:
        """Discard the partial folder (the result is not wanted after all)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._finish()

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            _release(lock_of(self.path), self._fd)


def _prepare_partial(
    partial: Path, resume: bool | None, force: bool, resumable: Resumable | None
) -> str | None:
    """Keep or wipe a leftover partial folder (our lock is held); what it resumes from."""
    state = resumable(partial) if (resumable and partial.is_dir()) else None
    if state is not None:
        if resume is True or (resume is None and not force):
            check_own(partial)
            return state
        if not force:
            raise TliError(
                f"{partial} holds an interrupted run ({state}): pass --resume to continue it "
                "or --force to start over"
            )
    elif resume is True:
        raise TliError(
            f"nothing to resume: {partial} holds no checkpoint of an interrupted run; "
            "start without --resume"
        )
    if partial.exists():
        shutil.rmtree(partial)
    return None


def check_own(partial: Path) -> None:
    """Refuse to resume from a partial folder that this user's tli did not write.

    Resuming reads what an interrupted run left, and a search's state is Ray Tune's, which
    holds pickles: unpickling runs code. So the folder must carry the marker :func:`staged`
    writes, and every file and folder in it must belong to this user and be writable by no
    one else.
    """
    marker = partial / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        info = None
    why = None
    if not isinstance(info, dict) or not info.get("resumable"):
        why = f"it has no {MARKER} marker of a resumable tli run"
    else:
        me = os.geteuid()
        for p in (partial, *partial.rglob("*")):
            st = p.lstat()
            open_to_all = st.st_mode & 0o002 and not stat.S_ISLNK(st.st_mode)  # links: 0o777
            if st.st_uid != me or open_to_all:
                why = f"{p} belongs to another user or anyone can write to it"
                break
    if why is not None:
        raise TliError(
            f"will not resume from {partial}: {why}, and tli resumes only from a folder it "
            "wrote itself: remove it, or pass --force to start over"
        )


@contextlib.contextmanager
def staged(
    target: str | Path,
    *,
    force: bool = False,
    exists_ok: bool = False,
    resume: bool | None = False,
    resumable: Resumable | None = None,
    wait_s: float = 0.0,
    protect: list[Path] = (),  # type: ignore[assignment]
) -> Iterator[Staged]:
    """Write a folder atomically: yield its partial folder; rename it to ``target`` at the end.

    Args:
        target: the folder to create.
        force: replace an existing ``target`` (by rename, once the new one is complete) and
            discard an interrupted run's state.
        exists_ok: an existing ``target`` is no error (the caller commits elsewhere, as the
            store does for a rerun).
        resume: for resumable stages: True = continue the interrupted run (an error if there is
            none), None = continue it when there is one, False = an error if there is one
            (unless ``force``).
        resumable: the stage's predicate (given the partial folder): what an interrupted run
            left to resume from, or None. Non-resumable stages pass None: their leftovers are
            always discarded.
        wait_s: how long to wait for another process writing the same target.
        protect: the command's inputs: the target may not be, contain or lie inside one
            (:func:`check_target`).

    Raises:
        TliError: ``target`` exists, its parent cannot be written, or an interrupted run is in
            the way. :class:`Busy`: another live process is writing it.
    """
    target = Path(target)
    precheck(target, force=force or exists_ok, protect=protect)
    partial = partial_of(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep(target.parent)
        fd = _acquire(lock_of(partial), target, wait_s)
    except OSError as e:
        raise TliError(f"cannot write to {target.parent}: {e.strerror}") from None
    st = Staged(target, partial, None, fd)
    try:
        st.resumed = _prepare_partial(partial, resume, force, resumable)
        partial.mkdir(exist_ok=True)
        (partial / MARKER).write_text(
            json.dumps(
                {
                    "target": target.name,
                    "resumable": resumable is not None,
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                }
            )  # fmt: skip
        )
        yield st
        if not st.done:
            st.commit()
    except BaseException:
        if not st.done:
            keep = resumable is not None and partial.is_dir() and resumable(partial) is not None
            if not keep:
                shutil.rmtree(partial, ignore_errors=True)
            st._finish()
        raise


# ---------------------------------------------------------------------------- leftovers


def stale(folder: Path, *, include_resumable: bool = False) -> list[tuple[Path, int]]:
    """Partial folders in ``folder`` that no live process holds, with their sizes in bytes.

    Only folders this module made (they carry its marker); resumable ones (an interrupted
    training or search) only when ``include_resumable``.
    """
    out: list[tuple[Path, int]] = []
    try:
        entries = sorted(folder.glob(".*.partial"))
    except OSError:
        return out
    for p in entries:
        marker = p / MARKER
        if not p.is_dir() or not marker.is_file() or is_held(lock_of(p)):
            continue
        if is_resumable(p) and not include_resumable:
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f != marker)
        out.append((p, size))
    return out


def is_resumable(partial: Path) -> bool:
    """Whether a partial folder's marker says it belongs to a resumable stage (train, tune)."""
    try:
        return bool(json.loads((partial / MARKER).read_text()).get("resumable"))
    except (OSError, ValueError, AttributeError):
        return False


def remove_stale(partial: Path) -> None:
    """Remove one folder listed by :func:`stale`, and its lock file."""
    shutil.rmtree(partial, ignore_errors=True)
    lock_of(partial).unlink(missing_ok=True)


def sweep(folder: Path) -> list[Path]:
    """Remove the non-resumable partial folders that killed runs left in ``folder``."""
    removed = []
    for p, _ in stale(folder):
        remove_stale(p)
        removed.append(p)
    return removed
