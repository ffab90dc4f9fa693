"""Granite-4.0 (granitemoehybrid, e.g. ibm-granite/granite-4.0-h-small): Mamba-2 and attention
layers (`layer_types`: mamba / linear_attention or attention / full_attention). Every layer has a
MoE block (top-k of the logits, softmax over those k; none when num_local_experts is 0) plus a
shared SwiGLU MLP (`shared_mlp`, fused input_linear) that every token goes through. Attention has
RoPE only when position_embedding_type is "rope"; Granite's embedding, attention, residual and
logit multipliers."""

from __future__ import annotations

from ..errors import BadConfig
from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common

MAMBA_TYPES = ("mamba", "linear_attention")
ATTENTION_TYPES = ("attention", "full_attention")


def layer_types(cfg: Cfg, n_layers: int) -> list[str]:
    """'mamba' or 'attention' per layer (transformers' legacy and current names both accepted)."""
    key = "layer_types" if cfg.has("layer_types") else "layers_block_type"
    types = cfg.str_list(key, ["mamba"] * n_layers)
    if len(types) < n_layers or any(t not in MAMBA_TYPES + ATTENTION_TYPES for t in types[:n_layers]):
        raise BadConfig(f"{cfg.where}: {key} must name mamba or attention for each of the {n_layers} layers")
    return ["mamba" if t in MAMBA_TYPES else "attention" for t in types[:n_layers]]


def mamba2_dims(cfg: Cfg, d: int) -> dict:
    heads = cfg.int("mamba_n_heads", 128, min_value=1)
    inner = cfg.int("mamba_expand", 2, min_value=1) * d
    head_dim = inner // heads if cfg.raw("mamba_d_head", "auto") == "auto" else cfg.int("mamba_d_head", min_value=1)
    if head_dim * heads != inner:
        raise BadConfig(f"{cfg.where}: mamba_n_heads x mamba_d_head must equal mamba_expand x hidden_size")
    return dict(heads=heads, head_dim=head_dim, groups=cfg.int("mamba_n_groups", 1, min_value=1),
                d_state=cfg.int("mamba_d_state", 256, min_value=1), d_conv=cfg.int("mamba_d_conv", 4, min_value=1))


def mamba2_params(inv: Inventory, p: str, i: int, d: int, m: dict, conv_bias: bool, proj_bias: bool) -> int:
    """in_proj [I + conv + H, D], conv1d [conv, 1, K], dt_bias / A_log / D [H], norm [I],
    out_proj [D, I]. Returns the state elements per sequence."""
    inner, heads = m["heads"] * m["head_dim"], m["heads"]
    conv = inner + 2 * m["groups"] * m["d_state"]
    inv.linear(f"{p}.in_proj", "ssm", inner + conv + heads, d, i, proj_bias)
    inv.add(f"{p}.conv1d.weight", "ssm", (conv, 1, m["d_conv"]), i)
    if conv_bias:
        inv.add(f"{p}.conv1d.bias", "ssm", (conv,), i)
    for n in ("dt_bias", "A_log", "D"):
        inv.add(f"{p}.{n}", "ssm", (heads,), i)
    inv.norm(f"{p}.norm", inner, i)
    inv.linear(f"{p}.out_proj", "ssm", d, inner, i, proj_bias)
    return (m["d_conv"] - 1) * conv + inner * m["d_state"]


def adapt(cfg: Cfg, model_type: str = "granitemoehybrid") -> ModelSpec:
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n_layers = cfg.int("num_hidden_layers", min_value=1)
    heads, kv_heads, hd = common.attention_dims(cfg, d)
    tie = common.tie_embeddings(cfg)
    bias = cfg.bool("attention_bias", False)
    E = cfg.int("num_local_experts", 8)
    F, Fs = cfg.int("intermediate_size", min_value=1), cfg.int("shared_intermediate_size", 1024, min_value=1)
    moe = None
    if E:
        moe = MoESpec(num_experts=E, top_k=cfg.int("num_experts_per_tok", 2, min_value=1), expert_ffn=F,
                      num_shared_experts=1, shared_ffn=Fs, router=RouterSpec(order="topk_then_score"),
                      activation=cfg.str("hidden_act", "silu"))
    m = mamba2_dims(cfg, d)
    inv = Inventory()
    layers = []
    for i, kind in enumerate(layer_types(cfg, n_layers)):
        if kind == "attention":
            inv.gqa(i, d, heads, kv_heads, hd, qkv_bias=bias, o_bias=bias)
            layer = common.gqa_layer(i, heads, kv_heads, hd, moe is not None)
        else:
            state = mamba2_params(inv, f"layers.{i}.mamba", i, d, m, cfg.bool("mamba_conv_bias", True),
                                  cfg.bool("mamba_proj_bias", False))
            layer = LayerSpec(index=i, mixer="mamba2", moe=moe is not None, state_elems=state)
        inv.norm(f"layers.{i}.input_norm", d, i)
        inv.norm(f"layers.{i}.post_attention_norm", d, i)
        if moe:
            inv.linear(f"layers.{i}.router", "router", E, d, i)
            inv.swiglu(f"layers.{i}.experts", "routed_experts", d, F, i, copies=E)
        # The shared MLP: fused gate/up [2 Fs, D] and down [D, Fs] (the whole FFN when E is 0).
        group = "shared_experts" if moe else "dense_mlp"
        inv.linear(f"layers.{i}.shared_mlp.input_linear", group, 2 * Fs, d, i)
        inv.linear(f"layers.{i}.shared_mlp.output_linear", group, d, Fs, i)
        layers.append(layer)
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family="granitemoehybrid", hidden_size=d, vocab_size=vocab,
                     num_layers=n_layers, layers=tuple(layers), params=tuple(inv.params), moe=moe,
                     tie_word_embeddings=tie, max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def register(table: dict) -> None:
    table["granitemoehybrid"] = adapt
