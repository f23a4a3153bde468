"""Continued pretraining of an upscaled model, on Ray Train or in a plain loop.

Three layers, from the inside out, all running the same per-step code:

- :class:`StepRunner` owns the model, AdamW, the warmup + cosine schedule and the data order, and
  takes one optimizer step at a time. It knows nothing about Ray; under ``torch.distributed`` it
  wraps the model in DDP or FSDP2.
- :func:`train_in_memory` is the plain loop over it for an in-memory model (Ray Tune trials,
  benchmarks, tests): no Ray, no files.
- :func:`train_loop_per_worker` is the Ray Train per-worker function (checkpoints, resume,
  reports), and :func:`run_train` checks the input, starts or joins Ray, runs it with
  ``TorchTrainer`` and writes ``<out>/model`` and ``<out>/metrics.jsonl``.

Data order: the training blocks are shuffled once per epoch with a generator seeded from
``(seed, epoch)``; micro-step ``p`` (counted over the whole run) takes rows
``[p * B * W, (p + 1) * B * W)`` of that order and worker ``r`` the ``r``-th slice of ``B`` rows.
So the data position is a function of the step alone, which makes resume exact.

Checkpoints hold safetensors and JSON only (never pickles): the model as an HF folder, AdamW's
state flattened into one safetensors file keyed by parameter name, the LR schedule and trainer
state as JSON, and each worker's RNG state as a tensor.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tli.config import TrainConfig
from tli.errors import TliError

if TYPE_CHECKING:
    import torch

# Checkpoint layout (one folder per checkpoint, named step_NNNNNN).
CKPT_MODEL = "model"  # HF folder (rank 0)
CKPT_OPTIM = "optimizer.safetensors"  # AdamW state tensors, "state/<param>/<key>" (rank 0)
CKPT_OPTIM_META = "optimizer.json"  # AdamW param groups (rank 0)
CKPT_STATE = "trainer_state.json"  # step, tokens, schedule, config (rank 0)
CKPT_METRICS = "metrics.jsonl"  # one line per step so far (rank 0)
CKPT_RNG = "rng/rank_{rank}.safetensors"  # each worker's RNG state (every rank)

METRICS_FILE = "metrics.jsonl"
TRAIN_PROVENANCE = "tli_train.json"
RAY_RUN_NAME = "ray"  # Ray Train run folder inside <out>.partial
# Ray starts task and actor processes at niceness 15 so that its own services stay responsive;
# a training worker is the job itself, and at 15 it yields the CPU to anything else on the node
# (SmolLM2 on 2 CPUs: 0.87x a plain loop at 15). Train workers run at 0, as torchrun's would.
WORKER_RUNTIME_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}

# Dense bf16 peak FLOP/s of known accelerators (vendor datasheets; no sparsity). Matched by
# substring of torch.cuda.get_device_name(), first match wins, so specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
)

# Weight files of an HF folder: never carried over from the input (the trained ones replace them).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
_WEIGHT_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


# ----------------------------------------------------------------------------- model helpers


def decoder_layers(model: Any) -> Sequence[Any]:
    """The decoder's list of transformer blocks (``model.model.layers`` for Llama-family)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(inner, "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TliError(f"cannot find the decoder layers of a {type(model).__name__}")
    return layers


def apply_freeze(model: Any, policy: str, new_layers: Sequence[int] | None) -> tuple[int, int]:
    """Set ``requires_grad`` by freeze policy; return (trainable, total) parameter counts.

    ``none`` trains everything. ``original`` trains only the decoder layers listed in
    ``new_layers`` (the injected ones, LLaMA Pro style); embeddings, norms, the LM head and every
    original layer stay frozen, so they come out bitwise unchanged.
    """
    if policy == "none":
        model.requires_grad_(True)
    elif policy == "original":
        layers = decoder_layers(model)
        if not new_layers:
            raise TliError(
                "freeze policy 'original' needs the injected layers (tli_plan.json lists none): "
                "use --freeze none"
            )
        bad = [i for i in new_layers if not 0 <= i < len(layers)]
        if bad:
            raise TliError(
                f"the plan's new layers {bad} are outside the model's {len(layers)} layers: "
                "the model does not match its tli_plan.json"
            )
        model.requires_grad_(False)
        for i in new_layers:
            layers[i].requires_grad_(True)
    else:
        raise TliError(f"unknown freeze policy {policy!r}: use none or original")
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():  # parameters() already skips tied duplicates
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def flops_per_token(model: Any, seq_len: int) -> float:
    """Model FLOPs per trained token, aware of which parameters are trained.

    Forward: 2 FLOPs per matmul weight (decoder layers and the LM head; the embedding is a
    lookup) plus attention's ``4 * d_attn * seq_len`` per layer (PaLM's convention, no causal
    discount). Backward: activation gradients (the same again, times two for attention) for the
    LM head and every layer from the lowest trainable one up, plus 2 FLOPs per trainable weight
    for weight gradients. With everything trained this is the usual ``6 N + 12 L d T``.
    Activation recomputation (gradient checkpointing) is not counted, as MFU conventionally
    does not.
    """
    layers = decoder_layers(model)
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", 1)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    attn = 4.0 * heads * head_dim * seq_len  # forward QK^T and AV, per layer per token

    def count(mod: Any, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in mod.parameters() if p.requires_grad or not trainable_only)

    head = model.get_output_embeddings()
    n_head = head.weight.numel() if head is not None else 0
    head_trainable = head is not None and head.weight.requires_grad
    emb = model.get_input_embeddings()
    emb_trainable = emb is not None and emb.weight.requires_grad
    per_layer = [count(layer) for layer in layers]
    trainable_layer = [count(layer, True) for layer in layers]
    fwd = 2.0 * (sum(per_layer) + n_head) + attn * len(layers)
    lowest = (
        0
        if emb_trainable
        else next((i for i, n in enumerate(trainable_layer) if n > 0), len(layers))
    )
    any_trainable = emb_trainable or head_trainable or lowest < len(layers)
    bwd_act = 0.0
    if any_trainable:
        bwd_act = 2.0 * (sum(per_layer[lowest:]) + n_head) + 2 * attn * (len(layers) - lowest)
    bwd_w = 2.0 * (sum(trainable_layer) + (n_head if head_trainable or emb_trainable else 0))
    return fwd + bwd_act + bwd_w


