"""Online mode: base models and datasets named as Hugging Face Hub repos, read once into a cache.

tli is offline by default (``runtime.offline: true``): nothing reaches a model or dataset hub.
With ``runtime.offline: false`` two settings may name a Hub repo instead of a local folder:

- ``base.model: org/name[@revision]`` (a model repo), and
- ``data.dataset: org/name[@revision][:config]`` (a dataset repo; its ``train`` split).

A value is a Hub name when it starts with ``hf:`` or, without the prefix, when it has the form
``org/name`` and is not an existing local path (a local folder always wins). The revision is a
branch, a tag or a commit (default ``main``). :func:`resolve` turns a name into a
:class:`Snapshot`: a local folder in huggingface_hub's cache layout
(``models--org--name/snapshots/<commit>/``) and the commit it holds. The download happens once;
later runs find the snapshot in the cache. What a stage depends on is the snapshot's *content*
(the base's folder is hashed into the import-base version) and the commit is recorded
(``tli_hub.json`` in the stored base, the corpus manifest's source entry).

Where the cache is: ``$HF_HUB_CACHE`` (or ``$HF_HOME/hub``) when set, else, for a stage run
through the store, ``<store>/.cache/huggingface/hub`` (the store's volume is the one path every
step and Ray pod shares), else huggingface_hub's default. ``HF_HUB_OFFLINE=1`` is honoured:
with it, names are served from the cache only (an air-gapped cluster with a pre-filled cache),
and a name that is not there is one clear error. The token for private or gated repos is
``$HF_TOKEN`` (on Kubernetes: from a secret); it is never printed or recorded.

Only what tli loads is fetched: a model's top-level ``*.json``, ``*.safetensors``, tokenizer and
licence files (never pickled weights, never code); a dataset's data files.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tli.errors import TliError

PREFIX = "hf:"
TOKEN_ENV = "HF_TOKEN"
OFFLINE_SETTING = "runtime.offline: false (--no-offline; in a pipeline the runtime parameter)"
RECORD = "tli_hub.json"  # what a stored base from the Hub says about its source

RepoType = Literal["model", "dataset"]

# What tli reads from a model repo (top level only: no sub-folders of ONNX or original weights).
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja",
               "README.md", "LICENSE*"]  # fmt: skip
MODEL_IGNORE = ["*/*"]
DATASET_FILES = ["*.parquet", "*.jsonl", "*.jsonl.gz", "*.json", "*.json.gz", "*.txt", "*.csv",
                 "*.arrow", "README.md", "LICENSE*"]  # fmt: skip

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_NAME = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[^\s:@]+))?(?::(?P<config>[\w.-]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class HubName:
    """A parsed Hub name: ``org/name``, the revision asked for and (datasets) the config."""

    repo_id: str
    revision: str | None
    config: str | None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        cfg = f":{self.config}" if self.config else ""
        return f"{self.repo_id}{rev}{cfg}"


@dataclass(frozen=True)
class Snapshot:
    """A Hub repo at one commit, as a local folder in the cache."""

    name: HubName
    repo_type: RepoType
    path: Path  # the snapshot folder (files may be links into the cache's blobs)
    commit: str  # the 40-hex commit the revision resolved to

    def record(self) -> dict[str, Any]:
        """What is recorded with the stage's output: the repo, its type and the commit.

        The revision as asked for is left out: ``org/name`` and ``org/name@<commit>`` are the
        same content and give the same record.
        """
        return {"repo_id": self.name.repo_id, "repo_type": self.repo_type, "commit": self.commit}


def parse(text: str | None) -> HubName | None:
    """The Hub name in ``text``, or None when it names a local path (or nothing).

    ``hf:`` forces a Hub name; without it, ``org/name[@rev][:config]`` is one unless a file or
    folder of that name exists here.

    Raises:
        TliError: ``hf:`` followed by something that is not a repo name.
    """
    if not text:
        return None
    forced = text.startswith(PREFIX)
    body = text[len(PREFIX) :] if forced else text
    m = _NAME.fullmatch(body)
    if m is None or ".." in m.group("repo"):
        if forced:
            raise TliError(
                f"{text!r} is not a Hub name: write hf:org/name, hf:org/name@revision or "
                "hf:org/name:config"
            )
        return None
    if not forced and Path(text).exists():
        return None
    return HubName(m.group("repo"), m.group("rev"), m.group("config"))


def is_hub_name(text: str | None) -> bool:
    """Whether ``text`` names a Hub repo (see :func:`parse`)."""
    return parse(text) is not None


# ---------------------------------------------------------------------------- online or not


@dataclass
class _Mode:
    online: bool
    store_cache: Path | None
    resolved: dict[tuple[str, str], Snapshot] = field(default_factory=dict)


_MODE: contextvars.ContextVar[_Mode | None] = contextvars.ContextVar("tli_hub_mode", default=None)


@contextlib.contextmanager
def mode(*, offline: bool, store: str | Path | None = None) -> Iterator[None]:
    """Run a stage online or offline (``runtime.offline``); every name resolves once inside.

    Args:
        offline: ``runtime.offline``: True refuses every Hub name.
        store: the stage store, whose ``.cache/huggingface/hub`` is the cache unless the
            environment names one.
    """
    cache = Path(store) / ".cache" / "huggingface" / "hub" if store is not None else None
    token = _MODE.set(_Mode(online=not offline, store_cache=cache))
    try:
        yield
    finally:
        _MODE.reset(token)


def online() -> bool:
    """Whether Hub names are allowed here (outside :func:`mode`: no, the default)."""
    m = _MODE.get()
    return m is not None and m.online


def hub_offline_env() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads (the cache still serves)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def cache_dir() -> Path:
    """The Hub cache: ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, the store's, or the default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HUB_CACHE"])))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"]))) / "hub"
    m = _MODE.get()
    if m is not None and m.store_cache is not None:
        return m.store_cache
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def token() -> str | None:
    """The Hub token from the environment (``$HF_TOKEN``), or None (anonymous)."""
    return os.environ.get(TOKEN_ENV) or None


