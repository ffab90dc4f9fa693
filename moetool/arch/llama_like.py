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

from ..errors import BadConfig
from ..spec import Cfg, Inventory, ModelSpec, MoESpec, RouterSpec
from . import common, minimax_m3

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
    shared_expert: bool = False  # Qwen2-MoE: one shared expert + sigmoid gate [1, D]
    fused_gate_up_bias: bool = False  # gpt-oss: expert biases, router bias, attention sinks
    router: Callable[[Cfg], RouterSpec] = lambda c: RouterSpec()
    dense: bool = False
    lm_head_bias: bool = False
    # --- added for the families of transformers 5.x (all optional; defaults keep the above as they were)
    windows: common.WindowRule = "all"  # sliding-window rule without layer_types (common.layer_windows)
    moe_schedule: Optional[Callable[[Cfg, int], list[bool]]] = None  # overrides `schedule` when set
    dense_ffn_key: str = "intermediate_size"
    sinks: Callable[[Cfg, int], bool] = lambda c, i: False  # attention sinks [H] on layer i
    attn_gate: str | Callable[[Cfg], str] = "none"  # output gate "full" [H*Dh, D] or "per_head" [H, D]
    attn_gate_bias: bool = False  # a learned [H] bias of the gate (Beam)
    dims: Optional[Callable[[Cfg, int, int], tuple[int, int, int, int]]] = None  # (H, Hkv, Dh, Dv) of layer i
    extra_norms: int = 0  # further [D] norms in every layer (pre/post feed-forward norms ...)
    moe_norms: int = 0  # further [D] norms in MoE layers only
    shared_ffn: Optional[Callable[[Cfg], int]] = None  # shared experts' total FFN size (0: none)
    n_shared: Optional[Callable[[Cfg], int]] = None  # how many shared experts that FFN fuses (default 1)
    shared_gate: bool = False  # the shared expert's sigmoid gate [1, D]
    router_bias_param: str = ""  # a selection bias [E] built as a parameter: its stored name (AFMoE `expert_bias`)
    expert_bias: bool = False  # biases on the routed experts' projections (gpt-oss)
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok", "experts_per_token")
    head: Literal["lm_head", "classifier"] = "lm_head"  # classifier: `score` [num_labels, D] + bias
    mlp_bias: Callable[[Cfg], bool] = lambda c: False  # biases in dense MLPs and shared experts
    head_bias: Callable[[Cfg], bool] = lambda c: False
    correction_bias_param: bool = False  # a counted [1, E] correction-bias parameter (Ernie 4.5 `moe_statics`)
    tie_default: bool = False  # tie_word_embeddings when the config does not say (Cohere: true)
    parallel_block: bool = False  # Cohere: one norm per layer, attention and FFN in parallel
    layer_extra: Optional[Callable[[Inventory, Cfg, int, int], None]] = None  # (inv, cfg, layer, D): more params of a layer


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
    # --- transformers 5.x families: Qwen3-MoE-like decoders that differ in data only --------------
    # JetBrains Mellum: Qwen3-MoE attention, `mlp_layer_types`.
    "mellum": Style("mellum", experts_keys=("num_local_experts", "num_experts"), expert_ffn_key="moe_intermediate_size",
                    bias=_attention_bias("attention_bias", False, "all"), qk_norm="head", moe_schedule=lambda c, n: mlp_layer_types(c, n),
                    router=lambda c: RouterSpec(norm_topk_prob=c.bool("norm_topk_prob", True))),
    # Kolibri-1: four norms a layer, one shared expert of `shared_expert_intermediate_size`, all layers MoE.
    "kolibri1": Style("kolibri1", experts_keys=("num_local_experts", "num_experts"), expert_ffn_key="moe_intermediate_size",
                      qk_norm="head", extra_norms=2, shared_ffn=lambda c: c.int("shared_expert_intermediate_size", 0),
                      router=lambda c: RouterSpec(order="topk_then_score", scoring="sigmoid", correction_bias=True,
                                                  norm_topk_prob=c.bool("norm_topk_prob", False))),
    # Laguna: per-layer head counts, a softplus output gate per head (or per channel), shared expert.
    "laguna": Style("laguna", experts_keys=("num_experts", "num_local_experts"), expert_ffn_key="moe_intermediate_size",
                    bias=_attention_bias("attention_bias", False, "all"), qk_norm="head",
                    attn_gate=lambda c: "per_head" if c.raw("gating", True) in (True, "per-head") else "full", dims=lambda c, i, d: _laguna_dims(c, i, d), moe_schedule=lambda c, n: mlp_layer_types(c, n),
                    shared_ffn=lambda c: c.int("shared_expert_intermediate_size", 0),
                    router_bias_param="e_score_correction_bias",
                    # moe_routed_scaling_factor scales the routed sum after the experts (forward/config.py)
                    router=lambda c: RouterSpec(scoring="sigmoid", correction_bias=True)),
    # Tencent HY-V3: shared experts of moe_intermediate_size x num_shared_experts, `mlp_layer_types`.
    "hy_v3": Style("hy_v3", experts_keys=("num_experts", "num_local_experts"), expert_ffn_key="moe_intermediate_size",
                   bias=_attention_bias("attention_bias", False, "all"), qk_norm="head", moe_schedule=lambda c, n: mlp_layer_types(c, n),
                   shared_ffn=lambda c: c.int("moe_intermediate_size") * c.int("num_shared_experts", 1),
                   n_shared=lambda c: c.int("num_shared_experts", 1),
                   router=lambda c: RouterSpec(scoring="sigmoid", correction_bias=True,
                                               routed_scaling_factor=c.float("router_scaling_factor", 1.0))),
    # Flint: sinks on every layer, ungated shared expert, Qwen-style `mlp_only_layers` / sparse step.
    "flint": Style("flint", experts_keys=("num_experts", "num_local_experts"), expert_ffn_key="moe_intermediate_size",
                   bias=_attention_bias("attention_bias", False, "all"), qk_norm="head", schedule="sparse_step",
                   sinks=lambda c, i: True, shared_ffn=lambda c: c.int("shared_expert_intermediate_size", 0),
                   router=lambda c: RouterSpec(scoring="sigmoid", norm_topk_prob=c.bool("norm_topk_prob", True))),
    # Beam: gated attention output with a per-head gate bias, sandwich norms, `mlp_layer_types`.
    "beam": Style("beam", experts_keys=("num_experts", "num_local_experts"), expert_ffn_key="moe_intermediate_size",
                  bias=_attention_bias("attention_bias", False, "all"), qk_norm="head", attn_gate="full",
                  attn_gate_bias=True, extra_norms=2, moe_schedule=lambda c, n: mlp_layer_types(c, n),
                  # routed_scaling_factor scales the routed sum after the experts (forward/config.py)
                  router=lambda c: RouterSpec(scoring="sigmoid", correction_bias=True, topk_method="noaux_tc",
                                              norm_topk_prob=c.bool("norm_topk_prob", True),
                                              n_group=c.int("n_group", 1), topk_group=c.int("topk_group", 1))),
    # Arcee AFMoE: gated attention output, sandwich norms, first `num_dense_layers` dense, shared experts
    # of moe_intermediate_size x num_shared_experts, a selection bias stored as a parameter.
    "afmoe": Style("afmoe", experts_keys=("num_experts", "num_local_experts"), expert_ffn_key="moe_intermediate_size",
                   bias=_attention_bias("attention_bias", False, "all"), qk_norm="head", attn_gate="full",
                   extra_norms=2, moe_schedule=lambda c, n: first_dense("num_dense_layers", 1)(c, n),
                   shared_ffn=lambda c: c.int("moe_intermediate_size") * c.int("num_shared_experts", 2),
                   n_shared=lambda c: c.int("num_shared_experts", 2),
                   router_bias_param="expert_bias",
                   router=lambda c: RouterSpec(scoring="sigmoid", correction_bias=True,
                                               routed_scaling_factor=c.float("route_scale", 1.0))),
    # IBM GraniteMoE-SWA: sinks on every layer, optional shared MLP of `shared_intermediate_size`.
    "granitemoe_swa": Style("granitemoe_swa", bias=_attention_bias("attention_bias", False, "all"), sinks=lambda c, i: True,
                            shared_ffn=lambda c: c.int("shared_intermediate_size", 0),
                            router=lambda c: RouterSpec(order="topk_then_score")),
    # OpenAI privacy filter: gpt-oss layers under a token-classification head (`score`).
    "openai_privacy_filter": Style("openai_privacy_filter", bias=_attention_bias("attention_bias", True, "all"),
                                   fused_gate_up_bias=True, head="classifier",
                                   # softmax of the top-k logits / k (the routed sum is times k: forward/config.py)
                                   router=lambda c: RouterSpec(order="topk_then_score", bias=True,
                                                               routed_scaling_factor=1.0 / c.int("num_experts_per_tok", 4))),
    # Xiaomi MiMo-V2-Flash: sliding layers have twice the KV heads and sinks; V heads narrower.
    "mimo_v2_flash": Style("mimo_v2_flash", experts_keys=("n_routed_experts", "num_experts"),
                           expert_ffn_key="moe_intermediate_size", bias=_attention_bias("attention_bias", False, "qkv"),
                           sinks=lambda c, i: _layer_type(c, i) == "sliding_attention",
                           dims=lambda c, i, d: _mimo_dims(c, i, d), moe_schedule=lambda c, n: mlp_layer_types(c, n),
                           router=lambda c: RouterSpec(scoring="sigmoid", correction_bias=True, topk_method="noaux_tc",
                                                       norm_topk_prob=c.bool("norm_topk_prob", True),
                                                       n_group=c.int("n_group", 1, min_value=1),
                                                       topk_group=c.int("topk_group", 1, min_value=1),
                                                       routed_scaling_factor=c.float("routed_scaling_factor", 1.0))),
    # rhymes-ai/Aria (text part): every layer MoE, shared experts of intermediate_size x moe_num_shared_experts.
    "aria_text": Style("aria_text", experts_keys=("moe_num_experts",), top_k_keys=("moe_topk",),
                       bias=_attention_bias("attention_bias", False, "all"), mlp_bias=lambda c: c.bool("mlp_bias", False),
                       router=lambda c: RouterSpec(order="topk_then_score"),  # softmax over the top-k logits
                       shared_ffn=lambda c: c.int("intermediate_size") * c.int("moe_num_shared_experts", 2),
                       n_shared=lambda c: c.int("moe_num_shared_experts", 2)),
    # MiniMax-M3 (text part): every `mlp_layer_types` "sparse" layer MoE with a fused shared expert
    # of `shared_intermediate_size`; dense layers of `dense_intermediate_size`; a lightning indexer on
    # the block-sparse attention layers (arch/minimax_m3.py).
    "minimax_m3_vl_text": Style("minimax_m3_vl_text", experts_keys=("num_local_experts", "num_experts"),
                                dense_ffn_key="dense_intermediate_size", qk_norm="head",
                                moe_schedule=lambda c, n: minimax_m3.moe_schedule(c, n),
                                shared_ffn=lambda c: c.int("shared_intermediate_size", 0),
                                layer_extra=lambda inv, c, i, d: minimax_m3.indexer_params(inv, c, i, d),
                                router=lambda c: RouterSpec(scoring="sigmoid", correction_bias=True,
                                                            routed_scaling_factor=c.float("routed_scaling_factor", 1.0))),
    # StepFun Step-3.7 (step3p7, text part): Laguna's attention (QK-norm per head, a sigmoid output gate
    # per head, sliding layers with `num_sliding_attention_heads` / per_layer_config heads), MiniMax-M3's
    # MoE (sigmoid router with a correction bias, an always-on shared expert of `share_expert_dim`);
    # MoE per `mlp_layer_types` (else `moe_layers_enum`, else layers 3 and up).
    "step3p7_text": Style("step3p7_text", experts_keys=("n_routed_experts", "num_local_experts", "num_experts"),
                          expert_ffn_key="moe_intermediate_size", bias=_attention_bias("attention_bias", False, "all"),
                          qk_norm="head", attn_gate=lambda c: "per_head" if c.raw("gating", True) in (True, "per-head") else "full",
                          dims=lambda c, i, d: _step3p7_dims(c, i, d), moe_schedule=lambda c, n: _step3p7_schedule(c, n),
                          shared_ffn=lambda c: c.int("share_expert_dim", 1280), windows="layer_types",
                          # moe_router_scaling_factor scales the routed sum after the experts (forward/step3p7.py)
                          router=lambda c: RouterSpec(scoring="sigmoid", correction_bias=True)),
    "llama": Style("llama", dense=True, windows="none", bias=_attention_bias("attention_bias", False, "all")),
    "mistral": Style("mistral", dense=True),
    "qwen2": Style("qwen2", dense=True, windows="qwen2", bias="qkv"),
    "qwen3": Style("qwen3", dense=True, windows="qwen2", bias=_attention_bias("attention_bias", False, "all"), qk_norm="head"),
}


