"""``tli compare``: every method x seed through the pipeline's stage functions and store.

:func:`run_compare` runs, for one experiment (:mod:`tli.compare.spec`)::

    import-base -> data -> eval (the base)
    for each method:  method (its matched settings) -> inject -> eval (step 0)
        for each seed:  train -> eval (trained)
    compare (the report, with every run above as its inputs)

Each stage goes through :func:`tli.pipeline.runner.run_stage`, the function the KFP components
call: the same versions, the same store, here in this process (one Ray for the whole run) or
as Ray jobs on the head at ``ray_jobs``. A rerun is therefore cached, and a method or seed
added later runs only what is new. The KFP pipeline of an experiment
(``pipelines/compare_pipeline.py``) runs the same stages side by side on a cluster and then
this same function, which finds every run in the store (``lookup_only``) and writes the report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tli.compare.recipes import Matched, match_methods
from tli.compare.spec import Experiment
from tli.config import Runtime
from tli.errors import TliError
from tli.modelfolder import ModelFolder
from tli.pipeline.store import InputRef, StageResult, Store

REPORT_STAGE = "compare"


@dataclass
class Runs:
    """The store versions of a comparison, by role (what the report reads)."""

    base: StageResult | None = None
    data: StageResult | None = None
    eval_base: StageResult | None = None
    method: dict[str, StageResult] = field(default_factory=dict)
    inject: dict[str, StageResult] = field(default_factory=dict)
    eval_init: dict[str, StageResult] = field(default_factory=dict)
    train: dict[tuple[str, int], StageResult] = field(default_factory=dict)
    eval_final: dict[tuple[str, int], StageResult] = field(default_factory=dict)

    def inputs(self) -> dict[str, StageResult]:
        """Every version by a unique input name (``tli/s0/train``, ``dus/inject``, ...)."""
        out: dict[str, StageResult] = {}
        for key in ("base", "data", "eval_base"):
            r = getattr(self, key)
            if r is not None:
                out[key] = r
        for role in ("method", "inject", "eval_init"):
            for name, r in getattr(self, role).items():
                out[f"{name}/{role}"] = r
        for role in ("train", "eval_final"):
            for (name, seed), r in getattr(self, role).items():
                out[f"{name}/s{seed}/{role}"] = r
        return out


@dataclass(frozen=True)
class CompareResult:
    """What a comparison gave: the report's version and every run behind it."""

    report: StageResult
    runs: Runs
    matched: list[Matched]


class _Stages:
    """Runs (or, with ``lookup_only``, finds) one stage after another through the store."""

    def __init__(self, store: Path, runtime: Runtime, ray_jobs: str | None, rerun: set[str],
                 lookup_only: bool, log: Callable[[str], None]) -> None:  # fmt: skip
        self.store, self.runtime, self.ray_jobs = store, runtime, ray_jobs
        self.rerun, self.lookup_only, self.log = rerun, lookup_only, log
        self.ray = contextlib.ExitStack()
        self.ray_started = False
        self.counts = {"cached": 0, "ran": 0, "reproduced": 0}

    def __call__(self, stage: str, sections: dict[str, Any], refs: dict[str, StageResult],
                 what: str) -> StageResult:  # fmt: skip
        from tli.pipeline import runner

        ref_dicts = {k: v.to_dict() for k, v in refs.items()}
        st, _, _, _, key = runner.prepare(stage, self.store, sections, ref_dicts)
        found = None if stage in self.rerun else st.find(stage, key)
        if found is not None:
            self.log(f"compare: {what}: cached {stage}/{found.name}")
            self.counts["cached"] += 1
            m = st.manifest(stage, found.name)
            return StageResult(stage, found.name, found, m["output_sha256"], "cached")
        if self.lookup_only:
            raise TliError(
                f"{what}: {stage} version {key} is not in the store {self.store}: run that "
                "branch of the comparison first (or run tli compare without the pipeline)"
            )
        if stage in ("train", "tune") and not self.ray_jobs:
            self._ray()
        self.log(f"compare: {what}: running {stage} {key}")
        result = runner.run_stage(stage, store=self.store, sections=sections, refs=ref_dicts,
                                  rerun=stage in self.rerun, ray_jobs=self.ray_jobs,
                                  runtime=self.runtime)  # fmt: skip
        self.counts[result.status] = self.counts.get(result.status, 0) + 1
        return result

    def _ray(self) -> None:
        """One Ray for every training run of this process, started at the first one."""
        if not self.ray_started:
            from tli import rayenv

            self.ray.enter_context(rayenv.session(self.runtime.ray_address))
            self.ray_started = True


