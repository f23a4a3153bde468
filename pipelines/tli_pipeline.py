"""The tli pipeline: import base -> data -> tune -> inject -> train -> eval x3 -> report -> export.

Wiring only. Every step is a component from :mod:`components` that runs its stage as a Ray job
on the head whose Jobs API is ``ray_jobs`` and versions its output in the stage store
(``store``); the stage store, not KFP, decides what is cached, so KFP's own caching is off for
every step. The steps' outputs are typed for the Kubeflow UI (:mod:`tli.pipeline.artifacts`):
``Model`` (base, injected, trained), ``Dataset`` (the corpus), ``Metrics`` (each evaluation, the
search's best trial), ``Markdown`` (the trials) and the report as ``HTML`` and ``Markdown``; the
last step, when ``export_to`` is given, exports the trained model with its model card.

Parameters: one JSON object per run config section (``{}`` = that section's defaults from
:mod:`tli.config`; the store records the resolved values; JSON text rather than a KFP dict
because a section may hold nulls, which KFP's local runner refuses in a dict), the store
folder, the Ray head's Jobs API address, the runtime options (JSON of
:class:`tli.config.Runtime`: threads, shard size, ...; never in a version) and the stages to
recompute. For Kubernetes each step mounts the store's volume (``store_pvc`` at
:data:`STORE_MOUNT`), gets the object-store credentials from a secret as environment
variables, and asks for modest resources: the heavy work runs on the Ray cluster.

Tracking (``tracking_config``: JSON of the ``tracking`` section) reaches train, tune and eval,
with the KFP run's name and id as tags. The pipeline is offline (``HF_HUB_OFFLINE=1`` in every
step); :func:`pipeline_for` with ``offline=False`` gives the online variant, whose steps may
read Hub repos (``HF_HUB_OFFLINE=0``, ``HF_TOKEN`` from the optional secret
:data:`HF_TOKEN_SECRET`) and whose runtime parameter defaults to ``{"offline": false}``.
"""

# No `from __future__ import annotations`: KFP reads the annotations as types.
from typing import Optional

from kfp import dsl, kubernetes

from components.data import build_data
from components.evaluate import evaluate
from components.export import export_model
from components.import_base import import_base
from components.inject import inject
from components.report import report
from components.train import train
from components.tune import tune
from tli.pipeline.jobs import CLUSTER_JOBS_API  # the head service of the cluster in infra/

PIPELINE_NAME = "tli-depth-upscaling"
STORE_MOUNT = "/mnt/tli"  # where the store's volume is mounted in every step (and Ray pod)
DEFAULT_STORE = STORE_MOUNT + "/runs"
DEFAULT_PVC = "tli-store"
OBJECT_STORE_SECRET = "tli-object-store"
# The Ray head's auth token (KubeRay authOptions.secretName): job submission needs it.
RAY_AUTH_SECRET = "tli-ray-auth"
# The Hub token (online variant only): optional, for private or gated repos and pushes.
HF_TOKEN_SECRET = "tli-hf-token"
HUB_ENV_NAMES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
OBJECT_STORE_ENV = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
}
# A step only submits a Ray job and follows its log; the Ray cluster does the work.
STEP_CPU_REQUEST, STEP_CPU_LIMIT = "250m", "1"
STEP_MEMORY_REQUEST, STEP_MEMORY_LIMIT = "512Mi", "2Gi"


