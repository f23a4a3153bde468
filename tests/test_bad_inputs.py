"""The catalogue of bad inputs: every command, every config section, every way in.

Each case is one command line a user could type, on inputs made to be wrong in one way (paths,
permissions, files that are not what they claim, headers, configs, values out of range,
non-finite or of the wrong type, flags that do not apply, services that do not answer, a full
disk, an interruption). Every one must end the same way: one line on stderr that says what is
wrong and what to do, exit code 2 (130 / 143 for Ctrl-C / SIGTERM), nothing written where the
output would go, and every input byte for byte as it was (hashed before and after).

Most cases run ``tli.cli.main`` in this process (capturing file descriptor 2, so a library's
own writes to stderr count too). Cases that need a real process run ``python -m tli.cli``:
without the permission to bypass file modes (``setpriv`` drops it when the tests run as
root), on a full filesystem (a 64 KiB tmpfs in a private mount namespace, or ``RLIMIT_FSIZE``
where namespaces are not allowed), or with a real signal.

``TLI_CATALOGUE_MD=FILE pytest tests/test_bad_inputs.py`` writes the table of every case and
the line the user sees (the README's catalogue is made this way).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tli.cli import main

# ---------------------------------------------------------------------------- the workspace


@dataclass(frozen=True)
class Workspace:
    """Inputs shared by every case (never changed by any): hashed before and after each."""

    root: Path
    model: Path  # a tiny 4-layer Llama with the real SmolLM2 tokenizer
    inj: Path  # the same, TLI-injected (6 layers, tli_plan.json)
    cj: Path  # a small jsonl corpus
    corp: Path  # a corpus folder laid out like `tli data build`'s


@pytest.fixture(scope="module")
def ws(tiny_model_dir: Path, tiny_injected_dir: Path, corpus: Path, tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("catalogue")
    model = shutil.copytree(tiny_model_dir, root / "model")
    inj = shutil.copytree(tiny_injected_dir, root / "inj")
    cj = Path(shutil.copyfile(corpus, root / "corpus.jsonl"))
    corp = root / "corpus"
    corp.mkdir()
    lines = cj.read_text().splitlines()
    for i, split in enumerate(("train", "validation", "heldout")):
        (corp / f"{split}.jsonl").write_text("\n".join(lines[i::3]) + "\n")
    (corp / "manifest.json").write_text(json.dumps({"format": "tli-corpus/1", "splits": {}}))
    return Workspace(root, model, inj, cj, corp)


def tree_hash(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (hidden ones too): relative path -> sha256, 'dir',
    or, for a case's unreadable input, its mode and size."""
    out: dict[str, str] = {}
    for d, dirs, files in os.walk(root):  # os.walk skips what it cannot list
        for name in dirs + files:
            p = Path(d) / name
            rel, st = str(p.relative_to(root)), p.lstat()
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = f"dir:{st.st_mode:o}"
            else:
                try:
                    out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
                except PermissionError:
                    out[rel] = f"unreadable:{st.st_mode:o}:{st.st_size}"
    return out


# ---------------------------------------------------------------------------- case inputs


def copy_model(i: Path, src: Path, name: str = "m") -> Path:
    return shutil.copytree(src, i / name)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def fake_store(root: Path) -> Path:
    """A stage store as the pipeline leaves one: a version folder with its manifest."""
    v = root / "inject" / "0123456789abcdef"
    manifest = {"format": "tli-store/2", "stage": "inject", "version": v.name,
                "ended": "2026-01-01T00:00:00+00:00", "output_sha256": "0" * 64}  # fmt: skip
    write(v / "manifest.json", json.dumps(manifest))
    write(v / "output" / "config.json", "{}")
    write(root / ".cache" / "hashes.json", "{}")
    return root


def add_tensor(model: Path, name: str, shape: tuple[int, ...]) -> None:
    """Rewrite a model's safetensors with one extra (zero) tensor."""
    import torch
    from safetensors.torch import load_file, save_file

    f = model / "model.safetensors"
    tensors = load_file(f)
    tensors[name] = torch.zeros(shape)
    save_file(tensors, f, metadata={"format": "pt"})


def bundled_gguf_head(i: Path, nbytes: int) -> Path:
    from tli.base import bundled_gguf

    with open(bundled_gguf(), "rb") as f:
        return write(i / "cut.gguf", f.read(nbytes))


