"""DBRX (databricks/dbrx-base): fused Wqkv, LayerNorm without bias, experts stored fused as 2-D
[E*F, D] matrices w1 (gate), v1 (up), w2 (down, stored transposed), router `ffn.router.layer`.
Config nests attention and FFN options in `attn_config` and `ffn_config`."""

from __future__ import annotations

from ..errors import BadConfig
from ..spec import Cfg, Inventory, ModelSpec, MoESpec, RouterSpec
from . import common


def adapt(cfg: Cfg, model_type: str = "dbrx") -> ModelSpec:
    d = cfg.first_int(["d_model", "hidden_size"], min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n_layers = cfg.first_int(["n_layers", "num_hidden_layers"], min_value=1)
    heads = cfg.first_int(["n_heads", "num_attention_heads"], min_value=1)
    attn, ffn = cfg.sub("attn_config"), cfg.sub("ffn_config")
    kv_heads = attn.int("kv_n_heads", 1, min_value=1)
    hd = d // heads
    tie = common.tie_embeddings(cfg)
    E = ffn.int("moe_num_experts", 4, min_value=1)
    F = ffn.int("ffn_hidden_size", 3584, min_value=1)
    key = "moe_normalize_expert_weights"  # transformers' default 1.0; an explicit null: no normalisation
    norm_p = ffn.float(key) if ffn.has(key) else (None if key in ffn.d else 1.0)
    moe = MoESpec(num_experts=E, top_k=ffn.int("moe_top_k", 1, min_value=1), expert_ffn=F,
                  # moe_normalize_expert_weights: the p of the p-norm the top-k weights are divided by; null: none.
                  router=RouterSpec(norm_topk_prob=norm_p is not None,
                                    norm_p=1.0 if norm_p is None else norm_p,
                                    jitter_noise=ffn.float("moe_jitter_eps", 0.0)),
                  activation=_act(ffn))
    inv = Inventory()
    layers = []
    for i in range(n_layers):
        inv.norm(f"layers.{i}.input_norm", d, i)
        inv.linear(f"layers.{i}.attn.qkv", "attention", d + 2 * kv_heads * hd, d, i)  # [(H + 2 Hkv) Dh, D]
        inv.linear(f"layers.{i}.attn.o", "attention", d, d, i)
        inv.norm(f"layers.{i}.post_attention_norm", d, i)
        inv.linear(f"layers.{i}.router", "router", E, d, i)
        inv.swiglu(f"layers.{i}.experts", "routed_experts", d, F, i, copies=E)
        layers.append(common.gqa_layer(i, heads, kv_heads, hd, True))
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family="dbrx", hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_seq_len"), torch_dtype=cfg.raw("torch_dtype"),
                     quantization=common.quantization(cfg))


def _act(ffn: Cfg) -> str:
    """`ffn_config.ffn_act_fn` is {"name": ..., **kwargs}; transformers' default is SiLU."""
    act = ffn.raw("ffn_act_fn") or {"name": "silu"}
    name = act.get("name", "silu") if isinstance(act, dict) else None
    if not isinstance(name, str):
        raise BadConfig(f"{ffn.where}: ffn_config.ffn_act_fn must be an object with a string 'name', got {act!r}")
    return name


def register(table: dict) -> None:
    table["dbrx"] = adapt
