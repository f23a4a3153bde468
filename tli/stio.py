"""Streaming safetensors I/O: headers as data, tensors as byte ranges.

A safetensors file is an 8-byte little-endian header length, a JSON header
(``name -> {dtype, shape, data_offsets}``) and the raw bytes. So a tensor that is copied
unchanged never needs to be decoded: its bytes are moved file to file with
``os.copy_file_range`` (in the kernel, no user-space buffer). Only tensors that change are read,
one at a time. Output headers are computed up front from the plan, then each shard is written
in one pass: peak memory is the largest changed tensor, whatever the model's size.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tli.errors import TliError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_CHUNK = 64 * 1024 * 1024  # bytes per copy_file_range call
_ZERO_CHUNK = 4 * 1024 * 1024  # zero-fill buffer: small, so peak memory stays flat

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live in an input file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in ``file``
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Parse one safetensors file's header without reading any tensor data.

    Returns:
        (tensors by name, the ``__metadata__`` dict).

    Raises:
        TliError: the file is unreadable or its header is not valid safetensors.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than 8 bytes")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {hlen} exceeds the file")
            header = json.loads(f.read(hlen))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        base = 8 + hlen
        out: dict[str, TensorRef] = {}
        for name, h in header.items():
            a, b = h["data_offsets"]
            shape = tuple(int(d) for d in h["shape"])
            ref = TensorRef(name, path, str(h["dtype"]), shape, base + int(a), base + int(b))
            width = DTYPE_BYTES.get(ref.dtype)
            if width is None or ref.numel * width != ref.nbytes or ref.end > size or a > b:
                raise ValueError(f"tensor {name} has inconsistent dtype/shape/offsets")
            out[name] = ref
        return out, dict(meta)
    except OSError as e:
        raise TliError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise TliError(f"corrupt safetensors header in {path}: {e}; re-export the model") from None


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF model folder (index-listed shards or model.safetensors)."""
    idx = model_dir / INDEX_FILE
    if idx.is_file():
        try:
            wmap = json.loads(idx.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise TliError(f"corrupt {idx}: it has no valid weight_map") from None
        files = sorted({model_dir / f for f in wmap.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise TliError(f"{idx.name} lists missing shards: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(
        p.name for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl") for p in model_dir.glob(ext)
    )
    if pickles:
        raise TliError(
            f"{model_dir} holds only a pickle checkpoint ({pickles[0]}); tli never unpickles: "
            "save the model as safetensors first"
        )
    raise TliError(f"{model_dir} has no *.safetensors weights")


def read_checkpoint(model_dir: Path) -> dict[str, TensorRef]:
    """All tensors of an HF model folder, by name, from headers only."""
    refs: dict[str, TensorRef] = {}
    for f in checkpoint_files(model_dir):
        part, _ = read_header(f)
        dup = refs.keys() & part.keys()
        if dup:
            raise TliError(f"tensor {sorted(dup)[0]} appears in two shards of {model_dir}")
        refs.update(part)
    return refs


# ---------------------------------------------------------------------------- writing

# A producer writes exactly ``nbytes`` bytes of one tensor to an open file.
Producer = Callable[[int], None]


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: its header entry and how its bytes are made."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    kind: str  # "copy" | "zeros" | "compute"
    src: TensorRef | None = None  # for "copy"
    compute: Callable[[], bytes | memoryview] | None = None  # for "compute"


def copy_range(src_fd: int, dst_fd: int, start: int, nbytes: int) -> None:
    """Copy ``nbytes`` from ``src_fd`` at ``start`` to ``dst_fd``'s current position."""
    done = 0
    try:
        while done < nbytes:
            n = os.copy_file_range(src_fd, dst_fd, min(_CHUNK, nbytes - done), start + done)
            if n == 0:
                raise OSError("copy_file_range copied nothing")
            done += n
        return
    except OSError:
        pass  # not supported here (old kernel, other filesystem): plain reads below
    while done < nbytes:
        buf = os.pread(src_fd, min(_CHUNK, nbytes - done), start + done)
        if not buf:
            raise TliError("input file shrank while it was being read")
        os.write(dst_fd, buf)
        done += len(buf)


def _header_bytes(tensors: list[OutTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    off = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [off, off + t.nbytes],
        }
        off += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def split_shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Group tensors, in order, into shards of at most ``max_bytes`` (one tensor may exceed it)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_checkpoint(
    out_dir: Path,
    tensors: list[OutTensor],
    *,
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write ``tensors`` as safetensors shards (+ index when more than one) into ``out_dir``.

    Args:
        out_dir: an existing, empty folder.
        tensors: output tensors in file order.
        max_shard_bytes: shard size limit.
        metadata: the ``__metadata__`` of every shard (``format: pt`` is always set).
        progress: called with the bytes written after each tensor.

    Returns:
        The files written.
    """
    meta = {**(metadata or {}), "format": "pt"}
    shards = split_shards(tensors, max_shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    src_fds: dict[Path, int] = {}
    written: list[Path] = []
    try:
        for fname, shard in zip(names, shards, strict=True):
            path = out_dir / fname
            with open(path, "wb") as f:
                f.write(_header_bytes(shard, meta))
                f.flush()
                fd = f.fileno()
                for run in _copy_runs(shard):
                    _write_run(run, fd, src_fds)
                    if progress:
                        progress(sum(t.nbytes for t in run))
            written.append(path)
    finally:
        for fd in src_fds.values():
            os.close(fd)
    if len(shards) > 1:
        wmap = {t.name: n for n, shard in zip(names, shards, strict=True) for t in shard}
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": wmap}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        written.append(out_dir / INDEX_FILE)
    return written


def _copy_runs(shard: list[OutTensor]) -> list[list[OutTensor]]:
    """Group tensors so that copies contiguous in the same input file become one range.

    An original layer's tensors usually sit back to back in its input file and are written back
    to back: one kernel copy for the lot instead of one per tensor.
    """
    runs: list[list[OutTensor]] = []
    for t in shard:
        prev = runs[-1][-1] if runs else None
        if (
            prev is not None
            and t.kind == "copy"
            and prev.kind == "copy"
            and t.src is not None
            and prev.src is not None
            and t.src.file == prev.src.file
            and t.src.start == prev.src.end
        ):
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def _write_run(run: list[OutTensor], fd: int, src_fds: dict[Path, int]) -> None:
    if len(run) == 1:
        _write_one(run[0], fd, src_fds)
        return
    first, last = run[0].src, run[-1].src
    assert first is not None and last is not None
    if first.file not in src_fds:
        src_fds[first.file] = os.open(first.file, os.O_RDONLY)
    copy_range(src_fds[first.file], fd, first.start, last.end - first.start)


def _write_one(t: OutTensor, fd: int, src_fds: dict[Path, int]) -> None:
    if t.kind == "copy":
        assert t.src is not None and t.src.nbytes == t.nbytes, f"{t.name}: size mismatch"
        if t.src.file not in src_fds:
            src_fds[t.src.file] = os.open(t.src.file, os.O_RDONLY)
        copy_range(src_fds[t.src.file], fd, t.src.start, t.nbytes)
    elif t.kind == "zeros":
        left = t.nbytes
        zeros = bytes(min(_ZERO_CHUNK, left))
        while left:
            n = os.write(fd, zeros[: min(len(zeros), left)])
            left -= n
    elif t.kind == "compute":
        assert t.compute is not None
        data = t.compute()
        assert len(data) == t.nbytes, (
            f"{t.name}: computed {len(data)} bytes, header says {t.nbytes}"
        )
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    else:  # pragma: no cover - construction bug
        raise AssertionError(f"unknown producer kind {t.kind}")


def iter_layer_tensors(
    refs: dict[str, TensorRef], layer_re
) -> Iterator[tuple[str, int | None, str]]:
    """(name, layer index or None, suffix) for every tensor, in name order."""
    for name in sorted(refs):
        m = layer_re.fullmatch(name)
        yield (name, int(m.group(1)), m.group(2)) if m else (name, None, "")
