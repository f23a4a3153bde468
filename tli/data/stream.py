"""Training data as a stream: corpus shards -> cached token shards -> fixed-length blocks.

The in-memory path (:func:`tli.data.blocks.load_blocks`) holds a whole split as one tensor in
the process that trains; fine for the 2.6M-token demo corpus, impossible for a real one. Here no
process ever holds more than a few batches:

1. **Sources** (:func:`split_files`): a corpus folder from ``tli data build`` (its
   ``<split>.jsonl``, or ``<split>.parquet``, or shards ``<split>-*.jsonl|parquet`` /
   ``<split>/*``), a folder of raw shards (``*.jsonl``, ``*.json``, ``*.parquet``, ``*.txt``,
   ``*.md``: each document cleaned and assigned to a split by the hash of its text, as
   ``tli data build`` does, but without its deduplication across files), the same as
   ``s3://`` prefixes (read through pyarrow, :mod:`tli.remote`), or files. ``None`` is the
   bundled corpus, built as the data stage builds it by default.
2. **Tokenisation** (:func:`tokenise`), only for shards the token cache lacks: a Ray Data
   pipeline, read parts of the shards (:class:`tli.data.raytok.CorpusParts`) -> ``map_batches``
   (tokenise, an end-of-text token after each document) -> the driver appends the tokens, in
   order, to one cache file per shard. The cache is keyed as :mod:`tli.data.blocks` keys it
   (the shard file's sha256 and the tokenizer's fingerprint), so a corpus folder's
   ``train.jsonl`` has the very cache entry the in-memory path reads, and either path fills it
   for the other. Without a Ray session the same readers run in this process.
3. **Blocks** (:class:`TokenIndex`): the split's token stream is its shards' cache files one
   after another; block ``i`` is tokens ``[i * T, (i + 1) * T)``, read by byte range. These are
   exactly the blocks of ``load_blocks``.
4. **The feed** (:mod:`tli.data.feed`): each Train worker gets a Ray Data dataset of its own
   micro-batches in :class:`tli.train.step.DataOrder` (``ray.train.get_dataset_shard``),
   starting at the step a checkpoint says.

The token cache must be readable where the feed's read tasks run: they are pinned to the node
that wrote it (the driver's), so it need not be on shared storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tli.config import DataConfig
from tli.data.shards import encode, part_texts, parts_of
from tli.errors import TliError

if TYPE_CHECKING:
    import numpy as np
    import torch

SHARD_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".md", ".text")
TOKENS_FORMAT = "tli-tokens/1"  # the same format tli.data.blocks writes
RAW_VERSION = "1"  # bump when the raw-shard reading (cleaning, split) changes: new cache keys
_HEADER_BYTES = 4096  # reserved for a streamed cache file's header: the tokens start on a page
_MAX_FDS = 64  # open cache files a reading process keeps


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SplitFile:
    """One shard of a split: where it is, how to read it, and what identifies its content."""

    uri: str  # a local path or s3://bucket/key
    kind: str  # "corpus": records' text as is, all of one split; "raw": cleaned, split by hash
    sha256: str
    size: int


def _norm(item: Any) -> str:
    """A local path or an s3:// URI as a string (a Path collapses ``s3://`` to ``s3:/``)."""
    text = str(item)
    if text.startswith("s3:/") and not text.startswith("s3://"):
        text = "s3://" + text[len("s3:/") :]
    return text


def _listing(uri: str) -> list[str] | None:
    """Every file under a folder or prefix (sorted, recursive), or None for a single file."""
    from tli import remote

    if remote.is_remote(uri):
        found = remote.list(uri.rstrip("/") + "/")
        if found:
            return found
        if remote.exists(uri):
            return None
        raise TliError(f"data {uri} does not exist (no object at or under it)")
    p = Path(uri)
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*") if f.is_file())
    if p.is_file():
        return None
    raise TliError(f"data file {uri} does not exist")


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _top(listing: list[str], base: str) -> dict[str, str]:
    """The files directly in ``base``, by name."""
    return {_name(u): u for u in listing if u.rsplit("/", 1)[0] == base}


