"""NLLB-MoE (facebook/nllb-moe-54b): an M2M100 / BART-style encoder-decoder whose FFN is a top-2
MoE in every `encoder_sparse_step` / `decoder_sparse_step`-th layer (layer i sparse when
(i + 1) % step == 0). Experts and dense FFNs are fc1 / fc2 with biases (ReLU), attention has
biases, LayerNorms have biases, the embedding is shared by both stacks and the LM head; positions
are sinusoidal (no parameters).

Canonical layer numbers: encoder layers 0..N-1, decoder layers N..N+M-1 (as for Switch)."""

from __future__ import annotations

from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common


def adapt(cfg: Cfg, model_type: str = "nllb-moe") -> ModelSpec:
    d = cfg.int("d_model", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    E = cfg.int("num_experts", 128, min_value=1)
    tie = common.tie_embeddings(cfg, default=True)
    moe = MoESpec(num_experts=E, top_k=2, expert_ffn=cfg.int("encoder_ffn_dim", min_value=1),
                  router=RouterSpec(norm_topk_prob=True), activation=cfg.str("activation_function", "relu"))
    inv = Inventory()
    inv.add("embed.weight", "embedding", (vocab, d))
    if not tie:  # transformers 5 unties every copy: `shared`, each stack's embed_tokens and the head
        for stack in ("encoder", "decoder"):
            inv.add(f"{stack}.embed_tokens.weight", "embedding", (vocab, d))
    layers = []
    n_enc = cfg.int("encoder_layers", 12, min_value=0)
    for stack in ("encoder", "decoder"):
        n = cfg.int(f"{stack}_layers", 12, min_value=0)
        heads = cfg.int(f"{stack}_attention_heads", 16, min_value=1)
        ffn = cfg.int(f"{stack}_ffn_dim", min_value=1)
        step = cfg.int(f"{stack}_sparse_step", 4, min_value=0)
        base = 0 if stack == "encoder" else n_enc
        kinds = ("self",) if stack == "encoder" else ("self", "cross")
        for j in range(n):
            i = base + j
            for kind in kinds:
                for proj in ("q", "k", "v", "o"):
                    inv.linear(f"layers.{i}.{kind}_attn.{proj}", "attention", d, d, i, bias=True)
                inv.norm(f"layers.{i}.{kind}_attn_norm", d, i, bias=True)
            sparse = step > 0 and (j + 1) % step == 0
            if sparse:
                inv.linear(f"layers.{i}.router", "router", E, d, i, bias=cfg.bool("router_bias", False))
                inv.linear(f"layers.{i}.experts.up", "routed_experts", ffn, d, i, bias=True, copies=E)
                inv.linear(f"layers.{i}.experts.down", "routed_experts", d, ffn, i, bias=True, copies=E)
            else:
                inv.linear(f"layers.{i}.mlp.up", "dense_mlp", ffn, d, i, bias=True)
                inv.linear(f"layers.{i}.mlp.down", "dense_mlp", d, ffn, i, bias=True)
            inv.norm(f"layers.{i}.ff_norm", d, i, bias=True)
            hd = d // heads
            layers.append(LayerSpec(index=i, mixer="encoder_attention" if stack == "encoder" else "decoder_attention",
                                    moe=sparse, kv_per_token=0 if stack == "encoder" else 2 * 2 * d,
                                    attn_flops_per_ctx=2 * heads * 2 * hd * len(kinds)))
        inv.norm(f"{stack}.final_norm", d, bias=True)
    if not tie:
        inv.linear("lm_head", "lm_head", vocab, d)
    return ModelSpec(model_type=model_type, family="nllb_moe", hidden_size=d, vocab_size=vocab,
                     num_layers=len(layers), layers=tuple(layers), params=tuple(inv.params), moe=moe,
                     tie_word_embeddings=tie, encoder_layers=n_enc,
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def register(table: dict) -> None:
    table["nllb-moe"] = adapt
    table["nllb_moe"] = adapt
