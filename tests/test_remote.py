"""tli.remote against a real S3 server (SeaweedFS on 127.0.0.1, see tests/_s3.py)."""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

import pytest

from tests import _s3
from tests._cluster import free_ports
from tests._s3 import S3Server
from tli import remote
from tli.errors import TliError

s3_server = _s3.s3_server  # fixtures
s3_env = _s3.s3_env


def _bucket() -> str:
    return f"t{secrets.token_hex(6)}"


def _tree(root: Path) -> Path:
    """A small model-like folder: a few files, one of ~3 MB, a nested one, a .gz name."""
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"layers": 4}\n')
    (root / "model.safetensors").write_bytes(os.urandom(3 * 1024**2 + 17))
    (root / "sub").mkdir()
    (root / "sub" / "notes.txt").write_text("hello\n")
    # pyarrow would gunzip/gzip a "*.gz" name on the fly unless told not to: bytes must not change
    (root / "sub" / "data.jsonl.gz").write_bytes(b"not really gzip")
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _wait_sent(server: S3Server, bucket: str, at_least: int) -> int:
    """The server's sent-bytes counter once it has caught up with ``at_least``."""
    import time

    deadline = time.monotonic() + 30
    while (n := server.bytes_sent(bucket)) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def _assert_clean(err: TliError, server: S3Server) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    for secret in (server.access_key, server.secret_key, os.environ.get("AWS_SECRET_ACCESS_KEY")):
        if secret:
            assert secret not in msg, msg
    return msg


# -- URIs (no server) --------------------------------------------------------------------------


def test_parse_and_join() -> None:
    assert remote.is_remote("s3://b1x/k") and not remote.is_remote("/tmp/x")
    assert not remote.is_remote(Path("s3://x"))  # a Path is always local
    assert remote.parse("s3://my-bucket/a/b.json") == ("my-bucket", "a/b.json")
    assert remote.parse("s3://my-bucket/models/") == ("my-bucket", "models")
    assert remote.parse("s3://my-bucket") == ("my-bucket", "")
    assert remote.join("s3://my-bucket/m", "x", "/y.json") == "s3://my-bucket/m/x/y.json"
    assert remote.join("s3://my-bucket", "x") == "s3://my-bucket/x"


@pytest.mark.parametrize(
    "uri",
    [
        "/local/path",
        "s3:/x/y",
        "s3://",
        "s3://a/k",
        "s3://bad bucket/k",
        "s3://b1x/a//c",
        "s3://b1x/a/../c",
        "gs://b1x/k",
    ],
)
def test_parse_rejects_malformed(uri: str) -> None:
    with pytest.raises(TliError) as e:
        remote.parse(uri)
    assert "\n" not in str(e.value)


def test_half_set_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDONLYHALFSET")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(TliError, match="AWS_SECRET_ACCESS_KEY") as e:
        remote.filesystem("s3://bucket1/x")
    assert "AKIDONLYHALFSET" not in str(e.value)


@pytest.mark.parametrize("endpoint", ["ftp://host:1", "http://host:notaport", "http://host:1/path"])
def test_bad_endpoint(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(TliError, match="AWS_ENDPOINT_URL"):
        remote.filesystem("s3://bucket1/x")


def test_content_sha256_is_by_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "s").mkdir(parents=True)
        (d / "s" / "f").write_bytes(b"x" * 10)
        (d / "g").write_bytes(b"y")
    assert remote.content_sha256(a) == remote.content_sha256(b)
    (b / "g").write_bytes(b"z")
    assert remote.content_sha256(a) != remote.content_sha256(b)


# -- against the server ------------------------------------------------------------------------


def test_upload_fetch_roundtrip_and_cache(s3_env: S3Server, tmp_path: Path) -> None:
    bucket = _bucket()  # upload() creates it
    src = _tree(tmp_path / "src")
    uri = f"s3://{bucket}/models/m1"
    digest = remote.upload(src, uri)
    assert digest == remote.content_sha256(src)
    assert remote.exists(uri) and remote.is_complete(uri)
    listed = remote.list(uri)
    assert f"{uri}/sub/data.jsonl.gz" in listed and f"{uri}/{remote.COMPLETE_MARKER}" in listed

    cache = tmp_path / "cache"
    first = remote.fetch_entry(uri, cache)
    assert first.downloaded and first.sha256 == digest
    assert first.path == cache / "sha256" / digest
    assert _files(first.path) == _files(src)  # byte-identical, marker not among the files
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    sent = _wait_sent(s3_env, bucket, total)
    assert sent >= total  # the counter sees the download (so it can also see none)

    inodes = {p: p.stat().st_ino for p in first.path.rglob("*")}
    tmp_mtime = (cache / "tmp").stat().st_mtime_ns
    second = remote.fetch_entry(uri, cache)
    assert not second.downloaded and second.path == first.path and second.sha256 == digest
    assert s3_env.bytes_sent(bucket) == sent  # no object byte left the server
    assert {p: p.stat().st_ino for p in first.path.rglob("*")} == inodes
    assert (cache / "tmp").stat().st_mtime_ns == tmp_mtime  # no download was even started
    assert remote.fetch(uri, cache) == first.path

    # Same content under another URI: same entry (content-addressed), a download to learn it.
    uri2 = f"s3://{bucket}/copy"
    remote.upload(src, uri2)
    assert remote.fetch_entry(uri2, cache).path == first.path


