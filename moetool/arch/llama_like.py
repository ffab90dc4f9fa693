"""Decoder-only families built like Llama: GQA attention, RMSNorm (LayerNorm for Phi-MoE), and a
MoE block of SwiGLU experts. Mixtral, Phi-MoE, OLMoE, Qwen2-MoE, Qwen3-MoE, GraniteMoE, gpt-oss,
and the dense Llama / Mistral / Qwen2 / Qwen3 (active = total).

The families differ only in data (the `Style` of each, next to its upstream config source):
where attention biases are, the QK-norm shape, the expert FFN size key, the MoE layer schedule,
shared experts, and the router semantics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal, Optional

from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common

Bias = Literal["none", "qkv", "all"]


@dataclass(frozen=True)
class Style:
    family: str
    experts_keys: tuple[str, ...] = ("num_local_experts", "num_experts")
    expert_ffn_key: str = "intermediate_size"
    bias: Bias | Callable[[Cfg], Bias] = "none"
    qk_norm: Literal["none", "head", "olmoe", "head_after_rope", "full"] = "none"
    layernorm_bias: bool = False  # Phi-MoE uses nn.LayerNorm (weight and bias)
    schedule: Literal["all", "sparse_step"] = "all"
    windows: common.WindowRule = "all"  # sliding-window rule without layer_types (common.layer_windows)
    shared_expert: bool = False  # Qwen2-MoE: one shared expert + sigmoid gate [1, D]
    fused_gate_up_bias: bool = False  # gpt-oss: expert biases, router bias, attention sinks
    router: Callable[[Cfg], RouterSpec] = lambda c: RouterSpec()
    dense: bool = False
    lm_head_bias: bool = False
    # Families added for issue 11 (moetool/arch/text_moe.py) use these too:
    topk_keys: tuple[str, ...] = ("num_experts_per_tok", "experts_per_token")
    custom_schedule: Optional[Callable[[Cfg, int], list[bool]]] = None  # MoE per layer, overrides `schedule`
    shared_experts: Optional[Callable[[Cfg], int]] = None  # ungated shared experts: their total FFN size (0: none)
    shared_name: str = "shared_experts"
    mlp_bias: Callable[[Cfg], bool] = lambda c: False  # biases in dense MLPs and shared experts
    head_bias: Callable[[Cfg], bool] = lambda c: False
    correction_bias_param: bool = False  # a counted [1, E] correction-bias parameter (Ernie 4.5 `moe_statics`)
    dense_ffn_key: str = "intermediate_size"
    tie_default: bool = False  # tie_word_embeddings when the config does not say (Cohere: true)
    parallel_block: bool = False  # Cohere: one norm per layer, attention and FFN in parallel


def _attention_bias(key: str, default: bool, kind: Bias) -> Callable[[Cfg], Bias]:
    return lambda c: kind if c.bool(key, default) else "none"


STYLES: dict[str, Style] = {
    # mistralai/Mixtral-8x7B-v0.1: softmax over E, top-k, renormalise.
    "mixtral": Style("mixtral", router=lambda c: RouterSpec(norm_topk_prob=True, jitter_noise=c.float("router_jitter_noise", 0.0))),
    # microsoft/Phi-3.5-MoE-instruct: LayerNorm with bias, sparsemixer router at inference.
    "phimoe": Style("phimoe", bias=_attention_bias("attention_bias", False, "all"), layernorm_bias=True,
                    router=lambda c: RouterSpec(scoring="sparsemixer", jitter_noise=c.float("router_jitter_noise", 0.01))),
    # allenai/OLMoE-1B-7B-0924: QK-norm over the full projection width; weights not renormalised.
    "olmoe": Style("olmoe", windows="none", bias=_attention_bias("attention_bias", False, "all"), qk_norm="olmoe",
                   router=lambda c: RouterSpec(norm_topk_prob=c.bool("norm_topk_prob", False))),
    # Qwen/Qwen1.5-MoE-A2.7B: q/k/v bias, shared expert with a sigmoid gate, decoder_sparse_step.
    "qwen2_moe": Style("qwen2_moe", experts_keys=("num_experts", "num_local_experts"), expert_ffn_key="moe_intermediate_size",
                       bias=_attention_bias("qkv_bias", True, "qkv"), schedule="sparse_step", shared_expert=True, windows="qwen2_moe",
                       router=lambda c: RouterSpec(norm_topk_prob=c.bool("norm_topk_prob", False))),
    # Qwen/Qwen3-30B-A3B: QK-norm per head.
    "qwen3_moe": Style("qwen3_moe", experts_keys=("num_experts", "num_local_experts"), expert_ffn_key="moe_intermediate_size",
                       bias=_attention_bias("attention_bias", False, "all"), qk_norm="head", schedule="sparse_step", windows="use_flag",
                       router=lambda c: RouterSpec(norm_topk_prob=c.bool("norm_topk_prob", False))),
    # ibm-granite/granite-3.0-3b-a800m-instruct: top-k of the logits, softmax over those k.
    "granitemoe": Style("granitemoe", windows="none", bias=_attention_bias("attention_bias", False, "all"),
                        router=lambda c: RouterSpec(order="topk_then_score")),
    # openai/gpt-oss-20b: biases everywhere, sinks, router bias, top-k logits then softmax.
    "gpt_oss": Style("gpt_oss", windows="alternate", bias=_attention_bias("attention_bias", True, "all"), fused_gate_up_bias=True,
                     router=lambda c: RouterSpec(order="topk_then_score", bias=True)),
    "llama": Style("llama", dense=True, windows="none", bias=_attention_bias("attention_bias", False, "all")),
    "mistral": Style("mistral", dense=True),
    "qwen2": Style("qwen2", dense=True, windows="qwen2", bias="qkv"),
    "qwen3": Style("qwen3", dense=True, windows="qwen2", bias=_attention_bias("attention_bias", False, "all"), qk_norm="head"),
}


def adapt(cfg: Cfg, model_type: str, style: Optional[Style] = None) -> ModelSpec:
    s = style or STYLES[model_type]
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n_layers = cfg.int("num_hidden_layers", min_value=1)
    heads, kv_heads, hd = common.attention_dims(cfg, d)
    tie = common.tie_embeddings(cfg, s.tie_default)
    bias = s.bias(cfg) if callable(s.bias) else s.bias

    moe: Optional[MoESpec] = None
    if not s.dense:
        experts = cfg.first_int(list(s.experts_keys), min_value=1)
        k = cfg.first_int(list(s.topk_keys), min_value=1)
        shared_ffn = cfg.int("shared_expert_intermediate_size", min_value=1) if s.shared_expert else 0
        if s.shared_experts:
            shared_ffn = s.shared_experts(cfg)
        moe = MoESpec(num_experts=experts, top_k=k, expert_ffn=cfg.int(s.expert_ffn_key, min_value=1),
                      num_shared_experts=1 if (s.shared_expert or shared_ffn) else 0, shared_ffn=shared_ffn,
                      router=s.router(cfg),
                      activation=cfg.str("hidden_act", "silu"))
    is_moe = (common.sparse_step_schedule(cfg, n_layers, moe is not None) if s.schedule == "sparse_step"
              else [moe is not None] * n_layers)
    if s.custom_schedule and moe is not None:
        is_moe = s.custom_schedule(cfg, n_layers)
    windows = common.layer_windows(cfg, n_layers, s.windows)

    inv = Inventory()
    layers = []
    for i in range(n_layers):
        inv.gqa(i, d, heads, kv_heads, hd, qkv_bias=bias != "none", o_bias=bias == "all")
        if s.fused_gate_up_bias:
            inv.add(f"layers.{i}.attn.sinks", "attention", (heads,), i)
        if s.qk_norm in ("head", "head_after_rope"):
            inv.norm(f"layers.{i}.attn.q_norm", hd, i)
            inv.norm(f"layers.{i}.attn.k_norm", hd, i)
        elif s.qk_norm == "full":  # Olmo 2 style: over the whole q and k projections
            inv.norm(f"layers.{i}.attn.q_norm", heads * hd, i)
            inv.norm(f"layers.{i}.attn.k_norm", kv_heads * hd, i)
        elif s.qk_norm == "olmoe":
            inv.norm(f"layers.{i}.attn.q_norm", d, i)
            inv.norm(f"layers.{i}.attn.k_norm", (d // heads) * kv_heads, i)
        inv.norm(f"layers.{i}.input_norm", d, i, bias=s.layernorm_bias)
        if not s.parallel_block:
            inv.norm(f"layers.{i}.post_attention_norm", d, i, bias=s.layernorm_bias)
        if is_moe[i]:
            _moe_block(inv, i, d, moe, s, cfg)
        else:
            inv.swiglu(f"layers.{i}.mlp", "dense_mlp", d, cfg.int(s.dense_ffn_key, min_value=1), i, bias=s.mlp_bias(cfg))
        layers.append(common.gqa_layer(i, heads, kv_heads, hd, is_moe[i], windows[i]))
    common.embed_and_head(inv, cfg, vocab, d, tie, head_bias=(cfg.bool("lm_head_bias", False) if model_type == "phimoe"
                                                              else s.head_bias(cfg)),
                          final_norm_bias=s.layernorm_bias)
    return ModelSpec(model_type=model_type, family=s.family, hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_position_embeddings"), torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"),
                     quantization=common.quantization(cfg))


def _moe_block(inv: Inventory, i: int, d: int, moe: MoESpec, s: Style, cfg: Cfg) -> None:
    E, F = moe.num_experts, moe.expert_ffn
    inv.linear(f"layers.{i}.router", "router", E, d, i, bias=moe.router.bias)  # [E, D]
    inv.swiglu(f"layers.{i}.experts", "routed_experts", d, F, i, copies=E, bias=s.fused_gate_up_bias)
    if s.correction_bias_param:
        inv.add(f"layers.{i}.router.correction_bias", "router", (1, E), i)
    if s.shared_experts and moe.shared_ffn:
        inv.swiglu(f"layers.{i}.{s.shared_name}", "shared_experts", d, moe.shared_ffn, i, bias=s.mlp_bias(cfg))
    if s.shared_expert:
        inv.swiglu(f"layers.{i}.shared_expert", "shared_experts", d, moe.shared_ffn, i)
        inv.linear(f"layers.{i}.shared_expert_gate", "shared_experts", 1, d, i)  # [1, D]


def register(table: dict) -> None:
    for mt in STYLES:
        table[mt] = lambda cfg, mt=mt: adapt(cfg, mt)
