"""The stage store: versions, caching, reruns, manifests, atomic writes, bad stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tli.errors import TliError
from tli.output import staged
from tli.pipeline.store import (
    MANIFEST,
    OUTPUT,
    InputRef,
    Store,
    hash_tree,
    sha256_file,
    version_key,
)


def _writer(content: dict[str, str], calls: list[int] | None = None):
    def fn(out: Path) -> None:
        if calls is not None:
            calls.append(1)
        for name, text in content.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(text)

    return fn


def _entries(store: Store, stage: str) -> list[str]:
    d = store.stage_dir(stage)
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_version_key_covers_stage_params_inputs() -> None:
    k = version_key("eval", {"eval": {"limit": 5}}, {"model": "aa"}, "c0")
    assert k == version_key("eval", {"eval": {"limit": 5}}, {"model": "aa"}, "c0")
    assert len(k) == 16
    assert k != version_key("train", {"eval": {"limit": 5}}, {"model": "aa"}, "c0")
    assert k != version_key("eval", {"eval": {"limit": 6}}, {"model": "aa"}, "c0")
    assert k != version_key("eval", {"eval": {"limit": 5}}, {"model": "ab"}, "c0")
    assert k != version_key("eval", {"eval": {"limit": 5}}, {"model": "aa"}, "c1")  # new code


def test_run_writes_manifest_then_reuses_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    calls: list[int] = []
    logs: list[str] = []
    ref = InputRef(name="data", path=str(tmp_path), sha256="0" * 64, stage="data", version="v1")
    params = {"train": {"steps": 3}}
    r1 = store.run("train", params, [ref], _writer({"a.txt": "x", "sub/b.txt": "y"}, calls),
                   seed=7, code="c0", log=logs.append)  # fmt: skip
    assert r1.status == "ran" and calls == [1]
    assert r1.path == store.root / "train" / r1.version
    m = json.loads((r1.path / MANIFEST).read_text())
    assert m["stage"] == "train" and m["params"] == params and m["seed"] == 7
    assert m["inputs"]["data"]["version"] == "v1"
    assert m["packages"]["tli"] and m["packages"]["python"]
    assert m["started"] <= m["ended"]
    files = {f["path"]: f for f in m["files"]}
    assert set(files) == {"a.txt", "sub/b.txt"}
    assert files["a.txt"]["sha256"] == sha256_file(r1.output / "a.txt")
    # The same stage, params and inputs: reused, the function is not called again.
    r2 = store.run(
        "train", params, [ref], _writer({"a.txt": "other"}, calls), code="c0", log=logs.append
    )
    assert r2.status == "cached" and r2.version == r1.version and calls == [1]
    assert any("cached" in x for x in logs)
    assert (r1.output / "a.txt").read_text() == "x"  # never rewritten
    # Another parameter: a new version beside the first.
    r3 = store.run(
        "train", {"train": {"steps": 4}}, [ref], _writer({"a.txt": "x"}), code="c0", log=print
    )
    assert r3.version != r1.version
    assert _entries(store, "train") == sorted([r1.version, r3.version])


def test_failed_stage_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")

    def boom(out: Path) -> None:
        (out / "half.bin").write_bytes(b"\0" * 10)
        raise RuntimeError("stage crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        store.run("inject", {}, [], boom, code="c0", log=print)
    assert _entries(store, "inject") == []  # no version, no temporary sibling
    assert store.versions() == set()


def test_rerun_identical_is_reproduced_different_is_new_run(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    r1 = store.run("data", {}, [], _writer({"t.jsonl": "1"}), code="c0", log=print)
    again = store.run("data", {}, [], _writer({"t.jsonl": "1"}), rerun=True, code="c0", log=print)
    assert again.status == "reproduced" and again.version == r1.version
    assert _entries(store, "data") == [r1.version]
    changed = store.run("data", {}, [], _writer({"t.jsonl": "2"}), rerun=True, code="c0", log=print)
    assert changed.status == "ran" and changed.version == f"{r1.version}-2"
    assert changed.sha256 != r1.sha256
    m = store.manifest("data", changed.version)
    assert m["rerun_of"] == r1.version and m["key"] == r1.version
    # From now on the latest run of that version is the one reused.
    assert store.run("data", {}, [], _writer({}), code="c0", log=print).version == changed.version
    assert (store.root / "data" / r1.version / OUTPUT / "t.jsonl").read_text() == "1"


def test_volatile_files_do_not_change_the_content_hash(tmp_path: Path) -> None:
    for i, stamp in enumerate(("10:00", "11:00")):
        d = tmp_path / f"o{i}"
        d.mkdir()
        (d / "model.safetensors").write_text("weights")
        (d / "metrics.jsonl").write_text(stamp)
    f0, h0 = hash_tree(tmp_path / "o0", ("metrics.jsonl",))
    f1, h1 = hash_tree(tmp_path / "o1", ("metrics.jsonl",))
    assert h0 == h1
    assert [f.get("volatile", False) for f in f0] == [True, False]
    assert hash_tree(tmp_path / "o0")[1] != hash_tree(tmp_path / "o1")[1]


def test_external_input_hash_follows_content(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    a = store.external_ref("source", model)
    assert a.stage is None and a.sha256 == store.external_ref("source", model).sha256
    assert (store.root / ".cache" / "hashes.json").is_file()
    (model / "config.json").write_text('{"x": 1}')
    assert store.external_ref("source", model).sha256 != a.sha256
    with pytest.raises(TliError, match="does not exist"):
        store.external_ref("source", tmp_path / "nope")


def test_lookup_by_prefix(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    r = store.run("eval", {"x": 1}, [], _writer({"r.json": "{}"}), code="c0", log=print)
    assert store.lookup(r.version[:6])["version"] == r.version
    assert store.lookup(f"eval/{r.version}")["stage"] == "eval"
    with pytest.raises(TliError, match="no version"):
        store.lookup("zzzz")


def test_unwritable_store_is_one_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(TliError, match="not a folder"):
        Store(f).check_writable()
    with pytest.raises(TliError, match="not a folder"):
        Store(f / "sub").check_writable()
    Store(tmp_path / "new" / "store").check_writable()  # creatable: fine, and nothing written
    assert not (tmp_path / "new").exists()


def test_import_base_version_follows_content_not_path(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The same base folder at two paths (two machines, two clones) is one version."""
    import shutil

    from tli.pipeline.runner import prepare

    keys = []
    for name in ("a", "b/deeper"):
        copy = tmp_path / name
        shutil.copytree(tiny_model_dir, copy)
        *_, params, key = prepare(
            "import-base", tmp_path / "store", {"base": {"model": str(copy)}}, {}
        )
        assert str(tmp_path) not in json.dumps(params)
        keys.append(key)
    assert keys[0] == keys[1]
    (tmp_path / "b" / "deeper" / "config.json").write_text(
        (tiny_model_dir / "config.json").read_text().replace("}", ', "x": 1}', 1)
    )
    *_, changed = prepare(
        "import-base", tmp_path / "store", {"base": {"model": str(tmp_path / "b" / "deeper")}}, {}
    )
    assert changed != keys[0]
    *_, bundled = prepare("import-base", tmp_path / "store", {}, {})
    assert bundled not in keys


