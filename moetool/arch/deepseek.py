"""DeepSeek-V2, DeepSeek-V3 (and Kimi-K2, same architecture), GLM-4.5 (glm4_moe), GLM-4.7-Flash
(glm4_moe_lite: DeepSeek-V3's MLA with GLM's MoE) and DeepSeek-V3.2 (deepseek_v32: DeepSeek-V3 plus the
DeepSeek Sparse Attention indexer in every attention layer). They differ only in data (`DEFAULTS`).

DeepSeek: multi-head latent attention (MLA): queries through an optional low-rank `q_lora_rank`,
keys and values through a shared latent of `kv_lora_rank` plus a decoupled RoPE key of
`qk_rope_head_dim`; the KV cache holds only that latent (kv_lora_rank + qk_rope_head_dim per token).
GLM-4.5: GQA attention with q/k/v biases and optional QK-norm.
Both: the first `first_k_dense_replace` layers dense, routed + shared experts on every layer after
(transformers ignores `moe_layer_freq`; see common.first_k_dense_schedule), and
`num_nextn_predict_layers` multi-token-prediction layers stored in the checkpoint but not built
by transformers (reported as MTP parameters, not in the total).
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import BadConfig
from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common

# Upstream defaults that differ per family (transformers' configuration_*.py).
DEFAULTS = {
    "deepseek_v2": dict(first_k_dense=0, norm_topk_prob=False, scoring="softmax", topk_method="greedy"),
    "deepseek_v3": dict(first_k_dense=3, norm_topk_prob=True, scoring="sigmoid", topk_method="noaux_tc"),
    "glm4_moe": dict(first_k_dense=1, norm_topk_prob=True, scoring="sigmoid", topk_method="noaux_tc"),
    # These two take the schedule from `mlp_layer_types` ("dense" / "sparse"); without it, lite is
    # dense on layer 0 only (its config has no first_k_dense_replace), v3.2 on the first 3.
    "glm4_moe_lite": dict(first_k_dense=1, norm_topk_prob=True, scoring="sigmoid", topk_method="noaux_tc",
                          first_k_key=None),
    "deepseek_v32": dict(first_k_dense=3, norm_topk_prob=True, scoring="sigmoid", topk_method="noaux_tc"),
    # SK Telecom A.X-K1: DeepSeek-V3 with `mlp_layer_types` and a `post_mlp_layernorm` on MoE blocks.
    "axk1": dict(first_k_dense=1, norm_topk_prob=True, scoring="sigmoid", topk_method="noaux_tc",
                 mlp_layer_types=True, post_mlp_norm=True),
    # Mistral 4: DeepSeek-V3's MLA and MoE with a softmax router, groups scored by their top-2 sum, no bias.
    "mistral4": dict(first_k_dense=0, norm_topk_prob=True, scoring="softmax", topk_method="group_top2_softmax",
                     correction_bias=False),
    # zai-org GLM-5 (glm_moe_dsa): DeepSeek-V3.2 whose indexer runs only on `indexer_types` "full"
    # layers ("shared" layers reuse the previous full layer's top-k and build no indexer).
    "glm_moe_dsa": dict(first_k_dense=3, norm_topk_prob=True, scoring="sigmoid", topk_method="noaux_tc",
                        indexer="per_layer", index_heads=32),
    # SK Telecom A.X-K2 (axk2): DeepSeek-V3.2 without q_b_proj: a fused query + output-gate projection
    # q_gate_proj [H*(qk+v), 2*q_lora_rank] on [normed | raw] query latent; gated RMSNorms (norm + a
    # rank-`gated_norm_rank` MLP) before attention and before every MoE block; schedule from
    # `mlp_layer_types` (else first_k_dense_replace=1 and moe_layer_freq).
    "axk2": dict(first_k_dense=1, norm_topk_prob=True, scoring="sigmoid", topk_method="noaux_tc",
                 indexer="all", index_heads=16, q_gate=True, gated_norms=True, moe_layer_freq=True),
    # Tencent HY-V4 (hy_v4): GLM-5's MLA + per-layer indexer (default: full on layer 0 and every 4th
    # after layer 1, shared between) with attention sinks [H] and a per-head output gate [H*v, D];
    # DeepSeek-V4-style hyper-connections (hc_mult residual streams: a mixer before attention and
    # before the FFN in every layer, one before the head), counted with the norms.
    "hy_v4": dict(first_k_dense=1, norm_topk_prob=True, scoring="sigmoid", topk_method="noaux_tc",
                  indexer="per_layer", index_heads=16, sinks=True, out_gate=True, hyper_connections=True,
                  first_k_key=None,
                  indexer_default=lambda n: ["full" if i == 0 or (i - 1) % 4 == 0 else "shared" for i in range(n)]),
}


def adapt(cfg: Cfg, model_type: str) -> ModelSpec:
    family = "deepseek_v3" if model_type == "kimi_k2" else model_type
    dflt = DEFAULTS[family]
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n_layers = cfg.int("num_hidden_layers", min_value=1)
    tie = common.tie_embeddings(cfg)
    heads = cfg.int("num_attention_heads", min_value=1)

    experts = cfg.first_int(["n_routed_experts", "num_local_experts"], 0)
    moe = None
    if experts:
        scoring = cfg.str("scoring_func", dflt["scoring"])
        router = RouterSpec(
            scoring=scoring,
            norm_topk_prob=cfg.bool("norm_topk_prob", dflt["norm_topk_prob"]),
            routed_scaling_factor=cfg.float("routed_scaling_factor", 1.0),
            topk_method=cfg.str("topk_method", dflt["topk_method"]),
            n_group=cfg.int("n_group", 1, min_value=1),
            topk_group=cfg.int("topk_group", 1, min_value=1),
            correction_bias=dflt.get("correction_bias", family != "deepseek_v2"),
        )
        shared = cfg.int("n_shared_experts", 0)
        f = cfg.int("moe_intermediate_size", min_value=1)
        moe = MoESpec(num_experts=experts, top_k=cfg.int("num_experts_per_tok", min_value=1), expert_ffn=f,
                      num_shared_experts=shared, shared_ffn=f * shared, router=router,
                      activation=cfg.str("hidden_act", "silu"))
    k_key = dflt.get("first_k_key", "first_k_dense_replace")
    k_dense = cfg.int(k_key, dflt["first_k_dense"]) if k_key else dflt["first_k_dense"]
    types = cfg.str_list("mlp_layer_types") if cfg.has("mlp_layer_types") else None
    if types is None and dflt.get("moe_layer_freq"):
        freq = cfg.int("moe_layer_freq", 1, min_value=1)
        types = ["sparse" if i >= k_dense and i % freq == 0 else "dense" for i in range(n_layers)]
    if types is not None and len(types) < n_layers:
        raise BadConfig(f"{cfg.where}: mlp_layer_types has {len(types)} entries for {n_layers} layers")
    mtp = cfg.first_int(["num_nextn_predict_layers", "num_mtp_layers"], 0)

    if family == "glm4_moe":
        kv_heads = cfg.int("num_key_value_heads", heads, min_value=1)
        hd = common.head_dim(cfg, d, heads)
        attn_bias = cfg.bool("attention_bias", False)
        qk_norm = cfg.bool("use_qk_norm", False)

        def attention(inv: Inventory, i: int, group: str) -> LayerSpec:
            _glm_attention(inv, i, d, heads, kv_heads, hd, attn_bias, qk_norm, group)
            return common.gqa_layer(i, heads, kv_heads, hd, False)
    else:
        mla = _MLA(cfg, d, heads, dflt, n_layers)

        def attention(inv: Inventory, i: int, group: str) -> LayerSpec:
            return mla.build(inv, i, group)

    inv = Inventory()
    layers = []
    for i in range(n_layers + mtp):
        is_mtp = i >= n_layers
        group = "mtp" if is_mtp else None
        layer = attention(inv, i, group or "attention")
        is_moe = moe is not None and (types[i] == "sparse" if types and i < n_layers else i >= k_dense)  # MTP layers too
        gated = dflt.get("gated_norms")
        _norm(inv, f"layers.{i}.input_norm", d, i, group or "norms", gated and cfg.int("gated_norm_rank", 16, min_value=1))
        _norm(inv, f"layers.{i}.post_attention_norm", d, i, group or "norms",
              gated and is_moe and cfg.int("gated_norm_rank", 16, min_value=1))
        if is_moe:
            inv.linear(f"layers.{i}.router", group or "router", moe.num_experts, d, i)  # [E, D]
            inv.swiglu(f"layers.{i}.experts", group or "routed_experts", d, moe.expert_ffn, i, copies=moe.num_experts)
            if moe.num_shared_experts:
                inv.swiglu(f"layers.{i}.shared_experts", group or "shared_experts", d, moe.shared_ffn, i)
            if dflt.get("post_mlp_norm"):
                inv.add(f"layers.{i}.post_mlp_norm.weight", group or "norms", (d,), i)
        else:
            inv.swiglu(f"layers.{i}.mlp", group or "dense_mlp", d, cfg.int("intermediate_size", min_value=1), i,
                       bias=cfg.bool("mlp_bias", False))
        if dflt.get("hyper_connections"):  # HY-V4: a mixer of the hc_mult streams before attention and FFN
            hc = cfg.int("hc_mult", 4, min_value=1)
            for mixer in ("attn_hc", "ffn_hc"):
                inv.add(f"layers.{i}.{mixer}.fn", group or "norms", (2 * hc, hc * d), i, matmul=True)
                inv.add(f"layers.{i}.{mixer}.base", group or "norms", (2 * hc,), i)
                inv.add(f"layers.{i}.{mixer}.scale", group or "norms", (2,), i)
        if is_mtp:
            # The MTP head: norms of the embedding and of the previous hidden state, their fused
            # projection [D, 2D], and the shared head's norm. Its embedding and LM head are stored
            # copies of the main ones and are not counted again.
            for n in ("enorm", "hnorm", "shared_head.norm"):
                inv.add(f"layers.{i}.{n}.weight", "mtp", (d,), i)
            inv.add(f"layers.{i}.eh_proj.weight", "mtp", (d, 2 * d), i, matmul=True)
        else:
            layers.append(replace(layer, index=i, moe=is_moe))
    if dflt.get("hyper_connections"):  # the head's mixer of the streams
        hc = cfg.int("hc_mult", 4, min_value=1)
        inv.add("hc_head.hc_fn", "norms", (hc, hc * d), matmul=True)
        inv.add("hc_head.hc_base", "norms", (hc,))
        inv.add("hc_head.hc_scale", "norms", (1,))
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family=family, hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie, mtp_layers=mtp,
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def _norm(inv: Inventory, name: str, d: int, i: int, group: str, gate_rank: int = 0) -> None:
    """An RMSNorm [D]; with `gate_rank`, A.X-K2's gated RMSNorm: the norm plus an MLP D -> rank -> D."""
    if not gate_rank:
        inv.add(f"{name}.weight", group, (d,), i)
        return
    inv.add(f"{name}.norm.weight", group, (d,), i)
    inv.linear(f"{name}.mlp.fc1", group, gate_rank, d, i)
    inv.linear(f"{name}.mlp.fc2", group, d, gate_rank, i)