def peak_flops_of(device: Any, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device: the flag if given, else a known GPU's, else None."""
    if override_tflops is not None:
        return override_tflops * 1e12
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def bf16_autocast_ok(device: Any) -> bool:
    """Whether bf16 autocast pays on this device (CUDA with bf16; CPUs with AVX512-BF16/AMX)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)
    return False


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Schedule factor for optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    Warmup rises to 1 at the end of step ``warmup - 1``; the cosine then falls to
    ``min_lr_ratio`` at the last step.
    """
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup - 1)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_rows(
    position: int, n_blocks: int, global_batch: int, seed: int, cache: dict | None = None
) -> torch.Tensor:
    """Row indices of micro-step ``position`` (counted over the whole run) for all workers.

    Each epoch is a fresh permutation seeded by ``(seed, epoch)``; an epoch's incomplete last
    global batch is skipped so every worker always gets a full batch.
    """
    import torch

    per_epoch = n_blocks // global_batch
    if per_epoch < 1:
        raise TliError(
            f"{n_blocks} training blocks cannot fill one global batch of {global_batch} "
            "(batch size x workers): use more data, a shorter --seq-len or a smaller batch"
        )
    epoch, k = divmod(position, per_epoch)
    perm = None if cache is None else cache.get(epoch)
    if perm is None:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n_blocks, generator=g)  # [n_blocks]
        if cache is not None:
            cache.clear()  # one epoch at a time
            cache[epoch] = perm
    return perm[k * global_batch : (k + 1) * global_batch]  # [global_batch]


# ----------------------------------------------------------------------------- the step core


