"""Typed KFP artifacts: what the Kubeflow UI shows for each step equals what the store holds.

:func:`check_pipeline_run` reads a KFP local run the way the UI does (each task's
``executor_output.json``: artifact metadata and ``log_metric`` values, and the artifact files)
and compares every value with the stage's own files in the store; tests/test_pipeline.py calls
it on its smoke pipeline run. The tests here run the cheap stages through
:func:`tli.pipeline.runner.run_component` (what each KFP step calls) with kfp's own artifact
classes.
"""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tli.modelfolder import ModelFolder
from tli.pipeline.runner import run_component
from tli.pipeline.store import Store
from tli.tracking import eval_metrics

SEQ = 32
BEST = {"inject": {"method": "tli", "interval": 2, "init": "identity"}, "train": {"lr": 3e-3}}


def _json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _trials(out: Path) -> list[dict[str, str]]:
    with (out / "trials.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------- a KFP run


def kfp_tasks(pipeline_root: Path) -> dict[str, dict[str, Any]]:
    """The first KFP local run under ``pipeline_root``: task -> output name -> artifact."""
    run = sorted(p for p in pipeline_root.iterdir() if p.is_dir())[0]
    tasks = {}
    for task in sorted(run.iterdir()):
        out = task / "executor_output.json"
        if out.is_file():
            arts = _json(out).get("artifacts", {})
            tasks[task.name] = {k: v["artifacts"][0] for k, v in arts.items()}
    return tasks


def _check_model(art: dict[str, Any], folder: Path) -> None:
    md, m = art["metadata"], ModelFolder.open(folder, decoder=False)
    assert md["architecture"] == m.config["architectures"][0]
    assert md["layers"] == m.config["num_hidden_layers"] and md["parameters"] == m.parameters
    plan = _json(folder / "tli_plan.json") if (folder / "tli_plan.json").is_file() else None
    if plan:
        assert md["method"] == plan["method"]
        assert md["new_layers"] == ",".join(str(i) for i in plan["new_layers"])
        assert f"{plan['num_layers_in']} -> {plan['num_layers_out']} layers" in md["plan"]


def _check_ref(art: dict[str, Any], stage: str) -> dict[str, Any]:
    """The artifact's file is the reference the next steps read; its metadata agrees."""
    ref = _json(Path(art["uri"]))
    assert ref["stage"] == stage == art["metadata"]["stage"]
    assert (
        art["metadata"]["version"] == ref["version"] and art["metadata"]["sha256"] == ref["sha256"]
    )
    assert art["metadata"]["store_path"] == ref["path"]
    return ref


def _check_report(tasks: dict[str, Any]) -> None:
    ref = _check_ref(tasks["report"]["result"], "report")
    out = Path(ref["output"])
    page = Path(tasks["report"]["html"]["uri"]).read_text()
    assert '<img src="' in page and not re.search(r'<img src="[^"d]', page), "a plot not inline"
    for png in sorted(out.glob("*.png")):  # each stored plot, byte for byte, in the page
        assert base64.b64encode(png.read_bytes()).decode() in page, png.name
    md = Path(tasks["report"]["markdown"]["uri"]).read_text()
    stored = (out / "report.md").read_text()
    assert [x for x in md.splitlines() if "plot in the HTML artifact" not in x] == [
        x for x in stored.splitlines() if not x.startswith("![")
    ]


def check_pipeline_run(store: Path, export_to: Path | None = None) -> None:
    """Every step's typed artifacts of the store's first KFP local run, against the store.

    Long because it walks the whole DAG, one step after the other, as a user would in the UI.
    """
    tasks = kfp_tasks(store / ".kfp")
    base = _check_ref(tasks["import-base"]["model"], "import-base")
    _check_model(tasks["import-base"]["model"], Path(base["output"]))
    data = _check_ref(tasks["build-data"]["dataset"], "data")
    man = _json(Path(data["output"]) / "manifest.json")
    for split, info in man["splits"].items():
        for key in ("documents", "tokens", "sha256"):
            assert tasks["build-data"]["dataset"]["metadata"][f"{split}_{key}"] == info[key]
    tune = _check_ref(tasks["tune"]["result"], "tune")
    rows = _trials(Path(tune["output"]))
    got = tasks["tune"]["metrics"]["metadata"]
    assert got["objective"] == float(rows[0]["objective"]) and got["trials"] == len(rows)
    assert got["interval"] == float(rows[0]["interval"]) and got["lr"] == float(rows[0]["lr"])
    assert tasks["tune"]["result"]["metadata"]["best_trial"] == rows[0]["trial"]
    table = Path(tasks["tune"]["trials"]["uri"]).read_text()
    assert all(f"| {r['rank']} | {r['trial']} |" in table for r in rows)
    inject = _check_ref(tasks["inject"]["model"], "inject")
    _check_model(tasks["inject"]["model"], Path(inject["output"]))
    train = _check_ref(tasks["train"]["trained"], "train")
    _check_model(tasks["train"]["trained"], Path(train["output"]) / "model")
    result = _json(Path(train["output"]) / "tli_train.json")["result"]
    for key in ("steps", "tokens", "final_loss", "final_val_loss"):
        assert tasks["train"]["trained"]["metadata"][key] == result[key], key
    evaluated = set()
    for name in ("evaluate", "evaluate-2", "evaluate-3"):
        ref = _check_ref(tasks[name]["result"], "eval")
        out = Path(ref["output"])
        results, heldout = _json(out / "results.json"), _json(out / "heldout.json")
        metrics = tasks[name]["metrics"]["metadata"]
        assert metrics["arc_easy/acc"] == results["results"]["arc_easy"]["acc,none"]
        assert metrics["heldout/loss"] == heldout["loss"]
        assert metrics == eval_metrics(results, heldout)
        model = Store(store).manifest("eval", ref["version"])["inputs"]["model"]
        evaluated.add(model["stage"])
    assert evaluated == {"import-base", "inject", "train"}
    _check_report(tasks)
    if export_to is None:
        assert "export-model" not in tasks  # export_to was empty: the step was skipped
        return
    from tli import remote

    exported = tasks["export-model"]["exported"]["metadata"]
    assert exported["to"] == str(export_to) and exported["version"] == train["version"]
    assert exported["sha256"] == remote.content_sha256(export_to)


# ---------------------------------------------------------------------------- cheap stages


def _artifact(kind: str, path: Path) -> Any:
    from kfp import dsl

    return getattr(dsl, kind)(name=path.name, uri=str(path))


@pytest.fixture(scope="module")
def steps(tiny_model_dir: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """import-base, data, inject and eval as KFP steps; tune is its best.yaml (written here)."""
    d = tmp_path_factory.mktemp("artifacts")
    store = d / "store"
    tune = Store(store).run("tune", {"note": "best.yaml written by the test"}, [],
                            lambda out: (out / "best.yaml").write_text(yaml.safe_dump(BEST)),
                            code="test")  # fmt: skip
    (d / "tune.json").write_text(json.dumps(tune.to_dict()))
    plan = [
        ("import-base", "Model", {"base": {"model": str(tiny_model_dir)}}, {}),
        ("data", "Dataset", {"data": {"sources": [], "extra": [str(corpus)],
                                      "val_fraction": 0.1, "heldout_fraction": 0.1}},
         {"base": "import-base"}),
        ("inject", "Model", {"inject": {}}, {"base": "import-base", "tune": "tune"}),
        ("eval", "Artifact", {"eval": {"tasks": ["arc_easy"], "limit": 2, "batch_size": 2,
                                       "heldout": {"blocks": 2, "seq_len": SEQ}}},
         {"model": "inject", "data": "data"}),
    ]  # fmt: skip
    arts: dict[str, Any] = {}
    for stage, kind, sections, inputs in plan:
        main = _artifact(kind, d / f"{stage}.json")
        roles = {"ref": main}
        if stage == "eval":
            roles["metrics"] = _artifact("Metrics", d / "metrics")
        md = run_component(stage, store=str(store), ray_jobs=None, sections=sections,
                           inputs={k: str(d / f"{v}.json") for k, v in inputs.items()}, rerun=[],
                           output=main.path, artifacts=roles)  # fmt: skip
        arts[stage] = {**roles, "returned": md, "ref": main}
    return {"store": store, "arts": arts}


def test_model_and_dataset_steps_say_what_the_version_holds(steps) -> None:
    arts = steps["arts"]
    for stage in ("import-base", "inject"):
        art = arts[stage]["ref"]
        ref = _json(Path(art.path))
        assert art.metadata == arts[stage]["returned"]
        _check_model({"metadata": art.metadata}, Path(ref["output"]))
        assert art.metadata["version"] == ref["version"] and art.metadata["status"] == "ran"
    assert arts["import-base"]["ref"].metadata["method"] == "none (a base model)"
    assert arts["import-base"]["ref"].metadata["source"].startswith("model (sha256 ")
    inj = arts["inject"]["ref"].metadata
    assert (inj["layers"], inj["new_layers"], inj["function_preserving"]) == (6, "2,5", True)
    data = arts["data"]["ref"]
    man = _json(Path(_json(Path(data.path))["output"]) / "manifest.json")
    assert data.metadata["sources"] == "corpus.jsonl"
    for split in ("train", "validation", "heldout"):
        assert data.metadata[f"{split}_tokens"] == man["splits"][split]["tokens"] > 0


def test_eval_step_logs_every_metric_of_its_records(steps) -> None:
    ev = steps["arts"]["eval"]
    out = Path(_json(Path(ev["ref"].path))["output"])
    results, heldout = _json(out / "results.json"), _json(out / "heldout.json")
    m = ev["metrics"].metadata
    assert m["arc_easy/acc"] == results["results"]["arc_easy"]["acc,none"]
    assert m["arc_easy/acc_norm"] == results["results"]["arc_easy"]["acc_norm,none"]
    assert (m["heldout/loss"], m["heldout/perplexity"]) == (heldout["loss"], heldout["perplexity"])
    assert ev["ref"].metadata["heldout_loss"] == heldout["loss"]
    assert ev["ref"].metadata["tasks"] == "arc_easy"


def test_a_cached_step_shows_the_same(steps, tmp_path: Path) -> None:
    """The metadata comes from the stored version: a cached step shows exactly the same."""
    arts = steps["arts"]
    d = steps["store"].parent
    again = _artifact("Model", tmp_path / "inject.json")
    run_component("inject", store=str(steps["store"]), ray_jobs=None, sections={"inject": {}},
                  inputs={"base": str(d / "import-base.json"), "tune": str(d / "tune.json")},
                  rerun=[], output=again.path, artifacts={"ref": again})  # fmt: skip
    first = dict(arts["inject"]["ref"].metadata)
    assert again.metadata.pop("status") == "cached" and first.pop("status") == "ran"
    assert again.metadata == first


# ---------------------------------------------------------------------------- the whole pipeline


@pytest.mark.slow
def test_tracked_pipeline_run_with_export(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The smoke pipeline on the KFP local runner, every stage a Ray job on a local head, with
    tracking (SQLite, TensorBoard) and ``export_to``: the typed artifacts, one MLflow run per
    stage (trials nested) tagged with the KFP run, and the export step (10 min here, loaded)."""
    from mlflow.tracking import MlflowClient

    from pipelines.local import run_local
    from tli.cli.pipeline import pipeline_arguments
    from tli.config import Runtime, resolve
    from tli.pipeline.head import local_head

    cfg = resolve("smoke", [], [f"base.model={tiny_model_dir}"]).config
    store, uri = tmp_path / "store", f"sqlite:///{tmp_path / 'mlflow.db'}"
    with local_head() as address:
        args = pipeline_arguments(cfg, str(store), address, [], Runtime())
        args["tracking_config"] = json.dumps({"mlflow_uri": uri, "experiment": "p",
                                              "tensorboard": "tb"})  # fmt: skip
        args["export_to"] = str(tmp_path / "exported")
        run_local(args, pipeline_root=store / ".kfp")
    check_pipeline_run(store, export_to=tmp_path / "exported")
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("p").experiment_id])
    (kfp_run,) = {r.data.tags["tli.pipeline_run_name"] for r in runs}
    assert kfp_run == sorted(p.name for p in (store / ".kfp").iterdir() if p.is_dir())[0]
    stages = sorted(
        r.data.tags["tli.stage"] for r in runs if "mlflow.parentRunId" not in r.data.tags
    )
    assert stages == ["eval", "eval", "eval", "train", "tune"]
    versions = {(m["stage"], m["version"]) for m in Store(store).manifests()}
    assert all((r.data.tags["tli.stage"], r.data.tags["tli.version"]) in versions for r in runs)
    assert (store / "tb" / "train").is_dir() and (store / "tb" / "tune").is_dir()
