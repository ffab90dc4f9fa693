"""Inkling's text model (thinkingmachines/Inkling, `inkling_text`; transformers' InklingForCausalLM).

Every layer: attention with q/k/v/o plus `r_proj` (per-head relative states, d_rel wide) and a
learned relative-position table `rel_logits_proj.proj` [d_rel, extent]; depthwise short
convolutions on K and V (`k_sconv`, `v_sconv`) and on the attention and MLP outputs (`attn_sconv`,
`mlp_sconv`), kernel `conv_kernel_size` (alias `sconv_kernel_size`), no bias; QK RMSNorm per head.
Sliding layers (`layer_types` "hybrid_sliding"; default: every layer with (i + 1) % 6 != 0) have
their own heads / KV heads / head size (swa_*), window `sliding_window_size`, and a relative table
of the window's extent; full layers ("hybrid") a table of `rel_extent`.
MLP per `mlp_layer_types` (default all "sparse"): a dense SwiGLU with a learned `global_scale`, or
the MoE: a sigmoid router over E routed + n_shared experts (its weight has E + n_shared rows, plus a
`global_scale`; a correction bias buffer for the choice), fused routed experts, and the shared
experts stored as [n_shared, F, D] tensors. The input embedding carries its own RMSNorm
(`embed_tokens.embed_norm`); the LM head is never tied. MTP layers (`num_mtp_layers`) are not
built by transformers (their tensors are ignored on load): reported, not counted.
"""

from __future__ import annotations

from ..errors import BadConfig
from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common


def layer_types(cfg: Cfg, n: int, version: int = 1) -> list[str]:
    """"hybrid_sliding" / "hybrid" per layer: `layer_types`, else Inkling's `local_layer_ids` (default: every
    layer with (i + 1) % 6 != 0 slides), Inkling 2's every sixth layer full."""
    if cfg.raw("layer_types") is not None:
        types = cfg.str_list("layer_types")
        if len(types) < n:
            raise BadConfig(f"{cfg.where}: layer_types has {len(types)} entries for {n} layers")
        return types[:n]
    if version == 2:
        return ["hybrid" if (i + 1) % 6 == 0 else "hybrid_sliding" for i in range(n)]
    local = (set(cfg.int_list("local_layer_ids")) if cfg.raw("local_layer_ids") is not None
             else {i for i in range(n) if (i + 1) % 6})
    return ["hybrid_sliding" if i in local else "hybrid" for i in range(n)]


