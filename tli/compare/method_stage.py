"""The ``method`` stage: one compared method's settings on the base, as the search would give them.

In the pipeline, inject and train read their settings from the tune stage's ``best.yaml``
(:func:`tli.pipeline.stages.resolved_config`). A comparison fixes them instead: this stage
checks one method's matched inject settings against the base (its plan and sizes, from the
headers alone) and writes them in that same form, so inject and train run exactly as in the
pipeline, with this version as their ``tune`` input. Output: ``best.yaml`` (``inject``) and
``method.json`` (the settings, the plan's layers and the parameters: total and active).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tli.config import InjectConfig, Runtime
from tli.modelfolder import ModelFolder

BEST_YAML = "best.yaml"  # the file tli.pipeline.stages.resolved_config reads
METHOD_FILE = "method.json"


@dataclass(frozen=True)
class MethodJob:
    """One method's inject settings, checked against the base."""

    cfg: InjectConfig
    base: ModelFolder
    summary: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        """The settings and sizes, as ``--dry-run`` shows them."""
        return {"stage": "method", "base": str(self.base.path), **self.summary}


def prepare(cfg: InjectConfig, inputs: dict[str, Path], runtime: Runtime) -> MethodJob:
    """Plan the injection on the base (headers only, nothing written) and record its sizes."""
    from tli.inject.stage import prepare as plan_inject

    job = plan_inject(cfg, {"base": inputs["base"]}, Runtime(progress=False))
    summary = {
        "inject": cfg.model_dump(mode="json"),
        "layers": {"before": job.plan.num_layers_in, "after": job.plan.num_layers_out},
        "new_layers": list(job.plan.new_layers),
        "function_preserving": job.plan.function_preserving,
        "parameters": job.parameters,
    }
    return MethodJob(cfg, job.base, summary)


def execute(job: MethodJob, out: Path) -> None:
    """Write ``best.yaml`` and ``method.json`` into ``out``."""
    import yaml

    head = "# tli compare: one method's settings, read by inject and train as a search's winner\n"
    doc = {"inject": job.cfg.model_dump(mode="json")}
    (out / BEST_YAML).write_text(head + yaml.safe_dump(doc, sort_keys=False))
    (out / METHOD_FILE).write_text(json.dumps(job.summary, indent=2) + "\n")