class StepRunner:
    """One optimizer step at a time: the training core shared by every way tli trains.

    Args:
        model: an HF causal LM (trained in place; moved to ``device``).
        blocks: int64 ``[n_blocks, seq_len]`` training blocks (all of them: each worker picks
            its own rows, see :func:`batch_rows`).
        cfg: the training config.
        new_layers: decoder-layer indices the ``original`` freeze policy trains.
        device: where to train; None = cuda if ``cfg.gpu`` else cpu.
        distributed: wrap the model for ``torch.distributed`` (DDP, or FSDP2 with ``cfg.fsdp``)
            when the process group has more than one rank.
        peak_flops: peak FLOP/s of one device, for MFU; None = no MFU.
        compile: run the model through ``torch.compile`` (GPU speed; same results up to
            floating-point reordering).
    """

    def __init__(
        self,
        model: Any,
        blocks: torch.Tensor,
        cfg: TrainConfig,
        *,
        new_layers: Sequence[int] | None = None,
        device: Any = None,
        distributed: bool = False,
        peak_flops: float | None = None,
        compile: bool = False,
    ) -> None:
        import torch
        import torch.distributed as dist

        if blocks.ndim != 2 or blocks.shape[1] != cfg.seq_len:
            raise TliError(f"training blocks must be [n, {cfg.seq_len}], got {tuple(blocks.shape)}")
        self.cfg = cfg
        self.blocks = blocks
        self.device = torch.device(device or ("cuda" if cfg.gpu else "cpu"))
        self.rank = dist.get_rank() if distributed and dist.is_initialized() else 0
        self.world = dist.get_world_size() if distributed and dist.is_initialized() else 1
        self.global_batch = cfg.batch_size * self.world
        # Checks the data fits one global batch before any work.
        batch_rows(0, blocks.shape[0], self.global_batch, cfg.seed)
        torch.manual_seed(cfg.seed + self.rank)  # dropout etc.; a resume restores the state
        self.trainable, self.total = apply_freeze(model, cfg.freeze, new_layers)
        self.flops_per_token = flops_per_token(model, cfg.seq_len)
        self.peak_flops = peak_flops
        self.autocast = cfg.bf16 and bf16_autocast_ok(self.device)
        model.to(self.device)
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False  # no KV cache in training
        if cfg.grad_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        self.raw = model
        self.kind = "single"
        self.model = model
        if self.world > 1:
            self.model = self._wrap(model)
        if compile:
            self.model = torch.compile(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]  # norms and biases: no weight decay
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.params = params
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
            fused=self.device.type == "cuda",
        )  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, cfg)
        )
        self.step = 0  # optimizer steps done
        self.tokens = 0  # tokens trained on, all workers
        self.elapsed = 0.0  # training seconds, summed over resumed runs
        self._perm_cache: dict[int, torch.Tensor] = {}
        self.placement: list[dict[str, Any]] = []  # where each worker ran (set by the Ray loop)

    def _wrap(self, model: Any) -> Any:
        import torch

        if self.cfg.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = None
            if self.autocast and self.device.type == "cuda":
                # Compute in bf16, reduce gradients in fp32: keeps fp32 master weights.
                mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            kw = {"mp_policy": mp} if mp is not None else {}
            for layer in decoder_layers(model):
                fully_shard(layer, **kw)
            fully_shard(model, **kw)
            self.kind = "fsdp"
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.kind = "ddp"
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    # -- one step -------------------------------------------------------------------------

    def rows(self, step: int, micro: int) -> torch.Tensor:
        """This worker's block indices for micro-step ``micro`` of optimizer step ``step``."""
        position = step * self.cfg.grad_accum + micro
        rows = batch_rows(
            position, self.blocks.shape[0], self.global_batch, self.cfg.seed, self._perm_cache
        )  # [B * W]
        b = self.cfg.batch_size
        return rows[self.rank * b : (self.rank + 1) * b]  # [B]

    def _autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_step(self) -> dict[str, Any]:
        """Take one optimizer step (``grad_accum`` micro-steps); return its metrics."""
        import torch
        import torch.distributed as dist

        cfg = self.cfg
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            ids = self.blocks[self.rows(self.step, micro)].to(self.device)  # [B, T]
            last = micro == cfg.grad_accum - 1
            sync: contextlib.AbstractContextManager = contextlib.nullcontext()
            if self.kind == "ddp" and not last:
                sync = self.model.no_sync()  # all-reduce only on the last micro-step
            elif self.kind == "fsdp":
                self.model.set_requires_gradient_sync(last)
            with sync:
                with self._autocast():
                    loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean_loss = loss_sum / cfg.grad_accum
        if self.world > 1:  # the logged loss is the mean over workers
            dist.all_reduce(mean_loss, op=dist.ReduceOp.SUM)
            mean_loss /= self.world
        loss_value = float(mean_loss)  # also waits for the device, so the timing is true
        dt = time.perf_counter() - t0
        step_tokens = self.global_batch * cfg.grad_accum * cfg.seq_len
        self.step += 1
        self.tokens += step_tokens
        self.elapsed += dt
        tps = step_tokens / dt
        mfu = None
        if self.peak_flops:
            mfu = self.flops_per_token * tps / (self.peak_flops * self.world)
        return {
            "step": self.step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": float(norm),
            "tokens": self.tokens,
            "tokens_per_s": tps,
            "mfu": mfu,
            "elapsed": self.elapsed,
            "wall_time": time.time(),  # end of this step; steady-state rates include loop overhead
        }

    def evaluate(self, blocks: torch.Tensor, batch_size: int = 8) -> float:
        """Mean next-token loss over ``blocks``, split evenly across workers (all must call)."""
        import torch
        import torch.distributed as dist

        from tli.eval.heldout import heldout_loss

        n = blocks.shape[0] // self.world  # equal shards: FSDP needs the same forward count
        if n == 0:
            raise TliError(f"{blocks.shape[0]} held-out blocks cannot be split over {self.world}")
        shard = blocks[self.rank * n : (self.rank + 1) * n]  # [n, T]
        out = heldout_loss(self.model, shard, batch_size=batch_size, bf16=self.autocast)
        tot = torch.tensor([out["loss"] * out["tokens"], out["tokens"]], dtype=torch.float64,
                           device=self.device)  # fmt: skip
        if self.world > 1:
            dist.all_reduce(tot, op=dist.ReduceOp.SUM)
        return float(tot[0] / tot[1])

    # -- state ----------------------------------------------------------------------------

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full model state on CPU (on rank 0; other ranks get {} under FSDP; all call)."""
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.model, options=opts)
        return {k: v.detach().cpu() for k, v in self.raw.state_dict().items()}

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """AdamW state as (tensors keyed ``state/<param>/<key>``, JSON-able param groups)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=self.kind == "fsdp")
        osd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        tensors: dict[str, torch.Tensor] = {}
        extra: dict[str, Any] = {}
        for name, st in osd.get("state", {}).items():
            for key, val in st.items():
                if hasattr(val, "detach"):
                    # A copy: on CPU .cpu() would alias the live state the optimizer updates.
                    tensors[f"state/{name}/{key}"] = val.detach().to("cpu", copy=True)
                else:
                    extra.setdefault(name, {})[key] = val
        meta = {"param_groups": osd.get("param_groups", []), "extra_state": extra}
        return tensors, meta

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
        """Restore what :meth:`optimizer_state` saved (every rank passes the full state)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        state: dict[str, dict[str, Any]] = {}
        for key, val in tensors.items():
            _, name, field = key.split("/", 2)
            state.setdefault(name, {})[field] = val
        for name, extra in meta.get("extra_state", {}).items():
            state.setdefault(name, {}).update(extra)
        groups = [dict(g) for g in meta["param_groups"]]
        for g in groups:
            for k in ("betas",):
                if isinstance(g.get(k), list):
                    g[k] = tuple(g[k])
        osd = {"state": state, "param_groups": groups}
        set_optimizer_state_dict(
            self.model, self.optimizer, osd, options=StateDictOptions(full_state_dict=True)
        )

    def trainer_state(self) -> dict[str, Any]:
        """Step, tokens, time, schedule and data position, as JSON."""
        per_epoch = self.blocks.shape[0] // self.global_batch
        position = self.step * self.cfg.grad_accum
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "world_size": self.world,
            "scheduler": {
                k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"
            },
            "data_position": {
                "micro_step": position,
                "epoch": position // per_epoch,
                "batch_in_epoch": position % per_epoch,
                "n_blocks": int(self.blocks.shape[0]),
            },
            "config": self.cfg.model_dump(mode="json"),
            "placement": self.placement,
        }

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        """Restore step, tokens, time and the schedule from :meth:`trainer_state`."""
        if state["world_size"] != self.world:
            raise TliError(
                f"the checkpoint was written by {state['world_size']} workers, this run has "
                f"{self.world}: resume with --workers {state['world_size']}"
            )
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.elapsed = float(state["elapsed"])
        sched = dict(state["scheduler"])
        sched["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
        self.scheduler.load_state_dict(sched)
        for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            g["lr"] = lr


def live_line(m: dict[str, Any], steps: int) -> str:
    """One progress line: step, loss, lr, tokens/s, MFU, ETA."""
    eta = (steps - m["step"]) * (m["elapsed"] / max(1, m["step"]))
    parts = [
        f"step {m['step']}/{steps}",
        f"loss {m['loss']:.4f}",
        f"lr {m['lr']:.2e}",
        f"{m['tokens_per_s']:,.0f} tok/s",
    ]
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    if m.get("val_loss") is not None:
        parts.append(f"val {m['val_loss']:.4f}")
    parts.append(f"ETA {_fmt_s(eta)}")
    return "  ".join(parts)


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _eval_due(step: int, cfg: TrainConfig) -> bool:
    return step == cfg.steps or (cfg.eval_every is not None and step % cfg.eval_every == 0)


def train_in_memory(
    model: Any,
    blocks: torch.Tensor,
    cfg: TrainConfig,
    *,
    report: Callable[[dict[str, Any]], None] | None = None,
    val_blocks: torch.Tensor | None = None,
    new_layers: Sequence[int] | None = None,
    device: Any = None,
    peak_flops: float | None = None,
    progress: bool = False,
    compile: bool = False,
) -> list[dict[str, Any]]:
    """Train an in-memory model for ``cfg.steps`` steps in this process (no Ray, no files).

    The same per-step code as :func:`train_loop_per_worker` with one worker: same data order,
    schedule and optimizer, so the results are identical for the same seed. Ray Tune trials
    call this with a model built by :func:`tli.inject.stage.inject_in_memory`.

    Args:
        model: an HF causal LM; trained in place.
        blocks: int64 ``[n_blocks, cfg.seq_len]`` training blocks.
        cfg: the training config (``workers``, checkpoints and ``gpu`` placement do not apply).
        report: called with each step's metrics dict (step, loss, lr, grad_norm, tokens,
            tokens_per_s, mfu, elapsed, and val_loss on evaluation steps).
        val_blocks: blocks for the held-out loss every ``cfg.eval_every`` steps and at the end.
        new_layers: decoder layers trained under the ``original`` freeze policy.
        device: where to train; None = cuda if ``cfg.gpu`` else cpu.
        peak_flops: peak FLOP/s of the device, for MFU.
        progress: print a live line per step on stderr.
        compile: ``torch.compile`` the model (see :class:`StepRunner`).

    Returns:
        Every step's metrics, in order.
    """
    runner = StepRunner(model, blocks, cfg, new_layers=new_layers, device=device,
                        peak_flops=peak_flops, compile=compile)  # fmt: skip
    history = []
    for _ in range(cfg.steps):
        m = runner.train_step()
        if val_blocks is not None and _eval_due(runner.step, cfg):
            m["val_loss"] = runner.evaluate(val_blocks)
        history.append(m)
        if report is not None:
            report(m)
        if progress:
            sys.stderr.write(live_line(m, cfg.steps) + "\n")
    return history


# ----------------------------------------------------------------------------- checkpoints


def _save_checkpoint(runner: StepRunner, folder: Path, history: list[dict[str, Any]]) -> None:
    """Write this worker's part of a checkpoint into ``folder`` (every rank must call)."""
    import torch
    from safetensors.torch import save_file

    sd = runner.model_state()  # collective under FSDP
    otensors, ometa = runner.optimizer_state()  # collective under FSDP
    rng = {"cpu": torch.get_rng_state()}
    if runner.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(runner.device)
    rng_path = folder / CKPT_RNG.format(rank=runner.rank)
    rng_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(rng, str(rng_path))
    if runner.rank != 0:
        return
    _save_hf(runner.raw, sd, folder / CKPT_MODEL, dtype=None)
    save_file(otensors, str(folder / CKPT_OPTIM))
    (folder / CKPT_OPTIM_META).write_text(json.dumps(ometa, indent=1) + "\n")
    (folder / CKPT_STATE).write_text(json.dumps(runner.trainer_state(), indent=1) + "\n")
    (folder / CKPT_METRICS).write_text("".join(json.dumps(m) + "\n" for m in history))


