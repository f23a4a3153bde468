"""Tensor names as data: one table per architecture family.

Every name that the surgery touches is written here once, with ``{}`` for the layer index.
Renumbering a layer is ``LAYER.format(new)`` + the suffix; no other module builds tensor names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tli.errors import TliError


@dataclass(frozen=True)
class ArchSpec:
    """What tli needs to know about a decoder-only family.

    Attributes:
        family: short name.
        layer: prefix of one decoder block's tensors, ``{}`` = layer index.
        residual_out: block-relative module names whose outputs are added to the residual
            stream; zeroing their weight (and bias) makes a pre-norm block the identity.
        per_layer_lists: config.json fields holding one entry per layer.
        layer_count_field: config.json field with the number of layers.
    """

    family: str
    layer: str = "model.layers.{}."
    residual_out: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    per_layer_lists: tuple[str, ...] = ("layer_types",)
    layer_count_field: str = "num_hidden_layers"

    def layer_re(self) -> re.Pattern[str]:
        """Matches a layer tensor name; group 1 = index, group 2 = block-relative suffix."""
        head, tail = self.layer.split("{}")
        return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + r"(.+)")

    def name(self, layer: int, suffix: str) -> str:
        """The full tensor name of ``suffix`` in layer ``layer``."""
        return self.layer.format(layer) + suffix

    def is_residual_out(self, suffix: str) -> bool:
        """True for the weight or bias of a residual-writing projection."""
        return any(suffix in (f"{m}.weight", f"{m}.bias") for m in self.residual_out)


_LLAMA = ArchSpec("llama")
# Per-layer config fields beyond layer_types that some families carry.
ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": ArchSpec("mistral"),
    "Qwen2ForCausalLM": ArchSpec("qwen2"),
    "Qwen3ForCausalLM": ArchSpec("qwen3"),
    # Gemma 2/3 add post-attention/post-MLP norms; RMSNorm(0) = 0, so zeroed projections still
    # make the block the identity.
    "Gemma2ForCausalLM": ArchSpec("gemma2"),
    "Gemma3ForCausalLM": ArchSpec("gemma3"),
    # Phi-3 fuses qkv and gate/up, but its residual writers keep the Llama names.
    "Phi3ForCausalLM": ArchSpec("phi3"),
    "SmolLM3ForCausalLM": ArchSpec("smollm3", per_layer_lists=("layer_types", "no_rope_layers")),
    # The MoE siblings that `tli inject --method moe` writes (tli.inject.moe), known so that
    # their folders open as decoders for training and evaluation. Their MLP output is a sum
    # over experts, with no single residual writer to zero: tli does not inject layers into
    # them (tli.inject.stage refuses), so only the attention's is listed.
    "MixtralForCausalLM": ArchSpec("mixtral", residual_out=("self_attn.o_proj",)),
    "Qwen2MoeForCausalLM": ArchSpec("qwen2_moe", residual_out=("self_attn.o_proj",)),
    "Qwen3MoeForCausalLM": ArchSpec("qwen3_moe", residual_out=("self_attn.o_proj",)),
}


def arch_for(config: dict, tensor_names: list[str]) -> ArchSpec:
    """The spec for a model, from its config.json dict and its tensor names.

    A known architecture gets its table. An unknown one is accepted when its tensors follow the
    ``model.layers.{i}`` layout with both residual-writing projections present (the generic
    Llama-like layout); otherwise this raises a one-line error naming what is missing.
    """
    archs = config.get("architectures") or []
    name = archs[0] if archs else config.get("model_type", "unknown")
    spec = ARCHS.get(name)
    if spec is not None:
        return spec
    generic = ArchSpec(f"generic:{name}")
    rx = generic.layer_re()
    suffixes = {m.group(2) for n in tensor_names if (m := rx.fullmatch(n))}
    if not suffixes:
        raise TliError(
            f"architecture {name} is not supported: its tensors have no 'model.layers.{{i}}.' "
            "blocks (tli injects into decoder-only models laid out like Llama)"
        )
    missing = [m for m in generic.residual_out if f"{m}.weight" not in suffixes]
    if missing:
        raise TliError(
            f"architecture {name} is not supported: its blocks lack {', '.join(missing)} "
            "(tli needs the attention and MLP output projections to build identity layers)"
        )
    return generic