def _step(task: dsl.PipelineTask, name: str, store_pvc, offline: bool = True) -> dsl.PipelineTask:
    task.set_display_name(name)
    task.set_caching_options(enable_caching=False)  # the stage store versions and caches
    task.set_cpu_request(STEP_CPU_REQUEST).set_cpu_limit(STEP_CPU_LIMIT)
    task.set_memory_request(STEP_MEMORY_REQUEST).set_memory_limit(STEP_MEMORY_LIMIT)
    for var in HUB_ENV_NAMES:  # runtime.offline, as the steps' environment
        task.set_env_variable(var, "1" if offline else "0")
    if not offline:
        kubernetes.use_secret_as_env(
            task, secret_name=HF_TOKEN_SECRET, secret_key_to_env={"token": "HF_TOKEN"},
            optional=True,
        )  # fmt: skip
    task.set_env_variable("RAY_AUTH_MODE", "token")
    kubernetes.mount_pvc(task, pvc_name=store_pvc, mount_path=STORE_MOUNT)
    kubernetes.use_secret_as_env(
        task, secret_name=OBJECT_STORE_SECRET, secret_key_to_env=OBJECT_STORE_ENV, optional=True
    )
    kubernetes.use_secret_as_env(
        task, secret_name=RAY_AUTH_SECRET, secret_key_to_env={"auth_token": "RAY_AUTH_TOKEN"}
    )
    return task


def pipeline_for(offline: bool = True):
    """The pipeline function, offline (the default, :data:`tli_pipeline`) or online.

    Long because it is the whole DAG, read top to bottom: one call per step, then the
    optional export.
    """

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
    def tli_pipeline(
        store: str = DEFAULT_STORE,
        ray_jobs: Optional[str] = CLUSTER_JOBS_API,  # noqa: UP045 (KFP reads typing annotations)
        rerun: list = [],  # noqa: B006 (a KFP parameter default, never mutated)
        runtime: str = "{}" if offline else '{"offline": false}',
        store_pvc: str = DEFAULT_PVC,
        base_config: str = "{}",
        data_config: str = "{}",
        inject_config: str = "{}",
        tune_config: str = "{}",
        train_config: str = "{}",
        eval_config: str = "{}",
        tracking_config: str = "{}",
        export_to: str = "",
    ) -> dsl.Artifact:
        """Upscale a base model by layer injection, tune, train, evaluate, report, export."""

        def step(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
            return _step(task, name, store_pvc, offline)

        common = {"store": store, "ray_jobs": ray_jobs, "rerun": rerun, "runtime": runtime}
        tracked = {
            "tracking_config": tracking_config,
            "pipeline_run": dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            "pipeline_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        }
        base = step(import_base(base_config=base_config, **common), "import base")
        base_model = base.outputs["model"]
        data = step(build_data(data_config=data_config, base=base_model, **common), "data")
        corpus = data.outputs["dataset"]
        searched = step(
            tune(
                inject_config=inject_config,
                train_config=train_config,
                tune_config=tune_config,
                base=base_model,
                data=corpus,
                **tracked,
                **common,
            ),
            "tune",
        )
        search = searched.outputs["result"]
        injected = step(
            inject(inject_config=inject_config, base=base_model, tune=search, **common), "inject"
        )
        trained = step(
            train(
                train_config=train_config,
                tune_config=tune_config,
                model=injected.outputs["model"],
                data=corpus,
                tune=search,
                **tracked,
                **common,
            ),
            "train",
        )
        models = {"base": base_model, "injected": injected.outputs["model"],
                  "trained": trained.outputs["trained"]}  # fmt: skip
        evals = {}
        for label, model in models.items():
            evals[label] = step(
                evaluate(eval_config=eval_config, model=model, data=corpus, **tracked, **common),
                f"eval {label}",
            ).outputs["result"]
        rep = step(
            report(
                base=base_model,
                data=corpus,
                tune=search,
                inject=models["injected"],
                train=models["trained"],
                eval_base=evals["base"],
                eval_injected=evals["injected"],
                eval_trained=evals["trained"],
                **common,
            ),
            "report",
        )
        with dsl.If(export_to != "", name="export requested"):
            step(
                export_model(store=store, runtime=runtime, export_to=export_to,
                             model=models["trained"]),
                "export",
            ).after(rep)  # fmt: skip
        return rep.outputs["result"]

    return tli_pipeline


tli_pipeline = pipeline_for(offline=True)
