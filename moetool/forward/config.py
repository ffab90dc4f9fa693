"""What the forward pass needs beyond the ModelSpec: norms, RoPE, attention variants, multipliers.

Read once from config.json with the family's upstream defaults (transformers' configuration_*.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, Optional

import torch

from ..errors import BadConfig, UnsupportedArchitecture
from ..spec import Cfg, ModelSpec
from .hyper import HyperConfig
from . import sparse_variants
from .mixers import gated_deltanet, kda, lightning, mamba, mamba2, short_conv

FORWARD_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
                    "gpt_oss", "granitemoe", "phimoe", "dbrx", "llama4", "glm4_moe_lite", "deepseek_v32",
                    "mistral4", "jetmoe")

# Families (moetool/arch/text_moe.py) whose forward is the Llama-like one with these settings:
# rope_layout: "interleave" pairs (2i, 2i+1) instead of rotate-half; theta: default rope_theta.
FAMILY_FORWARD: dict[str, dict] = {
    "ernie4_5_moe": dict(rope_layout="interleave", theta=500000.0),
    "hunyuan_v1_moe": dict(qk_norm="head_after_rope"),
    "flex_olmo": dict(qk_norm="full", theta=500000.0,
                      layer_norms=(None, "post_attention_layernorm", None, "post_feedforward_layernorm")),
    "minimax_m2": dict(qk_norm="full", theta=5000000.0),
    "dots1": dict(qk_norm="head"),
    "granitemoeshared": dict(),  # GraniteMoE's multipliers (below) plus the shared MLP
    "solar_open": dict(theta=1e6),
    "exaone_moe": dict(qk_norm="head", rope_on_sliding_only=True),
    "cohere2_moe": dict(rope_layout="interleave", layer_norms=("input_layernorm", None, None, None), parallel_block=True),
}
# Issue 11, trace of the families count already handled (tests/test_trace_text_families.py).
# partial_rotary: the partial_rotary_factor of a per-layer-type RoPE entry that gives none.
# Norm names: transformers' or, as save_pretrained writes them back, the original checkpoint's (conversion_mapping.py).
_SANDWICH = ("input_layernorm", ("post_self_attn_layernorm", "post_attn_norm"), "post_attention_layernorm",
             ("post_mlp_layernorm", "post_ffn_norm"))
FAMILY_FORWARD["kolibri1"] = dict(qk_norm="head", rope_on_sliding_only=True, layer_norms=_SANDWICH)
FAMILY_FORWARD["mellum"] = dict(qk_norm="head")
FAMILY_FORWARD["hy_v3"] = dict(qk_norm="head", theta=11_158_840.0)
FAMILY_FORWARD["flint"] = dict(qk_norm="head", rope_on_sliding_only="always")
FAMILY_FORWARD["granitemoe_swa"] = dict(layer_theta_key="layer_rope_theta")  # GraniteMoE's multipliers (below)
FAMILY_FORWARD["afmoe"] = dict(qk_norm="head", rope_on_sliding_only="always", mup_key="mup_enabled",
                               layer_norms=("input_layernorm", "post_attention_layernorm", "pre_mlp_layernorm",
                                            "post_mlp_layernorm"),
                               out_gate=dict(proj=("self_attn.gate_proj.weight",), act="sigmoid"))
FAMILY_FORWARD["laguna"] = dict(qk_norm="head", out_gate=dict(proj=("self_attn.g_proj.weight",), act="softplus"),
                                fields=dict(routed_scale=("moe_routed_scaling_factor", 1.0),
                                            router_softcap=("moe_router_logit_softcapping", 0.0)))
FAMILY_FORWARD["beam"] = dict(qk_norm="head", query_scale_nope="beam", depth_scaled_residual=True,
                              layer_norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                           "post_feedforward_layernorm"),
                              out_gate=dict(proj=("self_attn.gate_proj.weight",), act="sigmoid", bias="self_attn.gate_bias"),
                              fields=dict(routed_scale=("routed_scaling_factor", 2.5),
                                          final_softcap=("final_logit_softcapping", 0.0)))
# OpenAI privacy filter: gpt-oss's layers as a bidirectional encoder (|i - j| <= sliding_window), experts
# with concatenated [gate | up]; router weights softmax / k, the routed sum times k; `score` head.
FAMILY_FORWARD["openai_privacy_filter"] = dict(bidirectional=True, expert_act="gpt_oss", theta=150000.0,
                                               rope_layout="interleave",
                                               fields=dict(swiglu_limit=("swiglu_limit", 7.0),
                                                           swiglu_alpha=("swiglu_alpha", 1.702),
                                                           routed_scale=("num_experts_per_tok", 4)))
FAMILY_FORWARD["mimo_v2_flash"] = dict(partial_rotary=0.334, fields=dict(value_scale=("attention_value_scale", 0.707)))
FORWARD_FAMILIES += tuple(FAMILY_FORWARD)
FORWARD_FAMILIES += ("longcat_flash",)  # two sublayers and a shortcut MoE per layer: forward/longcat.py
FORWARD_FAMILIES += ("axk1",)  # DeepSeek-V3 (MLA) with a norm on the MoE output: the DeepSeek branch below
FORWARD_FAMILIES += ("glm_moe_dsa",)  # GLM-5: DeepSeek-V3.2 with the indexer on "full" layers only (below)
FORWARD_FAMILIES += ("mistral_large4", "dots3")  # DSA variants with attention of their own (forward/sparse_variants.py)
FORWARD_FAMILIES += ("axk2",)  # A.X-K2: DeepSeek-V3.2 with a fused query + output-gate projection, gated RMSNorms
FORWARD_FAMILIES += ("deepseek_v4",)  # DeepSeek-V4: its attention in forward/deepseek_v4.py, hyper-connections
FORWARD_FAMILIES += ("hy_v4",)  # HY-V4: GLM-5's MLA + indexer, sinks, output gate, hyper-connections (forward/hyper.py)
TEXT_CONFIG_WRAPPERS = ("qwen3_5_moe", "mistral_large4")
# Hybrid families: some layers mix tokens with a recurrent mixer (moetool/forward/mixers/).
FORWARD_FAMILIES += ("jamba", "qwen3_next", "granitemoehybrid", "lfm2_moe", "nemotron_h", "minimax", "kimi_linear")  # qwen3_next: also Qwen3.5-MoE's text model
FORWARD_FAMILIES += ("bailing_hybrid",)  # Ling 3.0: KDA (forward/mixers/kda.py) and gated MLA (_bailing_hybrid)
FORWARD_FAMILIES += ("qwen4_exp_text",)  # Qwen4-Exp: hyper-connections, PLE, QSA indexer (forward/qwen4_exp.py)
# Encoder-decoder families: their own forward (forward/encdec.py), run by `trace` only.
ENCDEC_FAMILIES = ("switch_transformers", "nllb_moe")
FORWARD_FAMILIES += ENCDEC_FAMILIES
# Aria's text model (routed experts always SiLU-gated, whatever hidden_act) and MiniMax-M3's
# ((1 + w) RMSNorms, clamped SwiGLU, block-sparse attention: _minimax_m3 below).
FAMILY_FORWARD.update({"aria_text": dict(routed_act="silu"), "minimax_m3_vl_text": dict(qk_norm="head", theta=5e6),
                       "qwen3_vl_moe_text": dict(qk_norm="head", theta=500000.0),
                       "qwen3_omni_moe_text": dict(qk_norm="head", theta=1e6)})
# Multimodal families (moetool/arch/multimodal.py): `trace` runs the language model on text-only input,
# its fields read from `text_config`, as the text family named here; the vision / audio towers are not
# run (no image or audio input). Multimodal RoPE (Qwen3-VL's interleaved MRoPE, GLM-4V's mrope_section)
# gives every section the same text position then, which is ordinary RoPE (tests/test_trace_multimodal.py).
MULTIMODAL_FORWARD = {"aria": "aria_text", "glm4v_moe": "glm4_moe", "qwen3_vl_moe": "qwen3_vl_moe_text",
                      "qwen3_omni_moe_thinker": "qwen3_omni_moe_text", "minimax_m3_vl": "minimax_m3_vl_text",
                      "dots3_note": "dots3", "qwen4_exp": "qwen4_exp_text"}
MULTIMODAL_FORWARD["gemma4"] = "gemma4_text"
FORWARD_FAMILIES += ("aria_text", "minimax_m3_vl_text", *MULTIMODAL_FORWARD)
# StepFun Step-3.7's language model: Laguna's attention with a sigmoid gate, (1 + w) norms, clamped SwiGLU
# per layer, the routed sum scaled after the experts (forward/step3p7.py; fields from text_config).
FAMILY_FORWARD["step3p7_text"] = dict(qk_norm="head", out_gate=dict(proj=("self_attn.g_proj.weight",), act="sigmoid"),
                                      fields=dict(routed_scale=("moe_router_scaling_factor", 1.0)))
MULTIMODAL_FORWARD["step3p7"] = "step3p7_text"
FORWARD_FAMILIES += ("step3p7",)
FORWARD_FAMILIES += ("zaya",)  # ZAYA1: CCA attention, a router MLP with a state across layers, residual scalings (forward/zaya.py)
FORWARD_FAMILIES += ("gemma4_text",)  # per-layer inputs, KV sharing, MoE beside the dense MLP: forward/gemma4.py
FORWARD_FAMILIES += ("diffusion_gemma",)  # Gemma 4's text model as encoder + one denoising step: forward/diffusion_gemma.py
# Inkling and Inkling 2: relative logits, short convolutions, block attention residuals (forward/inkling.py);
# Inkling 2's image-text model runs its language model on text-only input.
MULTIMODAL_FORWARD.update({"inkling2": "inkling2_text", "inkling_mm_model": "inkling"})
FORWARD_FAMILIES += ("inkling", "inkling2_text", "inkling2", "inkling_mm_model")
# Issue 11, session 3 (tests/test_trace_mm_gap.py): NeMo SpeechLM's language model is Nemotron-H (the
# ASR encoder, diarization model and word-timestamp head are not run).
MULTIMODAL_FORWARD["nemo_speechlm"] = "nemotron_h"
FORWARD_FAMILIES += ("nemo_speechlm",)
# Unlimited-OCR's language model: Llama-like GQA attention (head_dim always hidden_size / heads) with
# DeepSeek-V2's softmax router (greedy or group-limited, unnormalised weights times routed_scaling_factor)
# and shared experts. Its "reference sliding window" keeps every prefill token: a prompt attends in full.
# Generated tokens past sliding_window are evicted there: forward/cache.py's generate refuses more.
FAMILY_FORWARD["unlimited_ocr_text"] = dict(theta=10000.0, fields=dict(reference_window=("sliding_window", 0.0)))
MULTIMODAL_FORWARD["unlimited_ocr"] = "unlimited_ocr_text"
FORWARD_FAMILIES += ("unlimited_ocr",)
# DeepSeek-OCR-2's language model: transformers builds Unlimited-OCR's text modules, attention plainly causal
# (its text config has no sliding_window, so the reference window is off): run as unlimited_ocr_text.
MULTIMODAL_FORWARD["deepseek_ocr2"] = "unlimited_ocr_text"
FORWARD_FAMILIES += ("deepseek_ocr2",)
# ERNIE-4.5-VL-MoE's language model: ERNIE-4.5-MoE's, text tokens routed to the text experts only (the
# vision experts serve image / video tokens). Its 3-D RoPE with one position for all three sections is
# ERNIE's interleaved RoPE. transformers' names put the text experts under mlp.text_moe.; the published
# checkpoints keep one expert list (text first), routers [D, E] and the correction biases as [2, E] rows
# (model.py's moe reads those).
FAMILY_FORWARD["ernie4_5_vl_moe_text"] = dict(
    rope_layout="interleave", theta=500000.0,
    name_aliases=(("mlp.gate.", "mlp.text_moe.gate."), ("mlp.experts.", "mlp.text_moe.experts."),
                  ("mlp.moe_statics.", "mlp.text_moe.gate.moe_statics.")))
MULTIMODAL_FORWARD["ernie4_5_vl_moe"] = "ernie4_5_vl_moe_text"
# Qwen3-Omni whole (arch/qwen3_omni.py): its thinker's language model on text-only input, the text model's
# fields under thinker_config.text_config (the towers, the talker and code2wav are not run).
MULTIMODAL_FORWARD["qwen3_omni_moe"] = "qwen3_omni_moe_text"
FORWARD_FAMILIES += ("qwen3_omni_moe",)
NESTED_TEXT = {"qwen3_omni_moe": "thinker_config"}  # multimodal families whose text_config is one level down
FORWARD_FAMILIES += ("ernie4_5_vl_moe",)
# Muse Spark's language model (forward/muse_spark.py): normed embeddings, centred / input-scaled RMSNorms,
# residual gates, gated attention with scaleless QK norms, experts in a projected space (moe_hidden_size).
FAMILY_FORWARD["muse_spark_text"] = dict(theta=500000.0)
MULTIMODAL_FORWARD["muse_spark"] = "muse_spark_text"
FORWARD_FAMILIES += ("muse_spark",)
# GLM-5.3-Flash's language model (_glm5_next below): KDA layers, NoPE MLA with GLM-5's indexer plus k-pool
# compression, clamped SwiGLU everywhere, DeepSeek-V4's hyper-connections with an unweighted mean at the head.
MULTIMODAL_FORWARD["glm5_next"] = "glm5_next_text"
FORWARD_FAMILIES += ("glm5_next",)


# transformers' defaults when a config gives no rope_theta.
ROPE_THETA_DEFAULTS = {"mixtral": 1e6, "phimoe": 1e6, "qwen2_moe": 1e6, "qwen3_moe": 1e6, "olmoe": 1e4,
                       "granitemoe": 1e4, "gpt_oss": 150000.0, "llama4": 500000.0, "glm4_moe": 1e4,
                       "deepseek_v2": 1e4, "deepseek_v3": 1e4, "bailing_hybrid": 6e6}


@dataclass
class Rope:
    theta: float
    dim: int  # rotary dimensions (partial rotary: fewer than head_dim)
    kind: str = "default"  # default | linear | llama3 | yarn | longrope
    params: dict = field(default_factory=dict)
    layout: Literal["half", "interleave"] = "half"  # rotate_half (split halves) or (x0, x1) pairs
    max_position_embeddings: Optional[int] = None

    def inv_freq_and_factor(self, seq_len: int) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [dim/2] and the cos/sin scale, as transformers' rope init functions."""
        d, base, p = self.dim, self.theta, self.params
        inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d))
        if self.kind == "dynamic" and p.get("alpha"):  # HunYuan: NTK with a fixed alpha stretches the base
            base = base * float(p["alpha"]) ** (d / (d - 2))
            return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d)), 1.0
        if self.kind in ("default", "dynamic") or not p:
            return inv, 1.0
        factor = float(p.get("factor", 1.0))
        if self.kind == "linear":
            return inv / factor, 1.0
        if self.kind == "llama3":
            low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
            old = float(p["original_max_position_embeddings"])
            low_wl, high_wl = old / low, old / high
            wavelen = 2 * math.pi / inv
            out = torch.where(wavelen > low_wl, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low) if high != low else torch.zeros_like(inv)
            smoothed = (1 - smooth) * out / factor + smooth * out
            medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
            return torch.where(medium, smoothed, out), 1.0
        if self.kind == "yarn":
            return _yarn(d, base, p, self.max_position_embeddings)
        if self.kind == "longrope":
            orig = int(p.get("original_max_position_embeddings") or self.max_position_embeddings)
            ext = p["long_factor"] if seq_len > orig else p["short_factor"]
            if len(ext) != d // 2:
                raise BadConfig(f"config.json: rope_scaling long_factor / short_factor must hold {d // 2} numbers "
                                f"(rotary dimensions / 2), not {len(ext)}")
            ext = torch.tensor(ext, dtype=torch.float32)
            inv = 1.0 / (ext * base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
            scale = (self.max_position_embeddings or orig) / orig
            attn = p.get("attention_factor") or (1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(orig)))
            # Phi-MoE stores its own cos/sin scales for the two regimes.
            mscale = p.get("long_mscale") if seq_len > orig else p.get("short_mscale")
            return inv, float(mscale if mscale is not None else attn)
        raise UnsupportedArchitecture(f"RoPE scaling type {self.kind!r} is not supported by the reference forward")


