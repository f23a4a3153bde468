"""MoE upcycling: streamed to disk, loaded by transformers, the dense function kept exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import randomize_, save_tiny
from tli.errors import TliError
from tli.inject import moe
from tli.inject.moe import MoeSpec, moe_config, moe_family, moe_in_memory, moe_param_counts
from tli.inject.stio import read_checkpoint, write_checkpoint

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "MixtralForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", "MixtralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", {"head_dim": 16}),
}
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def _dense(family: str, out: Path, **extra):
    import transformers

    cfg_cls, model_cls, _, kw = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(**TINY, **kw, **extra)
    model = getattr(transformers, model_cls)(cfg)
    randomize_(model, seed=3)
    model.eval()
    save_tiny(model, out)
    return model


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """family -> (dense model in memory, its saved folder); built once per module."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            d = tmp_path_factory.mktemp(family) / "dense"
            cache[family] = (_dense(family, d), d)
        return cache[family]

    return get


def upcycle(dense_dir: Path, out: Path, spec: MoeSpec, **write_kw) -> Path:
    """The streaming surgery, as `tli inject --method moe` runs it."""
    config = json.loads((dense_dir / "config.json").read_text())
    tensors = moe.moe_tensors(read_checkpoint(dense_dir), config, spec)
    out.mkdir(parents=True)
    write_checkpoint(out, tensors, max_shard_bytes=write_kw.pop("max_shard_bytes", 1 << 30))
    (out / "config.json").write_text(json.dumps(moe_config(config, spec), indent=2))
    return out


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, output_loading_info=True, dtype=torch.float32
    )
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[key], f"{key}: {info[key]}"
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits  # [B, T, V]


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def active_params(model, spec: MoeSpec) -> tuple[int, int]:
    """(total, active) counted on the loaded model's own parameters."""
    total = sum(p.numel() for p in model.parameters())
    unused = sum(
        (layer.mlp.experts.gate_up_proj.numel() + layer.mlp.experts.down_proj.numel())
        // spec.experts
        * (spec.experts - spec.top_k)
        for layer in model.model.layers
    )
    return total, total - unused


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("router_init", ["zero", "random"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_upcycled_model_loads_and_computes_the_dense_function(family, router_init, dense, tmp_path):
    model, dense_dir = dense(family)
    spec = MoeSpec(experts=4, top_k=2, router_init=router_init, seed=7)
    # Small shards for one family: the index and cross-shard layers are exercised too.
    shard = 64 * 1024 if family == "mistral" else 1 << 30
    out = upcycle(dense_dir, tmp_path / "moe", spec, max_shard_bytes=shard)
    assert (out / "model.safetensors.index.json").is_file() == (family == "mistral")
    moe_model = load(out)
    assert type(moe_model).__name__ == FAMILIES[family][2]
    assert moe_model.config.num_experts_per_tok == 2
    d = maxdiff(logits(moe_model), logits(model))
    assert d <= 1e-5, f"{family}/{router_init}: max |logits diff| {d:.3g} > 1e-5"

    config = json.loads((dense_dir / "config.json").read_text())
    counts = moe_param_counts(config, spec)
    assert tuple(counts) == active_params(moe_model, spec), (counts, active_params(moe_model, spec))

    # The in-memory sibling (Tune trials) has the very same weights.
    mem = moe_in_memory(model, spec)
    assert type(mem).__name__ == FAMILIES[family][2]
    loaded = moe_model.state_dict()
    for name, t in mem.state_dict().items():
        assert torch.equal(t, loaded[name]), f"{name} differs in memory vs streamed"
    assert maxdiff(logits(mem), logits(model)) <= 1e-5


def test_router_init_zero_and_random(dense, tmp_path):
    _, dense_dir = dense("llama")
    zero = load(upcycle(dense_dir, tmp_path / "z", MoeSpec(4, 2, router_init="zero")))
    rnd = load(upcycle(dense_dir, tmp_path / "r", MoeSpec(4, 2, router_init="random", seed=5)))
    w0 = zero.model.layers[1].mlp.gate.weight  # [E, H]
    w1 = rnd.model.layers[1].mlp.gate.weight  # [E, H]
    assert torch.count_nonzero(w0) == 0
    # std = initializer_range (0.02), as transformers initialises routers; layers differ.
    assert 0.01 < w1.std().item() < 0.03
    assert not torch.equal(w1, rnd.model.layers[0].mlp.gate.weight)


def test_qwen2_moe_shared_expert_adds_exactly_zero(dense, tmp_path):
    model, dense_dir = dense("qwen2")
    spec = MoeSpec(4, 1, shared_expert_size=32)
    m = load(upcycle(dense_dir, tmp_path / "moe", spec))
    mlp = m.model.layers[0].mlp
    assert torch.count_nonzero(mlp.shared_expert.down_proj.weight) == 0
    assert mlp.shared_expert.gate_proj.weight.shape == (32, 64)
    dense_gate = model.model.layers[0].mlp.gate_proj.weight
    assert torch.equal(mlp.shared_expert.gate_proj.weight, dense_gate[:32])
    assert m.config.norm_topk_prob is True
    assert maxdiff(logits(m), logits(model)) <= 1e-5
    config = json.loads((dense_dir / "config.json").read_text())
    assert tuple(moe_param_counts(config, spec)) == active_params(m, spec)


def test_tied_embeddings_stay_tied(tmp_path):
    model = _dense("llama", tmp_path / "dense", tie_word_embeddings=True)
    assert "lm_head.weight" not in read_checkpoint(tmp_path / "dense")
    spec = MoeSpec(4, 2)
    m = load(upcycle(tmp_path / "dense", tmp_path / "moe", spec))
    assert m.config.tie_word_embeddings is True
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert maxdiff(logits(m), logits(model)) <= 1e-5
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert tuple(moe_param_counts(config, spec)) == active_params(m, spec)
    mem = moe_in_memory(model, spec)
    assert mem.lm_head.weight.data_ptr() == mem.model.embed_tokens.weight.data_ptr()


# ---------------------------------------------------------------------------- noise


def test_drop_upcycling_noise_changes_the_function_deterministically(dense, tmp_path):
    model, dense_dir = dense("qwen3")
    spec = MoeSpec(4, 2, noise=0.25, seed=11)
    a = upcycle(dense_dir, tmp_path / "a", spec)
    b = upcycle(dense_dir, tmp_path / "b", spec)
    c = upcycle(dense_dir, tmp_path / "c", MoeSpec(4, 2, noise=0.25, seed=12))
    blob = (a / "model.safetensors").read_bytes()
    assert blob == (b / "model.safetensors").read_bytes(), "same seed, different bytes"
    assert blob != (c / "model.safetensors").read_bytes(), "another seed, same bytes"

    m = load(a)
    assert maxdiff(logits(m), logits(model)) > 1e-3, "noise did not change the function"
    # Drop-Upcycling: the same ceil(r * I) neurons of an expert in gate/up rows, down columns.
    k = math.ceil(0.25 * 128)
    dense_mlp = model.model.layers[1].mlp
    experts = m.model.layers[1].mlp.experts
    picked = set()
    for e in range(4):
        gate, up = experts.gate_up_proj[e].chunk(2, dim=0)  # [I, H] each
        rows_g = (gate != dense_mlp.gate_proj.weight).any(1).nonzero().flatten().tolist()
        rows_u = (up != dense_mlp.up_proj.weight).any(1).nonzero().flatten().tolist()
        cols_d = (experts.down_proj[e] != dense_mlp.down_proj.weight).any(0).nonzero().flatten()
        assert len(rows_g) == k and rows_g == rows_u == cols_d.tolist()
        picked.add(tuple(rows_g))
    assert len(picked) == 4, "experts share their re-initialised neurons"
    mem = moe_in_memory(model, spec)
    for name, t in mem.state_dict().items():
        assert torch.equal(t, m.state_dict()[name]), f"{name} differs in memory vs streamed"


def test_bf16_checkpoint_computes_in_its_own_dtype(tmp_path):
    model = _dense("llama", tmp_path / "dense")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    spec = MoeSpec(4, 2, noise=0.1, seed=2)
    out = upcycle(tmp_path / "bf16", tmp_path / "moe", spec)
    assert {r.dtype for r in read_checkpoint(out).values()} == {"BF16"}
    loaded = load(out)
    mem = moe_in_memory(model, spec)
    assert next(mem.parameters()).dtype == torch.bfloat16
    for name, t in mem.state_dict().items():
        assert torch.equal(t.float(), loaded.state_dict()[name]), f"{name} differs"


def test_streaming_reads_nothing_until_written(dense, tmp_path, monkeypatch):
    _, dense_dir = dense("llama")
    config = json.loads((dense_dir / "config.json").read_text())
    refs = read_checkpoint(dense_dir)
    loads: list[str] = []
    real = moe._load
    monkeypatch.setattr(moe, "_load", lambda r: loads.append(r.name) or real(r))

    plain = moe.moe_tensors(refs, config, MoeSpec(4, 2, router_init="zero"))
    kinds = {t.kind for t in plain}
    assert kinds == {"copy", "zeros"}, "noise 0 + zero router must compute nothing"
    assert all(t.src in refs.values() for t in plain if t.kind == "copy")

    noised = moe.moe_tensors(refs, config, MoeSpec(4, 2, noise=0.5))
    assert loads == [], "a tensor was read while planning"
    computed = [t for t in noised if t.kind == "compute" and "experts" in t.name]
    assert len(computed) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    out = tmp_path / "out"
    out.mkdir()
    write_checkpoint(out, noised, max_shard_bytes=1 << 30)
    assert len(loads) == len(computed), "each noised expert reads exactly one dense tensor"


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(experts=1, top_k=1), "experts must be an integer >= 2"),
        (dict(experts=True, top_k=1), "experts must be an integer >= 2"),
        (dict(experts=4, top_k=5), r"top_k must be in 1\.\.4"),
        (dict(experts=4, top_k=0), r"top_k must be in 1\.\.4"),
        (dict(experts=4, top_k=2, router_init="uniform"), "router_init must be one of"),
        (dict(experts=4, top_k=2, noise=float("nan")), r"noise must be in \[0, 1\)"),
        (dict(experts=4, top_k=2, noise=1.0), r"noise must be in \[0, 1\)"),
        (dict(experts=4, top_k=2, noise=-0.1), r"noise must be in \[0, 1\)"),
        (dict(experts=4, top_k=2, shared_expert_size=0), "shared_expert_size must be"),
        (dict(experts=4, top_k=2, router_aux_loss_coef=float("inf")), "router_aux_loss_coef"),
    ],
)
def test_bad_spec_is_one_line_error(kwargs, match):
    with pytest.raises(TliError, match=match) as e:
        MoeSpec(**kwargs)
    assert "\n" not in str(e.value)


