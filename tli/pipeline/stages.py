"""The pipeline's stages: a table from stage name to the module that prepares and executes it.

Every stage module has the same two functions, which every entry point (the CLI, the store,
the Ray jobs, the tests) calls:

- ``prepare(config, inputs, runtime) -> Job``: every check of the config and the inputs, and
  the resolved plan; no Ray, no writes (``--dry-run`` prints the job);
- ``execute(job, out_dir)``: the work, written into the folder it is handed (the store's or a
  command's staged output, :mod:`tli.output`; never a temp folder of its own).

A resumable stage (train, tune) also has ``resumable(out_dir) -> str | None``: what a killed
run left to resume from. The table says which config sections a stage reads and which of their
fields change its output (its version hashes exactly those), which inputs it takes from earlier
stages, and which output files are volatile (timings, dates: listed in the manifest but left
out of the content hash).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tli.config import InjectConfig, RunConfig, Runtime, TrainConfig, read_yaml, versioned
from tli.errors import TliError
from tli.provenance import code_hash


@dataclass(frozen=True)
class Stage:
    """One pipeline stage."""

    name: str
    module: str  # where prepare/execute live; the code its version hashes starts here
    sections: tuple[str, ...]  # config sections it reads
    inputs: tuple[str, ...]  # inputs from other stages, by name
    volatile: tuple[str, ...] = ()  # output files left out of the content hash
    resumable: bool = False  # keeps its partial folder when killed, and resumes from it
    model_subdir: str | None = None  # where an HF model folder sits in its output, if anywhere
    seed_of: tuple[str, str] | None = None  # (section, field) recorded as the manifest's seed
    code_extra: tuple[str, ...] = ()  # data files its code reads (globs under tli/)
    # Inputs from outside the store (a user's model folder, the bundled GGUF), named by the
    # stage module's ``external_inputs(section)``: the version hashes their content, not
    # their path, so it is the same on every machine and clone.
    external: bool = False

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def code(self) -> str:
        """The hash of the tli source this stage runs."""
        return code_hash(self.module, self.code_extra)

    def config(self, cfg: RunConfig, inputs: dict[str, Path]) -> Any:
        """What ``prepare`` receives: its one section, or the run config for several."""
        resolved = resolved_config(self.name, cfg, inputs)
        if len(self.sections) == 1:
            return getattr(resolved, self.sections[0])
        return resolved

    def params(self, cfg: RunConfig, inputs: dict[str, Path]) -> dict[str, Any]:
        """The resolved config this stage runs with, less what changes no output: what its
        version hashes."""
        resolved = resolved_config(self.name, cfg, inputs)
        out = {s: versioned(getattr(resolved, s)) for s in self.sections}
        if self.external:
            # The external inputs' content is what counts (hashed as inputs), not their path.
            out = {s: {k: "(content: input source)" if v is not None else None
                       for k, v in f.items()} for s, f in out.items()}  # fmt: skip
        return out

    def external_inputs(self, cfg: RunConfig) -> dict[str, Path]:
        if not self.external:
            return {}
        return self.load().external_inputs(getattr(cfg, self.sections[0]))

    def prepare(self, cfg: RunConfig, inputs: dict[str, Path], runtime: Runtime) -> Any:
        return self.load().prepare(self.config(cfg, inputs), inputs, runtime)

    def execute(self, job: Any, out: Path) -> None:
        self.load().execute(job, out)

    def resume_state(self) -> Any:
        """The stage's resume predicate on its output folder, or None."""
        return self.load().resumable if self.resumable else None


def model_dir(output: Path) -> Path:
    """The HF model folder inside a stage's output (a trained model sits under ``model/``)."""
    for stage in STAGES.values():
        if stage.model_subdir and (output / stage.model_subdir / "config.json").is_file():
            return output / stage.model_subdir
    return output


# ---------------------------------------------------------------------------- tuned config


def _best(tune_out: Path) -> dict[str, Any]:
    f = tune_out / "best.yaml"
    if not f.is_file():
        raise TliError(f"{tune_out} has no best.yaml: the tune stage did not finish")
    return read_yaml(f)


def resolved_config(stage: str, cfg: RunConfig, inputs: dict[str, Path]) -> RunConfig:
    """The run config as ``stage`` sees it: the tune stage's winners replace the searched fields.

    The inject section is the winner's as a whole (interval, init, alpha are what Tune chose);
    of the train section only the learning rate is taken, and only when Tune searched it: steps,
    batch size etc. stay those of the run (a trial's steps are ``tune.trial.steps``).
    """
    tune_out = inputs.get("tune")
    if tune_out is None or stage not in ("inject", "train"):
        return cfg
    best = _best(tune_out)
    if stage == "inject" and best.get("inject"):
        return cfg.model_copy(update={"inject": InjectConfig.model_validate(best["inject"])})
    if stage == "train" and cfg.tune.lrs and (best.get("train") or {}).get("lr") is not None:
        lr = float(best["train"]["lr"])
        train = TrainConfig.model_validate({**cfg.train.model_dump(), "lr": lr})
        return cfg.model_copy(update={"train": train})
    return cfg


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("import-base", "tli.base", ("base",), (), external=True),
        Stage("data", "tli.data.stage", ("data",), ("base",), seed_of=("data", "split_seed")),
        Stage(
            "tune",
            "tli.tune.stage",
            ("inject", "train", "tune"),
            ("base", "data"),
            # Ray's own experiment folder and timings differ between identical searches.
            volatile=("ray/*", "train_runs/*", "*.png", "*.log", "tli_tune.json"),
            resumable=True,
            seed_of=("train", "seed"),
        ),
        Stage("inject", "tli.inject.stage", ("inject",), ("base", "tune")),
        Stage(
            "train",
            "tli.train.stage",
            ("train",),
            ("model", "data", "tune"),
            volatile=("tli_train.json", "model/tli_train.json", "metrics.jsonl", "ray/*"),
            resumable=True,
            model_subdir="model",
            seed_of=("train", "seed"),
        ),
        Stage(
            "eval",
            "tli.eval.stage",
            ("eval",),
            ("model", "data"),
            # lm-eval stamps dates and durations; provenance records the wall time.
            volatile=("results.json", "provenance.json"),
            code_extra=("eval/tasks/**/*.yaml",),
        ),
        Stage(
            "report",
            "tli.pipeline.report",
            (),
            (
                "base",
                "data",
                "tune",
                "inject",
                "train",
                "eval_base",
                "eval_injected",
                "eval_trained",
            ),
            volatile=("*.png", "report.html"),
        ),
    )
}


# The stages `tli compare` adds (tli.compare), in the same store; not steps of the pipeline.
COMPARE_STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        # One method's matched settings, read by inject and train as their `tune` input (where
        # the pipeline has the search's winner) ...
        Stage("method", "tli.compare.method_stage", ("inject",), ("base",)),
        # ... and the comparison's report, whose inputs are every run of every method (the
        # driver, tli.compare.run, hands them to the store; none is fixed here).
        Stage("compare", "tli.compare.report", (), (), volatile=("*.png", "report.html")),
    )
}


def get_stage(name: str) -> Stage:
    """The stage called ``name``, or a one-line error listing the stages."""
    stage = STAGES.get(name) or COMPARE_STAGES.get(name)
    if stage is None:
        known = ", ".join([*STAGES, *COMPARE_STAGES])
        raise TliError(f"unknown stage {name!r}: choose from {known}")
    return stage
