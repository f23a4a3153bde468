"""``tli export``: a stored model with its card and lineage, to a folder and to a real S3 server.

The store is built by the real stages on the tiny model (import-base, data, inject, train, two
evaluations); the tune version holds only the choice a search leaves (``best.yaml``, written
here: the search itself is tested in tests/test_tune.py). What a user reads is checked against
the records: the card's numbers against the stages' files, the lineage against the manifests,
the exported bytes against the stored ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import _s3
from tli import remote
from tli.cli import main
from tli.config import Runtime
from tli.export import CARD, LINEAGE, export_component, run_export
from tli.pipeline.runner import run_stage
from tli.pipeline.store import Store

s3_server = _s3.s3_server  # fixtures
s3_env = _s3.s3_env

SEQ = 32
TRAIN = {"steps": 3, "seq_len": SEQ, "batch_size": 2, "warmup": 1, "lr": 3e-3,
         "validation": {"blocks": 2, "every": 3}}  # fmt: skip
HELDOUT = {"tasks": [], "heldout": {"blocks": 2, "seq_len": SEQ}}
BEST = {"inject": {"method": "tli", "interval": 2, "init": "identity"}, "train": {"lr": 3e-3}}


def _stage(store: Path, name: str, sections: dict[str, Any], **refs: Any):
    return run_stage(name, store=store, sections=sections, runtime=Runtime(threads=1,
                     progress=False), refs={k: v.to_dict() for k, v in refs.items()})  # fmt: skip


@pytest.fixture(scope="module")
def chain(tiny_model_dir: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """A store with base, data, tune (its best.yaml), inject and two evaluations (no Ray)."""
    d = tmp_path_factory.mktemp("export")
    store = d / "store"
    base = _stage(store, "import-base", {"base": {"model": str(tiny_model_dir)}})
    data = _stage(store, "data", {"data": {"sources": [], "extra": [str(corpus)],
                                           "val_fraction": 0.1, "heldout_fraction": 0.1}},
                  base=base)  # fmt: skip
    tune = Store(store).run(
        "tune", {"note": "best.yaml written by the test"}, [],
        lambda out: (out / "best.yaml").write_text(yaml.safe_dump(BEST)), code="test",
    )  # fmt: skip
    inject = _stage(store, "inject", {"inject": {}}, base=base, tune=tune)
    evals = {
        "base": _stage(store, "eval", {"eval": HELDOUT}, model=base, data=data),
        "injected": _stage(store, "eval", {"eval": HELDOUT}, model=inject, data=data),
    }
    return {"store": store, "dir": d, "base": base, "data": data, "tune": tune,
            "inject": inject, "evals": evals}  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _check_lineage(doc: dict[str, Any], chain: dict[str, Any], want: set[tuple[str, str]]) -> None:
    nodes = {(n["stage"], n["version"]): n for n in doc["lineage"]}
    assert set(nodes) == want
    st = Store(chain["store"])
    for (stage, version), n in nodes.items():  # as the manifests say
        assert n["output_sha256"] == st.manifest(stage, version)["output_sha256"]
        assert n["params"] == st.manifest(stage, version)["params"]


def _check_card(card: str, chain: dict[str, Any], versions: list[str], data: bool) -> None:
    """The card says what the records say."""
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "tli" in front["tags"]
    assert "- method: **tli** (interval=2" in card
    assert "- layers: 4 -> 6; new layers [2, 5]" in card
    labels = list(chain["evals"])
    assert f"| task | metric | {' | '.join(labels)} |" in card
    for label, ev in chain["evals"].items():  # the eval table, one column per model
        loss = json.loads((ev.output / "heldout.json").read_text())["loss"]
        assert f"{loss:.4f}" in card, label
    for version in versions:
        assert version in card
    man = json.loads((chain["data"].output / "manifest.json").read_text())
    assert (f"{man['splits']['train']['tokens']} tokens" in card) is data


def test_export_of_a_stored_version_to_a_folder(chain, tmp_path: Path, capsys) -> None:
    store, inject = chain["store"], chain["inject"]
    to = tmp_path / "exported"
    rc = main(["export", inject.version[:8], "--to", str(to), "--store", str(store)])
    assert rc == 0
    printed = capsys.readouterr().out
    got = _files(to)
    for name, data in _files(inject.output).items():  # every stored file, byte for byte
        if name != CARD:  # the export's card replaces the one the inject stage wrote
            assert got[name] == data, name
    assert set(got) == set(_files(inject.output)) | {CARD, LINEAGE}
    assert remote.content_sha256(to)[:16] in printed
    doc = json.loads(got[LINEAGE])
    want = {("inject", inject.version), ("import-base", chain["base"].version),
            ("tune", chain["tune"].version)}  # fmt: skip
    _check_lineage(doc, chain, want)
    assert doc["lineage"][0]["inputs"] == {
        "base": f"import-base/{chain['base'].version}", "tune": f"tune/{chain['tune'].version}",
    }  # fmt: skip
    card = got[CARD].decode()
    _check_card(card, chain, [n[1] for n in want], data=False)
    assert "No corpus in the model's lineage" in card
    assert "Not trained by tli" in card


@pytest.mark.slow
def test_export_of_a_trained_version(chain, tmp_path: Path) -> None:
    """Ray Train on the injected version, then its export: the card's training section and an
    evaluation table base | injected | trained (about a minute here)."""
    train = _stage(chain["store"], "train", {"train": TRAIN}, model=chain["inject"],
                   data=chain["data"], tune=chain["tune"])  # fmt: skip
    ev = _stage(chain["store"], "eval", {"eval": HELDOUT}, model=train, data=chain["data"])
    (written,) = run_export(train.version, [str(tmp_path / "out")], store=chain["store"])
    card = (tmp_path / "out" / CARD).read_text()
    res = json.loads((train.output / "tli_train.json").read_text())["result"]
    assert (f"{res['steps']} steps, {res['tokens']} tokens, final training loss "
            f"{res['final_loss']}, final validation loss {res['final_val_loss']}") in card  # fmt: skip
    _check_card(card, {**chain, "evals": {**chain["evals"], "trained": ev}}, [train.version],
                data=True)  # fmt: skip
    doc = json.loads((tmp_path / "out" / LINEAGE).read_text())
    want = {("train", train.version), ("inject", chain["inject"].version),
            ("import-base", chain["base"].version), ("data", chain["data"].version),
            ("tune", chain["tune"].version)}  # fmt: skip
    _check_lineage(doc, chain, want)
    model = train.output / "model"
    assert all((tmp_path / "out" / n).read_bytes() == b for n, b in _files(model).items()
               if n != CARD)  # fmt: skip
    assert written["sha256"] == remote.content_sha256(tmp_path / "out")


def test_export_to_s3_and_back(chain, s3_env, tmp_path: Path) -> None:
    store, train = chain["store"], chain["inject"]
    uri = f"s3://tli-export-{train.version[:8]}/models/injected"
    (written,) = run_export(f"inject/{train.version}", [uri], store=store)
    assert remote.is_complete(uri)
    fetched = remote.fetch_entry(uri, tmp_path / "cache")
    assert fetched.sha256 == written["sha256"]
    local = tmp_path / "local"
    run_export(f"inject/{train.version}", [str(local)], store=store)
    assert remote.content_sha256(local) == written["sha256"]  # the same export, either place
    assert _files(fetched.path).keys() == _files(local).keys()
    # An existing prefix is never overwritten silently
    rc = main(["export", train.version, "--to", uri, "--store", str(store)])
    assert rc == 2
    (again,) = run_export(train.version, [uri], store=store, force=True)
    assert again["sha256"] == written["sha256"]


def test_a_model_folder_exports_with_what_it_records(tiny_injected_dir: Path, tmp_path) -> None:
    (written,) = run_export(str(tiny_injected_dir), [str(tmp_path / "out")])
    card = (tmp_path / "out" / CARD).read_text()
    assert "- method: **tli** (interval=2" in card and "no lineage recorded" in card
    assert "Not trained by tli" in card and written["files"] == len(list((tmp_path / "out")
                                                                         .iterdir()))  # fmt: skip


def test_the_pipeline_step_exports_and_says_where(chain, tmp_path: Path) -> None:
    from kfp import dsl

    ref = tmp_path / "trained.json"
    ref.write_text(json.dumps(chain["inject"].to_dict()))
    exported = dsl.Model(name="exported", uri=str(tmp_path / "exported"))
    to = tmp_path / "out"
    export_component(store=str(chain["store"]), runtime="{}", to=str(to), model=str(ref),
                     exported=exported)  # fmt: skip
    assert exported.metadata["sha256"] == remote.content_sha256(to)
    assert exported.metadata["version"] == chain["inject"].version
    assert json.loads(Path(exported.path).read_text())["to"] == str(to)
    # A rerun of the pipeline replaces its export (the step's destination is the run's intent)
    export_component(store=str(chain["store"]), runtime="{}", to=str(to), model=str(ref),
                     exported=exported)  # fmt: skip
    assert remote.content_sha256(to) == exported.metadata["sha256"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["nope0000", "--to", "{new}"], "no version 'nope0000'"),
        (["{data}", "--to", "{new}"], "is not a model"),
        (["{train}", "--to", "{existing}"], "exists"),
        (["{train}", "--to", "{store}/inside"], "lies inside the input"),
        (["{train}", "--push-to-hub", "org/name"], "runtime.offline: false"),
        (["{train}", "--push-to-hub", "org/name", "--no-offline"], "HF_HUB_OFFLINE=1"),
        (["{train}"], "nothing to export to"),
        (["{train}", "--to", "s3://x"], "bad bucket name"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    chain, tmp_path: Path, capfd, args: list[str], needle: str
) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep").write_text("mine")
    fill = {"data": chain["data"].version, "train": chain["inject"].version,
            "existing": str(existing), "store": str(chain["store"]), "new": str(tmp_path / "new")}  # fmt: skip
    before = Store(chain["store"]).versions()
    argv = ["export", *(a.format(**fill) for a in args), "--store", str(chain["store"])]
    assert main(argv) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert (existing / "keep").read_text() == "mine" and len(list(existing.iterdir())) == 1
    assert Store(chain["store"]).versions() == before
    assert not (chain["store"] / "inside").exists() and not (tmp_path / "new").exists()