def _corpus_split(listing: list[str], base: str, split: str) -> list[str]:
    """A corpus folder's files of ``split``."""
    names = _top(listing, base)
    for single in (f"{split}.jsonl", f"{split}.parquet"):
        if single in names:
            return [names[single]]
    shard = (".jsonl", ".parquet")
    sharded = sorted(u for n, u in names.items() if n.startswith(f"{split}-") and n.endswith(shard))
    inside = sorted(u for u in listing if u.startswith(f"{base}/{split}/") and u.endswith(shard))
    files = sharded or inside
    if not files:
        raise TliError(f"{base} is a corpus folder without a {split} split ({split}.jsonl, "
                       f"{split}.parquet, {split}-*.jsonl or {split}/)")  # fmt: skip
    return files


def split_files(data: Any, split: str) -> list[SplitFile]:
    """The shards of ``split`` in ``data``, in order, with their content hashes.

    Args:
        data: a corpus folder (from ``tli data build``: it has ``manifest.json``), a folder of
            raw shards, an ``s3://`` prefix of either, one or more files, or None (the bundled
            corpus).
        split: ``train``, ``validation`` or ``heldout``.

    Raises:
        TliError: a path that does not exist, an ``hf:`` dataset (read it with
            ``train.feed: memory``), or no shard to read.
    """
    from tli.data.corpus import SPLITS

    if split not in SPLITS:
        raise TliError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    items = [bundled_corpus()] if data is None else (
        list(data) if isinstance(data, list | tuple) else [data])  # fmt: skip
    from tli import remote

    # Local paths as pathlib writes them ("./c/" -> "c"), so that listings compare as strings.
    uris = [u if remote.is_remote(u) else str(Path(u)) for u in map(_norm, items)]
    hf = [u for u in uris if u.startswith("hf:") and not Path(u).exists()]
    if hf:
        raise TliError(f"{hf[0]} cannot be streamed: use train.feed=memory (--feed memory) "
                       "or build a corpus folder with `tli data build` first")  # fmt: skip
    base = uris[0].rstrip("/")
    listing = _listing(base) if len(uris) == 1 else None
    if listing is not None and "manifest.json" in _top(listing, base):
        chosen, kind = _corpus_split(listing, base, split), "corpus"
    elif listing is not None:
        # Hidden files are not shards (an upload's completion marker, editors' leftovers).
        top = _top(listing, base).items()
        chosen = sorted(u for n, u in top if n.lower().endswith(SHARD_SUFFIXES) and n[0] != ".")
        if not chosen:
            raise TliError(f"{uris[0]} holds no {', '.join(SHARD_SUFFIXES)} shards to read")
        kind = "raw"
    else:
        for u in uris:
            if _listing(u) is not None:
                raise TliError(f"{u} is a folder: give one folder, or files")
            if not u.lower().endswith(SHARD_SUFFIXES):
                raise TliError(f"unsupported data file {u}: use {', '.join(SHARD_SUFFIXES)}")
        chosen, kind = uris, "raw"
    return [SplitFile(u, kind, *_content_id(u)) for u in chosen]


_HASHED: dict[tuple[str, int, int, int], str] = {}  # this process's hashes of local shards


