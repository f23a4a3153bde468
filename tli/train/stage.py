"""The train stage: continued pretraining of an (upscaled) model with Ray Train.

:func:`prepare` checks the model, its plan, the context length and the data (at least one
global batch) before Ray starts or anything is written; :func:`execute` joins or starts Ray,
runs :func:`tli.train.worker.make_trainer`'s ``TorchTrainer`` with Ray Train's storage in the
folder it is handed (so a killed run resumes from its last checkpoint there), and lays the
folder out as the result: ``model/`` (an HF folder with the input's tokenizer, ``tli_plan.json``
and provenance), ``metrics.jsonl`` and ``tli_train.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tli import rayenv, remote, tracking
from tli.config import Runtime, TrainConfig
from tli.drills import drill
from tli.errors import TliError
from tli.modelfolder import ModelFolder
from tli.output import precheck, staged
from tli.provenance import header_fingerprint, package_versions
from tli.train.checkpoint import (
    CKPT_METRICS,
    CKPT_STATE,
    checkpoint_complete,
    resume_mismatch,
    write_hf_model,
)
from tli.train.inputs import (
    check_context,
    count_training_blocks,
    trained_layers,
    training_blocks,
    training_stream,
    validation_blocks,
)

METRICS_FILE = "metrics.jsonl"
TRAIN_PROVENANCE = "tli_train.json"
RAY_RUN_NAME = "ray"  # Ray Train's run folder (checkpoints) inside the output being written
# Weight files of an HF folder: never carried over from the input (the trained ones replace them).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
_WEIGHT_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class TrainJob:
    """A training run, checked: the model, its trained layers, the data, how to run it."""

    cfg: TrainConfig
    model: ModelFolder
    data: Path | list[Path]
    new_layers: tuple[int, ...] | None
    train_blocks: int | None  # None: a streamed split not yet tokenised (counted when it is)
    runtime: Runtime

    def describe(self) -> dict[str, Any]:
        return {
            "stage": "train",
            "model": str(self.model.path),
            "data": [str(p) for p in self.data] if isinstance(self.data, list) else str(self.data),
            "config": self.cfg.model_dump(mode="json"),
            "trained_layers": list(self.new_layers) if self.new_layers else "all",
            "train_blocks": self.train_blocks,
            "tokens_per_step": self.cfg.seq_len
            * self.cfg.batch_size
            * self.cfg.workers
            * self.cfg.grad_accum,
        }


def prepare(cfg: TrainConfig, inputs: dict[str, Any], runtime: Runtime) -> TrainJob:
    """Every check before Ray starts: model, plan, context, data, local capacity.

    Args:
        cfg: the ``train`` section.
        inputs: ``{"model": HF folder, "data": corpus folder or file(s)}``.
        runtime: Ray address, threads, CPUs per worker, reports, checkpoints, ...
    """
    model = ModelFolder.open(inputs["model"], tokenizer=True)
    new_layers = trained_layers(model, cfg.freeze)
    check_context(model, cfg.seq_len)
    if rayenv.will_start_local(runtime.ray_address):
        rayenv.check_local_capacity(cfg.workers, 1, cfg.gpu)
    rayenv.check_runtime(runtime.ray_address, runtime.storage, runtime.connect_timeout_s)
    data = inputs["data"]
    data = [Path(p) for p in data] if isinstance(data, list | tuple) else Path(data)
    blocks = count_training_blocks(data, model.path, cfg)
    return TrainJob(cfg, model, data, new_layers, blocks, runtime)


def resumable(out: Path) -> str | None:
    """What an interrupted run left for ``out``: its latest complete checkpoint, if any."""
    latest = latest_checkpoint(out)
    if latest is None:
        return None
    name = latest.rstrip("/").rsplit("/", 1)[-1]  # step_000004
    return f"resuming from step {int(name.rpartition('_')[2])}: checkpoint {latest}"


def latest_checkpoint(out: Path) -> str | None:
    """The newest complete checkpoint of Ray Train's run for ``out``: its folder or s3:// URI.

    The run is in ``out/ray``, or under ``runtime.storage`` where its pointer says
    (:func:`tli.rayenv.ray_run`).
    """
    run = rayenv.ray_run(out, RAY_RUN_NAME)
    steps = [n for n in remote.listdir(run) if n.startswith("step_")]
    done = [n for n in steps if checkpoint_complete(remote.location_join(run, n))]
    return remote.location_join(run, max(done)) if done else None


def execute(job: TrainJob, out: Path) -> None:
    """Train into ``out``; resume from Ray Train's run there when a checkpoint exists."""
    latest = latest_checkpoint(out)
    start_step = _check_same_config(latest, job.cfg) if latest is not None else 0
    rt = job.runtime
    t_start = time.perf_counter()
    with rayenv.session(rt.ray_address, timeout_s=rt.connect_timeout_s) as started:
        t_ray = time.perf_counter() - t_start
        # A cluster that can grow is waited for (the autoscaler asked), one that cannot refused.
        plan = rayenv.plan_on_cluster(
            job.cfg.workers, gpu=job.cfg.gpu, started=started, timeout_s=rt.scale_timeout_s,
            what="train", cpus_per_worker=rt.cpus_per_worker, threads=rt.threads,
        )  # fmt: skip
        data, feed = _worker_data(job, start_step)
        loop_config = {
            "train": job.cfg.model_dump(mode="json"),
            "model_dir": str(job.model.path.resolve()),
            **data,
            "new_layers": list(job.new_layers) if job.new_layers is not None else None,
            "threads": plan.threads,
            "peak_flops": rt.peak_tflops * 1e12 if rt.peak_tflops else None,
            "report_every": rt.report_every,
            "compile": rt.compile,
            "sharded_load": rt.sharded_load,
        }
        from tli.train.worker import make_trainer

        # Ray Train's run: in out/ray, or under runtime.storage (shared folder, s3://) at a
        # sub-path of its own; either way a rerun of this output resumes from its checkpoints.
        storage = rayenv.ray_storage(out, rt.storage, RAY_RUN_NAME)
        trainer = make_trainer(loop_config, job.cfg, plan, storage=storage, name=RAY_RUN_NAME,
                               max_failures=rt.max_failures, feed=feed)  # fmt: skip
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without a final checkpoint")
    timing = {"wall_s": time.perf_counter() - t_start, "ray_init_s": t_ray}
    with result.checkpoint.as_directory() as final:  # the folder itself, or fetched from S3
        finish(job, out, Path(final), timing)
    # The stage's own records, as written, to MLflow / TensorBoard when tracking is on.
    tracking.record_train(
        label=job.model.name,
        params={"train": job.cfg.model_dump(mode="json"), "model": job.model.name},
        history=[json.loads(x) for x in (out / METRICS_FILE).read_text().splitlines() if x],
        final=json.loads((out / TRAIN_PROVENANCE).read_text())["result"],
    )