def _save_hf(model: Any, sd: dict[str, torch.Tensor], out: Path, dtype: Any) -> None:
    """Save ``sd`` as an HF folder with ``model``'s config (cast to ``dtype`` if given)."""
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    # Tied weights share storage in the state dict; save_pretrained drops the tied copy.
    config = model.config
    use_cache = getattr(config, "use_cache", None)
    if use_cache is not None:
        config.use_cache = True  # the saved model is for inference
    try:
        model.save_pretrained(out, state_dict=sd)
    finally:
        if use_cache is not None:
            config.use_cache = use_cache


def _load_checkpoint(runner: StepRunner, folder: Path) -> list[dict[str, Any]]:
    """Restore optimizer, schedule, counters and RNG from ``folder``; return the metrics so far."""
    import torch
    from safetensors.torch import load_file

    runner.load_trainer_state(json.loads((folder / CKPT_STATE).read_text()))
    runner.load_optimizer_state(
        load_file(str(folder / CKPT_OPTIM)), json.loads((folder / CKPT_OPTIM_META).read_text())
    )
    rng_path = folder / CKPT_RNG.format(rank=runner.rank)
    if rng_path.is_file():
        rng = load_file(str(rng_path))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and runner.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], runner.device)
    lines = (folder / CKPT_METRICS).read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