def _mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def _yarn(d: int, base: float, p: dict, max_pos: Optional[int]) -> tuple[torch.Tensor, float]:
    factor = float(p["factor"])
    orig = float(p.get("original_max_position_embeddings") or max_pos)
    attn = p.get("attention_factor")
    m, m_all = p.get("mscale"), p.get("mscale_all_dim")
    if attn is None:
        attn = _mscale(factor, m) / _mscale(factor, m_all) if m and m_all else _mscale(factor)
    beta_fast, beta_slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)

    def corr(rot: float) -> float:
        return (d * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr(beta_fast), corr(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos = base ** (torch.arange(0, d, 2).float() / d)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos)) * (1 - extra) + (1.0 / pos) * extra
    return inv, float(attn)


@dataclass
class ForwardConfig:
    family: str
    hidden: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    norm: Literal["rms", "layernorm"]
    rope: Rope
    attn_scale: float
    qk_norm: Literal["none", "head", "full", "l2", "head_after_rope"] = "none"
    clip_qkv: Optional[float] = None
    windows: list[Optional[int]] = field(default_factory=list)
    use_rope: list[bool] = field(default_factory=list)
    chunk: Optional[int] = None
    mla: Optional[dict] = None
    indexer: Optional[dict] = None  # DeepSeek-V3.2 sparse attention: heads, dim, topk (forward/indexer.py)
    # Mistral 4: queries times 1 + beta * log(1 + floor(position / original_max_position_embeddings))
    q_position_scale: Optional[tuple[float, float]] = None
    parallel_block: bool = False  # Cohere: x + attention(norm(x)) + ffn(norm(x))
    shared_combine: Literal["sum", "average"] = "sum"  # Cohere 2 MoE: (routed + shared) / 2 when "average"
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    temperature_tuning: Optional[tuple[float, float]] = None  # Llama 4 NoPE layers: (floor_scale, attn_scale)
    expert_act: str = "silu"  # every FFN's activation: an ACT2FN name (hidden_act), "gpt_oss"; relu2: Nemotron-H's ungated experts
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    dense_ffn: int = 0
    max_positions: Optional[int] = None
    # Norms of a decoder layer, as checkpoint names under the layer: (before attention, after
    # attention, before FFN, after FFN); None where the family has none (Olmo 2 style: after only).
    layer_norms: tuple = ("input_layernorm", None, "post_attention_layernorm", None)  # a name, alternatives, or None
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Qwen3-Next stores weight - 1
    attn_output_gate: bool = False  # q_proj also yields a per-head output gate (Qwen3-Next)
    mixers: dict = field(default_factory=dict)  # LayerSpec.mixer kind -> that mixer's config
    attn_prefix: str = "self_attn."  # where the attention projections are stored (Nemotron-H: "mixer.")
    single_block: bool = False  # one sublayer per layer: x + sublayer(norm(x)) (Nemotron-H)
    # MiniMax: x' = alpha * norm(x) + beta * sublayer(norm(x)); (alpha, beta) by LayerSpec.mixer, "ffn" for the FFN
    normed_residual: Optional[dict] = None
    routed_act: Optional[str] = None  # the routed experts' activation when not expert_act (Aria: always SiLU)
    # MiniMax-M3's block-sparse attention: layers, heads, dim, block, topk, local (forward/block_sparse.py)
    block_sparse: Optional[dict] = None
    # RoPE per layer where rope_parameters is keyed by layer type (Mellum, Laguna, MiMo-V2-Flash); empty: `rope`
    layer_rope: list[Rope] = field(default_factory=list)

    cca: Optional[tuple[int, int]] = None  # ZAYA1's CCA convolution kernels (cca_time0, cca_time1): forward/zaya.py
    # Step-3.7: (routed, shared / dense) SwiGLU clamp bound of each layer (inf: none); empty: swiglu_limit
    layer_limits: list[tuple[float, float]] = field(default_factory=list)
    # per-layer (heads, kv heads, q/k head dim, v head dim) where they differ by layer (Laguna, MiMo-V2-Flash)
    layer_dims: list[tuple[int, int, int, int]] = field(default_factory=list)
    # attention output gate from its own projection: {"proj": names, "act": sigmoid | softplus, "bias": name}
    out_gate: Optional[dict] = None
    query_scale_nope: Optional[str] = None  # Beam: NoPE layers scale queries by position
    value_scale: float = 1.0  # values times this before attention (MiMo-V2-Flash attention_value_scale)
    routed_scale: float = 1.0  # the routed experts' sum times this, after the experts (Laguna, Beam)
    router_softcap: float = 0.0  # router logits -> cap * tanh(logits / cap) when > 0 (Laguna)
    depth_scaled_residual: bool = False  # Beam: the n-th residual add is x*sqrt((n-1)/n) + f/sqrt(n)
    final_softcap: float = 0.0  # final logits -> cap * tanh(logits / cap) when > 0 (Beam)
    bidirectional: bool = False  # an encoder: every token attends both ways within its window (privacy filter)
    moe_out_norm: Optional[tuple[str, ...]] = None  # a norm on the MoE block's output (routed + shared), its names
    # A.X-K2: a layer norm may be gated, stored as <name>.norm.weight + <name>.mlp.fc1 / fc2:
    # y = RMSNorm(x), y * sigmoid(fc2(silu(fc1(y))))
    gated_norms: bool = False
    gemma4: Optional[object] = None  # Gemma 4's settings (forward/gemma4.py Gemma4Settings): its own layer
    hyper: Optional["HyperConfig"] = None  # hyper-connections: several residual streams (forward/hyper.py)
    deepseek_v4: Optional[dict] = None  # DeepSeek-V4's attention: layer types, compressors, RoPEs (forward/deepseek_v4.py)
    embed_norm: Optional[tuple[str, ...]] = None  # an RMSNorm on the token embeddings, its names under the model root
    logit_rows: Optional[int] = None  # only the first logit_rows logits are the vocabulary's (a padded head)
    inkling: Optional[object] = None  # Inkling / Inkling 2 settings (forward/inkling.py InklingSettings)
    # A DSA variant whose attention is its own function (forward/sparse_variants.py): its settings
    sparse_variant: Optional[dict] = None
    # (transformers' name prefix under a layer, the original checkpoint's) pairs the decoder also
    # looks for (model.Names): Ling 3.0's attention. / dense / expert_bias as published
    name_aliases: tuple = ()
    # Qwen4-Exp (forward/qwen4_exp.py): hc residual streams, PLE layers and tables, the QSA indexer
    qwen4_exp: Optional[dict] = None
    muse_spark: Optional[object] = None  # Muse Spark's settings (forward/muse_spark.py MuseSparkSettings): its own layer

    def dims_of(self, i: int) -> tuple[int, int, int, int]:
        return self.layer_dims[i] if self.layer_dims else (self.heads, self.kv_heads, self.head_dim, self.head_dim)

    def limit_of(self, i: int, which: int) -> float:
        """Layer i's SwiGLU clamp bound: which 0 for the routed experts, 1 for the shared expert / dense MLP."""
        return self.layer_limits[i][which] if self.layer_limits else self.swiglu_limit

    def rope_of(self, i: int) -> Rope:
        return self.layer_rope[i] if self.layer_rope else self.rope


