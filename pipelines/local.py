"""Compile, run locally (KFP's local runner) and submit the tli pipeline: KFP plumbing only.

The CLI (``tli pipeline ...``) calls these lazily, so ``tli`` itself never imports kfp.
"""

import json
from pathlib import Path
from typing import Any

import yaml

from components import IMAGE


def compile_pipeline(out: Path, image: str = IMAGE, offline: bool = True) -> Path:
    """Write the pipeline's KFP IR YAML to ``out`` (every step's image set to ``image``;
    ``offline=False``: the online variant, :func:`pipelines.tli_pipeline.pipeline_for`)."""
    from pipelines.tli_pipeline import pipeline_for

    return write_compiled(pipeline_for(offline=offline), out, image)


def write_compiled(pipeline: Any, out: Path, image: str | None = IMAGE) -> Path:
    """Compile ``pipeline`` to KFP IR YAML at ``out``, every step's image set to ``image``."""
    from kfp import compiler

    out = Path(out)
    tmp = out.with_name(f".{out.stem}.tmp.yaml")  # KFP insists on the suffix
    compiler.Compiler().compile(pipeline, str(tmp))
    if image and image != IMAGE:
        docs = list(yaml.safe_load_all(tmp.read_text()))
        for ex in docs[0]["deploymentSpec"]["executors"].values():
            ex["container"]["image"] = image
        header = "".join(x for x in tmp.read_text().splitlines(True) if x.startswith("#"))
        tmp.write_text(header + yaml.safe_dump_all(docs, sort_keys=True))
    tmp.replace(out)
    return out


def run_local(
    arguments: dict[str, Any], pipeline_root: Path, offline: bool = True
) -> dict[str, Any]:
    """Run the pipeline with KFP's local subprocess runner in this environment (the offline or
    the online variant, as ``runtime.offline`` says).

    Returns:
        The report step's reference (with every upstream stage's reference under ``inputs``).
    """
    import warnings

    from kfp import local

    from pipelines.tli_pipeline import pipeline_for

    tli_pipeline = pipeline_for(offline=offline)
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


# KFP run states after which nothing changes.
TERMINAL = ("SUCCEEDED", "SKIPPED", "FAILED", "CANCELED")


def client_kwargs(
    host: str | None,
    *,
    namespace: str | None = None,
    token: str | None = None,
    cookies: str | None = None,
    sa_token: bool = False,
) -> dict[str, Any]:
    """``kfp.Client``'s arguments: the host, the user's namespace, at most one kind of credentials.

    Args:
        host: the KFP API.
        namespace: the user's namespace (multi-user Kubeflow: the profile's).
        token: a bearer token (``existing_token``).
        cookies: a ``Cookie`` header value, e.g. ``authservice_session=...``.
        sa_token: the in-cluster service account token (``$KF_PIPELINES_SA_TOKEN_PATH``, else
            KFP's projected default path).
    """
    kw: dict[str, Any] = {"host": host}
    if namespace:
        kw["namespace"] = namespace
    if token:
        kw["existing_token"] = token
    if cookies:
        kw["cookies"] = cookies
    if sa_token:
        from kfp.client import ServiceAccountTokenVolumeCredentials

        kw["credentials"] = ServiceAccountTokenVolumeCredentials(path=None)
    return kw


def kfp_endpoint(host: str | None) -> tuple[str, bool]:
    """The KFP API to use, and whether it is the in-cluster service (``kfp.Client()``'s default).

    ``host``, else ``$KF_PIPELINES_ENDPOINT``, else, inside a pod, ``ml-pipeline.kubeflow``'s
    service; a one-line TliError outside a cluster with neither.
    """
    import os

    import kfp

    from tli.errors import TliError

    endpoint = host or os.environ.get("KF_PIPELINES_ENDPOINT")
    if endpoint:
        return (endpoint if "://" in endpoint else f"https://{endpoint}"), False
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise TliError(
            "no KFP API: give --host (e.g. http://localhost:8080, a port-forward of "
            "svc/ml-pipeline-ui in namespace kubeflow), or submit from a pod in the cluster"
        )
    return "http://" + kfp.Client._IN_CLUSTER_DNS_NAME.format("kubeflow"), True


