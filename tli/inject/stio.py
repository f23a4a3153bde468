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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tli.drills import drill
from tli.errors import TliError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_CHUNK = 64 * 1024 * 1024  # bytes per copy_file_range call (a multiple of _FOLIO)
_READ_CHUNK = 8 * 1024 * 1024  # bytes per read where the kernel cannot copy: bounds memory

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
            wmap = json.loads(idx.read_bytes())["weight_map"]
            names = set(wmap.values())
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise TliError(f"corrupt {idx}: it has no valid weight_map") from None
        # Shard names are file names in this folder: never a path that leaves it.
        odd = sorted(str(f) for f in names if not isinstance(f, str) or Path(f).name != f
                     or f in ("", ".", ".."))  # fmt: skip
        if odd:
            raise TliError(f"{idx.name} names a shard outside {model_dir}: {odd[0]!r}")
        files = sorted({model_dir / f for f in names})
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

# A kernel copy (copy_file_range, which ext4 serves by splicing page-cache pages) runs ~1.5x
# faster when (a) source and destination sit at the same offset within a page and (b) each call
# starts at a 64 KiB boundary of the destination, so the page cache can use large folios there.
# Measured on ext4 (benchmarks/bench_inject.py): 4.3 GB/s when both hold, 2.8 GB/s otherwise.
_PAGE = 4096
_FOLIO = 64 * 1024
_ALIGN_MIN_BYTES = 1024 * 1024  # shards with fewer copied bytes are not padded


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: its header entry and how its bytes are made."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    kind: str  # "copy" | "zeros" | "compute"
    src: TensorRef | None = None  # "copy": the bytes copied; "zeros": the tensor it stands for
    compute: Callable[[], bytes | memoryview] | None = None  # for "compute"
    home: Path | None = None  # the input file this tensor (or its layer) comes from


def tensor_bytes(t) -> memoryview:
    """A CPU tensor's bytes, as a "compute" :class:`OutTensor` returns them (no copy when the
    tensor is contiguous)."""
    import torch

    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())  # [nbytes]


