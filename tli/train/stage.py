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

from tli import rayenv
from tli.config import Runtime, TrainConfig
from tli.errors import TliError
from tli.modelfolder import ModelFolder
from tli.output import precheck, staged
from tli.provenance import header_fingerprint, package_versions
from tli.train.checkpoint import CKPT_METRICS, CKPT_MODEL, CKPT_STATE, save_hf
from tli.train.inputs import check_context, trained_layers, training_blocks, validation_blocks

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
    train_blocks: int
    runtime: Runtime

    def describe(self) -> dict[str, Any]:
        return {
            "stage": "train",
            "model": str(self.model.path),
            "data": [str(p) for p in self.data] if isinstance(self.data, list) else str(self.data),
            "config": self.cfg.model_dump(mode="json"),
            "trained_layers": list(self.new_layers) if self.new_layers else "all",
            "train_blocks": self.train_blocks,
            "tokens_per_step": self.cfg.seq_len * self.cfg.batch_size * self.cfg.workers
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
    data = inputs["data"]
    data = [Path(p) for p in data] if isinstance(data, list | tuple) else Path(data)
    blocks = training_blocks(data, model.path, cfg)
    return TrainJob(cfg, model, data, new_layers, int(blocks.shape[0]), runtime)


def resumable(out: Path) -> str | None:
    """What an interrupted run left in ``out``: its latest complete checkpoint, if any."""
    latest = latest_checkpoint(out)
    return f"last checkpoint {latest.name}" if latest is not None else None


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder of Ray Train's run in ``out``."""
    run = out / RAY_RUN_NAME
    done = [d for d in run.glob("step_*") if (d / CKPT_STATE).is_file()] if run.is_dir() else []
    return max(done, key=lambda d: d.name) if done else None


def execute(job: TrainJob, out: Path) -> None:
    """Train into ``out``; resume from Ray Train's run there when a checkpoint exists."""
    import ray

    latest = latest_checkpoint(out)
    if latest is not None:
        _check_same_config(latest, job.cfg)
    train_blocks = training_blocks(job.data, job.model.path, job.cfg)  # [n, T]
    val_blocks = validation_blocks(job.data, job.model.path, job.cfg, required=False)
    rt = job.runtime
    t_start = time.perf_counter()
    local = rayenv.will_start_local(rt.ray_address)
    with rayenv.session(rt.ray_address) as started:
        t_ray = time.perf_counter() - t_start
        plan = rayenv.plan_workers(
            ray.cluster_resources().get("CPU", 0), job.cfg.workers,
            share_all=local or started or _single_node(), cpus_per_worker=rt.cpus_per_worker,
            threads=rt.threads,
        )  # fmt: skip
        loop_config = {
            "train": job.cfg.model_dump(mode="json"),
            "model_dir": str(job.model.path.resolve()),
            "train_blocks": ray.put(train_blocks),
            "val_blocks": ray.put(val_blocks) if val_blocks is not None else None,
            "new_layers": list(job.new_layers) if job.new_layers is not None else None,
            "threads": plan.threads,
            "peak_flops": rt.peak_tflops * 1e12 if rt.peak_tflops else None,
            "report_every": rt.report_every,
            "compile": rt.compile,
        }
        from tli.train.worker import make_trainer

        trainer = make_trainer(loop_config, job.cfg, plan, storage=out.resolve(),
                               name=RAY_RUN_NAME, max_failures=rt.max_failures)  # fmt: skip
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without a final checkpoint")
    timing = {"wall_s": time.perf_counter() - t_start, "ray_init_s": t_ray}
    finish(job, out, Path(result.checkpoint.path), timing)


def _single_node() -> bool:
    """A Ray of one node no bigger than this machine (a job on a local head): all ours."""
    import os

    import ray

    return len(ray.nodes()) == 1 and ray.cluster_resources().get("CPU", 0) <= (os.cpu_count() or 1)


def _check_same_config(latest: Path, cfg: TrainConfig) -> None:
    saved = json.loads((latest / CKPT_STATE).read_text())["config"]
    now = cfg.model_dump(mode="json")
    diff = sorted(k for k in now if saved.get(k) != now[k])
    if diff:
        raise TliError(
            f"--resume with a different config than the interrupted run ({', '.join(diff)}): "
            "use the same settings or --force to start over"
        )


def finish(job: TrainJob, out: Path, final: Path, timing: dict[str, float]) -> None:
    """Lay out ``out`` as the finished result from the final checkpoint ``final``."""
    model_out = out / "model"
    if model_out.exists():
        shutil.rmtree(model_out)
    _write_model(job, final / CKPT_MODEL, model_out)
    history = [json.loads(x) for x in (final / CKPT_METRICS).read_text().splitlines() if x.strip()]
    (out / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in history))
    placement = json.loads((final / CKPT_STATE).read_text()).get("placement", [])
    text = json.dumps(_provenance(job, history, placement, timing), indent=2) + "\n"
    (out / TRAIN_PROVENANCE).write_text(text)
    (model_out / TRAIN_PROVENANCE).write_text(text)
    if not job.runtime.keep_checkpoints:
        shutil.rmtree(out / RAY_RUN_NAME, ignore_errors=True)


def _write_model(job: TrainJob, src: Path, model_out: Path) -> None:
    """The trained HF folder, in the input's dtype, with the input's non-weight files."""
    import torch

    # Checkpoints keep fp32 master weights (exact resume); the output keeps the input's dtype.
    config = job.model.config
    in_dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    dtype = getattr(torch, in_dtype, None)
    if not isinstance(dtype, torch.dtype) or dtype == torch.float32:
        shutil.copytree(src, model_out)
    else:
        from tli.modelfolder import load_causal_lm

        m = load_causal_lm(src)
        m.config.dtype = dtype
        save_hf(m, m.state_dict(), model_out, dtype=dtype)
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
