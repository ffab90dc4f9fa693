"""The normalised description of a checkpoint: one `ModelSpec` whatever the architecture family.

Every family adapter (`moetool/arch/`) turns a config.json into a `ModelSpec`. The rest of moetool
reads only this: the layer schedule (which layers are MoE, which attention kind, which window),
the MoE block (E routed experts, top-k, expert FFN size, shared experts, router options) and the
parameter inventory: every parameter tensor that transformers builds, as a `Param` with a
canonical name, a group and a layer. Counting is then a sum over the inventory.

Shape legend used in comments: V vocab, D hidden, E routed experts, F expert FFN size,
H heads, Hkv key/value heads, Dh head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .errors import BadConfig

# Parameter groups. `total_params` is the sum of all but "mtp" (transformers does not build MTP
# layers); the breakdown reports every group, so the groups sum to total_params + mtp_params.
GROUPS = (
    "embedding", "attention", "ssm", "router", "routed_experts", "shared_experts",
    "dense_mlp", "norms", "lm_head", "vision", "audio", "mtp",
)
Group = Literal[
    "embedding", "attention", "ssm", "router", "routed_experts", "shared_experts",
    "dense_mlp", "norms", "lm_head", "vision", "audio", "mtp",
]
Mixer = Literal["attention", "mla", "linear_attention", "mamba", "encoder_attention", "decoder_attention",
                "mamba2", "gated_deltanet", "short_conv", "lightning_attention", "kda",
                "none"]  # "none": a block with only an FFN (Nemotron-H's MoE and MLP layers)
Scoring = Literal["softmax", "sigmoid", "sparsemixer"]


@dataclass(frozen=True)
class Param:
    """One parameter tensor as transformers builds it.

    `shape` is one copy: for routed experts, one expert's [out, in] matrix with `copies` = E.
    `matmul` marks linear-layer weights (quantizable, and 2 FLOPs per element per token).
    """

    name: str
    group: Group
    shape: tuple[int, ...]
    layer: Optional[int] = None
    copies: int = 1
    matmul: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.copies


@dataclass(frozen=True)
class RouterSpec:
    """How a MoE layer turns router logits into top-k experts and gate weights (see docs/count.md).

    scoring: softmax or sigmoid over the router logits.
    order: "score_then_topk" (softmax over all E, then top-k) or "topk_then_score" (top-k of the
    logits, then softmax over those k: gpt-oss; sigmoid of the chosen logit: Llama 4).
    """

    scoring: Scoring = "softmax"
    order: Literal["score_then_topk", "topk_then_score"] = "score_then_topk"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"  # greedy | group_limited_greedy | noaux_tc
    n_group: int = 1
    topk_group: int = 1
    correction_bias: bool = False  # e_score_correction_bias added for selection only
    bias: bool = False  # the router linear layer has a bias (gpt-oss)
    jitter_noise: float = 0.0
    norm_p: float = 1.0  # norm_topk_prob divides by this p-norm of the top-k weights (DBRX; else 1: their sum)
    norm_eps: float = 1e-20  # added to the sum when renormalising the top-k weights (LFM2-MoE: 1e-6)


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    expert_ffn: int
    num_shared_experts: int = 0
    shared_ffn: int = 0  # total intermediate size of the shared path (all shared experts together)
    router: RouterSpec = field(default_factory=RouterSpec)
    activation: str = "silu"
    zero_experts: int = 0  # LongCat-Flash: identity experts the router may pick beside the E routed ones

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise BadConfig(f"number of routed experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise BadConfig(f"top-k must be between 1 and the number of experts ({self.num_experts}), got {self.top_k}")


@dataclass(frozen=True)
class LayerSpec:
    """One decoder (or encoder) layer: its token mixer and whether its FFN is MoE.

    kv_per_token: elements cached per token (K and V together; MLA: the compressed latent).
    window: tokens of KV this layer keeps (sliding window / chunk); None keeps all.
    state_elems: fixed per-sequence state (Mamba, linear attention), independent of context.
    attn_flops_per_ctx: FLOPs per generated token per cached position (QK^T and AV; MLA: over the
    decompressed per-head K and V, as transformers computes it).
    MLA has two consistent conventions; the `*_per_head` / `*_latent` fields give the other one:
    kv_per_token_per_head: K and V decompressed per head (a cache of per-head K and V), H*(qk + v);
    attn_flops_per_ctx_latent: the weight-absorbed form that attends over the latent cache,
    2*H*(kv_lora_rank + rope) for QK^T plus 2*H*kv_lora_rank for AV.
    For every other mixer they equal kv_per_token and attn_flops_per_ctx (left None here).
    """

    index: int
    mixer: Mixer
    moe: bool
    kv_per_token: int = 0
    window: Optional[int] = None
    state_elems: int = 0
    attn_flops_per_ctx: int = 0
    kv_per_token_per_head: Optional[int] = None
    attn_flops_per_ctx_latent: Optional[int] = None


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    family: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    layers: tuple[LayerSpec, ...]
    params: tuple[Param, ...]
    moe: Optional[MoESpec]
    tie_word_embeddings: bool
    mtp_layers: int = 0
    encoder_layers: int = 0  # encoder-decoder models: decoder layer i is layer encoder_layers + i
    max_position_embeddings: Optional[int] = None
    torch_dtype: Optional[str] = None
    quantization: Optional[dict] = None
    notes: tuple[str, ...] = ()
    # Stored names (suffixes) that names.py takes for buffers but this family builds as parameters
    # (AFMoE's `expert_bias`, Laguna's `e_score_correction_bias`): counted in the router group.
    param_buffers: tuple[str, ...] = ()
    # Routed-expert parameters per MoE layer that text tokens never run (ERNIE-4.5-VL's vision
    # experts beside its text experts): in the total and the routed_experts group, not active.
    modality_experts: int = 0

    @property
    def moe_layers(self) -> list[int]:
        return [l.index for l in self.layers if l.moe]

    def expert_params(self) -> int:
        """Parameters of one routed expert (all projections, biases included)."""
        per_layer: dict[int, int] = {}
        for p in self.params:
            if p.group == "routed_experts":
                per_layer[p.layer] = per_layer.get(p.layer, 0) + math.prod(p.shape)
        one_other = self.modality_experts // self.moe.num_experts if self.moe else 0  # one vision expert (ERNIE-4.5-VL)
        return max(per_layer.values(), default=0) - one_other


class Cfg:
    """Typed, checked access to a config.json dict. Errors name the field and say what was found.

    Example:
        >>> Cfg({"hidden_size": 4096}).int("hidden_size")
        4096
    """

    _MISSING = object()
    # Fields that drive loops: refuse absurd values instead of looping for hours.
    LIMITS = {"num_hidden_layers": 10_000, "n_layers": 10_000, "num_layers": 10_000, "num_decoder_layers": 10_000,
              "num_local_experts": 1 << 20, "num_experts": 1 << 20, "n_routed_experts": 1 << 20,
              "moe_num_experts": 1 << 20, "num_nextn_predict_layers": 100, "num_mtp_layers": 100}

    def __init__(self, d: dict, where: str = "config.json"):
        if not isinstance(d, dict):
            raise BadConfig(f"{where}: expected a JSON object, got {type(d).__name__}")
        self.d = d
        self.where = where

    def has(self, key: str) -> bool:
        return self.d.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        v = self.d.get(key)
        return default if v is None else v

    def int(self, key: str, default: Any = _MISSING, *, min_value: int = 0) -> int:
        v = self.d.get(key)
        if v is None:
            if default is Cfg._MISSING:
                raise BadConfig(f"{self.where}: missing required field {key!r}")
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            raise BadConfig(f"{self.where}: field {key!r} must be an integer, got {v!r}")
        v = int(v)
        if v < min_value:
            raise BadConfig(f"{self.where}: field {key!r} must be >= {min_value}, got {v}")
        if v > self.LIMITS.get(key, 1 << 40):
            raise BadConfig(f"{self.where}: field {key!r} is implausibly large ({v})")
        return v

    def first_int(self, keys: list[str], default: Any = _MISSING, *, min_value: int = 0) -> int:
        for k in keys:
            if self.d.get(k) is not None:
                return self.int(k, min_value=min_value)
        if default is Cfg._MISSING:
            raise BadConfig(f"{self.where}: missing required field (one of {', '.join(map(repr, keys))})")
        return default

    def float(self, key: str, default: Any = _MISSING) -> float:
        v = self.d.get(key)
        if v is None:
            if default is Cfg._MISSING:
                raise BadConfig(f"{self.where}: missing required field {key!r}")
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise BadConfig(f"{self.where}: field {key!r} must be a finite number, got {v!r}")
        return float(v)

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        v = self.d.get(key)
        if v is None:
            if default is Cfg._MISSING:
                raise BadConfig(f"{self.where}: missing required field {key!r}")
            return default
        if not isinstance(v, bool):
            raise BadConfig(f"{self.where}: field {key!r} must be true or false, got {v!r}")
        return v

    def str(self, key: str, default: Any = _MISSING) -> str:
        v = self.d.get(key)
        if v is None:
            if default is Cfg._MISSING:
                raise BadConfig(f"{self.where}: missing required field {key!r}")
            return default
        if not isinstance(v, str):
            raise BadConfig(f"{self.where}: field {key!r} must be a string, got {v!r}")
        return v

    def int_list(self, key: str, default: Any = _MISSING) -> list[int]:
        v = self.d.get(key)
        if v is None:
            if default is Cfg._MISSING:
                raise BadConfig(f"{self.where}: missing required field {key!r}")
            return default
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise BadConfig(f"{self.where}: field {key!r} must be a list of integers, got {v!r}")
        return list(v)

    def str_list(self, key: str, default: Any = _MISSING) -> list[str]:
        v = self.d.get(key)
        if v is None:
            if default is Cfg._MISSING:
                raise BadConfig(f"{self.where}: missing required field {key!r}")
            return default
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise BadConfig(f"{self.where}: field {key!r} must be a list of strings, got {v!r}")
        return list(v)

    def sub(self, key: str) -> "Cfg":
        v = self.d.get(key)
        if v is None:
            return Cfg({}, f"{self.where}[{key}]")
        if not isinstance(v, dict):
            raise BadConfig(f"{self.where}: field {key!r} must be an object, got {type(v).__name__}")
        return Cfg(v, f"{self.where}[{key}]")


class Inventory:
    """Collects `Param`s while an adapter walks the architecture. Builders mirror transformers'
    modules so the inventory matches `model.named_parameters()` tensor for tensor."""

    def __init__(self) -> None:
        self.params: list[Param] = []

    def add(self, name: str, group: Group, shape: tuple[int, ...], layer: Optional[int] = None,
            copies: int = 1, matmul: bool = False) -> None:
        self.params.append(Param(name, group, tuple(int(s) for s in shape), layer, copies, matmul))

    def linear(self, name: str, group: Group, out: int, inp: int, layer: Optional[int] = None,
               bias: bool = False, copies: int = 1) -> None:
        self.add(f"{name}.weight", group, (out, inp), layer, copies, matmul=True)  # [out, in]
        if bias:
            self.add(f"{name}.bias", group, (out,), layer, copies)

    def norm(self, name: str, dim: int, layer: Optional[int] = None, bias: bool = False) -> None:
        self.add(f"{name}.weight", "norms", (dim,), layer)
        if bias:
            self.add(f"{name}.bias", "norms", (dim,), layer)

    def swiglu(self, prefix: str, group: Group, d: int, f: int, layer: Optional[int] = None,
               copies: int = 1, bias: bool = False) -> None:
        """gate [F, D], up [F, D], down [D, F]: the gated MLP of every modern MoE."""
        self.linear(f"{prefix}.gate", group, f, d, layer, bias, copies)
        self.linear(f"{prefix}.up", group, f, d, layer, bias, copies)
        self.linear(f"{prefix}.down", group, d, f, layer, bias, copies)

    def gqa(self, layer: int, d: int, heads: int, kv_heads: int, head_dim: int, *, qkv_bias: bool = False,
            o_bias: bool = False, q_out: Optional[int] = None) -> None:
        """Multi-head / grouped-query attention: q [H*Dh, D], k and v [Hkv*Dh, D], o [D, H*Dh]."""
        p = f"layers.{layer}.attn"
        self.linear(f"{p}.q", "attention", q_out or heads * head_dim, d, layer, qkv_bias)
        self.linear(f"{p}.k", "attention", kv_heads * head_dim, d, layer, qkv_bias)
        self.linear(f"{p}.v", "attention", kv_heads * head_dim, d, layer, qkv_bias)
        self.linear(f"{p}.o", "attention", d, heads * head_dim, layer, o_bias)

    def total(self) -> int:
        return sum(p.numel for p in self.params)
