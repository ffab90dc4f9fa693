"""Multimodal MoE models counted whole: the MoE language model (an existing text adapter run on
`text_config`) plus the vision / audio towers as their own groups, as transformers'
`*ForConditionalGeneration` builds them. One `Tower` builder per tower kind; a family is then
one line in `FAMILIES`: (text adapter, its model_type, the towers, the LM head's tie default).

Tying follows the top-level config (transformers ties through the top-level
`tie_word_embeddings`, not the text config's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ..errors import BadConfig, UnsupportedArchitecture
from ..spec import Cfg, Inventory, ModelSpec, RouterSpec
from . import common, deepseek, dots3, inkling, llama_like, mistral_large4, mm_gap, qwen4_exp


def _conv(inv: Inventory, name: str, out: int, inp: int, kernel: tuple[int, ...], bias: bool = True,
          group: str = "vision") -> None:
    inv.add(f"{name}.weight", group, (out, inp, *kernel))
    if bias:
        inv.add(f"{name}.bias", group, (out,))


def _lin(inv: Inventory, name: str, out: int, inp: int, bias: bool = True, group: str = "vision") -> None:
    inv.add(f"{name}.weight", group, (out, inp), matmul=True)
    if bias:
        inv.add(f"{name}.bias", group, (out,))


def _norm(inv: Inventory, name: str, dim: int, bias: bool = True, group: str = "vision") -> None:
    inv.add(f"{name}.weight", group, (dim,))
    if bias:
        inv.add(f"{name}.bias", group, (dim,))


def qwen3_vl_vision(inv: Inventory, v: Cfg, text_d: int, top: Cfg) -> None:
    """Qwen3-VL vision tower: Conv3d patches, learned positions, ViT blocks (LayerNorm, fused qkv,
    GELU MLP, all with biases), a patch merger and one DeepStack merger per `deepstack_visual_indexes`."""
    h, f = v.int("hidden_size", 1152, min_value=1), v.int("intermediate_size", 4304, min_value=1)
    p, t = v.int("patch_size", 16, min_value=1), v.int("temporal_patch_size", 2, min_value=1)
    m2 = v.int("spatial_merge_size", 2, min_value=1) ** 2
    out = v.int("out_hidden_size", 3584, min_value=1)
    _conv(inv, "visual.patch_embed", h, v.int("in_channels", 3, min_value=1), (t, p, p))
    inv.add("visual.pos_embed.weight", "vision", (v.int("num_position_embeddings", 2304, min_value=1), h))
    for i in range(v.int("depth", 27, min_value=0)):
        b = f"visual.blocks.{i}"
        _norm(inv, f"{b}.norm1", h), _norm(inv, f"{b}.norm2", h)
        _lin(inv, f"{b}.attn.qkv", 3 * h, h), _lin(inv, f"{b}.attn.proj", h, h)
        _lin(inv, f"{b}.mlp.fc1", f, h), _lin(inv, f"{b}.mlp.fc2", h, f)
    mergers = [("visual.merger", h)] + [(f"visual.deepstack.{j}", h * m2)
                                        for j in range(len(v.int_list("deepstack_visual_indexes", [8, 16, 24])))]
    for name, norm_dim in mergers:
        _norm(inv, f"{name}.norm", norm_dim)
        _lin(inv, f"{name}.fc1", h * m2, h * m2), _lin(inv, f"{name}.fc2", out, h * m2)


def qwen3_5_vision(inv: Inventory, v: Cfg, text_d: int, top: Cfg) -> None:
    """Qwen3.5 / Qwen4-Exp vision tower: Qwen3-VL's without DeepStack mergers."""
    qwen3_vl_vision(inv, Cfg({**v.d, "deepstack_visual_indexes": []}, v.where), text_d, top)


