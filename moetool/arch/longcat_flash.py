"""LongCat-Flash (meituan-longcat/LongCat-Flash-Chat): each of `num_layers` layers holds two MLA
attention sublayers and two dense SwiGLU MLPs (each with its input / post-attention RMSNorm),
and one MoE block (a shortcut-connected MoE) whose router picks `moe_topk` of
n_routed_experts + zero_expert_num experts; the zero experts are identities (no weights), but
transformers' fused gate_up_proj holds rows for them too, so the total counts those rows (unused).
"""

from __future__ import annotations

from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common
from .deepseek import _MLA


def adapt(cfg: Cfg, model_type: str = "longcat_flash") -> ModelSpec:
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n_layers = cfg.int("num_layers", 28, min_value=1)
    heads = cfg.int("num_attention_heads", min_value=1)
    tie = common.tie_embeddings(cfg)
    E = cfg.int("n_routed_experts", 512, min_value=1)
    zero = cfg.int("zero_expert_num", 0)
    F = cfg.int("expert_ffn_hidden_size", min_value=1)
    moe = MoESpec(num_experts=E, top_k=min(cfg.int("moe_topk", 12, min_value=1), E), expert_ffn=F,
                  router=RouterSpec(scoring="softmax", correction_bias=True,
                                    routed_scaling_factor=cfg.float("routed_scaling_factor", 1.0)),
                  activation=cfg.str("hidden_act", "silu"), zero_experts=zero)
    mla = _MLA(cfg, d, heads)
    ffn = cfg.int("ffn_hidden_size", min_value=1)
    inv = Inventory()
    layers = []
    for i in range(n_layers):
        kv = flops = kv_head = flops_latent = 0
        for _ in range(2):
            sub = mla.build(inv, i, "attention")
            kv, flops = kv + sub.kv_per_token, flops + sub.attn_flops_per_ctx
            kv_head, flops_latent = kv_head + sub.kv_per_token_per_head, flops_latent + sub.attn_flops_per_ctx_latent
            inv.norm(f"layers.{i}.input_norm", d, i)
            inv.norm(f"layers.{i}.post_attention_norm", d, i)
            inv.swiglu(f"layers.{i}.mlps", "dense_mlp", d, ffn, i)
        inv.linear(f"layers.{i}.router", "router", E + zero, d, i, bias=cfg.bool("router_bias", False))
        inv.linear(f"layers.{i}.experts.gate", "routed_experts", F, d, i, copies=E + zero)
        inv.linear(f"layers.{i}.experts.up", "routed_experts", F, d, i, copies=E + zero)
        inv.linear(f"layers.{i}.experts.down", "routed_experts", d, F, i, copies=E)
        layers.append(LayerSpec(index=i, mixer="mla", moe=True, kv_per_token=kv, attn_flops_per_ctx=flops,
                                kv_per_token_per_head=kv_head, attn_flops_per_ctx_latent=flops_latent))
    common.embed_and_head(inv, cfg, vocab, d, tie)
    notes = ()
    if zero:
        notes = (f"{zero} zero (identity) experts beside the {E} routed ones: the router picks {moe.top_k} of {E + zero}; "
                 "transformers' gate_up_proj also holds rows for the zero experts (counted in the total, never used); "
                 "active parameters assume k real experts per token (an upper bound)",)
    return ModelSpec(model_type=model_type, family="longcat_flash", hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg),
                     notes=notes)


def register(table: dict) -> None:
    table["longcat_flash"] = adapt
