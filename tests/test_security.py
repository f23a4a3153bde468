"""Security checks: no pickle is ever loaded, no shipped code ever runs, no path escapes.

- A planted pickle checkpoint (``pytorch_model.bin``, ``optimizer.pt``, ...) is never loaded:
  its payload would create a file, and the file never appears.
- ``trust_remote_code`` is never true: a model folder that ships modeling code (``auto_map``,
  ``*.py`` whose import would create a file) is loaded with transformers' own classes, or
  refused in one line when only its code could build it.
- Config values that are paths cannot leave their folder: shard names in a safetensors index,
  task names, evaluation folder names, S3 keys, trial folder names.
- Ray Tune's resume state is the only pickle tli ever reads, and only from a partial folder
  that tli wrote itself (its marker, this user's files, writable by no one else): checked by
  reading tli's source, and by planting a state (``test_bad_inputs``: the planted-pickle
  cases).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = [*sorted((ROOT / "tli").rglob("*.py")), *sorted((ROOT / "components").rglob("*.py")),
        *sorted((ROOT / "pipelines").rglob("*.py"))]  # fmt: skip


def tli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TLI_DRILL"}
    return subprocess.run([sys.executable, "-m", "tli.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


class Payload:
    """Unpickling this runs ``Path(flag).write_text(...)``: proof that a pickle was loaded."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (Path(self.flag).write_text, ("a pickle was loaded\n",))


def plant_pickles(folder: Path, flag: Path) -> list[str]:
    """Every pickle file name a training or HF tool leaves, each one a payload."""
    import torch

    names = ["pytorch_model.bin", "optimizer.pt", "training_args.bin", "rng_state.pth",
             "scheduler.pt", "model.ckpt", "extra.pkl"]  # fmt: skip
    for n in names:
        if n.endswith(".pkl"):
            (folder / n).write_bytes(pickle.dumps(Payload(flag)))
        else:
            torch.save(
                {"state": Payload(flag)}, folder / n
            )  # torch.load(weights_only=False) runs it
    return names


# ---------------------------------------------------------------------------- pickles


def test_the_payload_is_real(tmp_path: Path) -> None:
    """The planted files do run their payload when unpickled: the checks below can fail."""
    import torch

    flag = tmp_path / "flag"
    plant_pickles(tmp_path, flag)
    torch.load(tmp_path / "optimizer.pt", weights_only=False)
    assert flag.is_file()
    flag.unlink()
    pickle.loads((tmp_path / "extra.pkl").read_bytes())
    assert flag.is_file()


