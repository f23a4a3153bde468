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
import re
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
        _check_readable(p)
        config = read_config(p)
        has_tok = any((p / f).is_file() for f in TOKENIZER_FILES)
        if tokenizer and not has_tok:
            raise TliError(
                f"{p} has no tokenizer (tokenizer.json or tokenizer.model): "
                "save the model together with its tokenizer"
            )
        if has_tok:
            _check_tokenizer_files(p)
        _check_no_remote_code(p, config)
        files = tuple(checkpoint_files(p))
        tensors = read_checkpoint(p)
        check_weights(p, config, tensors)
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
        raise TliError(f"{model_dir} has no config.json: it is not an HF model folder")
    try:
        cfg = json.loads(path.read_text())
    except OSError as e:
        raise TliError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise TliError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise TliError(f"{path} is not a JSON object")
    return cfg


def _check_readable(p: Path) -> None:
    """Every file of the folder can be read (a later copy or load would fail half-way)."""
    for f in sorted(p.iterdir()):
        if f.is_file() and not os.access(f, os.R_OK):
            raise TliError(f"cannot read {f}: permission denied: check its permissions")


def _check_no_remote_code(p: Path, config: dict[str, Any]) -> None:
    """Refuse a model that only its own shipped code can build: tli never runs it.

    A folder may carry modeling code (``auto_map`` in config.json, ``*.py`` files); for the
    families tli knows, transformers' built-in classes load it and the code is ignored. Any
    other architecture would need that code (``trust_remote_code``, which tli never sets).
    """
    archs = config.get("architectures") or [None]
    if config.get("auto_map") and archs[0] not in _MODEL_TYPES:
        raise TliError(
            f"{p} needs its own modeling code (auto_map: {archs[0] or config.get('model_type')})"
            ", and tli never runs code from a model folder: convert it to a supported "
            f"architecture ({', '.join(sorted(_MODEL_TYPES))})"
        )


