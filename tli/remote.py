"""Object storage URIs (``s3://bucket/key``): the one place tli talks to S3.

Configuration comes only from the standard AWS environment variables, so the same code runs
against AWS, MinIO, Ceph or SeaweedFS, in a pod or on a laptop:

- ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``: ``http(s)://host:port`` of an S3-compatible
  server (unset: AWS itself).
- ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``: static credentials.
- ``AWS_PROFILE``, ``AWS_SHARED_CREDENTIALS_FILE``, ``AWS_WEB_IDENTITY_TOKEN_FILE``,
  ``AWS_CONTAINER_CREDENTIALS_*``: hand the
  credentials to the AWS SDK's own chain (profiles, IRSA / pod identity in Kubernetes).
  Without any of these, requests are anonymous: nothing is probed implicitly (an EC2 metadata
  lookup off AWS only hangs).
- ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default ``us-east-1``; set it for AWS buckets
  elsewhere: the region is never guessed with an extra request).

Downloads go into a content-addressed cache (:func:`fetch`): an entry is named by the sha256
of what it holds, so callers version by content, not by URI. Uploads of folders end with a
small completion marker (:data:`COMPLETE_MARKER`) written last, which :func:`fetch` checks.
Ray Train / Tune state under ``runtime.storage`` is read through *locations* (a local path or
an ``s3://`` URI, the same calls: :func:`listdir`, :func:`read_text`, :func:`remove_tree`, ...).

Errors are one-line :class:`~tli.errors.TliError` messages that name the URI and the
variables to check; credentials never appear in an exception, a log line or a return value.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tli.errors import TliError

if TYPE_CHECKING:  # pyarrow comes with ray[train,tune]; imported lazily
    from pyarrow.fs import S3FileSystem

__all__ = [
    "COMPLETE_MARKER",
    "Fetched",
    "content_sha256",
    "copy_tree",
    "exists",
    "fetch",
    "fetch_entry",
    "filesystem",
    "is_complete",
    "is_file",
    "is_remote",
    "join",
    "list",
    "listdir",
    "location_join",
    "parse",
    "read_text",
    "remove_tree",
    "upload",
]

log = logging.getLogger(__name__)

SCHEME = "s3://"
# Written last by upload() of a folder: its presence means the upload finished; it lists every
# file with size and sha256, and fetch() downloads exactly those.
COMPLETE_MARKER = ".tli-complete.json"
CONNECT_TIMEOUT_S = 10.0  # the SDK default (1 s) is too short for a busy cluster, minutes too long
REQUEST_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 3  # the SDK's standard retry strategy: 3 tries in all, with backoff
_CHUNK = 8 * 1024**2  # bytes per ranged GET
_THREADS = 8  # parallel transfers (pyarrow releases the GIL during I/O)
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SDK_CHAIN_VARS = (
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)
_ENDPOINT_VARS = "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL"
# S3's bucket rules, relaxed to admit legacy names (upper case, underscores).
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")

_T = TypeVar("_T")


# -- URIs --------------------------------------------------------------------------------------


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` names object storage (``s3://...``) rather than a local path."""
    return isinstance(uri, str) and uri.startswith(SCHEME)