def check_allowed(name: HubName, setting: str, offline: bool | None = None) -> None:
    """Refuse a Hub name when tli runs offline: one line naming the setting to change.

    Args:
        name: the Hub name.
        setting: the config field it came from.
        offline: ``runtime.offline`` when the caller has it; None = the current :func:`mode`.
    """
    if (not online()) if offline is None else offline:
        raise TliError(
            f"{setting} {str(name)!r} is not a local path here; as a Hugging Face Hub repo it "
            f"needs network access, and tli runs offline: set {OFFLINE_SETTING}, or give a "
            "local folder"
        )


# ---------------------------------------------------------------------------- resolving


def resolve(
    text: str, repo_type: RepoType, *, setting: str, offline: bool | None = None
) -> Snapshot:
    """The local snapshot of the Hub repo ``text`` names: from the cache, else downloaded.

    Args:
        text: a Hub name (see :func:`parse`).
        repo_type: ``model`` or ``dataset``.
        setting: the config field it came from, for messages (``base.model``).
        offline: ``runtime.offline`` when the caller has it; None = the current :func:`mode`.

    Returns:
        The :class:`Snapshot`; the same one for the same name within one :func:`mode`.

    Raises:
        TliError: offline, not a Hub name, not in the cache under ``HF_HUB_OFFLINE=1``, not
            found, not allowed (token), or without what tli needs.
    """
    name = parse(text)
    if name is None:
        raise TliError(f"{setting} {text!r} is not a Hub name (org/name[@revision])")
    check_allowed(name, setting, offline)
    if repo_type == "model" and name.config:
        raise TliError(f"{setting} {text!r}: a model repo has no ':config' part")
    m = _MODE.get()
    key = (repo_type, str(name))
    if m is not None and key in m.resolved:
        return m.resolved[key]
    path = _download(name, repo_type, setting)
    snap = Snapshot(name, repo_type, path, path.name if _COMMIT.fullmatch(path.name) else "")
    if not snap.commit:
        raise TliError(f"{setting} {text!r}: the cache gave {path}, which is not a snapshot folder")
    if repo_type == "model":
        _check_model(snap, setting)
    if m is not None:
        m.resolved[key] = snap
    return snap


# The settings that may name Hub repos: (section, field, repo type).
HUB_SETTINGS = (("base", "model", "model"), ("data", "dataset", "dataset"))


def pin(sections: dict[str, Any]) -> dict[str, Any]:
    """The config sections with every Hub name pinned to its commit (``hf:org/name@<commit>``).

    The pinned form is canonical: ``org/name``, ``hf:org/name@main`` and ``org/name@<commit>``
    at the same commit give the same text, hence the same version.

    Done once, before a stage's version is worked out: the version then says which commit the
    stage read (a branch that moves gives a new version, never a stale cached one), and a Ray
    job or a retried step reads that very commit. Offline, or for local paths, nothing changes.
    """
    if not online():
        return sections
    out = dict(sections)
    for section, key, repo_type in HUB_SETTINGS:
        value = (out.get(section) or {}).get(key)
        name = parse(value) if isinstance(value, str) else None
        if name is None:
            continue
        snap = resolve(value, repo_type, setting=f"{section}.{key}")  # type: ignore[arg-type]
        pinned = f"{PREFIX}{name.repo_id}@{snap.commit}"
        pinned += f":{name.config}" if name.config else ""
        out[section] = {**out[section], key: pinned}
    return out


