"""MoE upcycling (sparse upcycling, arXiv 2212.05055) as a streaming surgery.

Every dense MLP of a decoder becomes E experts that start as copies of it, plus a router. The
output is the family's MoE sibling, loaded by ``AutoModelForCausalLM`` with no missing or
unexpected keys:

=================  ===================  ========================================
dense              MoE sibling          experts on disk (what save_pretrained writes)
=================  ===================  ========================================
Llama, Mistral     Mixtral              ``block_sparse_moe.experts.{e}.w1/w3/w2``
Qwen2              Qwen2-MoE            ``mlp.experts.{e}.gate/up/down_proj`` + shared expert
Qwen3              Qwen3-MoE            ``mlp.experts.{e}.gate/up/down_proj``
=================  ===================  ========================================

Layout. transformers 5 holds experts *fused* in memory (``mlp.experts.gate_up_proj``
[E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]) but its conversion mapping
(``transformers/conversion_mapping.py``: ``MergeModulelist`` + ``Concatenate``) builds them at
load time from per-expert tensors, and ``save_pretrained`` reverts to exactly those per-expert
names. We write the per-expert layout: it is what the hub checkpoints and transformers itself
hold (so transformers 4.x, vLLM and llama.cpp's converter read it too), and every expert is a
plain byte-range copy of the dense tensor: no compute, no memory, kernel copies. Routers are
small computed tensors (or holes, for a zero router).

Exactness. The routers of all three siblings take a softmax, keep the top k and (Mixtral
always; Qwen with ``norm_topk_prob: true``, which we set) renormalise the kept weights to sum
to 1. With identical experts the block is then sum_k w_k * f(x) = f(x) whatever the router
picks: the dense function, up to float rounding of that sum (fp32: ~1e-7 relative; bf16 can
differ by its rounding of the weights). It stops holding with ``noise > 0`` (Drop-Upcycling
re-initialises part of each expert, by design) and would not hold for Qwen with
``norm_topk_prob: false`` or with Mixtral's training-time ``router_jitter_noise`` (we write 0).

Planning (:func:`moe_family`, :func:`moe_config`, :func:`moe_param_counts`) is pure; execution
(:func:`moe_tensors`) returns :class:`~tli.inject.stio.OutTensor` producers for
:func:`~tli.inject.stio.write_checkpoint`, read lazily one tensor at a time.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from tli.errors import TliError
from tli.inject.arch import ArchSpec, arch_for
from tli.inject.stio import DTYPE_BYTES, OutTensor, TensorRef, tensor_bytes

ROUTER_INITS = ("zero", "random")
_ST_TO_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}

# ---------------------------------------------------------------------------- names as data

# The dense MLP, block-relative, by role; all four dense families use these names.
DENSE_MLP = {
    "gate": "mlp.gate_proj.weight",  # [I, H]
    "up": "mlp.up_proj.weight",  # [I, H]
    "down": "mlp.down_proj.weight",  # [H, I]
}
_ROWS_ARE_NEURONS = {"gate": True, "up": True, "down": False}  # down's neurons are its columns

# Block tensors other than the MLP that a sibling loads: copied byte for byte.
_ATTN = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
)
_QKV_BIAS = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
_QK_NORM = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")

# The in-memory (fused) names after transformers 5's conversion; the same in all three siblings.
_LOADED = {
    "gate_up": "mlp.experts.gate_up_proj",  # [E, 2I, H]: gate rows, then up rows
    "down": "mlp.experts.down_proj",  # [E, H, I]
    "router": "mlp.gate.weight",  # [E, H]
}


@dataclass(frozen=True)
class MoeFamily:
    """One MoE sibling: its config fields and its tensor names.

    Attributes:
        name: the sibling's ``model_type``.
        architecture: its causal-LM class (``architectures[0]`` of its config.json).
        sources: the dense architectures it upcycles.
        experts_field: config.json field with the number of experts.
        expert: role -> block-relative name of one expert's tensor, ``{}`` = expert index.
        router: block-relative name of the router weight [E, H].
        attention: block-relative names of the other tensors it loads (copied unchanged).
        shared: role -> name of the shared expert's tensor (empty: the family has none).
        shared_gate: name of the shared expert's sigmoid gate [1, H], if any.
        moe_intermediate_field: config field with the expert width, if the family has one.
    """

    name: str
    architecture: str
    sources: tuple[str, ...]
    experts_field: str
    expert: dict[str, str] = field(hash=False)
    router: str
    attention: tuple[str, ...]
    shared: dict[str, str] = field(default_factory=dict, hash=False)
    shared_gate: str | None = None
    moe_intermediate_field: str | None = None


MIXTRAL = MoeFamily(
    name="mixtral",
    architecture="MixtralForCausalLM",
    sources=("LlamaForCausalLM", "MistralForCausalLM"),
    experts_field="num_local_experts",
    expert={
        "gate": "block_sparse_moe.experts.{}.w1.weight",
        "up": "block_sparse_moe.experts.{}.w3.weight",
        "down": "block_sparse_moe.experts.{}.w2.weight",
    },
    router="block_sparse_moe.gate.weight",
    attention=_ATTN,
)
_QWEN_EXPERT = {
    "gate": "mlp.experts.{}.gate_proj.weight",
    "up": "mlp.experts.{}.up_proj.weight",
    "down": "mlp.experts.{}.down_proj.weight",
}
QWEN2_MOE = MoeFamily(
    name="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    sources=("Qwen2ForCausalLM",),
    experts_field="num_experts",
    expert=_QWEN_EXPERT,
    router="mlp.gate.weight",
    attention=_ATTN + _QKV_BIAS,
    shared={
        "gate": "mlp.shared_expert.gate_proj.weight",
        "up": "mlp.shared_expert.up_proj.weight",
        "down": "mlp.shared_expert.down_proj.weight",
    },
    shared_gate="mlp.shared_expert_gate.weight",
    moe_intermediate_field="moe_intermediate_size",
)
QWEN3_MOE = MoeFamily(
    name="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    sources=("Qwen3ForCausalLM",),
    experts_field="num_experts",
    expert=_QWEN_EXPERT,
    router="mlp.gate.weight",
    attention=_ATTN + _QKV_BIAS + ("self_attn.o_proj.bias",) + _QK_NORM,
    moe_intermediate_field="moe_intermediate_size",
)
FAMILIES = {f.name: f for f in (MIXTRAL, QWEN2_MOE, QWEN3_MOE)}
_BY_SOURCE = {src: f for f in FAMILIES.values() for src in f.sources}
_BY_MODEL_TYPE = {"llama": MIXTRAL, "mistral": MIXTRAL, "qwen2": QWEN2_MOE, "qwen3": QWEN3_MOE}


# ---------------------------------------------------------------------------- the knobs


@dataclass(frozen=True)
class MoeSpec:
    """How to upcycle: checked on construction, one-line :class:`TliError` per problem.

    Attributes:
        experts: experts per layer (>= 2).
        top_k: experts each token is routed to (1..experts).
        router_init: ``random`` (normal, std = the config's ``initializer_range``, seeded per
            layer; the paper's choice: tokens spread over the experts from step 0) or ``zero``
            (all logits tie, so every token picks the same k experts until the router learns).
        noise: Drop-Upcycling ratio r (arXiv 2502.19261): the share of each expert's
            intermediate neurons re-initialised (0 keeps the dense function exactly).
        seed: seeds the router and the noise; the same seed gives the same bytes.
        shared_expert_size: Qwen2-MoE only: width of the shared expert (None = the dense
            intermediate size, as in Qwen1.5-MoE, itself upcycled from a dense model).
        router_aux_loss_coef: weight of the load-balancing loss in the saved config (it only
            counts when training turns ``output_router_logits`` on).
    """

    experts: int
    top_k: int
    router_init: str = "random"
    noise: float = 0.0
    seed: int = 0
    shared_expert_size: int | None = None
    router_aux_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.experts) or self.experts < 2:
            raise TliError(f"moe: experts must be an integer >= 2, got {self.experts!r}")
        if not is_int(self.top_k) or not 1 <= self.top_k <= self.experts:
            raise TliError(f"moe: top_k must be in 1..{self.experts} (experts), got {self.top_k!r}")
        if self.router_init not in ROUTER_INITS:
            raise TliError(
                f"moe: router_init must be one of {', '.join(ROUTER_INITS)}, "
                f"got {self.router_init!r}"
            )
        if not isinstance(self.noise, (int, float)) or isinstance(self.noise, bool):
            raise TliError(f"moe: expert noise must be a number, got {self.noise!r}")
        if not math.isfinite(self.noise) or not 0.0 <= self.noise < 1.0:
            raise TliError(f"moe: expert noise must be in [0, 1), got {self.noise!r}")
        if not is_int(self.seed):
            raise TliError(f"moe: seed must be an integer, got {self.seed!r}")
        s = self.shared_expert_size
        if s is not None and (not is_int(s) or s < 1):
            raise TliError(f"moe: shared_expert_size must be an integer >= 1, got {s!r}")
        c = self.router_aux_loss_coef
        if not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise TliError(f"moe: router_aux_loss_coef must be finite and >= 0, got {c!r}")

    @property
    def function_preserving(self) -> bool:
        """Whether the upcycled model computes the dense function (up to float rounding)."""
        return self.noise == 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for provenance."""
        return asdict(self)


class ParamCounts(NamedTuple):
    """Parameters of the upcycled model: all of them, and those one token uses."""

    total: int
    active: int


# ---------------------------------------------------------------------------- planning (pure)


def moe_family(config: dict[str, Any]) -> MoeFamily:
    """The MoE sibling of a dense config.json dict.

    Raises:
        TliError: the architecture has no supported MoE sibling.
    """
    archs = config.get("architectures") or []
    if archs:
        fam = _BY_SOURCE.get(archs[0])
        name = archs[0]
    else:
        fam = _BY_MODEL_TYPE.get(str(config.get("model_type")))
        name = str(config.get("model_type", "unknown"))
    if fam is None:
        supported = ", ".join(f"{s} -> {f.architecture}" for s, f in _BY_SOURCE.items())
        raise TliError(f"moe upcycling does not support {name}; supported: {supported}")
    return fam


def _int_field(config: dict[str, Any], key: str) -> int:
    v = config.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise TliError(f"config.json has no valid {key}: got {v!r}")
    return v


def _dense_layer_types(config: dict[str, Any], n: int) -> list[str]:
    """Qwen2/Qwen3 layer types: config.json's list, or what their config class derives.

    Qwen2-MoE derives a *different* default pattern (every other layer below
    max_window_layers), so the dense one is always written out explicitly.
    """
    lt = config.get("layer_types")
    if isinstance(lt, list):
        if len(lt) != n:
            raise TliError(f"config.json field layer_types has {len(lt)} entries for {n} layers")
        return [str(t) for t in lt]
    sliding = bool(config.get("use_sliding_window")) and config.get("sliding_window") is not None
    mwl = config.get("max_window_layers", 28)
    return ["sliding_attention" if sliding and i >= mwl else "full_attention" for i in range(n)]


def _check_dense(config: dict[str, Any], fam: MoeFamily, spec: MoeSpec) -> None:
    """What the sibling cannot express, refused up front."""
    arch = (config.get("architectures") or [config.get("model_type")])[0]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers"):
        _int_field(config, key)
    if fam is MIXTRAL:
        for key in ("attention_bias", "mlp_bias"):
            if config.get(key):
                raise TliError(f"moe: {arch} with {key}=true has no Mixtral sibling (no biases)")
    if fam is QWEN3_MOE:
        kinds = set(_dense_layer_types(config, config["num_hidden_layers"]))
        if len(kinds) > 1:
            raise TliError(
                f"moe: {arch} mixes sliding and full attention layers; Qwen3-MoE applies one "
                "sliding window to all layers or none"
            )
    if spec.shared_expert_size is not None:
        if not fam.shared:
            raise TliError(f"moe: shared_expert_size is for Qwen2-MoE; {fam.architecture} has none")
        if spec.shared_expert_size > config["intermediate_size"]:
            raise TliError(
                f"moe: shared_expert_size {spec.shared_expert_size} exceeds the dense "
                f"intermediate_size {config['intermediate_size']}"
            )


def _shared_size(config: dict[str, Any], spec: MoeSpec) -> int:
    return spec.shared_expert_size or config["intermediate_size"]


def moe_config(config: dict[str, Any], spec: MoeSpec) -> dict[str, Any]:
    """The sibling's config.json from the dense one.

    Everything the dense model has (sizes, heads, head_dim, rope, norms, vocab, special tokens,
    tie_word_embeddings, dtype, ...) is carried over; dense-only fields are dropped; the MoE
    fields are set. Experts are as wide as the dense MLP (``intermediate_size`` for Mixtral,
    ``moe_intermediate_size`` for Qwen).
    """
    fam = moe_family(config)
    _check_dense(config, fam, spec)
    n = config["num_hidden_layers"]
    inter = config["intermediate_size"]
    out = dict(config)
    out["architectures"] = [fam.architecture]
    out["model_type"] = fam.name
    out[fam.experts_field] = spec.experts
    out["num_experts_per_tok"] = spec.top_k
    out["output_router_logits"] = False  # training turns the load-balancing loss on
    out["router_aux_loss_coef"] = spec.router_aux_loss_coef
    if fam is MIXTRAL:
        # Mixtral has no per-layer attention types (Mistral itself ignores layer_types) and no
        # biases (checked above); its router always renormalises the top-k weights.
        for key in ("attention_bias", "mlp_bias", "pretraining_tp", "layer_types",
                    "max_window_layers", "use_sliding_window"):  # fmt: skip
            out.pop(key, None)
        out.setdefault("sliding_window", None)  # Llama has none; Mistral's is kept
        out["router_jitter_noise"] = 0.0  # multiplicative input noise would break exactness
    else:
        out[fam.moe_intermediate_field] = inter
        out["norm_topk_prob"] = True  # renormalised top-k: identical experts sum to f(x)
        out["decoder_sparse_step"] = 1  # every layer sparse ...
        out["mlp_only_layers"] = []  # ... none left dense
        types = _dense_layer_types(config, n)
        if fam is QWEN2_MOE:
            out["layer_types"] = types
            out["qkv_bias"] = True  # Qwen2 always has q/k/v biases
            out["shared_expert_intermediate_size"] = _shared_size(config, spec)
        else:  # Qwen3-MoE: one window for all layers, or none (checked above)
            out.pop("layer_types", None)
            out.pop("max_window_layers", None)
            out["use_sliding_window"] = types[0] == "sliding_attention"
    return out


def moe_param_counts(config: dict[str, Any], spec: MoeSpec) -> ParamCounts:
    """Total and per-token active parameters of the upcycled model, from the dense config.

    Active = total minus the (experts - top_k) experts a token does not use; embeddings, the
    router and (Qwen2-MoE) the shared expert are active. Tied embeddings count once.
    """
    fam = moe_family(config)
    _check_dense(config, fam, spec)
    h, inter, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    vocab = _int_field(config, "vocab_size")
    heads = _int_field(config, "num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    q, k = heads * hd, kv * hd
    attn = h * q + 2 * h * k + q * h  # q, k, v, o
    norms = 2 * h
    if fam is QWEN2_MOE:
        attn += q + 2 * k  # q/k/v biases
    if fam is QWEN3_MOE:
        norms += 2 * hd  # q_norm, k_norm
        if config.get("attention_bias"):
            attn += q + 2 * k + h
    expert = 3 * h * inter  # gate, up, down
    per_layer = attn + norms + spec.experts * expert + spec.experts * h  # + router [E, H]
    if fam.shared:
        per_layer += 3 * h * _shared_size(config, spec) + h  # shared expert + its gate [1, H]
    head = 0 if config.get("tie_word_embeddings", False) else vocab * h
    total = vocab * h + head + h + n * per_layer  # embeddings, lm_head, final norm, layers
    return ParamCounts(total, total - n * (spec.experts - spec.top_k) * expert)


# ---------------------------------------------------------------------------- tensors


def _seeded(seed: int, *key: object):
    """A torch.Generator seeded from (seed, key): independent streams, order-independent."""
    import torch

    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _torch_dtype(st_dtype: str, name: str):
    import torch

    dt = _ST_TO_TORCH.get(st_dtype)
    if dt is None:
        raise TliError(f"tensor {name} has dtype {st_dtype}; moe can only compute float tensors")
    return getattr(torch, dt)


def _load(ref: TensorRef):
    """One tensor from its byte range (no pickle, no mmap of the whole file)."""
    import torch

    dtype = _torch_dtype(ref.dtype, ref.name)
    fd = os.open(ref.file, os.O_RDONLY)
    try:
        buf = bytearray(os.pread(fd, ref.nbytes, ref.start))
    finally:
        os.close(fd)
    return torch.frombuffer(buf, dtype=dtype).reshape(ref.shape)


def router_weight(layer: int, spec: MoeSpec, hidden: int, std: float, dtype):
    """The router of one layer: [E, H], zeros or seeded normal(0, std)."""
    import torch

    if spec.router_init == "zero":
        return torch.zeros(spec.experts, hidden, dtype=dtype)
    g = _seeded(spec.seed, "router", layer)
    return (torch.randn(spec.experts, hidden, generator=g) * std).to(dtype)  # [E, H]


def expert_weight(dense, role: str, layer: int, expert: int, spec: MoeSpec):
    """One expert's tensor from the dense one: a copy, or Drop-Upcycled when ``noise > 0``.

    Drop-Upcycling re-initialises the same ceil(r * I) intermediate neurons of an expert in
    all three projections (rows of gate/up, columns of down), drawn from a normal with the
    dense matrix's own mean and std, so the new neurons start at the scale of the old ones.
    The neurons are seeded per (layer, expert), the values per (layer, expert, role): every
    tensor can be computed alone, in any order, with the same bytes.

    Args:
        dense: the dense tensor, [I, H] for gate/up, [H, I] for down.
    """
    import torch

    if spec.noise == 0.0:
        return dense
    rows = _ROWS_ARE_NEURONS[role]
    inter = dense.shape[0] if rows else dense.shape[1]
    picked = torch.randperm(inter, generator=_seeded(spec.seed, "neurons", layer, expert))
    picked = picked[: math.ceil(spec.noise * inter)]  # [k]
    # On the CPU, in fp32, whatever the model's device: the same bytes as the streaming path.
    w = dense.detach().to("cpu", torch.float32, copy=True)  # [I, H] or [H, I]
    mean, std = w.mean().item(), w.std().item()
    g = _seeded(spec.seed, "values", layer, expert, role)
    if rows:
        w[picked, :] = torch.randn(len(picked), w.shape[1], generator=g) * std + mean  # [k, H]
    else:
        w[:, picked] = torch.randn(w.shape[0], len(picked), generator=g) * std + mean  # [H, k]
    return w.to(dense.device, dense.dtype)


def _layer_tensors(
    names: list[str], config: dict[str, Any]
) -> tuple[list[str], dict[int, dict[str, str]]]:
    """(non-layer names, {layer: {block-relative suffix: full name}}), checked against config."""
    spec = arch_for(config, names)
    rx = spec.layer_re()
    head: list[str] = []
    by_layer: dict[int, dict[str, str]] = {}
    for name in sorted(names):
        m = rx.fullmatch(name)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = name
        else:
            head.append(name)
    n = config["num_hidden_layers"]
    if sorted(by_layer) != list(range(n)):
        raise TliError(
            f"the checkpoint has layers {sorted(by_layer)[:3]}...{len(by_layer)} in all, "
            f"but config.json says {n}"
        )
    return head, by_layer


def _check_block(layer: int, suffixes: dict[str, str], fam: MoeFamily) -> None:
    missing = [s for s in DENSE_MLP.values() if s not in suffixes]
    if missing:
        raise TliError(f"layer {layer} has no {missing[0]}: not a gate/up/down MLP")
    extra = sorted(s for s in suffixes if s not in DENSE_MLP.values() and s not in fam.attention)
    if extra:
        raise TliError(
            f"layer {layer} tensor {extra[0]} has no place in {fam.architecture}: "
            "cannot upcycle this model"
        )


def moe_tensors(
    refs: dict[str, TensorRef], config: dict[str, Any], spec: MoeSpec
) -> list[OutTensor]:
    """Every output tensor of the upcycled model and how its bytes are made.

    Nothing is read here: non-MLP tensors and (noise 0) experts are byte-range copies of the
    dense tensors, a zero router and the zeroed shared-expert projections are holes, and only a
    random router or a noised expert is computed, one tensor at a time, when written.

    Qwen2-MoE always adds a shared expert (size 0 is not allowed) behind a sigmoid gate. Its
    output cannot be made exactly 0 by the gate (sigmoid > 0), so its down projection is zero:
    the shared path adds exactly 0. Its gate/up are the first ``shared_expert_size`` neurons of
    the dense MLP (contiguous rows: plain copies), so training starts from known features once
    the down projection moves; its sigmoid gate starts at zero logits (0.5).

    Args:
        refs: the dense checkpoint, from :func:`tli.inject.stio.read_checkpoint`.
        config: the dense config.json dict.
        spec: how to upcycle.
    """
    fam = moe_family(config)
    _check_dense(config, fam, spec)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    std = float(config.get("initializer_range", 0.02))
    head, by_layer = _layer_tensors(list(refs), config)
    layer_prefix = arch_for(config, list(refs))

    def copy(name: str, r: TensorRef, home: TensorRef) -> OutTensor:
        return OutTensor(name, r.dtype, r.shape, r.nbytes, "copy", src=r, home=home.file)

    out = [copy(n, refs[n], refs[n]) for n in head]
    for layer in sorted(by_layer):
        names = by_layer[layer]
        _check_block(layer, names, fam)
        dense = {role: refs[names[sfx]] for role, sfx in DENSE_MLP.items()}
        want = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        for role, r in dense.items():
            if r.shape != want[role]:
                raise TliError(
                    f"{r.name} has shape {list(r.shape)}, config says {list(want[role])}"
                )
        home = dense["down"]
        dtype = home.dtype
        for sfx in sorted(names):
            if sfx not in DENSE_MLP.values():
                out.append(copy(names[sfx], refs[names[sfx]], home))
        for e in range(spec.experts):
            for role, r in dense.items():
                name = layer_prefix.name(layer, fam.expert[role].format(e))
                if spec.noise == 0.0:
                    out.append(copy(name, r, home))
                else:
                    _torch_dtype(r.dtype, r.name)  # refuse a non-float dtype now, not mid-write
                    fn = _noised_producer(r, role, layer, e, spec)
                    out.append(OutTensor(name, r.dtype, r.shape, r.nbytes, "compute",
                                         compute=fn, home=home.file))  # fmt: skip
        out.append(_router_tensor(layer_prefix.name(layer, fam.router), layer, spec, hidden,
                                  std, dtype, home))  # fmt: skip
        if fam.shared:
            out += _shared_tensors(fam, layer, layer_prefix, dense, _shared_size(config, spec))
    return out


def _noised_producer(r: TensorRef, role: str, layer: int, expert: int, spec: MoeSpec):
    def compute() -> memoryview:
        return tensor_bytes(expert_weight(_load(r), role, layer, expert, spec))

    return compute


def _router_tensor(
    name: str, layer: int, spec: MoeSpec, hidden: int, std: float, dtype: str, home: TensorRef
) -> OutTensor:
    shape = (spec.experts, hidden)
    nbytes = spec.experts * hidden * _width(dtype)
    if spec.router_init == "zero":
        return OutTensor(name, dtype, shape, nbytes, "zeros", home=home.file)
    tdtype = _torch_dtype(dtype, name)

    def compute() -> memoryview:
        return tensor_bytes(router_weight(layer, spec, hidden, std, tdtype))

    return OutTensor(name, dtype, shape, nbytes, "compute", compute=compute, home=home.file)


def _width(dtype: str) -> int:
    return DTYPE_BYTES[dtype]


def _shared_tensors(
    fam: MoeFamily, layer: int, prefix: ArchSpec, dense: dict[str, TensorRef], size: int
) -> list[OutTensor]:
    """Qwen2-MoE's shared expert: the first ``size`` dense neurons, down zero, gate zero."""
    out = []
    for role in ("gate", "up"):
        r = dense[role]  # [I, H], row-major: its first `size` rows are one contiguous range
        row = r.nbytes // r.shape[0]
        sub = TensorRef(r.name, r.file, r.dtype, (size, r.shape[1]), r.start, r.start + size * row)
        out.append(OutTensor(prefix.name(layer, fam.shared[role]), r.dtype, sub.shape,
                             sub.nbytes, "copy", src=sub, home=dense["down"].file))  # fmt: skip
    d = dense["down"]  # [H, I] -> [H, size], all zeros: a hole
    nbytes = d.shape[0] * size * _width(d.dtype)
    out.append(OutTensor(prefix.name(layer, fam.shared["down"]), d.dtype, (d.shape[0], size),
                         nbytes, "zeros", home=d.file))  # fmt: skip
    assert fam.shared_gate is not None
    out.append(OutTensor(prefix.name(layer, fam.shared_gate), d.dtype, (1, d.shape[0]),
                         d.shape[0] * _width(d.dtype), "zeros", home=d.file))  # fmt: skip
    return out


# ---------------------------------------------------------------------------- in memory


def moe_in_memory(model: Any, spec: MoeSpec) -> Any:
    """The upcycled sibling of a loaded dense HF causal LM, built in memory (Tune trials).

    The dense model is left as it is. Tensors come from the same :func:`expert_weight` and
    :func:`router_weight` as the streaming path, so for a seed both give the same weights. The
    sibling is built empty (no random init) on the dense model's device, in its dtype, training
    mode and attention implementation, then filled in place tensor by tensor: peak memory is
    the two models plus one dense tensor, never a second copy of the sibling.
    """
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    dense_cfg = model.config.to_dict()
    fam = moe_family(dense_cfg)
    cfg_dict = moe_config(dense_cfg, spec)
    cfg_dict.pop("model_type")
    cfg = transformers.AutoConfig.for_model(fam.name, **cfg_dict)
    sd = model.state_dict()
    head, by_layer = _layer_tensors(list(sd), dense_cfg)
    for layer, names in by_layer.items():
        _check_block(layer, names, fam)
    prefix = arch_for(dense_cfg, list(sd))
    some = sd[by_layer[0][DENSE_MLP["down"]]]
    attn = getattr(model.config, "_attn_implementation", None)
    with no_init_weights(), torch.device(some.device):
        moe = getattr(transformers, fam.architecture)._from_config(
            cfg, dtype=some.dtype, **({"attn_implementation": attn} if attn else {})
        )
    target = moe.state_dict(keep_vars=True)  # name -> the sibling's own parameter
    filled: set[str] = set()

    def put(name: str, value: Any) -> Any:
        assert name in target, f"{fam.architecture} has no tensor {name}"
        filled.add(name)
        return target[name].copy_(value)  # copy_ converts device and dtype

    with torch.no_grad():
        for n in head:
            put(n, sd[n])
        for layer in sorted(by_layer):
            _fill_layer(layer, by_layer[layer], sd, target, put, filled, fam, prefix, spec,
                        dense_cfg, some.dtype)  # fmt: skip
    unfilled = sorted(set(target) - filled)
    assert not unfilled, f"{fam.architecture} tensors left uninitialised: {unfilled[:3]}"
    if cfg.tie_word_embeddings:
        moe.tie_weights()
    moe.train(model.training)
    return moe


def _fill_layer(layer: int, names: dict[str, str], sd: dict[str, Any], target: dict[str, Any],
                put: Any, filled: set[str], fam: MoeFamily, prefix: Any, spec: MoeSpec,
                dense_cfg: dict[str, Any], dtype: Any) -> None:  # fmt: skip
    """One decoder block of the in-memory sibling: attention as is, experts, router, shared."""
    for sfx, n in names.items():
        if sfx not in DENSE_MLP.values():
            put(n, sd[n])
    dense = {role: sd[names[sfx]] for role, sfx in DENSE_MLP.items()}
    inter = dense["gate"].shape[0]
    gate_up = target[prefix.name(layer, _LOADED["gate_up"])]  # [E, 2I, H]
    down = target[prefix.name(layer, _LOADED["down"])]  # [E, H, I]
    for e in range(spec.experts):
        gate_up[e, :inter].copy_(expert_weight(dense["gate"], "gate", layer, e, spec))
        gate_up[e, inter:].copy_(expert_weight(dense["up"], "up", layer, e, spec))
        down[e].copy_(expert_weight(dense["down"], "down", layer, e, spec))
    filled.update(prefix.name(layer, _LOADED[k]) for k in ("gate_up", "down"))
    hidden = dense_cfg["hidden_size"]
    std = float(dense_cfg.get("initializer_range", 0.02))
    router = router_weight(layer, spec, hidden, std, dtype)  # [E, H], on the CPU
    put(prefix.name(layer, _LOADED["router"]), router)
    if fam.shared:
        size = _shared_size(dense_cfg, spec)
        put(prefix.name(layer, fam.shared["gate"]), dense["gate"][:size])  # [S, H]
        put(prefix.name(layer, fam.shared["up"]), dense["up"][:size])  # [S, H]
        put(prefix.name(layer, fam.shared["down"]), 0.0)  # [H, S] = 0: the path adds 0
        assert fam.shared_gate is not None
        put(prefix.name(layer, fam.shared_gate), 0.0)  # [1, H]


__all__ = [
    "FAMILIES",
    "MoeFamily",
    "MoeSpec",
    "ParamCounts",
    "expert_weight",
    "moe_config",
    "moe_family",
    "moe_in_memory",
    "moe_param_counts",
    "moe_tensors",
    "router_weight",
]
