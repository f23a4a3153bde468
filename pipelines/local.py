"""Compile, run locally (KFP's local runner) and submit the tli pipeline: KFP plumbing only.

The CLI (``tli pipeline ...``) calls these lazily, so ``tli`` itself never imports kfp.
"""

import json
from pathlib import Path
from typing import Any

import yaml

from components import IMAGE


def compile_pipeline(out: Path, image: str = IMAGE) -> Path:
    """Write the pipeline's KFP IR YAML to ``out`` (every step's image set to ``image``)."""
    from kfp import compiler

    from pipelines.tli_pipeline import tli_pipeline

    out = Path(out)
    tmp = out.with_name(f".{out.stem}.tmp.yaml")  # KFP insists on the suffix
    compiler.Compiler().compile(tli_pipeline, str(tmp))
    if image != IMAGE:
        docs = list(yaml.safe_load_all(tmp.read_text()))
        for ex in docs[0]["deploymentSpec"]["executors"].values():
            ex["container"]["image"] = image
        header = "".join(x for x in tmp.read_text().splitlines(True) if x.startswith("#"))
        tmp.write_text(header + yaml.safe_dump_all(docs, sort_keys=True))
    tmp.replace(out)
    return out


def run_local(arguments: dict[str, Any], pipeline_root: Path) -> dict[str, Any]:
    """Run the pipeline with KFP's local subprocess runner in this environment.

    Returns:
        The report step's reference (with every upstream stage's reference under ``inputs``).
    """
    import warnings

    from kfp import local

    from pipelines.tli_pipeline import tli_pipeline

    # Expected locally, said once here rather than per task: the Kubernetes settings (resources,
    # volume, secret) and the image are for the cluster; the local runner ignores them.
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")
    print("tli: KFP local runner: images and Kubernetes settings apply on a cluster only")

    # use_venv=False: the default builds a venv per task and pip-installs into it (offline:
    # fails). KFP's own caching stays off: the stage store versions and caches.
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        raise_on_error=True,
        enable_caching=False,
    )
    task = tli_pipeline(**arguments)
    artifact = task.outputs["Output"] if hasattr(task, "outputs") else task.output
    return json.loads(Path(artifact.path).read_text())


def submit(
    host: str, arguments: dict[str, Any], *, image: str, experiment: str | None, run_name: str
) -> str:
    """Compile and submit the pipeline to the Kubeflow Pipelines API at ``host``; the run id."""
    import tempfile
    import warnings

    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kfp warns about API versions on every construction
        client = kfp.Client(host=host)
    client.get_kfp_healthz()  # fails fast when the API is not there
    with tempfile.TemporaryDirectory() as d:
        package = compile_pipeline(Path(d) / "pipeline.yaml", image=image)
        run = client.create_run_from_pipeline_package(
            str(package),
            arguments=arguments,
            run_name=run_name,
            experiment_name=experiment,
            enable_caching=False,
        )
    return run.run_id