def adapt(cfg: Cfg, model_type: str, style: Optional[Style] = None) -> ModelSpec:
    s = style or STYLES[model_type]
    if s.fused_gate_up_bias:  # gpt-oss: expert biases, router bias, sinks on every layer
        s = replace(s, expert_bias=True, sinks=lambda c, i: True)
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n_layers = cfg.int("num_hidden_layers", min_value=1)
    heads, kv_heads, hd = common.attention_dims(cfg, d)
    tie = common.tie_embeddings(cfg, s.tie_default)
    bias = s.bias(cfg) if callable(s.bias) else s.bias

    moe: Optional[MoESpec] = None
    if not s.dense:
        experts = cfg.first_int(list(s.experts_keys), min_value=1)
        k = cfg.first_int(list(s.top_k_keys), min_value=1)
        shared_ffn = cfg.int("shared_expert_intermediate_size", min_value=1) if s.shared_expert else 0
        n_shared = 1 if s.shared_expert else 0
        if s.shared_ffn is not None:
            shared_ffn = s.shared_ffn(cfg)
            n_shared = (s.n_shared(cfg) if s.n_shared else 1) if shared_ffn else 0
        moe = MoESpec(num_experts=experts, top_k=k, expert_ffn=cfg.int(s.expert_ffn_key, min_value=1),
                      num_shared_experts=n_shared, shared_ffn=shared_ffn, router=s.router(cfg),
                      activation=cfg.str("hidden_act", "silu"))
    if s.moe_schedule is not None:
        is_moe = [moe is not None and m for m in s.moe_schedule(cfg, n_layers)]
    elif s.schedule == "sparse_step":
        is_moe = common.sparse_step_schedule(cfg, n_layers, moe is not None)
    else:
        is_moe = [moe is not None] * n_layers
    windows = common.layer_windows(cfg, n_layers, s.windows)

    inv = Inventory()
    layers = []
    for i in range(n_layers):
        v_hd = hd
        if s.dims is not None:
            heads, kv_heads, hd, v_hd = s.dims(cfg, i, d)
        if v_hd == hd:
            inv.gqa(i, d, heads, kv_heads, hd, qkv_bias=bias != "none", o_bias=bias == "all")
        else:  # value heads narrower than query / key heads (MiMo-V2-Flash)
            a = f"layers.{i}.attn"
            inv.linear(f"{a}.q", "attention", heads * hd, d, i, bias != "none")
            inv.linear(f"{a}.k", "attention", kv_heads * hd, d, i, bias != "none")
            inv.linear(f"{a}.v", "attention", kv_heads * v_hd, d, i, bias != "none")
            inv.linear(f"{a}.o", "attention", d, heads * v_hd, i, bias == "all")
        if s.sinks(cfg, i):
            inv.add(f"layers.{i}.attn.sinks", "attention", (heads,), i)
        gate = s.attn_gate(cfg) if callable(s.attn_gate) else s.attn_gate
        if gate != "none":
            inv.linear(f"layers.{i}.attn.gate", "attention", heads * hd if gate == "full" else heads, d, i)
        if s.attn_gate_bias:
            inv.add(f"layers.{i}.attn.gate_bias", "attention", (heads,), i)
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
        for j in range(s.extra_norms + (s.moe_norms if is_moe[i] else 0)):
            inv.norm(f"layers.{i}.extra_norm_{j}", d, i)
        if s.layer_extra is not None:
            s.layer_extra(inv, cfg, i, d)
        if is_moe[i]:
            _moe_block(inv, i, d, moe, s, cfg)
        else:
            inv.swiglu(f"layers.{i}.mlp", "dense_mlp", d, cfg.int(s.dense_ffn_key, min_value=1), i, bias=s.mlp_bias(cfg))
        layers.append(common.gqa_layer(i, heads, kv_heads, hd, is_moe[i], windows[i], v_head_dim=v_hd))
    if s.head == "classifier":  # token classification: `score` [num_labels, D] + bias instead of an LM head
        inv.add("embed.weight", "embedding", (vocab, d))
        inv.norm("final_norm", d)
        inv.linear("score", "lm_head", _num_labels(cfg), d, bias=True)
    else:
        common.embed_and_head(inv, cfg, vocab, d, tie, head_bias=(cfg.bool("lm_head_bias", False) if model_type == "phimoe"
                                                                  else s.head_bias(cfg)),
                              final_norm_bias=s.layernorm_bias)
    return ModelSpec(model_type=model_type, family=s.family, hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_position_embeddings"), torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"),
                     quantization=common.quantization(cfg),
                     param_buffers=(s.router_bias_param,) if s.router_bias_param else ())