def forward_config(spec: ModelSpec, config: dict) -> ForwardConfig:
    family = spec.family
    if family in ENCDEC_FAMILIES:
        raise UnsupportedArchitecture(f"model_type {spec.model_type!r} is an encoder-decoder model: `moetool trace` "
                                      "runs it; this command supports decoder-only models")
    if family not in FORWARD_FAMILIES:
        raise UnsupportedArchitecture(
            f"model_type {spec.model_type!r} has no reference forward yet; supported: {', '.join(FORWARD_FAMILIES)}")
    cfg = Cfg(config)
    if family == "llama4" and spec.model_type == "llama4":
        cfg = cfg.sub("text_config")
    if spec.model_type in TEXT_CONFIG_WRAPPERS:  # image-text checkpoints: the text model's fields
        cfg = cfg.sub("text_config")
    if family in MULTIMODAL_FORWARD:  # image-text models: the language model, as its text family
        cfg = cfg.sub(NESTED_TEXT[family]) if family in NESTED_TEXT else cfg
        # dots3's released config has no text_config: the text model's fields are the top level
        cfg = cfg.sub("text_config") if cfg.has("text_config") or family != "dots3_note" else cfg
        family = MULTIMODAL_FORWARD[family]
    if family == "diffusion_gemma":  # a Gemma 4 text model run as encoder and denoiser: forward/diffusion_gemma.py
        from .diffusion_gemma import text_config

        cfg, family = text_config(cfg), "gemma4_text"
    if family == "step3p7_text":  # legacy per-layer RoPE lists -> rope_parameters per layer type
        from .step3p7 import normalise

        cfg = normalise(cfg)
    if family == "dbrx":
        return _dbrx(spec, cfg)
    if family == "jetmoe":
        return _jetmoe(spec, cfg)
    if family == "deepseek_v4":  # shared-KV attention with compressors, hyper-connections: forward/deepseek_v4.py
        from .deepseek_v4 import forward_config as deepseek_v4_config

        return deepseek_v4_config(spec, cfg)
    if family in ("inkling", "inkling2_text"):
        from .inkling import forward_config as inkling_config

        return inkling_config(spec, cfg, family)
    d, heads = spec.hidden_size, cfg.int("num_attention_heads")
    kv = cfg.int("num_key_value_heads", heads)
    hd = cfg.int("head_dim", d // heads) if family not in ("olmoe", "unlimited_ocr_text", "glm5_next_text") else d // heads
    # transformers 5 writes `rope_parameters` (theta included); older configs `rope_theta` + `rope_scaling`.
    for key in ("rope_scaling", "rope_parameters"):
        if cfg.has(key) and not isinstance(cfg.raw(key), dict):
            raise BadConfig(f"config.json: field {key!r} must be an object or null, got {type(cfg.raw(key)).__name__}")
    scaling_dict = {**(cfg.raw("rope_scaling") or {}), **(cfg.raw("rope_parameters") or {})}
    kind = scaling_dict.get("rope_type") or scaling_dict.get("type") or "default"
    _check_rope(kind, scaling_dict, cfg)
    extra = FAMILY_FORWARD.get(family, {})
    theta_default = extra.get("theta", ROPE_THETA_DEFAULTS.get(family, 10000.0))
    theta = float(scaling_dict.get("rope_theta") or cfg.float("rope_theta", theta_default))
    if kind == "longrope" and "original_max_position_embeddings" not in scaling_dict and cfg.has("original_max_position_embeddings"):
        scaling_dict = {**scaling_dict, "original_max_position_embeddings": cfg.int("original_max_position_embeddings")}
    max_pos = cfg.int("max_position_embeddings", None, min_value=1)
    rope = Rope(theta=theta, dim=hd, kind=kind, params=scaling_dict, max_position_embeddings=max_pos)
    fc = ForwardConfig(family=family, hidden=d, vocab=spec.vocab_size, layers=spec.num_layers, heads=heads,
                       kv_heads=kv, head_dim=hd, eps=cfg.float("rms_norm_eps", 1e-6), norm="rms", rope=rope,
                       attn_scale=hd ** -0.5, windows=[l.window for l in spec.layers],
                       use_rope=[True] * spec.num_layers, max_positions=max_pos,
                       dense_ffn=cfg.int("intermediate_size", 0), expert_act=_activation(spec))
    if extra:
        rope.layout = extra.get("rope_layout", rope.layout)
        fc.qk_norm = extra.get("qk_norm", fc.qk_norm)
        fc.layer_norms = extra.get("layer_norms", fc.layer_norms)
        if extra.get("rope_on_sliding_only") and cfg.has("sliding_window"):  # EXAONE: global layers are NoPE
            fc.use_rope = [w is not None for w in fc.windows]
        if extra.get("rope_on_sliding_only") == "always":  # Flint: NoPE on every full-attention layer
            fc.use_rope = [w is not None for w in fc.windows]
        if extra.get("layer_theta_key") and cfg.has(extra["layer_theta_key"]):  # GraniteMoE-SWA: theta per layer, 0: NoPE
            thetas = [_json_float(t, cfg, extra["layer_theta_key"]) for t in cfg.raw(extra["layer_theta_key"])]
            if len(thetas) < spec.num_layers:
                raise BadConfig(f"config.json: {extra['layer_theta_key']} has {len(thetas)} entries for "
                                f"{spec.num_layers} layers")
            ropes = {t: replace(rope, theta=t) for t in set(thetas) if t}
            fc.layer_rope = [ropes.get(t, rope) for t in thetas[:spec.num_layers]]
            fc.use_rope = [bool(t) for t in thetas[:spec.num_layers]]
        fc.parallel_block = extra.get("parallel_block", False)
        fc.routed_act = extra.get("routed_act")
        fc.out_gate = extra.get("out_gate")
        fc.query_scale_nope = extra.get("query_scale_nope")
        fc.depth_scaled_residual = extra.get("depth_scaled_residual", False)
        fc.bidirectional = extra.get("bidirectional", False)
        fc.name_aliases = extra.get("name_aliases", fc.name_aliases)
        if "expert_act" in extra:
            fc.expert_act = extra["expert_act"]
        for name, (key, default) in extra.get("fields", {}).items():  # ForwardConfig field <- config key
            value = cfg.raw(key)
            setattr(fc, name, default if value is None else cfg.float(key))
        if extra.get("mup_key") and cfg.bool(extra["mup_key"], False):  # AFMoE muP: embeddings times sqrt(D)
            fc.embedding_multiplier = d ** 0.5
        from ..arch.llama_like import STYLES  # per-layer head counts and head dims, as count reads them

        style = STYLES.get(family)
        if style is not None and style.dims is not None:
            fc.layer_dims = [style.dims(cfg, i, d) for i in range(spec.num_layers)]
        # partial RoPE: transformers 5 keeps partial_rotary_factor in rope_parameters (MiniMax-M2: rotary_dim)
        prf = scaling_dict.get("partial_rotary_factor", cfg.float("partial_rotary_factor", 1.0))
        if cfg.has("rotary_dim") and "partial_rotary_factor" not in scaling_dict:
            prf = cfg.int("rotary_dim") / hd
        rope.dim = int(hd * float(prf))
    _rope_by_layer_type(fc, cfg, extra)
    if family == "gemma4_text":
        from .gemma4 import configure

        configure(fc, spec, cfg, cfg if spec.family == "diffusion_gemma" else Cfg(config))  # no image placeholders
    if family == "muse_spark_text":
        from .muse_spark import configure as muse_spark_config

        muse_spark_config(fc, spec, cfg)
    if family == "cohere2_moe":
        if cfg.raw("rms_norm_eps") is None:
            fc.norm, fc.eps = "layernorm", cfg.float("layer_norm_eps", 1e-5)
        fc.logits_scaling = 1.0 / cfg.float("logit_scale", 0.0625)
        fc.shared_combine = cfg.str("shared_expert_combination_strategy", "average")
        if fc.shared_combine not in ("sum", "average"):
            raise BadConfig(f"config.json: shared_expert_combination_strategy must be sum or average, got {fc.shared_combine!r}")
        # RoPE on sliding layers, and on the dense prefix when prefix_dense_sliding_window_pattern is 1.
        force = cfg.int("prefix_dense_sliding_window_pattern", 1) == 1
        fc.use_rope = [w is not None or (force and not l.moe) for w, l in zip(fc.windows, spec.layers)]
        fc.dense_ffn = cfg.int("prefix_dense_intermediate_size", 0)
    if family == "phimoe":
        fc.norm = "layernorm"
        fc.eps = cfg.float("rms_norm_eps", 1e-5)
    elif family == "olmoe":
        fc.qk_norm, fc.clip_qkv = "full", cfg.raw("clip_qkv")
    elif family == "qwen3_moe":
        fc.qk_norm = "head"
    elif family == "glm4_moe":
        fc.qk_norm = "head" if cfg.bool("use_qk_norm", False) else "none"
        # transformers 5 writes partial_rotary_factor inside rope_parameters; older configs at the top.
        prf = scaling_dict.get("partial_rotary_factor")
        rope.dim = int(hd * (float(prf) if prf is not None else cfg.float("partial_rotary_factor", 0.5)))
    elif family in ("granitemoe", "granitemoeshared", "granitemoe_swa"):
        fc.attn_scale = cfg.float("attention_multiplier", 1.0)
        fc.embedding_multiplier = cfg.float("embedding_multiplier", 1.0)
        fc.residual_multiplier = cfg.float("residual_multiplier", 1.0)
        fc.logits_scaling = cfg.float("logits_scaling", 1.0)
    elif family == "gpt_oss":
        fc.expert_act = "gpt_oss"
        fc.swiglu_limit = cfg.float("swiglu_limit", 7.0)
    elif family == "llama4":
        rope.layout = "interleave"
        fc.qk_norm = "l2" if cfg.bool("use_qk_norm", True) else "none"
        interval = cfg.int("no_rope_layer_interval", 4)
        no_rope = cfg.int_list("no_rope_layers", []) or [int((i + 1) % interval != 0) for i in range(spec.num_layers)]
        fc.use_rope = [bool(no_rope[i]) for i in range(spec.num_layers)]
        fc.chunk = cfg.int("attention_chunk_size", 8192)
        fc.windows = [None] * spec.num_layers
        if cfg.bool("attn_temperature_tuning", True):
            fc.temperature_tuning = (cfg.float("floor_scale", 8192.0), cfg.float("attn_scale", 0.1))
        fc.dense_ffn = cfg.int("intermediate_size_mlp", 16384)
    elif family in ("deepseek_v2", "deepseek_v3", "glm4_moe_lite", "deepseek_v32", "mistral4", "axk1", "longcat_flash",
                    "glm_moe_dsa", "axk2", "hy_v4", "glm5_next_text", *sparse_variants.FAMILIES):
        nope, rdim, v = cfg.int("qk_nope_head_dim"), cfg.int("qk_rope_head_dim"), cfg.int("v_head_dim")
        fc.mla = dict(q_lora=cfg.int("q_lora_rank", 0), kv_lora=cfg.int("kv_lora_rank"), nope=nope, rope=rdim, v=v)
        rope.dim = rdim
        # DeepSeek-V2 and V3.2 always interleave; V3 / GLM-4.7-Flash unless rope_interleave is false.
        interleave = family in ("deepseek_v2", "deepseek_v32", "longcat_flash", "glm_moe_dsa", "axk2") \
            or (family != "hy_v4" and cfg.bool("rope_interleave", True))  # HY-V4: rotate-half
        rope.layout = "interleave" if interleave else "half"
        beta = scaling_dict.get("llama_4_scaling_beta")
        if family == "mistral4" and beta is not None:
            fc.q_position_scale = (float(beta), float(scaling_dict["original_max_position_embeddings"]))
        if family in ("deepseek_v32", "glm_moe_dsa", "axk2", "hy_v4"):
            if not fc.mla["q_lora"]:
                raise BadConfig(f"config.json: {family} needs q_lora_rank (its indexer reads the query latent)")
            fc.indexer = dict(heads=cfg.int("index_n_heads", {"deepseek_v32": 64, "glm_moe_dsa": 32, "axk2": 16,
                                                              "hy_v4": 16}[family]),
                              dim=cfg.int("index_head_dim", 128), topk=cfg.int("index_topk", 2048), layout="half")
        if family == "glm5_next_text":  # KDA layers, k-pool indexer, hyper-connections
            _glm5_next(fc, spec, cfg)
        elif family in ("glm_moe_dsa", "hy_v4"):  # GLM-5: interleaved indexer RoPE; "shared" layers reuse the last full layer's keys
            from ..arch.deepseek import DEFAULTS, _indexer_types

            types = _indexer_types(cfg, spec.num_layers, DEFAULTS[family].get("indexer_default"))
            if len(types) < spec.num_layers or types[0] != "full":
                raise BadConfig(f"config.json: indexer_types must give all {spec.num_layers} layers, the first "
                                "\"full\" (a \"shared\" layer reuses the previous full layer's top-k)")
            fc.indexer.update(layout="interleave" if family == "glm_moe_dsa" else "half",
                              shared=frozenset(i for i, t in enumerate(types[:spec.num_layers]) if t != "full"))
        if family == "hy_v4":  # sinks, a sigmoid output gate, clamped routed SwiGLU, hyper-connections
            _hy_v4(fc, cfg)
        fc.attn_scale = (nope + rdim) ** -0.5
        if family == "longcat_flash":  # LoRA scaling of query and KV latent; qk_head_dim may be set apart
            fc.mla.update(q_scale=(d / fc.mla["q_lora"]) ** 0.5, kv_scale=(d / fc.mla["kv_lora"]) ** 0.5)
            fc.attn_scale = cfg.int("qk_head_dim", nope + rdim) ** -0.5
        if family == "axk2":  # A.X-K2: q_gate_proj on [normed | raw] query latent -> query and a sigmoid output gate
            fc.mla["q_gate"], fc.gated_norms = True, True
        if family == "axk1":  # A.X-K1: an RMSNorm on the MoE block's output (stored at the layer or in the block)
            fc.moe_out_norm = ("mlp.post_mlp_layernorm", "post_mlp_layernorm")
        if kind == "yarn" and scaling_dict.get("mscale_all_dim"):
            m = _mscale(float(scaling_dict["factor"]), float(scaling_dict["mscale_all_dim"]))
            fc.attn_scale *= m * m
        if family in sparse_variants.FAMILIES:  # attention beyond MLA's data: forward/sparse_variants.py
            sparse_variants.configure(fc, spec, cfg)
    elif family in HYBRID:
        HYBRID[family](fc, spec, cfg, scaling_dict)
    return fc


# What each RoPE scaling type needs (transformers' rope init functions); the numbers must be finite.
_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                  "llama3": ("factor", "original_max_position_embeddings"), "longrope": ("long_factor", "short_factor")}
_ROPE_NUMBERS = ("rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                 "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "long_mscale", "short_mscale")


