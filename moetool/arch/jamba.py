"""Jamba (ai21labs/Jamba-v0.1): a hybrid of Mamba and attention layers. Layer i is attention when
i % attn_layer_period == attn_layer_offset (else Mamba), and MoE when
i % expert_layer_period == expert_layer_offset (else a dense SwiGLU MLP).
Mamba layers keep a fixed state per sequence (conv + SSM), no KV cache."""

from __future__ import annotations

import math

from ..errors import BadConfig
from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common


def adapt(cfg: Cfg, model_type: str = "jamba") -> ModelSpec:
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n_layers = cfg.int("num_hidden_layers", min_value=1)
    heads, kv_heads, hd = common.attention_dims(cfg, d)
    tie = common.tie_embeddings(cfg)
    E = cfg.first_int(["num_experts", "num_local_experts"], 16, min_value=1)
    F = cfg.int("intermediate_size", min_value=1)
    moe = MoESpec(num_experts=E, top_k=cfg.int("num_experts_per_tok", 2, min_value=1), expert_ffn=F,
                  router=RouterSpec(norm_topk_prob=False))
    attn_period, attn_offset = cfg.int("attn_layer_period", 8, min_value=1), cfg.int("attn_layer_offset", 4)
    exp_period, exp_offset = cfg.int("expert_layer_period", 2, min_value=1), cfg.int("expert_layer_offset", 1)
    if attn_offset >= attn_period or exp_offset >= exp_period:
        raise BadConfig(f"{cfg.where}: layer offsets must be smaller than their periods")
    d_state, d_conv = cfg.int("mamba_d_state", 16, min_value=1), cfg.int("mamba_d_conv", 4, min_value=1)
    inner = cfg.int("mamba_expand", 2, min_value=1) * d
    dt_rank = cfg.raw("mamba_dt_rank", "auto")
    dt_rank = math.ceil(d / 16) if dt_rank == "auto" else cfg.int("mamba_dt_rank", min_value=1)
    conv_bias, proj_bias = cfg.bool("mamba_conv_bias", True), cfg.bool("mamba_proj_bias", False)

    inv = Inventory()
    layers = []
    for i in range(n_layers):
        is_moe = i % exp_period == exp_offset
        if i % attn_period == attn_offset:
            inv.gqa(i, d, heads, kv_heads, hd)
            layer = common.gqa_layer(i, heads, kv_heads, hd, is_moe)
        else:
            p = f"layers.{i}.mamba"
            inv.linear(f"{p}.in_proj", "ssm", 2 * inner, d, i, proj_bias)
            inv.add(f"{p}.conv1d.weight", "ssm", (inner, 1, d_conv), i)
            if conv_bias:
                inv.add(f"{p}.conv1d.bias", "ssm", (inner,), i)
            inv.linear(f"{p}.x_proj", "ssm", dt_rank + 2 * d_state, inner, i)
            inv.linear(f"{p}.dt_proj", "ssm", inner, dt_rank, i, bias=True)
            inv.add(f"{p}.A_log", "ssm", (inner, d_state), i)
            inv.add(f"{p}.D", "ssm", (inner,), i)
            inv.linear(f"{p}.out_proj", "ssm", d, inner, i, proj_bias)
            for n, dim in (("dt_norm", dt_rank), ("b_norm", d_state), ("c_norm", d_state)):
                inv.norm(f"{p}.{n}", dim, i)
            layer = LayerSpec(index=i, mixer="mamba", moe=is_moe, state_elems=inner * (d_conv + d_state))
        inv.norm(f"layers.{i}.input_norm", d, i)
        inv.norm(f"layers.{i}.pre_ff_norm", d, i)
        if is_moe:
            inv.linear(f"layers.{i}.router", "router", E, d, i)
            inv.swiglu(f"layers.{i}.experts", "routed_experts", d, F, i, copies=E)
        else:
            inv.swiglu(f"layers.{i}.mlp", "dense_mlp", d, F, i)
        layers.append(layer)
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family="jamba", hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_position_embeddings"), torch_dtype=cfg.raw("torch_dtype"),
                     quantization=common.quantization(cfg))


def register(table: dict) -> None:
    table["jamba"] = adapt
