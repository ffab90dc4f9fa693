"""MiniMax-Text-01 (minimax): lightning attention (linear attention with per-head decay) and softmax
attention layers (`layer_types`; by default full attention on even layers), a Mixtral-style MoE
(softmax, top-k renormalised) in every layer. The residual branches start from the *normalised*
input and are scaled: x' = alpha * norm(x) + beta * sublayer(norm(x)), alpha/beta per kind."""

from __future__ import annotations

from ..errors import BadConfig
from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common


def layer_types(cfg: Cfg, n_layers: int) -> list[str]:
    types = cfg.str_list("layer_types", ["full_attention" if (i + 1) % 2 else "linear_attention"
                                         for i in range(n_layers)])
    if len(types) < n_layers or any(t not in ("full_attention", "linear_attention") for t in types[:n_layers]):
        raise BadConfig(f"{cfg.where}: layer_types must be full_attention or linear_attention for each layer")
    return types[:n_layers]


def adapt(cfg: Cfg, model_type: str = "minimax") -> ModelSpec:
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n_layers = cfg.int("num_hidden_layers", min_value=1)
    heads, kv_heads, hd = common.attention_dims(cfg, d)
    tie = common.tie_embeddings(cfg)
    E, F = cfg.int("num_local_experts", 8, min_value=1), cfg.int("intermediate_size", min_value=1)
    moe = MoESpec(num_experts=E, top_k=cfg.int("num_experts_per_tok", 2, min_value=1), expert_ffn=F,
                  router=RouterSpec(norm_topk_prob=True), activation=cfg.str("hidden_act", "silu"))
    window = cfg.raw("sliding_window")
    inv = Inventory()
    layers = []
    for i, kind in enumerate(layer_types(cfg, n_layers)):
        if kind == "linear_attention":
            p = f"layers.{i}.attn"
            inv.linear(f"{p}.qkv_proj", "attention", 3 * heads * hd, d, i)
            inv.linear(f"{p}.output_gate", "attention", heads * hd, d, i)
            inv.norm(f"{p}.norm", heads * hd, i)
            inv.linear(f"{p}.out_proj", "attention", d, heads * hd, i)
            layers.append(LayerSpec(index=i, mixer="lightning_attention", moe=True, state_elems=heads * hd * hd))
        else:
            inv.gqa(i, d, heads, kv_heads, hd)
            layers.append(common.gqa_layer(i, heads, kv_heads, hd, True, window if isinstance(window, int) else None))
        inv.norm(f"layers.{i}.input_norm", d, i)
        inv.norm(f"layers.{i}.post_attention_norm", d, i)
        inv.linear(f"layers.{i}.router", "router", E, d, i)
        inv.swiglu(f"layers.{i}.experts", "routed_experts", d, F, i, copies=E)
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family="minimax", hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def register(table: dict) -> None:
    table["minimax"] = adapt