def _indexer_types(cfg: Cfg, n_layers: int, default=None) -> list[str]:
    """GLM-5's per-layer indexer mode: `indexer_types`, else `index_topk_pattern` ("F" / "S"), else
    full where max(i - index_skip_topk_offset + 1, 0) % index_topk_freq == 0 (GlmMoeDsaConfig)."""
    if cfg.has("indexer_types"):
        return cfg.str_list("indexer_types")
    if default is not None:
        return default(n_layers)
    pattern = cfg.raw("index_topk_pattern")
    if isinstance(pattern, str):
        return [{"F": "full", "S": "shared"}.get(c, c) for c in pattern]
    if isinstance(pattern, list):
        return [str(x) for x in pattern]
    freq = max(cfg.int("index_topk_freq", 1), 1)
    offset = cfg.int("index_skip_topk_offset", 2)
    return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n_layers)]


class _MLA:
    def __init__(self, cfg: Cfg, d: int, heads: int, dflt: dict | None = None, n_layers: int = 0):
        dflt = dflt or {}
        self.d, self.heads = d, heads
        self.q_lora = cfg.int("q_lora_rank", 0)
        self.kv_lora = cfg.int("kv_lora_rank", min_value=1)
        self.nope = cfg.int("qk_nope_head_dim", min_value=0)
        self.rope = cfg.int("qk_rope_head_dim", min_value=0)
        self.v = cfg.int("v_head_dim", min_value=1)
        self.bias = cfg.bool("attention_bias", False)
        # DeepSeek-V3.2's sparse-attention indexer (deepseek_v32): index_n_heads x index_head_dim.
        indexer = "all" if cfg.raw("model_type") == "deepseek_v32" else dflt.get("indexer")
        self.index = (cfg.int("index_n_heads", dflt.get("index_heads", 64), min_value=1),
                      cfg.int("index_head_dim", 128, min_value=1)) if indexer else None
        # layers without their own indexer (GLM-5 "shared" layers); MTP layers past the list keep one
        self.no_index = {i for i, t in enumerate(_indexer_types(cfg, n_layers, dflt.get("indexer_default")))
                         if t != "full"} \
            if indexer == "per_layer" else set()
        self.q_gate = bool(dflt.get("q_gate"))
        self.sinks, self.out_gate = bool(dflt.get("sinks")), bool(dflt.get("out_gate"))

    def build(self, inv: Inventory, i: int, group: str) -> LayerSpec:
        d, H, qk = self.d, self.heads, self.nope + self.rope
        p = f"layers.{i}.attn"
        norms = "norms" if group == "attention" else group
        if self.q_gate:  # A.X-K2: query and output gate from [normed | raw] latent, one fused matrix
            inv.linear(f"{p}.q_a", group, self.q_lora, d, i, self.bias)        # [Rq, D]
            inv.add(f"{p}.q_a_norm.weight", norms, (self.q_lora,), i)
            inv.linear(f"{p}.q_gate", group, H * (qk + self.v), 2 * self.q_lora, i)  # [H*(qk+v), 2Rq]
        elif self.q_lora:
            inv.linear(f"{p}.q_a", group, self.q_lora, d, i, self.bias)        # [Rq, D]
            inv.add(f"{p}.q_a_norm.weight", norms, (self.q_lora,), i)
            inv.linear(f"{p}.q_b", group, H * qk, self.q_lora, i)              # [H*(nope+rope), Rq]
        else:
            inv.linear(f"{p}.q", group, H * qk, d, i)                          # [H*(nope+rope), D]
        inv.linear(f"{p}.kv_a", group, self.kv_lora + self.rope, d, i, self.bias)  # [Rkv+rope, D]
        inv.add(f"{p}.kv_a_norm.weight", norms, (self.kv_lora,), i)
        inv.linear(f"{p}.kv_b", group, H * (self.nope + self.v), self.kv_lora, i)  # [H*(nope+v), Rkv]
        inv.linear(f"{p}.o", group, d, H * self.v, i, self.bias)               # [D, H*v]
        if self.sinks:
            inv.add(f"{p}.sinks", group, (H,), i)                              # [H]
        if self.out_gate:
            inv.linear(f"{p}.gate", group, H * self.v, d, i)                   # [H*v, D]
        if self.index and i not in self.no_index:
            nh, hd = self.index
            inv.linear(f"{p}.indexer.wq_b", group, nh * hd, self.q_lora, i)    # [Hi*Di, Rq]
            inv.linear(f"{p}.indexer.wk", group, hd, d, i)                     # [Di, D]
            inv.add(f"{p}.indexer.k_norm.weight", norms, (hd,), i)             # LayerNorm
            inv.add(f"{p}.indexer.k_norm.bias", norms, (hd,), i)
            inv.linear(f"{p}.indexer.weights_proj", group, nh, d, i)           # [Hi, D]
        # The cache holds the compressed latent and the shared RoPE key (as DeepSeek's own
        # inference and vLLM/SGLang do), not per-head K and V.
        return LayerSpec(index=i, mixer="mla", moe=False, kv_per_token=self.kv_lora + self.rope,
                         attn_flops_per_ctx=2 * H * (qk + self.v), kv_per_token_per_head=H * (qk + self.v),
                         attn_flops_per_ctx_latent=2 * H * (2 * self.kv_lora + self.rope))


def _glm_attention(inv: Inventory, i: int, d: int, heads: int, kv_heads: int, hd: int, bias: bool, qk_norm: bool,
                   group: str) -> None:
    p = f"layers.{i}.attn"
    inv.linear(f"{p}.q", group, heads * hd, d, i, bias)
    inv.linear(f"{p}.k", group, kv_heads * hd, d, i, bias)
    inv.linear(f"{p}.v", group, kv_heads * hd, d, i, bias)
    inv.linear(f"{p}.o", group, d, heads * hd, i)
    if qk_norm:
        norms = "norms" if group == "attention" else group
        inv.add(f"{p}.q_norm.weight", norms, (hd,), i)
        inv.add(f"{p}.k_norm.weight", norms, (hd,), i)


def register(table: dict) -> None:
    for mt in ("deepseek_v2", "deepseek_v3", "kimi_k2", "glm4_moe", "glm4_moe_lite", "deepseek_v32", "axk1", "mistral4",
               "glm_moe_dsa", "axk2", "hy_v4"):
        table[mt] = lambda cfg, mt=mt: adapt(cfg, mt)