def test_a_pickle_only_checkpoint_is_refused_by_every_command(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    flag = tmp_path / "flag"
    m = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (m / "model.safetensors").unlink()
    plant_pickles(m, flag)
    commands = [
        ("inject", "--model", m, "--out", tmp_path / "i", "--interval", "2"),
        ("eval", "--model", m, "--out", tmp_path / "e", "--heldout", corpus, "--tasks", ""),
        ("train", "--model", m, "--data", corpus, "--out", tmp_path / "t", "--freeze", "none"),
        ("tune", "--model", m, "--data", corpus, "--out", tmp_path / "s", "--intervals", "2"),
        ("check", tiny_model_dir, m),
        ("pipeline", "run", "--base", m, "--store", tmp_path / "store"),
    ]
    for cmd in commands:
        r = tli(*cmd)
        assert r.returncode == 2 and "tli never unpickles" in r.stderr, (cmd, r.stderr)
        assert not flag.exists(), f"`tli {cmd[0]}` loaded a pickle"
    from tli.errors import TliError
    from tli.modelfolder import load_causal_lm

    with pytest.raises(TliError, match="never unpickles"):
        load_causal_lm(m)
    assert not flag.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "a refused command wrote"


def test_pickles_beside_safetensors_are_never_read_nor_carried(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    flag = tmp_path / "flag"
    m = shutil.copytree(tiny_model_dir, tmp_path / "m")
    names = plant_pickles(m, flag)
    r = tli("inject", "--model", m, "--out", tmp_path / "i", "--interval", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert not {p.name for p in (tmp_path / "i").iterdir()} & set(names), "pickles carried over"
    r = tli("eval", "--model", m, "--out", tmp_path / "e", "--heldout", corpus,
            "--heldout-seq-len", "32", "--tasks", "")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = tli("check", m, tmp_path / "i")
    assert r.returncode == 0 and "100%" in r.stdout, r.stdout + r.stderr
    assert not flag.exists(), "a planted pickle was loaded"


# ---------------------------------------------------------------------------- remote code


def ship_code(folder: Path, flag: Path, model_type: str | None = None) -> None:
    """Modeling, configuration and tokenizer code whose import creates ``flag``."""
    code = f"import pathlib\npathlib.Path({str(flag)!r}).write_text('shipped code ran')\n"
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}  # fmt: skip
    if model_type:
        cfg["model_type"] = model_type
        cfg["architectures"] = ["EvilForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    for name, body in {
        "configuration_evil.py": "from transformers import LlamaConfig as EvilConfig\n",
        "modeling_evil.py": "from transformers import LlamaForCausalLM as EvilForCausalLM\n",
        "tokenization_evil.py": "from transformers import PreTrainedTokenizerFast as "
        "EvilTokenizer\n",
    }.items():
        (folder / name).write_text(code + body)


def test_shipped_modeling_code_never_runs(tiny_model_dir: Path, corpus: Path, tmp_path: Path):
    """A Llama folder that ships its own code: tli loads it with transformers' Llama classes
    (exactly the numbers of the same folder without the code) and never imports the code."""
    flag = tmp_path / "flag"
    m = shutil.copytree(tiny_model_dir, tmp_path / "m")
    ship_code(m, flag)
    r = tli("inject", "--model", m, "--out", tmp_path / "i", "--interval", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert not list((tmp_path / "i").glob("*.py")), "inject carried code into its output"
    r = tli("eval", "--model", m, "--out", tmp_path / "e", "--heldout", corpus,
            "--heldout-seq-len", "32", "--tasks", "")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = tli("check", tiny_model_dir, m)  # the same weights: with and without the code
    assert r.returncode == 0, r.stderr
    assert "│         0 │" in r.stdout and "100%" in r.stdout, r.stdout
    assert not flag.exists(), "code shipped in a model folder ran"


def test_a_model_only_its_own_code_can_build_is_refused(tiny_model_dir: Path, tmp_path: Path):
    flag = tmp_path / "flag"
    m = shutil.copytree(tiny_model_dir, tmp_path / "m")
    ship_code(m, flag, model_type="evil")
    for cmd in (("inject", "--model", m, "--out", tmp_path / "i"),
                ("eval", "--model", m, "--out", tmp_path / "e", "--tasks", "piqa"),
                ("check", tiny_model_dir, m)):  # fmt: skip
        r = tli(*cmd)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert "tli never runs code from a model folder" in lines[0]
    assert not flag.exists()


def _calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else ""


def test_trust_remote_code_is_never_true_in_the_source() -> None:
    """Read every call in tli/, components/ and pipelines/: ``trust_remote_code`` is only ever
    given as the constant False, and the loaders tli calls on model folders pass it."""
    bad = []
    for path in CODE:
        for call in _calls(path):
            for kw in call.keywords:
                value = kw.value
                if kw.arg == "trust_remote_code" and not (
                    isinstance(value, ast.Constant) and value.value is False
                ):
                    bad.append(f"{path.relative_to(ROOT)}:{call.lineno}")
                if kw.arg is None:  # **kwargs: must not smuggle it in
                    src = ast.unparse(value)
                    if "trust_remote_code" in src and "False" not in src:
                        bad.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert not bad, f"trust_remote_code not the constant False at {bad}"
    for f in ("tli/modelfolder.py", "tli/eval/check.py", "tli/data/blocks.py", "tli/base.py"):
        for call in _calls(ROOT / f):
            if _name(call.func).endswith("from_pretrained"):
                given = {kw.arg for kw in call.keywords} | {
                    k for kw in call.keywords if kw.arg is None for k in ("trust_remote_code",)
                    if "trust_remote_code" in ast.unparse(kw.value)
                }  # fmt: skip
                assert "trust_remote_code" in given, f"{f}:{call.lineno} leaves it to the default"


# ---------------------------------------------------------------------------- pickles in the source

# The one place that may read a pickle: Ray Tune restoring the search that tli interrupted
# (Tuner.restore / can_restore read Tune's own experiment state), after output.check_own.
_PICKLE_READERS = {"pickle.load", "pickle.loads", "torch.load", "cloudpickle.load",
                   "cloudpickle.loads", "joblib.load", "dill.load", "dill.loads",
                   "pandas.read_pickle", "pd.read_pickle", "shelve.open", "marshal.load",
                   "marshal.loads", "np.load", "numpy.load"}  # fmt: skip


def test_no_pickle_is_read_anywhere_but_ray_tunes_resume() -> None:
    found, restores = [], []
    for path in CODE:
        for call in _calls(path):
            name = _name(call.func)
            if name in _PICKLE_READERS or name.endswith((".read_pickle", "Unpickler")):
                found.append(f"{path.relative_to(ROOT)}:{call.lineno} {name}")
            if name.endswith(("Tuner.restore", "Tuner.can_restore", "Trainer.restore")):
                restores.append(str(path.relative_to(ROOT)))
    assert not found, f"pickle readers in tli: {found}"
    assert set(restores) == {"tli/tune/stage.py"}, restores
    # ... and the search resumes only through staged(), which checks the folder is its own.
    src = (ROOT / "tli" / "output.py").read_text()
    assert "check_own(partial)" in src


def test_resume_refuses_a_folder_anyone_can_write(tmp_path: Path) -> None:
    """The check a resume makes before Tune reads its state: marker, owner, mode."""
    from tli.errors import TliError
    from tli.output import MARKER, check_own

    part = tmp_path / ".s.partial"
    (part / "ray").mkdir(parents=True)
    (part / "ray" / "tuner.pkl").write_bytes(b"x")
    with pytest.raises(TliError, match="no .tli-partial marker"):
        check_own(part)
    (part / MARKER).write_text(json.dumps({"target": "s", "resumable": True}))
    check_own(part)  # ours
    os.chmod(part / "ray", 0o777)
    with pytest.raises(TliError, match="anyone can write to it"):
        check_own(part)


# ---------------------------------------------------------------------------- paths


def test_a_shard_name_cannot_leave_the_model_folder(tiny_model_dir: Path, tmp_path: Path):
    from tli.errors import TliError
    from tli.inject.stio import checkpoint_files

    m = shutil.copytree(tiny_model_dir, tmp_path / "m")
    for bad in ("../other/model.safetensors", "/etc/passwd", "sub/model.safetensors", ".."):
        (m / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"lm_head.weight": bad}})
        )
        with pytest.raises(TliError, match="names a shard outside"):
            checkpoint_files(m)


