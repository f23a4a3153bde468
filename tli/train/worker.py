"""Ray Train at the edge: the per-worker loop and the one place a ``TorchTrainer`` is built.

:func:`train_loop_per_worker` runs :class:`tli.train.step.StepRunner` steps inside a Ray Train
worker, with checkpoints, resume and metric reports; :func:`make_trainer` wraps it in a
``TorchTrainer`` for ``tli train`` and for each trial of ``tli tune`` alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tli.config import TrainConfig
from tli.drills import drill
from tli.rayenv import WorkerPlan, worker_runtime_env
from tli.train.checkpoint import CKPT_STATE, CheckpointTensors, load_checkpoint, save_checkpoint
from tli.train.step import StepRunner, current_rss, eval_due, live_line, peak_rss


def make_trainer(
    loop_config: dict[str, Any],
    cfg: TrainConfig,
    plan: WorkerPlan,
    *,
    storage: str | Path,
    name: str,
    max_failures: int = 0,
    callbacks: Sequence[Any] = (),
    feed: Any = None,
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
        feed: a :class:`tli.data.stream.FeedSpec`: the workers read their blocks from Ray Data
            (``get_dataset_shard``) instead of ``loop_config["train_blocks"]``.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources: dict[str, float] = {"CPU": plan.cpus_per_worker}
    if cfg.gpu:
        resources["GPU"] = 1
    data: dict[str, Any] = {}
    if feed is not None:
        from tli.data.feed import trainer_datasets

        datasets, data_config = trainer_datasets(feed, cfg.workers)
        data = {"datasets": datasets, "dataset_config": data_config}
        loop_config = {**loop_config, "feed": feed}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        **data,
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
        ``train``: a :class:`TrainConfig` as a dict. The model, one of: ``model_dir``, the HF
        folder to start from; or ``base_dir`` and ``plan`` (Ray Tune trials): the base folder
        and the injection plan (a dict) applied to it in memory. Every worker reads these
        folders, so on a cluster they must be on shared storage.
        The data: ``train_blocks`` (a tensor or a Ray object ref of one), or ``feed`` (a
        :class:`tli.data.stream.FeedSpec`, set by :func:`make_trainer`: the worker's Ray Data
        shard). ``val_blocks``: a tensor, a ref or None. ``new_layers``: decoder layers trained
        under ``original``.
        Optional: ``threads`` (torch threads per worker), ``peak_flops``, ``compile``,
        ``report_every`` (steps between metric-only reports; default 10), ``sharded_load``
        (FSDP workers read only their own shards; default True).

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


def _model_and_weights(
    config: dict[str, Any], cfg: TrainConfig, world: int, ckpt_dir: Path | None
) -> tuple[Any, Any]:
    """The model to train and, for a meta-device model, where its weights come from.

    Today's path (the whole model loaded, then wrapped) for a fresh DDP or one-worker run from
    a folder; every other start builds the model on the meta device and reads its weights
    (only this rank's rows under FSDP): from a checkpoint (any number of workers wrote it),
    from the base and a plan (a trial: nothing per trial in the object store), or from the
    folder (FSDP).
    """
    from tli.modelfolder import load_causal_lm, read_config
    from tli.train import shard

    sharded_load = config.get("sharded_load", True)
    if ckpt_dir is not None:
        source = CheckpointTensors(ckpt_dir)
        return shard.skeleton(read_config(ckpt_dir)), source
    if config.get("base_dir") is not None:
        from tli.inject.plan import Plan

        plan = Plan.from_dict(config["plan"])
        if plan.method == "moe":  # a new family, not rows of the base: built whole
            from tli.inject.memory import inject_in_memory

            return inject_in_memory(load_causal_lm(config["base_dir"]), plan), None
        source = shard.InjectedWeights(config["base_dir"], plan)
        return shard.skeleton(source.injected_config()), source
    model_dir = Path(config["model_dir"])
    if cfg.fsdp and world > 1 and sharded_load:
        return shard.skeleton(read_config(model_dir)), shard.FolderWeights(model_dir)
    return load_causal_lm(model_dir), None


def _start(
    config: dict[str, Any], cfg: TrainConfig, rank: int, world: int
) -> tuple[StepRunner, list[dict[str, Any]]]:
    """The worker's runner: from the latest checkpoint when there is one, else from scratch."""
    import ray.train
    import torch

    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    if cfg.gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    ckpt = ray.train.get_checkpoint()
    before = current_rss()
    with contextlib.ExitStack() as stack:
        ckpt_dir = Path(stack.enter_context(ckpt.as_directory())) if ckpt else None
        model, weights = _model_and_weights(config, cfg, world, ckpt_dir)
        runner = StepRunner(
            model, _data(config), cfg, new_layers=config.get("new_layers"), device=device,
            distributed=world > 1, peak_flops=config.get("peak_flops"),
            compile=bool(config.get("compile")), weights=weights,
        )  # fmt: skip
        runner.val_blocks = _materialise(config.get("val_blocks"))
        history: list[dict[str, Any]] = []
        if ckpt_dir is not None:
            history = load_checkpoint(runner, ckpt_dir)
            if rank == 0:
                print(f"resuming from step {runner.step} ({ckpt_dir.name}, written by "
                      f"{_writers(ckpt_dir)} worker(s)) on {world}", flush=True)  # fmt: skip
    runner.placement = _placement(rank, world, device)
    if before is not None:  # the process alone, then its high-water mark through the load
        runner.memory_marks = {"rss_before_model_bytes": before, "peak_rss_load_bytes": peak_rss()}
    if rank == 0 and runner.step == 0:
        print(
            f"training {runner.trainable:,} of {runner.total:,} parameters "
            f"({cfg.freeze=}) on {world} x {device.type} ({runner.kind}"
            f"{', sharded load' if weights is not None and runner.kind == 'fsdp' else ''}), "
            f"bf16 autocast {'on' if runner.autocast else 'off'}, "
            f"data {'streamed' if config.get('feed') is not None else 'in memory'}",
            flush=True,
        )
    return runner, history


def _data(config: dict[str, Any]) -> Any:
    """The worker's training data: its Ray Data shard (streamed) or every block (in memory)."""
    feed = config.get("feed")
    if feed is None:
        return _materialise(config["train_blocks"])
    import ray.train

    from tli.data.feed import TRAIN, StreamBatches, quiet_data

    quiet_data()
    return StreamBatches(ray.train.get_dataset_shard(TRAIN), feed)


def _writers(ckpt_dir: Path) -> int | str:
    try:
        return json.loads((ckpt_dir / CKPT_STATE).read_text())["world_size"]
    except (OSError, ValueError, KeyError):
        return "?"


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
