"""CPU: what training holds in memory, and what streaming costs, measured with `tli train`.

Three measurements, each run of ``tli train`` (``run_train``, real Ray Train on a private local
Ray) in a fresh subprocess, so that each process's peak RSS is its own:

- ``corpus``: peak RSS of the driver and of each Train worker against the corpus size: the demo
  corpus (wiki + Shakespeare) 1x, 10x and 100x by repetition, ``train.feed: memory`` against
  ``stream``. The repeated corpus is a corpus folder whose train split is N shards, hard links
  of the demo's ``train.jsonl`` (one token cache entry serves them all). The in-memory path
  reads one ``train.jsonl`` of N copies; its token cache entry is the demo's stream repeated N
  times (what tokenising the repeated file gives: every document is tokenised alone), so no
  run tokenises. A small random Llama (8 -> 10 layers, hidden 256) keeps the model's share small.
- ``fsdp``: peak RSS per worker for 1, 2 and 4 CPU workers (gloo) on a ~1.2 GB fp32 model (a
  random Llama: hidden 1024, 16 layers, vocab 49152, injected to 18 layers; the 2 injected
  layers trained), FSDP2 with sharded loading against every worker loading the whole model.
  The files hold bf16, as published checkpoints do (``--store float32`` for fp32 files);
  training keeps fp32 weights. Each worker's resident memory before the model, its peak
  through loading and sharding, and its peak over the run come from ``tli_train.json``.
- ``throughput``: steady-state tokens/s on the demo (SmolLM2 30 -> 36, injected layers, bf16,
  the demo corpus), ``memory`` and ``stream`` interleaved (memory, stream, memory, stream, ...)
  so that load from others on the machine hits both alike.

Usage::

    python benchmarks/bench_train_scale.py corpus [--sizes 1,10,100] [--feeds memory,stream]
    python benchmarks/bench_train_scale.py fsdp [--workers 1,2,4] [--store bfloat16|float32]
    python benchmarks/bench_train_scale.py throughput [--rounds 2] [--steps 20]
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TLI_NO_PROGRESS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
GIB = 1024**3


# ----------------------------------------------------------------------------- inputs


def llama(work: Path, name: str, hidden: int, layers: int, inter: int, heads: int, kv: int,
          dtype: str = "float32"):  # fmt: skip
    """A random Llama with SmolLM2's tokenizer, saved once as an HF folder in ``dtype``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tli.base import import_base

    out = work / (name if dtype == "float32" else f"{name}-{dtype}")
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)  # fmt: skip
    LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(out)
    real = import_base()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(real / f, out / f)
    return out


def injected(base: Path, interval: int) -> Path:
    from tli.config import InjectConfig, Runtime
    from tli.inject.stage import run_inject

    out = base.with_name(base.name + f"-k{interval}")
    if not out.exists():
        run_inject(base, out, InjectConfig(interval=interval), runtime=Runtime(progress=False))
    return out


def demo_corpus(work: Path, tokenizer: Path) -> Path:
    from tli.config import DataConfig
    from tli.data.stage import run_data_build

    out = work / "corpus-1x"
    if not out.exists():
        run_data_build(DataConfig(), out, tokenizer)
    return out


def repeated(work: Path, one: Path, n: int, feed: str, tokenizer: Path) -> Path:
    """The demo corpus n times: n shards (stream) or one n-fold train.jsonl (memory)."""
    out = work / f"corpus-{n}x-{feed}"
    if out.exists():
        return out
    out.mkdir()
    for f in ("validation.jsonl", "heldout.jsonl", "manifest.json"):
        os.link(one / f, out / f)
    if feed == "stream":
        for i in range(n):
            os.link(one / "train.jsonl", out / f"train-{i:05d}.jsonl")
        return out
    with open(out / "train.jsonl", "wb") as dst:
        for _ in range(n):
            with open(one / "train.jsonl", "rb") as src:
                shutil.copyfileobj(src, dst)
    _prefill_cache(one, out, n, tokenizer)
    return out


def _prefill_cache(one: Path, out: Path, n: int, tokenizer: Path) -> None:
    """The n-fold train.jsonl's token cache entry: the demo's stream n times, written in one
    pass (tokenising the repeated file gives exactly this)."""
    import numpy as np

    from tli.data.blocks import cache_dir, tokenizer_fingerprint
    from tli.data.stream import TOKENS_FORMAT, CacheWriter, split_files, token_index

    src = token_index(one, tokenizer, "train")
    f = split_files(out, "train")[0]
    fp = tokenizer_fingerprint(tokenizer)
    path = cache_dir() / f"{f.sha256[:20]}-{fp[:20]}.safetensors"
    if path.is_file():
        return
    w = CacheWriter(path, {"format": TOKENS_FORMAT, "data_sha256": f.sha256, "tokenizer": fp})
    tokens = np.ascontiguousarray(src.read(0, src.n_tokens))
    for _ in range(n):
        w.append(tokens)
    w.close()


