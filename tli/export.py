"""``tli export``: a finished model with its model card and lineage, to a folder, S3 or the Hub.

The source is a stage version of the store (a unique prefix, or ``STAGE/VERSION``; a version
of ``train``, ``inject`` or ``import-base``) or a model folder. The export holds the model's
files (weights, config, tokenizer, tli's plan and provenance), a model card (``README.md``:
method, plan, base, data, training, evaluation table, lineage) and ``tli_lineage.json`` (every
store version the model came from, with its parameters, content hash and inputs).

Destinations:

- a folder: written staged (:mod:`tli.output`), so it appears only when complete; ``--force``
  replaces an existing one by rename;
- ``s3://bucket/prefix``: uploaded with :func:`tli.remote.upload` (a completion marker is
  written last); an existing prefix is refused without ``--force``;
- the Hub (``--push-to-hub org/name``, or ``hf://org/name`` as the destination): online mode
  and ``$HF_TOKEN`` with write access (a private repo is created when missing).

The store is only read. Every check comes before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tli import hub, remote
from tli.errors import TliError

CARD = "README.md"
LINEAGE = "tli_lineage.json"
HUB_SCHEME = "hf://"
MODEL_STAGES = ("train", "inject", "import-base")
# What the bundled base is on the Hub (the card's base_model), and its licence.
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_LICENSE = "apache-2.0"
LABELS = {"import-base": "base", "inject": "injected", "train": "trained"}


@dataclass(frozen=True)
class Source:
    """What is exported: the model folder and, when it is a store version, its lineage."""

    model_dir: Path
    manifest: dict[str, Any] | None = None  # the version's manifest (None: a plain folder)
    store: Any = None  # tli.pipeline.store.Store of the version
    lineage: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        if self.manifest is not None:
            return f"{self.manifest['stage']}-{self.manifest['version']}"
        return self.model_dir.name


# ---------------------------------------------------------------------------- the source


def _version_dir_of(folder: Path) -> Path | None:
    """The store version folder ``folder`` is (or whose ``output/`` it is, or lies in)."""
    for p in (folder, *folder.parents):
        m = p / "manifest.json"
        if m.is_file() and (p / "output").is_dir():
            try:
                if str(json.loads(m.read_text()).get("format", "")).startswith("tli-store/"):
                    return p
            except (OSError, ValueError):
                return None
    return None


def resolve_source(source: str, store: str | Path | None) -> Source:
    """A model folder, or a store version (prefix / ``STAGE/VERSION``) as its model folder.

    Raises:
        TliError: no such folder or version, a version of a stage without a model, or a folder
            that is not an HF model folder.
    """
    from tli.modelfolder import ModelFolder
    from tli.pipeline.stages import model_dir
    from tli.pipeline.store import Store

    path = Path(source)
    if path.is_dir():
        vdir = _version_dir_of(path.absolute())
        if vdir is None:
            ModelFolder.open(model_dir(path), tokenizer=True, decoder=False)
            return Source(model_dir(path))
        st, manifest = Store(vdir.parent.parent), json.loads((vdir / "manifest.json").read_text())
    else:
        if store is None or not Path(store).is_dir():
            raise TliError(
                f"{source} is not a folder, and there is no store to look it up in: give a model "
                "folder, or a version with --store"
            )
        st = Store(store)
        manifest = st.lookup(source)
        vdir = st.stage_dir(manifest["stage"]) / manifest["version"]
    if manifest["stage"] not in MODEL_STAGES:
        raise TliError(
            f"{manifest['stage']}/{manifest['version']} is not a model: export a version of "
            f"{', '.join(MODEL_STAGES)}"
        )
    folder = model_dir(vdir / "output")
    ModelFolder.open(folder, tokenizer=True, decoder=False)
    return Source(folder, manifest, st, lineage(st, manifest))


def lineage(store: Any, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every store version ``manifest`` came from (itself first), each once, with its inputs."""
    out: list[dict[str, Any]] = []
    todo, seen = [manifest], set()
    while todo:
        m = todo.pop(0)
        key = (m["stage"], m["version"])
        if key in seen:
            continue
        seen.add(key)
        ins = {}
        for name, i in (m.get("inputs") or {}).items():
            if i.get("stage"):
                ins[name] = f"{i['stage']}/{i['version']}"
                try:
                    todo.append(store.manifest(i["stage"], i["version"]))
                except OSError:
                    ins[name] += " (missing from the store)"
            else:
                ins[name] = f"external {Path(i.get('path', '')).name} (sha256 {i.get('sha256')})"
        out.append({"stage": m["stage"], "version": m["version"], "params": m.get("params"),
                    "output_sha256": m.get("output_sha256"), "code": m.get("code"),
                    "seed": m.get("seed"), "ended": m.get("ended"), "inputs": ins})  # fmt: skip
    return out


