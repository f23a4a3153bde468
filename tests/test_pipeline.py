"""The KFP pipeline: compiled golden copy, real local runs on Ray, caching, reruns, bad input.

One smoke pipeline run (KFP local runner, every stage as a Ray job on a real local head, the tiny
model with the real tokenizer) is shared by the tests of this module; the later runs reuse its
store, so they are mostly cached.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tli.cli import main
from tli.config import RunConfig
from tli.pipeline.stages import STAGES
from tli.pipeline.store import MANIFEST, Store
from tli.rayenv import free_port

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "pipelines" / "tli_pipeline.yaml"
TLI = [sys.executable, "-m", "tli.cli"]
STEPS = ("base", "data", "tune", "inject", "train", "eval_base", "eval_injected", "eval_trained",
         "report")  # fmt: skip


# ---------------------------------------------------------------------------- compile


def test_compiled_pipeline_matches_golden(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.yaml"
    assert main(["pipeline", "compile", "--out", str(out)]) == 0
    assert out.read_text() == GOLDEN.read_text(), (
        "the compiled pipeline changed: if that is deliberate, run "
        "`tli pipeline compile --out pipelines/tli_pipeline.yaml` and commit it"
    )


def test_compiled_pipeline_has_kubernetes_settings(tmp_path: Path) -> None:
    spec, platform = yaml.safe_load_all(GOLDEN.read_text())  # the pipeline, then kfp-kubernetes
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("store", "ray_jobs", "rerun", "runtime", "store_pvc", "base_config", "data_config",
                 "inject_config", "tune_config", "train_config", "eval_config", "tracking_config",
                 "export_to"):  # fmt: skip
        assert name in params, name
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == set(executors) and len(executors) == 10  # one per task, export included
    for name, ex in executors.items():
        c = ex["container"]
        assert c["image"] == "tli:0.1.0"
        assert c["resources"]["cpuLimit"] and c["resources"]["memoryLimit"], name
        assert "pip install" not in " ".join(c["command"]), name  # no packages_to_install
        assert k8s[name]["pvcMount"][0]["mountPath"] == "/mnt/tli"
        assert k8s[name]["secretAsEnv"][0]["secretName"] == "tli-object-store"
    tasks = spec["root"]["dag"]["tasks"]
    assert len(tasks) == 10  # nine steps and the export's condition (export_to != "")
    assert all(t["cachingOptions"].get("enableCache") is not True for t in tasks.values()
               if "cachingOptions" in t)  # fmt: skip
    # --image rewrites every step's image.
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "--out", str(out), "--image", "reg.example/tli:1"]) == 0
    images = {
        e["container"]["image"]
        for e in next(yaml.safe_load_all(out.read_text()))["deploymentSpec"]["executors"].values()
    }
    assert images == {"reg.example/tli:1"}


@pytest.mark.parametrize("preset", ["default", "smoke"])
def test_presets_are_valid_run_configs(preset: str) -> None:
    from tli.config import resolve

    cfg = resolve(preset).config
    assert isinstance(cfg, RunConfig)
    assert len(cfg.tune.intervals) >= 2


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["pipeline", "run", "--preset", "huge"], "unknown preset"),
        (["pipeline", "run", "--rerun", "fit"], "--rerun fit: not a stage of the pipeline"),
        (["pipeline", "run", "eval.limit=[1"], "not valid YAML"),
        (["pipeline", "run", "eval.nope=1"], "unknown key"),
        (["pipeline", "run", "--ray-jobs", "http://127.0.0.1:{port}"], "cannot reach"),
        (["pipeline", "submit", "--host", "http://127.0.0.1:{port}"], "Kubeflow Pipelines API"),
        (["pipeline", "run", "--base", "{tmp}/no-model"], "does not exist"),
        (["runs", "show", "abc"], "no store"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    argv: list[str], needle: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    port = free_port()
    argv = [a.format(port=port, tmp=tmp_path) for a in argv]
    if argv[0] == "pipeline" and argv[1] == "run":
        argv += ["--store", str(store)]
    if argv[0] == "runs":
        argv += ["--store", str(store)]
    assert main(argv) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not store.exists()


def test_unwritable_store_is_one_line_exit_2(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for store in (blocker, blocker / "store"):
        assert main(["pipeline", "run", "--store", str(store)]) == 2
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "store" in err, err
    assert blocker.read_text() == ""


# ---------------------------------------------------------------------------- local runs


def _run(args: list[str], log: Path) -> tuple[int, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([*TLI, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    text = proc.stdout + proc.stderr
    log.write_text(text)
    return proc.returncode, text


def _statuses(text: str) -> dict[str, tuple[str, str]]:
    """step -> (version, status) from the summary `tli pipeline run` prints at the end."""
    rows = {}
    for line in text.split("tli pipeline: done")[-1].splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] in STEPS:
            rows[parts[0]] = (parts[2], parts[3])
    return rows


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A real local Ray head shared by the later runs (stopped by its own process)."""
    from tli.pipeline.head import local_head

    with local_head() as address:
        yield address


