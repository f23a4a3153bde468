"""Versions know the code, and every command resolves its config the same way.

- A stage's version hashes the tli source it runs (its module and every tli module it
  imports), so changed code never reuses an output that older code computed; `tli runs list`
  says which stored versions came from other code.
- One ``resolve(preset, files, overrides)``: presets, then files, then ``KEY=VALUE``
  overrides, then flags; ``tli config show`` names where each value came from.
- ``--dry-run`` on a stage command checks everything, prints the job and writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tli.cli import main
from tli.config import resolve
from tli.errors import TliError
from tli.pipeline.stages import STAGES
from tli.pipeline.store import MANIFEST, Store
from tli.provenance import TLI_ROOT, code_files, code_hash

# ---------------------------------------------------------------------------- code hashes


def _rel(module: str, extra: tuple[str, ...] = ()) -> set[str]:
    return {p.relative_to(TLI_ROOT).as_posix() for p in code_files(module, extra)}


def test_a_stage_hashes_the_modules_it_runs_and_only_those() -> None:
    inject = _rel("tli.inject.stage")
    assert {"inject/stage.py", "inject/stio.py", "inject/plan.py", "config.py", "output.py",
            "modelfolder.py", "__init__.py", "inject/__init__.py"} <= inject  # fmt: skip
    assert not any(p.startswith(("train/", "tune/", "eval/", "cli/")) for p in inject), inject
    train = _rel("tli.train.stage")
    assert {"train/stage.py", "train/worker.py", "train/step.py", "rayenv.py"} <= train
    # Lazy (function-level) imports count: the eval stage runs lm-eval's task files too.
    ev = _rel("tli.eval.stage", STAGES["eval"].code_extra)
    assert "eval/lmeval.py" in ev and "eval/tasks/arc_easy.yaml" in ev


def test_code_hash_follows_the_source_not_the_install_path() -> None:
    assert code_hash("tli.inject.stage") == code_hash("tli.inject.stage")
    assert code_hash("tli.inject.stage") != code_hash("tli.train.stage")
    assert str(TLI_ROOT) not in json.dumps([STAGES[s].code() for s in STAGES])
    assert all(len(STAGES[s].code()) == 64 for s in STAGES)


def test_runs_list_and_show_say_which_versions_came_from_other_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store(tmp_path / "store")
    done = []
    for code in (STAGES["data"].code(), "0" * 64):
        r = store.run("data", {"data": {"n": len(done)}}, [],
                      lambda out: (out / "f").write_text("x"), code=code, log=print)  # fmt: skip
        done.append(r.version)
    assert main(["runs", "list", "--store", str(store.root)]) == 0
    listing = capsys.readouterr().out
    rows = {line.split()[1]: line for line in listing.splitlines() if line.startswith("data ")}
    assert " current " in rows[done[0]] and " other " in rows[done[1]]
    assert "1 version(s) came from other tli code" in listing
    assert main(["runs", "show", done[1], "--store", str(store.root)]) == 0
    assert "not the installed tli" in capsys.readouterr().out
    m = json.loads((store.stage_dir("data") / done[0] / MANIFEST).read_text())
    assert m["code"] == STAGES["data"].code()


# ---------------------------------------------------------------------------- resolve


def test_resolve_lays_preset_files_overrides_in_order(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text(yaml.safe_dump({"train": {"lr": 0.01, "steps": 7}, "eval": {"limit": 9}}))
    b = tmp_path / "b.yaml"
    b.write_text(yaml.safe_dump({"train": {"steps": 8}}))
    r = resolve("smoke", [a, b], ["train.steps=9", "tune.trial.validation.every=1"])
    cfg = r.config
    assert (cfg.train.lr, cfg.train.steps, cfg.eval.limit) == (0.01, 9, 9)
    assert cfg.train.seq_len == 64  # from the preset
    assert cfg.tune.trial.validation.every == 1 and cfg.tune.trial.validation.blocks == 4
    assert r.origin("train.lr") == str(a) and r.origin("train.steps") == "train.steps=9"
    assert r.origin("train.seq_len") == "preset smoke" and r.origin("train.grad_clip") == "default"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.lr"], None),  # not an override at all (no '='): the CLI passes it on as is
        (["train=1"], "SECTION.FIELD=VALUE"),
        (["train.nope=1"], "unknown key"),
        (["train.lr=[1"], "not valid YAML"),
        (["tune.trial.steps=0"], "greater than or equal to 1"),
    ],
)
def test_bad_overrides_are_one_line_errors(overrides: list[str], needle: str | None) -> None:
    if needle is None:
        with pytest.raises(TliError, match="SECTION.FIELD=VALUE"):
            resolve(None, [], overrides)
        return
    with pytest.raises(TliError, match=needle):
        resolve(None, [], overrides)


def test_config_show_names_the_origin_of_every_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("eval:\n  limit: 7\n")
    assert main(["config", "show", "--preset", "smoke", "--config", str(f), "eval.tasks=[piqa]",
                 "--section", "eval"]) == 0  # fmt: skip
    lines = {ln.split(":")[0].strip(): ln for ln in capsys.readouterr().out.splitlines()}
    assert lines["limit"].endswith(f"# {f}")
    assert lines["tasks"].endswith("# eval.tasks=[piqa]")
    assert lines["batch_size"].endswith("# preset smoke")
    assert lines["num_fewshot"].endswith("# default")


def test_flags_and_overrides_are_one_mechanism(capsys: pytest.CaptureFixture[str]) -> None:
    """A generated flag and a KEY=VALUE override set the same field the same way."""
    from tli.cli import build_parser
    from tli.cli.flags import resolve_args, split_overrides

    argv = ["train", "--model", "m", "--out", "o", "--data", "d", "--validation-every", "3"]
    rest, overrides = split_overrides([*argv, "train.validation.blocks=5"])
    args = build_parser(rest).parse_args(rest)
    args.overrides = overrides
    r = resolve_args(args)
    assert r.config.train.validation.every == 3 and r.config.train.validation.blocks == 5
    assert r.origin("train.validation.every") == "--validation-every"


# ---------------------------------------------------------------------------- --dry-run


def test_dry_run_prints_the_job_and_writes_nothing(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "o"
    assert main(["inject", "--model", str(tiny_model_dir), "--out", str(out), "--interval", "2",
                 "--dry-run"]) == 0  # fmt: skip
    assert "plan: tli 4 -> 6 layers" in capsys.readouterr().out
    assert main(["eval", "--model", str(tiny_model_dir), "--out", str(out), "--heldout",
                 str(corpus), "--tasks", "arc_easy", "--heldout-seq-len", "32",
                 "--dry-run"]) == 0  # fmt: skip
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["stage"] == "eval" and job["tasks"]["offline"] == ["arc_easy"]
    assert job["heldout"]["seq_len"] == 32
    assert main(["data", "build", "--out", str(out), "--sources", "shakespeare",
                 "--tokenizer", str(tiny_model_dir), "--dry-run"]) == 0  # fmt: skip
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["stage"] == "data" and set(job["documents"]) == {"train", "validation", "heldout"}
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