def test_killed_stage_leftover_is_listed_and_cleaned(tmp_path: Path, capsys) -> None:
    """A stage killed with SIGKILL cannot clean up; `tli runs clean` can, and spares live ones."""
    import subprocess
    import sys

    from tli.cli import main

    root = tmp_path / "store"
    code = (
        "import os\n"
        "from tli.pipeline.store import Store\n"
        "def work(out):\n"
        "    (out / 'w.bin').write_bytes(bytes(2_000_000))\n"
        "    os.kill(os.getpid(), 9)\n"
        f"Store({str(root)!r}).run('train', {{}}, [], work, code='c0')\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    store = Store(root)
    with staged(root / "eval" / "def", exists_ok=True) as live_st:  # a stage running now
        live = live_st.path
        stale = store.stale_temps()
        assert [p.parent.name for p, _ in stale] == ["train"] and stale[0][1] == 2_000_000
        assert main(["runs", "list", "--store", str(root)]) == 0
        assert "1 unfinished folder(s) from killed stages (2.0 MB)" in capsys.readouterr().out
        assert main(["runs", "clean", "--store", str(root), "--dry-run"]) == 0
        assert stale[0][0].is_dir()
        assert main(["runs", "clean", "--store", str(root)]) == 0
        assert "removed train/." in capsys.readouterr().out
        assert live.is_dir() and store.stale_temps() == []
    assert sorted(p.name for p in (root / "train").iterdir()) == []
    assert sorted(p.name for p in (root / "eval").iterdir()) == ["def"]  # the live one finished