@pytest.fixture(scope="module")
def smoke(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, ray_head: str):
    """One full smoke pipeline run on the tiny model; its store and printed summary."""
    d = tmp_path_factory.mktemp("pipeline")
    store = d / "store"
    # --export-to and a tracking override: the CLI carries both into the pipeline's parameters.
    args = ["pipeline", "run", "--preset", "smoke", "--base", str(tiny_model_dir),
            "--store", str(store), "--ray-jobs", ray_head, "--export-to", str(d / "exported"),
            "tracking.tensorboard=tb"]  # fmt: skip
    rc, text = _run(args, d / "run1.log")
    assert rc == 0, text[-3000:]
    return {"store": store, "args": args, "text": text, "dir": d}


def test_smoke_run_writes_every_stage_with_manifest(smoke) -> None:
    store = Store(smoke["store"])
    rows = _statuses(smoke["text"])
    assert set(rows) == set(STEPS), smoke["text"][-2000:]
    assert {s for _, s in rows.values()} == {"ran"}
    assert {stage for stage, _ in store.versions()} == set(STAGES)
    assert len([1 for stage, _ in store.versions() if stage == "eval"]) == 3
    for m in store.manifests():
        folder = store.stage_dir(m["stage"]) / m["version"]
        assert (folder / MANIFEST).is_file() and (folder / "output").is_dir()
        assert m["files"] and all(len(f["sha256"]) == 64 for f in m["files"])
        assert m["packages"]["torch"] and m["started"] and m["ended"]
        for name, i in m["inputs"].items():  # inputs name versions that exist
            if i["stage"]:
                assert (store.stage_dir(i["stage"]) / i["version"] / MANIFEST).is_file(), name
    report = store.root / "report" / rows["report"][0] / "output"
    for f in ("report.md", "report.html", "train_loss.png", "tune_trials.png", "models.png"):
        assert (report / f).is_file(), f
    md = (report / "report.md").read_text()
    assert "| base |" in md and "| injected |" in md and "| trained |" in md
    assert "Parameters added" in md and "arc_easy" in md
    assert f"report: {report / 'report.md'}" in smoke["text"]
    # Every stage ran as a Ray job on the head.
    assert len(re.findall(r"submitted as Ray job", smoke["text"])) == 9
    # No partial folders are left behind.
    assert not [p for p in store.root.glob("*/.*.partial*")]


def test_typed_artifacts_show_the_stored_results(smoke) -> None:
    """What the Kubeflow UI shows of each step equals the store (see tests/test_artifacts.py)."""
    from tests.test_artifacts import check_pipeline_run

    check_pipeline_run(smoke["store"], export_to=smoke["dir"] / "exported")
    # tracking.tensorboard, relative to the store: event files of train and tune.
    assert list((smoke["store"] / "tb" / "train").rglob("events.out.tfevents.*"))
    assert list((smoke["store"] / "tb" / "tune").rglob("events.out.tfevents.*"))