def _check_rope(kind, p: dict, cfg: Cfg) -> None:
    """Refuse malformed RoPE fields in one line naming the field (not a KeyError in the forward)."""
    where = "config.json: rope_scaling / rope_parameters"
    if not isinstance(kind, str):
        raise BadConfig(f"{where}: 'rope_type' must be a string, got {kind!r}")
    sub = Cfg(p, where)
    for key in _ROPE_REQUIRED.get(kind, ()):
        if p.get(key) is None:
            raise BadConfig(f"{where}: RoPE type {kind!r} needs the field {key!r}")
    for key in _ROPE_NUMBERS:
        if p.get(key) is not None and sub.float(key) <= 0 and key not in ("mscale", "mscale_all_dim"):
            raise BadConfig(f"{where}: field {key!r} must be positive, got {p[key]!r}")
    for key in ("long_factor", "short_factor"):
        v = p.get(key)
        if v is not None and not (isinstance(v, list) and all(
                not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in v)):
            raise BadConfig(f"{where}: field {key!r} must be a list of positive numbers")
    if kind in ("yarn", "longrope") and p.get("original_max_position_embeddings") is None \
            and cfg.raw("max_position_embeddings") is None and cfg.raw("original_max_position_embeddings") is None:
        raise BadConfig(f"{where}: RoPE type {kind!r} needs 'original_max_position_embeddings' or "
                        "'max_position_embeddings'")


