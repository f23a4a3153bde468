"""`tli inject` / `tli import-*` on bad input: one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tli.cli import main


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        sys.exit(main(list(argv)))
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def assert_one_line_error(rc: int, err: str, needle: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, f"exit code {rc}, stderr: {err}"
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert "Traceback" not in err


def nothing_written(parent: Path) -> bool:
    return not any(parent.iterdir()) if parent.exists() else True


def test_inject_cli_happy_path_and_flags_override_config(model: Path, tmp_path: Path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("inject:\n  method: tli\n  interval: 2\n  init: copy\ntrain:\n  steps: 3\n")
    rc, out, _ = run_cli(
        capsys,
        "inject",
        "--model",
        str(model),
        "--out",
        str(tmp_path / "o"),
        "--config",
        str(cfg),
        "--init",
        "identity",
        "--quiet",
    )
    assert rc == 0
    plan = json.loads((tmp_path / "o" / "tli_plan.json").read_text())
    assert plan["num_layers_out"] == 6 and plan["params"]["init"] == "identity"
    assert "function-preserving" in out


def test_dry_run_writes_nothing(model: Path, tmp_path: Path, capsys):
    rc, out, _ = run_cli(
        capsys,
        "inject",
        "--model",
        str(model),
        "--out",
        str(tmp_path / "o"),
        "--method",
        "dus",
        "--overlap",
        "1",
        "--dry-run",
    )
    assert rc == 0 and "dus 4 -> 6 layers" in out
    assert not (tmp_path / "o").exists()


@pytest.fixture
def pickle_only(tmp_path: Path) -> Path:
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2})
    )
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: must never be loaded
    return d


@pytest.fixture
def corrupt(model: Path, tmp_path: Path) -> Path:
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "config.json").write_text((model / "config.json").read_text())
    (d / "model.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
    return d


@pytest.fixture
def gpt2_like(tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "num_hidden_layers": 2}
        )
    )
    save_file(
        {f"transformer.h.{i}.attn.c_proj.weight": torch.zeros(2, 2) for i in range(2)},
        d / "model.safetensors",
    )
    return d


CASES = {
    "missing model dir": (lambda m, t: ["--model", str(t / "nope")], "does not exist"),
    "model dir is a file": (lambda m, t: ["--model", str(m / "config.json")], "is not a folder"),
    "no config.json": (lambda m, t: ["--model", str(t)], "has no config.json"),
    "interval 0": (lambda m, t: ["--model", str(m), "--interval", "0"], "inject.interval"),
    "interval > N": (lambda m, t: ["--model", str(m), "--interval", "5"], "interval 5 out of range"),
    "positions out of range": (lambda m, t: ["--model", str(m), "--positions", "1,9"], "[9] out of range"),
    "non-numeric positions": (lambda m, t: ["--model", str(m), "--positions", "1,x"], "'x' is not a valid int"),
    "overlap >= N": (lambda m, t: ["--model", str(m), "--method", "dus", "--overlap", "4"], "overlap 4 out of range"),
    "init with dus": (lambda m, t: ["--model", str(m), "--method", "dus", "--init", "copy"], "init applies to method tli only, not dus"),
    "default init with dus": (lambda m, t: ["--model", str(m), "--method", "dus", "--init", "identity"], "--init applies to --method tli only, not dus"),
    "overlap with tli": (lambda m, t: ["--model", str(m), "--overlap", "1"], "overlap applies to method dus only, not tli"),
    "repeat with tli": (lambda m, t: ["--model", str(m), "--repeat", "3"], "repeat applies to method stack only"),
    "experts with dus": (lambda m, t: ["--model", str(m), "--method", "dus", "--experts", "4"], "experts applies to method moe only, not dus"),
    "alpha with llama-pro": (lambda m, t: ["--model", str(m), "--method", "llama-pro", "--alpha", "0.5"], "alpha applies to method tli only, not llama-pro"),
    "moe without sizes": (lambda m, t: ["--model", str(m), "--method", "moe"], "method moe needs experts and top_k"),
    "moe top-k > experts": (lambda m, t: ["--model", str(m), "--method", "moe", "--experts", "2", "--top-k", "3"], "top_k must be in 1..2"),
    "moe noise 1": (lambda m, t: ["--model", str(m), "--method", "moe", "--experts", "2", "--top-k", "1", "--expert-noise", "1"], "inject.expert_noise"),
    "placement with positions": (lambda m, t: ["--model", str(m), "--positions", "1", "--placement", "top"], "positions lists the new layers itself"),
    "too many new layers": (lambda m, t: ["--model", str(m), "--new-layers", "5"], "new_layers 5 out of range"),
    "unknown placement": (lambda m, t: ["--model", str(m), "--placement", "side"], "invalid choice"),
    "unknown method": (lambda m, t: ["--model", str(m), "--method", "moa"], "invalid choice"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_exit_2(case: str, model: Path, tmp_path: Path, capsys):
    make_args, needle = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out" / "o"
    rc, _, err = run_cli(capsys, "inject", "--out", str(out), *make_args(model, work))
    assert_one_line_error(rc, err, needle)
    assert nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    ("fixture", "needle"),
    [
        ("pickle_only", "never unpickles"),
        ("corrupt", "corrupt safetensors header"),
        ("gpt2_like", "architecture GPT2LMHeadModel is not supported"),
    ],
)
def test_bad_model_folders(fixture: str, needle: str, request, tmp_path: Path, capsys):
    src = request.getfixturevalue(fixture)
    rc, _, err = run_cli(
        capsys, "inject", "--model", str(src), "--out", str(tmp_path / "out" / "o")
    )
    assert_one_line_error(rc, err, needle)
    assert nothing_written(tmp_path / "out")


def test_existing_output_needs_force(model: Path, tmp_path: Path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run_cli(
        capsys, "inject", "--model", str(model), "--out", str(out), "--interval", "2"
    )
    assert_one_line_error(rc, err, "exists")
    assert (out / "keep.txt").read_text() == "mine"
    rc, _, _ = run_cli(
        capsys,
        "inject",
        "--model",
        str(model),
        "--out",
        str(out),
        "--force",
        "--interval",
        "2",
        "--quiet",
    )
    assert rc == 0 and not (out / "keep.txt").exists() and (out / "tli_plan.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"], "temporary siblings left over"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("inject: [unclosed\n", "invalid YAML"),
        ("inject:\n  intervall: 3\n", "inject.intervall: unknown key"),
        ("trian:\n  steps: 3\n", "trian: unknown key"),
        ("- a list\n", "must be a mapping"),
    ],
)
def test_bad_config_files(text: str, needle: str, model: Path, tmp_path: Path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    rc, _, err = run_cli(
        capsys, "inject", "--model", str(model), "--out", str(tmp_path / "o"), "--config", str(cfg)
    )
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "o").exists()


def test_import_gguf_rejects_non_gguf(tmp_path: Path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" * 4)
    rc, _, err = run_cli(capsys, "import-gguf", str(bad), "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "not a GGUF file")
    rc, _, err = run_cli(
        capsys, "import-gguf", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(rc, err, "does not exist")
    assert not (tmp_path / "o").exists()


def test_real_process_exit_code_and_stderr(tmp_path: Path):
    """The installed entry point, as a user runs it: exit 2 and one line, no traceback."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tli.cli",
            "inject",
            "--model",
            str(tmp_path / "x"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr


def test_check_prints_zero_difference_for_identity(
    tiny_model_dir: Path, tiny_injected_dir: Path, capsys
):
    rc, out, _ = run_cli(capsys, "check", str(tiny_model_dir), str(tiny_injected_dir))
    assert rc == 0
    row = next(ln for ln in out.splitlines() if "max |logit diff|" in ln)
    assert row.split("│")[-2].strip() == "0", row
    assert "100%" in out