def copy_range(
    src_fd: int,
    dst_fd: int,
    start: int,
    nbytes: int,
    dst_start: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Copy ``nbytes`` from ``src_fd`` at ``start`` to ``dst_fd`` at ``dst_start`` (positional)."""
    done = 0
    try:
        if not hasattr(os, "copy_file_range"):  # not Linux (macOS has no such call)
            raise OSError("copy_file_range is not available")
        while done < nbytes:
            # A call that starts off a 64 KiB boundary of the destination is slow all along
            # (see _FOLIO): copy up to the boundary first, then whole chunks from it.
            lead = -(dst_start + done) % _FOLIO
            step = min(lead or _CHUNK, nbytes - done)
            n = os.copy_file_range(src_fd, dst_fd, step, start + done, dst_start + done)
            if n == 0:
                raise TliError("input file shrank while it was being read")
            done += n
            if progress:
                progress(n)
        return
    except OSError:
        pass  # not supported here (across filesystems, old kernel): plain reads below
    while done < nbytes:
        buf = os.pread(src_fd, min(_READ_CHUNK, nbytes - done), start + done)
        if not buf:
            raise TliError("input file shrank while it was being read")
        _pwrite_all(dst_fd, buf, dst_start + done)
        done += len(buf)
        if progress:
            progress(len(buf))


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def plan_shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Group output tensors into shards and order each shard for fast copying.

    A shard never mixes tensors whose ``home`` input files differ, so that one header length
    can line all its copies up with their source pages (see :func:`_header_bytes`). Within a
    home, first copies come in source order (an original layer's tensors then form one
    contiguous range: one kernel call), then repeated copies (new layers) in source order with
    their zeroed tensors in place, then computed tensors. Zeros are holes, free to write; those
    whose size is not a whole number of pages go last, so that they never shift the alignment of
    a copy. A shard holds at most ``max_bytes`` (one tensor may exceed it).
    """
    homes: dict[Path | None, list[OutTensor]] = {}
    for t in tensors:
        homes.setdefault(t.home, []).append(t)
    shards: list[list[OutTensor]] = []
    for group in homes.values():
        seen: set[tuple[Path, int, int]] = set()
        firsts: list[OutTensor] = []
        repeats: list[OutTensor] = []
        in_place = [t for t in group if t.kind == "zeros" and t.src and t.nbytes % _PAGE == 0]
        for t in sorted([t for t in group if t.kind == "copy"] + in_place, key=_src_key):
            key = _src_key(t)
            (repeats if key in seen or t.kind == "zeros" else firsts).append(t)
            seen.add(key)
        ordered = firsts + repeats
        ordered += [t for t in group if t.kind == "compute"]
        placed = {id(t) for t in in_place}
        ordered += [t for t in group if t.kind == "zeros" and id(t) not in placed]
        shards.append([])
        size = 0
        for t in ordered:
            if shards[-1] and size + t.nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
    return shards or [[]]


def _src_key(t: OutTensor) -> tuple[Path, int, int]:
    assert t.src is not None
    return (t.src.file, t.src.start, t.src.end)


def _header_bytes(tensors: list[OutTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header, padded with spaces so that copies are aligned.

    A kernel copy whose source and destination offsets differ within a page runs ~1.5x slower
    (each source page lands on two destination pages), and reflink-capable filesystems can share
    only aligned blocks. The data start is free (a header may end in spaces), so in a shard with
    more than a few copied bytes it is chosen such that most of them sit at the same offset
    within a page as in their input file: at most 4 KiB of spaces per shard.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    off = 0
    weight: dict[int, int] = {}  # data start (mod _PAGE) -> copied bytes it would align
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [off, off + t.nbytes],
        }
        if t.kind == "copy" and t.src is not None:
            want = (t.src.start - off) % _PAGE
            if want % 8 == 0:  # the data start stays 8-byte aligned, as safetensors wants
                weight[want] = weight.get(want, 0) + t.nbytes
        off += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    if sum(weight.values()) >= _ALIGN_MIN_BYTES:
        target = max(weight, key=lambda k: (weight[k], -k))
        raw += b" " * ((target - 8 - len(raw)) % _PAGE)
    else:
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def write_checkpoint(
    out_dir: Path,
    tensors: list[OutTensor],
    *,
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> list[Path]:
    """Write ``tensors`` as safetensors shards (+ index when more than one) into ``out_dir``.

    Args:
        out_dir: an existing, empty folder.
        tensors: the output tensors, in any order (:func:`plan_shards` groups and orders
            them into shards).
        max_shard_bytes: shard size limit.
        metadata: the ``__metadata__`` of every shard (``format: pt`` is always set).
        progress: called with the number of bytes done, as they are done.
        threads: shards written at once (default: one per CPU, at most 4). Each shard is its
            own file, so the kernel copies run in parallel; within one file they would not (the
            kernel serializes writes to one file).

    Returns:
        The files written.
    """
    meta = {**(metadata or {}), "format": "pt"}
    shards = plan_shards(tensors, max_shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    paths = [out_dir / n for n in names]
    threads = max(1, min(len(shards), threads or min(os.cpu_count() or 1, 4)))
    if threads == 1:
        for path, shard in zip(paths, shards, strict=True):
            write_file(path, shard, meta, progress)
    else:
        from concurrent.futures import ThreadPoolExecutor

        # Largest shards first, so that the last one to start is a short one.
        order = sorted(range(len(shards)), key=lambda i: -sum(t.nbytes for t in shards[i]))
        with ThreadPoolExecutor(threads) as pool:
            jobs = [pool.submit(write_file, paths[i], shards[i], meta, progress) for i in order]
            for job in jobs:
                job.result()
    written = list(paths)
    if len(shards) > 1:
        wmap = {t.name: n for n, shard in zip(names, shards, strict=True) for t in shard}
        wmap = dict(sorted(wmap.items()))
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": wmap}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        written.append(out_dir / INDEX_FILE)
    return written


def write_file(
    path: Path,
    shard: list[OutTensor],
    meta: dict[str, str],
    progress: Callable[[int], None] | None = None,
    *,
    drills: str | None = "inject",
) -> None:
    """One safetensors file: header, then every tensor at its offset; zeros are left as holes.

    Tensors are written in the order given (:func:`plan_shards` orders a model's shards), one
    at a time: a computed tensor's bytes are the only ones held, never the whole file's (as
    ``safetensors.torch.save_file`` does). ``drills``: the fault-drill points' prefix
    (``<drills>.run`` after each run of tensors, ``<drills>.shard`` at the end), None for none.
    """
    head = _header_bytes(shard, meta)
    src_fds: dict[Path, int] = {}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        # Sizing the file first makes every zero tensor a hole: read back as zeros, never
        # written, no disk blocks (cp and tar keep holes too).
        os.ftruncate(fd, len(head) + sum(t.nbytes for t in shard))
        _pwrite_all(fd, head, 0)
        pos = len(head)
        for run in _copy_runs(shard):
            nbytes = sum(t.nbytes for t in run)
            _write_run(run, fd, pos, src_fds, progress)
            if drills:
                drill(f"{drills}.run", path.name)  # a no-op unless a fault drill is armed
            pos += nbytes
        if drills:
            drill(f"{drills}.shard", path.name)
    finally:
        os.close(fd)
        for sfd in src_fds.values():
            os.close(sfd)


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


def _write_run(
    run: list[OutTensor],
    fd: int,
    pos: int,
    src_fds: dict[Path, int],
    progress: Callable[[int], None] | None,
) -> None:
    t = run[0]
    if t.kind == "copy":
        first, last = run[0].src, run[-1].src
        assert first is not None and last is not None
        assert sum(x.nbytes for x in run) == last.end - first.start, f"{t.name}: size mismatch"
        if first.file not in src_fds:
            src_fds[first.file] = os.open(first.file, os.O_RDONLY)
        copy_range(src_fds[first.file], fd, first.start, last.end - first.start, pos, progress)
    elif t.kind == "zeros":
        if progress:
            progress(t.nbytes)  # a hole: ftruncate already made these bytes zeros
    elif t.kind == "compute":
        assert t.compute is not None
        data = t.compute()
        assert len(data) == t.nbytes, (
            f"{t.name}: computed {len(data)} bytes, header says {t.nbytes}"
        )
        _pwrite_all(fd, data, pos)
        if progress:
            progress(t.nbytes)
    else:  # pragma: no cover - construction bug
        raise AssertionError(f"unknown producer kind {t.kind}")
