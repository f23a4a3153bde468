"""The training core: one optimizer step at a time, the same code wherever tli trains.

- :class:`StepRunner` owns the model, AdamW, the warmup + cosine schedule and the data order,
  and takes one optimizer step at a time. It knows nothing about Ray; under
  ``torch.distributed`` it wraps the model in DDP or FSDP2.
- :func:`train_in_memory` is the plain loop over it for an in-memory model (benchmarks, tests):
  no Ray, no files. The Ray Train worker (:mod:`tli.train.worker`) runs the same steps.

Data order (:class:`DataOrder`): the training blocks are shuffled once per epoch with a
generator seeded from ``(seed, epoch)``; optimizer step ``s`` takes the ``G = B * W * A`` rows
``[k * G, (k + 1) * G)`` of its epoch's order (``k`` = the step within the epoch; ``B`` batch
size, ``W`` workers, ``A`` micro-steps), and micro-step ``m`` of worker ``r`` the slice of ``B``
rows at ``(m * W + r) * B``. So the data position is a function of the step alone (resume is
exact), and a step trains on the same rows however they are split over workers and micro-steps
(a run resumed with other workers but the same ``G`` continues on the same data). With one
micro-step per step (every preset) this is the order tli has always used. The in-memory path
(:class:`MemoryBatches`) and the streamed one (:mod:`tli.data.feed`) both follow it.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from tli.config import TrainConfig
from tli.errors import TliError

if TYPE_CHECKING:
    import torch

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
            "(batch size x workers x grad accum): use more data, a shorter --seq-len or a "
            "smaller batch"
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


@dataclass(frozen=True)
class DataOrder:
    """Which blocks every micro-batch of a run takes (see the module docstring).

    A pure value: the in-memory batches and the streamed feed's read tasks compute the same
    rows from it, in any process.
    """

    n_blocks: int
    batch_size: int
    workers: int
    grad_accum: int
    seed: int

    @property
    def step_batch(self) -> int:
        """Blocks per optimizer step, all workers and micro-steps together."""
        return self.batch_size * self.workers * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.n_blocks // self.step_batch

    def check(self) -> None:
        """Refuse data that cannot fill one optimizer step."""
        batch_rows(0, self.n_blocks, self.step_batch, self.seed)

    def rows(self, step: int, micro: int, rank: int, cache: dict | None = None) -> torch.Tensor:
        """Block indices of micro-step ``micro`` of optimizer step ``step`` for worker ``rank``."""
        rows = batch_rows(step, self.n_blocks, self.step_batch, self.seed, cache)  # [G]
        at = (micro * self.workers + rank) * self.batch_size
        return rows[at : at + self.batch_size]  # [B]

    def position(self, step: int) -> dict[str, int]:
        """Where the data stands before optimizer step ``step`` (JSON, for checkpoints)."""
        return {
            "step": step,
            "epoch": step // self.steps_per_epoch,
            "step_in_epoch": step % self.steps_per_epoch,
            "n_blocks": self.n_blocks,
            "step_batch": self.step_batch,
        }


class Batches(Protocol):
    """Where a worker's micro-batches come from: in memory or streamed (:mod:`tli.data.feed`)."""

    n_blocks: int

    def bind(self, order: DataOrder, rank: int) -> None:
        """Fix the order and this worker's rank (called once by :class:`StepRunner`)."""
        ...

    def get(self, step: int, micro: int) -> torch.Tensor:
        """int64 ``[B, T]``: this worker's blocks for micro-step ``micro`` of step ``step``."""
        ...