def planted_tune_state(ws: Workspace, i: Path, marker: bool) -> None:
    """A search's partial folder that tli did not write, with a pickle that must never run.

    Its saved inputs are real (the search would start): only the folder's origin is wrong.
    """
    import pickle

    from tli.config import RunConfig

    if marker and os.geteuid() != 0:
        pytest.skip("planting another user's file needs root")
    cfg = RunConfig.model_validate({
        "tune": {"intervals": [2], "trial": {"steps": 2, "validation": {"blocks": 1}}},
        "train": {"seq_len": 16, "batch_size": 2, "warmup": 0},
    })  # fmt: skip
    state = {"base_dir": str(ws.model.resolve()), "data": [str(ws.cj.resolve())],
             "config": cfg.model_dump(mode="json")}  # fmt: skip
    part = i / ".tune.partial"
    write(part / "tli_tune.json", json.dumps(state))
    write(part / "ray" / "experiment_state-2026-01-01_00-00-00.json", "{}")

    class Payload:
        def __reduce__(self):
            return (Path(i / "PWNED").write_text, ("the pickle ran",))

    write(part / "ray" / "tuner.pkl", pickle.dumps(Payload()))
    if marker:
        write(part / ".tli-partial", json.dumps({"target": "tune", "resumable": True}))
        os.chown(part / "ray" / "tuner.pkl", 65534, 65534)  # another user's file