def _content_id(uri: str) -> tuple[str, int]:
    """(sha256, size) of a shard, read through once (as :mod:`tli.data.blocks` hashes a split
    file); an S3 object's hash is remembered across runs, a local file's within this process
    while its size, modification time and inode stay the same."""
    from tli import remote

    if remote.is_remote(uri):
        return _s3_content_id(uri)
    st = os.stat(uri)
    key = (os.path.realpath(uri), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _HASHED:
        h = hashlib.sha256()
        with open(uri, "rb") as f:
            while chunk := f.read(8 * 1024 * 1024):
                h.update(chunk)
        _HASHED[key] = h.hexdigest()
    return _HASHED[key], st.st_size


def _s3_content_id(uri: str) -> tuple[str, int]:
    """sha256 and size of an S3 object, remembered by (URI, size, modification time)."""
    from tli import remote
    from tli.data.blocks import cache_dir

    fs, path = remote.filesystem(uri)
    info = fs.get_file_info(path)
    stamp = f"{uri}\x00{info.size}\x00{info.mtime_ns}"
    memo = cache_dir() / "s3-sha256" / hashlib.sha256(stamp.encode()).hexdigest()
    if memo.is_file():
        return memo.read_text().strip(), int(info.size)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
    tmp.write_text(h.hexdigest())
    os.replace(tmp, memo)
    return h.hexdigest(), int(info.size)


def bundled_corpus() -> Path:
    """The bundled corpus as the data stage builds it by default (built once into tli's cache)."""
    from tli.config import Runtime
    from tli.data.blocks import cache_dir
    from tli.data.stage import default_tokenizer_dir, execute, prepare
    from tli.output import staged

    cfg = DataConfig()
    key = hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
    out = cache_dir().parent / "corpus" / key.hexdigest()[:20]
    if not (out / "manifest.json").is_file():
        job = prepare(cfg, {"base": default_tokenizer_dir()}, Runtime())
        with staged(out, exists_ok=True, wait_s=600.0) as st:
            if (out / "manifest.json").is_file():  # another process built it meanwhile
                st.abandon()
            else:
                execute(job, st.path)
    return out


# ----------------------------------------------------------------------------- cache entries


def cache_key(f: SplitFile, split: str, tok_fp: str, data_cfg: DataConfig) -> str:
    """The token cache's key of one shard's split: as :mod:`tli.data.blocks` keys a corpus file."""
    if f.kind == "corpus":
        return f"{f.sha256[:20]}-{tok_fp[:20]}"
    how = (f"raw{RAW_VERSION}\x00{f.sha256}\x00{split}\x00{data_cfg.split_seed}\x00"
           f"{data_cfg.val_fraction}\x00{data_cfg.heldout_fraction}")  # fmt: skip
    return f"raw-{hashlib.sha256(how.encode()).hexdigest()[:20]}-{tok_fp[:20]}"


def cache_path(f: SplitFile, split: str, tok_fp: str, data_cfg: DataConfig) -> Path:
    from tli.data.blocks import cache_dir

    return cache_dir() / f"{cache_key(f, split, tok_fp, data_cfg)}.safetensors"


class CacheWriter:
    """One token cache file written as tokens arrive: atomic (a temp file, renamed at the end).

    The header's room is reserved first (safetensors allows a header padded with spaces), so
    the tokens are written once, in order, and never held.
    """

    def __init__(self, path: Path, metadata: dict[str, str]) -> None:
        self.path = path
        self.metadata = metadata
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.fh = open(self.tmp, "wb")  # noqa: SIM115 (closed in close())
        self.fh.write(b"\x00" * _HEADER_BYTES)
        self.n = 0

    def append(self, tokens: np.ndarray) -> None:
        """Append int32 token ids."""
        self.fh.write(tokens.astype("<i4", copy=False).tobytes())
        self.n += int(tokens.size)

    def close(self) -> None:
        """Write the header and put the file in place."""
        tokens = {"dtype": "I32", "shape": [self.n], "data_offsets": [0, 4 * self.n]}
        header = {"__metadata__": self.metadata, "tokens": tokens}
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) > _HEADER_BYTES - 8:
            raise TliError(f"token cache header of {len(raw)} bytes does not fit: a bug")
        self.fh.seek(0)
        self.fh.write(struct.pack("<Q", _HEADER_BYTES - 8) + raw.ljust(_HEADER_BYTES - 8))
        self.fh.close()
        os.replace(self.tmp, self.path)  # a reader sees the old file or the whole new one

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- token index


@dataclass(frozen=True)
class TokenShard:
    """One cache file's tokens: where they start in the file and in the split's stream."""

    path: str
    start: int  # byte offset of the first token in the file
    n_tokens: int
    offset: int  # index of its first token in the split's stream


