"""The named methods through the inject stage and `tli inject`: MoE upcycling, LLaMA Pro,
placement, and "a flag the chosen method ignores is an error"."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.test_inject import IDS, build, logits
from tli.cli import main
from tli.config import InjectConfig, RunConfig, Runtime, TrainConfig, resolve
from tli.errors import TliError
from tli.inject.memory import inject_in_memory
from tli.inject.plan import make_plan, read_plan
from tli.inject.stage import prepare, run_inject
from tli.modelfolder import ModelFolder, load_causal_lm

QUIET = Runtime(progress=False)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        sys.exit(main(list(argv)))
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def loaded_counts(model, experts: int, top_k: int) -> tuple[int, int]:
    """(total, active) parameters counted on a loaded MoE model's own tensors."""
    total = sum(p.numel() for p in model.parameters())
    per_expert = sum(
        (layer.mlp.experts.gate_up_proj.numel() + layer.mlp.experts.down_proj.numel()) // experts
        for layer in model.model.layers
    )
    return total, total - per_expert * (experts - top_k)


# ---------------------------------------------------------------------------- MoE


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_inject_moe_writes_the_sibling_with_provenance_and_card(family, tmp_path, capsys):
    dense = build(family, tmp_path / "dense")
    out = tmp_path / "moe"
    rc, printed, err = cli(capsys, "inject", "--model", str(dense), "--out", str(out),
                           "--method", "moe", "--experts", "4", "--top-k", "2", "--moe-seed",
                           "3", "--quiet")  # fmt: skip
    assert rc == 0, err
    model = load_causal_lm(out).eval()
    want = {"llama": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM",
            "qwen3": "Qwen3MoeForCausalLM"}[family]  # fmt: skip
    assert type(model).__name__ == want
    with torch.no_grad():
        d = (model(input_ids=IDS).logits - logits(dense, IDS)).abs().max().item()
    assert d <= 1e-5, f"{family}: upcycled logits differ by {d:.3g} from the dense model's"

    prov = json.loads((out / "tli_provenance.json").read_text())
    assert prov["moe"]["architecture"] == want
    assert prov["moe"]["spec"] == {"experts": 4, "top_k": 2, "router_init": "random",
                                   "noise": 0.0, "seed": 3, "shared_expert_size": None,
                                   "router_aux_loss_coef": 0.001}  # fmt: skip
    total, active = loaded_counts(model, 4, 2)
    assert (prov["parameters"]["after"], prov["parameters"]["active"]) == (total, active)
    assert prov["moe"]["total_parameters"] == total
    plan = read_plan(out)
    assert plan is not None and plan.method == "moe" and plan.new_layers == ()
    assert plan.num_layers_out == plan.num_layers_in == 6 and plan.function_preserving
    card = (out / "README.md").read_text()
    assert f"upcycled to {want}" in card and f"{active:,}" in card
    assert "freeze: none" in card
    assert want in printed and f"{active:,}" in printed
    # The sibling opens as a decoder (training, evaluation) ...
    assert ModelFolder.open(out).num_layers == 6
    # ... but injecting layers into it is refused: its MLP has no single residual writer.
    with pytest.raises(TliError, match="is an MoE model"):
        prepare(InjectConfig(interval=2), {"base": out}, QUIET)


def test_moe_dry_run_shows_the_sizes_and_writes_nothing(tmp_path, capsys):
    dense = build("llama", tmp_path / "dense")
    out = tmp_path / "out" / "moe"
    rc, printed, err = cli(capsys, "inject", "--model", str(dense), "--out", str(out),
                           "--method", "moe", "--experts", "8", "--top-k", "1",
                           "--router-init", "zero", "--dry-run")  # fmt: skip
    assert rc == 0, err
    assert "MixtralForCausalLM" in printed and "active per token" in printed
    assert "would write" in printed and "dry run" in printed
    assert not (tmp_path / "out").exists()
    job = prepare(InjectConfig(method="moe", experts=8, top_k=1), {"base": dense}, QUIET)
    assert str(f"{job.parameters['active']:,}") in printed
    assert job.parameters["active"] < job.parameters["after"]


def test_moe_noise_is_recorded_as_not_function_preserving(tmp_path):
    dense = build("llama", tmp_path / "dense")
    cfg = InjectConfig(method="moe", experts=2, top_k=1, expert_noise=0.25, moe_seed=1)
    out = run_inject(dense, tmp_path / "moe", cfg, runtime=QUIET)
    plan = read_plan(out)
    assert plan is not None and not plan.function_preserving
    assert json.loads((out / "tli_plan.json").read_text())["function_preserving"] is False
    with torch.no_grad():
        d = (load_causal_lm(out)(input_ids=IDS).logits - logits(dense, IDS)).abs().max().item()
    assert d > 1e-4, "Drop-Upcycling noise left the function unchanged"


def test_moe_in_memory_through_the_plan_equals_the_streamed_folder(tmp_path):
    dense = build("qwen3", tmp_path / "dense")
    cfg = InjectConfig(method="moe", experts=3, top_k=2, moe_seed=5)
    streamed = load_causal_lm(run_inject(dense, tmp_path / "moe", cfg, runtime=QUIET))
    mem = inject_in_memory(load_causal_lm(dense), make_plan(6, cfg))
    assert type(mem).__name__ == "Qwen3MoeForCausalLM"
    for name, t in mem.state_dict().items():
        assert torch.equal(t, streamed.state_dict()[name]), name


