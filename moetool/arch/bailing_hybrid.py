"""Ling 3.0 (bailing_hybrid, inclusionAI): a hybrid of gated linear attention and MLA, both under
`self_attn.`, with DeepSeek-V3's MoE.

- Linear-attention layers (BailingHybridDeltaAttention, GLM-5-Next's linear attention): q/k/v
  [H*Dh, D], a depthwise conv over q|k|v, a per-channel forget gate (f_proj [H*Dh, D], dt_bias
  [H*Dh], A_log [H]), beta b_proj [H, D], an output gate g_proj [H*Dh, D], gated RMSNorm [Dh] and
  o_proj; H and Dh are linear_num_heads and linear_head_dim (the config derives them from
  num_attention_heads and head_dim when absent; a saved config.json carries them).
- Full-attention layers every `layer_group_size`-th (1-based): MLA without a query LoRA (q_proj
  [H*(nope+rope), D]) plus a head-wise output gate g_proj [H, D].
- MoE per `mlp_layer_types` (else the first `first_k_dense_replace` layers dense): sigmoid router
  with correction bias and groups (`num_expert_group`), `moe_renormalize`, shared experts.
- `num_nextn_predict_layers` MTP layers are stored in checkpoints but not built by transformers.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import BadConfig
from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common
from .deepseek import _MLA


def kda_dims(cfg: Cfg) -> dict:
    """The linear-attention layers' heads, head dim and conv kernel, as transformers derives them."""
    heads = cfg.int("num_attention_heads", min_value=1)
    return dict(heads=cfg.int("linear_num_heads", heads, min_value=1),
                head_dim=cfg.int("linear_head_dim", cfg.int("head_dim", 128, min_value=1), min_value=1),
                kernel=cfg.int("linear_conv_kernel_dim", cfg.int("short_conv_kernel_size", 4, min_value=1), min_value=1))


def adapt(cfg: Cfg, model_type: str = "bailing_hybrid") -> ModelSpec:
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n_layers = cfg.int("num_hidden_layers", min_value=1)
    heads = cfg.int("num_attention_heads", min_value=1)
    dims = kda_dims(cfg)
    lin_heads, hd, K = dims["heads"], dims["head_dim"], dims["kernel"]
    tie = common.tie_embeddings(cfg)
    E = cfg.first_int(["num_experts", "num_local_experts"], min_value=1)
    F = cfg.int("moe_intermediate_size", min_value=1)
    shared = cfg.first_int(["num_shared_experts", "n_shared_experts"], 0)
    moe = MoESpec(num_experts=E, top_k=cfg.first_int(["num_experts_per_token", "num_experts_per_tok"], min_value=1),
                  expert_ffn=F, num_shared_experts=shared, shared_ffn=F * shared, activation=cfg.str("hidden_act", "silu"),
                  router=RouterSpec(scoring="sigmoid", norm_topk_prob=cfg.bool("moe_renormalize", True),
                                    routed_scaling_factor=cfg.float("routed_scaling_factor", 1.0), topk_method="noaux_tc",
                                    n_group=cfg.first_int(["num_expert_group", "n_group"], 1, min_value=1),
                                    topk_group=cfg.int("topk_group", 1, min_value=1), correction_bias=True))
    group = cfg.int("layer_group_size", 6, min_value=1)
    types = cfg.str_list("layer_types", ["full_attention" if (i + 1) % group == 0 else "linear_attention"
                                         for i in range(n_layers)])
    k_dense = cfg.int("first_k_dense_replace", 2)
    mlp = cfg.str_list("mlp_layer_types", ["dense" if i < k_dense else "sparse" for i in range(n_layers)])
    if len(types) < n_layers or len(mlp) < n_layers:
        raise BadConfig(f"{cfg.where}: layer_types / mlp_layer_types need one entry per layer ({n_layers})")
    mla = _MLA(cfg, d, heads)
    inv = Inventory()
    layers = []
    for i in range(n_layers):
        is_moe = mlp[i] == "sparse"
        p = f"layers.{i}.attn"
        if types[i] == "full_attention":
            layer = replace(mla.build(inv, i, "attention"), moe=is_moe)
            inv.linear(f"{p}.g_proj", "attention", heads, d, i)  # head-wise output gate [H, D]
        else:
            q = lin_heads * hd
            for n in ("q", "k", "v", "f", "g"):  # f: the forget gate's projection; g: the output gate
                inv.linear(f"{p}.{n}_proj", "attention", q, d, i)
            inv.add(f"{p}.conv1d.weight", "attention", (3 * q, 1, K), i)
            inv.add(f"{p}.forget_gate.dt_bias", "attention", (q,), i)
            inv.add(f"{p}.forget_gate.A_log", "attention", (lin_heads,), i)
            inv.linear(f"{p}.b_proj", "attention", lin_heads, d, i)
            inv.norm(f"{p}.o_norm", hd, i)
            inv.linear(f"{p}.o_proj", "attention", d, q, i)
            layer = LayerSpec(index=i, mixer="kda", moe=is_moe, state_elems=(K - 1) * 3 * q + lin_heads * hd * hd)
        inv.norm(f"layers.{i}.input_norm", d, i)
        inv.norm(f"layers.{i}.post_attention_norm", d, i)
        common.ffn(inv, cfg, i, d, is_moe, E, F, F * shared)
        layers.append(layer)
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family="bailing_hybrid", hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     mtp_layers=cfg.first_int(["num_nextn_predict_layers", "num_mtp_layers"], 0),
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def register(table: dict) -> None:
    table["bailing_hybrid"] = adapt