def parse(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``.

    The key has no leading or trailing ``/`` and may be empty (the whole bucket).

    Raises:
        TliError: not an ``s3://`` URI, a malformed bucket name, or a key with empty, ``.`` or
            ``..`` segments (those would not map onto local paths safely).
    """
    if not is_remote(uri):
        raise TliError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(SCHEME) :].partition("/")
    if not _BUCKET_RE.fullmatch(bucket):
        raise TliError(f"{uri}: bad bucket name {bucket!r} (3-255 of a-z 0-9 . - _)")
    key = key.rstrip("/")
    if key and any(part in ("", ".", "..") for part in key.split("/")):
        raise TliError(f"{uri}: the key has an empty, '.' or '..' segment")
    return bucket, key


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended as key segments (``join("s3://b/m", "x.json")``)."""
    bucket, key = parse(uri)
    segments = [key] if key else []
    segments += [p.strip("/") for p in parts if p.strip("/")]
    return f"{SCHEME}{bucket}/" + "/".join(segments)


# -- configuration and errors --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Endpoint:
    scheme: str  # "http" | "https"
    host: str | None  # host[:port]; None: AWS itself
    shown: str  # for messages: never carries credentials

    @property
    def key(self) -> str:
        return f"{self.scheme}://{self.host or 'aws'}"


def _endpoint() -> _Endpoint:
    raw = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not raw:
        return _Endpoint("https", None, "AWS S3")
    parts = urllib.parse.urlsplit(raw if "://" in raw else f"https://{raw}")
    hostname = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:  # a non-numeric or out-of-range port
        raise TliError(f"{_ENDPOINT_VARS}: bad port in {parts.scheme}://{hostname}") from None
    host = f"[{hostname}]" if ":" in hostname else hostname  # an IPv6 literal keeps brackets
    if port:
        host = f"{host}:{port}"
    shown = f"{parts.scheme}://{host}"  # userinfo dropped: it may hold a secret
    if parts.scheme not in ("http", "https") or not hostname:
        raise TliError(f"{_ENDPOINT_VARS} must look like http(s)://host:port, not {shown!r}")
    if parts.path not in ("", "/"):
        raise TliError(f"{_ENDPOINT_VARS}: an endpoint with a path is not supported ({shown})")
    return _Endpoint(parts.scheme, host, shown)


def _secrets() -> list[str]:
    return [v for k in _CREDENTIAL_VARS if len(v := os.environ.get(k, "")) >= 4]


def _scrub(text: str) -> str:
    """``text`` on one line, shortened, with every credential value masked."""
    for secret in _secrets():
        text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _describe(uri: str, action: str, exc: BaseException) -> str:
    """A one-line message for a failed S3 call: what, where, why, and what to check."""
    where = _endpoint_shown()
    detail = _scrub(str(exc)) or type(exc).__name__
    low = detail.lower()
    if any(
        m in low
        for m in ("access_denied", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch")
    ) or re.search(r"http status 40[13]\b", low):
        hint = "access denied: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN"
    elif any(
        m in low
        for m in ("network_connection", "could not connect", "curlcode", "timed out", "timeout")
    ):
        hint = f"cannot reach {where}: check {_ENDPOINT_VARS} and the network"
    elif "no_such_bucket" in low or "nosuchbucket" in low:
        hint = f"the bucket does not exist on {where}"
    else:
        hint = f"on {where}; check {_ENDPOINT_VARS} and the AWS_* credentials"
    return f"cannot {action} {uri}: {hint} ({detail})"


def _endpoint_shown() -> str:
    try:
        return _endpoint().shown
    except TliError:
        return "the configured endpoint"


@contextlib.contextmanager
def _errors(uri: str, action: str) -> Iterator[None]:
    """Turn pyarrow's errors into one-line TliErrors (credentials scrubbed, context dropped)."""
    import pyarrow as pa

    try:
        yield
    except TliError:
        raise
    except FileNotFoundError:
        raise TliError(f"cannot {action} {uri}: not found on {_endpoint_shown()}") from None
    except (OSError, pa.ArrowException) as e:
        raise TliError(_describe(uri, action, e)) from None


def filesystem(
    uri: str,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
) -> tuple[S3FileSystem, str]:
    """A pyarrow S3 filesystem for ``uri``, configured from the environment, and its path.

    Args:
        uri: ``s3://bucket/key``.
        connect_timeout_s: TCP connect timeout per attempt (``MAX_ATTEMPTS`` attempts).
        request_timeout_s: socket read timeout (honoured by the SDK on some platforms only).

    Returns:
        ``(fs, "bucket/key")``. The filesystem holds the credentials to sign requests: do not
        log or pickle it into anything persistent.

    Raises:
        TliError: a malformed URI or endpoint, half-set credentials, or pyarrow missing.
    """
    bucket, key = parse(uri)
    try:
        from pyarrow import fs as pafs
    except ImportError:
        raise TliError(f"{uri}: S3 access needs pyarrow (pip install pyarrow)") from None
    ep = _endpoint()
    access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if bool(access) != bool(secret):
        raise TliError(f"{uri}: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither")
    kw: dict[str, Any] = {}
    if access:
        kw.update(access_key=access, secret_key=secret)
        if token := os.environ.get("AWS_SESSION_TOKEN"):
            kw["session_token"] = token
    elif not any(os.environ.get(v) for v in _SDK_CHAIN_VARS):
        kw["anonymous"] = True
    # Explicit, never guessed: resolving a bucket's region would be a hidden network call.
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    if ep.host:
        kw["endpoint_override"] = ep.host
    with _errors(uri, "connect to"):
        s3 = pafs.S3FileSystem(
            scheme=ep.scheme,
            region=region,
            connect_timeout=connect_timeout_s,
            request_timeout=request_timeout_s,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
            allow_bucket_creation=True,
            **kw,
        )
    return s3, f"{bucket}/{key}" if key else bucket


# -- listing -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Object:
    rel: str  # path relative to the fetched URI ("/"-separated; a single object: its name)
    path: str  # "bucket/key" for pyarrow
    size: int
    etag: str


def _map(fn: Callable[[Any], _T], items: Iterable[Any]) -> builtins.list[_T]:
    items = [*items]
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(_THREADS, len(items))) as pool:
        return [*pool.map(fn, items)]


def _etag(s3: S3FileSystem, path: str) -> str:
    # pyarrow's listings drop ETags; opening a stream issues a HEAD (no body is read).
    with s3.open_input_stream(path, compression=None) as f:
        value = f.metadata().get("ETag", b"")
    return value.decode() if isinstance(value, bytes) else str(value)


def _objects(s3: S3FileSystem, uri: str, path: str) -> tuple[str, builtins.list[_Object]]:
    """``("file" | "dir", [_Object])`` for the object or prefix at ``path``, with ETags.

    Raises:
        TliError: nothing there, or a key that would not map onto a local path.
    """
    from pyarrow import fs as pafs

    with _errors(uri, "fetch"):
        info = s3.get_file_info(path)
        if info.type == pafs.FileType.File and not uri.endswith("/"):
            kind, found = "file", [(path.rsplit("/", 1)[-1], info)]
        elif info.type == pafs.FileType.NotFound:
            bucket = path.split("/", 1)[0]
            what = (
                f"bucket {bucket!r} does not exist"
                if "/" in path and s3.get_file_info(bucket).type == pafs.FileType.NotFound
                else "no such object or prefix"
            )
            raise TliError(
                f"cannot fetch {uri}: {what} on {_endpoint_shown()}"
                f" (check the URI, and {_ENDPOINT_VARS} if that is the wrong server)"
            )
        else:
            sel = pafs.FileSelector(path, recursive=True, allow_not_found=True)
            found = [
                (i.path[len(path) + 1 :], i)
                for i in s3.get_file_info(sel)
                if i.type == pafs.FileType.File
            ]
            kind = "dir"
        for rel, _ in found:
            if not rel or any(p in ("", ".", "..") for p in rel.split("/")):
                raise TliError(f"{uri}: object {rel!r} cannot be stored as a local file")
        if not found:
            raise TliError(f"cannot fetch {uri}: no objects under it on {_endpoint_shown()}")
        etags = _map(lambda f: _etag(s3, f[1].path), found)
    objs = [_Object(rel, i.path, i.size, e) for (rel, i), e in zip(found, etags, strict=True)]
    return kind, sorted(objs, key=lambda o: o.rel)


def exists(uri: str) -> bool:
    """Whether ``uri`` is an object, or a prefix with at least one object under it."""
    from pyarrow import fs as pafs

    s3, path = filesystem(uri)
    with _errors(uri, "look up"):
        info = s3.get_file_info(path)
        if info.type == pafs.FileType.File:
            return True
        if info.type == pafs.FileType.NotFound:
            return False
        sel = pafs.FileSelector(path, recursive=True, allow_not_found=True)
        return any(i.type == pafs.FileType.File for i in s3.get_file_info(sel))


def is_complete(uri: str) -> bool:
    """Whether the folder upload at ``uri`` finished (its :data:`COMPLETE_MARKER` exists)."""
    from pyarrow import fs as pafs

    s3, path = filesystem(uri)
    with _errors(uri, "look up"):
        return s3.get_file_info(f"{path}/{COMPLETE_MARKER}").type == pafs.FileType.File


def list(uri: str) -> builtins.list[str]:  # noqa: A001 (the module's API: remote.list)
    """The URIs of every object at or under ``uri``, sorted; ``[]`` if there is none.

    The completion marker of a folder upload is an object too and is listed.
    """
    from pyarrow import fs as pafs

    s3, path = filesystem(uri)
    with _errors(uri, "list"):
        info = s3.get_file_info(path)
        if info.type == pafs.FileType.File and not uri.endswith("/"):
            return [f"{SCHEME}{path}"]
        if info.type == pafs.FileType.NotFound:
            return []
        sel = pafs.FileSelector(path, recursive=True, allow_not_found=True)
        return sorted(f"{SCHEME}{i.path}" for i in s3.get_file_info(sel) if i.is_file)


# -- content hashing -----------------------------------------------------------------------------


def _digest(manifest: Iterable[tuple[str, int, str]]) -> str:
    """sha256 of a sorted ``[(relative path, size, sha256)]`` list: the content's identity."""
    rows = sorted([rel, size, sha] for rel, size, sha in manifest)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _local_files(local: Path) -> builtins.list[tuple[str, Path]]:
    """``[(relative path, file)]`` of a file or a folder tree (a file: its own name)."""
    if local.is_file():
        return [(local.name, local)]
    if not local.is_dir():
        raise TliError(f"{local}: no such file or folder")
    out = []
    for p in sorted(local.rglob("*")):
        if p.is_file():
            out.append((p.relative_to(local).as_posix(), p))
        elif not p.is_dir():
            raise TliError(f"{p}: not a regular file")
    if not out:
        raise TliError(f"{local}: the folder has no files")
    return out


def content_sha256(local: Path) -> str:
    """The content digest of a local file or folder, as :func:`fetch` and :func:`upload` compute
    it: sha256 over the sorted (relative path, size, sha256 of the bytes) of every file."""
    local = Path(local)
    return _digest(
        (rel, p.stat().st_size, _file_sha256(p))
        for rel, p in _local_files(local)
        if rel != COMPLETE_MARKER
    )


# -- fetch ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fetched:
    """What :func:`fetch_entry` returns.

    Attributes:
        uri: the URI fetched.
        path: the local copy: the file itself for an object, the folder for a prefix.
        sha256: the content digest (see :func:`content_sha256`): version by this, not the URI.
        downloaded: whether this call transferred object bytes (False: served from the cache).
    """

    uri: str
    path: Path
    sha256: str
    downloaded: bool


def fetch(uri: str, cache_root: Path) -> Path:
    """Download an object or a prefix into the cache under ``cache_root``; return its local path.

    See :func:`fetch_entry`, which also returns the content digest.
    """
    return fetch_entry(uri, cache_root).path


def fetch_entry(uri: str, cache_root: Path) -> Fetched:
    """Download an object or a whole prefix into a content-addressed cache.

    Layout under ``cache_root``: ``sha256/<digest>/`` holds the files of one content (read
    only), ``index/<key>.json`` maps a listing (endpoint, URI, and every object's path, size
    and ETag) to a digest, ``tmp/`` holds downloads in progress, ``locks/`` their locks.

    A fetch lists the objects first (one LIST plus one HEAD per object); if the index knows
    that exact listing, nothing is downloaded. Otherwise the objects go into a temporary
    sibling, are hashed while streaming, and the folder is renamed into place when complete:
    a killed download never looks complete. Concurrent fetches of the same URI (threads or
    processes) take turns on a file lock, so the second finds the first's result. If the
    prefix holds a :data:`COMPLETE_MARKER` (a folder written by :func:`upload`), exactly the
    files it lists are fetched and their sizes and sha256 must match it.

    Args:
        uri: ``s3://bucket/key`` of an object, or of a prefix (a "folder"; a trailing ``/``
            forces the prefix reading).
        cache_root: the cache folder (created if missing).

    Returns:
        The local path, the content digest, and whether bytes were downloaded.

    Raises:
        TliError: nothing at ``uri``, access denied, endpoint unreachable, or an object that
            changed during the download (one line, no credentials).
    """
    cache_root = Path(cache_root).absolute()
    s3, path = filesystem(uri)
    kind, objs = _objects(s3, uri, path)
    listing = [[o.rel, o.size, o.etag] for o in objs]
    key = hashlib.sha256(
        json.dumps([_endpoint().key, f"{SCHEME}{path}", kind, listing]).encode()
    ).hexdigest()
    for sub in ("sha256", "index", "tmp", "locks"):
        (cache_root / sub).mkdir(parents=True, exist_ok=True)
    index = cache_root / "index" / f"{key}.json"

    if (hit := _lookup(cache_root, index, uri)) is not None:
        return hit
    with _locked(cache_root / "locks" / f"{key}.lock"):
        if (hit := _lookup(cache_root, index, uri)) is not None:  # a concurrent fetch won
            return hit
        digest, name = _download(s3, uri, kind, objs, cache_root)
        record = {"uri": uri, "kind": kind, "sha256": digest, "name": name}
        _write_atomic(index, json.dumps(record, indent=1).encode())
    return Fetched(uri, _entry_path(cache_root, digest, name), digest, downloaded=True)


def _entry_path(cache_root: Path, digest: str, name: str | None) -> Path:
    entry = cache_root / "sha256" / digest
    return entry / name if name else entry


def _lookup(cache_root: Path, index: Path, uri: str) -> Fetched | None:
    try:
        record = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    path = _entry_path(cache_root, record["sha256"], record.get("name"))
    if not path.exists():  # the entry was removed by hand: download again
        return None
    log.debug("%s: cached at %s", uri, path)
    return Fetched(uri, path, record["sha256"], downloaded=False)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    # flock: released by the kernel if the holder dies, so a killed fetch never blocks others.
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(
    s3: S3FileSystem, uri: str, kind: str, objs: builtins.list[_Object], cache_root: Path
) -> tuple[str, str | None]:
    """Download ``objs`` into a temp folder, hash them, move the folder into the cache.

    Returns:
        ``(digest, name)``: ``name`` is the file's name for a single object, else None.
    """
    marker = next((o for o in objs if o.rel == COMPLETE_MARKER), None) if kind == "dir" else None
    expected: dict[str, tuple[int, str]] | None = None
    if marker is not None:
        expected = _read_marker(s3, uri, marker)
        by_rel = {o.rel: o for o in objs}
        missing = sorted(set(expected) - set(by_rel))
        if missing:
            raise TliError(
                f"{uri}: incomplete upload, {len(missing)} file(s) missing: {missing[0]}"
            )
        objs = [by_rel[rel] for rel in sorted(expected)]  # extras from older uploads: ignored
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=cache_root / "tmp"))
    try:
        shas = _map(lambda o: _get(s3, uri, o, tmp / o.rel), objs)
        manifest = [(o.rel, o.size, sha) for o, sha in zip(objs, shas, strict=True)]
        if expected is not None:
            for rel, size, sha in manifest:
                if expected[rel] != (size, sha):
                    raise TliError(f"{uri}: {rel} does not match the upload's marker: upload again")
        digest = _digest(manifest)
        for _, p in _local_files(tmp):
            p.chmod(0o444)  # content-addressed: a cached file must never change in place
        entry = cache_root / "sha256" / digest
        try:
            os.rename(tmp, entry)
        except OSError as e:
            # The same content is already there (another URI, or a fetch whose index write
            # was lost): keep it, drop ours.
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not entry.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(o.size for o in objs)
    log.info(
        "fetched %s (%d files, %.1f MB) in %.1f s -> %s",
        uri, len(objs), size / 1e6, time.monotonic() - t0, entry,
    )  # fmt: skip
    return digest, (objs[0].rel if kind == "file" else None)