# ----------------------------------------------------------------------------- Ray worker


def _materialise(obj: Any) -> Any:
    import ray

    return ray.get(obj) if isinstance(obj, ray.ObjectRef) else obj


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train per-worker loop (``TorchTrainer(train_loop_per_worker, ...)``).

    Keys of ``config``:
        ``train``: a :class:`TrainConfig` as a dict. ``model_dir``: the HF folder to start from
        (every worker reads it, so on a cluster it must be on shared storage).
        ``build_model`` (instead of ``model_dir``; Ray Tune trials): a picklable callable
        returning the model to train, built in memory (see :func:`tli.tune.stage.build_trial_model`).
        ``train_blocks`` / ``val_blocks``: tensors or Ray object refs of them (``val_blocks``
        may be None). ``new_layers``: decoder layers trained under ``original``.
        Optional: ``threads`` (torch threads per worker), ``peak_flops``, ``compile``,
        ``report_every``
        (steps between metric-only reports; default 10), ``fail_at_step`` and ``fail_marker``
        (fault injection for tests and drills: the last worker raises once at that step).

    A checkpoint is reported every ``checkpoint_every`` steps and at the end (the final one
    carries the trained model); on (re)start the worker resumes from
    ``ray.train.get_checkpoint()`` when there is one.
    """
    import ray.train
    import torch

    from tli.base import load_causal_lm

    cfg = TrainConfig.model_validate(config["train"])
    _quiet_ray_train_reports()
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    ckpt = ray.train.get_checkpoint()
    report_every = int(config.get("report_every") or 10)
    with contextlib.ExitStack() as stack:
        ckpt_dir = Path(stack.enter_context(ckpt.as_directory())) if ckpt else None
        # --- hook for tli.tune.stage: a trial builds its upscaled model in memory from the shared
        # base (config["build_model"], a picklable no-argument callable) instead of a folder.
        build_model = config.get("build_model")
        if ckpt_dir is None and build_model is not None:
            model = build_model()
        else:
            source = ckpt_dir / CKPT_MODEL if ckpt_dir else Path(config["model_dir"])
            model = load_causal_lm(source)
        # --- end of the tli.tune.stage hook
        blocks = _materialise(config["train_blocks"])
        val = _materialise(config.get("val_blocks"))
        runner = StepRunner(
            model, blocks, cfg, new_layers=config.get("new_layers"), device=device,
            distributed=world > 1, peak_flops=config.get("peak_flops"),
            compile=bool(config.get("compile")),
        )  # fmt: skip
        history: list[dict[str, Any]] = []
        if ckpt_dir is not None:
            history = _load_checkpoint(runner, ckpt_dir)
            if rank == 0:
                print(f"resumed from {ckpt_dir.name} at step {runner.step}", flush=True)
    runner.placement = _placement(rank, world, device)
    if rank == 0 and runner.step == 0:
        print(
            f"training {runner.trainable:,} of {runner.total:,} parameters "
            f"({cfg.freeze=}) on {world} x {device.type} ({runner.kind}), "
            f"bf16 autocast {'on' if runner.autocast else 'off'}",
            flush=True,
        )
    while runner.step < cfg.steps:
        fail_at = config.get("fail_at_step")
        if fail_at == runner.step + 1 and rank == world - 1:
            marker = Path(config["fail_marker"])
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text("failed once\n")
                raise RuntimeError(f"injected failure at step {fail_at} (fault drill)")
        m = runner.train_step()
        if val is not None and _eval_due(runner.step, cfg):
            m["val_loss"] = runner.evaluate(val)
        history.append(m)
        if rank == 0:
            print(live_line(m, cfg.steps), flush=True)
        step = runner.step
        ckpt_due = step == cfg.steps or (
            cfg.checkpoint_every is not None and step % cfg.checkpoint_every == 0
        )
        metrics = {k: v for k, v in m.items() if v is not None}
        if ckpt_due:
            with tempfile.TemporaryDirectory(prefix="tli-ckpt-") as tmp:
                _save_checkpoint(runner, Path(tmp), history)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"step_{step:06d}",
                )
        elif step % report_every == 0:
            ray.train.report(metrics)


def _quiet_ray_train_reports() -> None:
    """Drop Ray Train's INFO line per ``report()`` (it would drown the live step line)."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: keep its logging as it is
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _placement(rank: int, world: int, device: Any) -> list[dict[str, Any]]:
    """Every worker's rank, Ray node and device, gathered on all ranks (a collective)."""
    import socket

    import ray
    import torch.distributed as dist

    me = {
        "rank": rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "device": str(device),
        "niceness": os.nice(0),
    }
    if world == 1 or not dist.is_initialized():
        return [me]
    every: list[Any] = [None] * world
    dist.all_gather_object(every, me)
    return every


