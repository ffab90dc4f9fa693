"""Text models (and towers) of the multimodal MoE families that had only the generic header count
(issue 11, session 3): GLM-5.3-Flash (glm5_next), ERNIE-4.5-VL-MoE (ernie4_5_vl_moe), Muse Spark
(muse_spark), Unlimited-OCR (unlimited_ocr), DeepSeek-OCR-2 (deepseek_ocr2) and NeMo SpeechLM (nemo_speechlm). Each is counted
whole as multimodal.FAMILIES describes: the text adapter here on `text_config`, the towers as
their own `vision` / `audio` groups. `trace` runs the language model of those named in
forward/config.py MULTIMODAL_FORWARD on text-only input (tests/test_trace_mm_gap.py).

One text adapter per family (also registered under the text config's model_type) and its tower builders
(signature multimodal.Tower); each docstring lists the tensors transformers builds. Families whose
stored names differ from transformers' (ERNIE-4.5-VL's fused expert list, DeepSeek-OCR's and
NeMo's original prefixes) are placed by the rules in moetool/names.py.
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
    """GLM-5.3-Flash text (Glm5NextTextModel), per `layer_types`:
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
      unweighted mean (no parameters)."""
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


def muse_spark_text(cfg: Cfg, model_type: str = "muse_spark_text") -> ModelSpec:
    """Muse Spark text model (MuseSparkTextModel): GQA attention (biases with `attention_bias`) with
    an output gate gate_proj [H*Dh, D] and scaleless QK / output norms; centred RMSNorms before
    attention and FFN, a scaled one after the FFN, and two residual gates [D] per layer (counted
    with the norms). MoE per `mlp_layer_types` (default: every layer): a sigmoid router [E, D]
    with correction bias (a buffer), then the experts run in a space of `moe_hidden_size` Hm:
    pre_expert_proj [Hm, D] and its norm [Hm], experts gate_up [2F, Hm] / down [Hm, F], a shared
    post-expert norm [Hm] (a norm, not an expert) and post_expert_proj [D, Hm] (both projections
    run for every token: dense MLP). transformers never ties the LM head (no tied-weights key)."""
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n = cfg.int("num_hidden_layers", min_value=1)
    heads, kv_heads, hd = common.attention_dims(cfg, d)
    bias = cfg.bool("attention_bias", False)
    E, k = cfg.int("num_local_experts", 256, min_value=1), cfg.int("num_experts_per_tok", 8, min_value=1)
    F, Hm = cfg.int("moe_intermediate_size", 4096, min_value=1), cfg.int("moe_hidden_size", 4096, min_value=1)
    mlp = _types(cfg, "mlp_layer_types", n, ["sparse"] * n)
    # sliding layers keep `sliding_window`; the default: full attention on every 4th layer counted from the last
    windows = [cfg.int("sliding_window", 2048) or None if t == "sliding_attention" else None for t in _types(
        cfg, "layer_types", n, ["full_attention" if (n - 1 - i) % 4 == 0 else "sliding_attention" for i in range(n)])]
    moe = MoESpec(num_experts=E, top_k=k, expert_ffn=F, activation=cfg.str("hidden_act", "silu"),
                  router=RouterSpec(scoring="sigmoid", routed_scaling_factor=cfg.float("routed_scaling_factor", 1.0),
                                    topk_method="noaux_tc", correction_bias=True, norm_eps=1e-15))
    inv = Inventory()
    layers = []
    for i in range(n):
        is_moe = mlp[i] == "sparse"
        inv.gqa(i, d, heads, kv_heads, hd, qkv_bias=bias, o_bias=bias)
        inv.linear(f"layers.{i}.attn.gate_proj", "attention", heads * hd, d, i)
        for norm in ("input_norm", "pre_feedforward_norm", "post_feedforward_norm", "post_attention_residual_gate",
                     "post_feedforward_residual_gate"):
            inv.norm(f"layers.{i}.{norm}", d, i)
        if is_moe:
            inv.linear(f"layers.{i}.router", "router", E, d, i)
            inv.linear(f"layers.{i}.pre_expert_proj", "dense_mlp", Hm, d, i)
            inv.norm(f"layers.{i}.pre_expert_norm", Hm, i)
            inv.swiglu(f"layers.{i}.experts", "routed_experts", Hm, F, i, copies=E)
            inv.norm(f"layers.{i}.experts.post_expert_norm", Hm, i)
            inv.linear(f"layers.{i}.post_expert_proj", "dense_mlp", d, Hm, i)
        else:
            inv.swiglu(f"layers.{i}.mlp", "dense_mlp", d, cfg.int("intermediate_size", min_value=1), i)
        layers.append(common.gqa_layer(i, heads, kv_heads, hd, is_moe, windows[i]))
    common.embed_and_head(inv, cfg, vocab, d, tie=False)
    return ModelSpec(model_type=model_type, family="muse_spark", hidden_size=d, vocab_size=vocab, num_layers=n,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=False,
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def muse_spark_vision(inv: Inventory, v: Cfg, text_d: int, top: Cfg) -> None:
    """Muse Spark vision tower: a linear patch embedding [h, temporal*3*p^2] (no bias), a position
    table [pos_emb_height * pos_emb_width, h], LayerNorm blocks with biased q / k / v / proj and an
    MLP fc1 / fc2 of intermediate_size, LayerNorms before and after; then the adapter (fc1
    [P, out_hidden_size], fc2 [P, P], no biases) and the projection [text D, P]."""
    from . import multimodal as mm  # its tower pieces (multimodal imports this module: import at call time)

    h, f = v.int("hidden_size", 1536, min_value=1), v.int("intermediate_size", 8960, min_value=1)
    p = v.int("patch_size", 14, min_value=1)
    mm._lin(inv, "vision_tower.patch_embedder.patch_embedding", h, v.int("patch_temporal", 2, min_value=1) * 3 * p * p,
            False)
    inv.add("vision_tower.patch_embedder.position_embedding_table.weight", "vision",
            (v.int("pos_emb_height", 32, min_value=1) * v.int("pos_emb_width", 32, min_value=1), h))
    mm._norm(inv, "vision_tower.ln_pre", h), mm._norm(inv, "vision_tower.ln_post", h)
    for i in range(v.int("num_hidden_layers", 50, min_value=0)):
        b = f"vision_tower.layers.{i}"
        mm._norm(inv, f"{b}.norm1", h), mm._norm(inv, f"{b}.norm2", h)
        for proj in ("q_proj", "k_proj", "v_proj", "proj"):
            mm._lin(inv, f"{b}.attn.{proj}", h, h)
        mm._lin(inv, f"{b}.mlp.fc1", f, h), mm._lin(inv, f"{b}.mlp.fc2", h, f)
    P = top.int("projector_hidden_size", 4096, min_value=1)
    mm._lin(inv, "vision_adapter.fc1", P, top.int("out_hidden_size", 6144, min_value=1), False)
    mm._lin(inv, "vision_adapter.fc2", P, P, False)
    mm._lin(inv, "vision_projection", text_d, P, False)


def muse_spark_audio(inv: Inventory, a: Cfg, text_d: int, top: Cfg) -> None:
    """Muse Spark waveform audio encoder (group "audio"): per stage i a patch embedding [hs_i,
    in * patch_i] (bias; in = 1 for the waveform, else hs_{i-1}) with an RMSNorm, and depths_i
    blocks of a depthwise causal Conv1d [hs_i, 1, K] (bias), an RMSNorm and an MLP of
    int(hs_i * mlp_ratio) (biases); then an RMSNorm, proj [out, hs_last] (bias) and an RMSNorm."""
    from . import multimodal as mm  # its tower pieces (multimodal imports this module: import at call time)

    g = "audio"
    n = a.int("num_hidden_layers", 4, min_value=0)
    hs, depths, patches = (a.int_list("hidden_sizes", [256, 512, 1024, 2048]), a.int_list("depths", [2, 2, 2, 2]),
                           a.int_list("patch_sizes", [16, 6, 5, 4]))
    if min(len(hs), len(depths), len(patches)) < n or not hs:
        raise BadConfig(f"{a.where}: hidden_sizes, depths and patch_sizes need one entry per stage ({n})")
    K, ratio = a.int("conv_kernel_size", 7, min_value=1), a.float("mlp_ratio", 4.0)
    for i in range(n):
        h, b = hs[i], f"audio_tower.layers.{i}"
        mm._lin(inv, f"{b}.patch_embedder.proj", h, (1 if i == 0 else hs[i - 1]) * patches[i], group=g)
        mm._norm(inv, f"{b}.patch_embedder.norm", h, bias=False, group=g)
        for j in range(depths[i]):
            c = f"{b}.conv_blocks.{j}"
            mm._conv(inv, f"{c}.conv", h, 1, (K,), group=g)
            mm._norm(inv, f"{c}.norm", h, bias=False, group=g)
            mm._lin(inv, f"{c}.mlp.fc1", int(h * ratio), h, group=g), mm._lin(inv, f"{c}.mlp.fc2", h, int(h * ratio), group=g)
    out = a.int("out_hidden_size", 8192, min_value=1)
    mm._norm(inv, "audio_tower.norm", hs[-1], bias=False, group=g)
    mm._lin(inv, "audio_tower.proj", out, hs[-1], group=g)
    mm._norm(inv, "audio_tower.post_proj_norm", out, bias=False, group=g)


def unlimited_ocr_text(cfg: Cfg, model_type: str = "unlimited_ocr_text") -> ModelSpec:
    """Unlimited-OCR text model (UnlimitedOcrTextModel): DeepSeek-V2-Lite-like without MLA: GQA
    attention (biases with `attention_bias`; head_dim is always hidden_size / heads, the config
    overrides any other), dense MLP per `mlp_layer_types` (default: dense below
    first_k_dense_replace = 1) with `mlp_bias`, else a softmax router [E, D] (greedy or
    group-limited top-k, weights not renormalised), routed experts and shared experts of
    moe_intermediate_size * n_shared_experts. Attention is "reference sliding window": every
    prefill token stays cached, only decoded tokens past `sliding_window` are evicted; the KV cache
    is counted as full attention (exact when the context is the prompt)."""
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n = cfg.int("num_hidden_layers", min_value=1)
    tie = common.tie_embeddings(cfg)
    heads = cfg.int("num_attention_heads", min_value=1)
    kv_heads = cfg.int("num_key_value_heads", heads, min_value=1)
    if d % heads:
        raise BadConfig(f"{cfg.where}: hidden_size {d} is not a multiple of num_attention_heads {heads}")
    hd = d // heads
    bias, mlp_bias = cfg.bool("attention_bias", False), cfg.bool("mlp_bias", False)
    E = cfg.first_int(["n_routed_experts", "num_experts"], 64, min_value=1)
    F, shared = cfg.int("moe_intermediate_size", 896, min_value=1), cfg.int("n_shared_experts", 2)
    k_dense = cfg.int("first_k_dense_replace", 1)
    mlp = _types(cfg, "mlp_layer_types", n, ["sparse" if i >= k_dense else "dense" for i in range(n)])
    moe = MoESpec(num_experts=E, top_k=cfg.int("num_experts_per_tok", 6, min_value=1), expert_ffn=F,
                  num_shared_experts=shared, shared_ffn=F * shared, activation=cfg.str("hidden_act", "silu"),
                  router=RouterSpec(norm_topk_prob=False, routed_scaling_factor=cfg.float("routed_scaling_factor", 1.0),
                                    topk_method=cfg.str("topk_method", "greedy"), n_group=cfg.int("n_group", 1, min_value=1),
                                    topk_group=cfg.int("topk_group", 1, min_value=1)))
    inv = Inventory()
    layers = []
    for i in range(n):
        is_moe = mlp[i] == "sparse"
        inv.gqa(i, d, heads, kv_heads, hd, qkv_bias=bias, o_bias=bias)
        inv.norm(f"layers.{i}.input_norm", d, i)
        inv.norm(f"layers.{i}.post_attention_norm", d, i)
        if is_moe:
            inv.linear(f"layers.{i}.router", "router", E, d, i)
            inv.swiglu(f"layers.{i}.experts", "routed_experts", d, F, i, copies=E)
            if shared:
                inv.swiglu(f"layers.{i}.shared_experts", "shared_experts", d, F * shared, i, bias=mlp_bias)
        else:
            inv.swiglu(f"layers.{i}.mlp", "dense_mlp", d, cfg.int("intermediate_size", min_value=1), i, bias=mlp_bias)
        layers.append(common.gqa_layer(i, heads, kv_heads, hd, is_moe))
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family="unlimited_ocr", hidden_size=d, vocab_size=vocab, num_layers=n,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg),
                     notes=("Unlimited-OCR: reference sliding-window attention keeps every prefill token cached "
                            "(only decoded tokens past sliding_window are evicted): the KV cache is counted in full",))


def _sam_encoder(inv: Inventory, s: Cfg, mlp_dim: int | None, downsample: list[int]) -> list[int]:
    """DeepSeek-OCR's SAM ViT-B encoder (`sam_config`, group "vision"; Unlimited-OCR and DeepSeek-OCR-2):
    Conv2d patches, absolute positions [1, I/p, I/p, h], blocks with a fused qkv, relative positions
    [2s-1, h/heads] for height and width, s = window_size or I/p on `global_attn_indexes`, LayerNorms,
    MLP of mlp_dim; the neck (1x1 and 3x3 convolutions with channel LayerNorms) and two stride-2 3x3
    downsamples. `mlp_dim` / `downsample` are the family's defaults (mlp_dim None: hidden_size *
    mlp_ratio). Returns downsample_channels."""
    from . import multimodal as mm  # its tower pieces (multimodal imports this module: import at call time)

    h, heads = s.int("hidden_size", 768, min_value=1), s.int("num_attention_heads", 12, min_value=1)
    grid = s.int("image_size", 1024, min_value=1) // s.int("patch_size", 16, min_value=1)
    p = s.int("patch_size", 16, min_value=1)
    sam = "vision_tower.sam_encoder"
    mm._conv(inv, f"{sam}.patch_embed.projection", h, s.int("num_channels", 3, min_value=1), (p, p))
    if s.bool("use_abs_pos", True):
        inv.add(f"{sam}.pos_embed", "vision", (1, grid, grid, h))
    window, global_ = s.int("window_size", 14), set(s.int_list("global_attn_indexes", [2, 5, 8, 11]))
    f = s.int("mlp_dim", int(h * s.float("mlp_ratio", 4.0)) if mlp_dim is None else mlp_dim, min_value=1)
    for i in range(s.int("num_hidden_layers", 12, min_value=0)):
        b = f"{sam}.layers.{i}"
        mm._norm(inv, f"{b}.layer_norm1", h), mm._norm(inv, f"{b}.layer_norm2", h)
        mm._lin(inv, f"{b}.attn.qkv", 3 * h, h, s.bool("qkv_bias", True)), mm._lin(inv, f"{b}.attn.proj", h, h)
        if s.bool("use_rel_pos", True):
            size = grid if (i in global_ or window == 0) else window
            inv.add(f"{b}.attn.rel_pos_h", "vision", (2 * size - 1, h // heads))
            inv.add(f"{b}.attn.rel_pos_w", "vision", (2 * size - 1, h // heads))
        mm._lin(inv, f"{b}.mlp.lin1", f, h), mm._lin(inv, f"{b}.mlp.lin2", h, f)
    oc, down = s.int("output_channels", 256, min_value=1), s.int_list("downsample_channels", downsample)
    if len(down) != 2:
        raise BadConfig(f"{s.where}: downsample_channels must have 2 entries, got {down}")
    mm._conv(inv, f"{sam}.neck.conv1", oc, h, (1, 1), bias=False), mm._norm(inv, f"{sam}.neck.layer_norm1", oc)
    mm._conv(inv, f"{sam}.neck.conv2", oc, oc, (3, 3), bias=False), mm._norm(inv, f"{sam}.neck.layer_norm2", oc)
    mm._conv(inv, f"{sam}.proj.conv1", down[0], oc, (3, 3), bias=False)
    mm._conv(inv, f"{sam}.proj.conv2", down[1], down[0], (3, 3), bias=False)
    return down


def unlimited_ocr_vision(inv: Inventory, v: Cfg, text_d: int, top: Cfg) -> None:
    """Unlimited-OCR vision (DeepSeek-OCR's): a SAM ViT-B encoder (`sam_config`: Conv2d patches,
    absolute positions [1, I/p, I/p, h], blocks with a fused qkv, relative positions [2s-1, h/heads]
    for height and width, s = window_size or I/p on `global_attn_indexes`, LayerNorms, MLP of
    mlp_dim; the neck: 1x1 and 3x3 convolutions with channel LayerNorms; two stride-2 3x3
    downsamples), a CLIP encoder (`encoder_config`: class embedding, positions [(I/p)^2 + 1, h],
    pre-LayerNorm, biased q/k/v/out and fc1/fc2, no patch embedding: it reads SAM's output); then
    the projector [text D, downsample_channels[-1] + h] (bias) and two learned vectors [text D]
    (image_newline, view_separator)."""
    from . import multimodal as mm  # its tower pieces (multimodal imports this module: import at call time)

    down = _sam_encoder(inv, v.sub("sam_config"), 3072, [512, 1024])
    e = v.sub("encoder_config")
    eh, ef = e.int("hidden_size", 1024, min_value=1), e.int("intermediate_size", 4096, min_value=1)
    clip = "vision_tower.vision_encoder"
    inv.add(f"{clip}.embeddings.class_embedding", "vision", (eh,))
    positions = (e.int("image_size", 224, min_value=1) // e.int("patch_size", 14, min_value=1)) ** 2 + 1
    inv.add(f"{clip}.embeddings.position_embedding.weight", "vision", (positions, eh))
    mm._norm(inv, f"{clip}.pre_layrnorm", eh)
    for i in range(e.int("num_hidden_layers", 24, min_value=0)):
        b = f"{clip}.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            mm._lin(inv, f"{b}.self_attn.{proj}", eh, eh)
        mm._norm(inv, f"{b}.layer_norm1", eh), mm._norm(inv, f"{b}.layer_norm2", eh)
        mm._lin(inv, f"{b}.mlp.fc1", ef, eh), mm._lin(inv, f"{b}.mlp.fc2", eh, ef)
    mm._lin(inv, "multi_modal_projector", text_d, down[1] + eh)
    inv.add("image_newline", "vision", (text_d,)), inv.add("view_separator", "vision", (text_d,))


def nemo_speechlm_text(cfg: Cfg, model_type: str = "nemotron_h") -> ModelSpec:
    """NeMo SpeechLM's language model: Nemotron-H (arch/nemotron_h.py). transformers never ties its
    LM head (Nemotron3_5TranscribeForConditionalGeneration has no tied-weights key)."""
    from . import nemotron_h

    return nemotron_h.adapt(Cfg({**cfg.d, "tie_word_embeddings": False}, cfg.where), model_type)


def _nemo_encoder(inv: Inventory, c: Cfg, prefix: str, qk_norm: bool, stacking: bool = True) -> int:
    """A Nemotron-3.5 audio encoder (group "audio"): with `stacking`, stacked mel frames projected
    [h, sf * mel] (no bias); a LayerNorm, layers of q [H*Dh, h], k [Hkv*Dh, h], v [H*Dh, h] (no biases), o [h, H*Dh]
    with bias, LayerNorm QK-norms [Dh] (`qk_norm`), two LayerNorms and an MLP fc1 / fc2 with
    biases, a final LayerNorm. Returns h."""
    from . import multimodal as mm  # its tower pieces (multimodal imports this module: import at call time)

    g = "audio"
    h, heads = c.int("hidden_size", 1280, min_value=1), c.int("num_attention_heads", 10, min_value=1)
    kv, hd = c.int("num_key_value_heads", heads, min_value=1), c.int("head_dim", h // heads, min_value=1)
    f = c.int("intermediate_size", 4 * h, min_value=1)
    if stacking:
        mm._lin(inv, f"{prefix}.embedder.projection", h,
                c.int("subsampling_factor", 8, min_value=1) * c.int("num_mel_bins", 128, min_value=1), False, group=g)
    mm._norm(inv, f"{prefix}.input_layer_norm", h, group=g), mm._norm(inv, f"{prefix}.layer_norm", h, group=g)
    for i in range(c.int("num_hidden_layers", 32, min_value=0)):
        b = f"{prefix}.layers.{i}"
        for proj, out in (("q", heads * hd), ("k", kv * hd), ("v", heads * hd)):
            mm._lin(inv, f"{b}.self_attn.{proj}_proj", out, h, False, group=g)
        mm._lin(inv, f"{b}.self_attn.o_proj", h, heads * hd, group=g)
        if qk_norm:
            mm._norm(inv, f"{b}.self_attn.q_norm", hd, group=g), mm._norm(inv, f"{b}.self_attn.k_norm", hd, group=g)
        mm._norm(inv, f"{b}.layer_norm1", h, group=g), mm._norm(inv, f"{b}.layer_norm2", h, group=g)
        mm._lin(inv, f"{b}.mlp.fc1", f, h, group=g), mm._lin(inv, f"{b}.mlp.fc2", h, f, group=g)
    return h


def nemo_speechlm_audio(inv: Inventory, a: Cfg, text_d: int, top: Cfg) -> None:
    """NeMo SpeechLM (Nemotron-3.5 Transcribe) audio tower, group "audio": the ASR encoder
    (`asr_config`, with QK-norms), the Sortformer diarization model (`diarization_config`: its
    encoder without QK-norms, proj [hc, h], a sub-pixel upsampling Conv1d [hc*sf, hc, 3], the
    classifier dense [hc, hc] and out_proj [speakers, hc], all biased, and a silence embedding
    [h]), LayerNorms over the ASR output and the speaker activities, and the projector to the text
    model [text D, h] (bias; stored as perception.proj)."""
    from . import multimodal as mm  # its tower pieces (multimodal imports this module: import at call time)

    g = "audio"
    h = _nemo_encoder(inv, a.sub("asr_config"), "audio_tower.asr_encoder", qk_norm=True)
    dz = a.sub("diarization_config")
    dh = _nemo_encoder(inv, dz.sub("audio_config"), "audio_tower.diarization_model.model.audio_tower", qk_norm=False)
    head = dz.sub("head_config")
    hc, speakers = head.int("hidden_size", 192, min_value=1), head.int("num_speakers", 8, min_value=1)
    d = "audio_tower.diarization_model"
    mm._lin(inv, f"{d}.model.proj", hc, head.int("audio_hidden_size", dh, min_value=1), group=g)
    mm._conv(inv, f"{d}.model.upsampler.conv", hc * head.int("subsampling_factor", 8, min_value=1), hc, (3,), group=g)
    mm._lin(inv, f"{d}.classifier.dense", hc, hc, group=g), mm._lin(inv, f"{d}.classifier.out_proj", speakers, hc, group=g)
    inv.add(f"{d}.silence_embeds", g, (dh,))
    mm._norm(inv, "audio_tower.asr_norm", h, group=g), mm._norm(inv, "audio_tower.speaker_norm", speakers, group=g)
    mm._lin(inv, "audio_projector", text_d, h, group=g)


def nemo_speechlm_word_timestamps(inv: Inventory, w: Cfg, text_d: int, top: Cfg) -> None:
    """NeMo SpeechLM's word-timestamp encoder and head (group "audio"): a ConvTranspose1d upsampler
    [h, h, upsampling_factor] (bias), the ASR encoder's layers (QK-norms) between two LayerNorms,
    and the CTC head, a Conv1d [vocab, h, 1] with bias."""
    from . import multimodal as mm  # its tower pieces (multimodal imports this module: import at call time)

    g, p = "audio", "word_timestamp_encoder"
    h = w.int("hidden_size", 1280, min_value=1)
    mm._conv(inv, f"{p}.upsampler", h, h, (w.int("upsampling_factor", 2, min_value=1),), group=g)
    _nemo_encoder(inv, w, p, qk_norm=True, stacking=False)  # its input is the ASR encoder's output
    mm._conv(inv, "word_timestamp_head", w.int("vocab_size", 23863, min_value=1), h, (1,), group=g)


def deepseek_ocr2_text(cfg: Cfg, model_type: str = "deepseek_ocr2_text") -> ModelSpec:
    """DeepSeek-OCR-2 text model (DeepseekOcr2TextModel): transformers' modules are Unlimited-OCR's
    text modules (GQA attention, head_dim = hidden_size / heads; dense MLP or softmax router, routed
    and shared experts per `mlp_layer_types`), with plain causal attention (no reference sliding
    window): counted by unlimited_ocr_text. DeepseekOcr2TextConfig has no default for
    `mlp_layer_types` (transformers 5.23 cannot build a config without it) nor for
    num_experts_per_tok: absent, they are read as DeepSeek-OCR's (dense below
    first_k_dense_replace = 1, top-6) and a note says so."""
    spec = unlimited_ocr_text(cfg, model_type)
    notes = ()
    if cfg.raw("mlp_layer_types") is None:
        notes += ("DeepSeek-OCR-2: the config has no mlp_layer_types (transformers cannot build it so); counted "
                  f"dense below first_k_dense_replace = {cfg.int('first_k_dense_replace', 1)}, sparse above, as DeepSeek-OCR",)
    if cfg.raw("num_experts_per_tok") is None:
        notes += ("DeepSeek-OCR-2: the config has no num_experts_per_tok; active parameters assume top-6, as DeepSeek-OCR",)
    return replace(spec, family="deepseek_ocr2", notes=notes)


def deepseek_ocr2_vision(inv: Inventory, v: Cfg, text_d: int, top: Cfg) -> None:
    """DeepSeek-OCR-2 vision (DeepseekOcr2VisionModel), group "vision": the SAM encoder
    (`sam_config`, _sam_encoder; mlp_dim defaults to hidden_size * mlp_ratio, downsample_channels
    to [512, 896]), a Qwen2-style decoder over SAM's patches and learned queries (`encoder_config`:
    layers of q/k/v [H*Dh, h] with biases, o [h, H*Dh] without, Dh = h / heads, two RMSNorms, a
    SwiGLU MLP without biases; a final RMSNorm; no token embedding), the two query tables
    query_768_resolution [144, h] and query_1024_resolution [256, h]; then the projector
    [text D, h] (bias) and view_separator [text D]."""
    from . import multimodal as mm  # its tower pieces (multimodal imports this module: import at call time)

    _sam_encoder(inv, v.sub("sam_config"), None, [512, 896])
    e = v.sub("encoder_config")
    eh, ef = e.int("hidden_size", 4096, min_value=1), e.int("intermediate_size", 22016, min_value=1)
    heads = e.int("num_attention_heads", 32, min_value=1)
    kv, hd = e.int("num_key_value_heads", heads, min_value=1), eh // heads
    enc = "vision_tower.vision_encoder"
    for i in range(e.int("num_hidden_layers", 32, min_value=0)):
        b = f"{enc}.layers.{i}"
        for proj, out in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            mm._lin(inv, f"{b}.self_attn.{proj}", out, eh)
        mm._lin(inv, f"{b}.self_attn.o_proj", eh, heads * hd, bias=False)
        mm._norm(inv, f"{b}.input_layernorm", eh, bias=False), mm._norm(inv, f"{b}.post_attention_layernorm", eh, bias=False)
        for proj in ("gate_proj", "up_proj"):
            mm._lin(inv, f"{b}.mlp.{proj}", ef, eh, bias=False)
        mm._lin(inv, f"{b}.mlp.down_proj", eh, ef, bias=False)
    mm._norm(inv, f"{enc}.norm", eh, bias=False)
    inv.add("vision_tower.query_768_resolution.weight", "vision", (144, eh))
    inv.add("vision_tower.query_1024_resolution.weight", "vision", (256, eh))
    mm._lin(inv, "multi_modal_projector", text_d, eh)
    inv.add("view_separator", "vision", (text_d,))


def register(table: dict) -> None:
    table["glm5_next_text"] = glm5_next_text
    table["ernie4_5_vl_moe_text"] = ernie4_5_vl_moe_text
    table["muse_spark_text"] = muse_spark_text
    table["unlimited_ocr_text"] = unlimited_ocr_text
    table["deepseek_ocr2_text"] = deepseek_ocr2_text