def test_moe_model_trains_everything_not_new_layers(tmp_path):
    """An upcycled model has no new layers: `--freeze original` is refused, `none` trains."""
    from tli.train.inputs import trained_layers
    from tli.train.step import train_in_memory

    dense = build("llama", tmp_path / "dense")
    out = run_inject(dense, tmp_path / "moe",
                     InjectConfig(method="moe", experts=4, top_k=2), runtime=QUIET)  # fmt: skip
    folder = ModelFolder.open(out)
    with pytest.raises(TliError, match="injects no new layers: use --freeze none"):
        trained_layers(folder, "original")
    assert trained_layers(folder, "none") == ()
    model = load_causal_lm(out)
    router0 = model.model.layers[0].mlp.gate.weight.detach().clone()  # [E, H]
    blocks = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=3, seq_len=16, batch_size=2, warmup=0, freeze="none", bf16=False)
    hist = train_in_memory(model, blocks, cfg)
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert not torch.equal(model.model.layers[0].mlp.gate.weight, router0), "router not trained"


# ---------------------------------------------------------------------------- LLaMA Pro


def test_llama_pro_is_the_tli_identity_plan_under_its_own_name(tmp_path, capsys):
    dense = build("llama", tmp_path / "dense")
    rc, _, err = cli(capsys, "inject", "--model", str(dense), "--out", str(tmp_path / "lp"),
                     "--method", "llama-pro", "--interval", "3", "--quiet")  # fmt: skip
    assert rc == 0, err
    plan = read_plan(tmp_path / "lp")
    tli = make_plan(6, InjectConfig(interval=3))
    assert plan is not None and plan.method == "llama-pro"
    assert plan.layers == tli.layers and plan.function_preserving
    assert torch.equal(logits(tmp_path / "lp", IDS), logits(dense, IDS))
    assert "train only the injected layers" in (tmp_path / "lp" / "README.md").read_text()
    # Training it: only the new layers, the freeze policy that makes it LLaMA Pro.
    from tli.train.inputs import trained_layers

    assert trained_layers(ModelFolder.open(tmp_path / "lp"), "original") == plan.new_layers
    with pytest.raises(TliError, match="llama-pro trains only the injected layers"):
        resolve(overrides=["inject.method=llama-pro", "train.freeze=none"])


# ---------------------------------------------------------------------------- placement


@pytest.mark.parametrize(
    ("placement", "count", "after"),
    [
        ("top", None, [3, 4, 5]),
        ("bottom", None, [0, 1, 2]),
        ("middle", 2, [2, 3]),
        ("uniform", None, [1, 3, 5]),
        ("uniform", 2, [2, 5]),
    ],
)
def test_placement_streams_the_same_function_as_in_memory(placement, count, after, tmp_path):
    dense = build("mistral", tmp_path / "dense")
    cfg = InjectConfig(interval=2, placement=placement, new_layers=count)
    out = run_inject(dense, tmp_path / "o", cfg, runtime=QUIET)
    plan = read_plan(out)
    assert plan is not None and plan.params["positions"] == after
    assert plan.params["placement"] == placement and plan.params["new_layers"] == len(after)
    assert [plan.layers[i].source for i in plan.new_layers] == after
    base = logits(dense, IDS)
    assert torch.equal(logits(out, IDS), base), "identity placement changed the function"
    mem = inject_in_memory(load_causal_lm(dense), make_plan(6, cfg))
    assert len(mem.model.layers) == 6 + len(after)
    streamed = load_causal_lm(out).state_dict()
    for name, t in mem.state_dict().items():
        assert torch.equal(t, streamed[name]), name


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("inject", "needle"),
    [
        ({"method": "dus", "interval": 3}, "interval applies to method tli / llama-pro only"),
        ({"method": "stack", "overlap": 2}, "overlap applies to method dus only, not stack"),
        ({"method": "tli", "repeat": 3}, "repeat applies to method stack only, not tli"),
        ({"method": "moe", "experts": 4, "top_k": 1, "placement": "top"}, "placement applies"),
        ({"method": "tli", "top_k": 2}, "top_k applies to method moe only, not tli"),
        ({"method": "llama-pro", "init": "copy"}, "init applies to method tli only"),
        ({"method": "moe", "experts": 4}, "method moe needs experts and top_k"),
        ({"method": "tli", "positions": [1], "new_layers": 2}, "positions lists the new layers"),
    ],
)
def test_fields_the_method_ignores_are_errors(inject, needle, tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(json.dumps({"inject": inject}))
    with pytest.raises(TliError, match=needle) as e:
        resolve(files=[f])
    assert "\n" not in str(e.value) and str(f) in str(e.value)


def test_todays_defaults_still_resolve():
    """The demo's presets and the tli defaults are unchanged by the per-method fields."""
    for preset in ("default", "smoke"):
        cfg = resolve(preset).config
        assert cfg.inject.method == "tli" and cfg.inject.interval == 5
    assert RunConfig().inject == InjectConfig()
    assert make_plan(30, InjectConfig()).new_layers == (5, 11, 17, 23, 29, 35)