def run_compare(
    exp: Experiment,
    *,
    store: str | Path,
    runtime: Runtime | None = None,
    ray_jobs: str | None = None,
    rerun: tuple[str, ...] = (),
    lookup_only: bool = False,
    matched: list[Matched] | None = None,
    log: Callable[[str], None] = print,
) -> CompareResult:
    """Run (or find) every stage of the comparison, then its report; see the module docstring.

    Long because it is the comparison's DAG, read top to bottom: the shared stages, the loop
    over methods and seeds, then the report.

    Args:
        exp: the experiment.
        store: the stage store.
        runtime: how stages run (threads, device, ...); the Ray address for in-process training.
        ray_jobs: a Ray head's Jobs API: each stage runs there as a job; None = in this process.
        rerun: stage names to recompute even when stored.
        lookup_only: find every run in the store instead of running it (the KFP pipeline's last
            step, after its branches ran); a missing one is an error.
        matched: the methods matched on the base (:func:`match_base`), when already done.
        log: where the one-line progress goes.

    Returns:
        The report's version, every run behind it, and each method's matched settings.
    """
    runtime = runtime or Runtime()
    stages = _Stages(Path(store), runtime, ray_jobs, set(rerun), lookup_only, log)
    runs = Runs()
    if matched is None and not lookup_only:
        matched = match_base(exp)  # every check, before any stage runs
    with stages.ray:
        runs.base = stages("import-base", {"base": _json(exp.base)}, {}, "base")
        if matched is None:  # the pipeline's last step: the stored base, as its branches had it
            matched = match_methods(exp, ModelFolder.open(runs.base.output))
        runs.data = stages("data", {"data": _json(exp.data)}, {"base": runs.base}, "data")
        ev = {"eval": _json(exp.eval)}
        runs.eval_base = stages("eval", ev, {"model": runs.base, "data": runs.data}, "base")
        for m in matched:
            inj = {"inject": _json(m.inject)}
            runs.method[m.name] = stages("method", inj, {"base": runs.base}, m.name)
            refs = {"base": runs.base, "tune": runs.method[m.name]}
            runs.inject[m.name] = stages("inject", inj, refs, m.name)
            model = {"model": runs.inject[m.name], "data": runs.data}
            runs.eval_init[m.name] = stages("eval", ev, model, f"{m.name} step 0")
            for seed in exp.seeds:
                what = f"{m.name} seed {seed}"
                train = {"train": _json(m.train_for(seed)), "tune": {}}
                refs = {"model": runs.inject[m.name], "data": runs.data,
                        "tune": runs.method[m.name]}  # fmt: skip
                runs.train[m.name, seed] = tr = stages("train", train, refs, what)
                runs.eval_final[m.name, seed] = stages(
                    "eval", ev, {"model": tr, "data": runs.data}, what
                )
    report = _report(exp, matched, runs, Path(store), REPORT_STAGE in rerun, log)
    c = stages.counts
    log(f"compare: {c['cached']} stages cached, {c['ran']} ran; report {report.output}")
    return CompareResult(report, runs, matched)


def report_component(
    experiment: str, *, store: str, rerun: list[str], output: str, html: str, markdown: str
) -> None:
    """The compare pipeline's last step: find every run its branches stored, write the report
    (if not stored yet), its reference to ``output`` and its pages to the KFP artifacts."""
    import json
    import shutil

    from tli.compare.spec import Experiment

    exp = Experiment.model_validate(json.loads(experiment))
    result = run_compare(exp, store=store, rerun=tuple(rerun), lookup_only=True)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result.report.to_dict(), indent=2) + "\n")
    for src, dst in (("report.html", html), ("report.md", markdown)):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.report.output / src, dst)


def match_base(exp: Experiment) -> list[Matched]:
    """Every method matched on the experiment's base (its folder, or the bundled SmolLM2,
    converted once and cached), from the headers alone: all checks before any stage runs."""
    if exp.base.model:
        folder = Path(exp.base.model)
    else:
        from tli.base import import_base

        folder = import_base()
    return match_methods(exp, ModelFolder.open(folder))


def _json(section: Any) -> dict[str, Any]:
    return section.model_dump(mode="json")


def report_params(exp: Experiment, matched: list[Matched]) -> dict[str, Any]:
    """What the report's version hashes: the experiment and every method's matched settings."""
    return {"experiment": exp.to_json(), "methods": [m.to_dict() for m in matched]}


def _report(exp: Experiment, matched: list[Matched], runs: Runs, store: Path, rerun: bool,
            log: Callable[[str], None]) -> StageResult:  # fmt: skip
    """The report, as a store version whose inputs are every run of the comparison."""
    from tli.compare import report
    from tli.pipeline.stages import get_stage

    spec = get_stage(REPORT_STAGE)
    named = runs.inputs()
    inputs = [InputRef(name=k, path=str(r.output), sha256=r.sha256, stage=r.stage,
                       version=r.version) for k, r in named.items()]  # fmt: skip
    params = report_params(exp, matched)
    job = report.prepare(params, {k: r.output for k, r in named.items()}, Runtime())
    return Store(store).run(REPORT_STAGE, params, inputs, lambda out: report.execute(job, out),
                            code=spec.code(), rerun=rerun, volatile=spec.volatile,
                            log=lambda msg: log(msg))  # fmt: skip
