"""Zyphra ZAYA1 (transformers' zaya, ZayaForCausalLM): every layer is CCA attention + a top-1 MoE.

- Compressed Convolutional Attention (CCA): q [H*Dh, D], k [Hkv*Dh, D], and two half-width value
  projections v_proj_current / v_proj_delayed [Hkv*Dh/2, D] (biases with attention_bias); q and k
  (C = (H + Hkv) * Dh channels) go through a depthwise Conv1d [C, 1, cca_time0] and a grouped
  Conv1d [C, Dh, cca_time1] (groups H + Hkv), both with biases; a learned key scale `qk_norm.temp`
  [Hkv]; o [D, H*Dh]. Sliding layers: layer_types "hybrid_sliding".
- Router: down_proj [R, D] + bias (R = router_hidden_size), a scale of the previous layer's router
  state [R] on every layer but the first, then an MLP (RMSNorm [R], fc1 and fc2 [R, R] + biases,
  out_proj [E + 1, R]) over E experts and one skip expert (no compute); `balancing_biases` [E + 1]
  is a buffer.
- Residual scaling: before each residual add, the branch and the residual each get a bias and a
  scale [D] (4 x [D], twice a layer); the embeddings get a scale and a bias [D]. Counted as norms.
- Experts: E gated experts of moe_intermediate_size; top-1 (ZayaConfig refuses any other k).

Per sequence the CCA keeps its convolution's last cca_time0 - 1 + cca_time1 - 1 inputs (C channels)
and the previous token's delayed value projection (Hkv*Dh/2): fixed state beside the KV cache.
"""

from __future__ import annotations

from ..errors import BadConfig
from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common


def adapt(cfg: Cfg, model_type: str = "zaya") -> ModelSpec:
    d = cfg.int("hidden_size", 2048, min_value=1)
    vocab = cfg.int("vocab_size", 262272, min_value=1)
    n = cfg.int("num_hidden_layers", 40, min_value=1)
    H = cfg.int("num_attention_heads", 8, min_value=1)
    Hkv = cfg.int("num_key_value_heads", 2, min_value=1)
    hd = cfg.int("head_dim", 128, min_value=1)
    E = cfg.int("num_experts", 16, min_value=1)
    k = cfg.int("num_experts_per_tok", 1, min_value=1)
    F = cfg.int("moe_intermediate_size", 2048, min_value=1)
    R = cfg.int("router_hidden_size", 256, min_value=1)
    t0, t1 = cfg.int("cca_time0", 2, min_value=1), cfg.int("cca_time1", 2, min_value=1)
    if H % Hkv or (Hkv * hd) % 2:
        raise BadConfig(f"{cfg.where}: num_attention_heads must be a multiple of num_key_value_heads and "
                        "num_key_value_heads * head_dim even (two half-width value projections)")
    bias = cfg.bool("attention_bias", False)
    tie = common.tie_embeddings(cfg, True)
    types = cfg.str_list("layer_types", ["hybrid"] * n)
    if len(types) < n:
        raise BadConfig(f"{cfg.where}: layer_types has {len(types)} entries for {n} layers")
    window = cfg.int("sliding_window", 0) or None
    C = (H + Hkv) * hd
    inv = Inventory()
    inv.add("input_hidden_states_scale", "norms", (d,))
    inv.add("input_hidden_states_bias", "norms", (d,))
    layers = []
    for i in range(n):
        a = f"layers.{i}.self_attn"
        inv.linear(f"{a}.q_proj", "attention", H * hd, d, i, bias)
        inv.linear(f"{a}.k_proj", "attention", Hkv * hd, d, i, bias)
        inv.linear(f"{a}.v_proj_current", "attention", Hkv * hd // 2, d, i, bias)
        inv.linear(f"{a}.v_proj_delayed", "attention", Hkv * hd // 2, d, i, bias)
        for conv, shape in (("conv_qk_depthwise", (C, 1, t0)), ("conv_qk_grouped", (C, hd, t1))):
            inv.add(f"{a}.{conv}.weight", "attention", shape, i)
            inv.add(f"{a}.{conv}.bias", "attention", (C,), i)
        inv.add(f"{a}.qk_norm.temp", "attention", (Hkv,), i)
        inv.linear(f"{a}.o_proj", "attention", d, H * hd, i, bias)
        inv.norm(f"layers.{i}.input_layernorm", d, i)
        inv.norm(f"layers.{i}.post_attention_layernorm", d, i)
        for scaling in ("post_attention_residual_scale", "post_mlp_residual_scale"):
            for p in ("hidden_states_scale", "hidden_states_bias", "residual_scale", "residual_bias"):
                inv.add(f"layers.{i}.{scaling}.{p}", "norms", (d,), i)
        g = f"layers.{i}.mlp.gate"
        inv.linear(f"{g}.down_proj", "router", R, d, i, bias=True)
        if i:
            inv.add(f"{g}.router_states_scale", "router", (R,), i)
        inv.add(f"{g}.router_mlp.norm.weight", "router", (R,), i)
        inv.linear(f"{g}.router_mlp.fc1", "router", R, R, i, bias=True)
        inv.linear(f"{g}.router_mlp.fc2", "router", R, R, i, bias=True)
        inv.linear(f"{g}.router_mlp.out_proj", "router", E + 1, R, i)
        inv.linear(f"layers.{i}.mlp.experts.gate_up", "routed_experts", 2 * F, d, i, copies=E)
        inv.linear(f"layers.{i}.mlp.experts.down", "routed_experts", d, F, i, copies=E)
        layers.append(LayerSpec(index=i, mixer="attention", moe=True, kv_per_token=2 * Hkv * hd,
                                window=window if types[i] == "hybrid_sliding" else None,
                                state_elems=C * (t0 - 1 + t1 - 1) + Hkv * hd // 2,
                                attn_flops_per_ctx=2 * H * 2 * hd))
    common.embed_and_head(inv, cfg, vocab, d, tie, head_bias=cfg.bool("lm_head_bias", False))
    # the skip expert: ids E (no compute, gate 0) beside the E routed experts
    moe = MoESpec(num_experts=E, top_k=k, expert_ffn=F, activation=cfg.str("hidden_act", "silu"), zero_experts=1,
                  router=RouterSpec(correction_bias=True, norm_topk_prob=False))
    return ModelSpec(model_type=model_type, family="zaya", hidden_size=d, vocab_size=vocab, num_layers=n,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def register(table: dict) -> None:
    table["zaya"] = adapt
