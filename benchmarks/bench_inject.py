"""Injection speed and memory vs `cp` of the same files (a benchmark, never a test).

Generates Llama-shaped checkpoints of random bf16 weights (by default ~0.5 GB and ~2 GB, in
~1 GB shards), then alternates `cp -r` of the folder and `tli inject` (TLI, K=4, identity) on it,
several rounds, and reports the median wall-time ratio and each command's peak RSS (ru_maxrss of
the child). Both read from the page cache after the first round, so the ratio compares the work
each does on the bytes, not the disk. tli runs twice per round: as it comes (one writer thread
per output shard, up to one per CPU) and with ``--threads 1``, the same single thread cp has.

    .venv/bin/python benchmarks/bench_inject.py [--sizes 0.5,2] [--rounds 3] [--dir DIR]
        [--mergekit PATH/TO/mergekit-yaml]

With ``--mergekit``, mergekit's passthrough merge doing the same job (same layers, the new
layers' o_proj and down_proj scaled by 0) runs in the same rounds. mergekit is not a dependency
of tli: install it in a separate environment and pass its ``mergekit-yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def make_checkpoint(out: Path, gb: float, shard_gb: float = 1.0) -> tuple[int, int]:
    """A Llama-shaped bf16 checkpoint of about ``gb`` GB; returns (layers, bytes)."""
    import torch
    from safetensors.torch import save_file

    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
    head = 2 * (2 * vocab * hidden + hidden)
    layers = max(4, round((gb * 1e9 - head) / per_layer))
    out.mkdir(parents=True)
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (hidden, hidden)),
            (p + "self_attn.v_proj.weight", (hidden, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    shards: list[dict] = [{}]
    size = 0
    for name, shape in names:
        n = 2
        for d in shape:
            n *= d
        if shards[-1] and size + n > shard_gb * 1e9:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += n
    g = torch.Generator().manual_seed(0)
    wmap, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            k: torch.randn(v, generator=g, dtype=torch.float32).to(torch.bfloat16)
            for k, v in shard.items()
        }
        save_file(tensors, out / fname, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        wmap.update({k: fname for k in shard})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wmap})
    )
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(cfg))
    return layers, sum(f.stat().st_size for f in out.iterdir())


def measure(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (bytes) of one command.

    Each command runs under a fresh python, so ru_maxrss of its children is that command's own.
    CPU seconds are reported too: on a shared machine they move far less than wall time.
    Dirty pages of the previous command are flushed first (not timed), so that no command pays
    for another's writeback.
    """
    os.sync()
    code = (
        "import resource,subprocess,sys,time,json;t=time.perf_counter();"
        f"subprocess.run({cmd!r},check=True,stdout=subprocess.DEVNULL);"
        "w=time.perf_counter()-t;r=resource.getrusage(resource.RUSAGE_CHILDREN);"
        "print(json.dumps([w,r.ru_utime+r.ru_stime,r.ru_maxrss*1024]))"
    )
    r = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    wall, cpu, rss = json.loads(r.stdout)
    return wall, cpu, rss