def _check_tokenizer_files(p: Path) -> None:
    """The tokenizer's JSON files parse as JSON objects (transformers would trace back)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        f = p / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_bytes())
        except (ValueError, UnicodeDecodeError):
            raise TliError(f"{f} is not valid JSON: save the tokenizer again") from None
        if not isinstance(data, dict):
            raise TliError(f"{f} is not a JSON object: save the tokenizer again")


# ---------------------------------------------------------------------------- config vs weights

# architectures[0] -> model_type, for the families tli knows: a config.json naming one but
# typed as another is loaded by transformers as the model_type's class.
_MODEL_TYPES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text", "Phi3ForCausalLM": "phi3",
    "SmolLM3ForCausalLM": "smollm3", "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3MoeForCausalLM": "qwen3_moe",
}  # fmt: skip
# Block tensors a family always has (transformers would initialise them at random if missing).
_REQUIRED = {
    "qwen2": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "qwen3": ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
    "gemma2": ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"),
    "gemma3_text": ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"),
}
_LLAMA_BLOCK = (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
)  # fmt: skip
_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _allowed_block(config: dict[str, Any]) -> set[str] | None:
    """Every block tensor a Llama or Mistral config can load (None: not checked)."""
    if config.get("model_type") not in ("llama", "mistral"):
        return None
    allowed = set(_LLAMA_BLOCK)
    if config.get("attention_bias"):
        allowed |= {f"self_attn.{m}_proj.bias" for m in "qkvo"}
    if config.get("mlp_bias"):
        allowed |= {f"mlp.{m}_proj.bias" for m in ("gate", "up", "down")}
    return allowed


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes that config.json implies for the Llama-layout tensors (whole names and block
    suffixes); only those whose config fields are all present."""

    def num(key: str) -> int | None:
        v = config.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    hidden, vocab, inter = num("hidden_size"), num("vocab_size"), num("intermediate_size")
    heads = num("num_attention_heads")
    kv = num("num_key_value_heads") or heads
    hd = num("head_dim") or (hidden // heads if hidden and heads else None)
    out: dict[str, tuple[int, ...]] = {}
    if hidden:
        out |= {"model.norm.weight": (hidden,), "input_layernorm.weight": (hidden,),
                "post_attention_layernorm.weight": (hidden,)}  # fmt: skip
    if hidden and vocab:
        out |= {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    if hidden and heads and kv and hd:
        out |= {"self_attn.q_proj.weight": (heads * hd, hidden),
                "self_attn.k_proj.weight": (kv * hd, hidden),
                "self_attn.v_proj.weight": (kv * hd, hidden),
                "self_attn.o_proj.weight": (hidden, heads * hd)}  # fmt: skip
    if hidden and inter:
        out |= {"mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
                "mlp.down_proj.weight": (hidden, inter)}  # fmt: skip
    return out


def check_weights(p: Path, config: dict[str, Any], tensors: dict[str, TensorRef]) -> None:
    """Refuse a folder whose config.json does not describe its weights (headers only).

    transformers loads such a folder all the same, initialising what is missing at random and
    dropping what it does not expect: an evaluation of it measures another model. Checked: the
    model type against the architecture, the layer count, the tensors the family always has or
    never has, and the shapes config.json implies.
    """
    mtype, archs = config.get("model_type"), config.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else None
    if arch in _MODEL_TYPES and mtype and mtype != _MODEL_TYPES[arch]:
        raise TliError(
            f"{p}/config.json names {arch} but model_type {mtype!r} (transformers would load a "
            f"{mtype} model): fix the config or point at the right folder"
        )
    blocks: dict[int, set[str]] = {}
    for name in tensors:
        if m := _BLOCK.fullmatch(name):
            blocks.setdefault(int(m.group(1)), set()).add(m.group(2))
    n = config.get("num_hidden_layers")
    if blocks and isinstance(n, int) and sorted(blocks) != list(range(n)):
        raise TliError(
            f"{p}: config.json says {n} layers but the weights hold layers "
            f"{_span(sorted(blocks))}: the config does not belong to these weights"
        )
    suffixes = set().union(*blocks.values()) if blocks else set()
    missing = [t for t in _REQUIRED.get(str(mtype), ()) if blocks and t not in suffixes]
    allowed = _allowed_block(config)
    # Old Llama checkpoints saved rotary_emb.inv_freq: a buffer transformers recomputes.
    extra = sorted(x for x in suffixes - (allowed or suffixes) if not x.endswith("inv_freq"))
    if missing or extra:
        what = f"lack {missing[0]}" if missing else f"have {extra[0]}"
        raise TliError(
            f"{p}: the weights {what}, which a {mtype} model as config.json describes "
            f"{'always has' if missing else 'does not have'}: the config does not belong to "
            "these weights"
        )
    _check_shapes(p, _expected_shapes(config), tensors)


def _check_shapes(p: Path, want: dict[str, tuple[int, ...]], tensors: dict[str, TensorRef]) -> None:
    for name, ref in tensors.items():
        m = _BLOCK.fullmatch(name)
        key = m.group(2) if m else name
        shape = want.get(key)
        if shape is not None and ref.shape != shape:
            raise TliError(
                f"{p}: tensor {name} has shape {list(ref.shape)} but config.json implies "
                f"{list(shape)}: the config does not belong to these weights"
            )


def _span(xs: list[int]) -> str:
    return f"{xs[0]}..{xs[-1]}" if xs == list(range(xs[0], xs[-1] + 1)) else str(xs[:8])


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
    """Load an HF folder as AutoModelForCausalLM: safetensors only, never remote code.

    Raises:
        TliError: the folder cannot be loaded as it is, or transformers had to initialise or
            drop weights (its config and weights disagree): never an evaluation of a model
            that is not the one in the folder.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load is noise in our tables and logs
    model_dir = Path(model_dir)
    read_config(model_dir)
    checkpoint_files(model_dir)  # refuses pickle-only folders before transformers sees them
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would be a second, longer message
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype or torch.float32,
            trust_remote_code=False,
            use_safetensors=True,
            output_loading_info=True,
        )
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TliError(f"cannot load {model_dir} with transformers: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    for key, what in (("missing_keys", "lack"), ("mismatched_keys", "do not fit"),
                      ("unexpected_keys", "have unused")):  # fmt: skip
        bad = sorted(str(k) for k in info.get(key) or ())
        if bad:
            raise TliError(
                f"{model_dir}: the weights {what} {bad[0]} ({len(bad)} in all) for its "
                "config.json: the config does not belong to these weights"
            )
    return model