def glm4v_vision(inv: Inventory, v: Cfg, text_d: int, top: Cfg) -> None:
    """GLM-4.1V / GLM-4.5V vision tower: Conv3d patches, learned positions, RMSNorm blocks with a
    SwiGLU MLP of width `out_hidden_size`, a Conv2d downsample and a SwiGLU patch merger."""
    h, out = v.int("hidden_size", 1536, min_value=1), v.int("out_hidden_size", 4096, min_value=1)
    f = v.int("intermediate_size", 13696, min_value=1)
    p, t = v.int("patch_size", 14, min_value=1), v.int("temporal_patch_size", 2, min_value=1)
    m = v.int("spatial_merge_size", 2, min_value=1)
    bias = v.bool("attention_bias", False)
    inv.add("visual.embeddings.position_embedding.weight", "vision", ((v.int("image_size", 336) // p) ** 2, h))
    _conv(inv, "visual.patch_embed", h, v.int("in_channels", 3, min_value=1), (t, p, p))
    for i in range(v.int("depth", 24, min_value=0)):
        b = f"visual.blocks.{i}"
        _norm(inv, f"{b}.norm1", h, bias=False), _norm(inv, f"{b}.norm2", h, bias=False)
        _lin(inv, f"{b}.attn.qkv", 3 * h, h, bias), _lin(inv, f"{b}.attn.proj", h, h, False)
        for proj in ("gate", "up"):
            _lin(inv, f"{b}.mlp.{proj}", out, h, False)
        _lin(inv, f"{b}.mlp.down", h, out, False)
    _norm(inv, "visual.post_conv_layernorm", h, bias=False)
    _conv(inv, "visual.downsample", out, h, (m, m))
    _norm(inv, "visual.post_layernorm", h, bias=False)
    _lin(inv, "visual.merger.proj", out, out, False)
    _norm(inv, "visual.merger.post_projection_norm", out)
    _lin(inv, "visual.merger.gate", f, out, False), _lin(inv, "visual.merger.up", f, out, False)
    _lin(inv, "visual.merger.down", out, f, False)


def aria_vision(inv: Inventory, v: Cfg, text_d: int, top: Cfg) -> None:
    """Aria: an Idefics3 (SigLIP) vision encoder and Aria's cross-attention projector (learned
    queries attending to the patches, then a two-layer MLP to the text width)."""
    h, f = v.int("hidden_size", 1152, min_value=1), v.int("intermediate_size", 3072, min_value=1)
    p = v.int("patch_size", 32, min_value=1)
    _conv(inv, "vision_tower.patch_embedding", h, v.int("num_channels", 3, min_value=1), (p, p))
    inv.add("vision_tower.position_embedding.weight", "vision", ((v.int("image_size", 224) // p) ** 2, h))
    for i in range(v.int("num_hidden_layers", 12, min_value=0)):
        b = f"vision_tower.layers.{i}"
        for proj in ("q", "k", "v", "o"):
            _lin(inv, f"{b}.attn.{proj}", h, h)
        _norm(inv, f"{b}.norm1", h), _norm(inv, f"{b}.norm2", h)
        _lin(inv, f"{b}.fc1", f, h), _lin(inv, f"{b}.fc2", h, f)
    _norm(inv, "vision_tower.post_layernorm", h)
    queries = top.raw("max_value_projector_patch_to_query_dict")
    if queries is None:
        queries = max((int(x) for x in top.raw("projector_patch_to_query_dict", {1225: 128, 4900: 256}).values()), default=256)
    inv.add("projector.query", "vision", (int(queries), h))
    for proj in ("q", "k", "v"):
        _lin(inv, f"projector.cross_attn.{proj}", h, h, False)
    _lin(inv, "projector.cross_attn.in_proj", 3 * h, h)
    _lin(inv, "projector.cross_attn.out_proj", h, h)
    _lin(inv, "projector.cross_attn.linear", h, h)
    for n in ("cross_attn.layer_norm", "cross_attn.layer_norm_kv", "layer_norm"):
        _norm(inv, f"projector.{n}", h)
    _lin(inv, "projector.ff.linear_in", text_d, h, False), _lin(inv, "projector.ff.linear_out", text_d, text_d, False)


def minimax_m3_vision(inv: Inventory, v: Cfg, text_d: int, top: Cfg) -> None:
    """MiniMax-M3: a CLIP-style encoder on Conv3d patches (no bias) with a pre-LayerNorm, and a
    projector of two MLPs (per patch, and over merged patch groups) to the text width."""
    h, f = v.int("hidden_size", 1280, min_value=1), v.int("intermediate_size", 5120, min_value=1)
    p, t = v.int("patch_size", 14, min_value=1), v.int("temporal_patch_size", 2, min_value=1)
    _conv(inv, "vision_tower.proj", h, v.int("num_channels", 3, min_value=1), (t, p, p), bias=False)
    _norm(inv, "vision_tower.pre_layrnorm", h)
    for i in range(v.int("num_hidden_layers", 32, min_value=0)):
        b = f"vision_tower.layers.{i}"
        for proj in ("q", "k", "v", "o"):
            _lin(inv, f"{b}.attn.{proj}", h, h)
        _norm(inv, f"{b}.norm1", h), _norm(inv, f"{b}.norm2", h)
        _lin(inv, f"{b}.fc1", f, h), _lin(inv, f"{b}.fc2", h, f)
    ph = top.int("projector_hidden_size", 6144, min_value=1)
    merged = top.int("merged_hidden_size", text_d * v.int("spatial_merge_size", 2, min_value=1) ** 2, min_value=1)
    _lin(inv, "projector.linear_1", ph, h), _lin(inv, "projector.linear_2", text_d, ph)
    _lin(inv, "projector.merge_linear_1", ph, merged), _lin(inv, "projector.merge_linear_2", text_d, ph)


def qwen3_omni_audio(inv: Inventory, a: Cfg, text_d: int, top: Cfg) -> None:
    """Qwen3-Omni audio encoder (group "audio"): three stride-2 Conv2d over the mel spectrogram,
    a linear `conv_out` to d_model, Whisper-style layers (biases, LayerNorms), `ln_post` and a
    two-layer projection to `output_dim`. Positions are sinusoidal (no parameters)."""
    d, f = a.int("d_model", 1280, min_value=1), a.int("encoder_ffn_dim", 5120, min_value=1)
    c = a.int("downsample_hidden_size", 480, min_value=1)
    g = "audio"
    _conv(inv, "audio.conv2d1", c, 1, (3, 3), group=g)
    _conv(inv, "audio.conv2d2", c, c, (3, 3), group=g), _conv(inv, "audio.conv2d3", c, c, (3, 3), group=g)
    mel = a.int("num_mel_bins", 128, min_value=1)
    freq = (((mel + 1) // 2 + 1) // 2 + 1) // 2  # three stride-2, padding-1, kernel-3 convolutions
    _lin(inv, "audio.conv_out", d, c * freq, False, group=g)
    for i in range(a.int("encoder_layers", 32, min_value=0)):
        b = f"audio.layers.{i}"
        for proj in ("q", "k", "v", "o"):
            _lin(inv, f"{b}.attn.{proj}", d, d, group=g)
        _norm(inv, f"{b}.attn_norm", d, group=g), _norm(inv, f"{b}.final_norm", d, group=g)
        _lin(inv, f"{b}.fc1", f, d, group=g), _lin(inv, f"{b}.fc2", d, f, group=g)
    _norm(inv, "audio.ln_post", d, group=g)
    _lin(inv, "audio.proj1", d, d, group=g), _lin(inv, "audio.proj2", a.int("output_dim", 3584, min_value=1), d, group=g)


def step3p7_vision(inv: Inventory, v: Cfg, text_d: int, top: Cfg) -> None:
    """Step-3.7 vision tower: a SigLIP-style encoder (Conv2d patches without bias, learned positions,
    a pre-LayerNorm, blocks with LayerNorms, biased q/k/v/out and an MLP of int(h * mlp_ratio), and
    layer scales lambda_1 / lambda_2 [h]), two stride-2 Conv2d downsamplers (h -> 2h -> 4h) and the
    projector [text D, 4h] (bias with `projector_bias`)."""
    h = v.int("hidden_size", 1536, min_value=1)
    f = int(h * v.float("mlp_ratio", 8960 / 1536))  # Step3p7VisionConfig overrides intermediate_size with it
    p = v.int("patch_size", 14, min_value=1)
    _conv(inv, "vision_model.patch_embedding", h, v.int("num_channels", 3, min_value=1), (p, p), bias=False)
    inv.add("vision_model.position_embedding.weight", "vision", ((v.int("image_size", 728) // p) ** 2, h))
    _norm(inv, "vision_model.pre_layernorm", h)
    for i in range(v.int("num_hidden_layers", 47, min_value=0)):
        b = f"vision_model.layers.{i}"
        inv.add(f"{b}.lambda_1", "vision", (h,)), inv.add(f"{b}.lambda_2", "vision", (h,))
        for proj in ("q", "k", "v", "out"):
            _lin(inv, f"{b}.attn.{proj}", h, h)
        _lin(inv, f"{b}.fc1", f, h), _lin(inv, f"{b}.fc2", h, f)
        _norm(inv, f"{b}.layernorm_before", h), _norm(inv, f"{b}.layernorm_after", h)
    _conv(inv, "vision_model.downsampler1", 2 * h, h, (3, 3))
    _conv(inv, "vision_model.downsampler2", 4 * h, 2 * h, (3, 3))
    _lin(inv, "multi_modal_projector", text_d, 4 * h, top.bool("projector_bias", False))


def inkling2_vision(inv: Inventory, v: Cfg, text_d: int, top: Cfg) -> None:
    """Inkling 2 vision tower: a linear patch embedding (no bias) of C x p x p pixels, learned grid
    positions [posemb_grid_size^2, h], a class embedding and its position [h], a pre-LayerNorm,
    blocks like Step-3.7's (LayerNorms, biased q/k/v/out, MLP of intermediate_size, else
    int(h * mlp_ratio), layer scales lambda_1 / lambda_2), and the merger: [P, h * merge^2] then
    [text D, P] (biases with `projector_bias`)."""
    h, p = v.int("hidden_size", 1024, min_value=1), v.int("patch_size", 20, min_value=1)
    f = v.int("intermediate_size") if v.has("intermediate_size") else int(h * v.float("mlp_ratio", 4.0))
    _lin(inv, "vision_tower.embeddings.patch_embedding", h, v.int("num_channels", 3, min_value=1) * p * p, bias=False)
    inv.add("vision_tower.embeddings.position_embedding.weight", "vision", (v.int("posemb_grid_size", 32) ** 2, h))
    inv.add("vision_tower.embeddings.class_embedding", "vision", (h,))
    inv.add("vision_tower.embeddings.cls_position_embedding", "vision", (h,))
    _norm(inv, "vision_tower.pre_layernorm", h)
    for i in range(v.int("num_hidden_layers", 23, min_value=0)):
        b = f"vision_tower.layers.{i}"
        inv.add(f"{b}.lambda_1", "vision", (h,)), inv.add(f"{b}.lambda_2", "vision", (h,))
        for proj in ("q", "k", "v", "out"):
            _lin(inv, f"{b}.attn.{proj}", h, h)
        _lin(inv, f"{b}.fc1", f, h), _lin(inv, f"{b}.fc2", h, f)
        _norm(inv, f"{b}.layernorm_before", h), _norm(inv, f"{b}.layernorm_after", h)
    P, bias = v.int("projection_hidden_dim", 4096, min_value=1), v.bool("projector_bias", False)
    _lin(inv, "vision_tower.merger.linear_1", P, h * v.int("spatial_merge_size", 2, min_value=1) ** 2, bias)
    _lin(inv, "vision_tower.merger.linear_2", v.int("text_hidden_size", text_d, min_value=1), P, bias)


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1 and p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out + ([n] if n > 1 else [])


TIE = 1e-4  # log-size distances closer than this are a tie (float32 noise in transformers' plan)


def inkling_vision_scales(temporal: int, patch: int, layers: int, channels: int) -> list[tuple[int, int, int, int]]:
    """transformers' inkling.plan_out_scales without torch: the (t, h, w, channels) grid after each of the
    `layers` projections of Inkling's hierarchical patch encoder (layers + 1 rows, the first the pixel).
    Candidate scales: the pixel; the patch's prime factors (largest first) folded into h and w, channels
    rounded up to 64; then the temporal factors (their channels h^2 * C * t * 64, as transformers has it).
    Each layer takes the candidate whose log size is nearest its share of log(patch^2 * t * C); with fewer
    layers than candidates, the assignment of distinct candidates of least total distance (scipy's
    linear_sum_assignment there; here every assignment is tried).
    Where two plans are equally near (ties in log size, common in the assignment: the first and last rows are
    overwritten after it), transformers' choice depends on float32 rounding or on scipy's solver: refused
    (UnsupportedArchitecture), so that a checkpoint gets its exact header count instead."""
    from itertools import accumulate, permutations
    import math
    import operator

    h = list(accumulate(_prime_factors(patch)[::-1], operator.mul))
    t = list(accumulate(_prime_factors(temporal)[::-1], operator.mul))
    if not h:
        raise BadConfig(f"inkling vision_config: patch_size must be at least 2, got {patch}")
    scales = [(1, 1, 1, channels)] + [(1, x, x, math.ceil(x * x * channels / 64) * 64) for x in h] \
        + [(x, h[-1], h[-1], h[-1] ** 2 * channels * x * 64) for x in t]
    logs = [math.log(a * b * c) for a, b, c, _ in scales]
    top = math.log(patch * patch * temporal * channels)
    cost = [[abs(top * i / layers - y) for y in logs] for i in range(layers + 1)]
    if layers >= len(scales):  # each layer its nearest candidate
        choices = [[j for j in range(len(scales)) if row[j] <= min(row) + TIE] for row in cost[1:-1]]
        plans = {tuple(c[0] for c in choices)} | {tuple(c[-1] for c in choices)}
    else:  # distinct candidates, least total distance
        if math.perm(len(scales), layers + 1) > 100_000:
            raise UnsupportedArchitecture(
                f"Inkling's vision encoder plan for patch {patch}, temporal patch {temporal}, {layers} layers has too many "
                "candidate assignments to search: count a checkpoint's headers")
        total = {p: sum(cost[i][j] for i, j in enumerate(p)) for p in permutations(range(len(scales)), layers + 1)}
        best = min(total.values())
        plans = {p[1:-1] for p, v in total.items() if v <= best + TIE}
    if len(plans) > 1:  # transformers' float32 rounding of torch.log decides between them
        raise UnsupportedArchitecture(
            f"Inkling's vision encoder plan for patch {patch}, temporal patch {temporal}, {layers} layers, {channels} "
            "channels ties in log size (transformers' float32 rounding picks one): count a checkpoint's headers")
    idx = [0, *plans.pop(), len(scales) - 1]
    return [scales[j] for j in idx]


def inkling_vision(inv: Inventory, v: Cfg, text_d: int, top: Cfg) -> None:
    """Inkling's vision tower (InklingVisionModel): n_layers bias-free projections, each after a fold of
    time and space into channels, on the grid inkling_vision_scales plans; an RMSNorm after every
    projection but the last, which maps to the text hidden size; a final RMSNorm [text D]."""
    n = v.first_int(["n_layers", "num_hidden_layers"], 24, min_value=1)
    scales = inkling_vision_scales(v.int("temporal_patch_size", 2, min_value=1), v.int("patch_size", 40, min_value=1), n,
                                   v.int("num_channels", 3, min_value=1))
    for i, (a, b) in enumerate(zip(scales, scales[1:])):
        fold = (b[0] // a[0]) * (b[1] // a[1]) * (b[2] // a[2])
        out = text_d if i == n - 1 else b[3]
        _lin(inv, f"vision_tower.encoder_layers.{i}.projection", out, a[3] * fold, bias=False)
        if i != n - 1:
            _norm(inv, f"vision_tower.encoder_layers.{i}.layer_norm", out, bias=False)
    _norm(inv, "vision_tower.final_norm", text_d, bias=False)


def inkling_audio(inv: Inventory, a: Cfg, text_d: int, top: Cfg) -> None:
    """Inkling's audio input (InklingAudioModel): one embedding row per (mel bin, quantised level),
    [n_mel_bins * mel_vocab_size, text D], summed over the bins of a frame, and an RMSNorm [text D]."""
    rows = a.int("n_mel_bins", 80, min_value=1) * a.int("mel_vocab_size", 256, min_value=1)
    inv.add("audio_tower.embed_audio_tokens.embed_audio_tokens.weight", "audio", (rows, text_d))
    _norm(inv, "audio_tower.norm", text_d, bias=False, group="audio")


def pixtral_vision(inv: Inventory, v: Cfg, text_d: int, top: Cfg) -> None:
    """Pixtral vision tower (Mistral-Large-4): Conv2d patches without bias, an RMSNorm before the
    blocks, RMSNorm blocks with bias-free q/k/v/o [h, h] and a SwiGLU of intermediate_size; then
    Mistral-3's projector: RMSNorm [h], the patch merger [h, h * merge^2] and two linears
    [D, h * feature layers], [D, D] (biases with `multimodal_projector_bias`)."""
    h, f = v.int("hidden_size", 1024, min_value=1), v.int("intermediate_size", 4096, min_value=1)
    p = v.int("patch_size", 16, min_value=1)
    _conv(inv, "vision_tower.patch_conv", h, v.int("num_channels", 3, min_value=1), (p, p), bias=False)
    _norm(inv, "vision_tower.ln_pre", h, bias=False)
    for i in range(v.int("num_hidden_layers", 24, min_value=0)):
        b = f"vision_tower.layers.{i}"
        _norm(inv, f"{b}.attention_norm", h, bias=False), _norm(inv, f"{b}.ffn_norm", h, bias=False)
        for proj in ("q", "k", "v", "o"):
            _lin(inv, f"{b}.attention.{proj}", h, h, bias=False)
        for proj, out, inp in (("gate", f, h), ("up", f, h), ("down", h, f)):
            _lin(inv, f"{b}.feed_forward.{proj}", out, inp, bias=False)
    layers = top.raw("vision_feature_layer", -1)
    bias = top.bool("multimodal_projector_bias", False)
    _norm(inv, "multi_modal_projector.norm", h, bias=False)
    _lin(inv, "multi_modal_projector.patch_merger", h, h * top.int("spatial_merge_size", 2, min_value=1) ** 2, bias=False)
    _lin(inv, "multi_modal_projector.linear_1", text_d, h * (len(layers) if isinstance(layers, list) else 1), bias)
    _lin(inv, "multi_modal_projector.linear_2", text_d, text_d, bias)


def dots3_vision(inv: Inventory, v: Cfg, text_d: int, top: Cfg) -> None:
    """dots3 vision tower (Dots3NoteVisionModel): Conv2d patches with bias and an RMSNorm, blocks of
    RMSNorms, fused qkv / proj (biases with attention_bias) and per-head q/k RMSNorms, then a SwiGLU
    (biases with mlp_bias) or, on `mlp_layer_types` "sparse" layers, routed experts (router [E, h],
    fused experts [E, 2F, h] / [E, h, F]; E and F per layer from `per_layer_config`, or from the
    original `pyramid_num_routed`); a final RMSNorm; the merger: LayerNorm [h], [h m^2, h m^2] and
    [adapter_out_dim, h m^2] with biases."""
    h, f = v.int("hidden_size", v.int("embed_dim", 1536), min_value=1), v.int("intermediate_size", 4224, min_value=1)
    heads = v.int("num_attention_heads", v.int("num_heads", 24), min_value=1)
    p, n = v.int("patch_size", 14, min_value=1), v.int("num_hidden_layers", 42, min_value=0)
    attn_bias, mlp_bias = v.bool("attention_bias", v.bool("use_bias", False)), v.bool("mlp_bias", False)
    types, per_layer = v.raw("mlp_layer_types"), dict(v.raw("per_layer_config") or {})
    if types is None:  # Dots3NoteVisionConfig: sparse layers and their expert counts from pyramid_num_routed
        routed = v.raw("pyramid_num_routed") or [-1] * 25 + list(range(4, 65, 4)) + [64]
        types = ["sparse" if c > 0 else "dense" for c in routed]
        per_layer = {str(i): {"num_local_experts": c} for i, c in enumerate(routed) if c > 0}
    if not isinstance(types, list) or len(types) < n:
        raise BadConfig(f"{v.where}: mlp_layer_types must give all {n} vision layers")
    _conv(inv, "vision_tower.patch_embed.proj", h, v.int("num_channels", 3, min_value=1), (p, p))
    _norm(inv, "vision_tower.patch_embed.norm", h, bias=False)
    for i in range(n):
        b = f"vision_tower.blocks.{i}"
        _norm(inv, f"{b}.norm1", h, bias=False), _norm(inv, f"{b}.norm2", h, bias=False)
        _lin(inv, f"{b}.attn.qkv", 3 * h, h, attn_bias), _lin(inv, f"{b}.attn.proj", h, h, attn_bias)
        _norm(inv, f"{b}.attn.q_norm", h // heads, bias=False), _norm(inv, f"{b}.attn.k_norm", h // heads, bias=False)
        if types[i] == "sparse":
            lc = Cfg({**v.d, **(per_layer.get(str(i)) or per_layer.get(i) or {})}, v.where)
            E, F = lc.int("num_local_experts", min_value=1), lc.int("moe_intermediate_size", 2112, min_value=1)
            _lin(inv, f"{b}.mlp.gate", E, h, bias=False)
            inv.add(f"{b}.mlp.experts.gate_up_proj", "vision", (E, 2 * F, h), matmul=True)
            inv.add(f"{b}.mlp.experts.down_proj", "vision", (E, h, F), matmul=True)
        else:
            for proj, out, inp in (("gate_proj", f, h), ("up_proj", f, h), ("down_proj", h, f)):
                _lin(inv, f"{b}.mlp.{proj}", out, inp, mlp_bias)
    _norm(inv, "vision_tower.norm", h, bias=False)
    m2 = v.int("spatial_merge_size", 2, min_value=1) ** 2
    _norm(inv, "vision_tower.merger.ln_q", h)
    _lin(inv, "vision_tower.merger.mlp.0", h * m2, h * m2)
    _lin(inv, "vision_tower.merger.mlp.2", v.int("adapter_out_dim", text_d, min_value=1), h * m2)


def dots3_audio(inv: Inventory, a: Cfg, text_d: int, top: Cfg) -> None:
    """dots3 audio tower (Dots3NoteAudioModel, group "audio"): three stride-2 Conv2d (1 -> c -> c -> c,
    3x3, biases) and a linear [h, c * ceil(mels / 8)] without bias; layers of RMSNorms, q / v / o with
    attention_bias, k [h, h] without bias, a fused SwiGLU gate_up [2I, h] and down [h, I] with biases;
    a final RMSNorm; the adapter: LayerNorm, [out, in] and [out, out] with biases."""
    legacy = a.raw("whisper_config")  # the released checkpoints' Whisper-style names
    if isinstance(legacy, dict):
        names = {"d_model": "hidden_size", "encoder_attention_heads": "num_attention_heads",
                 "encoder_layers": "num_hidden_layers", "encoder_ffn_dim": "intermediate_size", "num_mel_bins": "feature_size"}
        a = Cfg({**a.d, **{new: legacy[old] for old, new in names.items() if old in legacy}}, a.where)
    h, i_size = a.int("hidden_size", 1280, min_value=1), a.int("intermediate_size", 5120, min_value=1)
    heads = a.int("num_attention_heads", 20, min_value=1)
    kv, hd = heads, h // heads  # Dots3NoteAudioConfig sets both, whatever the config says
    c, mels = a.int("downsample_hidden_size", 480, min_value=1), a.int("feature_size", 128, min_value=1)
    conv_in = a.int("conv_output_size", c * ((mels + 7) // 8), min_value=1)  # a stored value wins, as in transformers
    bias = a.bool("attention_bias", True)
    for j, inp in enumerate((1, c, c)):
        _conv(inv, f"audio_tower.conv_stem.convs.{j}", c, inp, (3, 3), group="audio")
    _lin(inv, "audio_tower.conv_stem.conv_out", h, conv_in, bias=False, group="audio")
    for j in range(a.int("num_hidden_layers", 32, min_value=0)):
        b = f"audio_tower.layers.{j}"
        _lin(inv, f"{b}.self_attn.q_proj", heads * hd, h, bias, group="audio")
        _lin(inv, f"{b}.self_attn.k_proj", h, h, False, group="audio")
        _lin(inv, f"{b}.self_attn.v_proj", kv * hd, h, bias, group="audio")
        _lin(inv, f"{b}.self_attn.o_proj", h, heads * hd, bias, group="audio")
        _norm(inv, f"{b}.input_layernorm", h, bias=False, group="audio")
        _norm(inv, f"{b}.post_attention_layernorm", h, bias=False, group="audio")
        _lin(inv, f"{b}.mlp.gate_up_proj", 2 * i_size, h, group="audio")
        _lin(inv, f"{b}.mlp.down_proj", h, i_size, group="audio")
    _norm(inv, "audio_tower.layer_norm", h, bias=False, group="audio")
    ain = a.int("adapter_input_size", a.int("whisper_adapter_in_dim", 1280), min_value=1)
    aout = a.int("adapter_out_dim", a.int("whisper_adapter_out_dim", a.int("adapter_output_size", 5120)), min_value=1)
    _norm(inv, "audio_tower.adapter.norm", ain, group="audio")
    _lin(inv, "audio_tower.adapter.fc1", aout, ain, group="audio")
    _lin(inv, "audio_tower.adapter.fc2", aout, aout, group="audio")


Tower = Callable[[Inventory, Cfg, int, Cfg], None]  # (inventory, tower config, text hidden size, top config)


@dataclass(frozen=True)
class Family:
    text: Callable[[Cfg, str], ModelSpec]  # a text adapter
    text_model_type: str  # the model_type its text part is counted as
    towers: tuple[tuple[str, Tower], ...]  # (config key, builder)
    tie_default: bool = False
    tie_from_text: bool = False  # text_config's tie_word_embeddings true also ties (GLM-4.5V, MiniMax-M3: pre-v5 configs)
    text_at_top: bool = False  # without text_config, the text model's fields are the top level (dots3's published config)


# Qwen3-VL-MoE's router always renormalises the top-k weights (it reads no norm_topk_prob); Qwen3-Omni's
# reads norm_topk_prob, default true; neither has sliding windows. Otherwise Qwen3-MoE's text model.
_QWEN3_VL_TEXT = replace(llama_like.STYLES["qwen3_moe"], windows="none", router=lambda c: RouterSpec(norm_topk_prob=True))
_QWEN3_OMNI_TEXT = replace(_QWEN3_VL_TEXT, router=lambda c: RouterSpec(norm_topk_prob=c.bool("norm_topk_prob", True)))


def _styled(style: llama_like.Style) -> Callable[[Cfg, str], ModelSpec]:
    return lambda cfg, model_type: llama_like.adapt(cfg, model_type, style)


FAMILIES: dict[str, Family] = {
    # Qwen/Qwen3-VL-30B-A3B: Qwen3-MoE text model + Qwen3-VL vision tower.
    "qwen3_vl_moe": Family(_styled(_QWEN3_VL_TEXT), "qwen3_moe", (("vision_config", qwen3_vl_vision),)),
    # rhymes-ai/Aria: Aria text MoE + Idefics3 vision encoder + cross-attention projector.
    "aria": Family(llama_like.adapt, "aria_text", (("vision_config", aria_vision),)),
    # MiniMax-M3 (vision-language): MiniMax-M3 text MoE + CLIP-style tower + two projectors.
    "minimax_m3_vl": Family(llama_like.adapt, "minimax_m3_vl_text", (("vision_config", minimax_m3_vision),),
                            tie_from_text=True),
    # Qwen/Qwen3-Omni-30B-A3B thinker: Qwen3-MoE text + Qwen3-VL-style vision + audio encoder.
    "qwen3_omni_moe_thinker": Family(_styled(_QWEN3_OMNI_TEXT), "qwen3_moe",
                                     (("vision_config", qwen3_vl_vision), ("audio_config", qwen3_omni_audio))),
    # zai-org/GLM-4.5V: GLM-4.5 (glm4_moe) text model + GLM-4V vision tower.
    "glm4v_moe": Family(deepseek.adapt, "glm4_moe", (("vision_config", glm4v_vision),), tie_from_text=True),
    # stepfun-ai Step-3.7: Step-3.7 text MoE (llama_like "step3p7_text") + its vision tower and projector.
    "step3p7": Family(llama_like.adapt, "step3p7_text", (("vision_config", step3p7_vision),)),
    # thinkingmachines Inkling 2: its text MoE (arch/inkling.py) + the Inkling 2 vision tower and merger.
    "inkling2": Family(inkling.adapt2, "inkling2_text", (("vision_config", inkling2_vision),)),
    # thinkingmachines/Inkling: its text MoE (arch/inkling.py) + the hierarchical patch encoder and the audio embedding.
    "inkling_mm_model": Family(inkling.adapt, "inkling_text", (("vision_config", inkling_vision),
                                                                ("audio_config", inkling_audio))),
    # mistralai Mistral-Large-4: its MLA + indexer text MoE (arch/mistral_large4.py) + Pixtral and Mistral-3's projector.
    "mistral_large4": Family(mistral_large4.adapt, "mistral_large4_text", (("vision_config", pixtral_vision),)),
    # rednote-hilab dots3: its MLA + indexer text MoE (arch/dots3.py) + an MoE vision tower and an audio encoder.
    "dots3_note": Family(dots3.adapt, "dots3_note_text", (("vision_config", dots3_vision), ("audio_config", dots3_audio)),
                         text_at_top=True),
    # Qwen4-Exp: its hyper-connection text MoE (arch/qwen4_exp.py) + Qwen3.5's vision tower.
    "qwen4_exp": Family(qwen4_exp.adapt, "qwen4_exp_text", (("vision_config", qwen3_5_vision),)),
    # baidu ERNIE-4.5-VL-MoE: text MoE with modality-isolated text / vision experts (arch/mm_gap.py) + ViT and resampler.
    "ernie4_5_vl_moe": Family(mm_gap.ernie4_5_vl_moe_text, "ernie4_5_vl_moe_text",
                              (("vision_config", mm_gap.ernie4_5_vl_vision),), tie_default=True),
    # Muse Spark: text MoE with experts in a projected space (arch/mm_gap.py) + vision tower and adapter + waveform audio encoder.
    "muse_spark": Family(mm_gap.muse_spark_text, "muse_spark_text", (("vision_config", mm_gap.muse_spark_vision),
                                                                     ("audio_config", mm_gap.muse_spark_audio))),
    # baidu Unlimited-OCR: DeepSeek-V2-Lite-like text MoE (arch/mm_gap.py) + SAM and CLIP encoders and projector.
    "unlimited_ocr": Family(mm_gap.unlimited_ocr_text, "unlimited_ocr_text", (("vision_config", mm_gap.unlimited_ocr_vision),)),
    # deepseek-ai DeepSeek-OCR-2: Unlimited-OCR's text MoE modules, causal attention (arch/mm_gap.py) + SAM and a Qwen2-style encoder.
    "deepseek_ocr2": Family(mm_gap.deepseek_ocr2_text, "deepseek_ocr2_text", (("vision_config", mm_gap.deepseek_ocr2_vision),)),
    # NVIDIA NeMo SpeechLM (Nemotron-3.5 Transcribe): Nemotron-H text MoE + ASR encoder, diarization model, word timestamps.
    "nemo_speechlm": Family(mm_gap.nemo_speechlm_text, "nemotron_h", (("audio_config", mm_gap.nemo_speechlm_audio),
                                                                     ("word_timestamp_config", mm_gap.nemo_speechlm_word_timestamps))),
    # zai-org GLM-5.3-Flash: KDA + MLA/DSA hybrid text MoE with hyper-connections (arch/mm_gap.py) + its vision tower.
    "glm5_next": Family(mm_gap.glm5_next_text, "glm5_next_text", (("vision_config", mm_gap.glm5_next_vision),)),
}


def adapt(cfg: Cfg, model_type: str) -> ModelSpec:
    fam = FAMILIES[model_type]
    text = dict(cfg.d if fam.text_at_top and not cfg.has("text_config") else cfg.sub("text_config").d)
    text["tie_word_embeddings"] = cfg.bool("tie_word_embeddings", fam.tie_default) or (
        fam.tie_from_text and Cfg(text, f"{cfg.where}[text_config]").bool("tie_word_embeddings", False))
    spec = fam.text(Cfg(text, f"{cfg.where}[text_config]"), fam.text_model_type)
    inv = Inventory()
    for key, build in fam.towers:
        build(inv, cfg.sub(key), spec.hidden_size, cfg)
    return replace(spec, model_type=model_type, family=model_type, params=spec.params + tuple(inv.params),
                   torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype") or spec.torch_dtype,
                   quantization=common.quantization(cfg) or spec.quantization)


def register(table: dict) -> None:
    for mt in FAMILIES:
        table[mt] = lambda cfg, mt=mt: adapt(cfg, mt)