@dataclass(frozen=True)
class TokenIndex:
    """A split's token stream as the concatenation of cache files (read by byte range)."""

    split: str
    shards: tuple[TokenShard, ...]
    _starts: tuple[int, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def of(cls, split: str, paths: Sequence[Path]) -> TokenIndex:
        """The index of cache files ``paths``, in order (headers only)."""
        from tli.inject.stio import read_header

        shards, offset = [], 0
        for p in paths:
            ref = read_header(Path(p))[0].get("tokens")
            if ref is None or ref.dtype != "I32" or len(ref.shape) != 1:
                raise TliError(f"{p} is not a token cache file (no int32 'tokens')")
            if ref.shape[0]:
                shards.append(TokenShard(str(p), ref.start, ref.shape[0], offset))
                offset += ref.shape[0]
        return cls(split, tuple(shards), tuple(s.offset for s in shards))

    @property
    def n_tokens(self) -> int:
        return self.shards[-1].offset + self.shards[-1].n_tokens if self.shards else 0

    def n_blocks(self, seq_len: int) -> int:
        """Whole blocks of ``seq_len`` tokens (the incomplete tail is dropped, as in memory)."""
        return self.n_tokens // seq_len

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens ``[start, start + n)`` of the stream: int32 ``[n]``."""
        import bisect

        import numpy as np

        out = np.empty(n, dtype="<i4")  # [n]
        done = 0
        i = bisect.bisect_right(self._starts, start) - 1
        while done < n:
            if i >= len(self.shards):
                raise TliError(f"tokens [{start}, {start + n}) run past the {self.split} split")
            s = self.shards[i]
            lo = start + done - s.offset
            take = min(n - done, s.n_tokens - lo)
            view = memoryview(out[done : done + take]).cast("B")
            got = os.preadv(_fd(s.path), [view], s.start + 4 * lo)
            if got != 4 * take:
                raise TliError(f"token cache file {s.path} is shorter than its header says")
            done += take
            i += 1
        return out

    def blocks(self, rows: Sequence[int], seq_len: int) -> np.ndarray:
        """Blocks ``rows`` (indices): int32 ``[len(rows), seq_len]``."""
        import numpy as np

        out = np.empty((len(rows), seq_len), dtype="<i4")  # [R, T]
        for j, r in enumerate(rows):
            out[j] = self.read(int(r) * seq_len, seq_len)
        return out

    def head(self, n_blocks: int, seq_len: int) -> torch.Tensor:
        """The first ``n_blocks`` blocks: int64 ``[n, seq_len]`` (validation sets)."""
        import torch

        flat = self.read(0, n_blocks * seq_len)  # [n * T]
        return torch.from_numpy(flat.astype("int64")).view(n_blocks, seq_len)  # [n, T]


_FDS: OrderedDict[str, int] = OrderedDict()


def _fd(path: str) -> int:
    """A read-only descriptor of a cache file, kept open (a few at a time) for many reads."""
    fd = _FDS.pop(path, None)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        while len(_FDS) >= _MAX_FDS:
            os.close(_FDS.popitem(last=False)[1])
    _FDS[path] = fd
    return fd


# ----------------------------------------------------------------------------- tokenising


def tokenise(
    files: Sequence[SplitFile],
    split: str,
    tokenizer_dir: Path,
    data_cfg: DataConfig | None = None,
    *,
    ray_data: bool | None = None,
) -> None:
    """Fill the token cache for ``files`` (those it lacks): with Ray Data when Ray is up.

    A raw shard's three splits are cached in one pass over it.

    Args:
        files: the shards (from :func:`split_files`).
        split: the split asked for (a corpus shard belongs to it).
        tokenizer_dir: the model folder whose tokenizer is used.
        data_cfg: how raw shards are split (default: ``tli data build``'s defaults).
        ray_data: force (True) or avoid (False) the Ray Data pipeline; None = when Ray is up.
    """
    from tli.data.blocks import tokenizer_fingerprint
    from tli.data.corpus import SPLITS

    data_cfg = data_cfg or DataConfig()
    fp = tokenizer_fingerprint(tokenizer_dir)
    todo = [f for f in files if not cache_path(f, split, fp, data_cfg).is_file()]
    if not todo:
        return
    splits = [split] if all(f.kind == "corpus" for f in todo) else list(SPLITS)

    def writers_of(i: int) -> dict[str, CacheWriter]:
        f = todo[i]
        wanted = [split] if f.kind == "corpus" else splits
        return {s: CacheWriter(cache_path(f, s, fp, data_cfg),
                               {"format": TOKENS_FORMAT, "data_sha256": f.sha256,
                                "tokenizer": fp, "split": s}) for s in wanted}  # fmt: skip

    if ray_data is None:
        import ray

        ray_data = ray.is_initialized()
    if ray_data:
        from tli.data.raytok import ray_rows as rows
    else:
        rows = _local_rows
    _write_rows(rows(parts_of(todo), split, str(Path(tokenizer_dir).resolve()), fp, data_cfg),
                len(todo), writers_of)  # fmt: skip


def _write_rows(rows: Iterator[tuple[int, str, Any]], n_files: int, writers_of: Callable) -> None:
    """Append ``(file, split, tokens)`` rows, in order, to each shard's cache writers (a shard
    or split without a document gets an empty entry: it was read)."""
    current, writers = -1, {}
    try:
        for i, s, tokens in rows:
            while current < i:
                for w in writers.values():
                    w.close()
                current, writers = current + 1, {}
                writers = writers_of(current)
            if s in writers:
                writers[s].append(tokens)
        while True:
            for w in writers.values():
                w.close()
            writers = {}
            if current >= n_files - 1:
                break
            current += 1
            writers = writers_of(current)
    finally:
        for w in writers.values():
            w.abort()


def _local_rows(parts, split, tokenizer_dir, fp, data_cfg) -> Iterator[tuple[int, str, Any]]:
    """The tokenised rows of ``parts``, computed in this process (no Ray)."""
    import numpy as np

    for part in parts:
        batch: list[tuple[str, str]] = []
        for item in part_texts(part, split, data_cfg):
            batch.append(item)
            if len(batch) == 256:
                yield from _encoded(part.file, batch, tokenizer_dir, fp, np)
                batch = []
        yield from _encoded(part.file, batch, tokenizer_dir, fp, np)


def _encoded(file: int, batch, tokenizer_dir, fp, np) -> Iterator[tuple[int, str, Any]]:
    ids = encode([t for _, t in batch], tokenizer_dir, fp)
    for (s, _), x in zip(batch, ids, strict=True):
        yield file, s, np.asarray(x, dtype="<i4")


def token_index(
    data: Any,
    tokenizer_dir: Path,
    split: str,
    *,
    data_cfg: DataConfig | None = None,
    tokenise_missing: bool = True,
) -> TokenIndex | None:
    """The token index of ``split`` of ``data``: tokenising what the cache lacks, or, with
    ``tokenise_missing=False``, None when the cache lacks anything (nothing is written)."""
    from tli.data.blocks import load_tokenizer_check, tokenizer_fingerprint

    load_tokenizer_check(Path(tokenizer_dir))
    data_cfg = data_cfg or DataConfig()
    files = split_files(data, split)
    fp = tokenizer_fingerprint(Path(tokenizer_dir))
    paths = [cache_path(f, split, fp, data_cfg) for f in files]
    if not all(p.is_file() for p in paths):
        if not tokenise_missing:
            return None
        tokenise(files, split, Path(tokenizer_dir), data_cfg)
    return TokenIndex.of(split, paths)


# ----------------------------------------------------------------------------- the feed's spec


@dataclass(frozen=True)
class FeedSpec:
    """What the streamed feed of one training run reads (a pure value, sent to read tasks).

    Attributes:
        index: the train split's token index.
        seq_len, batch_size, grad_accum, seed: as in the train config (:class:`DataOrder`).
        start_step: the first optimizer step the stream serves (a checkpoint's step).
        steps: the run's last step (exclusive end of the stream).
        node_id: the Ray node holding the token cache (read tasks run there), or None.
    """

    index: TokenIndex
    seq_len: int
    batch_size: int
    grad_accum: int
    seed: int
    start_step: int
    steps: int
    node_id: str | None = None

    @property
    def n_blocks(self) -> int:
        return self.index.n_blocks(self.seq_len)

    @property
    def steps_per_task(self) -> int:
        """Optimizer steps per read task: about 16 MB of tokens per worker, at most 64 steps."""
        per_step = self.grad_accum * self.batch_size * self.seq_len * 4
        return max(1, min(64, (16 * 1024 * 1024) // per_step))


def feed_spec(index: TokenIndex, cfg: Any, start_step: int, node_id: str | None) -> FeedSpec:
    """The feed of a train config ``cfg`` from ``start_step``."""
    return FeedSpec(index, cfg.seq_len, cfg.batch_size, cfg.grad_accum, cfg.seed, start_step,
                    cfg.steps, node_id)  # fmt: skip