def adapt(cfg: Cfg, model_type: str = "inkling_text") -> ModelSpec:
    d = cfg.int("hidden_size", 6144, min_value=1)
    vocab = cfg.int("vocab_size", 201024, min_value=1)
    n_layers = cfg.int("num_hidden_layers", 66, min_value=1)
    types = layer_types(cfg, n_layers)
    if cfg.raw("mlp_layer_types") is not None:
        mlp_types = cfg.str_list("mlp_layer_types")
        if len(mlp_types) < n_layers:
            raise BadConfig(f"{cfg.where}: mlp_layer_types has {len(mlp_types)} entries for {n_layers} layers")
    else:
        dense_idx = cfg.int("dense_mlp_idx", 0)
        mlp_types = ["dense" if i < dense_idx else "sparse" for i in range(n_layers)]
    # checkpoints with `dense_intermediate_size`: intermediate_size is the experts' width (InklingTextConfig)
    if cfg.raw("dense_intermediate_size") is not None:
        F, dense_f = cfg.int("intermediate_size", min_value=1), cfg.int("dense_intermediate_size", min_value=1)
    else:
        F, dense_f = cfg.int("moe_intermediate_size", 3072, min_value=1), cfg.int("intermediate_size", 24576, min_value=1)
    E = cfg.first_int(["n_routed_experts", "num_local_experts"], 256, min_value=1)
    shared = cfg.int("n_shared_experts", 2, min_value=1)
    k = cfg.int("num_experts_per_tok", 6, min_value=1)
    K = cfg.first_int(["conv_kernel_size", "sconv_kernel_size"], 4, min_value=1)
    d_rel = cfg.int("d_rel", 16, min_value=1)
    window = cfg.first_int(["sliding_window_size", "sliding_window"], 512, min_value=1)
    moe = MoESpec(num_experts=E, top_k=k, expert_ffn=F, num_shared_experts=shared, shared_ffn=F * shared,
                  router=RouterSpec(scoring="sigmoid", correction_bias=True,
                                    routed_scaling_factor=cfg.float("route_scale", 8.0)))
    inv = Inventory()
    layers = []
    for i in range(n_layers):
        sliding = types[i] == "hybrid_sliding"
        pre = "swa_" if sliding else ""
        heads = cfg.int(f"{pre}num_attention_heads", 64, min_value=1)
        kv = cfg.int(f"{pre}num_key_value_heads", 16 if sliding else 8, min_value=1)
        hd = cfg.int(f"{pre}head_dim", 128, min_value=1)
        extent = window if sliding else cfg.int("rel_extent", 1024, min_value=1)
        p = f"layers.{i}.attn"
        inv.gqa(i, d, heads, kv, hd)
        inv.linear(f"{p}.r", "attention", heads * d_rel, d, i)
        inv.add(f"{p}.rel_logits_proj.proj", "attention", (d_rel, extent), i)
        inv.add(f"{p}.k_sconv.weight", "attention", (kv * hd, 1, K), i)
        inv.add(f"{p}.v_sconv.weight", "attention", (kv * hd, 1, K), i)
        inv.norm(f"{p}.q_norm", hd, i)
        inv.norm(f"{p}.k_norm", hd, i)
        inv.add(f"layers.{i}.attn_sconv.weight", "attention", (d, 1, K), i)
        inv.add(f"layers.{i}.mlp_sconv.weight", "dense_mlp", (d, 1, K), i)
        inv.norm(f"layers.{i}.input_norm", d, i)
        inv.norm(f"layers.{i}.post_attention_norm", d, i)
        is_moe = mlp_types[i] == "sparse"
        if is_moe:
            inv.linear(f"layers.{i}.router", "router", E + shared, d, i)
            inv.add(f"layers.{i}.router.global_scale", "router", (1,), i)
            inv.swiglu(f"layers.{i}.experts", "routed_experts", d, F, i, copies=E)
            inv.swiglu(f"layers.{i}.shared_experts", "shared_experts", d, F, i, copies=shared)
        else:
            inv.swiglu(f"layers.{i}.mlp", "dense_mlp", d, dense_f, i)
            inv.add(f"layers.{i}.mlp.global_scale", "dense_mlp", (1,), i)
        layer = common.gqa_layer(i, heads, kv, hd, is_moe, window=window if sliding else None)
        # four short-convolution caches of K - 1 steps: K, V, the attention output and the MLP output
        layers.append(LayerSpec(index=i, mixer="attention", moe=is_moe, kv_per_token=layer.kv_per_token,
                                window=layer.window, attn_flops_per_ctx=layer.attn_flops_per_ctx,
                                state_elems=(K - 1) * (2 * kv * hd + 2 * d)))
    inv.add("embed.weight", "embedding", (vocab, d))
    inv.norm("embed.embed_norm", d)
    inv.norm("final_norm", d)
    inv.linear("lm_head", "lm_head", vocab, d)  # never tied (InklingForCausalLM._tied_weights_keys = {})
    mtp = cfg.int("num_mtp_layers", 0) if cfg.raw("num_mtp_layers") is not None else 0
    notes = ((f"{mtp} MTP layers (num_mtp_layers) are not built by transformers' InklingForCausalLM: "
              "not counted",) if mtp else ())
    return ModelSpec(model_type=model_type, family="inkling", hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=False,
                     mtp_layers=mtp, max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg),
                     notes=notes)


