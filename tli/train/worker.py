"""Ray Train at the edge: the per-worker loop and the one place a ``TorchTrainer`` is built.

:func:`train_loop_per_worker` runs :class:`tli.train.step.StepRunner` steps inside a Ray Train
worker, with checkpoints, resume and metric reports; :func:`make_trainer` wraps it in a
``TorchTrainer`` for ``tli train`` and for each trial of ``tli tune`` alike.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tli.config import TrainConfig
from tli.drills import drill
from tli.rayenv import WorkerPlan, worker_runtime_env
from tli.train.checkpoint import CKPT_MODEL, load_checkpoint, save_checkpoint
from tli.train.step import StepRunner, eval_due, live_line


def make_trainer(
    loop_config: dict[str, Any],
    cfg: TrainConfig,
    plan: WorkerPlan,
    *,
    storage: str | Path,
    name: str,
    max_failures: int = 0,
    callbacks: Sequence[Any] = (),
) -> Any:
    """A ``TorchTrainer`` running :func:`train_loop_per_worker` with ``loop_config``.

    Args:
        loop_config: the workers' config (see :func:`train_loop_per_worker`).
        cfg: the training config (workers, GPUs).
        plan: CPUs per worker.
        storage: Ray Train's storage (checkpoints, run state): a folder or a URI.
        name: the run's folder name under ``storage``; an existing run there is resumed.
        max_failures: worker failures recovered from the latest checkpoint.
        callbacks: Ray Train callbacks (a Tune trial's report callback).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources: dict[str, float] = {"CPU": plan.cpus_per_worker}
    if cfg.gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env=worker_runtime_env(),
            callbacks=list(callbacks),
            # Ray Train's own INFO lines (one per report) would drown the live step line.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def _materialise(obj: Any) -> Any:
    import ray

    return ray.get(obj) if isinstance(obj, ray.ObjectRef) else obj


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train per-worker loop (``TorchTrainer(train_loop_per_worker, ...)``).

    Keys of ``config``:
        ``train``: a :class:`TrainConfig` as a dict. ``model_dir``: the HF folder to start from
        (every worker reads it, so on a cluster it must be on shared storage).
        ``build_model`` (instead of ``model_dir``; Ray Tune trials): a picklable callable
        returning the model to train, built in memory (:func:`tli.tune.trial.build_trial_model`).
        ``train_blocks`` / ``val_blocks``: tensors or Ray object refs of them (``val_blocks``
        may be None). ``new_layers``: decoder layers trained under ``original``.
        Optional: ``threads`` (torch threads per worker), ``peak_flops``, ``compile``,
        ``report_every`` (steps between metric-only reports; default 10).

    A checkpoint is reported every ``checkpoint_every`` steps and at the end (the final one
    carries the trained model); on (re)start the worker resumes from
    ``ray.train.get_checkpoint()`` when there is one.
    """
    import ray.train

    cfg = TrainConfig.model_validate(config["train"])
    _quiet_ray_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    runner, history = _start(config, cfg, rank, world)
    report_every = int(config.get("report_every") or 10)
    while runner.step < cfg.steps:
        if rank == world - 1:
            drill("train.step", runner.step + 1)  # a no-op unless a fault drill is armed
        m = runner.train_step()
        if runner.val_blocks is not None and eval_due(runner.step, cfg):
            m["val_loss"] = runner.evaluate(runner.val_blocks)
        history.append(m)
        if rank == 0:
            print(live_line(m, cfg.steps), flush=True)
        _report(runner, cfg, m, history, report_every)


def _start(
    config: dict[str, Any], cfg: TrainConfig, rank: int, world: int
) -> tuple[StepRunner, list[dict[str, Any]]]:
    """The worker's runner: from the latest checkpoint when there is one, else from scratch."""
    import ray.train
    import torch

    from tli.modelfolder import load_causal_lm

    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    if cfg.gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    ckpt = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        ckpt_dir = Path(stack.enter_context(ckpt.as_directory())) if ckpt else None
        build_model: Callable[[], Any] | None = config.get("build_model")
        if ckpt_dir is None and build_model is not None:
            model = build_model()  # a Tune trial: upscaled in memory from the shared base
        else:
            source = ckpt_dir / CKPT_MODEL if ckpt_dir else Path(config["model_dir"])
            model = load_causal_lm(source)
        runner = StepRunner(
            model, _materialise(config["train_blocks"]), cfg, new_layers=config.get("new_layers"),
            device=device, distributed=world > 1, peak_flops=config.get("peak_flops"),
            compile=bool(config.get("compile")),
        )  # fmt: skip
        runner.val_blocks = _materialise(config.get("val_blocks"))
        history: list[dict[str, Any]] = []
        if ckpt_dir is not None:
            history = load_checkpoint(runner, ckpt_dir)
            if rank == 0:
                print(f"resuming from step {runner.step} ({ckpt_dir.name})", flush=True)
    runner.placement = _placement(rank, world, device)
    if rank == 0 and runner.step == 0:
        print(
            f"training {runner.trainable:,} of {runner.total:,} parameters "
            f"({cfg.freeze=}) on {world} x {device.type} ({runner.kind}), "
            f"bf16 autocast {'on' if runner.autocast else 'off'}",
            flush=True,
        )
    return runner, history


def _report(
    runner: StepRunner,
    cfg: TrainConfig,
    m: dict[str, Any],
    history: list[dict[str, Any]],
    report_every: int,
) -> None:
    """Report this step to Ray Train: with a checkpoint when one is due (every rank calls)."""
    import ray.train

    step = runner.step
    ckpt_due = step == cfg.steps or (
        cfg.checkpoint_every is not None and step % cfg.checkpoint_every == 0
    )
    metrics = {k: v for k, v in m.items() if v is not None}
    if ckpt_due:
        # Ray Train persists a checkpoint by copying a local folder into its storage; this
        # scratch folder is that copy's source, not an output of tli's.
        with tempfile.TemporaryDirectory(prefix="tli-ckpt-") as tmp:
            save_checkpoint(runner, Path(tmp), history)
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