def test_task_names_are_names_not_paths() -> None:
    from tli.errors import TliError
    from tli.eval.catalog import resolve_tasks

    for bad in ("../../etc/passwd", "/etc/passwd", "tasks/../piqa", "piqa/../../x"):
        with pytest.raises(TliError, match="unknown task"):
            resolve_tasks([bad])


def test_trial_folder_names_are_plain_names() -> None:
    """Trial folders (Ray Tune's, under OUT/ray) are named from config values: never a path."""
    import re

    from tli.config import RunConfig
    from tli.tune.space import search_points

    cfg = RunConfig.model_validate({"tune": {"intervals": [1, 2, 3], "inits": ["identity", "copy"],
                                             "alphas": [0.5, 1e-3], "lrs": [3e-4, 1.0]}})  # fmt: skip
    points = search_points(cfg, 6, 100, 1000)
    assert points
    for p in points:
        assert re.fullmatch(r"[A-Za-z0-9.+\-_]+", p.name), p.name


def test_an_evaluation_folder_stays_inside_out(tiny_model_dir: Path, corpus: Path, tmp_path: Path):
    """`--compare m/x/..` names the column after the real folder, not '..': nothing is written
    outside --out (before, the evaluation went to OUT/.., the folder above)."""
    (tmp_path / "src").mkdir()
    m = shutil.copytree(tiny_model_dir, tmp_path / "src" / "m")
    (m / "x").mkdir()
    out = tmp_path / "work" / "cmp"
    r = tli("eval", "--compare", f"{m}/x/..", "--out", out, "--heldout", corpus,
            "--heldout-seq-len", "32", "--tasks", "")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["compare.md", "m"]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["cmp"]


def test_s3_keys_cannot_climb_out_of_their_prefix() -> None:
    from tli import remote
    from tli.errors import TliError

    for bad in ("s3://bucket/a/../b", "s3://bucket/./a", "s3://bucket/a//b"):
        with pytest.raises(TliError, match="segment"):
            remote.parse(bad)