# ----------------------------------------------------------------------------- run_train


def _check_model(model_dir: Path, cfg: TrainConfig) -> tuple[dict[str, Any], Any]:
    """config.json and plan of the input, with one-line errors (before anything starts)."""
    from tli.inject.plan import read_plan
    from tli.inject.stage import read_config

    config = read_config(model_dir)
    if not any(model_dir.glob("*.safetensors")):
        raise TliError(f"{model_dir} has no *.safetensors weights: point --model at an HF folder")
    try:
        plan = read_plan(model_dir)
    except (ValueError, KeyError) as e:
        raise TliError(
            f"{model_dir}/tli_plan.json is unreadable ({e}): re-run tli inject"
        ) from None
    if cfg.freeze == "original":
        if plan is None:
            raise TliError(
                f"{model_dir} has no tli_plan.json, so --freeze original cannot know which "
                "layers are new: train an injected model (tli inject) or use --freeze none"
            )
        if not plan.new_layers:
            raise TliError(f"the plan in {model_dir} injects no new layers: use --freeze none")
        n = config.get("num_hidden_layers")
        if isinstance(n, int) and max(plan.new_layers) >= n:
            raise TliError(
                f"tli_plan.json names layer {max(plan.new_layers)} but config.json has {n} "
                "layers: the folder's plan does not match its model"
            )
    ctx = config.get("max_position_embeddings")
    if isinstance(ctx, int) and cfg.seq_len > ctx:
        raise TliError(
            f"--seq-len {cfg.seq_len} is longer than the model's context ({ctx} tokens): "
            f"use --seq-len {ctx} or less"
        )
    return config, plan


def _latest_checkpoint(partial: Path) -> Path | None:
    """The newest complete checkpoint folder of an interrupted run, if any."""
    run = partial / RAY_RUN_NAME
    done = [d for d in run.glob("step_*") if (d / CKPT_STATE).is_file()] if run.is_dir() else []
    return max(done, key=lambda d: d.name) if done else None


def _local_ray_dir() -> str:
    # Unix socket paths must stay under 107 bytes: a short folder of our own, never /tmp/ray
    # (another Ray on the same machine may own it).
    base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    return os.path.join(base, f"tli_ray_{os.getpid()}")