def test_changed_object_gives_new_entry(s3_env: S3Server, tmp_path: Path) -> None:
    bucket = s3_env.make_bucket(_bucket())
    src = _tree(tmp_path / "src")
    uri = f"s3://{bucket}/m"
    remote.upload(src, uri)
    cache = tmp_path / "cache"
    old = remote.fetch_entry(uri, cache)

    (src / "sub" / "notes.txt").write_text("changed\n")
    new_digest = remote.upload(src, uri)
    new = remote.fetch_entry(uri, cache)
    assert new.downloaded and new.sha256 == new_digest != old.sha256
    assert new.path != old.path and old.path.is_dir()  # the old version stays intact
    assert (new.path / "sub" / "notes.txt").read_text() == "changed\n"
    assert (old.path / "sub" / "notes.txt").read_text() == "hello\n"
    assert _files(new.path) == _files(src)


def test_single_object(s3_env: S3Server, tmp_path: Path) -> None:
    bucket = s3_env.make_bucket(_bucket())
    f = tmp_path / "tok.json"
    f.write_bytes(os.urandom(1000))
    digest = remote.upload(f, f"s3://{bucket}/dir/")  # trailing slash: keep the name
    uri = f"s3://{bucket}/dir/tok.json"
    assert remote.list(f"s3://{bucket}/dir") == [uri]
    got = remote.fetch_entry(uri, tmp_path / "cache")
    assert got.path.name == "tok.json" and got.path.read_bytes() == f.read_bytes()
    assert got.sha256 == digest == remote.content_sha256(f)
    assert (
        not remote.exists(f"s3://{bucket}/dir/nothing") and remote.list(f"s3://{bucket}/no") == []
    )


def test_concurrent_fetches_share_one_download(s3_env: S3Server, tmp_path: Path) -> None:
    bucket = s3_env.make_bucket(_bucket())
    src = _tree(tmp_path / "src")
    uri = f"s3://{bucket}/m"
    remote.upload(src, uri)
    cache = tmp_path / "cache"
    results: list[remote.Fetched] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def one() -> None:
        try:
            barrier.wait()
            results.append(remote.fetch_entry(uri, cache))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len({r.path for r in results}) == 1
    assert sum(r.downloaded for r in results) == 1  # the others waited on the lock
    assert _files(results[0].path) == _files(src)
    assert not any((cache / "tmp").iterdir())


def test_tampered_upload_is_refused_and_leaves_nothing(s3_env: S3Server, tmp_path: Path) -> None:
    bucket = s3_env.make_bucket(_bucket())
    src = _tree(tmp_path / "src")
    uri = f"s3://{bucket}/m"
    remote.upload(src, uri)
    # Overwrite one file behind upload()'s back: the marker no longer matches the bytes.
    with s3_env.filesystem().open_output_stream(f"{bucket}/m/config.json", compression=None) as f:
        f.write(b'{"layers": 5}\n')
    cache = tmp_path / "cache"
    with pytest.raises(TliError, match="marker") as e:
        remote.fetch(uri, cache)
    _assert_clean(e.value, s3_env)
    assert not any((cache / "sha256").iterdir()) and not any((cache / "tmp").iterdir())
    assert not any((cache / "index").iterdir())


def test_missing_object(s3_env: S3Server, tmp_path: Path) -> None:
    bucket = s3_env.make_bucket(_bucket())
    for uri in (f"s3://{bucket}/nothing/here", f"s3://nobucket{bucket}/x"):
        with pytest.raises(TliError) as e:
            remote.fetch(uri, tmp_path / "cache")
        msg = _assert_clean(e.value, s3_env)
        assert uri in msg


def test_wrong_credentials(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_env.make_bucket(_bucket())
    (tmp_path / "f").write_bytes(b"x")
    remote.upload(tmp_path / "f", f"s3://{bucket}/f")
    wrong = "WRONG" + secrets.token_hex(10)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    for call in (
        lambda: remote.fetch(f"s3://{bucket}/f", tmp_path / "c"),
        lambda: remote.list(f"s3://{bucket}"),
    ):
        with pytest.raises(TliError, match="access denied") as e:
            call()
        msg = _assert_clean(e.value, s3_env)
        assert wrong not in msg and "AWS_SECRET_ACCESS_KEY" in msg


def test_no_credentials_is_anonymous(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No AWS_* keys: anonymous requests (refused here), never a hunt for credentials."""
    bucket = s3_env.make_bucket(_bucket())
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    with pytest.raises(TliError, match="access denied") as e:
        remote.fetch(f"s3://{bucket}/x", tmp_path / "cache")
    _assert_clean(e.value, s3_env)


def test_unreachable_endpoint(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (closed,) = free_ports(1)  # nothing listens there once the probe socket is closed
    # userinfo in the URL is never shown (it could carry a secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://user:hidden@127.0.0.1:{closed}")
    with pytest.raises(TliError, match="cannot reach") as e:
        remote.fetch("s3://somebucket/x", tmp_path / "cache")
    msg = _assert_clean(e.value, s3_env)
    assert f"127.0.0.1:{closed}" in msg and "AWS_ENDPOINT_URL" in msg and "hidden" not in msg
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(TliError, match="cannot reach") as e:
        remote.upload(tmp_path / "f", "s3://somebucket/x")
    _assert_clean(e.value, s3_env)
