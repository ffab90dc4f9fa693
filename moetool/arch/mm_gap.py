"""Text models (and towers) of the multimodal MoE families that had only the generic header count
(issue 11, session 3): GLM-5.3-Flash (glm5_next), ERNIE-4.5-VL-MoE (ernie4_5_vl_moe), Muse Spark
(muse_spark), Unlimited-OCR (unlimited_ocr) and NeMo SpeechLM (nemo_speechlm). Each is counted
whole as multimodal.FAMILIES describes: the text adapter here on `text_config`, the towers as
their own `vision` / `audio` groups. Count only: `trace` refuses them.

GLM-5.3-Flash text (Glm5NextTextModel), per `layer_types`:
- "linear_attention" (Kimi-style KDA): q/k/v [H*Dh, D], a depthwise conv over q|k|v, a forget
  gate of rank Dh (f_a [Dh, D], f_b [H*Dh, Dh], dt_bias [H*Dh], A_log [H]), beta b_proj [H, D],
  an output gate of rank Dh (g_a, g_b), gated RMSNorm [Dh], o_proj; H, Dh = linear_num_heads,
  linear_head_dim.
- "indexed_attention": MLA with a query LoRA and no RoPE (GLM-5's DSA), an indexer on the
  `indexer_types` "full" layers (GLM-5's, plus the k-pool compression: an absolute position
  table [kpool, Di] and a gate [Di, D]).
- FFN per `mlp_layer_types` (default: 3 dense layers first): DeepSeek-V3's sigmoid router with
  correction bias, fused experts and shared experts.
- Hyper-connections in every layer (attn_hc, ffn_hc: fn [(2+N)*N, N*D], base [(2+N)*N],
  scale [3] for N = hc_mult streams), counted with the norms; the final collapse is an
  unweighted mean (no parameters).
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import BadConfig
from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common
from .deepseek import _MLA


def _types(cfg: Cfg, key: str, n: int, default: list[str]) -> list[str]:
    types = cfg.str_list(key, default)
    if len(types) < n:
        raise BadConfig(f"{cfg.where}: {key} has {len(types)} entries for {n} layers")
    return types[:n]


def glm5_next_text(cfg: Cfg, model_type: str = "glm5_next_text") -> ModelSpec:
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n = cfg.int("num_hidden_layers", min_value=1)
    tie = common.tie_embeddings(cfg)
    heads = cfg.int("num_attention_heads", min_value=1)
    lin_heads = cfg.int("linear_num_heads", 64, min_value=1)
    hd = cfg.int("linear_head_dim", 128, min_value=1)
    K = cfg.int("linear_conv_kernel_dim", 4, min_value=1)
    hc = cfg.int("hc_mult", 4, min_value=1)
    kpool = cfg.int("index_kpool", 16, min_value=1)
    E = cfg.first_int(["n_routed_experts", "num_local_experts"], min_value=1)
    F = cfg.int("moe_intermediate_size", min_value=1)
    shared = cfg.int("n_shared_experts", 1)
    moe = MoESpec(num_experts=E, top_k=cfg.int("num_experts_per_tok", min_value=1), expert_ffn=F,
                  num_shared_experts=shared, shared_ffn=F * shared, activation=cfg.str("hidden_act", "silu"),
                  router=RouterSpec(scoring="sigmoid", norm_topk_prob=cfg.bool("norm_topk_prob", True),
                                    routed_scaling_factor=cfg.float("routed_scaling_factor", 2.5),
                                    topk_method="noaux_tc", n_group=cfg.int("n_group", 1, min_value=1),
                                    topk_group=cfg.int("topk_group", 1, min_value=1), correction_bias=True))
    layer_types = [("indexed_attention" if t == "full_attention" else t) for t in _types(
        cfg, "layer_types", n, ["linear_attention" if i % 4 != 3 else "indexed_attention" for i in range(n)])]
    mlp = _types(cfg, "mlp_layer_types", n, ["dense" if i < 3 else "sparse" for i in range(n)])
    mla = _MLA(cfg, d, heads, dict(indexer="per_layer", index_heads=32), n)
    inv = Inventory()
    layers = []
    for i in range(n):
        is_moe = mlp[i] == "sparse"
        p = f"layers.{i}.attn"
        if layer_types[i] == "linear_attention":
            q = lin_heads * hd
            for proj in ("q", "k", "v"):
                inv.linear(f"{p}.{proj}_proj", "attention", q, d, i)
            inv.add(f"{p}.conv1d.weight", "attention", (3 * q, 1, K), i)
            inv.linear(f"{p}.forget_gate.f_a_proj", "attention", hd, d, i)
            inv.linear(f"{p}.forget_gate.f_b_proj", "attention", q, hd, i)
            inv.add(f"{p}.forget_gate.dt_bias", "attention", (q,), i)
            inv.add(f"{p}.forget_gate.A_log", "attention", (lin_heads,), i)
            inv.linear(f"{p}.b_proj", "attention", lin_heads, d, i)
            inv.linear(f"{p}.g_a_proj", "attention", hd, d, i)
            inv.linear(f"{p}.g_b_proj", "attention", q, hd, i)
            inv.norm(f"{p}.o_norm", hd, i)
            inv.linear(f"{p}.o_proj", "attention", d, q, i)
            layer = LayerSpec(index=i, mixer="kda", moe=is_moe, state_elems=(K - 1) * 3 * q + lin_heads * hd * hd)
        else:
            layer = replace(mla.build(inv, i, "attention"), moe=is_moe)
            if i not in mla.no_index:  # the indexer's k-pool compression
                inv.add(f"{p}.indexer.index_kpool_compress_ape", "attention", (kpool, mla.index[1]), i)
                inv.add(f"{p}.indexer.index_kpool_compress_gate", "attention", (mla.index[1], d), i, matmul=True)
        inv.norm(f"layers.{i}.input_norm", d, i)
        inv.norm(f"layers.{i}.post_attention_norm", d, i)
        common.ffn(inv, cfg, i, d, is_moe, E, F, F * shared)
        for mixer in ("attn_hc", "ffn_hc"):
            inv.add(f"layers.{i}.{mixer}.fn", "norms", ((2 + hc) * hc, hc * d), i, matmul=True)
            inv.add(f"layers.{i}.{mixer}.base", "norms", ((2 + hc) * hc,), i)
            inv.add(f"layers.{i}.{mixer}.scale", "norms", (3,), i)
        layers.append(layer)
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family="glm5_next", hidden_size=d, vocab_size=vocab, num_layers=n,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     mtp_layers=cfg.first_int(["num_nextn_predict_layers", "num_mtp_layers"], 0),
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def glm5_next_vision(inv: Inventory, v: Cfg, text_d: int, top: Cfg) -> None:
    """GLM-5.3-Flash vision tower: Conv3d patches (bias), RMSNorm blocks with a fused qkv, QK-norm
    [h / heads] and a SwiGLU of intermediate_size (biases with `attention_bias`), a post RMSNorm,
    a Conv2d downsample to `out_hidden_size` and a SwiGLU patch merger of
    `projection_intermediate_size` (no biases; its LayerNorm has one)."""
    from . import multimodal as mm  # its tower pieces (multimodal imports this module: import at call time)

    h, out = v.int("hidden_size", 1024, min_value=1), v.int("out_hidden_size", 1536, min_value=1)
    f, ctx = v.int("intermediate_size", 4096, min_value=1), v.int("projection_intermediate_size", 10240, min_value=1)
    p, t = v.int("patch_size", 14, min_value=1), v.int("temporal_patch_size", 2, min_value=1)
    m = v.int("spatial_merge_size", 2, min_value=1)
    heads = v.int("num_heads", 16, min_value=1)
    bias = v.bool("attention_bias", True)
    mm._conv(inv, "visual.patch_embed", h, v.int("in_channels", 3, min_value=1), (t, p, p))
    for i in range(v.int("depth", 24, min_value=0)):
        b = f"visual.blocks.{i}"
        mm._norm(inv, f"{b}.norm1", h, bias=False), mm._norm(inv, f"{b}.norm2", h, bias=False)
        mm._lin(inv, f"{b}.attn.qkv", 3 * h, h, bias), mm._lin(inv, f"{b}.attn.proj", h, h, bias)
        mm._norm(inv, f"{b}.attn.q_norm", h // heads, bias=False), mm._norm(inv, f"{b}.attn.k_norm", h // heads, bias=False)
        for proj, o, i_ in (("gate", f, h), ("up", f, h), ("down", h, f)):
            mm._lin(inv, f"{b}.mlp.{proj}", o, i_, bias)
    mm._norm(inv, "visual.post_layernorm", h, bias=False)
    mm._conv(inv, "visual.downsample", out, h, (m, m))
    mm._lin(inv, "visual.merger.proj", out, out, False)
    mm._norm(inv, "visual.merger.post_projection_norm", out)
    mm._lin(inv, "visual.merger.gate", ctx, out, False), mm._lin(inv, "visual.merger.up", ctx, out, False)
    mm._lin(inv, "visual.merger.down", out, ctx, False)


def ernie4_5_vl_moe_text(cfg: Cfg, model_type: str = "ernie4_5_vl_moe_text") -> ModelSpec:
    """ERNIE-4.5-VL-MoE text model (Ernie4_5_VLMoeTextModel): GQA attention and dense / shared MLPs
    with `use_bias` biases; on `mlp_layer_types` "sparse" layers (default: all but layer 0) two
    modality-isolated MoE blocks of E = moe_num_experts experts and top-k = moe_k each: `text_moe`
    (experts of moe_intermediate_size[0]) for text tokens and `vision_moe` (experts of
    moe_intermediate_size[1]) for image / video tokens, each with a softmax router [E, D] and a
    counted correction bias [1, E] (`moe_statics`); shared experts of
    moe_intermediate_size[0] * moe_num_shared_experts. Original checkpoints store both expert sets as
    one list of 2E (`mlp.experts.N`, vision from N = E), the routers as `gate.weight` / `weight_1`
    and both biases in one [2, E]: the vision experts count as routed experts, and
    `modality_experts` keeps them out of the active count (per text token)."""
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n = cfg.int("num_hidden_layers", min_value=1)
    tie = common.tie_embeddings(cfg, True)
    heads, kv_heads, hd = common.attention_dims(cfg, d)
    bias = cfg.bool("use_bias", False)
    E, k = cfg.int("moe_num_experts", 64, min_value=1), cfg.int("moe_k", 6, min_value=1)
    widths = cfg.int_list("moe_intermediate_size", [1536, 512])
    if len(widths) != 2 or min(widths) < 1:
        raise BadConfig(f"{cfg.where}: moe_intermediate_size must be [text expert width, vision expert width], got {widths}")
    F, Fv = widths
    shared = cfg.int("moe_num_shared_experts", 2)
    mlp = _types(cfg, "mlp_layer_types", n, ["dense"] + ["sparse"] * (n - 1))
    moe = MoESpec(num_experts=E, top_k=k, expert_ffn=F, num_shared_experts=shared, shared_ffn=F * shared,
                  activation=cfg.str("hidden_act", "silu"), router=RouterSpec(correction_bias=True))
    inv = Inventory()
    layers = []
    for i in range(n):
        is_moe = mlp[i] == "sparse"
        inv.gqa(i, d, heads, kv_heads, hd, qkv_bias=bias, o_bias=bias)
        inv.norm(f"layers.{i}.input_norm", d, i)
        inv.norm(f"layers.{i}.post_attention_norm", d, i)
        if is_moe:
            for name, width in (("text_moe", F), ("vision_moe", Fv)):
                inv.linear(f"layers.{i}.{name}.router", "router", E, d, i)
                inv.add(f"layers.{i}.{name}.moe_statics.e_score_correction_bias", "router", (1, E), i)
                inv.swiglu(f"layers.{i}.{name}.experts", "routed_experts", d, width, i, copies=E)
            if shared:
                inv.swiglu(f"layers.{i}.shared_experts", "shared_experts", d, F * shared, i, bias=bias)
        else:
            inv.swiglu(f"layers.{i}.mlp", "dense_mlp", d, cfg.int("intermediate_size", min_value=1), i, bias=bias)
        layers.append(common.gqa_layer(i, heads, kv_heads, hd, is_moe))
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family="ernie4_5_vl_moe", hidden_size=d, vocab_size=vocab, num_layers=n,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg),
                     modality_experts=E * 3 * d * Fv,
                     notes=("ERNIE-4.5-VL: routed_experts holds the text and the vision experts of every MoE layer; "
                            "active parameters are per text token (k text experts, no vision expert)",))


def ernie4_5_vl_vision(inv: Inventory, v: Cfg, text_d: int, top: Cfg) -> None:
    """ERNIE-4.5-VL vision tower: a linear patch embedding [h, C*p*p] (no bias), LayerNorm blocks
    with a fused qkv, proj and an MLP fc1 / fc2 of intermediate_size (all biased), a final
    LayerNorm; then the resampler: spatial (S -> S -> S) and temporal (S*tm -> S -> S) MLPs with
    a LayerNorm each, for S = h * merge^2, a linear [text D, S] and an RMSNorm [text D]."""
    from . import multimodal as mm  # its tower pieces (multimodal imports this module: import at call time)

    h, f = v.int("hidden_size", 1280, min_value=1), v.int("intermediate_size", 4 * 1280, min_value=1)
    p = v.int("patch_size", 14, min_value=1)
    mm._lin(inv, "vision_tower.patch_embed.proj", h, v.int("in_channels", 3, min_value=1) * p * p, False)
    for i in range(v.int("depth", 32, min_value=0)):
        b = f"vision_tower.blocks.{i}"
        mm._norm(inv, f"{b}.norm1", h), mm._norm(inv, f"{b}.norm2", h)
        mm._lin(inv, f"{b}.attn.qkv", 3 * h, h), mm._lin(inv, f"{b}.attn.proj", h, h)
        mm._lin(inv, f"{b}.mlp.fc1", f, h), mm._lin(inv, f"{b}.mlp.fc2", h, f)
    mm._norm(inv, "vision_tower.ln", h)
    S = h * v.int("spatial_merge_size", 2, min_value=1) ** 2
    for name, inp in (("spatial_linear", S), ("temporal_linear", S * v.int("temporal_merge_size", 2, min_value=1))):
        mm._lin(inv, f"resampler_model.{name}.fc1", S, inp), mm._lin(inv, f"resampler_model.{name}.fc2", S, S)
        mm._norm(inv, f"resampler_model.{name}.ln", S)
    mm._lin(inv, "resampler_model.mlp", text_d, S)
    mm._norm(inv, "resampler_model.after_norm", text_d, bias=False)


def register(table: dict) -> None:
    table["glm5_next_text"] = glm5_next_text
    table["ernie4_5_vl_moe_text"] = ernie4_5_vl_moe_text
