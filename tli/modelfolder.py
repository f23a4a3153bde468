"""A validated model folder: the one check every command makes before it touches a model.

:meth:`ModelFolder.open` reads only small things (config.json, the safetensors headers, the
plan of an injected model, which tokenizer files are there), never a tensor, and refuses a bad
folder with one line that says what is wrong and what to do, before any heavy import, Hub
lookup or write. The value it returns is what the stages work from; :func:`load_causal_lm`
loads one for training or evaluation (safetensors only, never remote code).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tli.errors import TliError
from tli.inject.arch import ArchSpec, arch_for
from tli.inject.plan import Plan, read_plan
from tli.inject.stio import TensorRef, checkpoint_files, read_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelFolder:
    """An HF model folder whose config, weights and (optionally) tokenizer were checked."""

    path: Path
    config: dict[str, Any]
    files: tuple[Path, ...]  # safetensors shards
    tensors: dict[str, TensorRef]
    arch: ArchSpec | None  # None when the decoder layout was not asked for
    plan: Plan | None  # tli_plan.json of an injected model
    has_tokenizer: bool

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def num_layers(self) -> int:
        """The decoder layer count from config.json (checked against the tensors)."""
        field = self.arch.layer_count_field if self.arch else "num_hidden_layers"
        return int(self.config.get(field) or 0)

    @property
    def parameters(self) -> int:
        """Parameter count from the headers (a tied tensor is stored, and counted, once)."""
        return sum(r.numel for r in self.tensors.values())

    @property
    def context(self) -> int | None:
        """The model's context length, when config.json says."""
        ctx = self.config.get("max_position_embeddings")
        return ctx if isinstance(ctx, int) else None

    @classmethod
    def open(
        cls, path: str | Path, *, tokenizer: bool = False, decoder: bool = True
    ) -> ModelFolder:
        """Check ``path`` and return its :class:`ModelFolder`.

        Args:
            path: the HF folder.
            tokenizer: the folder must hold a tokenizer (tokenizer.json or tokenizer.model).
            decoder: the folder must be a decoder laid out as tli's surgery knows (its layers
                found in the tensors, as many as config.json says).

        Raises:
            TliError: one line naming what is wrong with the folder and what to do.
        """
        p = Path(path)
        if not p.exists():
            raise TliError(f"model dir {p} does not exist")
        if not p.is_dir():
            raise TliError(f"model dir {p} is not a folder")
        if not os.access(p, os.R_OK | os.X_OK):
            raise TliError(f"model dir {p} is not readable: check its permissions")
        config = read_config(p)
        has_tok = any((p / f).is_file() for f in TOKENIZER_FILES)
        if tokenizer and not has_tok:
            raise TliError(
                f"{p} has no tokenizer (tokenizer.json or tokenizer.model): "
                "save the model together with its tokenizer"
            )
        files = tuple(checkpoint_files(p))
        tensors = read_checkpoint(p)
        arch = arch_for(config, list(tensors)) if decoder else None
        if arch is not None:
            _check_layers(p, config, tensors, arch)
        plan = read_plan(p)
        if plan is not None and arch is not None:
            _check_plan(p, plan, int(config[arch.layer_count_field]))
        return cls(p, config, files, tensors, arch, plan, has_tok)


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of an HF folder, with one-line errors for every way it can be wrong."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise TliError(f"{model_dir} has no config.json: point --model at an HF model folder")
    try:
        cfg = json.loads(path.read_text())
    except OSError as e:
        raise TliError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise TliError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise TliError(f"{path} is not a JSON object")
    return cfg


def _check_layers(
    p: Path, config: dict[str, Any], tensors: dict[str, TensorRef], arch: ArchSpec
) -> None:
    n = config.get(arch.layer_count_field)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise TliError(f"config.json has no valid {arch.layer_count_field}: got {n!r}")
    rx = arch.layer_re()
    found = sorted({int(m.group(1)) for name in tensors if (m := rx.fullmatch(name))})
    if found != list(range(n)):
        raise TliError(
            f"the checkpoint has layers {found[:3]}...{len(found)} in all, but config.json says {n}"
        )


def _check_plan(p: Path, plan: Plan, n: int) -> None:
    if plan.num_layers_out != n or (plan.new_layers and max(plan.new_layers) >= n):
        raise TliError(
            f"{p}/tli_plan.json is for {plan.num_layers_out} layers but config.json has {n}: "
            "the folder's plan does not match its model"
        )


def load_causal_lm(model_dir: str | Path, dtype: Any = None) -> Any:
    """Load an HF folder as AutoModelForCausalLM: safetensors only, never remote code."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

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
