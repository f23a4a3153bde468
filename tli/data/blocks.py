"""The one place where text becomes fixed-length token blocks.

:func:`load_blocks` tokenises one split and packs it into ``[n_blocks, seq_len]`` int64
blocks. Training, tuning and evaluation all call it, so all three see the same tokens. The
token stream is cached on disk keyed by (data hash, tokenizer fingerprint); packing into blocks
of any length is a reshape of that stream, so a second run never re-tokenises.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from tli.config import DataConfig
from tli.data.corpus import SPLITS, collect_docs, split_docs
from tli.errors import TliError
from tli.packages import cache_dir as tli_cache

if TYPE_CHECKING:
    import torch

TOKENS_FORMAT = "tli-tokens/1"
# Tokenizer files whose bytes define how text becomes ids.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(tokenizer_dir: Path):
    """The HF tokenizer of a model folder (never remote code).

    Raises:
        TliError: the folder has no tokenizer.
    """
    load_tokenizer_check(Path(tokenizer_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """sha256 over the tokenizer's files: equal fingerprints tokenise identically."""
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        f = Path(tokenizer_dir) / name
        if f.is_file():
            h.update(name.encode() + b"\x00")
            h.update(f.read_bytes())
    return h.hexdigest()


@lru_cache(maxsize=8)
def _token_bytes_cached(tokenizer_dir: str, fingerprint: str) -> tuple[int, ...]:
    tok = load_tokenizer(Path(tokenizer_dir))
    tj = Path(tokenizer_dir) / "tokenizer.json"
    byte_level = tj.is_file() and '"ByteLevel"' in tj.read_text(encoding="utf-8")
    special = set(tok.all_special_ids)
    added = set(tok.added_tokens_decoder) if hasattr(tok, "added_tokens_decoder") else set()
    out = []
    for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        if piece is None or i in special or (i in added and piece.startswith("<")):
            out.append(0)  # separators and control tokens are not text
        elif byte_level:
            out.append(len(piece))  # byte-level BPE: one character per byte
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            out.append(1)  # sentencepiece byte fallback
        else:
            out.append(len(piece.replace("\u2581", " ").encode("utf-8")))
    return tuple(out)


def token_byte_lengths(tokenizer_dir: Path) -> torch.Tensor:
    """UTF-8 bytes of text each token id stands for: int64 ``[vocab]`` (0 for special tokens).

    Used to turn a loss in nats per token into bits per byte, a number comparable across
    tokenizers.
    """
    import torch

    fp = tokenizer_fingerprint(tokenizer_dir)
    return torch.tensor(_token_bytes_cached(str(Path(tokenizer_dir).resolve()), fp))


# --------------------------------------------------------------------------- tokenising + cache


def cache_dir() -> Path:
    """Where token streams are cached: ``tokens/`` in tli's cache (``$TLI_CACHE``)."""
    return tli_cache() / "tokens"


def _progress(total: int, what: str):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=total == 0 or os.environ.get("TLI_NO_PROGRESS") == "1",
    )


def tokenize_texts(texts: list[str], tokenizer, *, what: str = "tokenising") -> list[int]:
    """One token stream: each document's ids followed by an end-of-text separator."""
    sep = tokenizer.eos_token_id
    if sep is None:
        sep = tokenizer.bos_token_id
    stream: list[int] = []
    batch = 256
    with _progress(len(texts), what) as prog:
        task = prog.add_task(what, total=len(texts))
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"]
            for ids in enc:
                stream.extend(ids)
                if sep is not None:
                    stream.append(sep)
            prog.advance(task, len(enc))
    return stream


def _split_texts(data: Path | list[Path], split: str) -> tuple[list[str], str]:
    """The texts of ``split`` of ``data`` and a hash identifying them."""
    paths = [Path(p) for p in (data if isinstance(data, list | tuple) else [data])]
    if len(paths) == 1 and paths[0].is_dir():
        d = paths[0]
        f = d / f"{split}.jsonl"
        if not (d / "manifest.json").is_file() or not f.is_file():
            raise TliError(
                f"{d} is not a corpus built by `tli data build` (no manifest.json or {f.name})"
            )
        _check_manifest(d / "manifest.json")
        raw = f.read_bytes()
        return _corpus_texts(f, raw), hashlib.sha256(raw).hexdigest()
    # Plain files (and at most one "hf:NAME[:CONFIG]" dataset): the same deterministic split as
    # `tli data build` with its default fractions.
    hf = [str(p)[3:] for p in paths if str(p).startswith("hf:") and not p.exists()]
    files = [p for p in paths if not (str(p).startswith("hf:") and not p.exists())]
    if len(hf) > 1:
        raise TliError(f"give at most one hf: dataset, got {', '.join(hf)}")
    cfg = DataConfig(sources=[], extra=[str(p) for p in files], dataset=hf[0] if hf else None)
    for p in files:
        if not p.is_file():
            raise TliError(f"data file {p} does not exist")
    docs, _ = collect_docs(cfg)
    texts = [d.text for d in split_docs(docs, cfg)[split]]
    h = hashlib.sha256(
        f"{split}\x00{cfg.split_seed}\x00{cfg.val_fraction}\x00{cfg.heldout_fraction}".encode()
    )
    for t in texts:  # the texts themselves: an HF dataset has no file to hash
        h.update(hashlib.sha256(t.encode()).digest())
    return texts, h.hexdigest()


