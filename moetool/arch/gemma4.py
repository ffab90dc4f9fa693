"""Gemma 4 text model (gemma4_text; google/gemma-4-*): Gemma's four norms a layer and QK-norm, a
dense GeGLU MLP in every layer and, with `enable_moe_block`, a routed-expert block beside it.

Per layer (Gemma4TextDecoderLayer):
- attention: q/k/v/o [H*Dh, D] (biases with `attention_bias`), q_norm and k_norm [Dh] (v_norm has
  no weight); `per_layer_config` overrides head_dim / num_key_value_heads per layer (full-attention
  layers: `global_head_dim`, default 512, when the config does not list them); with
  `attention_k_eq_v` full-attention layers have no v_proj (V = K); the last `num_kv_shared_layers`
  layers reuse an earlier layer's KV cache and have no k/v projections or norms;
- the dense MLP (doubled in KV-shared layers with `use_double_wide_mlp`);
- the MoE block: router (proj [E, D], scale [D], per_expert_scale [E]), fused experts of
  `moe_intermediate_size`, and three more norms;
- per-layer inputs (hidden_size_per_layer_input P > 0): gate [P, D], projection [D, P], a norm;
  model-wide an embedding [vocab_size_per_layer_input, L*P], its projection [L*P, D] and a norm [P].
Layer types: `layer_types`, else every 6th full attention; the last layer is always full attention.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import BadConfig
from ..spec import Cfg, Inventory, ModelSpec, MoESpec, RouterSpec
from . import common


def layer_types(cfg: Cfg, n: int) -> list[str]:
    types = cfg.str_list("layer_types", ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)])
    if len(types) < n:
        raise BadConfig(f"{cfg.where}: layer_types has {len(types)} entries for {n} layers")
    return types[:n - 1] + ["full_attention"]  # Gemma4TextConfig forces the last layer to full attention


def layer_windows(cfg: Cfg, types: list[str]) -> list:
    """sliding_window on the sliding-attention layers (as transformers' masks; also without layer_types,
    whose default pattern layer_types() gives)."""
    window = cfg.int("sliding_window", 512, min_value=0) or None
    return [window if t == "sliding_attention" else None for t in types]


def layer_overrides(cfg: Cfg, types: list[str]) -> dict[int, dict]:
    raw = cfg.raw("per_layer_config")
    if raw is None:  # Gemma4TextConfig's default: full-attention layers get the global head size
        over = {"head_dim": cfg.int("global_head_dim", 512, min_value=1)}
        if cfg.raw("num_global_key_value_heads") is not None and cfg.bool("attention_k_eq_v", False):
            over["num_key_value_heads"] = cfg.int("num_global_key_value_heads", min_value=1)
        return {i: over for i, t in enumerate(types) if t == "full_attention"}
    if not isinstance(raw, dict):
        raise BadConfig(f"{cfg.where}: per_layer_config must be an object of layer index -> overrides")
    try:
        return {int(k): dict(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise BadConfig(f"{cfg.where}: per_layer_config keys must be layer indices") from None


def adapt(cfg: Cfg, model_type: str = "gemma4_text") -> ModelSpec:
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n = cfg.int("num_hidden_layers", min_value=1)
    heads = cfg.int("num_attention_heads", min_value=1)
    tie = common.tie_embeddings(cfg, True)
    bias = cfg.bool("attention_bias", False)
    types = layer_types(cfg, n)
    over = layer_overrides(cfg, types)
    shared_kv = cfg.int("num_kv_shared_layers", 0)
    ffn = cfg.int("intermediate_size", min_value=1)
    moe = None
    if cfg.bool("enable_moe_block", False):
        moe = MoESpec(num_experts=cfg.int("num_experts", min_value=1), top_k=cfg.int("top_k_experts", min_value=1),
                      expert_ffn=cfg.int("moe_intermediate_size", min_value=1),
                      activation=cfg.str("hidden_activation", "gelu_pytorch_tanh"),
                      router=RouterSpec(norm_topk_prob=True))
    windows = layer_windows(cfg, types)
    P = cfg.int("hidden_size_per_layer_input", 0)
    inv = Inventory()
    layers = []
    for i in range(n):
        o = Cfg(over.get(i, {}), f"{cfg.where}[per_layer_config][{i}]")
        hd = o.int("head_dim", cfg.int("head_dim", 256, min_value=1), min_value=1)
        kv = o.int("num_key_value_heads", cfg.int("num_key_value_heads", heads, min_value=1), min_value=1)
        reuse = shared_kv > 0 and i >= n - shared_kv
        a = f"layers.{i}.attn"
        inv.linear(f"{a}.q", "attention", heads * hd, d, i, bias)
        inv.norm(f"{a}.q_norm", hd, i)
        if not reuse:
            inv.linear(f"{a}.k", "attention", kv * hd, d, i, bias)
            inv.norm(f"{a}.k_norm", hd, i)
            if not (cfg.bool("attention_k_eq_v", False) and types[i] == "full_attention"):
                inv.linear(f"{a}.v", "attention", kv * hd, d, i, bias)
        inv.linear(f"{a}.o", "attention", d, heads * hd, i, bias)
        wide = 2 if reuse and cfg.bool("use_double_wide_mlp", False) else 1
        inv.swiglu(f"layers.{i}.mlp", "dense_mlp", d, ffn * wide, i)
        for norm in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
            inv.norm(f"layers.{i}.{norm}_norm", d, i)
        if P:
            inv.linear(f"layers.{i}.per_layer_input_gate", "dense_mlp", P, d, i)
            inv.linear(f"layers.{i}.per_layer_projection", "dense_mlp", d, P, i)
            inv.norm(f"layers.{i}.post_per_layer_input_norm", d, i)
        if moe is not None:
            E = moe.num_experts
            inv.linear(f"layers.{i}.router.proj", "router", E, d, i)
            inv.add(f"layers.{i}.router.scale", "router", (d,), i)
            inv.add(f"layers.{i}.router.per_expert_scale", "router", (E,), i)
            inv.swiglu(f"layers.{i}.experts", "routed_experts", d, moe.expert_ffn, i, copies=E)
            for norm in ("post_feedforward_1", "post_feedforward_2", "pre_feedforward_2"):
                inv.norm(f"layers.{i}.{norm}_norm", d, i)
        layer = common.gqa_layer(i, heads, kv, hd, moe is not None, windows[i])
        if reuse:  # reads an earlier layer's cache
            layer = replace(layer, kv_per_token=0)
        layers.append(layer)
    if P:
        inv.add("embed_tokens_per_layer.weight", "embedding", (cfg.int("vocab_size_per_layer_input", vocab, min_value=1), n * P))
        inv.linear("per_layer_model_projection", "dense_mlp", n * P, d)
        inv.norm("per_layer_projection_norm", P)
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family=model_type, hidden_size=d, vocab_size=vocab, num_layers=n,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def vision_tower(inv: Inventory, v: Cfg, text_d: int) -> None:
    """Gemma4VisionModel + the embedder into the text model (Gemma4MultimodalEmbedder `embed_vision`):
    patch projection [H, 3 p^2] and 2-D position table [2, position_embedding_size, H]; per layer q/k/v/o
    (no biases), q_norm / k_norm [head_dim], a gated MLP and four norms; then a projection [D, H]. The
    clipping bounds (use_clipped_linears) and standardisation (standardize) are buffers, not parameters."""
    h, f = v.int("hidden_size", 768, min_value=1), v.int("intermediate_size", 3072, min_value=1)
    heads = v.int("num_attention_heads", 12, min_value=1)
    kv, hd = v.int("num_key_value_heads", 12, min_value=1), v.int("head_dim", 64, min_value=1)
    p = v.int("patch_size", 16, min_value=1)
    inv.add("vision_tower.patch_embedder.input_proj.weight", "vision", (h, 3 * p * p), matmul=True)
    inv.add("vision_tower.patch_embedder.position_embedding_table", "vision",
            (2, v.int("position_embedding_size", 10240, min_value=1), h))
    for i in range(v.int("num_hidden_layers", 16, min_value=0)):
        b = f"vision_tower.encoder.layers.{i}"
        for name, out, inp in (("self_attn.q_proj", heads * hd, h), ("self_attn.k_proj", kv * hd, h),
                               ("self_attn.v_proj", kv * hd, h), ("self_attn.o_proj", h, heads * hd),
                               ("mlp.gate_proj", f, h), ("mlp.up_proj", f, h), ("mlp.down_proj", h, f)):
            inv.add(f"{b}.{name}.linear.weight", "vision", (out, inp), matmul=True)
        for name, dim in (("self_attn.q_norm", hd), ("self_attn.k_norm", hd), ("input_layernorm", h),
                          ("post_attention_layernorm", h), ("pre_feedforward_layernorm", h),
                          ("post_feedforward_layernorm", h)):
            inv.add(f"{b}.{name}.weight", "vision", (dim,))
    inv.add("embed_vision.embedding_projection.weight", "vision", (text_d, h), matmul=True)


def audio_tower(inv: Inventory, a: Cfg, text_d: int) -> None:
    """Gemma4AudioModel (a conformer) + `embed_audio`: two Conv2d 3x3 subsampling layers (no bias) with
    LayerNorms (weight only) and a projection [H, (c0 // 4) c1]; per layer two feed-forward blocks
    (H -> 4H -> H, two norms each), attention (q/k/v and relative_k_proj [heads * (H // heads), H], post [H, H], per_dim_scale [H // heads]),
    a light convolution (linear_start [2H, H], depthwise kernel [H, 1, K], linear_end, two norms) and three
    norms; output_proj [O, H] with a bias; then a projection [D, O]."""
    h, layers = a.int("hidden_size", 1024, min_value=1), a.int("num_hidden_layers", 12, min_value=0)
    heads = a.int("num_attention_heads", 8, min_value=1)
    c = a.int_list("subsampling_conv_channels", [128, 32])
    if len(c) != 2:
        raise BadConfig(f"{a.where}: subsampling_conv_channels must hold two channel counts")
    out = a.int("output_proj_dims", 1536, min_value=1)
    add = lambda name, shape, matmul=False: inv.add(f"audio_tower.{name}", "audio", shape, matmul=matmul)
    for j, (cin, cout) in enumerate(((1, c[0]), (c[0], c[1]))):
        add(f"subsample_conv_projection.layer{j}.conv.weight", (cout, cin, 3, 3))
        add(f"subsample_conv_projection.layer{j}.norm.weight", (cout,))
    add("subsample_conv_projection.input_proj_linear.weight", (h, (c[0] // 4) * c[1]), True)
    for i in range(layers):
        b = f"layers.{i}"
        for ff in ("feed_forward1", "feed_forward2"):
            add(f"{b}.{ff}.ffw_layer_1.linear.weight", (4 * h, h), True)
            add(f"{b}.{ff}.ffw_layer_2.linear.weight", (h, 4 * h), True)
            add(f"{b}.{ff}.pre_layer_norm.weight", (h,)), add(f"{b}.{ff}.post_layer_norm.weight", (h,))
        hd = h // heads
        for proj in ("q_proj", "k_proj", "v_proj"):
            add(f"{b}.self_attn.{proj}.linear.weight", (heads * hd, h), True)
        add(f"{b}.self_attn.post.linear.weight", (h, h), True)
        add(f"{b}.self_attn.relative_k_proj.weight", (heads * hd, h), True)
        add(f"{b}.self_attn.per_dim_scale", (hd,))
        add(f"{b}.lconv1d.linear_start.linear.weight", (2 * h, h), True)
        add(f"{b}.lconv1d.linear_end.linear.weight", (h, h), True)
        add(f"{b}.lconv1d.depthwise_conv1d.weight", (h, 1, a.int("conv_kernel_size", 5, min_value=1)))
        for norm in ("lconv1d.pre_layer_norm", "lconv1d.conv_norm", "norm_pre_attn", "norm_post_attn", "norm_out"):
            add(f"{b}.{norm}.weight", (h,))
    add("output_proj.weight", (out, h), True)
    add("output_proj.bias", (out,))
    inv.add("embed_audio.embedding_projection.weight", "audio", (text_d, out), matmul=True)


def adapt_multimodal(cfg: Cfg) -> ModelSpec:
    """gemma4 (Gemma4ForConditionalGeneration): the text model on `text_config`, tied through the
    top-level `tie_word_embeddings`, the vision tower (group `vision`) where `vision_config` is
    given, and the audio tower (group `audio`) where `audio_config` is."""
    text = dict(cfg.sub("text_config").d)
    text["tie_word_embeddings"] = cfg.bool("tie_word_embeddings", True)
    spec = adapt(Cfg(text, f"{cfg.where}[text_config]"), "gemma4")
    inv = Inventory()
    if cfg.raw("vision_config") is not None:
        vision_tower(inv, cfg.sub("vision_config"), spec.hidden_size)
    if cfg.raw("audio_config") is not None:
        audio_tower(inv, cfg.sub("audio_config"), spec.hidden_size)
    return replace(spec, params=spec.params + tuple(inv.params),
                   torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype") or spec.torch_dtype,
                   quantization=common.quantization(cfg) or spec.quantization)


def register(table: dict) -> None:
    table["gemma4_text"] = adapt
    table["gemma4"] = adapt_multimodal