def _read_marker(s3: S3FileSystem, uri: str, marker: _Object) -> dict[str, tuple[int, str]]:
    with _errors(uri, "read"), s3.open_input_stream(marker.path, compression=None) as f:
        raw = f.read()
    try:
        files = json.loads(raw)["files"]
        return {rel: (int(size), str(sha)) for rel, size, sha in files}
    except (ValueError, KeyError, TypeError):
        raise TliError(f"{uri}: {COMPLETE_MARKER} is not a tli upload marker") from None


def _get(s3: S3FileSystem, uri: str, obj: _Object, dest: Path) -> str:
    """Stream one object to ``dest``; return the sha256 of its bytes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    n = 0
    with _errors(uri, "download"), s3.open_input_stream(obj.path, compression=None) as src:
        etag = src.metadata().get("ETag", b"")
        etag = etag.decode() if isinstance(etag, bytes) else str(etag)
        if etag != obj.etag:
            raise TliError(f"{uri}: {obj.rel} changed while fetching: try again")
        with open(dest, "wb") as out:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)
    if n != obj.size:
        raise TliError(f"{uri}: {obj.rel} changed while fetching ({n} != {obj.size} bytes)")
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- upload --------------------------------------------------------------------------------------


def upload(local: Path, uri: str) -> str:
    """Upload a file, or a folder tree, to ``uri``; return the content digest.

    A file becomes the object ``uri`` (or ``uri`` + its name if ``uri`` ends with ``/``). A
    folder's files become ``uri/<relative path>``; the old :data:`COMPLETE_MARKER` is deleted
    first and the new one, listing every file with size and sha256, is written last, so a
    reader (:func:`fetch`, :func:`is_complete`) never takes a half-written folder for a whole
    one. Objects from an earlier upload that the new one lacks stay, but are not fetched. The
    bucket is created if missing.

    Args:
        local: a file or a folder.
        uri: ``s3://bucket/key``.

    Returns:
        The content sha256 (equal to :func:`content_sha256` of ``local`` and to the digest
        :func:`fetch_entry` reports for ``uri`` afterwards).
    """
    from pyarrow import fs as pafs

    local = Path(local)
    bucket, key = parse(uri)
    if local.is_file() and uri.endswith("/"):
        uri = join(uri, local.name)
        bucket, key = parse(uri)
    s3, path = filesystem(uri)
    files = _local_files(local)
    with _errors(uri, "upload to"):
        if s3.get_file_info(bucket).type == pafs.FileType.NotFound:
            s3.create_dir(bucket)
        if local.is_file():
            if not key:
                raise TliError(f"{uri}: a file needs an object key, not just a bucket")
            sha = _put(s3, local, path)
            return _digest([(path.rsplit("/", 1)[-1], local.stat().st_size, sha)])
        marker_path = f"{path}/{COMPLETE_MARKER}"
        if s3.get_file_info(marker_path).type == pafs.FileType.File:
            s3.delete_file(marker_path)
        files = [(rel, p) for rel, p in files if rel != COMPLETE_MARKER]
        t0 = time.monotonic()
        shas = _map(lambda f: _put(s3, f[1], f"{path}/{f[0]}"), files)
        manifest = [(rel, p.stat().st_size, sha) for (rel, p), sha in zip(files, shas, strict=True)]
        digest = _digest(manifest)
        marker = {"sha256": digest, "files": sorted([r, s, h] for r, s, h in manifest)}
        with s3.open_output_stream(marker_path, compression=None) as out:
            out.write(json.dumps(marker, indent=1).encode())
    log.info("uploaded %s (%d files) in %.1f s", uri, len(files), time.monotonic() - t0)
    return digest


def _put(s3: S3FileSystem, src: Path, path: str) -> str:
    """Stream ``src`` to the object ``path``; return the sha256 of its bytes."""
    h = hashlib.sha256()
    # compression=None: pyarrow would otherwise gzip a "*.gz" name on the fly.
    with open(src, "rb") as f, s3.open_output_stream(path, compression=None) as out:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            out.write(chunk)
    return h.hexdigest()


# -- locations: a local path or an s3:// URI, the same calls ---------------------------------------
# Ray Train / Tune keep their state in a folder or under s3:// (runtime.storage); the stages read
# that state (is there a checkpoint? which trials finished?) through these, whichever it is.


def location_join(location: str | os.PathLike[str], *parts: str) -> str:
    """``location`` with ``parts`` appended: a URI for ``s3://``, a path otherwise."""
    loc = str(location)
    return join(loc, *parts) if is_remote(loc) else str(Path(loc, *parts))


