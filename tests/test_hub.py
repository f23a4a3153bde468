"""Online mode: Hub names for ``base.model`` and ``data.dataset``, never the network.

Each test fills a Hugging Face cache in huggingface_hub's own layout (``models--org--name/``
with ``blobs/``, ``snapshots/<commit>/`` links, ``refs/<branch>`` and the tree listing
``trees/<commit>.json``), and runs the real stages through the store with ``HF_HUB_OFFLINE=1``
(set for the whole test session): the online code path then serves from that cache, as on an
air-gapped cluster whose cache was filled beforehand.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tli import hub
from tli.config import Runtime
from tli.errors import TliError
from tli.pipeline.runner import run_stage
from tli.pipeline.store import MANIFEST, Store

COMMIT_A = "a1" * 20
COMMIT_B = "b2" * 20
ONLINE = Runtime(offline=False, progress=False)


def fill_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str, *,
               repo_type: str = "model", ref: str = "main", tree: bool = True) -> Path:  # fmt: skip
    """Put a repo at ``commit`` into a Hub cache as huggingface_hub lays it out; its snapshot."""
    folder = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    entries = {}
    for rel, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        entries[rel] = {"size": len(data), "blob_id": hashlib.sha1(data).hexdigest()}
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    if tree:
        (folder / "trees").mkdir(exist_ok=True)
        doc = {"format_version": 1, "files": entries}
        (folder / "trees" / f"{commit}.json").write_text(json.dumps(doc))
    return snap


def model_files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file()}


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _import_base(store: Path, name: str, runtime: Runtime = ONLINE):
    return run_stage("import-base", store=store, sections={"base": {"model": name}}, refs={},
                     runtime=runtime)  # fmt: skip


# ---------------------------------------------------------------------------- names


def test_names_and_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert hub.parse("org/name") == hub.HubName("org/name", None, None)
    assert hub.parse("meta-llama/Llama-3.2-1B@v1.0") == hub.HubName(
        "meta-llama/Llama-3.2-1B", "v1.0", None
    )
    assert hub.parse(f"hf:org/texts@{COMMIT_A}:en") == hub.HubName("org/texts", COMMIT_A, "en")
    (tmp_path / "runs" / "model").mkdir(parents=True)
    assert hub.parse("runs/model") is None  # an existing folder wins
    assert hub.parse("hf:runs/model") == hub.HubName("runs/model", None, None)  # unless forced
    for local in ("/abs/folder", "./org/name", "a/b/c", "model", "org/../x", ""):
        assert hub.parse(local) is None, local
    with pytest.raises(TliError, match="not a Hub name"):
        hub.parse("hf:not a name")


# ---------------------------------------------------------------------------- offline


def test_offline_refuses_a_hub_name_in_one_line(tmp_path: Path, hf_cache: Path) -> None:
    """The default: no Hub at all, and the message names the setting to change."""
    store = tmp_path / "store"
    for runtime in (Runtime(), None):
        with pytest.raises(TliError) as e:
            _import_base(store, "org/tiny", runtime)
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and "runtime.offline: false" in msg, msg
    assert Store(store).versions() == set() and not hf_cache.exists()


def test_offline_refuses_a_hub_dataset(tmp_path: Path, tiny_model_dir: Path, hf_cache) -> None:
    store = tmp_path / "store"
    base = run_stage("import-base", store=store, refs={},
                     sections={"base": {"model": str(tiny_model_dir)}})  # fmt: skip
    with pytest.raises(TliError, match=r"data.dataset 'org/texts' .* runtime.offline: false"):
        run_stage("data", store=store, refs={"base": base.to_dict()},
                  sections={"data": {"sources": [], "dataset": "org/texts"}})  # fmt: skip
    assert {s for s, _ in Store(store).versions()} == {"import-base"}


# ---------------------------------------------------------------------------- online, from the cache


def test_online_base_is_versioned_by_content_and_records_its_commit(
    tmp_path: Path, tiny_model_dir: Path, hf_cache: Path
) -> None:
    store = tmp_path / "store"
    files = model_files(tiny_model_dir)
    fill_cache(hf_cache, "org/tiny", files, COMMIT_A)
    first = _import_base(store, "org/tiny")
    assert first.status == "ran"
    out = first.output
    assert json.loads((out / hub.RECORD).read_text()) == {
        "repo_id": "org/tiny", "repo_type": "model", "commit": COMMIT_A,
    }  # fmt: skip
    for name, data in files.items():  # real bytes in the store, not links into the cache
        assert not (out / name).is_symlink() and (out / name).read_bytes() == data, name
    manifest = json.loads((first.path / MANIFEST).read_text())
    assert COMMIT_A in manifest["inputs"]["source"]["path"]
    assert manifest["params"] == {"base": {"model": "(content: input source)"}}
    # The same content by its commit: the same version, found in the store
    assert _import_base(store, f"hf:org/tiny@{COMMIT_A}").version == first.version
    # main moves to a commit with other weights: a new version; the old commit keeps its own
    changed = dict(files)
    changed["model.safetensors"] = files["model.safetensors"][:-4] + b"\x00\x00\x80\x3f"
    fill_cache(hf_cache, "org/tiny", changed, COMMIT_B)
    second = _import_base(store, "org/tiny")
    assert second.status == "ran" and second.version != first.version
    assert json.loads((second.output / hub.RECORD).read_text())["commit"] == COMMIT_B
    assert _import_base(store, f"org/tiny@{COMMIT_A}").version == first.version
    # What the KFP UI shows for the step: the source with its commit
    from tli.pipeline.artifacts import metadata

    md = metadata("import-base", second.to_dict())
    assert md["source"] == f"hf:org/tiny@{COMMIT_B}" and md["layers"] == 4


def test_the_store_holds_the_cache_by_default(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No HF_HUB_CACHE / HF_HOME: the store's volume is the cache every step and pod shares."""
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = tmp_path / "store"
    fill_cache(store / ".cache" / "huggingface" / "hub", "org/tiny", model_files(tiny_model_dir),
               COMMIT_A)  # fmt: skip
    assert _import_base(store, "org/tiny").status == "ran"


