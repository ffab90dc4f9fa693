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


def tie_embeddings(cfg: Cfg, default: bool = False) -> bool:
    return cfg.bool("tie_word_embeddings", default)


def sparse_step_schedule(cfg: Cfg, layers: int, has_experts: bool) -> list[bool]:
    """Qwen2/3-MoE and Qwen3-Next: MoE where not in `mlp_only_layers` and (i+1) % decoder_sparse_step == 0."""
    step = cfg.int("decoder_sparse_step", 1, min_value=1)
    mlp_only = set(cfg.int_list("mlp_only_layers", []))
    return [has_experts and i not in mlp_only and (i + 1) % step == 0 for i in range(layers)]


def first_k_dense_schedule(cfg: Cfg, layers: int, has_experts: bool) -> list[bool]:
    """DeepSeek / GLM-4.5: dense for the first `first_k_dense_replace` layers, then every `moe_layer_freq`."""
    k = cfg.int("first_k_dense_replace", 0)
    freq = cfg.int("moe_layer_freq", 1, min_value=1)
    return [has_experts and i >= k and i % freq == 0 for i in range(layers)]


def layer_windows(cfg: Cfg, layers: int) -> list[Optional[int]]:
    """KV window per layer: `layer_types` (sliding_attention / chunked_attention keep a window),
    or a model-wide `sliding_window` when `use_sliding_window` is not false."""
    window = cfg.raw("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise BadConfig(f"{cfg.where}: field 'sliding_window' must be a non-negative integer, got {window!r}")
    if cfg.has("layer_types"):
        types = cfg.str_list("layer_types")
        if len(types) < layers:
            raise BadConfig(f"{cfg.where}: layer_types has {len(types)} entries for {layers} layers")
        return [window if t == "sliding_attention" and window else None for t in types[:layers]]
    if window and cfg.raw("use_sliding_window", True) is not False:
        return [window] * layers
    return [None] * layers


def quantization(cfg: Cfg) -> Optional[dict]:
    q = cfg.raw("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise BadConfig(f"{cfg.where}: field 'quantization_config' must be an object")
    return q