def _worker_data(job: TrainJob, start_step: int) -> tuple[dict[str, Any], Any]:
    """What the workers read: every block through the object store (``feed: memory``), or
    their own shares streamed by Ray Data (``feed: stream``: a feed spec; the cache is
    tokenised here, with Ray Data, where it lacks shards)."""
    import ray

    cfg = job.cfg
    if cfg.feed == "memory":
        train = ray.put(training_blocks(job.data, job.model.path, cfg))  # [n, T]
        feed = None
    else:
        from tli.data.stream import feed_spec

        index = training_stream(job.data, job.model.path, cfg)
        train, node = None, ray.get_runtime_context().get_node_id()
        feed = feed_spec(index, cfg, start_step, node)  # read tasks run where the cache is
    val = validation_blocks(job.data, job.model.path, cfg, required=False)
    return {"train_blocks": train, "val_blocks": ray.put(val) if val is not None else None}, feed


def _check_same_config(latest: str, cfg: TrainConfig) -> int:
    """Refuse to resume with other settings; the step the interrupted run reached."""
    state = json.loads(remote.read_text(remote.location_join(latest, CKPT_STATE)))
    diff = resume_mismatch(state, cfg)
    if diff:
        raise TliError(
            f"--resume with a different config than the interrupted run ({', '.join(diff)}): "
            "use the same settings or --force to start over"
        )
    return int(state["step"])


