"""Pieces shared by the family adapters: the standard attention layer spec, embeddings and head,
layer schedules (which layers are MoE), sliding windows, and the quantization config."""

from __future__ import annotations

from typing import Optional

from ..errors import BadConfig
from ..spec import Cfg, Inventory, LayerSpec


def head_dim(cfg: Cfg, d: int, heads: int) -> int:
    """`head_dim` when the config gives it, else D // H (what transformers does:
    `getattr(config, "head_dim", None) or hidden_size // num_attention_heads`, floor division)."""
    if cfg.has("head_dim"):
        return cfg.int("head_dim", min_value=1)
    if d < heads:
        raise BadConfig(f"{cfg.where}: hidden_size {d} is smaller than num_attention_heads {heads}; set head_dim")
    return d // heads


def attention_dims(cfg: Cfg, d: int) -> tuple[int, int, int]:
    heads = cfg.int("num_attention_heads", min_value=1)
    kv = cfg.int("num_key_value_heads", heads, min_value=1)
    return heads, kv, head_dim(cfg, d, heads)


def gqa_layer(index: int, heads: int, kv_heads: int, hd: int, moe: bool, window: Optional[int] = None,
              v_head_dim: Optional[int] = None) -> LayerSpec:
    v = v_head_dim or hd
    return LayerSpec(index=index, mixer="attention", moe=moe, kv_per_token=kv_heads * (hd + v), window=window,
                     attn_flops_per_ctx=2 * heads * (hd + v))


def embed_and_head(inv: Inventory, cfg: Cfg, vocab: int, d: int, tie: bool, *, head_bias: bool = False,
                   final_norm_bias: bool = False) -> None:
    """Input embedding [V, D], final norm [D], LM head [V, D] (absent when tied: one matrix)."""
    inv.add("embed.weight", "embedding", (vocab, d))
    inv.norm("final_norm", d, bias=final_norm_bias)
    if not tie:
        inv.linear("lm_head", "lm_head", vocab, d, bias=head_bias)
    elif head_bias:
        inv.add("lm_head.bias", "lm_head", (vocab,))


def ffn(inv: Inventory, cfg: Cfg, i: int, d: int, moe: bool, E: int, F: int, shared_f: int = 0) -> None:
    """Layer i's FFN under canonical names: a router, E gated experts of width F and, when `shared_f`,
    one gated shared expert of that width, if `moe`; else a dense gated MLP of `intermediate_size`."""
    if moe:
        inv.linear(f"layers.{i}.router", "router", E, d, i)
        inv.swiglu(f"layers.{i}.experts", "routed_experts", d, F, i, copies=E)
        if shared_f:
            inv.swiglu(f"layers.{i}.shared_experts", "shared_experts", d, shared_f, i)
    else:
        inv.swiglu(f"layers.{i}.mlp", "dense_mlp", d, cfg.int("intermediate_size", min_value=1), i)


def tie_embeddings(cfg: Cfg, default: bool = False) -> bool:
    return cfg.bool("tie_word_embeddings", default)


def sparse_step_schedule(cfg: Cfg, layers: int, has_experts: bool) -> list[bool]:
    """Qwen2/3-MoE and Qwen3-Next: MoE where not in `mlp_only_layers` and (i+1) % decoder_sparse_step == 0."""
    step = cfg.int("decoder_sparse_step", 1, min_value=1)
    mlp_only = set(cfg.int_list("mlp_only_layers", []))
    return [has_experts and i not in mlp_only and (i + 1) % step == 0 for i in range(layers)]


def first_k_dense_schedule(cfg: Cfg, layers: int, has_experts: bool, first_k_default: int = 0) -> list[bool]:
    """DeepSeek / GLM-4.5: dense for the first `first_k_dense_replace` layers, MoE on every layer
    after. `moe_layer_freq` is ignored, as transformers' decoders do (their checkpoints have 1)."""
    k = cfg.int("first_k_dense_replace", first_k_default)
    return [has_experts and i >= k for i in range(layers)]


# How each family turns `sliding_window` / `use_sliding_window` / `layer_types` into per-layer
# windows when the config gives no `layer_types` (transformers' configuration_*.py __post_init__):
#   all:        every layer slides when `sliding_window` is set (Mixtral, Phi-MoE)
#   use_flag:   every layer, only if `use_sliding_window` (default false: Qwen3-MoE)
#   qwen2_moe:  only if `use_sliding_window` (default false), layers with (i + 1) odd below
#               `max_window_layers` (default 28)
#   qwen2:      only if `use_sliding_window` (default false), layers i >= `max_window_layers` (dense Qwen2 / Qwen3)
#   from_max:   layers i >= `max_window_layers`, no use flag (dots1)
#   alternate:  layers with (i + 1) odd (gpt-oss)
#   pattern:    layers with (i + 1) % `sliding_window_pattern` != 0 (EXAONE)
#   none:       no sliding window whatever the config says (Llama, OLMoE, GraniteMoE)
#   layer_types: windows from `layer_types` only; without it none (Step-3.7)
WindowRule = str


def layer_windows(cfg: Cfg, layers: int, rule: WindowRule = "all") -> list[Optional[int]]:
    """KV window per layer: `layer_types` (sliding_attention keeps a window) when given, else the
    family's `rule` above. A window of 0 / null is no window."""
    window = cfg.raw("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise BadConfig(f"{cfg.where}: field 'sliding_window' must be a non-negative integer, got {window!r}")
    use = cfg.bool("use_sliding_window", rule == "all")
    if rule == "none" or (rule in ("use_flag", "qwen2_moe", "qwen2") and not use):
        window = None  # transformers sets sliding_window to None / 0
    if not window:
        return [None] * layers
    if cfg.has("layer_types"):
        types = cfg.str_list("layer_types")
        if len(types) < layers:
            raise BadConfig(f"{cfg.where}: layer_types has {len(types)} entries for {layers} layers")
        return [window if t == "sliding_attention" else None for t in types[:layers]]
    if rule == "layer_types":  # no layer_types: every layer full attention (Step-3.7)
        return [None] * layers
    if rule == "qwen2_moe":
        below = cfg.int("max_window_layers", 28)
        return [window if (i + 1) % 2 and i < below else None for i in range(layers)]
    if rule == "from_max":
        return [window if i >= cfg.int("max_window_layers", 0) else None for i in range(layers)]
    if rule == "qwen2":
        return [window if i >= cfg.int("max_window_layers", 28) else None for i in range(layers)]
    if rule == "pattern":
        period = cfg.int("sliding_window_pattern", 4, min_value=1)
        return [window if (i + 1) % period else None for i in range(layers)]
    if rule == "alternate":
        return [window if (i + 1) % 2 else None for i in range(layers)]
    if rule == "all" and not use:
        return [None] * layers
    return [window] * layers


def quantization(cfg: Cfg) -> Optional[dict]:
    q = cfg.raw("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise BadConfig(f"{cfg.where}: field 'quantization_config' must be an object")
    return q
