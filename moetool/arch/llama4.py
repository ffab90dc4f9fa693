"""Llama 4 (meta-llama/Llama-4-Scout-17B-16E): text decoder with top-1 routed experts (sigmoid of
the chosen logit scales the expert's input) plus an always-on shared expert, MoE layers per
`moe_layers` / `interleave_moe_layer_step`, dense layers of `intermediate_size_mlp`, chunked
attention on RoPE layers and full attention on the NoPE layers. The multimodal checkpoint
(`llama4`) nests the text config in `text_config` and adds a vision tower counted as its own group.
"""

from __future__ import annotations

from ..spec import Cfg, Inventory, ModelSpec, MoESpec, RouterSpec
from . import common


def adapt(cfg: Cfg, model_type: str) -> ModelSpec:
    text = cfg.sub("text_config") if model_type == "llama4" else cfg
    d = text.int("hidden_size", min_value=1)
    vocab = text.int("vocab_size", min_value=1)
    n_layers = text.int("num_hidden_layers", min_value=1)
    heads, kv_heads, hd = common.attention_dims(text, d)
    tie = common.tie_embeddings(text)
    E = text.int("num_local_experts", 16, min_value=1)
    F = text.int("intermediate_size", min_value=1)
    moe = MoESpec(num_experts=E, top_k=text.int("num_experts_per_tok", 1, min_value=1), expert_ffn=F,
                  num_shared_experts=1, shared_ffn=F,
                  router=RouterSpec(scoring="sigmoid", order="topk_then_score", norm_topk_prob=False),
                  activation=text.str("hidden_act", "silu"))
    step = text.int("interleave_moe_layer_step", 1, min_value=1)
    moe_layers = set(text.int_list("moe_layers", list(range(step - 1, n_layers, step))))
    interval = text.int("no_rope_layer_interval", 4, min_value=1)
    use_rope = text.int_list("no_rope_layers", []) or [int((i + 1) % interval != 0) for i in range(n_layers)]
    chunk = text.int("attention_chunk_size", 8192, min_value=1)
    attn_bias = text.bool("attention_bias", False)

    inv = Inventory()
    layers = []
    for i in range(n_layers):
        inv.gqa(i, d, heads, kv_heads, hd, qkv_bias=attn_bias, o_bias=attn_bias)
        inv.norm(f"layers.{i}.input_norm", d, i)
        inv.norm(f"layers.{i}.post_attention_norm", d, i)
        is_moe = i in moe_layers
        if is_moe:
            inv.linear(f"layers.{i}.router", "router", E, d, i)
            inv.swiglu(f"layers.{i}.experts", "routed_experts", d, F, i, copies=E)
            inv.swiglu(f"layers.{i}.shared_expert", "shared_experts", d, F, i)
        else:
            inv.swiglu(f"layers.{i}.mlp", "dense_mlp", d, text.int("intermediate_size_mlp", 16384, min_value=1), i)
        # RoPE layers attend within chunks of `attention_chunk_size`; NoPE layers see everything.
        layers.append(common.gqa_layer(i, heads, kv_heads, hd, is_moe, chunk if use_rope[i % len(use_rope)] else None))
    common.embed_and_head(inv, text, vocab, d, tie)
    if model_type == "llama4" and cfg.has("vision_config"):
        _vision(inv, cfg.sub("vision_config"), d)
    return ModelSpec(model_type=model_type, family="llama4", hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=text.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or text.raw("torch_dtype"), quantization=common.quantization(cfg))


def _vision(inv: Inventory, v: Cfg, text_d: int) -> None:
    """Llama4VisionModel + multi_modal_projector, as transformers builds them."""
    h = v.int("hidden_size", min_value=1)
    f = v.int("intermediate_size", min_value=1)
    patch, channels, image = v.int("patch_size", min_value=1), v.int("num_channels", 3), v.int("image_size", min_value=1)
    patches = (image // patch) ** 2 + 1  # + class token
    add = lambda name, shape, mm=False: inv.add(f"vision.{name}", "vision", shape, matmul=mm)
    add("class_embedding", (h,))
    add("positional_embedding", (patches, h))
    add("patch_embedding", (h, channels * patch * patch), True)
    for n in ("layernorm_pre", "layernorm_post"):
        add(f"{n}.weight", (h,)), add(f"{n}.bias", (h,))
    for i in range(v.int("num_hidden_layers", min_value=1)):
        for proj in "qkvo":
            add(f"layers.{i}.{proj}.weight", (h, h), True), add(f"layers.{i}.{proj}.bias", (h,))
        add(f"layers.{i}.fc1.weight", (f, h), True), add(f"layers.{i}.fc1.bias", (f,))
        add(f"layers.{i}.fc2.weight", (h, f), True), add(f"layers.{i}.fc2.bias", (h,))
        for n in ("input_norm", "post_attention_norm"):
            add(f"layers.{i}.{n}.weight", (h,)), add(f"layers.{i}.{n}.bias", (h,))
    pin, pout = v.int("projector_input_dim", min_value=1), v.int("projector_output_dim", min_value=1)
    add("adapter.fc1.weight", (pin, f), True)  # Llama4VisionMLP2: [projector_input_dim, F]
    add("adapter.fc2.weight", (pout, pout), True)
    add("projector.weight", (text_d, v.int("vision_output_dim", min_value=1)), True)
    if v.bool("multi_modal_projector_bias", False):
        add("projector.bias", (text_d,))


def register(table: dict) -> None:
    for mt in ("llama4", "llama4_text"):
        table[mt] = lambda cfg, mt=mt: adapt(cfg, mt)
