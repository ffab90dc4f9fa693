"""LFM2-MoE (LiquidAI/LFM2-8B-A1B): gated short-convolution layers (`layer_types` "conv") and
attention layers with per-head QK RMSNorm; the first `num_dense_layers` have a dense SwiGLU, the
rest a MoE with sigmoid scores, `expert_bias` added for selection only, top-k renormalised
(norm_topk_prob) and scaled by routed_scaling_factor. Embeddings tied by default; the final norm
is called `embedding_norm`."""

from __future__ import annotations

from ..errors import BadConfig
from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common


def adapt(cfg: Cfg, model_type: str = "lfm2_moe") -> ModelSpec:
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n_layers = cfg.int("num_hidden_layers", min_value=1)
    heads, kv_heads, hd = common.attention_dims(cfg, d)
    tie = cfg.bool("tie_word_embeddings", cfg.bool("tie_embedding", True))
    types = cfg.str_list("layer_types")
    if len(types) < n_layers:
        raise BadConfig(f"{cfg.where}: layer_types has {len(types)} entries for {n_layers} layers")
    E, F = cfg.int("num_experts", 32, min_value=1), cfg.int("moe_intermediate_size", 1792, min_value=1)
    bias_sel = cfg.bool("use_expert_bias", True)
    moe = MoESpec(num_experts=E, top_k=cfg.int("num_experts_per_tok", 4, min_value=1), expert_ffn=F,
                  router=RouterSpec(scoring="sigmoid", norm_topk_prob=cfg.bool("norm_topk_prob", True),
                                    routed_scaling_factor=cfg.float("routed_scaling_factor", 1.0),
                                    correction_bias=bias_sel, norm_eps=1e-6))
    dense = cfg.int("num_dense_layers", 2)
    K, conv_bias = cfg.int("conv_L_cache", 3, min_value=1), cfg.bool("conv_bias", False)
    inv = Inventory()
    layers = []
    for i in range(n_layers):
        is_moe = i >= dense
        if types[i] == "conv":
            p = f"layers.{i}.conv"
            inv.linear(f"{p}.in_proj", "attention", 3 * d, d, i, conv_bias)
            inv.add(f"{p}.conv.weight", "attention", (d, 1, K), i)
            if conv_bias:
                inv.add(f"{p}.conv.bias", "attention", (d,), i)
            inv.linear(f"{p}.out_proj", "attention", d, d, i, conv_bias)
            layer = LayerSpec(index=i, mixer="short_conv", moe=is_moe, state_elems=(K - 1) * d)
        else:
            inv.gqa(i, d, heads, kv_heads, hd)
            inv.norm(f"layers.{i}.attn.q_norm", hd, i)
            inv.norm(f"layers.{i}.attn.k_norm", hd, i)
            layer = common.gqa_layer(i, heads, kv_heads, hd, is_moe)
        inv.norm(f"layers.{i}.operator_norm", d, i)
        inv.norm(f"layers.{i}.ffn_norm", d, i)
        if is_moe:
            inv.linear(f"layers.{i}.router", "router", E, d, i)
            inv.swiglu(f"layers.{i}.experts", "routed_experts", d, F, i, copies=E)
        else:
            inv.swiglu(f"layers.{i}.mlp", "dense_mlp", d, cfg.int("intermediate_size", min_value=1), i)
        layers.append(layer)
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family="lfm2_moe", hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def register(table: dict) -> None:
    table["lfm2_moe"] = adapt
