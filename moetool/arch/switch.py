"""Switch Transformers (google/switch-base-8): a T5 encoder-decoder whose FFN is a top-1 MoE in
every `encoder_sparse_step` / `decoder_sparse_step`-th block (block i is sparse when
i % step == 1, or every block when step == 1). Non-gated experts (wi [F, D], wo [D, F]),
relative attention bias in the first block of each stack, tied embeddings by default.

Canonical layer numbers: encoder blocks 0..N-1, decoder blocks N..N+M-1."""

from __future__ import annotations

from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common


def adapt(cfg: Cfg, model_type: str = "switch_transformers") -> ModelSpec:
    d = cfg.int("d_model", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    heads, dkv = cfg.int("num_heads", min_value=1), cfg.int("d_kv", min_value=1)
    F = cfg.int("d_ff", min_value=1)
    n_enc = cfg.int("num_layers", min_value=1)
    n_dec = cfg.int("num_decoder_layers", n_enc, min_value=0)
    E = cfg.first_int(["num_experts", "num_local_experts"], 8, min_value=1)
    buckets = cfg.int("relative_attention_num_buckets", 32, min_value=1)
    tie = common.tie_embeddings(cfg, default=True)
    moe = MoESpec(num_experts=E, top_k=1, expert_ffn=F, router=RouterSpec(norm_topk_prob=False),
                  activation=cfg.str("dense_act_fn", "relu"))
    inner = heads * dkv

    inv = Inventory()
    inv.add("embed.weight", "embedding", (vocab, d))
    if not tie:  # transformers 5 unties every copy: `shared`, each stack's embed_tokens and the head
        for stack in ("encoder", "decoder"):
            inv.add(f"{stack}.embed_tokens.weight", "embedding", (vocab, d))
    layers = []
    for stack, n, step_key in (("encoder", n_enc, "encoder_sparse_step"), ("decoder", n_dec, "decoder_sparse_step")):
        step = cfg.int(step_key, 3 if stack == "encoder" else 4)
        base = 0 if stack == "encoder" else n_enc
        for j in range(n):
            i = base + j
            attn_kinds = ("self",) if stack == "encoder" else ("self", "cross")
            for kind in attn_kinds:
                for proj in "qkv":
                    inv.linear(f"layers.{i}.{kind}_attn.{proj}", "attention", inner, d, i)
                inv.linear(f"layers.{i}.{kind}_attn.o", "attention", d, inner, i)
                inv.norm(f"layers.{i}.{kind}_attn_norm", d, i)
            if j == 0:
                inv.add(f"layers.{i}.self_attn.relative_attention_bias", "attention", (buckets, heads), i)
            sparse = (j % step == 1 or step == 1) if step > 0 else False
            if sparse:
                inv.linear(f"layers.{i}.router", "router", E, d, i, bias=cfg.bool("router_bias", False))
                inv.linear(f"layers.{i}.experts.up", "routed_experts", F, d, i, copies=E)
                inv.linear(f"layers.{i}.experts.down", "routed_experts", d, F, i, copies=E)
            else:
                inv.linear(f"layers.{i}.mlp.up", "dense_mlp", F, d, i)
                inv.linear(f"layers.{i}.mlp.down", "dense_mlp", d, F, i)
            inv.norm(f"layers.{i}.ff_norm", d, i)
            per_kind = 2 * heads * (dkv + dkv)
            layers.append(LayerSpec(index=i, mixer="encoder_attention" if stack == "encoder" else "decoder_attention",
                                    moe=sparse, kv_per_token=0 if stack == "encoder" else 2 * 2 * inner,
                                    attn_flops_per_ctx=per_kind * len(attn_kinds)))
        inv.norm(f"{stack}.final_norm", d)
    if not tie:
        inv.linear("lm_head", "lm_head", vocab, d)
    return ModelSpec(model_type=model_type, family="switch_transformers", hidden_size=d, vocab_size=vocab,
                     num_layers=n_enc + n_dec, layers=tuple(layers), params=tuple(inv.params), moe=moe,
                     tie_word_embeddings=tie, encoder_layers=n_enc, torch_dtype=cfg.raw("torch_dtype"),
                     quantization=common.quantization(cfg))


def register(table: dict) -> None:
    table["switch_transformers"] = adapt
