"""GGUF import: the bundled SmolLM2 converts to an HF folder that loads and runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tli.base import bundled_gguf
from tli.cli import main


def test_import_gguf_converts_bundled_smollm2(base_dir: Path, tmp_path: Path, capsys):
    from safetensors import safe_open

    out = tmp_path / "smol"
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(["import-gguf", str(bundled_gguf()), "--out", str(out)]))
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == str(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 30
    assert cfg["tie_word_embeddings"] is True and cfg["hidden_size"] == 576
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file(), f
    # the conversion is deterministic: the same tensors as the cached base
    with (
        safe_open(out / "model.safetensors", "pt") as a,
        safe_open(base_dir / "model.safetensors", "pt") as b,
    ):
        names = sorted(a.keys())
        assert names == sorted(b.keys()) and "lm_head.weight" not in names
        assert sum(_numel(a.get_slice(n).get_shape()) for n in names) == 134_515_008
        for n in names[:: max(1, len(names) // 12)]:
            assert a.get_tensor(n).equal(b.get_tensor(n)), n
    assert not list(tmp_path.glob(".*tmp*"))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