def mergekit_config(src: Path, layers: int, k: int) -> str:
    """A mergekit passthrough config equal to `tli inject --interval k` (identity init)."""
    lines = ["merge_method: passthrough", "dtype: bfloat16", "slices:"]
    for start in range(0, layers, k):
        end = min(start + k, layers)
        lines += [f"  - sources: [{{model: {src}, layer_range: [{start}, {end}]}}]"]
        if end - start == k:
            lines += [
                "  - sources:",
                f"      - model: {src}",
                f"        layer_range: [{end - 1}, {end}]",
                "        parameters:",
                "          scale:",
                "            - {filter: o_proj, value: 0.0}",
                "            - {filter: down_proj, value: 0.0}",
                "            - {value: 1.0}",
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--make"]:  # the child that generates one checkpoint
        print(json.dumps(make_checkpoint(Path(sys.argv[2]), float(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.5,2", help="checkpoint sizes in GB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--mergekit", default=None, help="mergekit-yaml executable to compare with")
    args = ap.parse_args()
    tli = str(Path(sys.executable).with_name("tli"))
    root = Path(args.dir or tempfile.mkdtemp(prefix="tli-bench-"))
    rows = []
    try:
        for gb in (float(x) for x in args.sizes.split(",")):
            src = root / f"src-{gb}"
            # In a child process: torch's memory would otherwise stay with this one and lower
            # the kernel's dirty-page limit for the commands measured below.
            made = subprocess.run(
                [sys.executable, __file__, "--make", str(src), str(gb)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            layers, nbytes = json.loads(made.stdout)
            cp_t, tli_t, cp_rss, tli_rss, mk_t, mk_rss = [], [], [], [], [], []
            tli1_t: list[float] = []
            cp_cpu, tli_cpu, mk_cpu = [], [], []
            mk_cfg = root / "mergekit.yaml"
            mk_cfg.write_text(mergekit_config(src, layers, 4))
            for r in range(args.rounds + 1):  # round 0 warms the page cache, not counted
                dst = root / "cp-out"
                w, c, rss = measure(["cp", "-r", str(src), str(dst)])
                shutil.rmtree(dst)
                out = root / "tli-out"
                tli_cmd = [tli, "inject", "--model", str(src), "--out", str(out),
                           "--interval", "4", "--shard-size", "1GB", "--quiet"]  # fmt: skip
                w2, c2, rss2 = measure(tli_cmd)
                out_bytes = sum(f.stat().st_size for f in out.iterdir())
                shutil.rmtree(out)
                w4, _, _ = measure([*tli_cmd, "--writers", "1"])
                shutil.rmtree(out)
                if args.mergekit:
                    mk_out = root / "mk-out"
                    w3, c3, rss3 = measure(
                        [
                            args.mergekit,
                            str(mk_cfg),
                            str(mk_out),
                            "--out-shard-size",
                            "1B",
                            "--lazy-unpickle",
                            "--quiet",
                        ]
                    )
                    shutil.rmtree(mk_out)
                    if r:
                        mk_t.append(w3), mk_rss.append(rss3), mk_cpu.append(c3)
                if r:
                    cp_t.append(w), tli_t.append(w2), cp_rss.append(rss), tli_rss.append(rss2)
                    tli1_t.append(w4)
                    cp_cpu.append(c), tli_cpu.append(c2)
            rows.append(
                {
                    "size_gb": round(nbytes / 1e9, 2),
                    "layers": f"{layers} -> {layers + layers // 4}",
                    "out_gb": round(out_bytes / 1e9, 2),
                    "cp_s": round(statistics.median(cp_t), 2),
                    "tli_s": round(statistics.median(tli_t), 2),
                    "ratio": round(
                        statistics.median(b / a for a, b in zip(cp_t, tli_t, strict=True)), 2
                    ),
                    "ratio_1_thread": round(
                        statistics.median(b / a for a, b in zip(cp_t, tli1_t, strict=True)), 2
                    ),
                    "cp_cpu_s": round(statistics.median(cp_cpu), 2),
                    "tli_cpu_s": round(statistics.median(tli_cpu), 2),
                    "tli_peak_rss_mb": round(max(tli_rss) / 2**20),
                    "cp_peak_rss_mb": round(max(cp_rss) / 2**20),
                }
            )
            if mk_t:
                rows[-1]["mergekit_s"] = round(statistics.median(mk_t), 2)
                rows[-1]["mergekit_cpu_s"] = round(statistics.median(mk_cpu), 2)
                rows[-1]["mergekit_peak_rss_mb"] = round(max(mk_rss) / 2**20)
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(src)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---:" for _ in cols) + "|")
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    print("ratio = median over rounds of tli_s / cp_s (same round, interleaved).")
    os.sync()


if __name__ == "__main__":
    main()
