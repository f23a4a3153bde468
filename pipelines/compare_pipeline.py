"""The KFP pipeline of one `tli compare` experiment: a branch per method and seed, on Ray.

Wiring only, built for one experiment (:func:`compare_pipeline_for`): the DAG has a fixed
branch per method and per seed, named in the UI ("train tli seed 0"), so the experiment's
methods, seeds and matched settings are compiled in. Every step is a component of
:mod:`components`, the same as the main pipeline's (import base, data, inject, train, evaluate,
as Ray jobs on the head at ``ray_jobs``, with the same Kubernetes settings: :func:`_step` of
:mod:`pipelines.tli_pipeline`) plus the two of :mod:`components.compare`: a method's settings
(the ``tune`` input of its inject and train) and the report. Branches run side by side; the
report step runs after all of them and calls :func:`tli.compare.run.run_compare`, which finds
every run in the store, as ``tli compare`` would have made them, and writes the report.

One inject (and step-0 evaluation) per method feeds all of its seeds: the versions a branch
shares are made once, never twice at the same time.
"""

# No `from __future__ import annotations`: KFP reads the annotations as types.
import json
from pathlib import Path
from typing import Any, Optional

from kfp import dsl

from components.compare import compare_report, method
from components.data import build_data
from components.evaluate import evaluate
from components.import_base import import_base
from components.inject import inject
from components.train import train
from pipelines.tli_pipeline import DEFAULT_PVC, DEFAULT_STORE, _step
from tli.pipeline.jobs import CLUSTER_JOBS_API


def _json(section: Any) -> str:
    return json.dumps(section.model_dump(mode="json"), sort_keys=True)


def compare_pipeline_for(exp: Any, matched: list, offline: bool = True):
    """The pipeline function of experiment ``exp`` with its methods ``matched`` on the base
    (:func:`tli.compare.run.match_base`).

    Long because it is the whole DAG, read top to bottom: the shared steps, a branch per method
    and seed, the report.
    """
    experiment = json.dumps(exp.to_json(), sort_keys=True)

    @dsl.pipeline(name=f"tli-compare-{exp.name}", description=f"tli compare {exp.name}: "
                  + ", ".join(m.name for m in matched) + f" x seeds {exp.seeds}")  # fmt: skip
    def compare_pipeline(
        store: str = DEFAULT_STORE,
        ray_jobs: Optional[str] = CLUSTER_JOBS_API,  # noqa: UP045 (KFP reads typing annotations)
        rerun: list = [],  # noqa: B006 (a KFP parameter default, never mutated)
        runtime: str = "{}" if offline else '{"offline": false}',
        store_pvc: str = DEFAULT_PVC,
        tracking_config: str = "{}",
    ) -> dsl.Artifact:
        def step(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
            return _step(task, name, store_pvc, offline)

        common = {"store": store, "ray_jobs": ray_jobs, "rerun": rerun, "runtime": runtime}
        tracked = {"tracking_config": tracking_config,
                   "pipeline_run": dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                   "pipeline_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}  # fmt: skip
        ev = _json(exp.eval)
        base = step(import_base(base_config=_json(exp.base), **common), "import base")
        base_model = base.outputs["model"]
        data = step(build_data(data_config=_json(exp.data), base=base_model, **common), "data")
        corpus = data.outputs["dataset"]
        done = [step(evaluate(eval_config=ev, model=base_model, data=corpus, **tracked,
                              **common), "eval base")]  # fmt: skip
        for m in matched:
            settings = _json(m.inject)
            chosen = step(method(inject_config=settings, base=base_model, **common),
                          f"method {m.name}").outputs["result"]  # fmt: skip
            model = step(inject(inject_config=settings, base=base_model, tune=chosen, **common),
                         f"inject {m.name}").outputs["model"]  # fmt: skip
            done.append(step(evaluate(eval_config=ev, model=model, data=corpus, **tracked,
                                      **common), f"eval {m.name} step 0"))  # fmt: skip
            for seed in exp.seeds:
                trained = step(train(train_config=_json(m.train_for(seed)), tune_config="{}",
                                     model=model, data=corpus, tune=chosen, **tracked, **common),
                               f"train {m.name} seed {seed}").outputs["trained"]  # fmt: skip
                done.append(step(evaluate(eval_config=ev, model=trained, data=corpus, **tracked,
                                          **common), f"eval {m.name} seed {seed}"))  # fmt: skip
        rep = step(compare_report(store=store, rerun=rerun, experiment=experiment), "report")
        rep.after(*done)
        return rep.outputs["result"]

    return compare_pipeline


def compile_compare(exp: Any, matched: list, out: Path, image: Optional[str] = None) -> Path:  # noqa: UP045
    """Write experiment ``exp``'s pipeline as KFP IR YAML to ``out`` (steps' image: ``image``)."""
    from pipelines.local import write_compiled

    return write_compiled(compare_pipeline_for(exp, matched), out, image)


def run_compare_local(exp: Any, matched: list, *, store: Path, ray_jobs: Optional[str],  # noqa: UP045
                      rerun: list, runtime: Any) -> Any:  # fmt: skip
    """Run the experiment's pipeline with KFP's local runner; the report's store version."""
    import warnings

    from kfp import local

    from tli.pipeline.store import StageResult

    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")
    print("tli: KFP local runner: images and Kubernetes settings apply on a cluster only")
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(Path(store) / ".kfp"), raise_on_error=True,
               enable_caching=False)  # fmt: skip
    from tli.cli.pipeline import STAGE_RUNTIME  # what reaches the stages, as `tli pipeline run`

    task = compare_pipeline_for(exp, matched)(
        store=str(store), ray_jobs=ray_jobs or "", rerun=list(rerun),  # "": in each step
        runtime=json.dumps(runtime.model_dump(mode="json", include=set(STAGE_RUNTIME))),
    )  # fmt: skip
    artifact = task.outputs["Output"] if hasattr(task, "outputs") else task.output
    ref = json.loads(Path(artifact.path).read_text())
    return StageResult(ref["stage"], ref["version"], Path(ref["path"]), ref["sha256"],
                       ref["status"])  # fmt: skip