class MemoryBatches:
    """Every training block in memory; a micro-batch is picked by index (tests, benchmarks, and
    ``train.feed: memory``)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        if blocks.ndim != 2:
            raise TliError(f"training blocks must be [n, seq_len], got {tuple(blocks.shape)}")
        self.blocks = blocks
        self.n_blocks = int(blocks.shape[0])
        self.seq_len = int(blocks.shape[1])
        self._order: DataOrder | None = None
        self._rank = 0
        self._cache: dict[int, torch.Tensor] = {}

    def bind(self, order: DataOrder, rank: int) -> None:
        self._order, self._rank = order, rank

    def get(self, step: int, micro: int) -> torch.Tensor:
        assert self._order is not None, "bind() first"
        return self.blocks[self._order.rows(step, micro, self._rank, self._cache)]  # [B, T]


def is_moe(config: Any) -> bool:
    """Whether an HF config is a mixture of experts (Mixtral, Qwen-MoE, ...)."""
    return any(getattr(config, k, None) for k in ("num_local_experts", "num_experts"))


# ----------------------------------------------------------------------------- the step core


class StepRunner:
    """One optimizer step at a time: the training core shared by every way tli trains.

    Args:
        model: an HF causal LM (trained in place; moved to ``device``), or one built on the
            meta device (:func:`tli.train.shard.skeleton`) together with ``weights``.
        data: int64 ``[n_blocks, seq_len]`` training blocks (all of them: each worker picks its
            own rows), or a :class:`Batches` source (the streamed feed); see :class:`DataOrder`.
        cfg: the training config.
        new_layers: decoder-layer indices the ``original`` freeze policy trains.
        device: where to train; None = cuda if ``cfg.gpu`` else cpu.
        distributed: wrap the model for ``torch.distributed`` (DDP, or FSDP2 with ``cfg.fsdp``)
            when the process group has more than one rank.
        peak_flops: peak FLOP/s of one device, for MFU; None = no MFU.
        compile: run the model through ``torch.compile`` (GPU speed; same results up to
            floating-point reordering).
        weights: where a meta-device ``model``'s weights come from (a
            :class:`tli.train.shard.RowSource`). Under FSDP the model is sharded first, so each
            rank allocates and reads only its own rows.
    """

    def __init__(
        self,
        model: Any,
        data: torch.Tensor | Batches,
        cfg: TrainConfig,
        *,
        new_layers: Sequence[int] | None = None,
        device: Any = None,
        distributed: bool = False,
        peak_flops: float | None = None,
        compile: bool = False,
        weights: Any = None,
    ) -> None:
        import torch
        import torch.distributed as dist

        self.cfg = cfg
        self.data: Batches = MemoryBatches(data) if isinstance(data, torch.Tensor) else data
        if isinstance(data, torch.Tensor) and data.shape[1] != cfg.seq_len:
            raise TliError(f"training blocks must be [n, {cfg.seq_len}], got {tuple(data.shape)}")
        self.device = torch.device(device or ("cuda" if cfg.gpu else "cpu"))
        self.distributed = distributed and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.global_batch = cfg.batch_size * self.world
        self.order = DataOrder(self.data.n_blocks, cfg.batch_size, self.world, cfg.grad_accum,
                               cfg.seed)  # fmt: skip
        self.order.check()  # the data fits one optimizer step, before any work
        self.data.bind(self.order, self.rank)
        torch.manual_seed(cfg.seed + self.rank)  # dropout etc.; a resume restores the state
        self.trainable, self.total = apply_freeze(model, cfg.freeze, new_layers)
        self.flops_per_token = flops_per_token(model, cfg.seq_len)
        self.peak_flops = peak_flops
        self.autocast = cfg.bf16 and bf16_autocast_ok(self.device)
        self.moe = is_moe(model.config)
        self.raw = model
        self.kind = "single"
        self.model = self._place(model, weights)
        if compile:
            self.model = torch.compile(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self._adamw()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, cfg)
        )
        self.step = 0  # optimizer steps done
        self.tokens = 0  # tokens trained on, all workers
        self.elapsed = 0.0  # training seconds, summed over resumed runs
        self.placement: list[dict[str, Any]] = []  # where each worker ran (set by the Ray loop)
        # Resident memory before the model and at its high-water mark once it is loaded and
        # sharded (set by the Ray loop): what a run's peak is made of, in tli_train.json.
        self.memory_marks: dict[str, int] = {}
        self.val_blocks: torch.Tensor | None = None  # held-out blocks (set by the Ray loop)

    def _place(self, model: Any, weights: Any) -> Any:
        """The model on its device, in training mode, wrapped for the process group.

        A meta-device model is materialised from ``weights``: whole before DDP (or alone),
        after ``fully_shard`` under FSDP, so that each rank allocates and reads its rows only.
        FSDP applies with more than one rank, or over a one-rank process group when asked for
        (a GPU benchmark of the FSDP path); DDP only with more than one rank.
        """
        from tli.train.shard import is_meta, materialise

        meta = is_meta(model)
        if meta and weights is None:
            raise TliError("a model built on the meta device needs its weights to materialise")
        sharded = self.cfg.fsdp and self.distributed
        if meta and not sharded:
            materialise(model, weights, self.device)  # every row: DDP / one worker
        elif not meta:
            model.to(self.device)
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False  # no KV cache in training
        if self.cfg.grad_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        wrapped = self._wrap(model) if self.world > 1 or sharded else model
        if meta and sharded:
            materialise(model, weights, self.device)  # this rank's rows only
        return wrapped

    def _adamw(self) -> Any:
        """AdamW over the trainable parameters; norms and biases get no weight decay."""
        import torch

        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return torch.optim.AdamW(
            groups, lr=self.cfg.lr, betas=(0.9, 0.95), eps=1e-8,
            fused=self.device.type == "cuda",
        )  # fmt: skip

    def _wrap(self, model: Any) -> Any:
        import torch

        if self.cfg.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = None
            if self.autocast:
                # Gather the weights in bf16, reduce gradients in fp32: fp32 master weights, as
                # autocast has. Without it autocast casts each gathered fp32 weight to a bf16
                # copy that autograd keeps to the backward: the bf16 model again, unsharded.
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
        return self.order.rows(step, micro, self.rank)  # [B]

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
        # An MoE model adds its router's load-balancing loss (router_aux_loss_coef x aux) to
        # .loss when asked for the router logits; without it the experts are free to collapse.
        extra = {"output_router_logits": True} if self.moe else {}
        data_s = 0.0  # waiting for the feed: an input pipeline that keeps up spends ~0 here
        for micro in range(cfg.grad_accum):
            t_data = time.perf_counter()
            ids = self.data.get(self.step, micro).to(self.device)  # [B, T]
            data_s += time.perf_counter() - t_data
            last = micro == cfg.grad_accum - 1
            sync: contextlib.AbstractContextManager = contextlib.nullcontext()
            if self.kind == "ddp" and not last:
                sync = self.model.no_sync()  # all-reduce only on the last micro-step
            elif self.kind == "fsdp":
                self.model.set_requires_gradient_sync(last)
            with sync:
                with self._autocast():
                    loss = self.model(input_ids=ids, labels=ids, use_cache=False, **extra).loss
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
            "data_s": data_s,
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
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "world_size": self.world,
            "scheduler": {
                k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"
            },
            "data_position": self.order.position(self.step),
            "config": self.cfg.model_dump(mode="json"),
            "placement": self.placement,
        }

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        """Restore step, tokens, time and the schedule from :meth:`trainer_state`.

        Any number of workers may resume a run, as long as an optimizer step still takes as
        many blocks (batch size x workers x micro-steps): then it trains on the same rows.
        """
        saved = state["config"]
        was = int(saved["batch_size"]) * int(state["world_size"]) * int(saved["grad_accum"])
        if was != self.order.step_batch:
            raise TliError(
                f"the checkpoint's steps took {was} sequences ({saved['batch_size']} x "
                f"{state['world_size']} workers x {saved['grad_accum']} micro-steps), this run's "
                f"take {self.order.step_batch}: keep batch size x workers x grad accum equal "
                "(e.g. --grad-accum) to resume on another number of workers"
            )
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.elapsed = float(state["elapsed"])
        sched = dict(state["scheduler"])
        sched["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
        self.scheduler.load_state_dict(sched)
        for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            g["lr"] = lr

    def gather_memory(self) -> list[dict[str, Any]]:
        """Every worker's peak resident memory (and peak GPU memory), on every rank (all call)."""
        import torch
        import torch.distributed as dist

        me: dict[str, Any] = {"rank": self.rank, **self.memory_marks, "peak_rss_bytes": peak_rss()}
        if self.device.type == "cuda":
            me["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(self.device)
        if self.world == 1 or not dist.is_initialized():
            return [me]
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, me)
        return every