def _rope_by_layer_type(fc: ForwardConfig, cfg: Cfg, extra: dict) -> None:
    """rope_parameters keyed by layer type ({"full_attention": {...}, "sliding_attention": {...}}, as
    Gemma 3 / Mellum / Laguna / MiMo-V2-Flash write it): one Rope per type, by `layer_types`; a type
    whose entry is null has no positional encoding (Beam's full-attention layers)."""
    params = cfg.raw("rope_parameters")
    if not isinstance(params, dict) or not any(isinstance(v, dict) or v is None for v in params.values()):
        return
    types = cfg.str_list("layer_types", [])
    if len(types) < fc.layers:
        raise BadConfig(f"config.json: rope_parameters is given per layer type, but layer_types has {len(types)} "
                        f"entries for {fc.layers} layers")
    ropes: dict[str, Rope] = {}
    for t in dict.fromkeys(types[:fc.layers]):
        if t not in params:
            raise BadConfig(f"config.json: rope_parameters has no entry for the layer type {t!r}")
        p = params[t]
        if p is None:
            continue
        if not isinstance(p, dict):
            raise BadConfig(f"config.json: rope_parameters[{t!r}] must be an object or null")
        kind = p.get("rope_type") or "default"
        _check_rope(kind, p, cfg)
        prf = float(p.get("partial_rotary_factor", extra.get("partial_rotary", 1.0)))
        ropes[t] = Rope(theta=float(p.get("rope_theta") or fc.rope.theta), dim=int(fc.head_dim * prf), kind=kind,
                        params=p, layout=fc.rope.layout, max_position_embeddings=fc.max_positions)
    fc.layer_rope = [ropes.get(t, fc.rope) for t in types[:fc.layers]]
    fc.use_rope = [u and t in ropes for u, t in zip(fc.use_rope, types)]


