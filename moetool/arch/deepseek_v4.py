"""DeepSeek-V4 (`deepseek_v4`; transformers' DeepseekV4ForCausalLM).

Attention on every layer: shared-KV MQA of `head_dim` (q through a q LoRA: q_a [Rq, D], its norm,
q_b [H*Dh, Rq]; kv_proj [Dh, D] and its norm), a grouped low-rank output (o_a [G*Ro, H*Dh/G],
o_b [D, G*Ro]) and attention sinks [H]. Layers by `layer_types` (default: two heavily compressed,
then compressed sparse / heavily compressed alternating) add a compressor of the KV stream:
"heavily_compressed_attention" one of width Dh (kv / gate [Dh, D], position bias [rate, Dh], norm),
"compressed_sparse_attention" one of width 2*Dh plus the lightning indexer (its own compressor of
width 2*Di, q_b [Hi*Di, Rq], scorer weights_proj [Hi, D]); "sliding_attention" none.
Compression rates from `compress_rates` (default 4 and 128; legacy compress_rate_csa / _hca).
Every layer MoE (`mlp_layer_types` "hash_moe" on the first 3 by default: routed by a token ->
experts table, a buffer; the router weight is still built): routed experts, one shared MLP of
moe_intermediate_size. Manifold-constrained hyper-connections (hc_mult residual streams): a
mixer before attention and before the MLP in every layer and one before the head, counted with
the norms. MTP layers (num_nextn_predict_layers) are not built by transformers: reported only.
"""

from __future__ import annotations

from ..errors import BadConfig
from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common

DEFAULT_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
_RATIO_TO_TYPE = {4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


def _layer_types(cfg: Cfg, n: int) -> list[str]:
    if cfg.has("layer_types"):
        types = cfg.str_list("layer_types")
    elif cfg.has("compress_ratios"):
        types = [_RATIO_TO_TYPE.get(r, "sliding_attention") for r in cfg.int_list("compress_ratios")]
    else:
        types = ["heavily_compressed_attention"] * min(n, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n - 2, 0))]
    if len(types) < n:
        raise BadConfig(f"{cfg.where}: layer_types has {len(types)} entries for {n} layers")
    bad = sorted({t for t in types[:n] if t not in LAYER_TYPES})
    if bad:
        raise BadConfig(f"{cfg.where}: layer_types entries must be one of {', '.join(LAYER_TYPES)}; got {', '.join(bad)}")
    return types[:n]