def peak_rss() -> int:
    """This process's peak resident memory in bytes, since it started.

    Linux's ``VmHWM`` is the high-water mark of this process's own memory map; ``ru_maxrss``
    is not: it keeps the maximum across ``exec``, so a process forked from a big one (a Ray
    worker from its raylet, a subprocess from a benchmark) would report its parent's size.
    """
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_rss() -> int | None:
    """This process's resident memory now, in bytes (None where /proc is not there)."""
    return _proc_status_bytes("VmRSS")


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


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


def eval_due(step: int, cfg: TrainConfig) -> bool:
    every = cfg.validation.every
    return step == cfg.steps or (every is not None and step % every == 0)


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
    weights: Any = None,
    distributed: bool = False,
) -> list[dict[str, Any]]:
    """Train an in-memory model for ``cfg.steps`` steps in this process (no Ray, no files).

    The same per-step code as :func:`train_loop_per_worker` with one worker: same data order,
    schedule and optimizer, so the results are identical for the same seed. Ray Tune trials
    call this with a model built by :func:`tli.inject.memory.inject_in_memory`.

    Args:
        model: an HF causal LM; trained in place.
        blocks: int64 ``[n_blocks, cfg.seq_len]`` training blocks.
        cfg: the training config (``workers``, checkpoints and ``gpu`` placement do not apply).
        report: called with each step's metrics dict (step, loss, lr, grad_norm, tokens,
            tokens_per_s, mfu, elapsed, and val_loss on evaluation steps).
        val_blocks: blocks for the validation loss every ``cfg.validation.every`` steps and at
            the end.
        new_layers: decoder layers trained under the ``original`` freeze policy.
        device: where to train; None = cuda if ``cfg.gpu`` else cpu.
        peak_flops: peak FLOP/s of the device, for MFU.
        progress: print a live line per step on stderr.
        compile: ``torch.compile`` the model (see :class:`StepRunner`).
        weights: a meta-device ``model``'s weights (see :class:`StepRunner`).
        distributed: train under the initialised process group (DDP / FSDP, see
            :class:`StepRunner`); every rank calls this.

    Returns:
        Every step's metrics, in order.
    """
    runner = StepRunner(model, blocks, cfg, new_layers=new_layers, device=device,
                        peak_flops=peak_flops, compile=compile, weights=weights,
                        distributed=distributed)  # fmt: skip
    history = []
    for _ in range(cfg.steps):
        m = runner.train_step()
        if val_blocks is not None and eval_due(runner.step, cfg):
            m["val_loss"] = runner.evaluate(val_blocks)
        history.append(m)
        if report is not None:
            report(m)
        if progress:
            sys.stderr.write(live_line(m, cfg.steps) + "\n")
    return history
