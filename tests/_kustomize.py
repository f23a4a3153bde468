"""A small, strict kustomize renderer for the tests: enough of kustomize for infra/k8s.

Why not the real one: kustomize (or ``kubectl kustomize``) is a Go binary that ``make test`` may
not have; this renders the overlays offline with PyYAML alone. It supports only the
kustomization fields infra/k8s uses, and raises on any other, so a manifest can never lean on a
feature this renderer silently ignores. Where a ``kubectl`` is on hand, tests/test_infra.py
also renders with it and checks that both agree.

Supported: ``resources`` (files and directories), ``namespace``, ``labels`` (``pairs`` with
``includeSelectors: false``: metadata labels only), ``images`` (``newName``, ``newTag``,
``digest``; like kustomize, applied to every ``containers`` / ``initContainers`` list anywhere
in a resource, custom resources included) and inline JSON 6902 ``patches`` (``add``,
``remove``, ``replace``, ``test``) with a ``target`` chosen by group, version, kind and name.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}


class KustomizeError(ValueError):
    """A kustomization this renderer cannot (or must not) render."""


def render(path: Path) -> list[dict[str, Any]]:
    """Render the kustomization in ``path`` (a directory) into its list of resources.

    Args:
        path: a directory holding a ``kustomization.yaml``.

    Returns:
        The resources, in the order their files are listed (bases first).

    Raises:
        KustomizeError: on an unsupported field, a bad patch or a missing file.
    """
    return _render_dir(Path(path).resolve(), stack=())


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise KustomizeError(f"no kustomization file in {directory}")


def _render_dir(directory: Path, stack: tuple[Path, ...]) -> list[dict[str, Any]]:
    if directory in stack:
        raise KustomizeError(f"cycle in resources: {' -> '.join(map(str, stack + (directory,)))}")
    kfile = _kustomization_file(directory)
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - _SUPPORTED
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported field(s) {sorted(unknown)}")
    if k.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{kfile}: kind {k.get('kind')!r} is not supported")

    resources: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            resources += _render_dir(target, stack + (directory,))
        elif target.is_file():
            resources += [d for d in yaml.safe_load_all(target.read_text()) if d]
        else:
            raise KustomizeError(f"{kfile}: resource {entry!r} does not exist")

    for label in k.get("labels", []):
        _apply_labels(label, resources, kfile)
    for image in k.get("images", []):
        _apply_image(image, resources, kfile)
    for patch in k.get("patches", []):
        _apply_patch(patch, resources, kfile)
    if "namespace" in k:
        for res in resources:
            res.setdefault("metadata", {})["namespace"] = k["namespace"]
    return resources


def _apply_labels(label: dict[str, Any], resources: list[dict[str, Any]], kfile: Path) -> None:
    extra = set(label) - {"pairs", "includeSelectors"}
    if extra or label.get("includeSelectors", False):
        raise KustomizeError(f"{kfile}: labels supports only pairs with includeSelectors: false")
    for res in resources:
        res.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    """``name[:tag][@digest]`` -> (name, tag, digest); a ``:`` in a registry port is kept."""
    name, _, digest = image.partition("@")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest or None


def _apply_image(spec: dict[str, Any], resources: list[dict[str, Any]], kfile: Path) -> None:
    extra = set(spec) - {"name", "newName", "newTag", "digest"}
    if extra:
        raise KustomizeError(f"{kfile}: images entry has unsupported field(s) {sorted(extra)}")

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        _retag(container, spec)
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    for res in resources:
        visit(res)


def _retag(container: dict[str, Any], spec: dict[str, Any]) -> None:
    image = container.get("image")
    if not isinstance(image, str):
        return
    name, tag, digest = _split_image(image)
    if name != spec["name"]:
        return
    name = spec.get("newName", name)
    if "digest" in spec:
        container["image"] = f"{name}@{spec['digest']}"
        return
    tag = spec.get("newTag", tag)
    container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _matches(res: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = res.get("apiVersion", "").rpartition("/")
    want = {
        "group": group,
        "version": version,
        "kind": res.get("kind"),
        "name": res.get("metadata", {}).get("name"),
    }
    extra = set(target) - set(want)
    if extra:
        raise KustomizeError(f"patch target field(s) {sorted(extra)} are not supported")
    return all(want[key] == value for key, value in target.items())


def _apply_patch(patch: dict[str, Any], resources: list[dict[str, Any]], kfile: Path) -> None:
    if set(patch) != {"target", "patch"}:
        raise KustomizeError(f"{kfile}: only inline patches with a target are supported")
    ops = yaml.safe_load(patch["patch"])
    if not isinstance(ops, list):
        raise KustomizeError(
            f"{kfile}: only JSON 6902 patches (a list of ops) are supported; strategic-merge "
            "patches replace whole lists in custom resources"
        )
    hits = [res for res in resources if _matches(res, patch["target"])]
    if not hits:
        raise KustomizeError(f"{kfile}: patch target {patch['target']} matches no resource")
    for res in hits:
        for op in ops:
            _apply_op(res, op, kfile)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _apply_op(doc: dict[str, Any], op: dict[str, Any], kfile: Path) -> None:
    kind = op.get("op")
    if kind not in ("add", "remove", "replace", "test"):
        raise KustomizeError(f"{kfile}: JSON patch op {kind!r} is not supported")
    *parents, last = _pointer(op["path"])
    node: Any = doc
    for part in parents:
        node = _child(node, part, op["path"], kfile)
    value = copy.deepcopy(op.get("value"))
    if isinstance(node, list):
        index = len(node) if (kind == "add" and last == "-") else _index(last, op["path"], kfile)
        if kind == "add":
            if index > len(node):
                raise KustomizeError(f"{kfile}: {op['path']}: index out of range")
            node.insert(index, value)
            return
        if index >= len(node):
            raise KustomizeError(f"{kfile}: {op['path']}: index out of range")
        if kind == "remove":
            del node[index]
        elif kind == "replace":
            node[index] = value
        elif node[index] != value:
            raise KustomizeError(f"{kfile}: test failed at {op['path']}")
        return
    if not isinstance(node, dict):
        raise KustomizeError(f"{kfile}: {op['path']}: parent is not an object or a list")
    if kind != "add" and last not in node:
        raise KustomizeError(f"{kfile}: {op['path']} does not exist ({kind})")
    if kind == "remove":
        del node[last]
    elif kind == "test":
        if node[last] != value:
            raise KustomizeError(f"{kfile}: test failed at {op['path']}")
    else:
        node[last] = value


def _index(part: str, path: str, kfile: Path) -> int:
    if not part.isdigit():
        raise KustomizeError(f"{kfile}: {path}: {part!r} is not a list index")
    return int(part)


def _child(node: Any, part: str, path: str, kfile: Path) -> Any:
    if isinstance(node, list):
        index = _index(part, path, kfile)
        if index >= len(node):
            raise KustomizeError(f"{kfile}: {path}: index out of range")
        return node[index]
    if isinstance(node, dict) and part in node:
        return node[part]
    raise KustomizeError(f"{kfile}: {path}: {part!r} does not exist")