def adapt(cfg: Cfg, model_type: str = "deepseek_v4") -> ModelSpec:
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n = cfg.int("num_hidden_layers", min_value=1)
    tie = common.tie_embeddings(cfg)
    H, hd = cfg.int("num_attention_heads", min_value=1), cfg.int("head_dim", min_value=1)
    q_lora = cfg.int("q_lora_rank", min_value=1)
    G, Ro = cfg.int("o_groups", 8, min_value=1), cfg.int("o_lora_rank", 1024, min_value=1)
    nh, ihd = cfg.int("index_n_heads", 64, min_value=1), cfg.int("index_head_dim", 128, min_value=1)
    hc = cfg.int("hc_mult", 4, min_value=1)
    window = cfg.int("sliding_window", 128, min_value=1)
    rates = dict(DEFAULT_RATES)
    if isinstance(cfg.raw("compress_rates"), dict):
        rates.update(cfg.raw("compress_rates"))
    for key, legacy in (("compressed_sparse_attention", "compress_rate_csa"), ("heavily_compressed_attention", "compress_rate_hca")):
        if cfg.has(legacy):
            rates[key] = cfg.int(legacy, min_value=1)
    types = _layer_types(cfg, n)
    mlp_types = (cfg.str_list("mlp_layer_types")[:n] if cfg.has("mlp_layer_types")
                 else ["hash_moe"] * min(n, cfg.int("num_hash_layers", 3)) + ["moe"] * max(0, n - cfg.int("num_hash_layers", 3)))
    if len(mlp_types) < n:
        raise BadConfig(f"{cfg.where}: mlp_layer_types has {len(mlp_types)} entries for {n} layers")
    E, F = cfg.first_int(["n_routed_experts", "num_local_experts"], min_value=1), cfg.int("moe_intermediate_size", min_value=1)
    moe = MoESpec(num_experts=E, top_k=cfg.int("num_experts_per_tok", min_value=1), expert_ffn=F,
                  num_shared_experts=cfg.int("n_shared_experts", 1), shared_ffn=F,
                  router=RouterSpec(scoring=cfg.str("scoring_func", "sqrtsoftplus"),
                                    norm_topk_prob=cfg.bool("norm_topk_prob", True),
                                    routed_scaling_factor=cfg.float("routed_scaling_factor", 1.0)))
    inv = Inventory()
    layers = []
    for i in range(n):
        p = f"layers.{i}.attn"
        inv.linear(f"{p}.q_a", "attention", q_lora, d, i)
        inv.norm(f"{p}.q_a_norm", q_lora, i)
        inv.linear(f"{p}.q_b", "attention", H * hd, q_lora, i)
        inv.linear(f"{p}.kv", "attention", hd, d, i)
        inv.norm(f"{p}.kv_norm", hd, i)
        inv.linear(f"{p}.o_a", "attention", G * Ro, H * hd // G, i)
        inv.linear(f"{p}.o_b", "attention", d, G * Ro, i)
        inv.add(f"{p}.sinks", "attention", (H,), i)
        compressed = 0  # compressed KV elements per token
        if types[i] != "sliding_attention":
            rate = rates[types[i]]
            w = 2 * hd if types[i] == "compressed_sparse_attention" else hd
            c = f"{p}.compressor"
            inv.linear(f"{c}.kv", "attention", w, d, i)
            inv.linear(f"{c}.gate", "attention", w, d, i)
            inv.add(f"{c}.position_bias", "attention", (rate, w), i)
            inv.norm(f"{c}.kv_norm", hd, i)
            compressed = hd // rate
            if types[i] == "compressed_sparse_attention":
                x = f"{c}.indexer"
                inv.linear(f"{x}.kv", "attention", 2 * ihd, d, i)
                inv.linear(f"{x}.gate", "attention", 2 * ihd, d, i)
                inv.add(f"{x}.position_bias", "attention", (rate, 2 * ihd), i)
                inv.norm(f"{x}.kv_norm", ihd, i)
                inv.linear(f"{x}.q_b", "attention", nh * ihd, q_lora, i)
                inv.linear(f"{x}.weights_proj", "attention", nh, d, i)
                compressed += ihd // rate
        inv.norm(f"layers.{i}.input_norm", d, i)
        inv.norm(f"layers.{i}.post_attention_norm", d, i)
        common.ffn(inv, cfg, i, d, True, E, F, F)
        for mixer in ("attn_hc", "ffn_hc"):
            inv.add(f"layers.{i}.{mixer}.fn", "norms", ((2 + hc) * hc, hc * d), i, matmul=True)
            inv.add(f"layers.{i}.{mixer}.base", "norms", ((2 + hc) * hc,), i)
            inv.add(f"layers.{i}.{mixer}.scale", "norms", (3,), i)
        # the uncompressed KV of the last `sliding_window` tokens (fixed per sequence) and the
        # compressed entries (1 per `rate` tokens) that grow with the context
        layers.append(LayerSpec(index=i, mixer="attention", moe=True, kv_per_token=compressed, state_elems=window * hd,
                                attn_flops_per_ctx=2 * H * 2 * hd))
    inv.add("hc_head.hc_fn", "norms", (hc, hc * d), matmul=True)
    inv.add("hc_head.hc_base", "norms", (hc,))
    inv.add("hc_head.hc_scale", "norms", (1,))
    common.embed_and_head(inv, cfg, vocab, d, tie)
    mtp = cfg.int("num_nextn_predict_layers", 0)
    notes = (("KV cache: the sliding-window KV (sliding_window x head_dim) is a fixed per-sequence state; the "
              "compressed KV (head_dim / rate, plus index_head_dim / rate on compressed-sparse layers) grows per token",)
             + ((f"{mtp} MTP layers (num_nextn_predict_layers) are not built by transformers: not counted",) if mtp else ()))
    return ModelSpec(model_type=model_type, family="deepseek_v4", hidden_size=d, vocab_size=vocab, num_layers=n,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie, mtp_layers=mtp,
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg),
                     notes=notes)


def register(table: dict) -> None:
    table["deepseek_v4"] = adapt
