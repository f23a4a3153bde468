"""The inject stage: a plan executed as a stream from the base's shards to the output folder.

The streaming executor never holds the model: unchanged tensors are copied as byte ranges,
zeroed projections are holes in the output file, and only tensors that must be computed
(interpolation, a fractional ``alpha``; for MoE upcycling a random router or a noised expert)
are read, one at a time. torch is imported only in that last case.

Every method goes through the same :func:`prepare` / :func:`execute`: ``tli``, ``llama-pro``,
``dus`` and ``stack`` change the layer stack (:mod:`tli.inject.surgery`); ``moe`` keeps it and
turns each MLP into experts (:mod:`tli.inject.moe`), writing the family's MoE sibling.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tli import __version__
from tli.config import InjectConfig, Runtime
from tli.errors import TliError
from tli.inject.moe import FAMILIES, moe_config, moe_param_counts, moe_tensors
from tli.inject.plan import PLAN_FILE, Plan, make_plan, moe_spec
from tli.inject.stio import INDEX_FILE, OutTensor, read_header, write_checkpoint
from tli.inject.surgery import layer_lists, numel, plan_tensors, rewrite_config
from tli.modelfolder import ModelFolder
from tli.output import precheck, staged
from tli.provenance import header_fingerprint, package_versions

PROVENANCE_FILE = "tli_provenance.json"
# Files of the input folder that are never carried over: weights (rewritten), pickles (never
# touched), remote code (never run), and our own outputs (rewritten).
_SKIP_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".py", ".gguf"}
_SKIP_NAMES = {"config.json", INDEX_FILE, "README.md", PLAN_FILE, PROVENANCE_FILE}


@dataclass(frozen=True)
class InjectJob:
    """Everything an injection needs, checked: the base, the plan, every output tensor."""

    cfg: InjectConfig
    base: ModelFolder
    plan: Plan
    config_out: dict[str, Any]
    tensors: tuple[OutTensor, ...]
    shard_bytes: int
    writers: int | None
    progress: bool
    moe: dict[str, Any] | None = None  # MoE upcycling: the sibling, the MoeSpec, active params

    @property
    def params_out(self) -> int:
        return sum(numel(t.shape) for t in self.tensors)

    @property
    def parameters(self) -> dict[str, int]:
        """Parameters before and after (and, for MoE, those one token uses: ``active``)."""
        out = {"before": self.base.parameters, "after": self.params_out}
        if self.moe is not None:
            out["active"] = self.moe["active_parameters"]
        return out

    def describe(self) -> dict[str, Any]:
        """What ``--dry-run`` shows: the plan and the sizes, nothing written."""
        out = {
            "stage": "inject",
            "base": str(self.base.path),
            "plan": self.plan.to_dict(),
            "parameters": self.parameters,
            "bytes_out": sum(t.nbytes for t in self.tensors),
        }
        if self.moe is not None:
            out["moe"] = self.moe
        return out


def prepare(cfg: InjectConfig, inputs: dict[str, Path], runtime: Runtime) -> InjectJob:
    """Check the base model folder and the inject config; plan every output tensor.

    Args:
        cfg: the ``inject`` section.
        inputs: ``{"base": the base model folder}``.
        runtime: shard size, writer threads, progress bar.
    """
    base = ModelFolder.open(inputs["base"])
    assert base.arch is not None  # decoder=True
    arch = (base.config.get("architectures") or ["?"])[0]
    if arch in {f.architecture for f in FAMILIES.values()}:
        raise TliError(
            f"{base.path} is an MoE model ({arch}): tli injects into dense decoders; inject "
            "layers into the dense model first, then upcycle it"
        )
    n = base.num_layers
    plan = make_plan(n, cfg)
    moe = None
    if plan.method == "moe":
        spec = moe_spec(cfg)
        config_out = moe_config(base.config, spec)
        tensors = moe_tensors(base.tensors, base.config, spec)
        counts = moe_param_counts(base.config, spec)
        moe = {"architecture": config_out["architectures"][0], "spec": spec.to_dict(),
               "total_parameters": counts.total, "active_parameters": counts.active}  # fmt: skip
    else:
        lists = layer_lists(base.path, base.config, base.arch, n)
        tensors = plan_tensors(base.tensors, plan, base.arch)
        config_out = rewrite_config(base.config, plan, base.arch, lists)
    return InjectJob(cfg=cfg, base=base, plan=plan, config_out=config_out,
                     tensors=tuple(tensors), shard_bytes=runtime.shard_size,
                     writers=runtime.writers, progress=runtime.progress, moe=moe)  # fmt: skip


def execute(job: InjectJob, out: Path) -> None:
    """Write the upscaled model folder into ``out`` (an existing, empty folder)."""
    _, meta = read_header(job.base.files[0])
    total = sum(t.nbytes for t in job.tensors)
    with _bar(total, job.progress) as advance:
        write_checkpoint(out, list(job.tensors), max_shard_bytes=job.shard_bytes, metadata=meta,
                         progress=advance, threads=job.writers)  # fmt: skip
    for f in sorted(job.base.path.iterdir()):
        if f.is_file() and f.suffix not in _SKIP_SUFFIXES and f.name not in _SKIP_NAMES:
            shutil.copyfile(f, out / f.name)
    (out / "config.json").write_text(json.dumps(job.config_out, indent=2) + "\n")
    (out / PLAN_FILE).write_text(job.plan.to_json())
    prov = {
        "stage": "inject",
        "config": job.cfg.model_dump(mode="json"),
        "plan": job.plan.to_dict(),
        "base": {"name": job.base.name, "files": header_fingerprint(job.base.files)},
        "parameters": job.parameters,
        **({"moe": job.moe} if job.moe is not None else {}),
        "versions": package_versions(("safetensors", "torch", "transformers")),
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2) + "\n")
    (out / "README.md").write_text(_model_card(job))


def run_inject(
    model_dir: str | Path,
    out_dir: str | Path,
    cfg: InjectConfig,
    *,
    force: bool = False,
    runtime: Runtime | None = None,
) -> Path:
    """Inject layers into the HF model at ``model_dir``; write the result to ``out_dir``.

    The folder is staged (:func:`tli.output.staged`): written beside ``out_dir`` and renamed
    when complete; ``force`` replaces an existing one only then.

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    precheck(out, force=force, protect=[Path(model_dir)])
    job = prepare(cfg, {"base": Path(model_dir)}, runtime or Runtime())
    with staged(out, force=force, protect=[job.base.path]) as st:
        execute(job, st.path)
    return out