def finish(job: TrainJob, out: Path, final: Path, timing: dict[str, float]) -> None:
    """Lay out ``out`` as the finished result from the final checkpoint ``final``."""
    model_out = out / "model"
    if model_out.exists():
        shutil.rmtree(model_out)
    _write_model(job, final, model_out)
    drill("train.finish", 1)  # a no-op unless a fault drill is armed
    history = [json.loads(x) for x in (final / CKPT_METRICS).read_text().splitlines() if x.strip()]
    (out / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in history))
    state = json.loads((final / CKPT_STATE).read_text())
    memory = {m["rank"]: m for m in state.get("memory", [])}  # each worker's peak memory
    placement = [{**w, **memory.get(w.get("rank"), {})} for w in state.get("placement", [])]
    text = json.dumps(_provenance(job, history, placement, timing), indent=2) + "\n"
    (out / TRAIN_PROVENANCE).write_text(text)
    (model_out / TRAIN_PROVENANCE).write_text(text)
    if not job.runtime.keep_checkpoints:
        remote.remove_tree(rayenv.ray_run(out, RAY_RUN_NAME))  # under runtime.storage too
        shutil.rmtree(out / RAY_RUN_NAME, ignore_errors=True)


def _write_model(job: TrainJob, final: Path, model_out: Path) -> None:
    """The trained HF folder, in the input's dtype, with the input's non-weight files."""
    import torch

    # Checkpoints keep fp32 master weights (exact resume), sharded as the workers held them;
    # the output is one HF folder in the input's dtype, written one tensor at a time.
    config = job.model.config
    in_dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    dtype = getattr(torch, in_dtype, None)
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
    write_hf_model(final, model_out, dtype, job.runtime.shard_size)
    # Carry along the input's tokenizer, plan, provenance and any other non-weight files.
    for f in sorted(job.model.path.iterdir()):
        if not f.is_file() or f.suffix in _WEIGHT_SUFFIXES or f.name in _WEIGHT_NAMES:
            continue
        if not (model_out / f.name).exists():
            shutil.copyfile(f, model_out / f.name)


def _provenance(
    job: TrainJob, history: list[dict[str, Any]], placement: list[Any], timing: dict[str, float]
) -> dict[str, Any]:
    last = history[-1] if history else {}
    vals = [m["val_loss"] for m in history if m.get("val_loss") is not None]
    data = job.data
    return {
        "stage": "train",
        "config": job.cfg.model_dump(mode="json"),
        "input": {"name": job.model.name, "files": header_fingerprint(job.model.files)},
        "data": [str(p) for p in data] if isinstance(data, list) else str(data),
        "new_layers": list(job.model.plan.new_layers) if job.model.plan is not None else None,
        "result": {
            "steps": last.get("step"),
            "tokens": last.get("tokens"),
            "final_loss": last.get("loss"),
            "final_val_loss": vals[-1] if vals else None,
            "train_seconds": last.get("elapsed"),
        },
        "workers": placement,
        "timing": timing,
        "versions": package_versions(("torch", "ray", "transformers", "safetensors")),
    }


def run_train(
    model_dir: str | Path,
    out_dir: str | Path,
    data: str | Path | list[str | Path],
    cfg: TrainConfig,
    *,
    resume: bool = False,
    force: bool = False,
    runtime: Runtime | None = None,
) -> Path:
    """Continue pretraining ``model_dir`` on ``data`` with Ray Train; write ``out_dir``.

    The output is staged (:func:`tli.output.staged`): Ray Train's checkpoints live in the
    partial folder ``.<out>.partial`` until the run completes, which is then renamed to
    ``out_dir``. A run that fails or is killed keeps it: ``resume=True`` continues it.

    Args:
        model_dir: HF folder to train (usually from ``tli inject``).
        out_dir: output folder; must not exist unless ``force``.
        data: a corpus folder from ``tli data build`` or text/jsonl/parquet file(s).
        cfg: the ``train`` section of the run config.
        resume: continue an interrupted run from its latest checkpoint (an error if none).
        force: replace an existing ``out_dir`` and discard an interrupted run.
        runtime: Ray address, threads, CPUs per worker, reports, checkpoints, ...

    Returns:
        ``out_dir``.

    Raises:
        TliError: bad input, found before Ray starts or anything is written.
    """
    precheck(Path(out_dir), force=force, protect=[Path(model_dir)])
    job = prepare(cfg, {"model": Path(model_dir), "data": data}, runtime or Runtime())
    with staged(Path(out_dir), force=force, resume=resume, resumable=resumable,
                protect=[job.model.path]) as st:  # fmt: skip
        execute(job, st.path)
    return Path(out_dir)
