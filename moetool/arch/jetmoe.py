"""JetMoE (jetmoe/jetmoe-8b): every layer has two routed mixtures with the same E and top-k:
- mixture of attention heads (MoA): expert e owns a query projection [Hkv*Dh, D] and an output
  projection [D, Hkv*Dh]; keys and values are shared (kv_proj [2*Hkv*Dh, D]); router [E, D]; + bias [D].
  A token's k chosen experts give it k*Hkv query heads (num_attention_heads = Hkv * k).
- MoE FFN: expert e has input_linear [2F, D] (gate, up) and output_linear [D, F]; router [E, D]; + bias [D].
Both expert sets count as routed experts (k of E active per token); the routers as router parameters.
"""

from __future__ import annotations

from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common


def adapt(cfg: Cfg, model_type: str = "jetmoe") -> ModelSpec:
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n_layers = cfg.int("num_hidden_layers", min_value=1)
    kv_heads = cfg.int("num_key_value_heads", 16, min_value=1)
    hd = cfg.int("kv_channels", 128, min_value=1)
    E = cfg.int("num_local_experts", 8, min_value=1)
    k = cfg.int("num_experts_per_tok", 2, min_value=1)
    F = cfg.int("intermediate_size", 5632, min_value=1)
    tie = common.tie_embeddings(cfg, True)
    moe = MoESpec(num_experts=E, top_k=k, expert_ffn=F, router=RouterSpec(order="topk_then_score"),
                  activation=cfg.str("activation_function", "silu"))
    inv = Inventory()
    layers = []
    q = kv_heads * hd
    for i in range(n_layers):
        inv.norm(f"layers.{i}.input_norm", d, i)
        inv.norm(f"layers.{i}.post_attention_norm", d, i)
        inv.linear(f"layers.{i}.attn.router", "router", E, d, i)
        inv.linear(f"layers.{i}.attn.experts.q", "routed_experts", q, d, i, copies=E)     # [Hkv*Dh, D] each
        inv.linear(f"layers.{i}.attn.experts.o", "routed_experts", d, q, i, copies=E)     # [D, Hkv*Dh] each
        inv.add(f"layers.{i}.attn.experts.bias", "attention", (d,), i)
        inv.linear(f"layers.{i}.attn.kv", "attention", 2 * q, d, i)
        inv.linear(f"layers.{i}.router", "router", E, d, i)
        inv.linear(f"layers.{i}.experts.gate_up", "routed_experts", 2 * F, d, i, copies=E)
        inv.linear(f"layers.{i}.experts.down", "routed_experts", d, F, i, copies=E)
        inv.add(f"layers.{i}.mlp.bias", "dense_mlp", (d,), i)
        # KV cache: Hkv heads of K and V; attention FLOPs: k * Hkv query heads.
        layers.append(LayerSpec(index=i, mixer="attention", moe=True, kv_per_token=2 * q,
                                attn_flops_per_ctx=2 * k * kv_heads * 2 * hd))
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family="jetmoe", hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def register(table: dict) -> None:
    table["jetmoe"] = adapt