def evaluations(src: Source) -> dict[str, Path]:
    """``{label: eval output}``: the newest evaluation of the model and of each model upstream
    (base, injected, trained), from the store."""
    if src.store is None:
        return {}
    models = {(n["stage"], n["version"]): LABELS[n["stage"]] for n in src.lineage
              if n["stage"] in LABELS}  # fmt: skip
    found: dict[str, tuple[str, Path]] = {}
    for m in src.store.manifests():  # oldest first: a newer evaluation replaces an older one
        model = (m.get("inputs") or {}).get("model") or {}
        label = models.get((model.get("stage"), model.get("version")))
        if m.get("stage") == "eval" and label:
            found[label] = (m["version"], src.store.stage_dir("eval") / m["version"] / "output")
    order = [x for x in ("base", "injected", "trained") if x in found]
    return {label: found[label][1] for label in order}


# ---------------------------------------------------------------------------- the card


def _read(folder: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stage_output(src: Source, stage: str) -> Path | None:
    node = next((n for n in src.lineage if n["stage"] == stage), None)
    if node is None or src.store is None:
        return None
    return src.store.stage_dir(stage) / node["version"] / "output"


def _base_model(src: Source) -> tuple[str | None, str | None, str]:
    """(Hub id of the base, its licence, how the card says where the base came from)."""
    base_out = _stage_output(src, "import-base")
    record = hub.read_record(base_out) if base_out else hub.read_record(src.model_dir)
    if record:
        text = f"`{record['repo_id']}` from the Hugging Face Hub, commit `{record['commit']}`"
        return record["repo_id"], None, text
    from tli.base import BUNDLED_GGUF

    node = next((n for n in src.lineage if n["stage"] == "import-base"), None)
    if node is None or src.store is None:
        return None, None, "Not recorded (a model folder outside a store)."
    given = (src.store.manifest("import-base", node["version"]).get("inputs") or {}).get("source")
    name, sha = Path((given or {}).get("path", "")).name, (given or {}).get("sha256", "")
    if name == BUNDLED_GGUF:
        text = f"{BUNDLED_HUB_ID}, from tli's bundled `{BUNDLED_GGUF}` (sha256 `{sha[:16]}`)"
        return BUNDLED_HUB_ID, BUNDLED_LICENSE, text
    return None, None, f"The local folder `{name}` (content sha256 `{sha[:16]}`)."


def _method_lines(model_dir: Path) -> list[str]:
    plan = _read(model_dir, "tli_plan.json")
    if not plan:
        return ["No layer plan (`tli_plan.json`): the model was not upscaled by tli."]
    params = ", ".join(f"{k}={v}" for k, v in (plan.get("params") or {}).items() if v is not None)
    prov = _read(model_dir, "tli_provenance.json").get("parameters") or {}
    lines = [
        f"- method: **{plan.get('method')}** ({params})",
        f"- layers: {plan.get('num_layers_in')} -> {plan.get('num_layers_out')}; new layers "
        f"{plan.get('new_layers')}",
        f"- function-preserving at initialisation: {plan.get('function_preserving')}",
    ]
    if prov.get("before") and prov.get("after"):
        lines.append(f"- parameters: {prov['before']:,} -> {prov['after']:,}")
    return lines


def _data_lines(src: Source) -> list[str]:
    if src.store is None:
        return ["Not recorded (a model folder outside a store)."]
    out = _stage_output(src, "data")
    man = _read(out, "manifest.json") if out else {}
    if not man:
        return ["No corpus in the model's lineage: it was neither trained nor tuned here."]
    lines = []
    for s in man.get("sources") or []:
        extra = f", Hub commit `{s['hub']['commit']}`" if s.get("hub") else ""
        lines.append(f"- {s.get('name')}: {s.get('documents')} documents, licence "
                     f"{s.get('licence')}{extra}")  # fmt: skip
    for split, info in (man.get("splits") or {}).items():
        lines.append(f"- {split}: {info.get('documents')} documents, {info.get('tokens')} "
                     f"tokens (sha256 `{str(info.get('sha256'))[:16]}`)")  # fmt: skip
    return lines


def _training_lines(model_dir: Path) -> list[str]:
    prov = _read(model_dir, "tli_train.json")
    if not prov:
        return ["Not trained by tli (no `tli_train.json`)."]
    cfg, res = prov.get("config") or {}, prov.get("result") or {}
    keys = ("steps", "lr", "warmup", "seq_len", "batch_size", "grad_accum", "workers", "freeze",
            "bf16", "seed")  # fmt: skip
    lines = ["- config: " + ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)]
    lines.append(f"- result: {res.get('steps')} steps, {res.get('tokens')} tokens, final "
                 f"training loss {res.get('final_loss')}, final validation loss "
                 f"{res.get('final_val_loss')}")  # fmt: skip
    return lines