def _activation(spec: ModelSpec) -> str:
    from .model import ACTIVATIONS

    act = spec.moe.activation if spec.moe else "silu"
    if act not in ACTIVATIONS:
        raise UnsupportedArchitecture(f"hidden_act {act!r} is not supported by the reference forward; "
                                      f"supported: {', '.join(sorted(ACTIVATIONS))}")
    return act


def _jetmoe(spec: ModelSpec, cfg: Cfg) -> ForwardConfig:
    """JetMoE: k * Hkv query heads of kv_channels per token (mixture of attention heads, forward/moa.py)."""
    kv, hd = cfg.int("num_key_value_heads", 16), cfg.int("kv_channels", 128)
    params = cfg.raw("rope_parameters") or {}
    theta = float(params.get("rope_theta") or cfg.float("rope_theta", 10000.0))
    if (params.get("rope_type") or "default") != "default":
        raise UnsupportedArchitecture("JetMoE with RoPE scaling is not supported by the reference forward")
    return ForwardConfig(family="jetmoe", hidden=spec.hidden_size, vocab=spec.vocab_size, layers=spec.num_layers,
                         heads=kv * spec.moe.top_k, kv_heads=kv, head_dim=hd, eps=cfg.float("rms_norm_eps", 1e-6),
                         norm="rms", rope=Rope(theta=theta, dim=hd), attn_scale=hd ** -0.5,
                         windows=[None] * spec.num_layers, use_rope=[True] * spec.num_layers,
                         max_positions=cfg.raw("max_position_embeddings"), expert_act=_activation(spec))


def _jamba(fc: ForwardConfig, spec: ModelSpec, cfg: Cfg, rope: dict) -> None:
    """Jamba: attention without positional encoding; Mamba layers with RMSNorms on dt, B, C."""
    fc.use_rope = [False] * spec.num_layers
    fc.layer_norms = ("input_layernorm", None, "pre_ff_layernorm", None)
    d = spec.hidden_size
    dt_rank = cfg.raw("mamba_dt_rank", "auto")
    fc.mixers["mamba"] = mamba.MambaConfig(
        inner=cfg.int("mamba_expand", 2) * d, d_state=cfg.int("mamba_d_state", 16), d_conv=cfg.int("mamba_d_conv", 4),
        dt_rank=math.ceil(d / 16) if dt_rank == "auto" else cfg.int("mamba_dt_rank"), eps=fc.eps,
        activation=cfg.str("hidden_act", "silu"))


def _qwen3_next(fc: ForwardConfig, spec: ModelSpec, cfg: Cfg, rope: dict) -> None:
    """Qwen3-Next / Qwen3.5: (1 + w) RMSNorms, gated attention with QK-norm and partial RoPE, Gated DeltaNet."""
    fc.norm_offset, fc.attn_output_gate, fc.qk_norm = 1.0, True, "head"
    fc.rope.dim = int(fc.head_dim * float(rope.get("partial_rotary_factor") or cfg.float("partial_rotary_factor", 0.25)))
    fc.mixers["gated_deltanet"] = gated_deltanet.GatedDeltaNetConfig(
        k_heads=cfg.int("linear_num_key_heads", 16), v_heads=cfg.int("linear_num_value_heads", 32),
        k_dim=cfg.int("linear_key_head_dim", 128), v_dim=cfg.int("linear_value_head_dim", 128),
        kernel=cfg.int("linear_conv_kernel_dim", 4), eps=fc.eps, activation=cfg.str("hidden_act", "silu"))


def _granitemoehybrid(fc: ForwardConfig, spec: ModelSpec, cfg: Cfg, rope: dict) -> None:
    """Granite-4.0: GraniteMoE's multipliers; RoPE only with position_embedding_type "rope"; Mamba-2."""
    from ..arch.granitemoehybrid import mamba2_dims

    fc.attn_scale = cfg.float("attention_multiplier", 1.0)
    fc.embedding_multiplier = cfg.float("embedding_multiplier", 1.0)
    fc.residual_multiplier = cfg.float("residual_multiplier", 1.0)
    fc.logits_scaling = cfg.float("logits_scaling", 1.0)
    fc.use_rope = [cfg.raw("position_embedding_type") == "rope"] * spec.num_layers
    fc.mixers["mamba2"] = _mamba2(cfg, mamba2_dims(cfg, spec.hidden_size), fc.eps, "mamba.")


def _mamba2(cfg: Cfg, dims: dict, eps: float, prefix: str) -> "mamba2.Mamba2Config":
    limit = cfg.raw("time_step_limit") or (0.0, float("inf"))
    if not (isinstance(limit, (list, tuple)) and len(limit) == 2):
        raise BadConfig(f"{cfg.where}: time_step_limit must be a pair [min, max]")
    lo, hi = (_json_float(v, cfg, "time_step_limit") for v in limit)
    return mamba2.Mamba2Config(**dims, eps=eps, activation=cfg.str("hidden_act", "silu"), dt_min=lo, dt_max=hi,
                               prefix=prefix)


def _json_float(v, cfg: Cfg, key: str) -> float:
    """A number, or transformers' JSON spelling of a non-finite one ({"__float__": "Infinity"})."""
    if isinstance(v, dict) and set(v) == {"__float__"}:
        v = v["__float__"]
    try:
        return float(v)
    except (TypeError, ValueError):
        raise BadConfig(f"{cfg.where}: field {key!r} must hold numbers, got {v!r}") from None


