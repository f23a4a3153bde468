"""Reading raw corpus shards: a read task's part of a shard, its documents, their tokens.

Shared by the in-process and the Ray Data tokenising paths of :mod:`tli.data.stream` (and
imported by :mod:`tli.data.raytok`, which Ray's read tasks unpickle), so it imports neither.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tli.config import DataConfig
from tli.errors import TliError

PART_BYTES = 16 * 1024 * 1024  # a jsonl read task's share of a file: bounds a task's memory


@dataclass(frozen=True)
class Part:
    """A read task's share of one shard: a byte range of a jsonl, row groups of a parquet file,
    or a whole text / json file."""

    file: int  # index into the list of shards being tokenised
    uri: str
    kind: str
    lo: int = 0
    hi: int = 0


def parts_of(files: Sequence[Any]) -> list[Part]:
    """Every shard cut into parts, in order."""
    out = []
    for i, f in enumerate(files):
        low = f.uri.lower()
        if low.endswith(".jsonl"):
            cuts = list(range(0, f.size, PART_BYTES)) or [0]
            out += [Part(i, f.uri, f.kind, a, min(a + PART_BYTES, f.size)) for a in cuts]
        elif low.endswith(".parquet"):
            with _open(f.uri) as fh:
                import pyarrow.parquet as pq

                groups = pq.ParquetFile(fh).num_row_groups
            out += [Part(i, f.uri, f.kind, g, g + 1) for g in range(groups)]
        else:
            out.append(Part(i, f.uri, f.kind))
    return out


def _open(uri: str) -> Any:
    """A seekable binary file of a local path or an S3 object."""
    from tli import remote

    if remote.is_remote(uri):
        fs, path = remote.filesystem(uri)
        return fs.open_input_file(path)
    return open(uri, "rb")  # noqa: SIM115 (the caller's with-block closes it)


def _jsonl_lines(fh: Any, lo: int, hi: int) -> Iterator[bytes]:
    """The lines of a jsonl file that start in bytes ``[lo, hi)``, read in one range (a line
    that starts before ``lo`` is the previous part's; one that starts before ``hi`` is read to
    its end)."""
    start = max(0, lo - 1)
    fh.seek(start)
    buf = fh.read(hi - start)
    while buf and not buf.endswith(b"\n"):
        more = fh.read(64 * 1024)
        if not more:
            break
        cut = more.find(b"\n")
        buf += more if cut < 0 else more[: cut + 1]
        if cut >= 0:
            break
    if lo > 0:
        nl = buf.find(b"\n")  # buf[0] is byte lo - 1: the first line starts after a newline
        buf = buf[nl + 1 :] if nl >= 0 else b""
    for line in buf.split(b"\n"):
        if line.strip():
            yield line


def part_texts(part: Part, split: str, data_cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """``(split, text)`` of every document in ``part``, in file order.

    A corpus shard's records are all of ``split``, their text taken as is (``tli data build``
    cleaned it). A raw shard's documents are read, cleaned and split as ``tli data build``
    reads a user's files (:func:`tli.data.corpus.read_file_docs`), without deduplication.
    """
    from tli.data.corpus import MIN_DOC_CHARS, chunk_paragraphs, clean_text, split_of

    def raw(text: str) -> Iterator[tuple[str, str]]:
        text = clean_text(text)
        if len(text) >= MIN_DOC_CHARS:
            yield split_of(text, data_cfg.split_seed, data_cfg.val_fraction,
                           data_cfg.heldout_fraction), text  # fmt: skip

    for text in _records(part):
        if part.kind == "corpus":
            yield split, text
        elif part.uri.lower().endswith((".txt", ".md", ".text")):
            for chunk in chunk_paragraphs(clean_text(text)):
                yield from raw(chunk)
        else:
            yield from raw(text)


def _records(part: Part) -> Iterator[str]:
    low = part.uri.lower()
    with _open(part.uri) as fh:
        if low.endswith(".jsonl"):
            for n, line in enumerate(_jsonl_lines(fh, part.lo, part.hi)):
                if line.strip():
                    yield _text_of(line, part, n)
        elif low.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.ParquetFile(fh).read_row_group(part.lo, columns=["text"])
            yield from (t or "" for t in table.column("text").to_pylist())
        elif low.endswith(".json"):
            records = json.loads(fh.read())
            if not isinstance(records, list):
                raise TliError(f"{part.uri}: a .json data file must hold a list of records")
            for i, rec in enumerate(records):
                yield _field(rec, part.uri, i)
        else:
            yield fh.read().decode("utf-8", errors="replace")


def _text_of(line: bytes, part: Part, n: int) -> str:
    try:
        rec = json.loads(line)
    except ValueError:
        raise TliError(f"{part.uri}: a line after byte {part.lo} is not JSON (#{n})") from None
    return _field(rec, part.uri, n)


def _field(rec: Any, uri: str, i: int) -> str:
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise TliError(f"{uri}: record {i} has no string 'text' field")
    return rec["text"]


_TOKENIZERS: dict[tuple[str, str], Any] = {}


def encode(texts: Sequence[str], tokenizer_dir: str, fingerprint: str) -> list[list[int]]:
    """Token ids of each text with the end-of-text separator after it, as
    :func:`tli.data.blocks.tokenize_texts` makes them (the tokenizer is loaded once a process)."""
    from tli.data.blocks import load_tokenizer

    key = (tokenizer_dir, fingerprint)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(Path(tokenizer_dir))
    tok = _TOKENIZERS[key]
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
    ids = tok(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    return [x + [sep] if sep is not None else x for x in ids]