# ----------------------------------------------------------------------------- one run


def one_run(spec: dict) -> dict:
    """Run ``tli train`` once, in this process, and report its memory and rates."""
    import ray

    from tli.config import Runtime, TrainConfig
    from tli.train.stage import run_train
    from tli.train.step import peak_rss

    tmp = tempfile.mkdtemp(prefix="ray_bts_", dir="/tmp")
    ray.init(num_cpus=spec["cpus"], include_dashboard=False, _temp_dir=tmp)
    try:
        cfg = TrainConfig(**spec["train"])
        rt = Runtime(**spec["runtime"])
        out = Path(spec["out"])
        t0 = time.time()
        run_train(spec["model"], out, spec["data"], cfg, force=True, runtime=rt)
        wall = time.time() - t0
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    prov = json.loads((out / "tli_train.json").read_text())
    skip = min(spec.get("skip", 1), len(hist) - 1)
    span = hist[-1]["wall_time"] - hist[skip - 1]["wall_time"]
    inside = hist[-1]["elapsed"] - hist[skip - 1]["elapsed"]
    tokens = hist[-1]["tokens"] - hist[skip - 1]["tokens"]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "driver_peak_rss": peak_rss(),
        "worker_peak_rss": [w.get("peak_rss_bytes") for w in prov["workers"]],
        "worker_memory": [
            {k: v for k, v in w.items() if k.endswith("_bytes")} for w in prov["workers"]
        ],  # fmt: skip
        "tokens_per_s": tokens / span if span > 0 else None,
        "outside_step_fraction": 1.0 - inside / span if span > 0 else None,
        # Time the steps spent waiting for their blocks (the feed), as a share of the same span.
        "data_wait_fraction": sum(m.get("data_s", 0.0) for m in hist[skip:]) / span
        if span > 0
        else None,
        "wall_s": wall,
        "final_loss": hist[-1]["loss"],
    }


def _spec(work: Path, model: Path, data: Path, skip: int, runtime: dict, **train) -> dict:
    """One run's description (JSON: it crosses into the subprocess)."""
    return {"cpus": 2, "model": str(model), "data": str(data), "skip": skip,
            "out": str(work / "out"), "train": train, "runtime": runtime}  # fmt: skip


