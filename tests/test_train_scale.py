"""Training past one worker's memory: streamed data, FSDP sharded loading, sharded checkpoints.

What is checked, on real parts (Ray Data on a local Ray, Ray Train with gloo workers, real
tokenizer, real safetensors files):

- The streamed path writes the very token cache, the very blocks and the very batches (for a
  seed, any step, any worker) as the in-memory path.
- A trial's model built from the base folder row by row equals the in-memory injection.
- A sharded checkpoint holds safetensors and JSON only, loads without any unpickling, and
  continues training exactly.
- Ray Train, 2 workers, FSDP: sharded loading + streamed data give the same loss curve and
  weights as today's full loading with in-memory data, bitwise; a run interrupted at 2 workers
  resumes on 2 and on 1 to the weights of an uninterrupted run (slow).

Speed and memory are never asserted (benchmarks/bench_train_scale.py measures them).
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import _s3
from tests._ray import local_ray
from tli.config import DataConfig, InjectConfig, Runtime, TrainConfig
from tli.data import shards, stream
from tli.errors import TliError
from tli.output import partial_of
from tli.train.step import DataOrder, MemoryBatches, batch_rows

SEQ = 32
s3_server, s3_env = _s3.s3_server, _s3.s3_env  # fixtures


@pytest.fixture(scope="module")
def corpus_folder(corpus, tiny_injected_dir, tmp_path_factory) -> Path:
    """The conftest corpus built as ``tli data build`` builds one (train/validation/heldout)."""
    from tli.data.stage import run_data_build

    out = tmp_path_factory.mktemp("scale") / "corpus"
    return run_data_build(DataConfig(sources=[], extra=[str(corpus)]), out, tiny_injected_dir)


@pytest.fixture
def ray_data():
    """A local Ray for one test: started after the test's own environment (an S3 server's
    AWS_* variables) is set, so that its worker processes, Ray Data's read tasks, have it."""
    with local_ray("scale", num_cpus=2):
        yield


def _fresh_cache(monkeypatch, path: Path) -> None:
    monkeypatch.setenv("TLI_CACHE", str(path))


def _in_memory_stream(data, tokenizer_dir, split: str) -> torch.Tensor:
    from tli.data.blocks import load_token_stream

    return load_token_stream(data, tokenizer_dir, split)  # int32 [n]


# ------------------------------------------------------------------------------ the stream


def test_train_feed_stream_bad_input_is_one_line_exit_2(tiny_injected_dir, tmp_path, capsys):
    """First in the module: no test has started its Ray yet."""
    import ray

    from tli.cli import main

    out = tmp_path / "out"
    rc = main(["train", "--model", str(tiny_injected_dir), "--out", str(out), "--data",
               str(tmp_path / "missing"), "--feed", "stream", "--seq-len", str(SEQ)])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err, err
    assert not ray.is_initialized() and not out.exists() and not partial_of(out).exists()


def test_streamed_tokenisation_equals_the_in_memory_path(
    corpus_folder, corpus, tiny_injected_dir, tmp_path, monkeypatch
) -> None:
    """Parts of 2 KiB cut the jsonl mid-record: every document still appears once, in order."""
    monkeypatch.setattr(shards, "PART_BYTES", 2048)
    for data in (corpus_folder, corpus):
        for split in ("train", "validation", "heldout"):
            _fresh_cache(monkeypatch, tmp_path / f"mem-{data.name}-{split}")
            want = _in_memory_stream(data, tiny_injected_dir, split)
            _fresh_cache(monkeypatch, tmp_path / f"stream-{data.name}-{split}")
            files = stream.split_files(data, split)
            assert len(stream.parts_of(files)) > 1 or split != "train"
            index = stream.token_index(data, tiny_injected_dir, split)
            got = torch.from_numpy(index.read(0, index.n_tokens))
            assert torch.equal(got, want), (data.name, split)
    # The corpus folder's cache entry is the in-memory path's own: it reads the streamed one.
    from tli.data.blocks import load_blocks

    blocks = load_blocks(corpus_folder, tiny_injected_dir, SEQ, "train")  # [n, T]
    index = stream.token_index(corpus_folder, tiny_injected_dir, "train")
    assert index.n_blocks(SEQ) == blocks.shape[0]
    rows = list(range(blocks.shape[0]))
    assert torch.equal(torch.from_numpy(index.blocks(rows, SEQ)).long(), blocks)


