"""dots3 (rednote-hilab, `dots3_note_text`; transformers' Dots3NoteTextForCausalLM): DeepSeek-V3.2's
MLA and MoE with per-layer attention shapes.

Attention: MLA on every layer (deepseek._MLA) plus a per-head output gate `g_proj` [H, D] and an
RMSNorm on the RoPE key (`k_rope_only_layernorm` [rope]). `layer_types`: "indexed_attention"
layers carry the DeepSeek sparse-attention indexer, "sliding_attention" layers a window of
`sliding_window` and their own MLA sizes (`per_layer_config`: per layer, the fields that differ
from the top level; without it, the swa_* fields with Dots3NoteTextConfig's defaults). Without
`layer_types`: layers 0, 1 and every i % 4 == 1 full (indexed unless use_dsa is false), the rest
sliding (all full when use_sliding_window is false).
MLP per `mlp_layer_types` (else dense below first_k_dense_replace, default 1, and where
i % moe_layer_freq != 0): a dense SwiGLU, or the MoE: sigmoid router with a correction bias,
fused routed experts, one shared MLP of shared_experts_intermediate_size x n_shared_experts.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import BadConfig
from ..spec import Cfg, Inventory, ModelSpec, MoESpec, RouterSpec
from . import common
from .deepseek import _MLA

# Dots3NoteTextConfig.__post_init__: the sliding layers' MLA when config.json has no per_layer_config
SWA_DEFAULTS = dict(num_attention_heads=64, num_key_value_heads=64, q_lora_rank=1024, kv_lora_rank=1024, head_dim=256,
                    qk_nope_head_dim=192, v_head_dim=128)


def _layer_types(cfg: Cfg, n: int) -> list[str]:
    use_dsa = cfg.raw("use_dsa", None if cfg.has("per_layer_config") else True)
    if cfg.has("layer_types"):
        types = cfg.str_list("layer_types")
        if len(types) < n:
            raise BadConfig(f"{cfg.where}: layer_types has {len(types)} entries for {n} layers")
        types = types[:n]
    else:
        full = "full_attention" if use_dsa is False else "indexed_attention"
        sliding = cfg.bool("use_sliding_window", True)
        types = [full if not sliding or i < 2 or i % 4 == 1 else "sliding_attention" for i in range(n)]
    if use_dsa is not None:
        old, new = ("full_attention", "indexed_attention") if use_dsa else ("indexed_attention", "full_attention")
        types = [new if t == old else t for t in types]
    return types


def _mlp_types(cfg: Cfg, n: int) -> list[str]:
    if cfg.has("mlp_layer_types"):
        types = cfg.str_list("mlp_layer_types")
        if len(types) < n:
            raise BadConfig(f"{cfg.where}: mlp_layer_types has {len(types)} entries for {n} layers")
        return types[:n]
    k = cfg.int("first_k_dense_replace", 1)
    freq = cfg.raw("moe_layer_freq", 1)
    if isinstance(freq, list):
        return ["sparse" if i >= k and bool(freq[i]) else "dense" for i in range(n)]
    freq = cfg.int("moe_layer_freq", 1, min_value=1)
    return ["sparse" if i >= k and i % freq == 0 else "dense" for i in range(n)]


def _layer_overrides(cfg: Cfg, types: list[str]) -> dict[int, dict]:
    if cfg.has("per_layer_config"):
        plc = cfg.raw("per_layer_config")
        if not isinstance(plc, dict):
            raise BadConfig(f"{cfg.where}: field 'per_layer_config' must be an object")
        out = {}
        for k, v in plc.items():
            if not isinstance(v, dict) or not str(k).isdigit():
                raise BadConfig(f"{cfg.where}: per_layer_config entry {k!r} must be a layer number with an object")
            out[int(k)] = v
        return out
    swa = {k: cfg.raw(f"swa_{k}", v) for k, v in SWA_DEFAULTS.items()}
    swa["qk_rope_head_dim"] = cfg.raw("swa_qk_rope_head_dim", swa["head_dim"] - swa["qk_nope_head_dim"])
    return {i: swa for i, t in enumerate(types) if t == "sliding_attention"}


def adapt(cfg: Cfg, model_type: str = "dots3_note_text") -> ModelSpec:
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n_layers = cfg.int("num_hidden_layers", min_value=1)
    tie = common.tie_embeddings(cfg)
    types, mlp_types = _layer_types(cfg, n_layers), _mlp_types(cfg, n_layers)
    overrides = _layer_overrides(cfg, types)
    E = cfg.first_int(["n_routed_experts", "num_local_experts"], min_value=1)
    F = cfg.int("moe_intermediate_size", min_value=1)
    shared = cfg.int("n_shared_experts", 1)
    shared_f = cfg.first_int(["moe_shared_expert_intermediate_size", "shared_experts_intermediate_size"], 1536) * shared
    moe = MoESpec(num_experts=E, top_k=cfg.int("num_experts_per_tok", min_value=1), expert_ffn=F,
                  num_shared_experts=shared, shared_ffn=shared_f, activation=cfg.str("hidden_act", "silu"),
                  router=RouterSpec(scoring="sigmoid", norm_topk_prob=cfg.bool("norm_topk_prob", True),
                                    routed_scaling_factor=cfg.float("routed_scaling_factor", 1.0), topk_method="noaux_tc",
                                    n_group=cfg.int("n_group", 1, min_value=1),
                                    topk_group=cfg.int("topk_group", 1, min_value=1), correction_bias=True))
    window = cfg.int("sliding_window", cfg.int("sliding_window_size", 512), min_value=1)
    inv = Inventory()
    layers = []
    for i in range(n_layers):
        lc = Cfg({**cfg.d, **overrides.get(i, {})}, cfg.where)
        heads = lc.int("num_attention_heads", min_value=1)
        if not lc.has("q_lora_rank"):
            raise BadConfig(f"{cfg.where}: dots3 needs q_lora_rank (Dots3NoteTextAttention always builds q_a_layernorm)")
        layer = _MLA(lc, d, heads).build(inv, i, "attention")
        p = f"layers.{i}.attn"
        inv.add(f"{p}.k_rope_only_norm.weight", "norms", (lc.int("qk_rope_head_dim", min_value=0),), i)
        inv.linear(f"{p}.g", "attention", heads, d, i)  # per-head output gate
        if types[i] == "indexed_attention":  # built from the layer's own config (its q_lora_rank)
            nh, hd, q_lora = lc.int("index_n_heads", 64, min_value=1), lc.int("index_head_dim", 128, min_value=1), lc.int("q_lora_rank")
            inv.linear(f"{p}.indexer.wq_b", "attention", nh * hd, q_lora, i)
            inv.linear(f"{p}.indexer.wk", "attention", hd, d, i)
            inv.norm(f"{p}.indexer.k_norm", hd, i, bias=True)
            inv.linear(f"{p}.indexer.weights_proj", "attention", nh, d, i)
        inv.norm(f"layers.{i}.input_norm", d, i)
        inv.norm(f"layers.{i}.post_attention_norm", d, i)
        is_moe = mlp_types[i] == "sparse"
        common.ffn(inv, cfg, i, d, is_moe, E, F, shared_f)  # no biases
        layers.append(replace(layer, moe=is_moe, window=window if types[i] == "sliding_attention" else None))
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family="dots3", hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def register(table: dict) -> None:
    table["dots3_note_text"] = adapt