# ---------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        what: the input, in words (the table's first column).
        cmd: the command line after ``tli``; ``{m}`` ``{inj}`` ``{cj}`` ``{corp}`` are the
            workspace's inputs, ``{i}`` this case's own inputs, ``{o}`` the (empty) folder the
            command runs in, where its output would go.
        needle: a part of the one line on stderr.
        setup: builds this case's own inputs in ``{i}`` (given the workspace and ``{i}``).
        mode: ``in`` (this process), ``proc`` (a real process), ``nopriv`` (a real process
            that cannot bypass file modes), ``full`` (a real process on a full filesystem).
        rc: the exit code.
        env: environment variables for the command.
        full: the size of the full filesystem (``full`` mode), in bytes: small enough that the
            output cannot fit.
        late: the command fails after its work began (a full disk, a signal mid-run), so its
            progress bars came before: the one line is then the only line from tli, and last.
    """

    what: str
    cmd: str
    needle: str | tuple[str, ...]
    setup: Callable[[Workspace, Path], object] | None = None
    mode: str = "in"
    rc: int = 2
    env: dict[str, str] = field(default_factory=dict)
    full: int = 64 * 1024
    late: bool = False


def _model_with(**cfg):
    def setup(ws: Workspace, i: Path) -> None:
        edit_json(copy_model(i, ws.model) / "config.json", **cfg)

    return setup


def _model_file(name: str, data: str | bytes, src: str = "model"):
    def setup(ws: Workspace, i: Path) -> None:
        write(copy_model(i, getattr(ws, src)) / name, data)

    return setup


def _model_without(*names: str, src: str = "model"):
    def setup(ws: Workspace, i: Path) -> None:
        m = copy_model(i, getattr(ws, src))
        for n in names:
            (m / n).unlink()

    return setup


def _chmod(rel: str, mode: int, src: str = "model"):
    def setup(ws: Workspace, i: Path) -> None:
        m = copy_model(i, getattr(ws, src))
        os.chmod(m / rel if rel else m, mode)

    return setup


def _truncate(ws: Workspace, i: Path) -> None:
    m = copy_model(i, ws.model)
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage_header(ws: Workspace, i: Path) -> None:
    m = copy_model(i, ws.model)
    write(m / "model.safetensors", struct.pack("<Q", 40) + b"\xff\xfe not json at all \x00" * 4)


def _index(wmap) -> Callable[[Workspace, Path], None]:
    def setup(ws: Workspace, i: Path) -> None:
        m = copy_model(i, ws.model)
        write(m / "model.safetensors.index.json", json.dumps({"weight_map": wmap}))

    return setup


def _extra_bias(ws: Workspace, i: Path) -> None:
    add_tensor(copy_model(i, ws.model), "model.layers.0.self_attn.q_proj.bias", (64,))


def _no_layers(ws: Workspace, i: Path) -> None:
    import torch
    from safetensors.torch import save_file

    m = i / "m"
    write(m / "config.json", json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    save_file({"encoder.layer.0.attention.self.query.weight": torch.zeros(2, 2)},
              m / "model.safetensors")  # fmt: skip


def _plan_mismatch(ws: Workspace, i: Path) -> None:
    """The 6-layer injected model with the plan of another injection (4 -> 8 layers)."""
    from tli.config import InjectConfig
    from tli.inject.plan import make_plan

    m = copy_model(i, ws.inj)
    write(m / "tli_plan.json", make_plan(4, InjectConfig(interval=1)).to_json())


def _sub_base(ws: Workspace, i: Path) -> None:
    copy_model(i / "sub", ws.model, "base")


def _gguf(data: bytes):
    def setup(ws: Workspace, i: Path) -> None:
        write(i / "f.gguf", data)

    return setup


def _corpus_with(name: str, data: str):
    def setup(ws: Workspace, i: Path) -> None:
        c = shutil.copytree(ws.corp, i / "c")
        write(c / name, data)

    return setup


def _cfg(text: str | bytes):
    def setup(ws: Workspace, i: Path) -> None:
        write(i / "run.yaml", text)

    return setup


def _store(ws: Workspace, i: Path) -> None:
    fake_store(i / "store")


def _existing_out(ws: Workspace, i: Path) -> None:
    write(i / "done" / "keep.txt", "a result the user keeps")


M, INJ = "--model {m}", "--model {inj}"
TRAIN = "train --model {inj} --data {cj} --out {o}/t --steps 2 --seq-len 16 --batch-size 2"
EVAL = "eval --model {m} --out {o}/e --tasks piqa --limit 2 --no-heldout"
TUNE = "tune --model {m} --data {cj} --out {o}/t --intervals 2 --trial-steps 2 --seq-len 16"
PIPE = "pipeline run --store {o}/store"

CASES: dict[str, Case] = {c.what: c for c in [
    # --- where the output goes: --force never destroys an input --------------------------
    Case("--out contains the input model (--force)", "inject --model {i}/sub/base --out {i}/sub "
         "--force --interval 2", "contains the input", _sub_base),
    Case("--out is the input model (--force)", "inject --model {m} --out {m} --force", "is the input"),
    Case("--out lies inside the input model (--force)", "inject --model {m} --out {m}/up --force",
         "lies inside the input"),
    Case("--out . (--force)", "inject --model {m} --out . --force", "is the current folder"),
    Case("--out / (--force)", "inject --model {m} --out / --force", "is the filesystem root"),
    Case("--out is the home folder (--force)", "inject --model {m} --out {o}/home --force",
         "is your home folder", env={"HOME": "{o}/home"}),
    Case("--out exists, no --force", "inject --model {m} --out {i}/done --interval 2",
         "exists: choose another --out or pass --force", _existing_out),
    Case("--out contains the --config file (--force)", "inject --model {m} --config {i}/run.yaml "
         "--out {i} --force", "contains the input", _cfg("inject: {interval: 2}\n")),
    Case("data: --out contains an --extra file (--force)", "data build --sources shakespeare "
         "--extra {i}/more.txt --out {i} --force", "contains the input",
         lambda ws, i: write(i / "more.txt", "Some text of my own.\n" * 50)),
    Case("eval: --out is the model (--force)", "eval --model {m} --out {m} --force --tasks piqa",
         "is the input"),
    Case("train: --out contains the data (--force)", "train --model {inj} --data {i}/d.jsonl "
         "--out {i} --force", "contains the input",
         lambda ws, i: shutil.copyfile(ws.cj, i / "d.jsonl")),
    Case("tune: --out lies inside the base model", "tune --model {m} --data {cj} --out {m}/search",
         "lies inside the input"),
    Case("import-gguf: --out contains the GGUF (--force)", "import-gguf {i}/f.gguf --out {i} "
         "--force", "contains the input", _gguf(b"GGUF" + b"\0" * 64)),
    Case("--out is a stage store (--force)", "inject --model {m} --out {i}/store --force",
         "lies in the stage store", _store),
    Case("--out lies inside a stage store", "inject --model {m} --out {i}/store/inject/mine",
         "lies in the stage store", _store),
    Case("pipeline: --store inside the --base model", "pipeline run --base {i}/m --store "
         "{i}/m/runs", "--store {i}/m/runs lies inside the input",
         lambda ws, i: copy_model(i, ws.model)),
    Case("pipeline: --store is a file", "pipeline run --store {i}/f", "is not a folder",
         lambda ws, i: write(i / "f", "x")),
    Case("runs clean: --dir that does not exist", "runs clean --dir {o}/nope", "is not a folder"),
    # --- model folders: one validation, before any heavy import -------------------------
    Case("--model does not exist", "inject --model {o}/nope --out {o}/x", "does not exist"),
    Case("--model is a file", "inject --model {m}/config.json --out {o}/x", "is not a folder"),
    Case("model folder without config.json", "inject --model {i}/m --out {o}/x",
         "has no config.json", _model_without("config.json")),
    Case("config.json is not JSON", "inject --model {i}/m --out {o}/x", "is not valid JSON",
         _model_file("config.json", "{model_type: llama")),
    Case("config.json is binary", "eval --model {i}/m --out {o}/x --tasks piqa",
         "is not valid JSON", _model_file("config.json", b"\x89PNG\r\n\x1a\n\xff\x00")),
    Case("config.json is a JSON list", "train --model {i}/m --data {cj} --out {o}/x",
         "is not a JSON object", _model_file("config.json", "[1, 2]")),
    Case("no weights", "inject --model {i}/m --out {o}/x", "has no *.safetensors weights",
         _model_without("model.safetensors")),
    Case("only a pickle checkpoint", "eval --model {i}/m --out {o}/x --tasks piqa",
         "tli never unpickles", lambda ws, i: (_model_without("model.safetensors")(ws, i),
                                                write(i / "m" / "pytorch_model.bin", b"\x80\x04K\x01."))),
    Case("safetensors cut in half", "inject --model {i}/m --out {o}/x", "corrupt safetensors header",
         _truncate),
    Case("safetensors header is garbage", "check {i}/m {m}", "corrupt safetensors header",
         _garbage_header),
    Case("index lists a missing shard", "inject --model {i}/m --out {o}/x", "lists missing shards",
         _index({"model.embed_tokens.weight": "model-00002-of-00002.safetensors"})),
    Case("index is not a weight map", "inject --model {i}/m --out {o}/x", "has no valid weight_map",
         _index(["model.safetensors"])),
    Case("index names a shard outside the folder", "eval --model {i}/m --out {o}/x --tasks piqa",
         "names a shard outside", _index({"lm_head.weight": "../model/model.safetensors"})),
    Case("config hidden_size disagrees with the tensors", "eval --model {i}/m --out {o}/x "
         "--tasks piqa", "but config.json implies", _model_with(hidden_size=128)),
    Case("config layer count disagrees with the tensors", "check {m} {i}/m",
         "config.json says 6 layers but the weights hold layers 0..3",
         _model_with(num_hidden_layers=6)),
    Case("model_type qwen2 on Llama weights", "inject --model {i}/m --out {o}/x --interval 2",
         "lack self_attn.q_proj.bias", _model_with(model_type="qwen2",
                                                   architectures=["Qwen2ForCausalLM"])),
    Case("architectures and model_type disagree", "eval --model {i}/m --out {o}/x --tasks piqa",
         "names LlamaForCausalLM but model_type 'mistral'", _model_with(model_type="mistral")),
    Case("weights the config does not use", "train --model {i}/m --data {cj} --out {o}/x "
         "--freeze none", "have self_attn.q_proj.bias", _extra_bias),
    Case("not a decoder laid out like Llama", "inject --model {i}/m --out {o}/x",
         "is not supported", _no_layers),
    Case("eval of a model without tokenizer", "eval --model {i}/m --out {o}/x --tasks piqa",
         "has no tokenizer", _model_without("tokenizer.json")),
    Case("tokenizer.json is garbage", "train --model {i}/m --data {cj} --out {o}/x",
         "tokenizer.json is not valid JSON", _model_file("tokenizer.json", "{\"version\": ", "inj")),
    Case("tli_plan.json does not match the model", "train --model {i}/m --data {cj} --out {o}/x",
         "the folder's plan does not match its model", _plan_mismatch),
    Case("train --freeze original without a plan", "train --model {m} --data {cj} --out {o}/x",
         "has no tli_plan.json"),
    Case("check: a folder that does not exist", "check {o}/nope {m}", "does not exist"),
    Case("model folder without read permission", "inject --model {i}/m --out {o}/x",
         "is not readable", _chmod("", 0o000), mode="nopriv"),
    Case("config.json without read permission", "check {i}/m {m}",
         "cannot read", _chmod("config.json", 0o000), mode="nopriv"),
    Case("tokenizer.json without read permission", EVAL.replace("{m}", "{i}/m"),
         "permission denied", _chmod("tokenizer.json", 0o000), mode="nopriv"),
    Case("weights without read permission", "inject --model {i}/m --out {o}/x",
         "permission denied", _chmod("model.safetensors", 0o000), mode="nopriv"),
    # --- config files and values ----------------------------------------------------------
    Case("--config that does not exist", "inject --model {m} --out {o}/x --config {o}/nope.yaml",
         "cannot read config file"),
    Case("--config is a folder", "inject --model {m} --out {o}/x --config {i}", "Is a directory"),
    Case("--config is binary", "train --model {inj} --data {cj} --out {o}/x --config {i}/run.yaml",
         "is not text", _cfg(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")),
    Case("--config is not YAML", "inject --model {m} --out {o}/x --config {i}/run.yaml",
         "invalid YAML", _cfg("inject: [interval: 2\n")),
    Case("--config is a YAML list", "tune --model {m} --data {cj} --out {o}/x --config "
         "{i}/run.yaml", "the top level must be a mapping", _cfg("- inject\n- train\n")),
    Case("--config without read permission", "inject --model {m} --out {o}/x --config "
         "{i}/run.yaml", "cannot read config file", lambda ws, i: os.chmod(
             _cfg("inject: {interval: 2}\n")(ws, i) or i / "run.yaml", 0), mode="nopriv"),
    Case("unknown section", "config show --config {i}/run.yaml", "pipelin: unknown key",
         _cfg("pipelin: {store: x}\n")),
    Case("unknown field", "train --model {inj} --data {cj} --out {o}/x --config {i}/run.yaml",
         "train.step: unknown key", _cfg("train: {step: 3}\n")),
    Case("YAML interval: true (a bool, not 1)", "inject --model {m} --out {o}/x --config "
         "{i}/run.yaml", "inject.interval: expected an integer, got the boolean true",
         _cfg("inject:\n  interval: true\n")),
    Case("tune.intervals with a bool", "tune --model {m} --data {cj} --out {o}/x "
         "tune.intervals=[2,true]", "expected an integer, got the boolean true"),
    Case("eval.batch_size: true", EVAL + " eval.batch_size=true",
         "expected an integer or one of auto, got the boolean true"),
    Case("eval.heldout.bf16: 3", "eval --model {m} --out {o}/e --heldout {cj} eval.heldout.bf16=3",
         "eval.heldout.bf16: Input should be a valid boolean"),
    Case("data.split_seed: not a number", "data build --out {o}/c data.split_seed=abc",
         "data.split_seed: Input should be a valid integer"),
    Case("--alpha nan", "inject --model {m} --out {o}/x --interval 2 --init copy --alpha nan",
         "inject.alpha: Input should be a finite number"),
    Case("--alpha inf", "inject --model {m} --out {o}/x --interval 2 --init copy --alpha inf",
         "inject.alpha: Input should be a finite number"),
    Case("tune.alphas with NaN", "tune --model {m} --data {cj} --out {o}/x --alphas 0.5,nan",
         "tune.alphas.1: Input should be a finite number"),
    Case("train.lr: .inf in YAML", "train --model {inj} --data {cj} --out {o}/x --config "
         "{i}/run.yaml", "train.lr: Input should be a finite number",
         _cfg("train:\n  lr: .inf\n")),
    Case("--lr -1", TRAIN + " --lr -1", "train.lr: Input should be greater than 0"),
    Case("--steps 0", TRAIN.replace("--steps 2", "--steps 0"), "train.steps"),
    Case("--val-fraction 0.7", "data build --out {o}/c --val-fraction 0.7", "data.val_fraction"),
    Case("--shard-size 0", "inject --model {m} --out {o}/x --interval 2 --shard-size 0",
         "shard_size: Input should be greater than or equal to 1"),
    Case("--shard-size 5XB", "inject --model {m} --out {o}/x --shard-size 5XB",
         "is not a size like 5GB"),
    Case("--limit 0", EVAL.replace("--limit 2", "--limit 0"), "--limit must be at least 1"),
    Case("--interval abc", "inject --model {m} --out {o}/x --interval abc", "invalid int value"),
    Case("--method unknown", "inject --model {m} --out {o}/x --method moa", "invalid choice"),
    Case("interval larger than the model", "inject --model {m} --out {o}/x --interval 9",
         "interval 9 out of range"),
    Case("positions repeat a layer", "inject --model {m} --out {o}/x --positions 1,1",
         "repeat a layer"),
    Case("override that is not YAML", "inject --model {m} --out {o}/x inject.positions=[1,",
         "the value is not valid YAML"),
    Case("override of an unknown field", "train --model {inj} --data {cj} --out {o}/x train.lrr=1",
         "train.lrr: unknown key"),
    Case("override on a command that takes none", "runs list train.lr=3",
         "takes no SECTION.FIELD=VALUE overrides"),
    Case("unknown preset", "config show --preset smok", "unknown preset 'smok'"),
    Case("config show --section that does not exist", "config show --section trian",
         "unknown section 'trian'"),
    # --- flags that do not apply ----------------------------------------------------------
    Case("--overlap with method tli", "inject --model {m} --out {o}/x --interval 2 --overlap 1",
         "overlap applies to method dus only"),
    Case("--repeat with method tli", "inject --model {m} --out {o}/x --interval 2 --repeat 3",
         "repeat applies to method stack only"),
    Case("--init with method dus", "inject --model {m} --out {o}/x --method dus --init copy",
         "init applies to method tli only"),
    Case("--steps on tune (trials use --trial-steps)", TUNE + " --steps 5",
         "unrecognized arguments: --steps"),
    Case("--resume on inject", "inject --model {m} --out {o}/x --resume",
         "unrecognized arguments: --resume"),
    Case("--dry-run on a tune --resume", "tune --out {o}/tune --resume --dry-run",
         "--dry-run needs --data"),
    # --- data -------------------------------------------------------------------------------
    Case("data: unknown source", "data build --out {o}/c --sources wikipedia", "wikipedia"),
    Case("data: --extra file that does not exist", "data build --out {o}/c --sources "
         "shakespeare --extra {o}/nope.txt", "does not exist"),
    Case("data: --extra of an unsupported type", "data build --out {o}/c --extra {i}/d.csv",
         "unsupported data file", lambda ws, i: write(i / "d.csv", "text\nhello\n")),
    Case("data: jsonl record without text", "data build --out {o}/c --sources shakespeare "
         "--extra {i}/d.jsonl", "has no string 'text' field",
         lambda ws, i: write(i / "d.jsonl", '{"body": "hello"}\n')),
    Case("data: --tokenizer folder without tokenizer", "data build --out {o}/c --tokenizer {i}",
         "has no tokenizer"),
    Case("train: --data file that does not exist", "train --model {inj} --data {o}/nope.jsonl "
         "--out {o}/x", "does not exist"),
    Case("train: corpus manifest is a JSON list", "train --model {inj} --data {i}/c --out {o}/x",
         "is not a corpus manifest", _corpus_with("manifest.json", "[1, 2]")),
    Case("train: corpus split file is damaged", "train --model {inj} --data {i}/c --out {o}/x",
         "train.jsonl is damaged", _corpus_with("train.jsonl", '{"text": "ok"}\n{"txt": 1}\n')),
    Case("train: a folder that is not a corpus", "train --model {inj} --data {m} --out {o}/x",
         "is not a corpus built by `tli data build`"),
    Case("train: --seq-len longer than the context", TRAIN + " --seq-len 4096",
         "is longer than the model's context"),
    Case("train: less data than one batch", TRAIN + " --batch-size 100000",
         "fewer than one global batch"),
    Case("train: more workers than CPUs here", TRAIN + " --workers 512", "CPU"),
    Case("train: --resume with nothing to resume", TRAIN + " --resume", "nothing to resume"),
    Case("tune: --resume with nothing to resume", "tune --out {o}/t --resume",
         "nothing to resume"),
    Case("tune: --resume from a folder tli did not write (a planted pickle)",
         "tune --out {i}/tune --resume", "will not resume from",
         lambda ws, i: planted_tune_state(ws, i, marker=False)),
    Case("tune: --resume with another user's file in the state",
         "tune --out {i}/tune --resume", "belongs to another user",
         lambda ws, i: planted_tune_state(ws, i, marker=True)),
    Case("tune: interval larger than the model", TUNE.replace("--intervals 2", "--intervals 9"),
         "9"),
    # --- eval -------------------------------------------------------------------------------
    Case("eval: unknown task", EVAL.replace("piqa", "nosuchtask"), "unknown task 'nosuchtask'"),
    Case("eval: --device cuda on a machine without GPU", EVAL + " --device cuda",
         "this machine has no CUDA GPU"),
    Case("eval: --device that does not exist", EVAL + " --device tpu", "'tpu' is not a device"),
    Case("eval: nothing to evaluate", "eval --model {m} --out {o}/e --tasks ''",
         "nothing to evaluate"),
    Case("eval: --heldout that does not exist", EVAL + " --heldout {o}/nope", "does not exist"),
    Case("eval: --heldout corpus manifest not an object", EVAL.replace(" --no-heldout", "")
         + " --heldout {i}/c", "is not a corpus manifest", _corpus_with("manifest.json", '"x"')),
    Case("eval: --compare a folder that is neither", "eval --compare {i} --out {o}/cmp",
         "is neither an evaluation folder nor a model folder"),
    # --- import -----------------------------------------------------------------------------
    Case("import-gguf: file that does not exist", "import-gguf {o}/nope.gguf --out {o}/x",
         "does not exist"),
    Case("import-gguf: not a GGUF file", "import-gguf {m}/config.json --out {o}/x",
         "is not a GGUF file"),
    Case("import-gguf: garbage after a valid magic", "import-gguf {i}/f.gguf --out {o}/x",
         "is damaged or truncated", _gguf(b"GGUF" + bytes(range(256)) * 8)),
    Case("import-gguf: a real GGUF cut short", "import-gguf {i}/cut.gguf --out {o}/x",
         "is damaged or truncated", lambda ws, i: bundled_gguf_head(i, 1_000_000)),
    # --- pipeline, store, services -----------------------------------------------------------
    Case("pipeline compile to a folder that does not exist", "pipeline compile --out "
         "{o}/nope/p.yaml", "is not a writable folder"),
    Case("pipeline compile to a path that cannot be written", "pipeline compile --out "
         "/proc/tli.yaml", "cannot write /proc/tli.yaml"),
    Case("pipeline: --rerun of an unknown stage", PIPE + " --rerun trian", "trian"),
    Case("pipeline: --base that is not a model folder", PIPE + " --base {i}", "has no config.json"),
    Case("pipeline: --ray-jobs where nothing answers", PIPE + " --ray-jobs http://127.0.0.1:9",
         "cannot reach the Ray head's job API"),
    Case("pipeline submit: KFP API where nothing answers", "pipeline submit --host "
         "http://127.0.0.1:9", "cannot reach the Kubeflow Pipelines API"),
    Case("train: --ray-address where nothing listens", TRAIN + " --ray-address 127.0.0.1:9",
         "cannot reach the Ray cluster at 127.0.0.1:9"),
    Case("train: --ray-address that never answers", TRAIN + " --ray-address {silent} "
         "--connect-timeout-s 2", "(no answer within 2 s)"),
    Case("tune: --ray-address that never answers", TUNE + " --ray-address {silent} "
         "--connect-timeout-s 2", "(no answer within 2 s)"),
    Case("pipeline: --ray-jobs that never answers", PIPE + " --ray-jobs http://{silent} "
         "--connect-timeout-s 2", "(no answer within 2 s)"),
    Case("inject: an s3:// model where no S3 answers", "inject --model s3://bucket/m --out {o}/x",
         "cannot reach http://127.0.0.1:9", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9",
         "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}),
    Case("runs list: no store there", "runs list --store {o}/nope", "no store at"),
    Case("runs show: a version that is not stored", "runs show 0123abc --store {i}/store",
         "no version '0123abc'", _store),
    # --- a full disk -----------------------------------------------------------------------
    Case("inject onto a full disk", "inject --model {m} --out {o}/x --interval 2 --quiet",
         ("no space left on the device", "a file grew past the size limit"), mode="full",
         late=True),
    Case("data build onto a full disk", "data build --out {o}/c --sources shakespeare",
         ("no space left on the device", "a file grew past the size limit"), mode="full",
         late=True),
    Case("eval onto a full disk", EVAL.replace("--no-heldout", "--heldout {cj} --heldout-seq-len "
         "16"), ("no space left on the device", "a file grew past the size limit"), mode="full",
         full=12 * 1024, late=True),
    # --- interruption (a real signal to the real process) -----------------------------------
    Case("Ctrl-C in the first second", "inject --model {m} --out {o}/x", "interrupted: nothing "
         "was done", mode="proc", rc=130, env={"TLI_DRILL": "cli.start=1:int"}),
    Case("SIGTERM in the first second", "data build --out {o}/c", "terminated: nothing was done",
         mode="proc", rc=143, env={"TLI_DRILL": "cli.start=1:term"}),
    Case("Ctrl-C while a shard is half written", "inject --model {m} --out {o}/x --interval 2 "
         "--quiet", "interrupted: nothing was written", mode="proc", rc=130, late=True,
         env={"TLI_DRILL": "inject.run=model.safetensors:int"}),
    Case("SIGTERM while the corpus is written", "data build --out {o}/c --sources shakespeare",
         "terminated: nothing was written", mode="proc", rc=143, late=True,
         env={"TLI_DRILL": "data.split=validation:term"}),
    Case("SIGTERM while the model is evaluated", EVAL, "terminated: nothing was written",
         mode="proc", rc=143, late=True, env={"TLI_DRILL": "eval.loaded=1:term"}),
]}  # fmt: skip


# ---------------------------------------------------------------------------- running


NOPRIV = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner",
          "--inh-caps", "-dac_override,-dac_read_search,-fowner", "--"]  # fmt: skip


_SILENT: list = []


def silent_address() -> str:
    """host:port of a socket that accepts connections and never answers (a hung service)."""
    import socket

    if not _SILENT:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        _SILENT.append(s)
    return f"127.0.0.1:{_SILENT[0].getsockname()[1]}"


def _fill(text: str, ws: Workspace, i: Path, o: Path) -> str:
    silent = silent_address() if "{silent}" in text else ""
    return text.format(m=ws.model, inj=ws.inj, cj=ws.cj, corp=ws.corp, i=i, o=o, silent=silent)


def _run_in_process(argv: list[str], env: dict[str, str], capfd, monkeypatch) -> tuple[int, str]:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = int(e.code or 0)
    return rc, capfd.readouterr().err


def _command(argv: list[str], case: Case, o: Path) -> tuple[list[str], dict]:
    mode = case.mode
    cmd = [sys.executable, "-m", "tli.cli", *argv]
    kw: dict = {}
    if mode == "nopriv" and os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: file modes cannot be enforced")
        cmd = NOPRIV + cmd
    if mode == "full":
        if _namespaces_work():
            # A tiny tmpfs over the output folder in a private mount namespace; the listing
            # after the command shows what it left on the full filesystem.
            script = ('mount -t tmpfs -o size="$1" tmpfs "$2" || exit 99; cd "$2"; d="$2"; '
                      'shift 2; "$@"; rc=$?; echo "@@left:$(ls -A "$d")"; exit $rc')  # fmt: skip
            cmd = ["unshare", "-Urm", "sh", "-c", script, "sh", str(case.full), str(o), *cmd]
        else:
            kw["preexec_fn"] = lambda: _limit_file_size(case.full)
    return cmd, kw


def _limit_file_size(nbytes: int) -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


_NS: list[bool] = []


def _namespaces_work() -> bool:
    if not _NS:
        try:
            r = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                               capture_output=True, timeout=30)  # fmt: skip
            _NS.append(r.returncode == 0)
        except (OSError, subprocess.TimeoutExpired):
            _NS.append(False)
    return _NS[0]


def _run_process(argv: list[str], case: Case, env: dict[str, str], o: Path) -> tuple[int, str]:
    cmd, kw = _command(argv, case, o)
    r = subprocess.run(cmd, cwd=o, env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=600, **kw)  # fmt: skip
    left = [ln for ln in r.stdout.splitlines() if ln.startswith("@@left:")]
    if left:  # the full filesystem: it must hold nothing after the command
        assert left[0] == "@@left:", f"left on the full filesystem: {left[0][7:]}"
    return r.returncode, r.stderr


MESSAGES: dict[str, str] = {}  # case -> the line the user saw (for the README's table)


@pytest.mark.parametrize("what", list(CASES))
def test_bad_input(what: str, ws: Workspace, tmp_path: Path, capfd, monkeypatch) -> None:
    case = CASES[what]
    i, o = tmp_path / "in", tmp_path / "out"
    i.mkdir()
    o.mkdir()
    if case.setup is not None:
        case.setup(ws, i)
    before_ws, before_i = tree_hash(ws.root), tree_hash(i)
    argv = [_fill(a, ws, i, o) for a in shlex.split(case.cmd)]
    env = {k: _fill(v, ws, i, o) for k, v in case.env.items()}
    if "HOME" in env:
        Path(env["HOME"]).mkdir()
    monkeypatch.chdir(o)
    if case.mode == "in":
        rc, err = _run_in_process(argv, env, capfd, monkeypatch)
    else:
        rc, err = _run_process(argv, case, env, o)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    if case.late:
        assert lines and lines[-1].startswith("tli"), err
        lines = [ln for ln in lines if ln.startswith("tli")]
    needles = case.needle if isinstance(case.needle, tuple) else (case.needle,)
    needles = tuple(_fill(n, ws, i, o) for n in needles)
    assert rc == case.rc, f"exit code {rc}, stderr:\n{err}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert any(n in lines[0] for n in needles), f"{needles} not in {lines[0]!r}"
    assert lines[0].startswith("tli"), lines[0]
    left = sorted(p.name for p in o.iterdir() if p.name != "home")
    assert not left, f"written where the output would go: {left}"
    assert tree_hash(ws.root) == before_ws, "a shared input was changed"
    assert tree_hash(i) == before_i, "an input of the case was changed (or written into)"
    assert not (i / "PWNED").exists(), "a planted pickle was loaded"
    MESSAGES[what] = lines[0].replace(str(tmp_path), "…").replace(str(ws.root), "…")


def test_catalogue_covers_every_command_and_section() -> None:
    """At least 80 cases, touching every command and every config section."""
    assert len(CASES) >= 80
    commands = {shlex.split(c.cmd)[0] for c in CASES.values()}
    assert commands >= {"inject", "data", "eval", "train", "tune", "check", "import-gguf",
                        "pipeline", "runs", "config"}  # fmt: skip
    text = " ".join(c.cmd for c in CASES.values()) + " ".join(CASES)
    for section in ("inject.", "data.", "train.", "tune.", "eval.", "base", "--shard-size",
                    "--device"):  # fmt: skip
        assert section in text, section


@pytest.fixture(scope="module", autouse=True)
def _catalogue_table():
    """Write the README's table when TLI_CATALOGUE_MD names a file (after the cases ran)."""
    yield
    path = os.environ.get("TLI_CATALOGUE_MD")
    if not path or not MESSAGES:
        return
    rows = ["| # | bad input | command | what the user sees (stderr, one line) | exit |",
            "|---:|---|---|---|---:|"]  # fmt: skip
    for n, (what, msg) in enumerate(MESSAGES.items(), 1):
        case = CASES[what]
        cmd = "tli " + case.cmd.replace("{m}", "M").replace("{inj}", "INJ").replace(
            "{cj}", "corpus.jsonl").replace("{corp}", "corpus").replace("{i}", "in").replace(
            "{o}", "out").replace("{silent}", "HOST:PORT")  # fmt: skip
        rows.append(f"| {n} | {_cell(what)} | `{_cell(cmd)}` | {_cell(msg)} | {case.rc} |")
    Path(path).write_text("\n".join(rows) + "\n")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def test_ctrl_c_from_outside_while_evaluating(ws: Workspace, tmp_path: Path) -> None:
    """A real Ctrl-C from another process, once the evaluation is under way: one line, 130,
    no partial folder left, no output."""
    out = tmp_path / "e"
    cmd = [sys.executable, "-m", "tli.cli", *shlex.split(_fill(EVAL, ws, tmp_path, tmp_path))]
    cmd[cmd.index("--out") + 1] = str(out)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    lock = tmp_path / ".e.partial.lock"
    deadline = time.monotonic() + 300
    while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the evaluation ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130, err
    assert lines[-1] == "tli eval: interrupted: nothing was written: run the command again", err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "left beside --out"