def listdir(location: str | os.PathLike[str]) -> builtins.list[str]:
    """The names directly under ``location`` (files and folders), sorted; ``[]`` if none."""
    from pyarrow import fs as pafs

    loc = str(location)
    if not is_remote(loc):
        p = Path(loc)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
    s3, path = filesystem(loc)
    with _errors(loc, "list"):
        sel = pafs.FileSelector(path, recursive=False, allow_not_found=True)
        return sorted(i.base_name for i in s3.get_file_info(sel))


def is_file(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a file (an object)."""
    from pyarrow import fs as pafs

    loc = str(location)
    if not is_remote(loc):
        return Path(loc).is_file()
    s3, path = filesystem(loc)
    with _errors(loc, "look up"):
        return s3.get_file_info(path).type == pafs.FileType.File


def read_text(location: str | os.PathLike[str]) -> str:
    """The text of the file (object) at ``location``."""
    loc = str(location)
    if not is_remote(loc):
        return Path(loc).read_text()
    s3, path = filesystem(loc)
    with _errors(loc, "read"), s3.open_input_stream(path, compression=None) as f:
        return f.read().decode()


def remove_tree(location: str | os.PathLike[str]) -> None:
    """Remove the folder (prefix) at ``location`` and everything under it; nothing if absent."""
    loc = str(location)
    if not is_remote(loc):
        shutil.rmtree(loc, ignore_errors=True)
        return
    from pyarrow import fs as pafs

    s3, path = filesystem(loc)
    with _errors(loc, "remove"):
        if s3.get_file_info(path).type != pafs.FileType.NotFound:
            s3.delete_dir_contents(path, missing_dir_ok=True)
            with contextlib.suppress(OSError):  # S3 has no empty folders to remove
                s3.delete_dir(path)


def copy_tree(location: str | os.PathLike[str], dest: Path) -> None:
    """Copy the folder (prefix) at ``location`` into the local folder ``dest`` (merged)."""
    loc = str(location)
    dest = Path(dest)
    if not is_remote(loc):
        shutil.copytree(loc, dest, dirs_exist_ok=True)
        return
    s3, path = filesystem(loc)
    _, objs = _objects(s3, loc, path)
    _map(lambda o: _get(s3, loc, o, dest / o.rel), objs)