def _download(name: HubName, repo_type: RepoType, setting: str) -> Path:
    """``snapshot_download`` of the files tli reads; its errors as one line each."""
    import huggingface_hub
    from huggingface_hub import errors

    patterns = MODEL_FILES if repo_type == "model" else DATASET_FILES
    cache = cache_dir()
    offline_env = hub_offline_env()
    try:
        folder = huggingface_hub.snapshot_download(
            name.repo_id,
            repo_type=repo_type,
            revision=name.revision,
            cache_dir=str(cache),
            allow_patterns=patterns,
            ignore_patterns=MODEL_IGNORE if repo_type == "model" else None,
            local_files_only=offline_env,
            token=token(),
        )
    except errors.GatedRepoError:
        raise TliError(
            f"{setting} {str(name)!r} is a gated Hub repo: accept its terms on the Hub and set "
            f"{TOKEN_ENV} to a token with access"
        ) from None
    except errors.RepositoryNotFoundError:
        raise TliError(
            f"{setting} {str(name)!r}: no such {repo_type} repo on the Hub (or it is private: "
            f"set {TOKEN_ENV})"
        ) from None
    except errors.RevisionNotFoundError:
        raise TliError(
            f"{setting} {str(name)!r}: the repo has no revision {name.revision!r}"
        ) from None
    except errors.LocalEntryNotFoundError as e:
        incomplete = isinstance(e, errors.IncompleteSnapshotError)
        what = "is incomplete in" if incomplete else "is not in"
        why = (
            "HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE (or set it to 0)"
            if offline_env
            else "the Hub could not be reached: check the network (HF_ENDPOINT) and retry"
        )
        raise TliError(f"{setting} {str(name)!r} {what} the Hub cache {cache}, and {why}") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        first = " ".join(str(e).split())[:200] or type(e).__name__
        raise TliError(f"{setting} {str(name)!r}: cannot read it from the Hub ({first})") from None
    return Path(folder)


def _check_model(snap: Snapshot, setting: str) -> None:
    files = {p.name for p in snap.path.iterdir()}
    if "config.json" not in files:
        raise TliError(f"{setting} {str(snap.name)!r}: the repo has no config.json at its top")
    if not any(f.endswith(".safetensors") for f in files):
        raise TliError(
            f"{setting} {str(snap.name)!r}: the repo has no .safetensors weights (tli never "
            "loads pickled weights)"
        )


def write_record(snap: Snapshot, folder: Path) -> Path:
    """Write ``tli_hub.json`` (repo, type, commit) into ``folder``; return its path."""
    path = Path(folder) / RECORD
    path.write_text(json.dumps(snap.record(), indent=2) + "\n")
    return path


def read_record(folder: Path) -> dict[str, Any] | None:
    """The ``tli_hub.json`` of a folder that came from the Hub, or None."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------- pushing


def push_folder(folder: Path, repo_id: str, *, private: bool = True, message: str) -> str:
    """Upload ``folder`` to the Hub model repo ``repo_id`` (created when missing, private).

    Needs online mode and a token with write access (``$HF_TOKEN``).

    Returns:
        The URL of the commit made.

    Raises:
        TliError: offline (either setting), not a repo name, no token, or the Hub refused.
    """
    name = parse(repo_id if repo_id.startswith(PREFIX) else PREFIX + repo_id)
    if name is None or name.revision or name.config:
        raise TliError(f"--push-to-hub {repo_id!r}: write org/name")
    check_allowed(name, "--push-to-hub")
    if hub_offline_env():
        raise TliError("--push-to-hub needs the network, but HF_HUB_OFFLINE=1: unset it")
    if token() is None:
        raise TliError(f"--push-to-hub needs a Hub token with write access: set {TOKEN_ENV}")
    from huggingface_hub import HfApi, errors

    api = HfApi(token=token())
    try:
        api.create_repo(name.repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=name.repo_id, folder_path=str(folder), commit_message=message
        )
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        first = " ".join(str(e).split())[:200] or type(e).__name__
        raise TliError(
            f"--push-to-hub {name.repo_id}: the Hub refused the upload ({first})"
        ) from None
    return str(getattr(info, "commit_url", info))