def run_isolated(spec: dict) -> dict:
    """:func:`one_run` in a fresh Python process (its peak RSS is its own).

    Started once more when Ray lost a start-up race on a loaded machine (as ``tli``'s own local
    head is): the run had not begun, so nothing it measures is affected.
    """
    from tli.pipeline.head import lost_start_race

    for attempt in range(2):
        proc = subprocess.run(
            [sys.executable, __file__, "_one", json.dumps(spec)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode == 0 and lines:
            return json.loads(lines[-1][len("RESULT ") :])
        log = proc.stdout + proc.stderr
        if attempt == 0 and lost_start_race(log):
            print("Ray lost a start-up race; starting the run once more", flush=True)
            continue
        tail = "\n".join(log.splitlines()[-15:])
        raise RuntimeError(f"run failed ({proc.returncode}):\n{tail}")
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- measurements


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def _gib(x: float | None) -> str:
    return f"{x / GIB:.2f}" if x else "n/a"


def bench_corpus(work: Path, args) -> list[dict]:
    from tli.base import import_base

    small = injected(llama(work, "small", 256, 8, 768, 4, 2), 4)
    one = demo_corpus(work, import_base())
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        for feed in args.feeds.split(","):
            data = repeated(work, one, n, feed, small) if n > 1 else one
            rt = {"threads": 2, "cpus_per_worker": 2, "report_every": 5}
            spec = _spec(work, small, data, 2, rt, steps=args.steps, seq_len=256, batch_size=4,
                         feed=feed, validation={"blocks": 8}, warmup=2)  # fmt: skip
            print(f"corpus {n}x, feed {feed} ({_load()})", flush=True)
            r = run_isolated(spec)
            rows.append({"size": n, "feed": feed, **r})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| corpus | train tokens | feed | driver peak RSS (GiB) | worker peak RSS (GiB) |")
    print("|---|---|---|---|---|")
    tokens = json.loads((one / "manifest.json").read_text())["splits"]["train"]["tokens"]
    for r in rows:
        print(f"| {r['size']}x | {r['size'] * tokens / 1e6:,.1f}M | {r['feed']} | "
              f"{_gib(r['driver_peak_rss'])} | {_gib(r['worker_peak_rss'][0])} |")  # fmt: skip
    return rows


def bench_fsdp(work: Path, args) -> list[dict]:
    from tli.modelfolder import ModelFolder

    big = injected(llama(work, "big", 1024, 16, 4096, 16, 4, dtype=args.store), 8)
    one = demo_corpus(work, big)
    folder = ModelFolder.open(big)
    fp32 = folder.parameters * 4
    print(f"model: {folder.parameters / 1e6:,.0f}M parameters, {fp32 / GIB:.2f} GiB in fp32, "
          f"{folder.num_layers} layers, stored in {args.store}", flush=True)  # fmt: skip
    rows = []
    for w in [int(x) for x in args.workers.split(",")]:
        for sharded in [True, False] if w > 1 else [False]:
            rt = {"threads": 1, "cpus_per_worker": 2 / w, "report_every": 1,
                  "sharded_load": sharded}  # fmt: skip
            spec = _spec(work, big, one, 1, rt, steps=2, seq_len=64, batch_size=1, workers=w,
                         fsdp=w > 1, warmup=1, validation={"blocks": 4})  # fmt: skip
            how = "one worker" if w == 1 else ("sharded load" if sharded else "full load")
            print(f"{w} worker(s), {how} ({_load()})", flush=True)
            rows.append({"workers": w, "load": how, "params_fp32": fp32, **run_isolated(spec)})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| workers | load | before the model | peak through loading | peak | "
          "peak - before, x fp32 params | driver peak |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        # The rank with the highest peak; every figure in GiB but the ratio.
        m = max(r["worker_memory"], key=lambda x: x["peak_rss_bytes"])
        grown = m["peak_rss_bytes"] - m["rss_before_model_bytes"]
        print(f"| {r['workers']} | {r['load']} | {_gib(m['rss_before_model_bytes'])} | "
              f"{_gib(m['peak_rss_load_bytes'])} | {_gib(m['peak_rss_bytes'])} | "
              f"{grown / fp32:.2f} | {_gib(r['driver_peak_rss'])} |")  # fmt: skip
    return rows


def bench_throughput(work: Path, args) -> list[dict]:
    from tli.base import import_base

    base = import_base()
    model = injected(base, 5)
    one = demo_corpus(work, base)
    rows = []
    for r in range(args.rounds):
        for feed in ("memory", "stream"):
            rt = {"threads": 2, "cpus_per_worker": 2, "report_every": 10}
            train = {"steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch}
            spec = _spec(work, model, one, args.skip, rt, **train, feed=feed,
                         validation={"blocks": 8}, warmup=2)  # fmt: skip
            print(f"round {r + 1}, feed {feed} ({_load()})", flush=True)
            rows.append({"round": r + 1, "feed": feed, **run_isolated(spec)})
            print(json.dumps(rows[-1]), flush=True)
    med = {f: statistics.median(x["tokens_per_s"] for x in rows if x["feed"] == f)
           for f in ("memory", "stream")}  # fmt: skip
    out = {f: statistics.median(x["outside_step_fraction"] for x in rows if x["feed"] == f)
           for f in ("memory", "stream")}  # fmt: skip
    wait = {f: statistics.median(x["data_wait_fraction"] or 0.0 for x in rows if x["feed"] == f)
            for f in ("memory", "stream")}  # fmt: skip
    print("\n| feed | steady-state tokens/s (median) | ratio to memory | time outside the step "
          "| time waiting for data |")  # fmt: skip
    print("|---|---|---|---|---|")
    for f in ("memory", "stream"):
        print(f"| {f} | {med[f]:,.0f} | {med[f] / med['memory']:.3f} | {100 * out[f]:.2f}% | "
              f"{100 * wait[f]:.2f}% |")  # fmt: skip
    ratios = [s["tokens_per_s"] / m["tokens_per_s"] for m, s in
              zip(rows[0::2], rows[1::2], strict=True)]  # fmt: skip
    print(f"per-round ratios stream / memory: {', '.join(f'{x:.3f}' for x in ratios)}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["corpus", "fsdp", "throughput", "_one"])
    ap.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="1,10,100")
    ap.add_argument("--feeds", default="memory,stream")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument(
        "--store",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="fsdp: the dtype the model's files hold (published checkpoints: bf16)",
    )
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--work", help="keep inputs here between runs (default: a temp folder)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.what == "_one":
        print("RESULT " + json.dumps(one_run(json.loads(args.spec))), flush=True)
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tli-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"start: {_load()}", flush=True)
    rows = {"corpus": bench_corpus, "fsdp": bench_fsdp, "throughput": bench_throughput}[args.what](
        work, args
    )
    print(f"end: {_load()}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"what": args.what, "rows": rows}, indent=2) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