def _lfm2_moe(fc: ForwardConfig, spec: ModelSpec, cfg: Cfg, rope: dict) -> None:
    """LFM2-MoE: norm_eps, per-head QK RMSNorm, gated short convolutions."""
    fc.eps, fc.qk_norm = cfg.float("norm_eps", 1e-5), "head"
    fc.layer_norms = ("operator_norm", None, "ffn_norm", None)
    fc.mixers["short_conv"] = short_conv.ShortConvConfig(kernel=cfg.int("conv_L_cache", 3))


def _nemotron_h(fc: ForwardConfig, spec: ModelSpec, cfg: Cfg, rope: dict) -> None:
    """Nemotron-H: one sublayer per layer, everything under `mixer.`; attention without RoPE;
    ungated relu2 MLPs and experts; Mamba-2 with dt clamped below at time_step_min."""
    from ..arch.nemotron_h import mamba2_dims

    fc.eps, fc.single_block, fc.attn_prefix = cfg.float("layer_norm_epsilon", 1e-5), True, "mixer."
    fc.use_rope = [False] * spec.num_layers
    fc.expert_act = cfg.str("mlp_hidden_act", "relu2")
    fc.mixers["mamba2"] = mamba2.Mamba2Config(
        **mamba2_dims(cfg), eps=fc.eps, activation=cfg.str("mamba_hidden_act", "silu"),
        dt_min=cfg.float("time_step_min", 0.001), prefix="mixer.")


def _minimax(fc: ForwardConfig, spec: ModelSpec, cfg: Cfg, rope: dict) -> None:
    """MiniMax-Text-01: scaled residuals from the normalised input; lightning attention."""
    pair = lambda kind: (cfg.float(f"{kind}_alpha_factor", 1.0), cfg.float(f"{kind}_beta_factor", 1.0))
    fc.normed_residual = {"attention": pair("full_attn"), "lightning_attention": pair("linear_attn"), "ffn": pair("mlp")}
    fc.mixers["lightning_attention"] = lightning.LightningConfig(
        heads=fc.heads, head_dim=fc.head_dim, num_layers=spec.num_layers, activation=cfg.str("hidden_act", "silu"))


def _kimi_linear(fc: ForwardConfig, spec: ModelSpec, cfg: Cfg, rope: dict) -> None:
    """Kimi Linear: MLA without positional encoding; Kimi Delta Attention."""
    from ..arch.kimi_linear import kda_dims

    nope, rdim, v = cfg.int("qk_nope_head_dim", 128), cfg.int("qk_rope_head_dim", 64), cfg.int("v_head_dim", 128)
    fc.mla = dict(q_lora=cfg.int("q_lora_rank", 0), kv_lora=cfg.int("kv_lora_rank", 512), nope=nope, rope=rdim, v=v)
    fc.attn_scale, fc.use_rope = (nope + rdim) ** -0.5, [False] * spec.num_layers
    fc.eps = cfg.float("rms_norm_eps", 1e-5)
    fc.max_positions = cfg.raw("max_position_embeddings") or cfg.raw("model_max_length")
    fc.mixers["kda"] = kda.KDAConfig(**kda_dims(cfg), eps=fc.eps, activation=cfg.str("hidden_act", "silu"))


def _bailing_hybrid(fc: ForwardConfig, spec: ModelSpec, cfg: Cfg, rope: dict) -> None:
    """Ling 3.0: MLA without a query LoRA, RoPE always interleaved, a head-wise sigmoid output gate
    (g_proj [H, D]); KDA layers with full-rank gates and the bounded forget gate (kda_safe_gate);
    the published checkpoints' names (attention., dense, expert_bias) beside transformers'."""
    from ..arch.bailing_hybrid import kda_dims

    nope, rdim, v = cfg.int("qk_nope_head_dim", 128), cfg.int("qk_rope_head_dim", 64), cfg.int("v_head_dim", 128)
    fc.mla = dict(q_lora=0, kv_lora=cfg.int("kv_lora_rank", 512), nope=nope, rope=rdim, v=v)
    fc.rope.dim, fc.rope.layout, fc.attn_scale = rdim, "interleave", (nope + rdim) ** -0.5
    if fc.rope.kind != "default" and rope.get("mscale_all_dim"):  # yarn_apply_mscale
        fc.attn_scale *= _mscale(float(rope["factor"]), float(rope["mscale_all_dim"])) ** 2
    fc.max_positions = cfg.raw("max_position_embeddings") or cfg.raw("model_max_length")
    fc.rope.max_position_embeddings = fc.rope.max_position_embeddings or fc.max_positions
    fc.out_gate = dict(proj=("self_attn.g_proj.weight",), act="sigmoid")
    fc.name_aliases = (("self_attn.o_proj.", "attention.dense."), ("self_attn.", "attention."),
                       ("mlp.gate.e_score_correction_bias", "mlp.gate.expert_bias"))
    fc.mixers["kda"] = kda.KDAConfig(**kda_dims(cfg), eps=fc.eps, activation=cfg.str("hidden_act", "silu"),
                                     lower_bound=cfg.float("kda_lower_bound", -5.0) if cfg.bool("kda_safe_gate", True)
                                     else None)


