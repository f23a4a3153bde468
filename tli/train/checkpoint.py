"""Training checkpoints: every rank writes its own shard as safetensors; JSON says where rows are.

Nothing is gathered on one rank and nothing is ever pickled. One folder per checkpoint
(``step_NNNNNN``):

- ``model-rRRRRR-of-WWWWW.safetensors``: this rank's rows of every parameter (fp32 master
  weights; a tied weight once, under its first name). Under FSDP2 a rank holds rows
  ``[r * c, (r + 1) * c)`` of dim 0, ``c = ceil(n / W)`` (the chunks ``fully_shard`` makes);
  under DDP or with one worker, rank 0 holds every row.
- ``optim-rRRRRR-of-WWWWW.safetensors``: the same rows of AdamW's moments, keyed
  ``<param>/<key>``; the step counters (0-d) are rank 0's.
- ``index.json`` (rank 0): every tensor's shape, dtype and pieces (file, row range), AdamW's
  param groups and the world size; ``config.json`` (rank 0): the model's HF config.
- ``trainer_state.json``, ``metrics.jsonl`` (rank 0): step, tokens, schedule, data position,
  config, the files of the checkpoint; the metrics so far.
- ``rng/rank_R.safetensors`` (every rank).

Resuming reads any checkpoint into any number of workers: each rank reads the rows it now
holds from whichever pieces have them (:class:`CheckpointTensors`, a
:class:`tli.train.shard.RowSource`). The finished model is one HF folder again
(:func:`write_hf_model`), written tensor by tensor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tli.errors import TliError
from tli.inject.stio import TensorRef, read_header
from tli.train.shard import local_rows, read_ref_into, st_dtype, torch_dtype, unique_parameters

if TYPE_CHECKING:
    import torch

    from tli.train.step import StepRunner

CKPT_FORMAT = "tli-train-checkpoint/2"
CKPT_INDEX = "index.json"  # rank 0: shapes, dtypes, pieces, param groups
CKPT_CONFIG = "config.json"  # rank 0: the model's HF config
CKPT_STATE = "trainer_state.json"  # step, tokens, schedule, config, files (rank 0)
CKPT_METRICS = "metrics.jsonl"  # one line per step so far (rank 0)
CKPT_RNG = "rng/rank_{rank}.safetensors"  # each worker's RNG state (every rank)
MODEL_GROUP, OPTIM_GROUP = "model", "optim"


def shard_file(group: str, rank: int, world: int) -> str:
    """The file of ``group`` (model, optim) that rank ``rank`` of ``world`` writes."""
    return f"{group}-r{rank:05d}-of-{world:05d}.safetensors"


def shard_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows of a dim-0 length ``n`` that FSDP2 gives rank ``rank``: ``torch.chunk``'s split."""
    c = math.ceil(n / world) if n else 0
    start = min(rank * c, n)
    return start, min(start + c, n)


# ----------------------------------------------------------------------------- saving


def _persistent_buffers(model: Any) -> list[tuple[str, Any]]:
    out = []
    for mod_name, mod in model.named_modules():
        for b_name, b in mod._buffers.items():
            if b is not None and b_name not in mod._non_persistent_buffers_set:
                out.append((f"{mod_name}.{b_name}" if mod_name else b_name, b))
    return out


def _reshard(model: Any) -> None:
    """Put every FSDP2 module back in its sharded state (the root stays unsharded after a
    forward without backward, such as a validation pass)."""
    from torch.distributed.fsdp import FSDPModule

    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.reshard()