def _num_labels(cfg: Cfg) -> int:
    labels = cfg.raw("id2label")
    if isinstance(labels, dict) and labels:
        return len(labels)
    return cfg.int("num_labels", 2, min_value=1)


def _moe_block(inv: Inventory, i: int, d: int, moe: MoESpec, s: Style, cfg: Cfg) -> None:
    E, F = moe.num_experts, moe.expert_ffn
    inv.linear(f"layers.{i}.router", "router", E, d, i, bias=moe.router.bias)  # [E, D]
    if s.correction_bias_param:
        inv.add(f"layers.{i}.router.correction_bias", "router", (1, E), i)
    if s.router_bias_param:
        inv.add(f"layers.{i}.router.expert_bias", "router", (E,), i)
    inv.swiglu(f"layers.{i}.experts", "routed_experts", d, F, i, copies=E, bias=s.expert_bias)
    if moe.num_shared_experts:
        inv.swiglu(f"layers.{i}.shared_expert", "shared_experts", d, moe.shared_ffn, i, bias=s.mlp_bias(cfg))
    if s.shared_expert or s.shared_gate:
        inv.linear(f"layers.{i}.shared_expert_gate", "shared_experts", 1, d, i)  # [1, D]


# Layer schedules of the newer families (which layers are MoE).
def mlp_layer_types(cfg: Cfg, n: int) -> list[bool]:
    """`mlp_layer_types`: "sparse" / "dense" per layer (transformers 5)."""
    types = cfg.str_list("mlp_layer_types")
    if len(types) < n:
        raise BadConfig(f"{cfg.where}: mlp_layer_types has {len(types)} entries for {n} layers")
    return [t == "sparse" for t in types[:n]]