def kfp_client(
    host: str | None,
    *,
    timeout_s: float,
    namespace: str | None = None,
    token: str | None = None,
    cookies: str | None = None,
    sa_token: bool = False,
) -> Any:
    """A ``kfp.Client`` for the API that answered a TCP connection within ``timeout_s``.

    In a pod with no credentials given, the service account's KFP token is used when it is
    mounted (what ``kfp.Client()`` does by itself). Raises a one-line TliError when nothing
    answers or the API refuses the client.
    """
    import logging
    import os
    import warnings

    import kfp
    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH

    from tli.errors import TliError
    from tli.rayenv import probe

    url, in_cluster = kfp_endpoint(host)
    if in_cluster and not (token or cookies):
        sa_path = os.environ.get(KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH)
        sa_token = sa_token or Path(sa_path).is_file()
    probe(url, timeout_s, "the Kubeflow Pipelines API", "check --host and the port-forward")
    kw = client_kwargs(url, namespace=namespace, token=token, cookies=cookies, sa_token=sa_token)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # kfp logs a traceback per failed health check
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # kfp warns about API versions on every construction
            return kfp.Client(**kw)
    except Exception as e:  # the health check kfp makes without a namespace, refused
        raise TliError(f"the KFP API at {url} refused the client: {_api_error(e)}") from None
    finally:
        root.setLevel(level)


def submit(
    client: Any,
    arguments: dict[str, Any],
    *,
    image: str,
    experiment: str | None,
    run_name: str,
    namespace: str | None = None,
    offline: bool = True,
) -> tuple[str, str]:
    """Compile and submit the pipeline (the offline or online variant) through ``client``;
    ``(run id, the run's URL)``.

    Raises:
        TliError: the API refused the run (one line: what it said, credentials never shown).
    """
    import tempfile

    from tli.errors import TliError

    with tempfile.TemporaryDirectory() as d:
        package = compile_pipeline(Path(d) / "pipeline.yaml", image=image, offline=offline)
        try:
            run = client.create_run_from_pipeline_package(
                str(package),
                arguments=arguments,
                run_name=run_name,
                experiment_name=experiment,
                namespace=namespace,
                enable_caching=False,
            )
        except Exception as e:  # ApiException, connection errors: the API's answer, in a line
            raise TliError(f"the KFP API refused the run: {_api_error(e)}") from None
    return run.run_id, run_url(client, run.run_id)


def _api_error(e: Exception) -> str:
    """One line for a KFP API error: its status and reason, with a hint for 401/403."""
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    hint = ""
    if status in (401, 403):
        hint = ": check --token-file / --cookies-file / --sa-token and --namespace"
    return f"{f'HTTP {status} ' if status else ''}{str(reason)[:200]}{hint}"


def run_url(client: Any, run_id: str) -> str:
    """The run's page in the KFP UI (``$KF_PIPELINES_UI_ENDPOINT``, else the API's host)."""
    ui = getattr(client, "_uihost", None) or getattr(
        getattr(client, "_existing_config", None), "host", ""
    )
    ui = ui if ui.startswith("http") else f"http://{ui}"
    return f"{ui.rstrip('/')}/#/runs/details/{run_id}"


def follow_run(
    client: Any, run_id: str, *, poll_s: float = 10.0, lost_after_s: float = 300.0
) -> str:
    """Follow a KFP run to its end, printing each step's state when it changes; its last state.

    The API may drop out for a while (a restart, a port-forward reconnecting): polls keep
    trying for ``lost_after_s``, then one line says the run goes on without us.
    """
    import time

    from tli.errors import TliError

    seen: dict[str, str] = {}
    lost: float | None = None
    while True:
        try:
            run = client.get_run(run_id)
            lost = None
        except Exception as e:
            lost = lost or time.monotonic()
            if time.monotonic() - lost > lost_after_s:
                raise TliError(
                    f"lost the KFP API while following run {run_id} ({_api_error(e)}): the run "
                    f"goes on; see {run_url(client, run_id)}"
                ) from None
            time.sleep(poll_s)
            continue
        details = getattr(run, "run_details", None)
        for task in (getattr(details, "task_details", None) or []) if details else []:
            name, state = str(task.display_name), str(task.state)
            if seen.get(name) != state:
                seen[name] = state
                print(f"  {name:<24} {state}", flush=True)
        state = str(run.state)
        if state in TERMINAL:
            return state
        time.sleep(poll_s)