def _local_tensors(runner: StepRunner) -> tuple[dict, dict, dict]:
    """This rank's (model tensors, optimizer tensors, index entries) to write.

    Long because it walks parameters, their AdamW state and the buffers in one pass, so that the
    index entries and the tensors written can never disagree.
    """
    import torch

    sharded, rank, world = runner.kind == "fsdp", runner.rank, runner.world
    if sharded:
        _reshard(runner.raw)
    model_t: dict[str, torch.Tensor] = {}
    optim_t: dict[str, torch.Tensor] = {}
    index: dict[str, dict[str, Any]] = {MODEL_GROUP: {}, OPTIM_GROUP: {}}

    def put(group: str, name: str, t: Any, full_only: bool) -> None:
        local, a, b = local_rows(t)
        shape = list(t.shape)
        split = sharded and not full_only and t.ndim > 0
        if split and (a, b) != shard_rows(shape[0], world, rank):
            raise TliError(
                f"{name}: rank {rank} holds rows [{a}, {b}), not FSDP2's "
                f"{shard_rows(shape[0], world, rank)}: cannot index the checkpoint"
            )
        if split:
            ranks = [r for r in range(world) if shard_rows(shape[0], world, r)[1] >
                     shard_rows(shape[0], world, r)[0]]  # fmt: skip
            pieces = [{"rank": r, "rows": list(shard_rows(shape[0], world, r))} for r in ranks]
        else:
            pieces = [{"rank": 0, "rows": [0, shape[0] if shape else 0]}]
        index[group][name] = {"shape": shape, "dtype": st_dtype(local.dtype), "pieces": pieces}
        if (split and b > a) or (not split and rank == 0):
            # The live tensor, not a copy: the files are written before the next step.
            target = model_t if group == MODEL_GROUP else optim_t
            target[name] = local.detach()

    for name, p in unique_parameters(runner.raw):
        put(MODEL_GROUP, name, p, full_only=False)
        for key, val in runner.optimizer.state.get(p, {}).items():
            if isinstance(val, torch.Tensor):
                put(OPTIM_GROUP, f"{name}/{key}", val, full_only=val.ndim == 0)
    for name, b in _persistent_buffers(runner.raw):
        put(MODEL_GROUP, name, b, full_only=True)
    return model_t, optim_t, index


