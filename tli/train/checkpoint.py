"""Training checkpoints: safetensors and JSON only, never a pickle.

One folder per checkpoint (``step_NNNNNN``): the model as an HF folder, AdamW's state flattened
into one safetensors file keyed by parameter name, the LR schedule and trainer state as JSON,
each worker's RNG state as a tensor, and the metrics so far.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tli.train.step import StepRunner

if TYPE_CHECKING:
    import torch

# Checkpoint layout (one folder per checkpoint, named step_NNNNNN).
CKPT_MODEL = "model"  # HF folder (rank 0)
CKPT_OPTIM = "optimizer.safetensors"  # AdamW state tensors, "state/<param>/<key>" (rank 0)
CKPT_OPTIM_META = "optimizer.json"  # AdamW param groups (rank 0)
CKPT_STATE = "trainer_state.json"  # step, tokens, schedule, config (rank 0)
CKPT_METRICS = "metrics.jsonl"  # one line per step so far (rank 0)
CKPT_RNG = "rng/rank_{rank}.safetensors"  # each worker's RNG state (every rank)

def save_checkpoint(runner: StepRunner, folder: Path, history: list[dict[str, Any]]) -> None:
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
    save_hf(runner.raw, sd, folder / CKPT_MODEL, dtype=None)
    save_file(otensors, str(folder / CKPT_OPTIM))
    (folder / CKPT_OPTIM_META).write_text(json.dumps(ometa, indent=1) + "\n")
    (folder / CKPT_STATE).write_text(json.dumps(runner.trainer_state(), indent=1) + "\n")
    (folder / CKPT_METRICS).write_text("".join(json.dumps(m) + "\n" for m in history))


def save_hf(model: Any, sd: dict[str, torch.Tensor], out: Path, dtype: Any) -> None:
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


def load_checkpoint(runner: StepRunner, folder: Path) -> list[dict[str, Any]]:
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
