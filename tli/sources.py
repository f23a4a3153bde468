"""Inputs given as a local path or a URI: a local folder (or file) and a content hash.

Where a stage or command takes a model or data (``--model``, ``--data``, ``--heldout``,
``base.model``, ``data.extra``), the value may be

- a local path: used as it is (the store hashes its content for a version);
- ``s3://bucket/key``: an object or a prefix, fetched once into a content-addressed cache
  (:func:`tli.remote.fetch_entry`; endpoint and credentials from the ``AWS_*`` variables).
  The cache is ``<store>/.cache/remote`` for a stage run through the store (the store's volume
  is the one path every pipeline step and Ray pod shares), else ``<tli cache>/remote``;
- a Hugging Face Hub name (``org/name[@revision]``, ``hf:...``): see the marked place in
  :func:`resolve`; :mod:`tli.hub` resolves those.

What a version depends on is the content, never the URI: :func:`identify` gives the same digest
as :func:`tli.provenance.hash_tree` of the local copy (so a folder and its copy on S3 are the
same input), and reads it from a tli upload's completion marker when the prefix has one, so a
pipeline step works out a version without downloading the model it names.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tli import remote
from tli.errors import TliError

# Set while a stage runs through the store (tli.pipeline.runner): its cache is on the volume.
_STORE_CACHE: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "tli_sources_cache", default=None
)
CONTENT_PREFIX = "content:"  # how a URI appears in a version's params: by its content digest


@dataclass(frozen=True)
class Source:
    """One resolved input.

    Attributes:
        given: the value as given (a path or a URI).
        path: the local folder or file to read.
        uri: the URI it was fetched from; None for a local path.
    """

    given: str
    path: Path
    uri: str | None = None


def is_uri(value: object) -> bool:
    """Whether ``value`` names remote storage (``s3://...``) rather than a local path."""
    return remote.is_remote(value) if isinstance(value, str) else False


def cache_root() -> Path:
    """Where fetched inputs are cached: the store's ``.cache/remote``, else tli's cache dir."""
    store_cache = _STORE_CACHE.get()
    if store_cache is not None:
        return store_cache / "remote"
    from tli.packages import cache_dir

    return cache_dir() / "remote"


@contextlib.contextmanager
def store_cache(store: str | Path) -> Iterator[None]:
    """Cache fetched inputs under ``<store>/.cache`` while a stage runs through the store."""
    token = _STORE_CACHE.set(Path(store).absolute() / ".cache")
    try:
        yield
    finally:
        _STORE_CACHE.reset(token)


def resolve(given: str | Path, *, what: str) -> Source:
    """The local copy of an input given as a path or a URI (fetched at most once).

    Args:
        given: a local path or ``s3://bucket/key``.
        what: the setting it came from (``--model``, ``data.extra``), for messages.

    Raises:
        TliError: a URI scheme tli cannot read, or a fetch that failed (one line, no
            credentials).
    """
    text = str(given)
    if is_uri(text):
        return Source(text, remote.fetch(text, cache_root()), uri=text)
    # -- Hub names (org/name[@revision], hf:NAME) ------------------------------------------
    # tli/hub.py resolves them (online mode only; base.model and data.dataset route there
    # themselves). A command that takes a Hub name here would call hub.resolve(text, ...).
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise TliError(f"{what} {text}: {scheme}:// is not supported (give a path or s3://...)")
    return Source(text, Path(text))


def local(given: str | Path, *, what: str) -> Path:
    """The local path of an input given as a path or a URI (see :func:`resolve`)."""
    return resolve(given, what=what).path


def local_all(values: list[str | Path], *, what: str) -> list[Path]:
    """:func:`local` of each value."""
    return [local(v, what=what) for v in values]


def identify(uri: str) -> str:
    """The content digest of the object or prefix at ``uri``, as ``hash_tree`` computes it.

    A prefix uploaded by tli (:func:`tli.remote.upload`) lists every file's sha256 in its
    completion marker: the digest is computed from it and nothing is downloaded. Anything else is
    fetched into the cache (once) and hashed there.
    """
    from tli.provenance import hash_tree

    marked = _marker_files(uri)
    if marked is not None:
        h = hashlib.sha256()
        # hash_tree's order: paths compared part by part (a/b before a.txt), as pathlib sorts.
        for rel, _size, sha in sorted(marked, key=lambda f: PurePosixPath(f[0]).parts):
            h.update(f"{rel}\0{sha}\n".encode())
        return h.hexdigest()
    return hash_tree(local(uri, what=uri))[1]


def _marker_files(uri: str) -> list[tuple[str, int, str]] | None:
    """The ``[rel, size, sha256]`` rows of a tli upload's completion marker, or None."""
    marker = remote.join(uri, remote.COMPLETE_MARKER)
    try:
        if not remote.is_file(marker):
            return None
        files = json.loads(remote.read_text(marker))["files"]
        return [(str(r), int(s), str(h)) for r, s, h in files]
    except TliError:
        raise
    except (ValueError, KeyError, TypeError):
        raise TliError(f"{uri}: {remote.COMPLETE_MARKER} is not a tli upload marker") from None


def by_content(params: Any) -> tuple[Any, dict[str, str]]:
    """``params`` with every ``s3://`` value replaced by its content digest, and the digests.

    A version hashes what its inputs hold: the same bytes under another URI are the same
    version, changed bytes under the same URI a new one.

    Returns:
        ``(params for the version, {uri: digest})``.
    """
    found: dict[str, str] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [walk(v) for v in x]
        if is_uri(x):
            found[x] = found.get(x) or identify(x)
            return f"{CONTENT_PREFIX}{found[x]} ({PurePosixPath(remote.parse(x)[1]).name})"
        return x

    return walk(params), found