def save_checkpoint(runner: StepRunner, folder: Path, history: list[dict[str, Any]]) -> None:
    """Write this worker's part of a checkpoint into ``folder`` (every rank must call)."""
    import torch
    from safetensors.torch import save_file

    rank, world = runner.rank, runner.world
    model_t, optim_t, index = _local_tensors(runner)
    if model_t:
        _write_shard(folder / shard_file(MODEL_GROUP, rank, world), model_t)
    if optim_t:
        _write_shard(folder / shard_file(OPTIM_GROUP, rank, world), optim_t)
    rng = {"cpu": torch.get_rng_state()}
    if runner.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(runner.device)
    rng_path = folder / CKPT_RNG.format(rank=rank)
    rng_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(rng, str(rng_path))
    memory = runner.gather_memory()  # a collective: every rank's peak RSS, on every rank
    if rank != 0:
        return
    groups = [{k: v for k, v in g.items() if k != "params"} for g in runner.optimizer.param_groups]
    files = {shard_file(grp, p["rank"], world) for grp in index for e in index[grp].values()
             for p in e["pieces"]}  # fmt: skip
    doc = {"format": CKPT_FORMAT, "world_size": world, "kind": runner.kind,
           "tensors": _with_files(index, world), "param_groups": groups}  # fmt: skip
    (folder / CKPT_INDEX).write_text(json.dumps(doc, indent=1) + "\n")
    config = runner.raw.config.to_dict()
    if "use_cache" in config:
        config["use_cache"] = True  # the saved model is for inference
    (folder / CKPT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {**runner.trainer_state(), "memory": memory}
    listed = sorted(files | {CKPT_INDEX, CKPT_CONFIG, CKPT_METRICS})
    state["checkpoint"] = {"format": CKPT_FORMAT, "world_size": world, "files": listed}
    (folder / CKPT_METRICS).write_text("".join(json.dumps(m) + "\n" for m in history))
    (folder / CKPT_STATE).write_text(json.dumps(state, indent=1) + "\n")


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` as one safetensors file, one tensor's bytes in memory at a time.

    ``safetensors.torch.save_file`` would first turn every tensor into bytes: a second copy of
    the rank's whole shard, which set the peak of an FSDP worker (docs/benchmarks.md). Widest
    dtypes first, so that every tensor starts aligned to its element size.
    """
    from tli.inject.stio import OutTensor, write_file

    order = sorted(tensors.items(), key=lambda kv: -kv[1].element_size())  # stable: names kept
    outs = [OutTensor(name, st_dtype(t.dtype), tuple(t.shape), t.numel() * t.element_size(),
                      "compute", compute=_live_bytes(t)) for name, t in order]  # fmt: skip
    write_file(path, outs, {"format": CKPT_FORMAT}, drills=None)


def _live_bytes(t: torch.Tensor):
    from tli.inject.stio import tensor_bytes

    return lambda: tensor_bytes(t.to("cpu"))  # no copy of a CPU tensor; one GPU tensor at a time


def _with_files(index: dict[str, dict[str, Any]], world: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for group, entries in index.items():
        for name, e in entries.items():
            pieces = [{"file": shard_file(group, p["rank"], world), "rows": p["rows"]}
                      for p in e["pieces"]]  # fmt: skip
            out.setdefault(group, {})[name] = {**e, "pieces": pieces}
    return out


def checkpoint_complete(location: str | Path) -> bool:
    """Whether a checkpoint folder (or ``s3://`` prefix) holds its state and every file the
    state lists.

    Every rank's files reach storage separately; a run killed between two uploads leaves a
    folder with some of them, which a resume must pass over.
    """
    from tli import remote

    state_file = remote.location_join(location, CKPT_STATE)
    if not remote.is_file(state_file):
        return False
    try:
        files = json.loads(remote.read_text(state_file)).get("checkpoint", {}).get("files", [])
    except (OSError, ValueError, AttributeError, TliError):
        return False
    return all(remote.is_file(remote.location_join(location, f)) for f in files)


# Fields that say how a step's sequences are split over workers and micro-steps: a run may
# resume with others, as long as a step takes as many sequences (then it trains on the same
# rows, see tli.train.step.DataOrder).
LAYOUT_FIELDS = ("workers", "batch_size", "grad_accum", "fsdp")


def resume_mismatch(state: dict[str, Any], cfg: Any) -> list[str]:
    """The settings that forbid resuming the run of ``state`` (trainer_state.json) with ``cfg``.

    Fields out of versions (checkpoint cadence, how data is fed) may change; so may the layout
    fields, when batch size x workers x micro-steps stays the same.
    """
    from tli.config import versioned

    saved, now = state["config"], versioned(cfg)
    diff = sorted(k for k in now if k not in LAYOUT_FIELDS and saved.get(k) != now[k])
    was = int(saved["batch_size"]) * int(state["world_size"]) * int(saved["grad_accum"])
    if was != cfg.batch_size * cfg.workers * cfg.grad_accum:
        diff.append(f"sequences per step: {was} then, "
                    f"{cfg.batch_size * cfg.workers * cfg.grad_accum} now")  # fmt: skip
    return diff


# ----------------------------------------------------------------------------- reading


class CheckpointTensors:
    """Rows of one group's tensors (``model`` or ``optim``) of a checkpoint, from its pieces."""

    def __init__(self, folder: Path, group: str = MODEL_GROUP) -> None:
        self.folder = Path(folder)
        idx = self.folder / CKPT_INDEX
        if not idx.is_file():
            raise TliError(
                f"{self.folder} is not a checkpoint this tli can read (no {CKPT_INDEX}): it was "
                "written by an older version; start over with --force"
            )
        self.index = json.loads(idx.read_text())
        self.entries: dict[str, dict[str, Any]] = self.index["tensors"].get(group, {})
        self._refs: dict[str, dict[str, TensorRef]] = {}

    def shape(self, name: str) -> tuple[int, ...] | None:
        e = self.entries.get(name)
        return tuple(e["shape"]) if e is not None else None

    def names(self) -> set[str]:
        return set(self.entries)

    def _ref(self, file: str, name: str) -> TensorRef:
        if file not in self._refs:
            self._refs[file] = read_header(self.folder / file)[0]
        ref = self._refs[file].get(name)
        if ref is None:
            raise TliError(f"{self.folder / file} lacks {name}, which {CKPT_INDEX} places there")
        return ref

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        e = self.entries[name]
        if not e["shape"]:
            read_ref_into(self._ref(e["pieces"][0]["file"], name), 0, 0, out)
            return
        covered = 0
        for piece in e["pieces"]:
            a, b = piece["rows"]
            lo, hi = max(start, a), min(stop, b)
            if lo >= hi:
                continue
            read_ref_into(
                self._ref(piece["file"], name), lo - a, hi - a, out[lo - start : hi - start]
            )
            covered += hi - lo
        if covered != stop - start:
            raise TliError(f"the checkpoint's pieces of {name} do not cover rows [{start}, {stop})")

    def read(self, name: str) -> torch.Tensor:
        """One whole tensor, in its saved dtype."""
        import torch

        e = self.entries[name]
        out = torch.empty(e["shape"], dtype=torch_dtype(e["dtype"], name))
        self.read_into(name, 0, e["shape"][0] if e["shape"] else 0, out)
        return out


def load_checkpoint(runner: StepRunner, folder: Path) -> list[dict[str, Any]]:
    """Restore AdamW, schedule, counters and RNG from ``folder``; return the metrics so far.

    The model's weights were read when it was built (:class:`CheckpointTensors` as its row
    source); this restores the rest, for whatever number of workers runs now.
    """
    import torch
    from safetensors.torch import load_file

    runner.load_trainer_state(json.loads((folder / CKPT_STATE).read_text()))
    optim = CheckpointTensors(folder, OPTIM_GROUP)
    _load_optimizer(runner, optim, optim.index.get("param_groups", []))
    rng_path = folder / CKPT_RNG.format(rank=runner.rank)
    if rng_path.is_file():  # a rank the writing run did not have keeps its fresh seed
        rng = load_file(str(rng_path))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and runner.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], runner.device)
    lines = (folder / CKPT_METRICS).read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def _load_optimizer(runner: StepRunner, src: CheckpointTensors, groups: list[dict]) -> None:
    """AdamW's state for this rank's rows of every trained parameter, and its param groups."""
    import torch

    if len(groups) != len(runner.optimizer.param_groups):
        raise TliError(
            f"the checkpoint has {len(groups)} optimizer groups, this run "
            f"{len(runner.optimizer.param_groups)}: resume with the same settings"
        )
    for g, saved in zip(runner.optimizer.param_groups, groups, strict=True):
        g.update({k: tuple(v) if k == "betas" else v for k, v in saved.items()})
    keys: dict[str, list[str]] = {}
    for full in src.names():
        name, _, key = full.rpartition("/")
        keys.setdefault(name, []).append(key)
    on_device = {id(p): g.get("fused") or g.get("capturable")
                 for g in runner.optimizer.param_groups for p in g["params"]}  # fmt: skip
    for name, p in unique_parameters(runner.raw):
        if not p.requires_grad:
            continue
        if name not in keys:
            raise TliError(f"the checkpoint has no optimizer state for {name}: resume with the "
                           "same --freeze as the interrupted run")  # fmt: skip
        state: dict[str, Any] = {}
        for key in sorted(keys[name]):
            full = f"{name}/{key}"
            if not src.shape(full):
                val = src.read(full).to(torch.float32)  # AdamW's step counter
                state[key] = val.to(p.device) if on_device.get(id(p)) else val
                continue
            t = torch.zeros_like(p.detach())  # a DTensor like the parameter under FSDP2
            local, a, b = local_rows(t)
            if local.numel():
                src.read_into(full, a, b, local)
            state[key] = t
        runner.optimizer.state[p] = state


# ----------------------------------------------------------------------------- the result


def write_hf_model(ckpt: Path, out: Path, dtype: Any = None, shard_size: int = 5 * 1024**3) -> None:
    """Write the checkpoint's model as an HF folder ``out`` (created), one tensor at a time.

    Args:
        ckpt: a checkpoint folder.
        out: the HF folder to create: ``config.json`` and safetensors shard(s) (+ index).
        dtype: the weights' dtype (None: as saved, fp32).
        shard_size: the largest safetensors shard, in bytes.
    """
    from tli.inject.stio import OutTensor, write_checkpoint

    src = CheckpointTensors(ckpt, MODEL_GROUP)
    config = json.loads((ckpt / CKPT_CONFIG).read_text())
    tensors = []
    for name in sorted(src.names()):
        e = src.entries[name]
        code = st_dtype(dtype) if dtype is not None and e["dtype"] in ("F32", "F16", "BF16") \
            else e["dtype"]  # fmt: skip
        n = math.prod(e["shape"]) * _width(code)
        tensors.append(OutTensor(name, code, tuple(e["shape"]), n, "compute",
                                 compute=_producer(src, name, code)))  # fmt: skip
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    out.mkdir(parents=True)
    write_checkpoint(out, tensors, max_shard_bytes=shard_size, threads=1)
    (out / CKPT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _width(code: str) -> int:
    from tli.inject.stio import DTYPE_BYTES

    return DTYPE_BYTES[code]


def _producer(src: CheckpointTensors, name: str, code: str):
    from tli.inject.stio import tensor_bytes

    return lambda: tensor_bytes(src.read(name).to(torch_dtype(code, name)))  # [*shape]
