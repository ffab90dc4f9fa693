"""Qwen3-Next (Qwen/Qwen3-Next-80B-A3B): hybrid of gated DeltaNet linear attention and gated full
attention (q_proj is twice as wide: query and output gate), `layer_types` or one full-attention
layer every `full_attention_interval`; MoE with a sigmoid-gated shared expert like Qwen2-MoE.
Qwen3.5-MoE's text model (`qwen3_5_moe_text`) is the same network with the DeltaNet input
projections stored apart (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a) and every layer MoE."""

from __future__ import annotations

import dataclasses

from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common


def adapt(cfg: Cfg, model_type: str = "qwen3_next", split_proj: bool = False) -> ModelSpec:
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n_layers = cfg.int("num_hidden_layers", min_value=1)
    heads = cfg.int("num_attention_heads", min_value=1)
    kv_heads = cfg.int("num_key_value_heads", heads, min_value=1)
    hd = cfg.int("head_dim", 256, min_value=1)
    tie = common.tie_embeddings(cfg)
    bias = cfg.bool("attention_bias", False)
    interval = cfg.int("full_attention_interval", 4, min_value=1)
    types = cfg.str_list("layer_types", ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layers)])
    nk, nv = cfg.int("linear_num_key_heads", 16, min_value=1), cfg.int("linear_num_value_heads", 32, min_value=1)
    dk, dv = cfg.int("linear_key_head_dim", 128, min_value=1), cfg.int("linear_value_head_dim", 128, min_value=1)
    kernel = cfg.int("linear_conv_kernel_dim", 4, min_value=1)
    experts = cfg.first_int(["num_experts", "num_local_experts"], 0)
    moe = None
    if experts:
        moe = MoESpec(num_experts=experts, top_k=cfg.int("num_experts_per_tok", min_value=1),
                      expert_ffn=cfg.int("moe_intermediate_size", min_value=1), num_shared_experts=1,
                      shared_ffn=cfg.int("shared_expert_intermediate_size", min_value=1),
                      router=RouterSpec(norm_topk_prob=split_proj or cfg.bool("norm_topk_prob", True)))
    # Qwen3.5: every layer MoE, top-k always renormalised (no decoder_sparse_step / norm_topk_prob).
    is_moe = [moe is not None] * n_layers if split_proj else common.sparse_step_schedule(cfg, n_layers, moe is not None)

    inv = Inventory()
    layers = []
    for i in range(n_layers):
        if types[i] == "full_attention":
            inv.gqa(i, d, heads, kv_heads, hd, qkv_bias=bias, o_bias=bias, q_out=2 * heads * hd)
            inv.norm(f"layers.{i}.attn.q_norm", hd, i)
            inv.norm(f"layers.{i}.attn.k_norm", hd, i)
            layer = common.gqa_layer(i, heads, kv_heads, hd, is_moe[i])
        else:
            p = f"layers.{i}.linear_attn"
            conv_dim = 2 * nk * dk + nv * dv
            if split_proj:
                inv.linear(f"{p}.in_proj_qkv", "attention", 2 * nk * dk + nv * dv, d, i)
                inv.linear(f"{p}.in_proj_z", "attention", nv * dv, d, i)
                inv.linear(f"{p}.in_proj_b", "attention", nv, d, i)
                inv.linear(f"{p}.in_proj_a", "attention", nv, d, i)
            else:
                inv.linear(f"{p}.in_proj_qkvz", "attention", 2 * nk * dk + 2 * nv * dv, d, i)
                inv.linear(f"{p}.in_proj_ba", "attention", 2 * nv, d, i)
            inv.add(f"{p}.conv1d.weight", "attention", (conv_dim, 1, kernel), i)
            inv.add(f"{p}.dt_bias", "attention", (nv,), i)
            inv.add(f"{p}.A_log", "attention", (nv,), i)
            inv.norm(f"{p}.norm", dv, i)
            inv.linear(f"{p}.out_proj", "attention", d, nv * dv, i)
            layer = LayerSpec(index=i, mixer="gated_deltanet", moe=is_moe[i],
                              state_elems=conv_dim * kernel + nv * dk * dv)
        inv.norm(f"layers.{i}.input_norm", d, i)
        inv.norm(f"layers.{i}.post_attention_norm", d, i)
        if is_moe[i]:
            inv.linear(f"layers.{i}.router", "router", moe.num_experts, d, i)
            inv.swiglu(f"layers.{i}.experts", "routed_experts", d, moe.expert_ffn, i, copies=moe.num_experts)
            inv.swiglu(f"layers.{i}.shared_expert", "shared_experts", d, moe.shared_ffn, i)
            inv.linear(f"layers.{i}.shared_expert_gate", "shared_experts", 1, d, i)
        else:
            inv.swiglu(f"layers.{i}.mlp", "dense_mlp", d, cfg.int("intermediate_size", min_value=1), i)
        layers.append(layer)
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family="qwen3_next", hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_position_embeddings"), torch_dtype=cfg.raw("torch_dtype"),
                     quantization=common.quantization(cfg))


def adapt_multimodal(cfg: Cfg) -> ModelSpec:
    """Qwen3.5-MoE's image-text checkpoint (`qwen3_5_moe`): the text model from `text_config`
    (stored under model.language_model.) plus the vision tower (model.visual.) as its own group."""
    text = adapt(cfg.sub("text_config"), "qwen3_5_moe", split_proj=True)
    v = cfg.sub("vision_config")
    h, inter, depth = v.int("hidden_size", 1152, min_value=1), v.int("intermediate_size", 4304, min_value=1), v.int("depth", 27)
    p, tp, ch = v.int("patch_size", 16, min_value=1), v.int("temporal_patch_size", 2, min_value=1), v.int("in_channels", 3)
    merged = h * v.int("spatial_merge_size", 2, min_value=1) ** 2
    inv = Inventory()
    inv.add("visual.patch_embed.weight", "vision", (h, ch, tp, p, p))
    inv.add("visual.patch_embed.bias", "vision", (h,))
    inv.add("visual.pos_embed.weight", "vision", (v.int("num_position_embeddings", 2304), h))
    for b in range(depth):
        for n in ("norm1", "norm2"):
            inv.add(f"visual.blocks.{b}.{n}.weight", "vision", (h,))
            inv.add(f"visual.blocks.{b}.{n}.bias", "vision", (h,))
        inv.linear(f"visual.blocks.{b}.qkv", "vision", 3 * h, h, bias=True)
        inv.linear(f"visual.blocks.{b}.proj", "vision", h, h, bias=True)
        inv.linear(f"visual.blocks.{b}.fc1", "vision", inter, h, bias=True)
        inv.linear(f"visual.blocks.{b}.fc2", "vision", h, inter, bias=True)
    inv.add("visual.merger.norm.weight", "vision", (h,))
    inv.add("visual.merger.norm.bias", "vision", (h,))
    inv.linear("visual.merger.fc1", "vision", merged, merged, bias=True)
    inv.linear("visual.merger.fc2", "vision", v.int("out_hidden_size", 3584, min_value=1), merged, bias=True)
    return dataclasses.replace(text, params=text.params + tuple(inv.params))


def register(table: dict) -> None:
    table["qwen3_next"] = adapt
    table["qwen3_5_moe"] = adapt_multimodal
    table["qwen3_5_moe_text"] = lambda cfg: adapt(cfg, "qwen3_5_moe_text", split_proj=True)
