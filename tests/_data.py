"""Shared test helper: the real offline corpus, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

_CORPUS: dict[str, Path] = {}


def build_corpus(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """The default corpus (wiki + Shakespeare), built once per session with ``tokenizer_dir``.

    Tokens are cached in tli's cache, so later sessions only re-read and re-split the text.
    """
    if "default" not in _CORPUS:
        from tli.config import DataConfig
        from tli.data.stage import run_data_build

        out = tmp_path_factory.mktemp("corpus") / "corpus"
        _CORPUS["default"] = run_data_build(DataConfig(), out, tokenizer_dir)
    return _CORPUS["default"]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory, base_dir: Path) -> Path:
    """The real offline corpus folder (train / validation / heldout .jsonl + manifest)."""
    return build_corpus(tmp_path_factory, base_dir)
