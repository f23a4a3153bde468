"""The tli pipeline: import base -> data -> tune -> inject -> train -> eval x3 -> report.

Wiring only. Every step is a component from :mod:`components` that runs its stage as a Ray job
on the head whose Jobs API is ``ray_jobs`` and versions its output in the stage store
(``store``); the stage store, not KFP, decides what is cached, so KFP's own caching is off for
every step.

Parameters: one JSON object per run config section (``{}`` = that section's defaults from
:mod:`tli.config`; the store records the resolved values; JSON text rather than a KFP dict
because a section may hold nulls, which KFP's local runner refuses in a dict), the store
folder, the Ray head's Jobs API address, the runtime options (JSON of
:class:`tli.config.Runtime`: threads, shard size, ...; never in a version) and the stages to
recompute. For Kubernetes each step mounts the store's volume (``store_pvc`` at
:data:`STORE_MOUNT`), gets the object-store credentials from a secret as environment
variables, and asks for modest resources: the heavy work runs on the Ray cluster.
"""

# No `from __future__ import annotations`: KFP reads the annotations as types.
from typing import Optional

from kfp import dsl, kubernetes

from components.data import build_data
from components.evaluate import evaluate
from components.import_base import import_base
from components.inject import inject
from components.report import report
from components.train import train
from components.tune import tune

PIPELINE_NAME = "tli-depth-upscaling"
STORE_MOUNT = "/mnt/tli"  # where the store's volume is mounted in every step (and Ray pod)
DEFAULT_STORE = STORE_MOUNT + "/runs"
DEFAULT_PVC = "tli-store"
OBJECT_STORE_SECRET = "tli-object-store"
# The Ray head's auth token (KubeRay authOptions.secretName): job submission needs it.
RAY_AUTH_SECRET = "tli-ray-auth"
OBJECT_STORE_ENV = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
}
# A step only submits a Ray job and follows its log; the Ray cluster does the work.
STEP_CPU_REQUEST, STEP_CPU_LIMIT = "250m", "1"
STEP_MEMORY_REQUEST, STEP_MEMORY_LIMIT = "512Mi", "2Gi"


def _step(task: dsl.PipelineTask, name: str, store_pvc) -> dsl.PipelineTask:
    task.set_display_name(name)
    task.set_caching_options(enable_caching=False)  # the stage store versions and caches
    task.set_cpu_request(STEP_CPU_REQUEST).set_cpu_limit(STEP_CPU_LIMIT)
    task.set_memory_request(STEP_MEMORY_REQUEST).set_memory_limit(STEP_MEMORY_LIMIT)
    task.set_env_variable("HF_HUB_OFFLINE", "1")
    task.set_env_variable("RAY_AUTH_MODE", "token")
    kubernetes.mount_pvc(task, pvc_name=store_pvc, mount_path=STORE_MOUNT)
    kubernetes.use_secret_as_env(
        task, secret_name=OBJECT_STORE_SECRET, secret_key_to_env=OBJECT_STORE_ENV, optional=True
    )
    kubernetes.use_secret_as_env(
        task, secret_name=RAY_AUTH_SECRET, secret_key_to_env={"auth_token": "RAY_AUTH_TOKEN"}
    )
    return task


@dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
def tli_pipeline(
    store: str = DEFAULT_STORE,
    ray_jobs: Optional[str] = None,  # noqa: UP045 (KFP reads typing annotations)
    rerun: list = [],  # noqa: B006 (a KFP parameter default, never mutated)
    runtime: str = "{}",
    store_pvc: str = DEFAULT_PVC,
    base_config: str = "{}",
    data_config: str = "{}",
    inject_config: str = "{}",
    tune_config: str = "{}",
    train_config: str = "{}",
    eval_config: str = "{}",
) -> dsl.Artifact:
    """Upscale a base model by layer injection, tune, train, evaluate and report."""
    common = {"store": store, "ray_jobs": ray_jobs, "rerun": rerun, "runtime": runtime}
    base = _step(import_base(base_config=base_config, **common), "import base", store_pvc)
    base_ref = base.outputs["result"]
    data = _step(build_data(data_config=data_config, base=base_ref, **common), "data", store_pvc)
    data_ref = data.outputs["result"]
    searched = _step(
        tune(
            inject_config=inject_config,
            train_config=train_config,
            tune_config=tune_config,
            base=base_ref,
            data=data_ref,
            **common,
        ),
        "tune",
        store_pvc,
    )
    tune_ref = searched.outputs["result"]
    injected = _step(
        inject(inject_config=inject_config, base=base_ref, tune=tune_ref, **common),
        "inject",
        store_pvc,
    )
    trained = _step(
        train(
            train_config=train_config,
            tune_config=tune_config,
            model=injected.outputs["result"],
            data=data_ref,
            tune=tune_ref,
            **common,
        ),
        "train",
        store_pvc,
    )
    evals = {}
    for label, model in (("base", base), ("injected", injected), ("trained", trained)):
        evals[label] = _step(
            evaluate(
                eval_config=eval_config, model=model.outputs["result"], data=data_ref, **common
            ),
            f"eval {label}",
            store_pvc,
        ).outputs["result"]
    rep = _step(
        report(
            base=base_ref,
            data=data_ref,
            tune=tune_ref,
            inject=injected.outputs["result"],
            train=trained.outputs["result"],
            eval_base=evals["base"],
            eval_injected=evals["injected"],
            eval_trained=evals["trained"],
            **common,
        ),
        "report",
        store_pvc,
    )
    return rep.outputs["result"]