def test_unsupported_family_is_refused(tmp_path):
    from transformers import Phi3Config, Phi3ForCausalLM

    model = Phi3ForCausalLM(Phi3Config(**TINY, pad_token_id=0))
    save_tiny(model, tmp_path / "phi3")
    config = json.loads((tmp_path / "phi3" / "config.json").read_text())
    with pytest.raises(TliError, match="does not support Phi3ForCausalLM; supported: Llama"):
        moe.moe_tensors(read_checkpoint(tmp_path / "phi3"), config, MoeSpec(4, 2))
    for arch in ("Gemma2ForCausalLM", "MixtralForCausalLM"):
        with pytest.raises(TliError, match=f"does not support {arch}"):
            moe_family({"architectures": [arch]})
    assert moe_family({"model_type": "qwen3"}).architecture == "Qwen3MoeForCausalLM"


def test_what_the_sibling_cannot_express_is_refused():
    llama = {"architectures": ["LlamaForCausalLM"], **TINY}
    with pytest.raises(TliError, match="attention_bias=true has no Mixtral sibling"):
        moe_config({**llama, "attention_bias": True}, MoeSpec(4, 2))
    with pytest.raises(TliError, match="shared_expert_size is for Qwen2-MoE"):
        moe_config(llama, MoeSpec(4, 2, shared_expert_size=8))
    qwen3 = {"architectures": ["Qwen3ForCausalLM"], **TINY}
    mixed = {**qwen3, "layer_types": ["full_attention", "sliding_attention"]}
    with pytest.raises(TliError, match="mixes sliding and full attention"):
        moe_config(mixed, MoeSpec(4, 2))
    qwen2 = {"architectures": ["Qwen2ForCausalLM"], **TINY}
    with pytest.raises(TliError, match="exceeds the dense intermediate_size"):
        moe_config(qwen2, MoeSpec(4, 2, shared_expert_size=129))


def test_config_fields():
    qwen2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **TINY,
             "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1}  # fmt: skip
    out = moe_config(qwen2, MoeSpec(8, 2))
    assert out["architectures"] == ["Qwen2MoeForCausalLM"] and out["model_type"] == "qwen2_moe"
    assert (out["num_experts"], out["num_experts_per_tok"], out["moe_intermediate_size"]) == (
        8, 2, 128,
    )  # fmt: skip
    assert out["norm_topk_prob"] is True and out["output_router_logits"] is False
    # Qwen2's own rule (sliding from max_window_layers on), written out: Qwen2-MoE's differs.
    assert out["layer_types"] == ["full_attention", "sliding_attention"]
    llama = {"architectures": ["LlamaForCausalLM"], **TINY, "mlp_bias": False, "head_dim": 16}
    out = moe_config(llama, MoeSpec(4, 1, router_aux_loss_coef=0.02))
    assert out["num_local_experts"] == 4 and out["router_aux_loss_coef"] == 0.02
    assert "mlp_bias" not in out and out["head_dim"] == 16 and out["sliding_window"] is None