@pytest.mark.parametrize(
    ("setup", "name", "needle"),
    [
        ("none", "org/missing", "HF_HUB_OFFLINE=1 forbids downloading it"),
        ("incomplete", "org/tiny", "is incomplete in the Hub cache"),
        ("pickle", "org/tiny", "no .safetensors weights"),
        ("ok", "org/tiny@v9", "is not in the Hub cache"),
        ("ok", "org/tiny:cfg", "a model repo has no ':config' part"),
    ],
)
def test_what_the_cache_cannot_give_is_one_line(
    tmp_path: Path, tiny_model_dir: Path, hf_cache: Path, setup: str, name: str, needle: str
) -> None:
    files = model_files(tiny_model_dir)
    if setup == "incomplete":  # an interrupted download: the listing names a missing file
        snap = fill_cache(hf_cache, "org/tiny", files, COMMIT_A)
        (snap / "model.safetensors").unlink()
    elif setup == "pickle":
        files = {"config.json": files["config.json"], "pytorch_model.bin": b"PK\x03\x04"}
        fill_cache(hf_cache, "org/tiny", files, COMMIT_A)
    elif setup == "ok":
        fill_cache(hf_cache, "org/tiny", files, COMMIT_A)
    store = tmp_path / "store"
    with pytest.raises(TliError) as e:
        _import_base(store, name)
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
    assert Store(store).versions() == set()