def first_dense(key: str, default: int) -> Callable[[Cfg, int], list[bool]]:
    """The first `key` layers dense, all others MoE."""
    return lambda c, n: [i >= c.int(key, default) for i in range(n)]


def _laguna_dims(cfg: Cfg, i: int, d: int) -> tuple[int, int, int, int]:
    heads, kv, hd = common.attention_dims(cfg, d)
    per_layer = cfg.int_list("num_attention_heads_per_layer", [])
    heads = per_layer[i] if i < len(per_layer) else heads
    return heads, kv, hd, hd


def _mimo_dims(cfg: Cfg, i: int, d: int) -> tuple[int, int, int, int]:
    heads, kv, hd = common.attention_dims(cfg, d)
    if _layer_type(cfg, i) == "sliding_attention":
        kv *= 2
    return heads, kv, hd, cfg.int("v_head_dim", hd, min_value=1)


def _step3p7_dims(cfg: Cfg, i: int, d: int) -> tuple[int, int, int, int]:
    """Step3p7TextConfig: per_layer_config overrides; without it sliding layers have
    `num_sliding_attention_heads` (legacy: attention_other_setting.num_attention_heads)."""
    heads, kv, hd = common.attention_dims(cfg, d)
    per = cfg.raw("per_layer_config")
    if isinstance(per, dict) and per:
        o = next((v for k, v in per.items() if str(k).isdigit() and int(k) == i), None)
        o = Cfg(o if isinstance(o, dict) else {}, f"{cfg.where}[per_layer_config][{i}]")
        return o.int("num_attention_heads", heads, min_value=1), o.int("num_key_value_heads", kv, min_value=1), hd, hd
    if _layer_type(cfg, i) == "sliding_attention":
        other = cfg.raw("attention_other_setting")
        legacy = other.get("num_attention_heads", heads) if isinstance(other, dict) else heads
        heads = cfg.int("num_sliding_attention_heads", int(legacy), min_value=1)
    return heads, kv, hd, hd


def _step3p7_schedule(cfg: Cfg, n: int) -> list[bool]:
    if cfg.has("mlp_layer_types"):
        return mlp_layer_types(cfg, n)
    enum = cfg.raw("moe_layers_enum")
    if enum is not None:
        items = enum.split(",") if isinstance(enum, str) else enum
        moe = {int(x) for x in items if str(x).strip()}
    else:
        moe = set(range(3, n))
    return [i in moe for i in range(n)]


def _layer_type(cfg: Cfg, i: int) -> str:
    types = cfg.str_list("layer_types", [])
    return types[i] if i < len(types) else "full_attention"


def register(table: dict) -> None:
    for mt in STYLES:
        table[mt] = lambda cfg, mt=mt: adapt(cfg, mt)