def adapt2(cfg: Cfg, model_type: str = "inkling2_text") -> ModelSpec:
    """Inkling 2's text model (`inkling2_text`; Inkling2ForCausalLM). Inkling's attention (r_proj,
    relative table, short convolutions, swa_* sizes on "hybrid_sliding" layers; default: every
    layer with (i + 1) % 6 != 0) with an output gate [H*Dh, D], per-head sink logits [H, D] and
    learned L2-clip scales on q [H, Dh] and on the relative states [H, d_rel]; no QK RMSNorm.
    Full ("hybrid") layers: K / V convolutions whose taps add per-token weights (static [K, Hkv*Dh]
    + weight_proj [Hkv*K, D]) and RMSNorms of the q, k and v inputs instead of one input norm.
    Block attention residuals: learned queries mixing the earlier layers' outputs before the
    attention (layers > 0; 3 queries on full layers), before the MLP and before the head.
    Every layer MoE (no shared experts): sigmoid router, correction bias for the choice."""
    d = cfg.int("hidden_size", 4608, min_value=1)
    vocab = cfg.int("vocab_size", 201024, min_value=1)
    n_layers = cfg.int("num_hidden_layers", 48, min_value=1)
    types = layer_types(cfg, n_layers, 2)
    E = cfg.first_int(["n_routed_experts", "num_local_experts"], 384, min_value=1)
    F = cfg.first_int(["moe_intermediate_size", "intermediate_size"], 2304, min_value=1)
    K = cfg.first_int(["conv_kernel_size", "sconv_kernel_size"], 4, min_value=1)
    d_rel = cfg.int("d_rel", 16, min_value=1)
    window = cfg.first_int(["sliding_window_size", "sliding_window"], 1024, min_value=1)
    moe = MoESpec(num_experts=E, top_k=cfg.int("num_experts_per_tok", 8, min_value=1), expert_ffn=F,
                  router=RouterSpec(scoring=cfg.str("scoring_func", "sigmoid"), correction_bias=True,
                                    routed_scaling_factor=cfg.float("route_scale", cfg.float("routed_scaling_factor", 8.0))))
    inv = Inventory()
    layers = []
    for i in range(n_layers):
        sliding = types[i] == "hybrid_sliding"
        pre = "swa_" if sliding else ""
        heads = cfg.int(f"{pre}num_attention_heads", 48, min_value=1)
        kv = cfg.int(f"{pre}num_key_value_heads", 8, min_value=1)
        hd = cfg.int(f"{pre}head_dim", 128, min_value=1)
        extent = window if sliding else cfg.int("rel_extent", 1024, min_value=1)
        p = f"layers.{i}.attn"
        inv.gqa(i, d, heads, kv, hd)
        inv.linear(f"{p}.r", "attention", heads * d_rel, d, i)
        inv.add(f"{p}.rel_logits_proj.proj", "attention", (d_rel, extent), i)
        inv.linear(f"{p}.gate", "attention", heads * hd, d, i)
        inv.linear(f"{p}.sink", "attention", heads, d, i)
        inv.add(f"{p}.q_l2_clip.scale", "attention", (heads, hd), i)
        inv.add(f"{p}.rel_l2_clip.scale", "attention", (heads, d_rel), i)
        for kv_conv in ("k_sconv", "v_sconv"):
            if sliding:
                inv.add(f"{p}.{kv_conv}.weight", "attention", (kv * hd, 1, K), i)
            else:  # dynamic taps: static weights plus a projection of the token
                inv.add(f"{p}.{kv_conv}.static_weight", "attention", (K, kv * hd), i)
                inv.linear(f"{p}.{kv_conv}.weight_proj", "attention", kv * K, d, i)
        inv.add(f"layers.{i}.attn_sconv.weight", "attention", (d, 1, K), i)
        inv.add(f"layers.{i}.mlp_sconv.weight", "dense_mlp", (d, 1, K), i)
        for n in (("input_norm",) if sliding else ("q_input_norm", "k_input_norm", "v_input_norm")) + ("post_attention_norm",):
            inv.norm(f"layers.{i}.{n}", d, i)
        if i > 0:  # block attention residual queries (counted with the norms, as the hyper-connections)
            inv.add(f"layers.{i}.attention_input.query", "norms", (d,) if sliding else (3, d), i)
        inv.add(f"layers.{i}.mlp_input.query", "norms", (d,), i)
        common.ffn(inv, cfg, i, d, True, E, F)
        layer = common.gqa_layer(i, heads, kv, hd, True, window=window if sliding else None)
        layers.append(LayerSpec(index=i, mixer="attention", moe=True, kv_per_token=layer.kv_per_token,
                                window=layer.window, attn_flops_per_ctx=layer.attn_flops_per_ctx,
                                state_elems=(K - 1) * (2 * kv * hd + 2 * d)))
    inv.add("embed.weight", "embedding", (vocab, d))
    inv.norm("embed.embed_norm", d)
    inv.norm("final_norm", d)
    inv.add("final_input.query", "norms", (d,))
    inv.linear("lm_head", "lm_head", vocab, d)  # never tied
    return ModelSpec(model_type=model_type, family="inkling2_text", hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=False,
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def register(table: dict) -> None:
    table["inkling_text"] = adapt
    table["inkling2_text"] = adapt2