def _model_card(job: InjectJob) -> str:
    """README.md of the output: what was made, from what, and where the full record is."""
    plan, p = job.plan, job.plan.params
    base_name = job.base.name
    if job.moe is not None:
        return _moe_card(job)
    lines = [
        f"# {base_name}, upscaled with tli ({plan.method})",
        "",
        f"Made with tli {__version__} (Transformer Layer Injection) from `{base_name}`.",
        "",
        "| | base | upscaled |",
        "|---|---:|---:|",
        f"| layers | {plan.num_layers_in} | {plan.num_layers_out} |",
        f"| parameters | {job.base.parameters:,} | {job.params_out:,} |",
        "",
        f"- method: `{plan.method}`; parameters: "
        + ", ".join(f"{k}={v}" for k, v in p.items() if v is not None),
        f"- injected layers (output indices): {list(plan.new_layers)}",
        f"- function-preserving: {'yes' if plan.function_preserving else 'no'}",
    ]
    if plan.method == "llama-pro":
        lines.append("- LLaMA Pro: train only the injected layers (`train.freeze: original`)")
    lines += [
        "",
        "The full plan (each output layer's source and init) is in `tli_plan.json`; the config "
        "and input fingerprint in `tli_provenance.json`.",
        "",
    ]
    return "\n".join(lines)


def _moe_card(job: InjectJob) -> str:
    moe = job.moe
    assert moe is not None
    spec = moe["spec"]
    lines = [
        f"# {job.base.name}, upcycled to {moe['architecture']} with tli (moe)",
        "",
        f"Made with tli {__version__} by sparse upcycling (arXiv 2212.05055) of "
        f"`{job.base.name}`: every MLP became {spec['experts']} experts, copies of it, and a "
        f"router that sends each token to {spec['top_k']} of them.",
        "",
        "| | dense | MoE |",
        "|---|---:|---:|",
        f"| layers | {job.plan.num_layers_in} | {job.plan.num_layers_out} |",
        f"| parameters | {job.base.parameters:,} | {moe['total_parameters']:,} |",
        f"| parameters per token (active) | {job.base.parameters:,} | "
        f"{moe['active_parameters']:,} |",
        "",
        f"- router: {spec['router_init']} (seed {spec['seed']}); expert noise (Drop-Upcycling "
        f"share re-initialised): {spec['noise']}",
        f"- load-balancing loss weight in training: {spec['router_aux_loss_coef']}",
        f"- function-preserving: {'yes' if job.plan.function_preserving else 'no'} (identical "
        "experts with renormalised top-k weights compute the dense MLP)",
        "- train all parameters (`train.freeze: none`): the layer stack is unchanged, so there "
        "are no new layers for `freeze: original`",
        "",
        "The settings are in `tli_plan.json` and `tli_provenance.json`.",
        "",
    ]
    return "\n".join(lines)


@contextmanager
def _bar(total: int, enabled: bool):
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("inject"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as prog:
        task = prog.add_task("inject", total=total)
        yield lambda n: prog.advance(task, n)


__all__ = ["InjectJob", "prepare", "execute", "run_inject"]
