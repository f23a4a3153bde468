"""GPU training throughput and MFU of tli's training step (for an H100/H200).

Runs the same per-step code as ``tli train`` (:class:`tli.train.step.StepRunner`, through
:func:`tli.train.step.train_in_memory`, one GPU, no Ray) on random-weight models of two shapes:

- ``smollm2-36``: SmolLM2-135M's shape (30 layers, hidden 576, GQA 9/3, tied embeddings)
  upscaled by TLI K=5 in memory to 36 layers; trained fully (``none``) and LLaMA Pro style
  (``original``: only the 6 injected layers).
- ``llama-1b``: a Llama-3.2-1B shape (16 layers, hidden 2048, GQA 32/8, vocab 128256, tied),
  1.24B parameters, trained fully.

bf16 autocast with fp32 master weights, fused AdamW, SDPA attention. Random tokens (speed only).
With ``--fsdp`` each shape also runs the FSDP path of ``tli train --fsdp``: a one-rank process
group (NCCL), the model saved once and built on the meta device, each parameter read into its
FSDP2 shard (:mod:`tli.train.shard`), FSDP2's mixed precision (bf16 compute, fp32 gradient
reduction and master weights) instead of autocast.
Reports steady-state tokens/s (median over the steps after ``--skip``) and MFU = model FLOPs per
token (6N + 12 L d T, trainable-aware, see :func:`tli.train.step.flops_per_token`) x tokens/s / peak
bf16 FLOP/s (detected for known GPUs, or ``--peak-tflops``).

Usage::

    python benchmarks/gpu_train.py                      # both shapes, eager
    python benchmarks/gpu_train.py --compile            # torch.compile as well
    python benchmarks/gpu_train.py --fsdp               # + the FSDP path (sharded loading)
    python benchmarks/gpu_train.py --tiny               # CPU smoke run of the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def smollm2_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=10, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=8192, tie_word_embeddings=True)  # fmt: skip
    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    )  # fmt: skip


def llama1b_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=8192, tie_word_embeddings=True)  # fmt: skip
    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    )  # fmt: skip


def build(name: str, device, tiny: bool):
    """(model on ``device``, injected layer indices or None)."""
    import torch
    from transformers import LlamaForCausalLM

    from tli.config import InjectConfig
    from tli.inject.memory import inject_in_memory
    from tli.inject.plan import make_plan

    torch.manual_seed(0)
    if name == "smollm2-36":
        cfg = smollm2_config(tiny)
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
        plan = make_plan(cfg.num_hidden_layers, InjectConfig(interval=5))
        model = inject_in_memory(model, plan)
        return model, list(plan.new_layers)
    with torch.device(device):
        return LlamaForCausalLM(llama1b_config(tiny)), None


def fsdp_model(model, work):
    """The FSDP path's start: ``model`` saved, then a meta-device skeleton and its row source."""
    from tli.modelfolder import read_config
    from tli.train.shard import FolderWeights, skeleton

    folder = Path(work) / "model"
    model.to("cpu").save_pretrained(folder)
    return skeleton(read_config(folder)), FolderWeights(folder)


def one_rank_group(device: str):
    """A process group of one rank (NCCL on a GPU), as Ray Train sets one up per worker."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def run_one(name, freeze, args, device, peak, fsdp=False) -> dict:
    import tempfile

    import torch
    import torch.distributed as dist

    from tli.config import TrainConfig
    from tli.train.step import train_in_memory

    model, new_layers = build(name, device, args.tiny)
    weights, work = None, None
    if fsdp:
        work = tempfile.TemporaryDirectory(prefix="tli-gpu-fsdp-")
        model, weights = fsdp_model(model, work.name)
        if device == "cuda":
            torch.cuda.empty_cache()
        one_rank_group(device)
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    n_blocks = args.batch_size * (args.steps + 1)
    blocks = torch.randint(0, vocab, (n_blocks, args.seq_len), generator=g)  # [n, T]
    cfg = TrainConfig(
        steps=args.steps, workers=1, gpu=device == "cuda", freeze=freeze, lr=3e-4, warmup=2,
        seq_len=args.seq_len, batch_size=args.batch_size, bf16=True,
        grad_checkpointing=args.grad_checkpointing, fsdp=fsdp,
    )  # fmt: skip
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        hist = train_in_memory(model, blocks, cfg, new_layers=new_layers, device=device,
                               peak_flops=peak, compile=args.compile, weights=weights,
                               distributed=fsdp)  # fmt: skip
    finally:
        if fsdp:
            dist.destroy_process_group()
            work.cleanup()
    wall = time.perf_counter() - t0
    steady = hist[args.skip :]
    # Rate over the steady steps from wall-clock stamps (includes any loop overhead).
    span = steady[-1]["wall_time"] - hist[args.skip - 1]["wall_time"]
    tokens = steady[-1]["tokens"] - hist[args.skip - 1]["tokens"]
    tps = tokens / span
    mfus = [m["mfu"] for m in steady if m.get("mfu") is not None]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {
        "model": name,
        "freeze": freeze,
        "fsdp": fsdp,
        "compile": args.compile,
        "params": n_params,
        "trainable": trainable,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "tokens_per_s": tps,
        "median_step_tokens_per_s": statistics.median(m["tokens_per_s"] for m in steady),
        "mfu": statistics.median(mfus) if mfus else None,
        "first_loss": hist[0]["loss"],
        "last_loss": hist[-1]["loss"],
        "wall_s": wall,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }
    del model, hist
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-36,llama-1b")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the rates")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--fsdp", action="store_true", help="also run the FSDP path (sharded load)")
    ap.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s (default: detected)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: test the script")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    import torch

    from tli.train.step import peak_flops_of

    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        args.steps, args.skip, args.seq_len, args.batch_size = 6, 2, 64, 2
    elif not torch.cuda.is_available():
        print("no CUDA GPU: run with --tiny for a CPU smoke run", file=sys.stderr)
        return 2
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops_of(torch.device(device), args.peak_tflops)
    if args.tiny and peak is None:
        peak = 1e12  # any number: exercises the MFU path
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {gpu}; peak bf16 {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s; "
          f"torch {torch.__version__}", flush=True)  # fmt: skip
    runs = []
    for name in args.models.split(","):
        freezes = ["none", "original"] if name == "smollm2-36" else ["none"]
        for freeze in freezes:
            for fsdp in [False, True] if args.fsdp else [False]:
                try:
                    row = run_one(name, freeze, args, device, peak, fsdp=fsdp)
                except torch.OutOfMemoryError as e:  # report and go on with the next shape
                    row = {"model": name, "freeze": freeze, "fsdp": fsdp,
                           "error": str(e).splitlines()[0]}  # fmt: skip
                    gc.collect()
                    torch.cuda.empty_cache()
                runs.append(row)
                print(json.dumps(row), flush=True)
    print()
    print("| model | trained | params | seq x batch | tokens/s | MFU | peak mem | loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        if "error" in r:
            print(f"| {r['model']} | {r['freeze']} | | | {r['error']} | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else ""
        print(
            f"| {r['model']}{' (compiled)' if r['compile'] else ''}"
            f"{' FSDP2, sharded load' if r.get('fsdp') else ''} | "
            f"{'all' if r['freeze'] == 'none' else 'injected only'} | "
            f"{r['params'] / 1e6:,.0f}M ({r['trainable'] / 1e6:,.0f}M trained) | "
            f"{r['seq_len']} x {r['batch_size']} | {r['tokens_per_s']:,.0f} | {mfu} | {mem} | "
            f"{r['first_loss']:.2f} -> {r['last_loss']:.2f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"device": gpu, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
