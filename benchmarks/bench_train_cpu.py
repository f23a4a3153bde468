"""CPU: steady-state tokens/s of `tli train` (Ray Train, 1 worker) vs a plain PyTorch loop.

Same job on both sides: SmolLM2-135M upscaled by TLI K=5 (30 -> 36 layers, identity init),
only the 6 injected layers trained (the default freeze policy), bf16 autocast, AdamW, gradient
clipping, the same sequence length, batch, steps and torch thread count, on the bundled
Shakespeare corpus. Runs are interleaved (plain, tli, plain, tli, ...) so that load from
others on the machine hits both alike. ``--model small`` runs the same comparison on a small
random Llama (8 -> 10 layers, hidden 256): its steps are ~20x shorter, so a fixed per-step
cost of Ray Train weighs ~20x more there.

Steady-state rate: tokens trained between the end of step ``--skip`` and the end of the last
step, divided by the wall-clock time between them (so it includes everything the loop does
between steps: Ray Train reports every ``--report-every`` steps, logging). Ray's fixed start-up
(start Ray, start the Train controller and worker, load model and data in the worker) and the
end (final checkpoint, output folder) are reported separately.

Usage::

    python benchmarks/bench_train_cpu.py [--model smollm2|small] [--steps 20] [--rounds 2]
        [--seq-len 128] [--batch 4] [--threads 2] [--report-every 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def small_base(work: Path, real: Path) -> Path:
    """A small random Llama (8 layers, hidden 256) with SmolLM2's tokenizer, saved as HF."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    out = work / "small"
    LlamaForCausalLM(cfg).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(real / f, out / f)
    return out


def prepare(work: Path, seq_len: int, model: str):
    """(injected model dir, corpus dir, train blocks) built once (cached by tli where it can)."""
    from tli.base import import_base
    from tli.config import DataConfig, InjectConfig, Runtime
    from tli.data.blocks import load_blocks
    from tli.data.stage import run_data_build
    from tli.inject.stage import run_inject

    base = import_base()
    interval = 5
    if model == "small":
        base, interval = small_base(work, base), 4
    quiet = Runtime(progress=False)
    inj = run_inject(base, work / "inj", InjectConfig(interval=interval), runtime=quiet)
    corpus = run_data_build(DataConfig(sources=["shakespeare"]), work / "corpus", inj)
    blocks = load_blocks(corpus, inj, seq_len, "train")
    return inj, corpus, blocks


def plain_loop(model_dir: Path, blocks, args) -> dict:
    """The reference: a minimal single-process PyTorch loop, no tli training code."""
    import torch

    from tli.inject.plan import read_plan
    from tli.modelfolder import load_causal_lm

    torch.set_num_threads(args.threads)
    t_call = time.time()
    model = load_causal_lm(model_dir)
    new = set(read_plan(model_dir).new_layers)
    model.requires_grad_(False)
    for i in new:
        model.model.layers[i].requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(blocks.shape[0], generator=g)
    stamps = []
    t_first = None
    for step in range(args.steps):
        if t_first is None:
            t_first = time.time()
        ids = blocks[order[step * args.batch : (step + 1) * args.batch]]  # [B, T]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        stamps.append(time.time())
    tokens = (args.steps - args.skip) * args.batch * args.seq_len
    return {
        "tokens_per_s": tokens / (stamps[-1] - stamps[args.skip - 1]),
        "startup_s": t_first - t_call,
    }