def test_ray_data_pipeline_writes_the_same_cache(
    ray_data, corpus_folder, tiny_injected_dir, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(shards, "PART_BYTES", 4096)
    _fresh_cache(monkeypatch, tmp_path / "local")
    files = stream.split_files(corpus_folder, "train")
    stream.tokenise(files, "train", tiny_injected_dir, ray_data=False)
    local = stream.token_index(corpus_folder, tiny_injected_dir, "train")
    _fresh_cache(monkeypatch, tmp_path / "ray")
    stream.tokenise(files, "train", tiny_injected_dir, ray_data=True)
    remote = stream.token_index(corpus_folder, tiny_injected_dir, "train")
    assert Path(remote.shards[0].path).is_relative_to(tmp_path / "ray")
    assert remote.n_tokens == local.n_tokens > 0
    assert (remote.read(0, remote.n_tokens) == local.read(0, local.n_tokens)).all()


def test_corpus_on_s3_streams_the_same_tokens(
    s3_env, ray_data, corpus_folder, corpus, tiny_injected_dir, tmp_path, monkeypatch
) -> None:
    """An s3:// corpus folder and an s3:// prefix of raw shards, read by byte range through
    pyarrow in Ray Data's read tasks, tokenise to the local folder's tokens; the object hashes
    are remembered."""
    import secrets

    from tli import remote

    monkeypatch.setattr(shards, "PART_BYTES", 4096)
    bucket = f"tli-scale-{secrets.token_hex(4)}"
    remote.upload(corpus_folder, f"s3://{bucket}/corpus")
    (tmp_path / "raw").mkdir()
    shutil.copyfile(corpus, tmp_path / "raw" / "part-0.jsonl")
    remote.upload(tmp_path / "raw", f"s3://{bucket}/raw")  # with its hidden completion marker
    for local, uri, kind in ((corpus_folder, f"s3://{bucket}/corpus", "corpus"),
                             (tmp_path / "raw", f"s3://{bucket}/raw/", "raw")):  # fmt: skip
        files = stream.split_files(uri, "train")
        assert [f.kind for f in files] == [kind]
        assert files[0].sha256 == stream.split_files(local, "train")[0].sha256
        _fresh_cache(monkeypatch, tmp_path / f"s3-{kind}")
        got = stream.token_index(uri, tiny_injected_dir, "train")
        assert (tmp_path / f"s3-{kind}" / "tokens" / "s3-sha256").is_dir()  # remembered
        _fresh_cache(monkeypatch, tmp_path / f"local-{kind}")
        want = stream.token_index(local, tiny_injected_dir, "train")
        assert got.n_tokens == want.n_tokens > 0
        assert (got.read(0, got.n_tokens) == want.read(0, want.n_tokens)).all()


def test_a_step_takes_the_same_rows_however_it_is_split() -> None:
    n, seed = 103, 5
    layouts = [(4, 1, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2), (1, 1, 4)]  # (B, W, A): 4 per step
    for step in (0, 7, 25, 26, 60):  # 25 steps per epoch: 25 and 60 are in later epochs
        seen = []
        for b, w, a in layouts:
            order = DataOrder(n, b, w, a, seed)
            rows = [order.rows(step, m, r) for m in range(a) for r in range(w)]
            seen.append(torch.cat(rows).tolist())
        assert all(s == seen[0] for s in seen), (step, seen)
    # One micro-step per step: the order tli always used (batch_rows of the global batch).
    order = DataOrder(n, 3, 2, 1, seed)
    for step in (0, 16, 17, 40):
        both = torch.cat([order.rows(step, 0, 0), order.rows(step, 0, 1)])
        assert torch.equal(both, batch_rows(step, n, 6, seed))


def test_streamed_batches_equal_in_memory_batches_for_a_seed(
    ray_data, corpus_folder, tiny_injected_dir
) -> None:
    """Every worker's micro-batches over two epochs, from step 0 and from mid-epoch."""
    from tli.data.blocks import load_blocks
    from tli.data.feed import StreamBatches, rank_dataset

    blocks = load_blocks(corpus_folder, tiny_injected_dir, SEQ, "train")  # [n, T]
    index = stream.token_index(corpus_folder, tiny_injected_dir, "train")
    cfg = TrainConfig(seq_len=SEQ, batch_size=3, grad_accum=2, workers=2, seed=11, steps=40)
    order = DataOrder(int(blocks.shape[0]), 3, 2, 2, 11)
    assert cfg.steps > 1.5 * order.steps_per_epoch  # crosses an epoch boundary
    for start in (0, order.steps_per_epoch // 2 + 1):
        spec = stream.feed_spec(index, cfg, start, None)
        for rank in range(2):
            mem = MemoryBatches(blocks)
            mem.bind(order, rank)
            streamed = StreamBatches(rank_dataset(spec, rank, 2), spec)
            streamed.bind(order, rank)
            for step in range(start, cfg.steps):
                for micro in range(2):
                    want = mem.get(step, micro)  # [B, T]
                    assert torch.equal(streamed.get(step, micro), want), (start, rank, step)


def test_stream_refuses_bad_data_in_one_line(corpus_folder, tmp_path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.json").write_text("{}")
    (tmp_path / "half" / "train.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "data.csv").write_text("text\nhello\n")
    cases = [
        ("hf:wikitext", "train", "--feed memory"),
        (tmp_path / "nope", "train", "does not exist"),
        (tmp_path / "half", "validation", "without a validation split"),
        (tmp_path / "empty", "train", "no .jsonl"),
        (tmp_path / "data.csv", "train", "unsupported data file"),
        (corpus_folder, "dev", "unknown split"),
    ]
    for data, split, needle in cases:
        with pytest.raises(TliError) as e:
            stream.split_files(data, split)
            pytest.fail(f"{data} {split}: no error")
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


# ------------------------------------------------------------------------------ models


@pytest.mark.parametrize(
    "inject",
    [InjectConfig(interval=2), InjectConfig(interval=2, init="interpolate"),
     InjectConfig(interval=3, init="copy", alpha=0.5), InjectConfig(method="dus", overlap=1)],
    ids=["identity", "interpolate", "copy-alpha", "dus"],
)  # fmt: skip
def test_trial_model_from_the_base_folder_equals_the_in_memory_injection(
    tiny_model_dir, inject
) -> None:
    from tli.inject.plan import make_plan
    from tli.modelfolder import load_causal_lm
    from tli.train.shard import InjectedWeights, materialise, skeleton
    from tli.tune.trial import build_trial_model

    plan = make_plan(4, inject)
    base = load_causal_lm(tiny_model_dir)
    state = {k: v.detach() for k, v in base.state_dict().items()}
    ref = build_trial_model({"config": base.config.to_dict(), "state": state}, plan.to_dict())
    source = InjectedWeights(tiny_model_dir, plan)
    model = skeleton(source.injected_config())
    materialise(model, source, torch.device("cpu"))
    a, b = ref.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again
    ids = torch.arange(20).view(2, 10)
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, model(input_ids=ids).logits)


def test_mismatched_weights_are_refused_before_any_row_is_read(tiny_model_dir, tmp_path):
    from tli.modelfolder import read_config
    from tli.train.shard import FolderWeights, materialise, skeleton

    config = {**read_config(tiny_model_dir), "intermediate_size": 96}
    with pytest.raises(TliError, match="do not belong to this config"):
        materialise(skeleton(config), FolderWeights(tiny_model_dir), torch.device("cpu"))


def test_moe_training_adds_the_router_load_balancing_loss() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    from tli.train.step import StepRunner

    torch.manual_seed(0)
    cfg_m = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5,
                          max_position_embeddings=64)  # fmt: skip
    model = MixtralForCausalLM(cfg_m)
    blocks = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(seq_len=16, batch_size=2, steps=1, freeze="none", bf16=False, warmup=0)
    runner = StepRunner(model, blocks, cfg)
    ids = runner.data.get(0, 0)
    with torch.no_grad():
        plain = model(input_ids=ids, labels=ids).loss
        with_aux = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert with_aux.aux_loss > 0 and with_aux.loss > plain
    assert runner.train_step()["loss"] == pytest.approx(float(with_aux.loss), rel=1e-6)


# ------------------------------------------------------------------------------ checkpoints


_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def assert_no_pickle(folder: Path) -> None:
    """Every file is JSON, JSON lines or safetensors (with a valid header); none is a pickle
    or a torch zip archive."""
    from tli.inject.stio import read_header

    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for f in files:
        assert f.suffix in (".json", ".jsonl", ".safetensors"), f
        assert not f.read_bytes()[:4].startswith(_PICKLE_MAGIC), f
        if f.suffix == ".safetensors":
            read_header(f)
        elif f.suffix == ".json":
            json.loads(f.read_text())
        else:
            [json.loads(x) for x in f.read_text().splitlines() if x.strip()]


def test_sharded_checkpoint_round_trip_is_exact_and_unpickles_nothing(
    corpus_folder, tiny_injected_dir, tmp_path, monkeypatch
) -> None:
    from tli.data.blocks import load_blocks
    from tli.modelfolder import load_causal_lm, read_config
    from tli.train.checkpoint import (
        CheckpointTensors,
        checkpoint_complete,
        load_checkpoint,
        save_checkpoint,
    )
    from tli.train.shard import skeleton
    from tli.train.step import StepRunner

    blocks = load_blocks(corpus_folder, tiny_injected_dir, SEQ, "train")
    cfg = TrainConfig(seq_len=SEQ, batch_size=2, warmup=1, lr=3e-3, steps=4, freeze="none")
    r1 = StepRunner(load_causal_lm(tiny_injected_dir), blocks, cfg)
    history = [r1.train_step(), r1.train_step()]
    ckpt = tmp_path / "step_000002"
    ckpt.mkdir()
    save_checkpoint(r1, ckpt, history)
    assert_no_pickle(ckpt)
    assert checkpoint_complete(ckpt)
    index = json.loads((ckpt / "index.json").read_text())
    assert index["world_size"] == 1 and "model.embed_tokens.weight" in index["tensors"]["model"]
    assert "lm_head.weight" not in index["tensors"]["model"]  # tied: stored once
    # tli writes the shards tensor by tensor from the live weights: still plain safetensors,
    # as safetensors itself reads them, bitwise the live parameters and AdamW moments.
    from safetensors.torch import load_file

    written = load_file(ckpt / "model-r00000-of-00001.safetensors")
    live = dict(r1.raw.named_parameters())
    assert set(written) == set(index["tensors"]["model"])
    for name, t in written.items():
        if name in live:
            assert torch.equal(t, live[name]), name
    moments = load_file(ckpt / "optim-r00000-of-00001.safetensors")
    p0 = live["model.embed_tokens.weight"]
    exp_avg = r1.optimizer.state[p0]["exp_avg"]
    assert torch.equal(moments["model.embed_tokens.weight/exp_avg"], exp_avg)

    def refuse(*a, **k):
        raise AssertionError("a checkpoint load unpickled something")

    with monkeypatch.context() as m:
        for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
            m.setattr(mod, name, refuse)
        r2 = StepRunner(skeleton(read_config(ckpt)), blocks, cfg, weights=CheckpointTensors(ckpt))
        assert load_checkpoint(r2, ckpt) == history
    assert r2.step == 2
    for _ in range(2):
        a, b = r1.train_step(), r2.train_step()
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"]
    for (name, p1), (_, p2) in zip(r1.raw.named_parameters(), r2.raw.named_parameters(),
                                   strict=True):  # fmt: skip
        assert torch.equal(p1, p2), name
    (ckpt / "model-r00000-of-00001.safetensors").unlink()
    assert not checkpoint_complete(ckpt)  # a rank's file missing: not a checkpoint to resume


def test_hf_folder_from_a_checkpoint_loads_with_transformers(
    corpus_folder, tiny_injected_dir, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM

    from tli.data.blocks import load_blocks
    from tli.modelfolder import load_causal_lm
    from tli.train.checkpoint import save_checkpoint, write_hf_model
    from tli.train.step import StepRunner

    blocks = load_blocks(corpus_folder, tiny_injected_dir, SEQ, "train")
    cfg = TrainConfig(seq_len=SEQ, batch_size=2, steps=1, freeze="none")
    runner = StepRunner(load_causal_lm(tiny_injected_dir), blocks, cfg)
    runner.train_step()
    (tmp_path / "ck").mkdir()
    save_checkpoint(runner, tmp_path / "ck", [])
    for dtype, shard in ((None, 5 * 1024**3), (torch.bfloat16, 300_000)):
        out = tmp_path / f"hf-{dtype}"
        write_hf_model(tmp_path / "ck", out, dtype, shard)
        model = AutoModelForCausalLM.from_pretrained(out)
        assert (out / "model.safetensors.index.json").is_file() == (shard < 1e6)
        for name, p in runner.raw.state_dict().items():
            want = p if dtype is None else p.to(dtype).float()
            assert torch.equal(model.state_dict()[name].float(), want), name


# ------------------------------------------------------------------------------ Ray Train


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _cfg(**kw) -> TrainConfig:
    base = dict(seq_len=SEQ, batch_size=2, warmup=2, lr=3e-3, steps=4, workers=2, fsdp=True,
                freeze="none", checkpoint_every=2, validation={"blocks": 4, "every": 2})  # fmt: skip
    return TrainConfig(**{**base, **kw})


RT = Runtime(threads=1, report_every=1, cpus_per_worker=1, keep_checkpoints=True)


@pytest.mark.slow
def test_fsdp_sharded_load_and_streamed_data_give_the_loss_curve_of_full_loading(
    ray_data, corpus_folder, tiny_injected_dir, tmp_path
) -> None:
    """Two gloo workers, FSDP2: (sharded load, streamed data) against (full load, in memory):
    the same losses and final weights, bitwise; each rank wrote its own checkpoint shard."""
    from tli.train.stage import run_train

    new = run_train(tiny_injected_dir, tmp_path / "sharded", corpus_folder, _cfg(feed="stream"),
                    runtime=RT)  # fmt: skip
    old = run_train(tiny_injected_dir, tmp_path / "full", corpus_folder, _cfg(feed="memory"),
                    runtime=RT.model_copy(update={"sharded_load": False}))  # fmt: skip
    assert _losses(new) == _losses(old)
    assert all(math.isfinite(x) for x in _losses(new)) and len(_losses(new)) == 4
    a, b = _weights(new / "model"), _weights(old / "model")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for out in (new, old):
        last = out / "ray" / "step_000004"
        names = {p.name for p in last.iterdir()}
        assert {"model-r00000-of-00002.safetensors", "model-r00001-of-00002.safetensors",
                "optim-r00000-of-00002.safetensors", "index.json"} <= names  # fmt: skip
        assert_no_pickle(last)
        # Rank 1 holds the second half of every row-sharded tensor, nothing else.
        rank1 = load_file(str(last / "model-r00001-of-00002.safetensors"))
        emb = rank1["model.embed_tokens.weight"]
        assert emb.shape[0] == math.ceil(49152 / 2)
        workers = json.loads((out / "tli_train.json").read_text())["workers"]
        assert [w["rank"] for w in workers] == [0, 1] and all(w["peak_rss_bytes"] > 0
                                                              for w in workers)  # fmt: skip


@pytest.mark.slow
def test_resume_from_a_sharded_checkpoint_onto_one_and_two_workers(
    ray_data, corpus_folder, tiny_injected_dir, tmp_path, drill
) -> None:
    """Interrupted at step 3 (checkpoint at 2, written by 2 FSDP workers), resumed on 2 workers
    and on 1 (2 micro-steps: the same 4 sequences a step): both end with the weights of the
    uninterrupted run, bitwise. The gradient clip is out of the way (grad_clip 1e6): its norm
    is summed in another order on one worker, and AdamW turns that last-bit difference into
    ~1e-5 on near-zero gradients (lr / eps); with the clip on, 2 -> 1 agrees to ~5e-5. In fp32:
    with bf16 on, FSDP gathers its weights in bf16 (MixedPrecisionPolicy) where one worker
    autocasts fp32 weights, another rounding of the same step."""
    from ray.train import TrainingFailedError

    from tli.train.stage import run_train

    cfg2 = _cfg(feed="stream", grad_clip=1e6, bf16=False)
    straight = run_train(tiny_injected_dir, tmp_path / "straight", corpus_folder, cfg2,
                         runtime=RT)  # fmt: skip
    drill("train.step=3:raise-once")
    with pytest.raises(TrainingFailedError):
        run_train(tiny_injected_dir, tmp_path / "two", corpus_folder, cfg2,
                  runtime=RT.model_copy(update={"max_failures": 0}))  # fmt: skip
    drill(None)
    two = tmp_path / "two"
    assert (partial_of(two) / "ray" / "step_000002").is_dir() and not two.exists()
    one, bad = tmp_path / "one", tmp_path / "bad"
    for other in (one, bad):  # the same interrupted run, three times
        shutil.copytree(partial_of(two), partial_of(other))
    # A step that takes other sequences than the checkpoint's cannot resume it.
    cfg_bad = cfg2.model_copy(update={"workers": 1})
    with pytest.raises(TliError, match="sequences per step: 4 then, 2 now"):
        run_train(tiny_injected_dir, bad, corpus_folder, cfg_bad, resume=True, runtime=RT)
    run_train(tiny_injected_dir, two, corpus_folder, cfg2, resume=True, runtime=RT)
    cfg1 = cfg2.model_copy(update={"workers": 1, "grad_accum": 2})
    run_train(tiny_injected_dir, one, corpus_folder, cfg1, resume=True, runtime=RT)
    want = _weights(straight / "model")
    for out in (two, one):
        assert _losses(out) == _losses(straight), out.name
        got = _weights(out / "model")
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), (out.name, name)
