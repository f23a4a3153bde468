"""Streaming injection on tiny models of every supported family, built here with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import randomize_, save_tiny
from tli.config import InjectConfig, Runtime
from tli.inject.memory import inject_in_memory
from tli.inject.plan import make_plan, read_plan
from tli.inject.stage import run_inject
from tli.inject.stio import INDEX_FILE
from tli.modelfolder import load_causal_lm

QUIET = Runtime(progress=False)

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip


def _families():
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "llama-bias": (
            tf.LlamaConfig, tf.LlamaForCausalLM,
            {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False},
        ),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 4}),
        "qwen2": (
            tf.Qwen2Config, tf.Qwen2ForCausalLM,
            {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 3},
        ),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"sliding_window": 4, "head_dim": 16}),
        "gemma3": (
            tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
            {"sliding_window": 4, "head_dim": 16,
             "layer_types": ["sliding_attention", "full_attention"] * 3},
        ),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"pad_token_id": 0}),
    }  # fmt: skip


def build(family: str, out: Path, seed: int = 0, **save_kw) -> Path:
    cfg_cls, model_cls, extra = _families()[family]
    cfg = cfg_cls(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    randomize_(model, seed)
    return save_tiny(model, out, **save_kw)


def logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = load_causal_lm(model_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits  # [batch, seq, vocab]


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(_families()))
def test_identity_injection_keeps_logits(family: str, tmp_path: Path):
    src = build(family, tmp_path / "base")
    out = run_inject(src, tmp_path / "up", InjectConfig(interval=2), runtime=QUIET)
    base_cfg = json.loads((src / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 9
    plan = read_plan(out)
    assert plan is not None and plan.new_layers == (2, 5, 8)
    if "layer_types" in base_cfg:
        # every layer keeps its source's attention type (sliding vs full)
        assert cfg["layer_types"] == [base_cfg["layer_types"][s.source] for s in plan.layers]
    if "max_window_layers" in base_cfg:
        mwl = base_cfg["max_window_layers"]
        assert cfg["max_window_layers"] == sum(s.source < mwl for s in plan.layers)
    a, b = logits(src, IDS), logits(out, IDS)
    diff = (a - b).abs().max().item()
    assert diff <= 1e-5, f"{family}: identity injection changed logits by {diff}"
    model = load_causal_lm(out)
    assert model.config.num_hidden_layers == 9
    if base_cfg.get("tie_word_embeddings", True) and "lm_head.weight" not in _names(src):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def _names(model_dir: Path) -> set[str]:
    from tli.inject.stio import read_checkpoint

    return set(read_checkpoint(model_dir))


def test_new_layers_are_copies_with_zeroed_output_projections(tmp_path: Path):
    from safetensors.torch import load_file

    src = build("llama-bias", tmp_path / "base")
    out = run_inject(src, tmp_path / "up", InjectConfig(interval=3), runtime=QUIET)
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    # output layer 3 is new, copied from input layer 2; output 4 is input 3
    for sfx in (
        "self_attn.q_proj.weight",
        "self_attn.q_proj.bias",
        "mlp.up_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ):
        assert torch.equal(b[f"model.layers.3.{sfx}"], a[f"model.layers.2.{sfx}"]), sfx
        assert torch.equal(b[f"model.layers.4.{sfx}"], a[f"model.layers.3.{sfx}"]), sfx
    for sfx in (
        "self_attn.o_proj.weight",
        "self_attn.o_proj.bias",
        "mlp.down_proj.weight",
        "mlp.down_proj.bias",
    ):
        assert not b[f"model.layers.3.{sfx}"].any(), f"{sfx} of the new layer is not zero"
        assert b[f"model.layers.2.{sfx}"].any()
    assert torch.equal(b["lm_head.weight"], a["lm_head.weight"])


def test_copy_interpolate_and_alpha(tmp_path: Path):
    from safetensors.torch import load_file

    src = build("llama", tmp_path / "base")
    a = load_file(src / "model.safetensors")
    copy = run_inject(src, tmp_path / "copy", InjectConfig(interval=2, init="copy"), runtime=QUIET)
    interp = run_inject(
        src,
        tmp_path / "interp",
        InjectConfig(interval=2, init="interpolate", alpha=0.5),
        runtime=QUIET,
    )
    c, i = load_file(copy / "model.safetensors"), load_file(interp / "model.safetensors")
    w = "mlp.down_proj.weight"
    assert torch.equal(c[f"model.layers.2.{w}"], a[f"model.layers.1.{w}"])
    mean = (a[f"model.layers.1.{w}"] + a[f"model.layers.2.{w}"]) / 2
    torch.testing.assert_close(i[f"model.layers.2.{w}"], mean * 0.5)
    q = "self_attn.q_proj.weight"
    torch.testing.assert_close(
        i[f"model.layers.2.{q}"], (a[f"model.layers.1.{q}"] + a[f"model.layers.2.{q}"]) / 2
    )
    # a copy is not function-preserving: logits move
    assert (logits(src, IDS) - logits(copy, IDS)).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("method", "kw", "layers"), [("dus", {"overlap": 2}, 8), ("stack", {}, 12)]
)
def test_dus_and_stack_load_and_run(method, kw, layers, tmp_path: Path):
    src = build("qwen2", tmp_path / "base")
    out = run_inject(src, tmp_path / "up", InjectConfig(method=method, **kw), runtime=QUIET)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == layers == len(cfg["layer_types"])
    assert logits(out, IDS).shape == (2, 12, 128)


def test_sharded_input_and_output(tmp_path: Path):
    src = build("llama", tmp_path / "base", max_shard_size="40KB")
    assert (src / INDEX_FILE).is_file(), "the test model should be sharded"
    out = run_inject(
        src,
        tmp_path / "up",
        InjectConfig(interval=3),
        runtime=Runtime(progress=False, shard_size=60_000),
    )
    index = json.loads((out / INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum((out / s).stat().st_size for s in shards) - sum(
        _header_size(out / s) for s in shards
    )
    assert torch.equal(logits(src, IDS), logits(out, IDS))


def _header_size(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_output_folder_contents_and_rerun_identical(tmp_path: Path, base_dir: Path):
    src = build("llama", tmp_path / "base")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (src / f).write_bytes((base_dir / f).read_bytes())
    (src / "pytorch_model.bin").write_bytes(b"never read")  # ignored when safetensors exist
    (src / "modeling_evil.py").write_text("raise SystemExit")  # remote code is never carried
    out1 = run_inject(src, tmp_path / "a", InjectConfig(), runtime=QUIET)
    out2 = run_inject(src, tmp_path / "b", InjectConfig(), runtime=QUIET)
    files = sorted(p.name for p in out1.iterdir())
    assert files == sorted([
        "README.md", "chat_template.jinja", "config.json", "generation_config.json",
        "model.safetensors", "tli_plan.json", "tli_provenance.json", "tokenizer.json",
        "tokenizer_config.json",
    ])  # fmt: skip
    for f in files:
        assert (out1 / f).read_bytes() == (out2 / f).read_bytes(), f"{f} differs between reruns"
    card = (out1 / "README.md").read_text()
    assert "| layers | 6 | 7 |" in card and "function-preserving: yes" in card
    assert not list(tmp_path.glob(".*tmp*")), "temporary folder left behind"


def test_in_memory_injection_matches_streaming_and_cache(tmp_path: Path):
    src = build("gemma3", tmp_path / "base")
    cfg = InjectConfig(interval=2, init="interpolate", alpha=0.3)
    out = run_inject(src, tmp_path / "up", cfg, runtime=QUIET)
    model = load_causal_lm(src).eval()
    plan = make_plan(6, cfg)
    model = inject_in_memory(model, plan)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(9))
    assert model.config.layer_types == json.loads((out / "config.json").read_text())["layer_types"]
    with torch.no_grad():
        mem = model(input_ids=IDS).logits
    torch.testing.assert_close(mem, logits(out, IDS), rtol=0, atol=1e-5)
    # cached generation must agree with recomputing from scratch (layer_idx renumbered)
    ids = IDS[:1, :5]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        nocache = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(gen, nocache)


def test_real_smollm2_30_to_36_logits_unchanged(base_dir: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    out = run_inject(base_dir, tmp_path / "smol36", InjectConfig(interval=5), runtime=QUIET)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 36
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is Paris, and it is known for", return_tensors="pt").input_ids
    a, b = logits(base_dir, ids), logits(out, ids)
    assert torch.equal(a, b), f"max diff {(a - b).abs().max().item()}"


def _source_of(out: Path, base: Path) -> dict[str, tuple]:
    """Each output tensor -> (its output ref, the input ref it was copied from, or None if zeroed)."""
    import re

    from tli.inject.stio import read_checkpoint

    a, b = read_checkpoint(base), read_checkpoint(out)
    layers = {s.index: s for s in read_plan(out).layers}
    pairs = {}
    for name, ref in b.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if not m:
            pairs[name] = (ref, a[name])
            continue
        s = layers[int(m.group(1))]
        zeroed = s.out_scale == 0.0 and m.group(2).split(".")[1] in ("o_proj", "down_proj")
        pairs[name] = (ref, None if zeroed else a[f"model.layers.{s.source}.{m.group(2)}"])
    return pairs


def test_real_smollm2_copies_aligned_and_zeros_are_holes(base_dir: Path, tmp_path: Path):
    """The writer's two speed levers, on the real model: page-aligned copies and zeros as holes."""
    import os

    out = run_inject(base_dir, tmp_path / "smol36", InjectConfig(interval=5), runtime=QUIET)
    pairs = _source_of(out, base_dir)
    copied = [(o, i) for o, i in pairs.values() if i is not None]
    aligned = sum(o.nbytes for o, i in copied if (o.start - i.start) % 4096 == 0)
    assert aligned / sum(o.nbytes for o, _ in copied) > 0.85
    for o, i in copied:
        assert o.nbytes == i.nbytes
    zeros = [o for o, i in pairs.values() if i is None]
    assert len(zeros) == 12  # o_proj and down_proj of the 6 new layers
    probe = tmp_path / "probe"  # does this filesystem keep holes at all?
    with open(probe, "wb") as f:
        f.truncate(1 << 20)
    if probe.stat().st_blocks * 512 >= 1 << 20:
        pytest.skip("this filesystem does not keep holes")
    fd = os.open(out / "model.safetensors", os.O_RDONLY)
    try:
        for z in zeros:  # every whole page inside a zero tensor is a hole
            first_page = -(-z.start // 4096) * 4096
            if z.end - first_page >= 4096:
                assert os.lseek(fd, first_page, os.SEEK_HOLE) == first_page, z.name
    finally:
        os.close(fd)


def test_parallel_shard_writers_write_identical_bytes(tmp_path: Path):
    """Shards are written by several threads at once; the bytes must not depend on it."""
    from tli.inject.arch import arch_for
    from tli.inject.stio import plan_shards, read_checkpoint, write_checkpoint
    from tli.inject.surgery import plan_tensors

    src = build("qwen2", tmp_path / "base", max_shard_size="40KB")
    refs = read_checkpoint(src)
    cfg = json.loads((src / "config.json").read_text())
    tensors = plan_tensors(refs, make_plan(6, InjectConfig(interval=2)), arch_for(cfg, list(refs)))
    shards = plan_shards(tensors, 30_000)
    homes = [{t.home for t in shard} for shard in shards]
    assert all(len(h) == 1 for h in homes), "a shard mixes input files"
    for shard in shards:
        assert sum(t.nbytes for t in shard) <= 30_000 or len(shard) == 1
    outs = []
    for threads in (1, 3):
        d = tmp_path / f"t{threads}"
        d.mkdir()
        files = write_checkpoint(d, tensors, max_shard_bytes=30_000, threads=threads)
        outs.append({f.name: f.read_bytes() for f in files})
    assert len(outs[0]) > 3 and outs[0] == outs[1]


def test_without_kernel_copies_the_bytes_are_the_same(tmp_path: Path, monkeypatch):
    """Across filesystems (EXDEV), on old kernels or off Linux there is no kernel copy: reads."""
    import errno
    import os

    src = build("phi3", tmp_path / "base", max_shard_size="40KB")
    fast = run_inject(src, tmp_path / "fast", InjectConfig(interval=2), runtime=QUIET)

    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    slow = run_inject(src, tmp_path / "slow", InjectConfig(interval=2), runtime=QUIET)
    monkeypatch.delattr(os, "copy_file_range")  # as on macOS
    mac = run_inject(src, tmp_path / "mac", InjectConfig(interval=2), runtime=QUIET)
    names = sorted(p.name for p in fast.iterdir())
    for other in (slow, mac):
        assert names == sorted(p.name for p in other.iterdir())
        for n in names:
            assert (fast / n).read_bytes() == (other / n).read_bytes(), n
