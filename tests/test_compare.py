"""`tli compare`: experiment files, matching, the report's numbers and verdicts, and a real tiny
comparison end to end (every stage through the store, Ray Train, lm-eval), cached on rerun."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tli.cli import main
from tli.compare.analysis import claims, mean_curve, steps_to_reach
from tli.compare.cost import training_cost
from tli.compare.recipes import match_methods
from tli.compare.spec import load_experiment
from tli.errors import TliError
from tli.modelfolder import ModelFolder

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
VERDICTS = {"holds", "does not hold", "not measurable here"}


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        sys.exit(main(list(argv)))
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


# ---------------------------------------------------------------------------- experiment files


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_files_validate(path: Path) -> None:
    exp = load_experiment(path)
    assert exp.name == path.stem
    assert exp.reference in [m.name for m in exp.entries]
    if exp.name != "tiny":
        assert len(exp.seeds) >= 3 and {m.recipe_name for m in exp.entries} == {
            "tli", "llama-pro", "dus", "moe", "stack"}  # fmt: skip


def test_smollm2_experiment_matches_the_methods_as_stated(base_dir: Path) -> None:
    exp = load_experiment(ROOT / "experiments" / "smollm2.yaml")
    by = {m.name: m for m in match_methods(exp, ModelFolder.open(base_dir))}
    assert {n: m.layers for n, m in by.items()} == {
        "tli": 36, "llama-pro": 36, "dus": 36, "moe": 30, "stack": 60}  # fmt: skip
    # Equal added parameters: TLI, LLaMA Pro and DUS add the same six layers.
    assert by["tli"].parameters == by["llama-pro"].parameters == by["dus"].parameters
    assert by["dus"].inject.overlap == 12
    # MoE: top-1 is the nearest to TLI's active parameters (top-2 would overshoot).
    assert (by["moe"].inject.experts, by["moe"].inject.top_k) == (4, 1)
    assert by["moe"].active < by["tli"].parameters < by["moe"].parameters
    assert "top-2: 214,210,368" in by["moe"].note
    assert {n: m.train.freeze for n, m in by.items()} == {
        "tli": "none", "llama-pro": "original", "dus": "none", "moe": "none", "stack": "none"}  # fmt: skip
    # Equal training tokens: one budget, and only the seed differs between a method's runs.
    assert len({(m.train.steps, m.train.seq_len, m.train.batch_size) for m in by.values()}) == 1
    assert by["tli"].train_for(2).seed == 2 and by["tli"].train.lr == exp.train.lr


def _llama_1b_shaped(out: Path) -> Path:
    """A Llama-3.2-1B-shaped checkpoint of zeros: holes on disk, headers all the matching reads."""
    from tli.inject.stio import OutTensor, write_checkpoint

    h, i, v, q, kv = 2048, 8192, 128256, 32 * 64, 8 * 64
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for n in range(16):
        p = f"model.layers.{n}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i)}  # fmt: skip
    out.mkdir()
    write_checkpoint(out, [OutTensor(k, "BF16", s, math.prod(s) * 2, "zeros")
                           for k, s in shapes.items()], max_shard_bytes=5 << 30)  # fmt: skip
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
           "intermediate_size": i, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, "vocab_size": v,
           "tie_word_embeddings": True, "max_position_embeddings": 131072}  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_gpu_experiment_matches_a_llama_3_2_1b_shaped_base(tmp_path: Path) -> None:
    exp = load_experiment(ROOT / "experiments" / "llama-3.2-1b.yaml")
    assert exp.train.gpu and exp.train.bf16
    base = ModelFolder.open(_llama_1b_shaped(tmp_path / "l1b"))
    by = {m.name: m for m in match_methods(exp, base)}
    assert {n: m.layers for n, m in by.items()} == {
        "tli": 20, "llama-pro": 20, "dus": 20, "moe": 16, "stack": 32}  # fmt: skip
    assert by["tli"].parameters == 1_479_100_416 and by["stack"].parameters == 2_208_958_464
    assert (by["moe"].inject.top_k, by["moe"].parameters, by["moe"].active) == (
        1, 3_651_864_576, 1_235_945_472)  # fmt: skip


@pytest.mark.parametrize(
    ("yaml", "needle"),
    [
        ("name: x\nmethods: [tli, tli]\n", "method tli is listed twice"),
        ("name: x\nmethods: [tli]\n", "reference dus is not among the methods"),
        ("name: x\nmethods: [tli, dus]\ntrain: {seed: 3}\n", "train.seed is set per run"),
        ("name: x\nmethods: [tli, dus]\ntrain: {freeze: none}\n", "train.freeze is each recipe"),
        (
            "name: x\nmethods: [dus, {name: t, recipe: tli, train: {steps: 9}}]\n",
            "train.steps is shared by every method",
        ),
        ("name: x\nmethods: [dus, {name: mine}]\n", "method mine: give recipe"),
        ("name: x\nmethods: [dus]\nseeds: [1, 1]\n", "seeds repeat"),
        ("name: x\nmethods: [dus]\nbogus: 1\n", "bogus: unknown key"),
        ("name: Bad Name\nmethods: [dus]\n", "name: String should match pattern"),
        (
            "name: x\nmatch: {interval: 2}\n"
            "methods: [dus, {name: lp, recipe: llama-pro, train: {freeze: none}}]\n",
            "method lp: inject.method llama-pro trains only the injected layers",
        ),
        (
            "name: x\nmatch: {interval: 2}\n"
            "methods: [dus, {name: t, recipe: tli, inject: {overlap: 2}}]\n",
            "method t: inject: overlap applies to method dus only",
        ),
    ],
)
def test_bad_experiments_are_one_line_exit_2(yaml, needle, tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "exp.yaml"
    f.write_text(yaml)
    store = tmp_path / "store"
    rc, _, err = cli(capsys, "compare", "--config", str(f), "--store", str(store),
                     "--results", str(tmp_path / "res"), f"base.model={tiny_model_dir}")  # fmt: skip
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err
    assert not store.exists() and not (tmp_path / "res").exists()


# ---------------------------------------------------------------------------- pure parts


def test_cost_counts_trained_parameters_and_skipped_experts(tiny_injected_dir: Path) -> None:
    from tli.inject.moe import MoeSpec, moe_config, moe_param_counts
    from tli.inject.plan import read_plan

    cfg = json.loads((tiny_injected_dir / "config.json").read_text())
    plan = read_plan(tiny_injected_dir)
    assert plan is not None
    full = training_cost(cfg, "none", plan.new_layers, 64)
    new = training_cost(cfg, "original", plan.new_layers, 64)
    per_layer = (full.parameters - 49152 * 64 - 64) // 6  # tied embedding + final norm
    assert new.trainable == 2 * per_layer and full.trainable == full.parameters
    assert new.flops_per_token < full.flops_per_token
    dense = json.loads((tiny_injected_dir / "config.json").read_text())
    moe = moe_config(dense, MoeSpec(4, 1))
    c = training_cost(moe, "none", None, 64)
    assert (c.parameters, c.active) == tuple(moe_param_counts(dense, MoeSpec(4, 1)))
    # One expert of four per token: the FLOPs of a dense model of the same shape plus routers.
    assert c.flops_per_token == pytest.approx(full.flops_per_token, rel=0.01)


def _m(name, recipe, init, final_curve, acc, fp=True, acc_init=None):
    curve = [{"step": s, "mean": v, "min": v, "max": v} for s, v in final_curve]
    return {"name": name, "recipe": recipe, "function_preserving": fp,
            "init": {"heldout": init, "acc": acc_init or {}}, "curve": curve,
            "final_acc": acc, "steps_to_reference": None}  # fmt: skip


def _summary(methods, base_loss=3.0, base_acc=None):
    exp = {"train": {"validation": {"every": 5}}, "seeds": [0, 1, 2]}
    return {"experiment": exp, "reference": {"name": "dus"}, "methods": methods,
            "base": {"heldout": base_loss, "acc": base_acc or {}}}  # fmt: skip


def test_claims_hold_fail_or_are_not_measurable_from_the_numbers() -> None:
    acc = lambda a, se=0.01: {"t": {"acc": a, "se": se, "items": 1000}}  # noqa: E731
    s = _summary([
        _m("tli", "tli", 3.0, [(5, 2.9), (10, 2.7), (15, 2.6)], acc(0.60), acc_init=acc(0.5)),
        _m("dus", "dus", 4.2, [(5, 3.5), (10, 3.0), (15, 2.75)], acc(0.50), fp=False),
        _m("moe", "moe", 3.001, [(5, 2.9), (10, 2.8), (15, 2.7)], acc(0.59)),
    ], base_acc=acc(0.5))  # fmt: skip
    c = {x["claim"].split(":")[0]: x for x in claims(s)}
    assert c["Better initialisation than DUS"]["verdict"] == "holds"
    moe = c["Better initialisation than MoE upcycling"]
    assert moe["verdict"] == "does not hold" and "both start from the base's function" in (
        moe["caveat"])  # fmt: skip
    steps = c["Fewer training steps"]
    assert steps["verdict"] == "holds" and "TLI 10, DUS 15" in steps["figure"]
    # vs DUS +0.10 (significant), vs MoE +0.01 (inside +-0.028): not decided by these items.
    accv = c["Higher benchmark accuracy after training (than DUS and MoE upcycling)"]
    assert accv["verdict"] == "not measurable here", accv
    assert c["Useful without training"]["verdict"] == "holds"
    # A TLI that starts worse than the base, never reaches DUS, and loses on accuracy.
    s = _summary([
        _m("tli", "tli", 3.5, [(5, 3.4), (10, 3.3)], acc(0.40), fp=False, acc_init=acc(0.3)),
        _m("dus", "dus", 3.2, [(5, 3.1), (10, 3.0)], acc(0.55), fp=False),
    ], base_acc=acc(0.5))  # fmt: skip
    c = {x["claim"].split(":")[0]: x for x in claims(s)}
    assert c["Better initialisation than DUS"]["verdict"] == "does not hold"
    assert c["Better initialisation than MoE upcycling"]["verdict"] == "not measurable here"
    assert "not reached" in c["Fewer training steps"]["figure"]
    assert c["Fewer training steps"]["verdict"] == "does not hold"
    assert c["Higher benchmark accuracy after training (than DUS)"]["verdict"] == "does not hold"
    assert c["Useful without training"]["verdict"] == "does not hold"
    assert all(x["verdict"] in VERDICTS for x in claims(s))


def test_curves_mean_over_seeds_and_steps_to_reach() -> None:
    curve = mean_curve([[(5, 3.0), (10, 2.0)], [(5, 4.0), (10, 2.4)], [(5, 3.5), (10, 2.2)]])
    assert curve == [{"step": 5, "mean": 3.5, "min": 3.0, "max": 4.0},
                     {"step": 10, "mean": pytest.approx(2.2), "min": 2.0, "max": 2.4}]  # fmt: skip
    assert steps_to_reach(curve, 3.5) == 5 and steps_to_reach(curve, 2.2) == 10
    assert steps_to_reach(curve, 2.0) is None and steps_to_reach(curve, None) is None


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def compared(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny experiment run twice through `tli compare`: TLI alone, then TLI and DUS."""
    import io
    from contextlib import redirect_stdout

    work = tmp_path_factory.mktemp("compare")
    store, results = work / "store", work / "results"
    args = ["compare", "--config", str(ROOT / "experiments" / "tiny.yaml"), "--store",
            str(store), f"base.model={tiny_model_dir}", "--no-progress"]  # fmt: skip
    logs = []
    for extra in (["--methods", "tli", "--no-results"], ["--results", str(results)]):
        buf = io.StringIO()
        with redirect_stdout(buf):
            rc = main(args + extra)
        logs.append(buf.getvalue())
        assert rc == 0, logs[-1][-3000:]
    return {"store": store, "results": results, "logs": logs, "args": args}


