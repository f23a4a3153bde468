"""The data stage: the corpus built, split and counted into ``<split>.jsonl`` + ``manifest.json``.

The manifest records the resolved ``data`` config, every source with its package, licence,
documents kept and dropped and characters, and for every split its documents, characters,
UTF-8 bytes, tokens (for the given tokenizer) and the file's sha256. Counting the tokens also
fills the token cache (:mod:`tli.data.blocks`), so the stages that follow start at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tli
from tli import sources
from tli.config import DataConfig, Runtime
from tli.data.blocks import load_token_stream, load_tokenizer_check, tokenizer_fingerprint
from tli.data.corpus import BUNDLED, SPLITS, Doc, collect_docs, split_docs
from tli.drills import drill
from tli.errors import TliError
from tli.output import precheck, staged
from tli.provenance import sha256_file

CORPUS_FORMAT = "tli-corpus/1"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DataJob:
    """The corpus to write: its documents by split and the tokenizer that counts them."""

    cfg: DataConfig
    tokenizer_dir: Path
    by_split: dict[str, list[Doc]]
    stats: dict[str, dict[str, Any]]

    def describe(self) -> dict[str, Any]:
        return {
            "stage": "data",
            "config": self.cfg.model_dump(mode="json"),
            "tokenizer": str(self.tokenizer_dir),
            "documents": {s: len(d) for s, d in self.by_split.items()},
            "sources": self.stats,
        }


def default_tokenizer_dir() -> Path:
    """The bundled base model's folder (SmolLM2), whose tokenizer is the default."""
    from tli.base import import_base

    return import_base()


def prepare(cfg: DataConfig, inputs: dict[str, Path], runtime: Runtime) -> DataJob:
    """Read, clean, deduplicate and split the sources (nothing written).

    Args:
        cfg: the ``data`` section.
        inputs: ``{"base": a model folder}`` whose tokenizer counts the tokens; without it,
            the bundled SmolLM2's.
        runtime: unused (the stage has no runtime options).
    """
    tokenizer_dir = inputs.get("base")
    if tokenizer_dir is not None:
        load_tokenizer_check(Path(tokenizer_dir))
    # s3:// extras are read from their copy in the cache (fetched once); the manifest keeps the
    # config as given.
    extra = [str(sources.local(x, what="data.extra")) for x in cfg.extra]
    local_cfg = cfg.model_copy(update={"extra": extra}) if extra != cfg.extra else cfg
    docs, stats = collect_docs(local_cfg)  # raises on missing packages / files before writing
    if not docs:
        raise TliError("the sources gave no documents after cleaning")
    by_split = split_docs(docs, cfg)
    for s in SPLITS:
        if not by_split[s]:
            raise TliError(
                f"the {s} split is empty ({len(docs)} documents in all): "
                "use more data or larger fractions"
            )
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else default_tokenizer_dir()
    return DataJob(cfg, tok, by_split, stats)


def execute(job: DataJob, out: Path) -> None:
    """Write the split files and the manifest into ``out``."""
    splits: dict[str, Any] = {}
    for s in SPLITS:
        f = out / f"{s}.jsonl"
        with f.open("w", encoding="utf-8") as fh:
            for d in job.by_split[s]:
                fh.write(json.dumps({"text": d.text, "source": d.source, "id": d.id}) + "\n")
        splits[s] = {
            "file": f.name,
            "documents": len(job.by_split[s]),
            "characters": sum(len(d.text) for d in job.by_split[s]),
            "bytes_utf8": sum(len(d.text.encode()) for d in job.by_split[s]),
            "sha256": sha256_file(f),
        }
        drill("data.split", s)  # a no-op unless a fault drill is armed
    (out / MANIFEST).write_text("{}")  # so load_token_stream accepts the folder
    for s in SPLITS:
        splits[s]["tokens"] = int(load_token_stream(out, job.tokenizer_dir, s).numel())
        drill("data.tokens", s)
    manifest = {
        "format": CORPUS_FORMAT,
        "config": job.cfg.model_dump(mode="json"),
        "sources": _sources(job),
        "splits": splits,
        "tokenizer": {
            "fingerprint": tokenizer_fingerprint(job.tokenizer_dir),
            "name": job.tokenizer_dir.name,
        },  # fmt: skip
        "separator": "end-of-text token after each document",
        "tli_version": tli.__version__,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _sources(job: DataJob) -> list[dict[str, Any]]:
    docs = [d for split in job.by_split.values() for d in split]
    out = []
    for name, st in job.stats.items():
        src = BUNDLED.get(name)
        out.append(
            {
                "name": name,
                "package": src.dist if src else None,
                "licence": src.licence if src else "as given by the user",
                "description": src.description if src else "user data",
                **st,
                "characters": sum(len(d.text) for d in docs if d.source == name),
            }
        )
    return out


def run_data_build(
    cfg: DataConfig,
    out: Path,
    tokenizer_dir: Path | None = None,
    *,
    force: bool = False,
    runtime: Runtime | None = None,
) -> Path:
    """Build the corpus into ``out`` (staged: renamed into place when complete).

    Args:
        cfg: the ``data`` section of the run config.
        out: the corpus folder to create.
        tokenizer_dir: whose tokenizer to count tokens with; None = the bundled base model.
        force: replace an existing ``out``.
        runtime: how to run it (``offline``: whether ``data.dataset`` may name a Hub dataset).

    Returns:
        ``out``.
    """
    out = Path(out)
    local_extra = [Path(p) for p in cfg.extra if not sources.is_uri(p)]
    precheck(out, force=force, protect=local_extra)
    inputs = {"base": Path(tokenizer_dir)} if tokenizer_dir is not None else {}
    job = prepare(cfg, inputs, runtime or Runtime())
    with staged(out, force=force, protect=local_extra) as st:
        execute(job, st.path)
    return out


def read_manifest(corpus: Path) -> dict[str, Any]:
    """The manifest of a corpus folder."""
    f = Path(corpus) / MANIFEST
    if not f.is_file():
        raise TliError(f"{corpus} is not a corpus built by `tli data build` (no manifest.json)")
    try:
        m = json.loads(f.read_bytes())
    except (ValueError, UnicodeDecodeError):
        m = None
    if not isinstance(m, dict):
        raise TliError(f"{f} is not a corpus manifest (a JSON object): build the corpus again")
    return m