@contextlib.contextmanager
def ray_session(address: str | None, *, num_cpus: int | None = None):
    """Join Ray: the running one in this process, ``address`` / ``RAY_ADDRESS``, or a new local one.

    Yields True when it started a local Ray (and shuts it down on exit).
    """
    # Must be in the environment before the Train controller starts: Ray Train V2 polls its
    # workers at this interval, and each ray.train.report() waits for a poll (default 2 s).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    # Ray Train's print patch sends each worker print() to its log as well: lines show twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray

    if ray.is_initialized():
        yield False
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        try:
            yield False
        finally:
            ray.shutdown()
        return
    from tli.pipeline.head import free_port

    tmp = _local_ray_dir()
    # The dashboard hosts the State API that Ray Train's placement-group cleaner polls; a free
    # port of our own so that another Ray on this machine (on 8265) is no obstacle.
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_port=free_port(),
             _temp_dir=tmp, log_to_driver=True)  # fmt: skip
    try:
        yield True
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def run_train(
    model_dir: str | Path,
    out_dir: str | Path,
    data: str | Path | list[str | Path],
    cfg: TrainConfig,
    *,
    ray_address: str | None = None,
    resume: bool = False,
    force: bool = False,
    threads: int | None = None,
    cpus_per_worker: float | None = None,
    peak_tflops: float | None = None,
    max_failures: int = 1,
    report_every: int = 10,
    keep_checkpoints: bool = False,
    fail_at_step: int | None = None,
    compile: bool = False,
) -> Path:
    """Continue pretraining ``model_dir`` on ``data`` with Ray Train; write ``out_dir``.

    Work happens in ``<out_dir>.partial`` (Ray Train's checkpoints live there, under ``ray/``);
    when training ends it is renamed to ``out_dir`` holding ``model/`` (an HF folder with the
    input's tokenizer, ``tli_plan.json`` and provenance, plus ``tli_train.json``),
    ``metrics.jsonl`` and ``tli_train.json``.

    Args:
        model_dir: HF folder to train (usually from ``tli inject``).
        out_dir: output folder; must not exist unless ``force``.
        data: a corpus folder from ``tli data build`` or text/jsonl/parquet file(s).
        cfg: the ``train`` section of the run config.
        ray_address: an existing Ray cluster (else ``RAY_ADDRESS``, else a local Ray started
            here; a Ray already initialised in this process is used as is).
        resume: continue an interrupted run from its latest checkpoint in
            ``<out_dir>.partial`` (starts fresh when there is none).
        force: replace an existing ``out_dir`` and discard an interrupted run.
        threads: torch threads per worker (default: its CPUs).
        cpus_per_worker: CPUs each worker reserves (default: a local Ray's CPUs split over the
            workers; 1 on a cluster).
        peak_tflops: peak bf16 TFLOP/s of one device for MFU (default: known GPUs detected).
        max_failures: worker failures Ray Train recovers from (restarting from the latest
            checkpoint).
        report_every: steps between metric reports to Ray Train (each costs a barrier).
        keep_checkpoints: keep Ray Train's checkpoints under ``<out_dir>/ray``.
        fail_at_step: fault drill: the last worker fails once when reaching this step.
        compile: ``torch.compile`` the model in each worker (for GPUs).

    Returns:
        ``out_dir``.

    Raises:
        TliError: bad input, found before Ray starts or anything is written.
    """
    model_dir = Path(model_dir)
    out = Path(out_dir)
    paths = [Path(p) for p in data] if isinstance(data, list | tuple) else Path(data)
    # ---- every input check before Ray starts or anything is written
    config, plan = _check_model(model_dir, cfg)
    if out.resolve() == model_dir.resolve():
        raise TliError("--out is the input model folder: choose another folder")
    partial = out.with_name(out.name + ".partial")
    if out.exists() and not force:
        raise TliError(f"output dir {out} exists: choose another --out or pass --force")
    # An OUT.partial without a complete checkpoint holds nothing worth keeping: start over.
    latest = _latest_checkpoint(partial) if partial.exists() else None
    if latest is not None and not resume:
        if not force:
            raise TliError(
                f"{partial} holds an interrupted run (last checkpoint {latest.name}): pass "
                "--resume to continue it or --force to start over"
            )
        latest = None
    if latest is not None:
        saved = json.loads((latest / CKPT_STATE).read_text())["config"]
        now = cfg.model_dump(mode="json")
        diff = sorted(k for k in now if saved.get(k) != now[k])
        if diff:
            raise TliError(
                f"--resume with a different config than the interrupted run ({', '.join(diff)}): "
                "use the same settings or --force to start over"
            )
    using_ray = _ray_initialized()
    local = not using_ray and not (ray_address or os.environ.get("RAY_ADDRESS"))
    if local:
        ncpu = os.cpu_count() or 1
        if cfg.workers > ncpu:
            raise TliError(
                f"--workers {cfg.workers} is more than this machine's {ncpu} CPUs: "
                f"use --workers {ncpu} or less, or join a cluster with --ray-address"
            )
        cpw = cpus_per_worker if cpus_per_worker is not None else max(1, ncpu // cfg.workers)
        if cfg.workers * cpw > ncpu:
            raise TliError(
                f"{cfg.workers} workers x {cpw} CPUs is more than this machine's {ncpu} CPUs"
            )
        if cfg.gpu:
            import torch

            if torch.cuda.device_count() < cfg.workers:
                raise TliError(
                    f"--gpu with {cfg.workers} workers needs {cfg.workers} GPUs, "
                    f"this machine has {torch.cuda.device_count()}"
                )
    else:
        cpw = cpus_per_worker if cpus_per_worker is not None else 1
    if threads is not None and threads < 1:
        raise TliError(f"--threads must be at least 1, got {threads}")
    if report_every < 1:
        raise TliError(f"report_every must be at least 1, got {report_every}")

    from tli.data.corpus import load_blocks

    train_blocks = load_blocks(paths, model_dir, cfg.seq_len, "train")  # [n, T]
    global_batch = cfg.batch_size * cfg.workers
    if train_blocks.shape[0] < global_batch:
        raise TliError(
            f"the training split has {train_blocks.shape[0]} blocks of {cfg.seq_len} tokens, "
            f"fewer than one global batch ({cfg.batch_size} x {cfg.workers} workers): "
            "use more data, a shorter --seq-len, a smaller --batch-size or fewer --workers"
        )
    val_blocks = _validation_blocks(paths, model_dir, cfg)

    # ---- Ray starts here
    if partial.exists() and latest is None:
        shutil.rmtree(partial)  # nothing to resume from, or --force: start over
    try:
        partial.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TliError(f"cannot write to {partial.parent}: {e.strerror}") from None
    import ray
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    t_start = time.perf_counter()
    with ray_session(ray_address, num_cpus=os.cpu_count() if local else None):
        t_ray = time.perf_counter() - t_start
        if not local:
            avail = ray.cluster_resources().get("CPU", 0)
            if cfg.workers * cpw > avail:
                raise TliError(
                    f"{cfg.workers} workers x {cpw} CPUs is more than the cluster's {avail:g} CPUs"
                )
        loop_config = {
            "train": cfg.model_dump(mode="json"),
            "model_dir": str(model_dir.resolve()),
            "train_blocks": ray.put(train_blocks),
            "val_blocks": ray.put(val_blocks) if val_blocks is not None else None,
            "new_layers": list(plan.new_layers) if plan is not None else None,
            "threads": threads or max(1, int(cpw)),
            "peak_flops": peak_tflops * 1e12 if peak_tflops else None,
            "report_every": report_every,
            "compile": compile,
            "fail_at_step": fail_at_step,
            "fail_marker": str((partial / f".fail_once_step{fail_at_step}").resolve()),
        }
        resources = {"CPU": cpw}
        if cfg.gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if cfg.gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=cfg.workers, use_gpu=cfg.gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=RAY_RUN_NAME,
                storage_path=str(partial.resolve()),
                failure_config=FailureConfig(max_failures=max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                worker_runtime_env=WORKER_RUNTIME_ENV,
                # Ray Train's own INFO lines (one per report) would drown the live step line.
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        result = trainer.fit()
    wall = time.perf_counter() - t_start
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without a final checkpoint")
    final = Path(result.checkpoint.path)
    history = [json.loads(x) for x in (final / CKPT_METRICS).read_text().splitlines() if x.strip()]
    _finish(model_dir, partial, final, history, cfg, config, plan,
            timing={"wall_s": wall, "ray_init_s": t_ray}, keep_checkpoints=keep_checkpoints,
            data=paths)  # fmt: skip
    from tli.inject.stage import swap_in

    swap_in(partial, out)  # --force: the old folder is replaced only now
    return out


def _ray_initialized() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized()


def _validation_blocks(paths: Any, model_dir: Path, cfg: TrainConfig) -> torch.Tensor | None:
    """Up to ``heldout_blocks`` validation blocks, split evenly over the workers; None if none."""
    from tli.data.corpus import load_blocks

    try:
        val = load_blocks(paths, model_dir, cfg.seq_len, "validation")
    except TliError as e:
        if "fewer than one block" in str(e):
            print(f"note: no held-out loss during training ({e})", file=sys.stderr)
            return None
        raise
    n = min(cfg.heldout_blocks, val.shape[0]) // cfg.workers * cfg.workers
    if n == 0:
        print(f"note: no held-out loss: {val.shape[0]} validation blocks for {cfg.workers} "
              "workers", file=sys.stderr)  # fmt: skip
        return None
    return val[:n].clone()


def _finish(
    model_dir: Path,
    partial: Path,
    final: Path,
    history: list[dict[str, Any]],
    cfg: TrainConfig,
    config: dict[str, Any],
    plan: Any,
    *,
    timing: dict[str, float],
    keep_checkpoints: bool,
    data: Any,
) -> None:
    """Lay out ``partial`` as the finished output from the final checkpoint."""
    import torch

    from tli.inject.stage import _fingerprint, package_versions

    model_out = partial / "model"
    if model_out.exists():
        shutil.rmtree(model_out)
    src = final / CKPT_MODEL
    # Checkpoints keep fp32 master weights (exact resume); the output keeps the input's dtype.
    in_dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    dtype = getattr(torch, in_dtype, None)
    if not isinstance(dtype, torch.dtype) or dtype == torch.float32:
        shutil.copytree(src, model_out)
    else:
        from tli.base import load_causal_lm

        m = load_causal_lm(src)
        m.config.dtype = dtype
        _save_hf(m, m.state_dict(), model_out, dtype=dtype)
    # Carry along the input's tokenizer, plan, provenance and any other non-weight files.
    for f in sorted(model_dir.iterdir()):
        if not f.is_file() or f.suffix in _WEIGHT_SUFFIXES or f.name in _WEIGHT_NAMES:
            continue
        if not (model_out / f.name).exists():
            shutil.copyfile(f, model_out / f.name)
    (partial / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in history))
    placement = json.loads((final / CKPT_STATE).read_text()).get("placement", [])
    last = history[-1] if history else {}
    vals = [m["val_loss"] for m in history if m.get("val_loss") is not None]
    prov = {
        "stage": "train",
        "config": cfg.model_dump(mode="json"),
        "input": {"name": model_dir.name, "files": _fingerprint(model_dir)},
        "data": [str(p) for p in data] if isinstance(data, list) else str(data),
        "new_layers": list(plan.new_layers) if plan is not None else None,
        "result": {
            "steps": last.get("step"),
            "tokens": last.get("tokens"),
            "final_loss": last.get("loss"),
            "final_val_loss": vals[-1] if vals else None,
            "train_seconds": last.get("elapsed"),
        },
        "workers": placement,
        "timing": timing,
        "versions": package_versions("torch", "ray", "transformers", "safetensors"),
    }
    text = json.dumps(prov, indent=2) + "\n"
    (partial / TRAIN_PROVENANCE).write_text(text)
    (model_out / TRAIN_PROVENANCE).write_text(text)
    for f in partial.glob(".fail_once_step*"):
        f.unlink()
    if not keep_checkpoints:
        shutil.rmtree(partial / RAY_RUN_NAME, ignore_errors=True)