def test_online_dataset_from_the_cache(tmp_path: Path, tiny_model_dir: Path, hf_cache) -> None:
    """data.dataset: the train split of a parquet dataset repo; its commit in the manifest."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"Document {i}: the quick brown fox jumps over the lazy dog {i} times." * 2
             for i in range(200)]  # fmt: skip
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts, "id": list(range(200))}), buf)
    fill_cache(hf_cache, "org/texts", {"data/train-00000-of-00001.parquet": buf.getvalue()},
               COMMIT_A, repo_type="dataset")  # fmt: skip
    store = tmp_path / "store"
    base = run_stage("import-base", store=store, refs={},
                     sections={"base": {"model": str(tiny_model_dir)}})  # fmt: skip

    def build(name: str):
        return run_stage("data", store=store, refs={"base": base.to_dict()}, runtime=ONLINE,
                         sections={"data": {"sources": [], "dataset": name, "val_fraction": 0.1,
                                            "heldout_fraction": 0.1}})  # fmt: skip

    data = build("org/texts")
    man = json.loads((data.output / "manifest.json").read_text())
    (src,) = man["sources"]
    assert src["name"] == f"hf:org/texts@{COMMIT_A}" and src["documents"] == 200
    assert src["hub"] == {"repo_id": "org/texts", "repo_type": "dataset", "commit": COMMIT_A}
    assert sum(s["documents"] for s in man["splits"].values()) == 200
    got = [json.loads(x)["text"] for x in (data.output / "train.jsonl").read_text().splitlines()]
    assert set(got) <= set(texts)
    # The version names the commit the branch pointed at: pinned, so a moved branch never
    # reuses a stale corpus
    params = json.loads((data.path / MANIFEST).read_text())["params"]
    assert params["data"]["dataset"] == f"hf:org/texts@{COMMIT_A}"
    assert build(f"org/texts@{COMMIT_A}").version == data.version
    buf2 = io.BytesIO()
    pq.write_table(pa.table({"text": [t.upper() for t in texts]}), buf2)
    fill_cache(hf_cache, "org/texts", {"data/train-00000-of-00001.parquet": buf2.getvalue()},
               COMMIT_B, repo_type="dataset")  # fmt: skip
    moved = build("org/texts")
    assert moved.status == "ran" and moved.version != data.version


def test_the_token_comes_from_the_environment_and_is_never_written(
    tmp_path: Path, tiny_model_dir: Path, hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "hf_" + "s3cr3t" * 6
    monkeypatch.setenv("HF_TOKEN", secret)
    assert hub.token() == secret
    fill_cache(hf_cache, "org/tiny", model_files(tiny_model_dir), COMMIT_A)
    store = tmp_path / "store"
    _import_base(store, "org/tiny")
    for f in store.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


# ---------------------------------------------------------------------------- the pipeline


def _compiled(tmp_path: Path, offline: bool) -> tuple[dict, dict]:
    import yaml
    from kfp import compiler

    from pipelines.tli_pipeline import pipeline_for

    out = tmp_path / f"p-{offline}.yaml"
    compiler.Compiler().compile(pipeline_for(offline=offline), str(out))
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.mark.parametrize("offline", [True, False])
def test_the_compiled_pipeline_carries_runtime_offline(tmp_path: Path, offline: bool) -> None:
    """Offline: HF_HUB_OFFLINE=1 in every step; online: 0, the token from an optional secret,
    and the runtime parameter's default says offline: false."""
    spec, k8s = _compiled(tmp_path, offline)
    flag = "1" if offline else "0"
    for name, ex in spec["deploymentSpec"]["executors"].items():
        env = {e["name"]: e["value"] for e in ex["container"]["env"]}
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            assert env[var] == flag, (name, var)
        secrets = {s["secretName"]: s for s in k8s[name].get("secretAsEnv", [])}
        if offline:
            assert "tli-hf-token" not in secrets, name
        else:
            token = secrets["tli-hf-token"]
            assert token["optional"] is True
            assert token["keyToEnv"] == [{"envVar": "HF_TOKEN", "secretKey": "token"}]
    default = spec["root"]["inputDefinitions"]["parameters"]["runtime"]["defaultValue"]
    assert Runtime.model_validate(json.loads(default)).offline is offline
