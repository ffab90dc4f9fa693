"""Mistral-Large-4's text model (`mistral_large4_text`, the language model of `mistral_large4`;
transformers' MistralLarge4TextModel).

Attention: MLA without a query LoRA (q_proj [H*(nope+rope), D]), a learned softmax scaling
(scale and bias [H]), and DeepSeek-V3.2's sparse-attention indexer whose query comes from the
hidden state (wq_b [Hi*Di, D], a LayerNorm of the input `q_input_norm` [D] with bias, its own
softmax scaling [Hi]). NoPE layers (`no_rope_layers` 0; default every 4th) fold the RoPE width
into the no-RoPE part: kv_a [Rkv, D], kv_b [H*(nope+rope+v), Rkv]. KV-sharing layers
(`kv_source_layers` pointing back) keep no kv_a and no kv_a norm; "shared" layers of
`indexer_types` (default from index_topk_pattern / freq / offset, as GLM-5) build no indexer.
MLP per `mlp_layer_types` (else dense below first_k_dense_replace): a dense SwiGLU, or routed
experts with a softmax router (weights always renormalised) and shared experts.
"""

from __future__ import annotations

from ..errors import BadConfig
from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common
from .deepseek import _indexer_types


def _per_layer(cfg: Cfg, key: str, n: int) -> list | None:
    if not cfg.has(key):
        return None
    values = cfg.raw(key)
    if not isinstance(values, list) or len(values) < n:
        raise BadConfig(f"{cfg.where}: {key} must be a list with one entry per layer ({n})")
    return values[:n]


def adapt(cfg: Cfg, model_type: str = "mistral_large4_text") -> ModelSpec:
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n = cfg.int("num_hidden_layers", min_value=1)
    tie = common.tie_embeddings(cfg)
    H = cfg.int("num_attention_heads", min_value=1)
    kv_lora, nope = cfg.int("kv_lora_rank", min_value=1), cfg.int("qk_nope_head_dim", min_value=0)
    rope, v = cfg.int("qk_rope_head_dim", min_value=0), cfg.int("v_head_dim", min_value=1)
    bias = cfg.bool("attention_bias", False)
    use_rope = _per_layer(cfg, "no_rope_layers", n) or [int((i + 1) % cfg.int("no_rope_layer_interval", 4, min_value=1) != 0)
                                                         for i in range(n)]
    sources = _per_layer(cfg, "kv_source_layers", n) or list(range(n))
    index_types = _indexer_types(cfg, n)
    if len(index_types) < n:
        raise BadConfig(f"{cfg.where}: indexer_types has {len(index_types)} entries for {n} layers")
    mlp_types = _per_layer(cfg, "mlp_layer_types", n) or [
        "dense" if i < cfg.int("first_k_dense_replace", 0) else "sparse" for i in range(n)]
    E = cfg.first_int(["n_routed_experts", "num_local_experts", "num_experts"], min_value=1)
    F = cfg.int("moe_intermediate_size", min_value=1)
    shared = cfg.int("n_shared_experts", 0)
    moe = MoESpec(num_experts=E, top_k=cfg.int("num_experts_per_tok", min_value=1), expert_ffn=F,
                  num_shared_experts=shared, shared_ffn=F * shared, activation=cfg.str("hidden_act", "silu"),
                  router=RouterSpec(norm_topk_prob=True, topk_method="group_top2_softmax", routed_scaling_factor=cfg.float("routed_scaling_factor", 1.0),
                                    n_group=cfg.int("n_group", 1, min_value=1),
                                    topk_group=cfg.int("topk_group", 1, min_value=1)))
    nh, hd = cfg.int("index_n_heads", 64, min_value=1), cfg.int("index_head_dim", 128, min_value=1)
    inv = Inventory()
    layers = []
    for i in range(n):
        r = rope if use_rope[i] else 0
        p = f"layers.{i}.attn"
        inv.linear(f"{p}.q", "attention", H * (nope + rope), d, i)
        if sources[i] == i:  # owns its latent KV
            inv.linear(f"{p}.kv_a", "attention", kv_lora + r, d, i, bias)
            inv.norm(f"{p}.kv_a_norm", kv_lora, i)
        inv.linear(f"{p}.kv_b", "attention", H * (nope + rope - r + v), kv_lora, i)
        inv.linear(f"{p}.o", "attention", d, H * v, i, bias)
        inv.add(f"{p}.softmax_scaling.scale", "attention", (H,), i)
        inv.add(f"{p}.softmax_scaling.bias", "attention", (H,), i)
        if index_types[i] != "shared":
            inv.linear(f"{p}.indexer.wq_b", "attention", nh * hd, d, i)
            inv.linear(f"{p}.indexer.wk", "attention", hd, d, i)
            inv.norm(f"{p}.indexer.k_norm", hd, i, bias=True)
            inv.linear(f"{p}.indexer.weights_proj", "attention", nh, d, i)
            inv.norm(f"{p}.indexer.q_input_norm", d, i, bias=True)
            inv.add(f"{p}.indexer.softmax_scaling.scale", "attention", (nh,), i)
            inv.add(f"{p}.indexer.softmax_scaling.bias", "attention", (nh,), i)
        inv.norm(f"layers.{i}.input_norm", d, i)
        inv.norm(f"layers.{i}.post_attention_norm", d, i)
        is_moe = mlp_types[i] == "sparse"
        common.ffn(inv, cfg, i, d, is_moe, E, F, F * shared)
        # the latent cache (owned layers only) as DeepSeek's MLA; per-head K and V decompressed
        own = sources[i] == i
        layers.append(LayerSpec(index=i, mixer="mla", moe=is_moe, kv_per_token=kv_lora + r if own else 0,
                                attn_flops_per_ctx=2 * H * (nope + rope + v), kv_per_token_per_head=H * (nope + rope + v),
                                attn_flops_per_ctx_latent=2 * H * (2 * kv_lora + r)))
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family="mistral_large4", hidden_size=d, vocab_size=vocab, num_layers=n,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def register(table: dict) -> None:
    table["mistral_large4_text"] = adapt