def _qwen4_exp(fc: ForwardConfig, spec: ModelSpec, cfg: Cfg, rope: dict) -> None:
    """Qwen4-Exp: (1 + w) RMSNorms, gated attention with per-head QK-norm and RoPE over
    partial_rotary_factor (default 1) of the head, Gated DeltaNet whose norm gate is
    output_gate_type (else hidden_act); hyper-connections, PLE and the QSA indexer: forward/qwen4_exp.py."""
    from ..arch import qwen4_exp as arch

    fc.norm_offset, fc.attn_output_gate, fc.qk_norm = 1.0, True, "head"
    fc.rope.dim = int(fc.head_dim * float(rope.get("partial_rotary_factor", 1.0)))
    fc.mixers["gated_deltanet"] = gated_deltanet.GatedDeltaNetConfig(
        k_heads=cfg.int("linear_num_key_heads", 16), v_heads=cfg.int("linear_num_value_heads", 32),
        k_dim=cfg.int("linear_key_head_dim", 128), v_dim=cfg.int("linear_value_head_dim", 128),
        kernel=cfg.int("linear_conv_kernel_dim", 4), eps=fc.eps, activation=cfg.str("hidden_act", "silu"),
        gate_act=cfg.raw("output_gate_type") or cfg.str("hidden_act", "silu"))
    types = arch.layer_types(cfg, spec.num_layers)
    ple = arch.ple_layers(cfg, spec.num_layers, types)
    heads = (cfg.int("ngram_size", 3) - 1) * cfg.int("heads_per_ngram", 8)
    eos = cfg.raw("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if ple and not isinstance(eos, int):
        raise BadConfig(f"{cfg.where}: Qwen4-Exp's per-layer embedding needs eos_token_id")
    sizes = arch.head_primes(cfg, len(ple) * heads)
    fc.qwen4_exp = dict(hc=cfg.int("hc_count", 4), ple_layers=ple,
                        ple=dict(ngram_size=cfg.int("ngram_size", 3), heads_per_ngram=cfg.int("heads_per_ngram", 8), eos=eos,
                             vocab=spec.vocab_size, seed=cfg.int("seed", 1234),
                             sizes=[sizes[j * heads:(j + 1) * heads] for j in range(len(ple))],
                             offsets=[[sum(sizes[j * heads:j * heads + h]) for h in range(heads)] for j in range(len(ple))]),
                    qsa=dict(heads=cfg.int("indexer_n_heads", 1), kv_heads=cfg.int("indexer_kv_heads", 1),
                             dim=cfg.int("indexer_head_dim", 1), ratio=cfg.int("indexer_compress_ratio", 1, min_value=1),
                             block_topk=cfg.int("indexer_budget", 1) // cfg.int("indexer_compress_ratio", 1, min_value=1))
                    if "indexed_attention" in types else None)


HYBRID = {"jamba": _jamba, "qwen3_next": _qwen3_next, "granitemoehybrid": _granitemoehybrid, "lfm2_moe": _lfm2_moe,
          "nemotron_h": _nemotron_h, "minimax": _minimax, "kimi_linear": _kimi_linear, "bailing_hybrid": _bailing_hybrid,
          "qwen4_exp_text": _qwen4_exp}


def _minimax_m3(fc: ForwardConfig, spec: ModelSpec, cfg: Cfg, rope: dict) -> None:
    """MiniMax-M3: (1 + w) RMSNorms (QK-norm per head before RoPE), RoPE over head_dim times
    rope_parameters' partial_rotary_factor (transformers 5.23 does not read `rotary_dim` for this
    family), clamped SwiGLU (gpt-oss's, gate and up not interleaved) in every FFN, and block-sparse
    attention on the layers arch/minimax_m3.py names (forward/block_sparse.py)."""
    from ..arch import minimax_m3

    fc.norm_offset = 1.0
    fc.rope.dim = int(fc.head_dim * float(rope.get("partial_rotary_factor", 1.0)))
    fc.expert_act = "gpt_oss"
    fc.swiglu_limit, fc.swiglu_alpha = cfg.float("swiglu_limit", 7.0), cfg.float("swiglu_alpha", 1.702)
    layers = minimax_m3.sparse_layers(cfg, spec.num_layers)
    if layers:
        ix = minimax_m3.indexer(cfg)
        if fc.heads % ix["heads"]:
            raise BadConfig(f"{cfg.where}: num_attention_heads ({fc.heads}) must be a multiple of index_n_heads "
                            f"({ix['heads']})")
        fc.block_sparse = dict(layers=frozenset(layers), **ix)


HYBRID["minimax_m3_vl_text"] = _minimax_m3


def _step3p7(fc: ForwardConfig, spec: ModelSpec, cfg: Cfg, rope: dict) -> None:
    from .step3p7 import configure

    configure(fc, spec, cfg, rope)


HYBRID["step3p7_text"] = _step3p7


def _zaya(fc: ForwardConfig, spec: ModelSpec, cfg: Cfg, rope: dict) -> None:
    """ZAYA1 (forward/zaya.py): CCA kernels; RoPE per layer type, ZayaConfig's when the config gives none."""
    fc.cca = (cfg.int("cca_time0", 2, min_value=1), cfg.int("cca_time1", 2, min_value=1))
    fc.eps = cfg.float("rms_norm_eps", 1e-5)
    if not fc.layer_rope:
        default = {"hybrid": Rope(theta=5e6, dim=fc.head_dim // 2), "hybrid_sliding": Rope(theta=1e4, dim=fc.head_dim // 2)}
        types = cfg.str_list("layer_types", ["hybrid"] * spec.num_layers)
        fc.layer_rope = [default.get(t, default["hybrid"]) for t in types[:spec.num_layers]]


HYBRID["zaya"] = _zaya


def _dbrx(spec: ModelSpec, cfg: Cfg) -> ForwardConfig:
    attn = cfg.sub("attn_config")
    d, heads = spec.hidden_size, cfg.int("n_heads")
    hd = d // heads
    return ForwardConfig(family="dbrx", hidden=d, vocab=spec.vocab_size, layers=spec.num_layers, heads=heads,
                         kv_heads=attn.int("kv_n_heads", 1), head_dim=hd, eps=1e-5, norm="layernorm",
                         rope=Rope(theta=attn.float("rope_theta", 10000.0), dim=hd), attn_scale=hd ** -0.5,
                         clip_qkv=attn.raw("clip_qkv"), windows=[None] * spec.num_layers,
                         use_rope=[True] * spec.num_layers, max_positions=cfg.int("max_seq_len", None, min_value=1),
                         layer_norms=("norm_attn_norm.norm_1", None, "norm_attn_norm.norm_2", None),
                         expert_act=_activation(spec))


def _hy_v4(fc: ForwardConfig, cfg: Cfg) -> None:
    """HY-V4 (transformers' HYV4ForCausalLM): GLM-5's MLA with attention sinks and a sigmoid output gate;
    its indexer rotates the last qk_rope_head_dim dims and scales the head weights; the routed experts'
    SwiGLU clamped at swiglu_limit (shared experts and dense MLPs not); hc_mult residual streams."""
    fc.mla.update(sinks=True, out_gate=True)
    fc.indexer.update(rope_tail=True, eps=fc.eps, scale_weights=True)
    fc.routed_act, fc.swiglu_limit = "clamped_silu", cfg.float("swiglu_limit", 10.0)
    fc.hyper = HyperConfig(streams=cfg.int("hc_mult", 4, min_value=1), norm_eps=fc.eps, eps=cfg.float("hc_eps", 1e-6),
                           post_scale=cfg.float("hc_magnitude", 2.0), post_eps=cfg.float("hc_eps", 1e-6))


def _glm5_next(fc: ForwardConfig, spec: ModelSpec, cfg: Cfg) -> None:
    """GLM-5.3-Flash text (transformers' Glm5NextTextModel): NoPE MLA (qk_rope_head_dim 0) on the
    "indexed_attention" layers with GLM-5's indexer (no RoPE) plus k-pool compression (forward/indexer.py
    kpool_keep); a "shared" layer reuses the keys of the full layer just before it. Kimi Delta Attention with
    the bounded forget gate on the "linear_attention" layers; SwiGLU clamped at swiglu_limit in every FFN
    (routed, shared, dense); DeepSeek-V4's hyper-connections (comb, Sinkhorn), the head's collapse an
    unweighted mean of the streams."""
    from ..arch.deepseek import _indexer_types

    n = spec.num_layers
    if fc.mla["rope"]:
        raise BadConfig(f"{cfg.where}: glm5_next's indexed attention is NoPE (qk_rope_head_dim must be 0)")
    fc.use_rope = [False] * n
    fc.mla["eps"] = fc.eps  # the latents' RMSNorms: rms_norm_eps (DeepSeek's: 1e-6)
    kinds = [layer.mixer for layer in spec.layers]
    types = _indexer_types(cfg, n)
    if len(types) < n:
        raise BadConfig(f"{cfg.where}: indexer_types has {len(types)} entries for {n} layers")
    shared = frozenset(i for i in range(n) if kinds[i] != "kda" and types[i] != "full")
    for i in sorted(shared):  # transformers passes a full layer's top-k to the next layer only
        if i == 0 or kinds[i - 1] == "kda" or (i - 1) in shared:
            raise BadConfig(f"{cfg.where}: layer {i} is a \"shared\" indexer layer, so layer {i - 1} must be an "
                            "indexed_attention layer with a \"full\" indexer")
    kpool, topk = cfg.int("index_kpool", 16, min_value=1), cfg.int("index_topk", 2048, min_value=1)
    fc.indexer = dict(heads=cfg.int("index_n_heads", 32), dim=cfg.int("index_head_dim", 128), topk=topk,
                      layout="none", shared=shared, kpool=kpool, tail=cfg.bool("index_kpool_always_select_tail", True))
    fc.expert_act, fc.swiglu_limit = "clamped_" + cfg.str("hidden_act", "silu"), cfg.float("swiglu_limit", 10.0)
    fc.routed_act = "clamped_silu"  # the fused experts: always SiLU
    fc.mixers["kda"] = kda.KDAConfig(heads=cfg.int("linear_num_heads", 64), head_dim=cfg.int("linear_head_dim", 128),
                                     kernel=cfg.int("linear_conv_kernel_dim", 4), eps=fc.eps,
                                     activation=cfg.str("hidden_act", "silu"),
                                     lower_bound=None if "linear_lower_bound" in cfg.d and not cfg.has(
                                         "linear_lower_bound") else cfg.float("linear_lower_bound", -5.0))  # null: softplus
    fc.hyper = HyperConfig(streams=cfg.int("hc_mult", 4, min_value=1), norm_eps=fc.eps, eps=cfg.float("hc_eps", 1e-6),
                           post_scale=2.0, post_eps=0.0, sinkhorn_iters=cfg.int("hc_sinkhorn_iters", 20, min_value=1),
                           norm_first=True, mean_head=True)