def model_card(src: Source) -> str:
    """The model card (``README.md``): front matter for the Hub, then what tli recorded."""
    from tli.eval.tables import read_eval_dir, results_table

    base_id, licence, base_text = _base_model(src)
    front = ["---", "library_name: transformers", "tags: [tli, depth-upscaling, layer-injection]"]
    if base_id:
        front.append(f"base_model: {base_id}")
    if licence:
        front.append(f"license: {licence}")
    lines = [*front, "---", "", f"# {src.name}", "",
             "Depth-upscaled with [tli](https://arxiv.org/abs/2410.11654) (Transformer Layer "
             "Injection); everything below is read from tli's records of the run.", "",
             "## Method", "", *_method_lines(src.model_dir), "", "## Base model", "",
             base_text, "", "## Data", "", *_data_lines(src), "", "## Training", "",
             *_training_lines(src.model_dir), "", "## Evaluation", ""]  # fmt: skip
    evals = evaluations(src)
    if evals:
        lines += [results_table({k: read_eval_dir(v) for k, v in evals.items()}), ""]
    else:
        lines += ["No evaluation of this model is recorded in the store.", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, "
              "AutoTokenizer", "", 'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
              'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")', "```", "",
              "## Lineage", ""]  # fmt: skip
    if src.lineage:
        lines += ["| stage | version | output sha256 | inputs |", "|---|---|---|---|"]
        for n in src.lineage:
            ins = "; ".join(f"{k}: {v}" for k, v in n["inputs"].items())
            lines.append(f"| {n['stage']} | {n['version']} | "
                         f"`{str(n['output_sha256'])[:16]}` | {ins} |")  # fmt: skip
        lines += ["", f"Every version's parameters and inputs are in `{LINEAGE}`."]
    else:
        lines.append("A model folder outside a store: no lineage recorded.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- writing


def _fill(folder: Path, src: Source, link: bool) -> None:
    """The export's files in ``folder``: the model's (copied or linked), the card, the lineage.

    A folder export gets copies, never links: the store's versions must not change through it.
    """
    for f in sorted(src.model_dir.iterdir()):
        if not f.is_file() or f.name in (CARD, LINEAGE):
            continue
        if link:
            (folder / f.name).symlink_to(f.resolve())
        else:
            shutil.copyfile(f, folder / f.name)
    (folder / CARD).write_text(model_card(src))
    doc = {"exported": src.name, "lineage": src.lineage}
    (folder / LINEAGE).write_text(json.dumps(doc, indent=2, default=str) + "\n")


@contextlib.contextmanager
def _staging(src: Source) -> Iterator[Path]:
    """A temporary folder with links to the model's files and the card (for uploads)."""
    with tempfile.TemporaryDirectory(prefix="tli-export-") as tmp:
        folder = Path(tmp) / "export"
        folder.mkdir()
        _fill(folder, src, link=True)
        yield folder


def check_destination(src: Source, to: str, *, force: bool, offline: bool) -> None:
    """Every check of the destination, before anything is written."""
    from tli.output import precheck

    if to.startswith(HUB_SCHEME):
        name = hub.parse(hub.PREFIX + to[len(HUB_SCHEME) :])
        if name is None or name.revision or name.config:
            raise TliError(f"--to {to}: write hf://org/name")
        if offline:  # a destination, not an input: say what pushing needs
            raise TliError(f"--push-to-hub {name}: pushing to the Hugging Face Hub needs the "
                           f"network, and tli runs offline: set {hub.OFFLINE_SETTING}")  # fmt: skip
        if hub.hub_offline_env():
            raise TliError("--push-to-hub needs the network, but HF_HUB_OFFLINE=1: unset it")
        if hub.token() is None:
            raise TliError(
                f"--push-to-hub needs a Hub token with write access: set {hub.TOKEN_ENV}"
            )
    elif remote.is_remote(to):
        remote.parse(to)
        if remote.exists(to) and not force:
            raise TliError(f"{to} already holds objects: choose another prefix or pass --force")
    else:
        protect = [src.model_dir] + ([src.store.root] if src.store is not None else [])
        try:
            precheck(Path(to), force=force, protect=protect)
        except TliError as e:  # the same checks as every --out; here the flag is --to
            raise TliError(str(e).replace("--out", "--to")) from None


def write(src: Source, to: str, *, force: bool) -> dict[str, Any]:
    """Write the export to ``to`` (checked); what was written, with its content sha256."""
    from tli.output import staged

    if to.startswith(HUB_SCHEME):
        with _staging(src) as folder:
            url = hub.push_folder(folder, to[len(HUB_SCHEME) :],
                                  message=f"tli export of {src.name}")  # fmt: skip
            digest = remote.content_sha256(folder)
        return {"to": to, "url": url, "sha256": digest}
    if remote.is_remote(to):
        with _staging(src) as folder:
            digest = remote.upload(folder, to)
            n = len(os.listdir(folder))
        return {"to": to, "sha256": digest, "files": n}
    with staged(Path(to), force=force) as st:
        _fill(st.path, src, link=False)
    target = Path(to).absolute()
    return {"to": str(target), "sha256": remote.content_sha256(target),
            "files": len(os.listdir(target))}  # fmt: skip


def run_export(
    source: str,
    destinations: list[str],
    *,
    store: str | Path | None = None,
    force: bool = False,
    offline: bool = True,
) -> list[dict[str, Any]]:
    """Export ``source`` to each destination (a folder, ``s3://...``, ``hf://org/name``).

    Args:
        source: a model folder, or a store version (prefix or ``STAGE/VERSION``).
        destinations: where to (at least one); every one is checked before any is written.
        store: the stage store to look a version up in.
        force: replace an existing folder / prefix.
        offline: ``runtime.offline`` (a push to the Hub needs ``False``).

    Returns:
        One dict per destination: ``to``, ``sha256`` (content digest, as :mod:`tli.remote`
        computes it), and ``files`` or ``url``.
    """
    if not destinations:
        raise TliError("nothing to export to: give --to DIR|s3://... and/or --push-to-hub")
    src = resolve_source(source, store)
    for to in destinations:
        check_destination(src, to, force=force, offline=offline)
    return [write(src, to, force=force) for to in destinations]


def export_component(*, store: str, runtime: str, to: str, model: str, exported: Any) -> None:
    """What the pipeline's export step does: export the version ``model`` refers to.

    Args:
        store: the stage store.
        runtime: the pipeline's runtime parameter (JSON of :class:`tli.config.Runtime`).
        to: the destination (a folder, ``s3://...``, ``hf://org/name``).
        model: path of the upstream step's artifact (its JSON reference).
        exported: the step's output artifact: its file gets the result as JSON, its metadata
            the destination, the content sha256 and the version exported.
    """
    from tli.config import Runtime, validate

    ref = json.loads(Path(model).read_text())
    rt = validate(Runtime, json.loads(runtime or "{}"), "the pipeline's runtime parameter")
    # The pipeline's export_to is the run's intent: a rerun of the run replaces its export.
    (result,) = run_export(f"{ref['stage']}/{ref['version']}", [to], store=store, force=True,
                           offline=rt.offline)  # type: ignore[attr-defined]  # fmt: skip
    result = {**result, "stage": ref["stage"], "version": ref["version"]}
    exported.metadata.update(result)
    Path(exported.path).parent.mkdir(parents=True, exist_ok=True)
    Path(exported.path).write_text(json.dumps(result, indent=2) + "\n")
