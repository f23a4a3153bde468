"""Shared fixtures: the real bundled base model and tiny models built here (never downloaded)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One Ray auth mode for the whole test process, set before anything imports ray: Ray reads it
# once per process, while the heads and GCS it starts read it from the environment. A later
# change (the pipeline's local head sets it) would leave client and server disagreeing.
os.environ.setdefault("RAY_AUTH_MODE", "token")

_SESSION: list[pytest.Session] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    _SESSION.append(session)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """After failures, say what the machine had left: a run of failures from one test on is
    most often a full disk or exhausted memory, which a CI log shows nowhere else."""
    if exitstatus == 0:
        return
    import psutil

    tmp = config._tmp_path_factory.getbasetemp()
    disk = shutil.disk_usage(tmp)
    mem = psutil.virtual_memory()
    gib = 1 << 30
    terminalreporter.write_line(
        f"machine at the end: {disk.free / gib:.1f} GiB free on the tests' disk, "
        f"{mem.available / gib:.1f} of {mem.total / gib:.1f} GiB memory available, "
        f"{len(psutil.pids())} processes"
    )


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """End the test process with pytest's own exit status once pytest has reported everything.

    Native threads outlive the tests (seen at exit: Ray's core-worker and gRPC threads after
    ``ray.shutdown()``, pyarrow's AWS event loop, jemalloc's background thread), and the
    interpreter's teardown has segfaulted once after all 545 tests had passed, which failed
    ``make test`` on a green suite. Nothing of the tests is left at this point: every fixture
    is torn down and the summary is written. ``TLI_TEST_TEARDOWN=1`` keeps the normal
    interpreter exit (to chase such a crash).
    """
    import sys

    if os.environ.get("TLI_TEST_TEARDOWN") == "1" or not _SESSION:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(_SESSION[-1].exitstatus))


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)


def randomize_(model, seed: int = 0) -> None:
    """Give every parameter random, non-trivial values (norm weights too), reproducibly."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            if "norm" in name:
                p.copy_(1.0 + noise if p.abs().mean() > 0.5 else noise)  # Gemma norms are 1 + w
            else:
                p.copy_(noise)


def save_tiny(model, out: Path, tokenizer_from: Path | None = None, **save_kw) -> Path:
    """Save a tiny model as an HF folder, with the real tokenizer files when given."""
    model.save_pretrained(out, **save_kw)
    if tokenizer_from is not None:
        for f in TOKENIZER_FILES:
            if (tokenizer_from / f).is_file():
                shutil.copyfile(tokenizer_from / f, out / f)
    return out


@pytest.fixture(scope="session")
def base_dir() -> Path:
    """The real SmolLM2-135M-Instruct HF folder (converted from the bundled GGUF once, cached)."""
    from tli.base import import_base

    return import_base()


@pytest.fixture(scope="session")
def tiny_model_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LlamaForCausalLM (4 layers, hidden 64) with the real SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    randomize_(model, seed=0)
    return save_tiny(model, tmp_path_factory.mktemp("tiny") / "model", base_dir)


@pytest.fixture(scope="session")
def tiny_injected_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_model_dir`` injected with TLI K=2, identity: 6 layers, new layers 2 and 5."""
    from tli.config import InjectConfig, Runtime
    from tli.inject.stage import run_inject

    out = tmp_path_factory.mktemp("tiny_inj") / "model"
    return run_inject(
        tiny_model_dir, out, InjectConfig(interval=2), runtime=Runtime(progress=False)
    )


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small repetitive jsonl corpus (~10k SmolLM2 tokens, a few validation documents)."""
    import json

    words = "the quick brown fox jumps over the lazy dog while seven bakers sing".split()
    lines = []
    for i in range(300):
        w = words[i % len(words) :] + words[: i % len(words)]
        lines.append(json.dumps({"text": f"Record {i}: " + " ".join(w) + "."}))
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def drill(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Arm a fault drill (:mod:`tli.drills`) for this test: ``drill("train.step=3:raise-once")``."""

    def arm(spec: str | None) -> None:
        if spec is None:
            monkeypatch.delenv("TLI_DRILL", raising=False)
            return
        monkeypatch.setenv("TLI_DRILL", spec)
        monkeypatch.setenv("TLI_DRILL_DIR", str(tmp_path / "drills"))

    return arm
