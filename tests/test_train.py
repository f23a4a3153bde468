"""Continued pretraining: the step core, Ray Train on CPU, freeze, resume, two nodes, bad input.

One local Ray (module-scoped) serves the Ray tests; the two-node test brings its own cluster
and runs last. Speed is never asserted here (see benchmarks/bench_train_cpu.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests._ray import local_ray, two_node_cluster
from tli.config import Runtime, TrainConfig
from tli.output import partial_of
from tli.train.stage import run_train
from tli.train.step import StepRunner, batch_rows, flops_per_token, lr_multiplier, train_in_memory

SEQ = 32  # tokens per block in these tests


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ray_local():
    with local_ray("train", num_cpus=2):
        yield


def _cfg(every: int | None = None, **kw) -> TrainConfig:
    base = dict(seq_len=SEQ, batch_size=2, warmup=2, lr=3e-3, steps=4,
                validation={"blocks": 4, "every": every})  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------ pure parts


def test_lr_schedule_warms_up_then_decays_to_min() -> None:
    cfg = TrainConfig(steps=20, warmup=4, min_lr_ratio=0.1)
    m = [lr_multiplier(s, cfg) for s in range(20)]
    assert m[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(m[4:], m[5:], strict=False)), m
    assert m[-1] == pytest.approx(0.1)


def test_batch_rows_are_deterministic_disjoint_and_cover_an_epoch() -> None:
    a = [batch_rows(p, 40, 8, seed=3) for p in range(5)]  # one epoch: 5 global batches
    b = [batch_rows(p, 40, 8, seed=3) for p in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert sorted(torch.cat(a).tolist()) == list(range(40))
    assert not torch.equal(batch_rows(5, 40, 8, seed=3), a[0])  # next epoch reshuffles
    assert not torch.equal(batch_rows(0, 40, 8, seed=4), a[0])  # another seed, another order


def test_flops_per_token_is_6n_plus_attention_and_less_when_frozen(tiny_injected_dir) -> None:
    from tli.inject.plan import read_plan
    from tli.modelfolder import load_causal_lm
    from tli.train.step import apply_freeze

    model = load_causal_lm(tiny_injected_dir)
    c = model.config
    n_layers = sum(p.numel() for p in model.model.layers.parameters())
    n = n_layers + model.lm_head.weight.numel()
    full = 6 * n + 12 * c.num_hidden_layers * c.hidden_size * SEQ
    assert flops_per_token(model, SEQ) == pytest.approx(full)
    new = read_plan(tiny_injected_dir).new_layers
    trainable, total = apply_freeze(model, "original", new)
    assert 0 < trainable < total
    assert flops_per_token(model, SEQ) < 0.8 * full


def test_loss_falls_over_30_steps_on_a_repetitive_corpus(tiny_model_dir, corpus) -> None:
    from tli.data.blocks import load_blocks
    from tli.modelfolder import load_causal_lm

    blocks = load_blocks(corpus, tiny_model_dir, SEQ, "train")
    model = load_causal_lm(tiny_model_dir)
    cfg = _cfg(steps=30, lr=1e-2, warmup=3, freeze="none", batch_size=4, every=10)
    hist = train_in_memory(model, blocks, cfg, val_blocks=blocks[:4])
    first = sum(m["loss"] for m in hist[:3]) / 3
    last = sum(m["loss"] for m in hist[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    assert [m["step"] for m in hist] == list(range(1, 31))
    assert [m["step"] for m in hist if "val_loss" in m] == [10, 20, 30]
    assert hist[-1]["tokens"] == 30 * 4 * SEQ


def test_optimizer_state_round_trips_through_safetensors(tiny_model_dir, corpus) -> None:
    from tli.data.blocks import load_blocks
    from tli.modelfolder import load_causal_lm

    blocks = load_blocks(corpus, tiny_model_dir, SEQ, "train")
    cfg = _cfg(steps=4, freeze="none")
    r1 = StepRunner(load_causal_lm(tiny_model_dir), blocks, cfg)
    r1.train_step()
    tensors, meta = r1.optimizer_state()
    assert tensors and all(k.startswith("state/") for k in tensors)
    json.dumps(meta)  # JSON-able
    r2 = StepRunner(load_causal_lm(tiny_model_dir), blocks, cfg)
    r2.raw.load_state_dict(r1.raw.state_dict())
    r2.load_optimizer_state(tensors, meta)
    r2.load_trainer_state(json.loads(json.dumps(r1.trainer_state())))
    assert r2.step == 1 and r2.optimizer.param_groups[0]["lr"] == r1.optimizer.param_groups[0]["lr"]
    a, b = r1.train_step(), r2.train_step()
    assert a["loss"] == b["loss"] and a["lr"] == b["lr"]
    for (n1, p1), (_, p2) in zip(r1.raw.named_parameters(), r2.raw.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1


# ------------------------------------------------------------------------------ bad input


def _cli(*argv: str) -> int:
    from tli.cli import main

    return main(["train", *argv])


def _one_line_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and needle in err, err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--steps", "0"], "steps"),
        (["--seq-len", "4096"], "longer than the model's context"),
        (["--workers", "64"], "more than this machine's"),
        (["--batch-size", "100000"], "fewer than one global batch"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_ray_starts(
    tiny_injected_dir, corpus, tmp_path, capsys, extra, needle
) -> None:
    import ray

    out = tmp_path / "out"
    rc = _cli("--model", str(tiny_injected_dir), "--out", str(out), "--data", str(corpus),
              "--seq-len", str(SEQ), *extra)  # fmt: skip
    assert rc == 2
    _one_line_error(capsys, needle)
    assert not ray.is_initialized()
    assert not out.exists() and not partial_of(out).exists()


def test_freeze_original_without_plan_is_a_clear_error(tiny_model_dir, corpus, tmp_path, capsys):
    rc = _cli("--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--data", str(corpus),
              "--freeze", "original")  # fmt: skip
    assert rc == 2
    _one_line_error(capsys, "no tli_plan.json")


def test_existing_output_and_interrupted_run_are_refused(tiny_injected_dir, corpus, tmp_path,
                                                         capsys):  # fmt: skip
    args = ["--model", str(tiny_injected_dir), "--data", str(corpus), "--seq-len", str(SEQ)]
    (tmp_path / "done").mkdir()
    assert _cli(*args, "--out", str(tmp_path / "done")) == 2
    _one_line_error(capsys, "exists")
    (tmp_path / ".run.partial" / "ray" / "step_000002").mkdir(parents=True)
    (tmp_path / ".run.partial" / "ray" / "step_000002" / "trainer_state.json").write_text("{}")
    assert _cli(*args, "--out", str(tmp_path / "run")) == 2
    _one_line_error(capsys, "--resume")
    assert _cli(*args, "--out", str(tmp_path / "x"), "--data", str(tmp_path / "nope.txt")) == 2
    _one_line_error(capsys, "does not exist")


# ------------------------------------------------------------------------------ Ray Train


def test_two_workers_train_only_the_injected_layers(ray_local, tiny_injected_dir, corpus,
                                                    tmp_path):  # fmt: skip
    from transformers import AutoModelForCausalLM

    from tli.inject.plan import read_plan

    cfg = _cfg(workers=2, steps=4, freeze="original", every=2, checkpoint_every=2)
    out = run_train(tiny_injected_dir, tmp_path / "out", corpus, cfg,
                    runtime=Runtime(threads=1, report_every=1))  # fmt: skip
    model_out = out / "model"
    # An HF folder that loads, with tokenizer, plan and provenance carried along.
    AutoModelForCausalLM.from_pretrained(model_out)
    for f in ("tokenizer.json", "tli_plan.json", "tli_provenance.json", "tli_train.json"):
        assert (model_out / f).is_file(), f
    assert not partial_of(out).exists() and not (out / "ray").exists()
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for key in ("loss", "lr", "tokens", "tokens_per_s", "elapsed", "grad_norm"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    assert metrics[-1]["tokens"] == 4 * 2 * 2 * SEQ  # steps x workers x batch x seq
    assert [m["step"] for m in metrics if m.get("val_loss") is not None] == [2, 4]
    prov = json.loads((out / "tli_train.json").read_text())
    assert [w["rank"] for w in prov["workers"]] == [0, 1]
    assert [w["niceness"] for w in prov["workers"]] == [0, 0]  # Ray's default would be 15
    for w in prov["workers"]:  # the memory marks: the process alone <= through loading <= run
        assert 0 < w["rss_before_model_bytes"] <= w["peak_rss_load_bytes"] <= w["peak_rss_bytes"]
    # Freeze: every original tensor is bitwise unchanged; every injected layer moved.
    new = read_plan(tiny_injected_dir).new_layers
    before, after = _weights(tiny_injected_dir), _weights(model_out)
    assert before.keys() == after.keys()
    for name, t in before.items():
        parts = name.split(".")
        is_new = parts[:2] == ["model", "layers"] and int(parts[2]) in new
        if is_new and not name.endswith("norm.weight"):
            assert not torch.equal(t, after[name]), f"{name} did not train"
        elif not is_new:
            assert torch.equal(t, after[name]), f"{name} changed under --freeze original"


def test_interrupted_and_resumed_run_ends_with_the_same_weights(
    ray_local, tiny_injected_dir, corpus, tmp_path, drill
) -> None:
    """Crash at step 3 (no retries), --resume, then a worker failure at step 5 that Ray Train
    recovers from by itself: the result equals an uninterrupted run in the plain loop."""
    from ray.train import TrainingFailedError

    from tli.data.blocks import load_blocks
    from tli.modelfolder import load_causal_lm

    cfg = _cfg(workers=1, steps=6, freeze="none", checkpoint_every=2, every=3)
    # The uninterrupted reference: the plain in-process loop, same threads as the worker.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = load_causal_lm(tiny_injected_dir)
        blocks = load_blocks(corpus, tiny_injected_dir, SEQ, "train")
        ref_hist = train_in_memory(
            ref,
            blocks,
            cfg.model_copy(
                update={"validation": cfg.validation.model_copy(update={"every": None})}
            ),
        )
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "out"
    drill("train.step=3:raise-once")
    with pytest.raises(TrainingFailedError):
        run_train(tiny_injected_dir, out, corpus, cfg,
                  runtime=Runtime(threads=1, report_every=1, max_failures=0))  # fmt: skip
    partial = partial_of(out)
    assert not out.exists() and (partial / "ray" / "step_000002").is_dir()
    drill("train.step=5:raise-once")  # a worker failure Ray Train recovers from by itself
    run_train(tiny_injected_dir, out, corpus, cfg, resume=True,
              runtime=Runtime(threads=1, report_every=1, max_failures=1))  # fmt: skip
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in metrics] == [m["loss"] for m in ref_hist]
    got = _weights(out / "model")
    for name, t in ref.state_dict().items():
        if name in got:
            assert torch.equal(t, got[name]), f"{name} differs from the uninterrupted run"


def test_two_node_cluster_places_a_worker_on_each_node_fsdp(tiny_injected_dir, corpus, tmp_path):
    """Two raylets, one CPU each: a worker lands on each and FSDP2 trains across them."""
    from tli.inject.plan import read_plan

    with two_node_cluster("train", cpus_per_node=1):
        import ray

        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = _cfg(workers=2, steps=3, freeze="original", fsdp=True)
        out = run_train(tiny_injected_dir, tmp_path / "out", corpus, cfg,
                        runtime=Runtime(cpus_per_worker=1, threads=1))  # fmt: skip
    prov = json.loads((out / "tli_train.json").read_text())
    assert len({w["node_id"] for w in prov["workers"]}) == 2, prov["workers"]
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    # FSDP gathers the full state for the output: originals unchanged, injected layers trained.
    new = read_plan(tiny_injected_dir).new_layers
    before, after = _weights(tiny_injected_dir), _weights(out / "model")
    for name, t in before.items():
        is_new = name.startswith("model.layers.") and int(name.split(".")[2]) in new
        if not is_new:
            assert torch.equal(t, after[name]), name
        elif name.endswith("proj.weight"):
            assert not torch.equal(t, after[name]), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_step_in_bf16_reports_mfu(tiny_injected_dir, corpus) -> None:
    from tli.data.blocks import load_blocks
    from tli.inject.plan import read_plan
    from tli.modelfolder import load_causal_lm

    blocks = load_blocks(corpus, tiny_injected_dir, SEQ, "train")
    cfg = _cfg(steps=3, gpu=True, freeze="original")
    hist = train_in_memory(load_causal_lm(tiny_injected_dir), blocks, cfg, device="cuda",
                           new_layers=read_plan(tiny_injected_dir).new_layers,
                           peak_flops=100e12)  # fmt: skip
    assert all(math.isfinite(m["loss"]) and m["mfu"] > 0 for m in hist)


@pytest.mark.slow
def test_fsdp_two_workers_resume_equals_uninterrupted(ray_local, tiny_injected_dir, corpus,
                                                      tmp_path, drill):  # fmt: skip
    """FSDP2 optimizer state and RNG restore per worker: interrupted + resumed == straight."""
    from ray.train import TrainingFailedError

    cfg = _cfg(workers=2, steps=4, fsdp=True, freeze="none", checkpoint_every=2)
    rt = Runtime(threads=1, report_every=1, cpus_per_worker=1)
    straight = run_train(tiny_injected_dir, tmp_path / "a", corpus, cfg, runtime=rt)
    drill("train.step=3:raise-once")
    with pytest.raises(TrainingFailedError):
        run_train(tiny_injected_dir, tmp_path / "b", corpus, cfg,
                  runtime=rt.model_copy(update={"max_failures": 0}))  # fmt: skip
    resumed = run_train(tiny_injected_dir, tmp_path / "b", corpus, cfg, resume=True, runtime=rt)
    assert [m["loss"] for m in _metrics(straight)] == [m["loss"] for m in _metrics(resumed)]
    a, b = _weights(straight / "model"), _weights(resumed / "model")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