def test_runs_list_and_show_give_the_lineage(smoke, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(smoke["store"])
    assert main(["runs", "list", "--store", store]) == 0
    listing = capsys.readouterr().out
    for stage in STAGES:
        assert f"\n{stage} " in listing or listing.startswith(stage), stage
    report_version = _statuses(smoke["text"])["report"][0]
    assert main(["runs", "show", report_version[:8], "--store", store]) == 0
    shown = capsys.readouterr().out
    for step in ("base: import-base/", "data: data/", "tune: tune/", "inject: inject/",
                 "train: train/", "eval_base: eval/", "source: external"):  # fmt: skip
        assert step in shown, step


def test_second_identical_run_is_all_cached(smoke) -> None:
    """Without --ray-jobs: it starts its own head, stops it, and reuses every stage."""
    store = Store(smoke["store"])
    before = store.versions()
    args = [a for a in smoke["args"]]
    i = args.index("--ray-jobs")
    del args[i : i + 2]
    rc, text = _run(args, smoke["dir"] / "run2.log")
    assert rc == 0, text[-3000:]
    rows = _statuses(text)
    assert {s for _, s in rows.values()} == {"cached"}, rows
    assert rows == {k: (v, "cached") for k, (v, _) in _statuses(smoke["text"]).items()}
    assert store.versions() == before
    assert "submitted as Ray job" not in text  # the store answered before any job
    # The head it started is gone, with its temp dir.
    tmp = re.search(r"temp dir (\S+)\)", text).group(1)
    assert "local Ray head stopped" in text and not Path(tmp).exists()
    import psutil

    leftovers = [p.pid for p in psutil.process_iter(["cmdline"])
                 if any(tmp in c for c in (p.info["cmdline"] or []))]  # fmt: skip
    assert leftovers == []


def test_new_eval_limit_reruns_only_eval_and_report(smoke, ray_head: str) -> None:
    """eval.limit=3 gives new eval and report versions only; --rerun inject recomputes
    that stage with the same inputs and gets an identical output hash (no new version)."""
    store = Store(smoke["store"])
    first = _statuses(smoke["text"])
    before = store.versions()
    args = [*smoke["args"], "eval.limit=3", "--rerun", "inject"]
    rc, text = _run(args, smoke["dir"] / "run3.log")
    assert rc == 0, text[-3000:]
    rows = _statuses(text)
    assert rows["inject"] == (first["inject"][0], "reproduced")
    for step in ("base", "data", "tune", "train"):
        assert rows[step] == (first[step][0], "cached"), step
    for step in ("eval_base", "eval_injected", "eval_trained", "report"):
        assert rows[step][1] == "ran" and rows[step][0] != first[step][0], step
    new = store.versions() - before
    assert sorted(stage for stage, _ in new) == ["eval", "eval", "eval", "report"]
    m = store.manifest("eval", rows["eval_trained"][0])
    assert m["params"]["eval"]["limit"] == 3


@pytest.mark.slow
def test_rerun_of_data_and_train_gives_identical_output_hashes(smoke) -> None:
    """Same inputs and seed on CPU: recomputed corpus and trained weights hash the same."""
    store = Store(smoke["store"])
    first = _statuses(smoke["text"])
    before = store.versions()
    rc, text = _run([*smoke["args"], "--rerun", "data,train"], smoke["dir"] / "run4.log")
    assert rc == 0, text[-3000:]
    rows = _statuses(text)
    assert rows["data"] == (first["data"][0], "reproduced")
    assert rows["train"] == (first["train"][0], "reproduced")
    assert store.versions() == before


def test_inject_and_train_take_the_search_winner(tmp_path: Path) -> None:
    from tli.pipeline.stages import STAGES, resolved_config

    tune_out = tmp_path / "tune"
    tune_out.mkdir()
    best = {"inject": {"interval": 3, "init": "copy"}, "train": {"lr": 0.003, "steps": 5}}
    (tune_out / "best.yaml").write_text(yaml.safe_dump(best))
    cfg = RunConfig.model_validate({"train": {"steps": 40, "lr": 0.001}})
    inputs = {"tune": tune_out}
    inj = resolved_config("inject", cfg, inputs).inject
    assert (inj.interval, inj.init) == (3, "copy")
    # The learning rate is taken only when the search searched it; steps stay the run's.
    assert resolved_config("train", cfg, inputs).train.lr == 0.001
    searched = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"lrs": [0.001, 0.003]})})
    train = resolved_config("train", searched, inputs).train
    assert (train.lr, train.steps) == (0.003, 40)
    # The version hashes the resolved values.
    assert STAGES["inject"].params(cfg, inputs)["inject"]["interval"] == 3