def tli_run(model_dir: Path, corpus: Path, out: Path, args, report_every: int) -> dict:
    from tli.config import Runtime, TrainConfig
    from tli.train.stage import run_train

    cfg = TrainConfig(
        steps=args.steps, workers=1, freeze="original", lr=1e-3, warmup=2,
        seq_len=args.seq_len, batch_size=args.batch, bf16=True, validation={"blocks": 8},
    )  # fmt: skip
    t_call = time.time()
    rt = Runtime(threads=args.threads, cpus_per_worker=args.threads, report_every=report_every)
    run_train(model_dir, out, corpus, cfg, force=True, runtime=rt)
    t_end = time.time()
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first_step_start = hist[0]["wall_time"] - hist[0]["elapsed"]
    tokens = hist[-1]["tokens"] - hist[args.skip - 1]["tokens"]
    span = hist[-1]["wall_time"] - hist[args.skip - 1]["wall_time"]
    prov = json.loads((out / "tli_train.json").read_text())
    # Share of the steady wall time spent outside the training step itself (Ray Train reports,
    # logging): Ray's per-step cost measured within one run, immune to the machine's load.
    inside = hist[-1]["elapsed"] - hist[args.skip - 1]["elapsed"]
    return {
        "tokens_per_s": tokens / span,
        "outside_step_fraction": 1.0 - inside / span,
        "startup_s": first_step_start - t_call,
        "ray_init_s": prov["timing"]["ray_init_s"],
        "finish_s": t_end - hist[-1]["wall_time"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        choices=["smollm2", "small"],
        default="smollm2",
        help="smollm2: the bundled SmolLM2 upscaled 30 -> 36; small: a random 8-layer Llama "
        "(hidden 256) upscaled to 10, whose short steps make any per-step overhead show more",
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the rate")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--report-every", type=int, default=10)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.steps <= args.skip:
        ap.error("--steps must be larger than --skip")

    with tempfile.TemporaryDirectory(prefix="tli-bench-train-") as tmp:
        work = Path(tmp)
        inj, corpus, blocks = prepare(work, args.seq_len, args.model)
        what = "SmolLM2 30->36" if args.model == "smollm2" else "small Llama 8->10"
        print(f"job: {what} layers, injected layers trained, bf16, seq {args.seq_len} x "
              f"batch {args.batch}, {args.steps} steps (rate over the last "
              f"{args.steps - args.skip}), {args.threads} threads", flush=True)  # fmt: skip
        plain, tli, tli_every1 = [], [], []
        for r in range(args.rounds):
            plain.append(plain_loop(inj, blocks, args))
            print(f"round {r + 1} plain: {plain[-1]}", flush=True)
            tli.append(tli_run(inj, corpus, work / "out", args, args.report_every))
            print(f"round {r + 1} tli (report every {args.report_every}): {tli[-1]}", flush=True)
        tli_every1.append(tli_run(inj, corpus, work / "out1", args, 1))
        print(f"tli (report every step): {tli_every1[-1]}", flush=True)

    def med(rows, key):
        return statistics.median(x[key] for x in rows)

    p, t, t1 = med(plain, "tokens_per_s"), med(tli, "tokens_per_s"), med(tli_every1, "tokens_per_s")
    res = {
        "plain_tokens_per_s": p,
        "tli_tokens_per_s": t,
        "ratio": t / p,
        "tli_report_every_step_tokens_per_s": t1,
        "ratio_report_every_step": t1 / p,
        "tli_outside_step_fraction": med(tli, "outside_step_fraction"),
        "tli_report_every_step_outside_step_fraction": med(tli_every1, "outside_step_fraction"),
        "tli_startup_s": med(tli, "startup_s"),
        "tli_ray_init_s": med(tli, "ray_init_s"),
        "tli_finish_s": med(tli, "finish_s"),
        "plain_startup_s": med(plain, "startup_s"),
        "args": vars(args),
    }
    print()
    o, o1 = res["tli_outside_step_fraction"], res["tli_report_every_step_outside_step_fraction"]
    print("| | steady-state tokens/s | ratio to plain | time outside the step | fixed start-up |")
    print("|---|---|---|---|---|")
    print(f"| plain PyTorch loop | {p:,.0f} | 1.00 | | {res['plain_startup_s']:.1f} s |")
    print(f"| tli train, 1 worker, report every {args.report_every} | {t:,.0f} | {t / p:.2f} | "
          f"{100 * o:.1f}% | {res['tli_startup_s']:.1f} s (Ray {res['tli_ray_init_s']:.1f} s); "
          f"end {res['tli_finish_s']:.1f} s |")  # fmt: skip
    print(
        f"| tli train, 1 worker, report every step | {t1:,.0f} | {t1 / p:.2f} | {100 * o1:.1f}% | |"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