def _check_manifest(f: Path) -> None:
    """A corpus folder's manifest.json is a JSON object (its splits, if listed, objects too)."""
    try:
        m = json.loads(f.read_bytes())
    except (ValueError, UnicodeDecodeError):
        m = None
    except OSError as e:
        raise TliError(f"cannot read {f}: {e.strerror}") from None
    splits = m.get("splits", {}) if isinstance(m, dict) else None
    if not isinstance(splits, dict) or not all(isinstance(v, dict) for v in splits.values()):
        raise TliError(f"{f} is not a corpus manifest (a JSON object): build the corpus again")


def _corpus_texts(f: Path, raw: bytes) -> list[str]:
    """The texts of one split file of a corpus folder; a damaged one is a one-line error."""
    texts = []
    try:
        for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            if line:
                doc = json.loads(line)
                if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                    raise ValueError(f"line {n} has no string 'text'")
                texts.append(doc["text"])
    except (ValueError, UnicodeDecodeError) as e:
        raise TliError(f"{f} is damaged ({str(e)[:80]}): build the corpus again") from None
    return texts


def load_token_stream(data: Path | list[Path], tokenizer_dir: Path, split: str) -> torch.Tensor:
    """The token stream of one split as int32 ``[n_tokens]``, from the cache when possible."""
    import torch
    from safetensors.torch import load_file, save_file

    if split not in SPLITS:
        raise TliError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    tokenizer_dir = Path(tokenizer_dir)
    load_tokenizer_check(tokenizer_dir)
    texts, data_hash = _split_texts(data, split)
    tok_fp = tokenizer_fingerprint(tokenizer_dir)
    key = f"{data_hash[:20]}-{tok_fp[:20]}"
    path = cache_dir() / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["tokens"]
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    tok = load_tokenizer(tokenizer_dir)
    stream = tokenize_texts(texts, tok, what=f"tokenising {split}")
    tokens = torch.tensor(stream, dtype=torch.int32)  # [n_tokens]; vocab ids fit in int32
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(
        {"tokens": tokens},
        str(tmp),
        metadata={"format": TOKENS_FORMAT, "data_sha256": data_hash, "tokenizer": tok_fp},
    )
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the whole new file
    return tokens


def load_tokenizer_check(tokenizer_dir: Path) -> None:
    """Raise a clear error when ``tokenizer_dir`` holds no tokenizer (without loading it)."""
    if not Path(tokenizer_dir).is_dir():
        raise TliError(f"tokenizer folder {tokenizer_dir} does not exist")
    if not any((Path(tokenizer_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise TliError(
            f"{tokenizer_dir} has no tokenizer (tokenizer.json or tokenizer.model): "
            "point at a model folder saved with its tokenizer"
        )


def load_blocks(
    data: Path | list[Path], tokenizer_dir: Path, seq_len: int, split: str
) -> torch.Tensor:
    """One split of a corpus, tokenised and packed into fixed-length blocks.

    Documents are joined into one stream with an end-of-text token after each, and the stream is
    cut into consecutive blocks; the incomplete tail is dropped. The result is deterministic:
    the same data, tokenizer and ``seq_len`` always give the same blocks in the same order, so
    ``load_blocks(..., "heldout")[:n]`` is a fixed held-out set.

    Args:
        data: a corpus folder from :func:`run_data_build`, or local text / jsonl / parquet
            file(s), or ``hf:NAME[:CONFIG]`` (an HF dataset's train split, needs network), split
            like ``tli data build`` does with its default fractions.
        tokenizer_dir: a folder with the tokenizer (usually the model folder).
        seq_len: tokens per block.
        split: ``train``, ``validation`` or ``heldout``.

    Returns:
        int64 tensor ``[n_blocks, seq_len]``.

    Raises:
        TliError: bad data path, no tokenizer, or the split is shorter than one block.
    """
    if seq_len < 2:
        raise TliError(f"seq_len must be at least 2, got {seq_len}")
    tokens = load_token_stream(data, tokenizer_dir, split)  # [n_tokens]
    n_blocks = tokens.numel() // seq_len
    if n_blocks == 0:
        raise TliError(
            f"the {split} split has {tokens.numel()} tokens, fewer than one block of {seq_len}: "
            "use more data or a shorter --seq-len"
        )
    return tokens[: n_blocks * seq_len].view(n_blocks, seq_len).long()  # [n_blocks, seq_len]