def _statuses(log: str) -> dict[str, str]:
    """'what stage' -> cached/running, from the compare driver's lines."""
    import re

    rx = re.compile(r"compare: (.+?): (cached|running) ([a-z-]+)[/ ]")
    return {f"{m[1]} {m[3]}": m[2] for line in log.splitlines() if (m := rx.match(line))}


def test_tiny_compare_runs_every_stage_and_writes_the_report(compared) -> None:
    first, second = (_statuses(x) for x in compared["logs"])
    assert first["tli seed 0 train"] == "running" and first["base import-base"] == "running"
    # Adding DUS later reruns nothing of TLI's: the store has every one of its versions.
    assert {k: v for k, v in second.items() if k.startswith(("tli", "base", "data"))} == {
        k: "cached" for k in first}  # fmt: skip
    assert second["dus seed 0 train"] == "running" and second["dus inject"] == "running"

    res = compared["results"]
    s = json.loads((res / "summary.json").read_text())
    by = {m["name"]: m for m in s["methods"]}
    assert list(by) == ["tli", "dus"] and by["tli"]["layers"] == by["dus"]["layers"] == 6
    # TLI identity is function-preserving: its step-0 loss is the base's, exactly.
    assert by["tli"]["init"]["heldout"] == s["base"]["heldout"]
    assert by["dus"]["init"]["heldout"] != s["base"]["heldout"]
    for m in by.values():
        assert m["tokens"] == 4 * 32 * 2, "every method trains on the same tokens"
        assert [p["step"] for p in m["curve"]] == [2, 4]
        assert m["final_heldout"]["n"] == 1 and math.isfinite(m["final_heldout"]["mean"])
        assert m["final_acc"]["arc_easy"]["items"] == 4
        assert m["train_flops"] == pytest.approx(m["cost"]["flops_per_token"] * 256)
    assert by["tli"]["cost"]["trainable"] == by["tli"]["cost"]["parameters"]  # freeze none
    assert s["reference"]["final_val_loss"] == by["dus"]["curve"][-1]["mean"]
    assert [c["verdict"] in VERDICTS for c in s["claims"]] == [True] * 5
    md = (res / "report.md").read_text()
    for heading in ("## Methods and how they are matched", "## Cost", "## Held-out loss",
                    "## Validation loss during training", "## 0-shot accuracy",
                    "## The abstract's claims, checked"):  # fmt: skip
        assert heading in md
    assert "overlap M=1: 4 -> 6 layers, the same as TLI" in md
    assert all((res / p).stat().st_size > 5000 for p in ("curves.png", "loss.png", "accuracy.png"))
    page = (res / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page
    readme = (res / "README.md").read_text()
    assert "tli compare --config" in readme and "experiments/tiny.yaml" in readme
    assert (res / "experiment.yaml").read_text() == (ROOT / "experiments/tiny.yaml").read_text()
    # The same report sits in the store as a version whose inputs are every run.
    version = readme.split("store version `compare/")[1].split("`")[0]
    manifest = json.loads((compared["store"] / "compare" / version / "manifest.json").read_text())
    assert {"tli/s0/train", "dus/s0/eval_final", "eval_base", "dus/method"} <= set(
        manifest["inputs"])  # fmt: skip
    assert (compared["store"] / "compare" / version / "output" / "report.md").read_text() == md


def test_rerun_is_cached_and_results_are_not_overwritten(compared, capsys) -> None:
    args = compared["args"]
    rc, out, err = cli(capsys, *args, "--no-results")
    assert rc == 0, err
    statuses = _statuses(out)
    assert statuses and set(statuses.values()) == {"cached"}
    assert "compare: cached" in out or "13 stages cached, 0 ran" in out
    rc, _, err = cli(capsys, *args, "--results", str(compared["results"]))
    assert rc == 2 and "--force" in err and len(err.strip().splitlines()) == 1


def test_dry_run_prints_the_matching_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    rc, out, err = cli(capsys, "compare", "--config", str(ROOT / "experiments/tiny.yaml"),
                       "--store", str(tmp_path / "s"), f"base.model={tiny_model_dir}",
                       "--dry-run", "train.steps=2")  # fmt: skip
    assert rc == 0, err
    assert "2 methods x 1 seeds" in out and "overlap M=1" in out and "128 training tokens" in out
    assert not (tmp_path / "s").exists() and not any(tmp_path.iterdir())


def test_placement_variants_are_methods_of_their_own(tiny_model_dir: Path) -> None:
    from tli.compare.spec import Experiment

    exp = Experiment(name="x", match={"interval": 2}, methods=[
        "tli", {"name": "tli-top", "recipe": "tli", "inject": {"placement": "top"}},
        {"name": "lp-bottom", "recipe": "llama-pro", "inject": {"placement": "bottom"}}, "dus",
    ])  # fmt: skip
    by = {m.name: m for m in match_methods(exp, ModelFolder.open(tiny_model_dir))}
    assert by["tli-top"].inject.placement == "top" and by["tli-top"].layers == 6
    assert by["tli-top"].parameters == by["tli"].parameters == by["dus"].parameters
    assert by["tli-top"].note.endswith("; placement=top") and by["tli-top"].train.freeze == "none"
    assert by["lp-bottom"].train.freeze == "original"


def test_matching_refuses_what_the_base_cannot_take(tiny_model_dir: Path) -> None:
    from tli.compare.spec import Experiment

    exp = Experiment(name="x", methods=["tli", "dus"], match={"interval": 9})
    with pytest.raises(TliError, match="match.interval 9 is outside 1..4"):
        match_methods(exp, ModelFolder.open(tiny_model_dir))


# ---------------------------------------------------------------------------- the KFP pipeline

GOLDEN = ROOT / "pipelines" / "compare_pipeline.yaml"


def test_compiled_compare_pipeline_matches_golden(base_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "compare.yaml"
    rc, _, err = cli(capsys, "compare", "--config", str(ROOT / "experiments" / "smollm2.yaml"),
                     "--compile", str(out))  # fmt: skip
    assert rc == 0, err
    assert out.read_text() == GOLDEN.read_text(), (
        "the compiled compare pipeline changed: if that is deliberate, run `tli compare --config "
        "experiments/smollm2.yaml --compile pipelines/compare_pipeline.yaml` and commit it"
    )
    import yaml

    spec, platform = yaml.safe_load_all(GOLDEN.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    names = {t["taskInfo"]["name"] for t in tasks.values()}
    # One branch per method and seed, side by side; one inject per method feeds its seeds.
    for m in ("tli", "llama-pro", "dus", "moe", "stack"):
        assert {f"inject {m}", f"eval {m} step 0", f"method {m}"} <= names
        assert {f"train {m} seed {s}" for s in (0, 1, 2)} <= names
    assert len(tasks) == 3 + 5 * 3 + 5 * 3 * 2 + 1
    report = next(t for t in tasks.values() if t["taskInfo"]["name"] == "report")
    assert len(report["dependentTasks"]) == 1 + 5 + 15  # every evaluation
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert all(e["pvcMount"][0]["mountPath"] == "/mnt/tli" for e in k8s.values())


@pytest.mark.slow  # ~2.5 min here: one KFP task subprocess per step, all of them cached
def test_the_pipeline_finds_the_same_versions_as_tli_compare(compared, tiny_model_dir) -> None:
    """The KFP pipeline (local runner) on the store `tli compare` filled: every step is cached,
    so its versions are the driver's, and the report is the same version (run it on a tree
    nobody edits meanwhile: a version hashes the code)."""
    from pipelines.compare_pipeline import run_compare_local
    from tli.compare.run import match_base
    from tli.config import Runtime

    exp = load_experiment(ROOT / "experiments" / "tiny.yaml", [f"base.model={tiny_model_dir}"])
    store = compared["store"]
    before = {p.parent.name for p in store.glob("*/*/manifest.json")}
    report = run_compare_local(exp, match_base(exp), store=store, ray_jobs=None, rerun=[],
                               runtime=Runtime(progress=False))  # fmt: skip
    assert report.status == "cached"
    assert {p.parent.name for p in store.glob("*/*/manifest.json")} == before, "a new version"
    readme = (compared["results"] / "README.md").read_text()
    assert f"store version `compare/{report.version}`" in readme
