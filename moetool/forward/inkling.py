"""Inkling and Inkling 2's decoder layer (thinkingmachines; transformers 5.23's InklingForCausalLM for
`inkling_text`, Inkling2ForCausalLM for `inkling2_text`, and the language models of the image-text(-audio)
`inkling_mm_model` and `inkling2`, run on text-only input).

Both (per layer; "hybrid_sliding" layers have their own head counts and a window, "hybrid" ones are full):

- attention without RoPE: the position is a relative bias. r = r_proj(x) gives per head d_rel
  "relative states"; bias[h, q, k] = (r[q, h] @ P)[q - k] for 0 <= q - k < extent (the window on
  sliding layers, rel_extent on full ones), else 0; P = rel_logits_proj.proj [d_rel, extent];
- keys and values pass a depthwise causal short convolution plus its input (k_sconv, v_sconv), and so
  do the attention output (attn_sconv) and the MLP output (mlp_sconv), before their residual adds;
- the token embedding has its own RMSNorm (embed_norm); the LM head is never tied.

Inkling (`inkling_text`): QK RMSNorm per head, scores scaled by 1 / head_dim; on full layers, with
log_scaling_n_floor, queries and bias times tau = 1 + alpha * log(max(1, (pos + 1) / floor)). Layers are
pre-norm (x + sconv(attn(norm x)), then x + sconv(mlp(norm x))); the MLP is a dense SwiGLU times a learned
`global_scale`, or the MoE: one sigmoid router over E routed + S shared experts (weight [E + S, D]); the
correction bias picks the top-k routed; the weights of the k chosen and the S shared are their sigmoids
normalised to sum 1 (a softmax of log-sigmoids: the shared experts are a sink), times route_scale and the
router's global_scale; each shared expert's output is scaled by its weight. The final hidden state is
divided by logits_mup_width_multiplier before the head (ForwardConfig.logits_scaling).

Inkling 2 (`inkling2_text`): per head, q scaled by a learned [H, Dh] then clipped to L2 norm
qk_l2_clip_threshold, k clipped (no scale), v RMS-normalised without weight, r scaled [H, d_rel] and
clipped to rel_l2_clip_threshold; on full layers q and r times tau (always on); scores scaled by
head_dim ** -0.5; a per-token sink logit per head (sink_proj) in the softmax; the output times
sigmoid(gate_proj(x)). Short convolutions output (conv(x) + x) / sqrt(K + 1); on full layers the key and
value convolutions are dynamic: taps static_weight [K, C] plus a per-token, per-KV-head projection of the
layer's key / value input (weight_proj [Hkv * K, D]), output (conv + x) / sqrt(2K + 1).
Block attention residuals: every n_layers_per_attn_res_block layers the layer input joins a list of
block states; before the attention (layers > 0; three learned queries on full layers, for q, k and v,
each with its own input RMSNorm), before the MLP and before the head, a learned query attends over the
RMS-normalised block states plus the current partial state (softmax over the states, scale D ** -0.5).
At a block boundary the attention output does not add to the layer input (that input is now a block
state). Every layer is MoE: sigmoid router + correction bias, top-k renormalised, times route_scale;
experts a soft-capped SwiGLU (model.glu "softcapped_swiglu"). Logits soft-capped (final_logit_softcapping),
then cut to unpadded_vocab_size.

Weights are found under transformers' names (save_pretrained of InklingForCausalLM) or the original
checkpoint's (model.llm.*, attn.wq_du ..., w13 tensors with gate and up interleaved, as save_pretrained
writes Inkling's image-text model and Inkling 2 back), see NAMES.
Blocks of prompts (moetool profile, model.Segments): attention, relative bias and every convolution run
per prompt. With a KV cache (forward/cache.py) each layer keeps its keys and values and the last K - 1
inputs of each convolution; the block states are per token and need no cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F_

from ..errors import BadCheckpoint, BadConfig, UnsupportedArchitecture
from ..spec import Cfg, ModelSpec
from .config import ForwardConfig, Rope
from .mixers.common import causal_conv
from .model import (ACTIVATIONS, Experts, LayerRoute, Segments, check_shape, glu, linear, non_finite_router, norm,
                    rms_norm, route)

# role -> (transformers' name, the original checkpoint's name) under "<layers>.<i>."
NAMES: dict[str, tuple[str, ...]] = {
    "q": ("self_attn.q_proj.weight", "attn.wq_du.weight"),
    "k": ("self_attn.k_proj.weight", "attn.wk_dv.weight"),
    "v": ("self_attn.v_proj.weight", "attn.wv_dv.weight"),
    "r": ("self_attn.r_proj.weight", "attn.wr_du.weight"),
    "o": ("self_attn.o_proj.weight", "attn.wo_ud.weight"),
    "gate": ("self_attn.gate_proj.weight", "attn.gate_attn.weight"),
    "sink": ("self_attn.sink_proj.weight", "attn.attn_sink_proj.weight"),
    "q_norm": ("self_attn.q_norm.weight", "attn.q_norm.weight"),
    "k_norm": ("self_attn.k_norm.weight", "attn.k_norm.weight"),
    "q_clip": ("self_attn.q_l2_clip.scale", "attn.q_l2_clip.scale"),
    "rel_clip": ("self_attn.rel_l2_clip.scale", "attn.rel_l2_clip.scale"),
    "rel": ("self_attn.rel_logits_proj.proj", "attn.rel_logits_proj.proj"),
    "k_conv": ("self_attn.k_sconv.conv1d.weight", "attn.k_sconv.weight"),
    "v_conv": ("self_attn.v_sconv.conv1d.weight", "attn.v_sconv.weight"),
    "k_static": ("self_attn.k_sconv.static_weight", "attn.k_sconv.static_w"),
    "v_static": ("self_attn.v_sconv.static_weight", "attn.v_sconv.static_w"),
    "k_dyn": ("self_attn.k_sconv.weight_proj.weight", "attn.k_sconv.weight_proj"),
    "v_dyn": ("self_attn.v_sconv.weight_proj.weight", "attn.v_sconv.weight_proj"),
    "attn_conv": ("attn_sconv.conv1d.weight", "post_attention_convolution.conv1d.weight", "attn_sconv.weight"),
    "mlp_conv": ("mlp_sconv.conv1d.weight", "post_mlp_convolution.conv1d.weight", "mlp_sconv.weight"),
    "input_norm": ("input_layernorm.weight", "attn_norm.weight"),
    "q_input_norm": ("q_input_layernorm.weight", "q_input_norm.weight"),
    "k_input_norm": ("k_input_layernorm.weight", "k_input_norm.weight"),
    "v_input_norm": ("v_input_layernorm.weight", "v_input_norm.weight"),
    "post_norm": ("post_attention_layernorm.weight", "mlp_norm.weight"),
    "router": ("mlp.gate.weight",),
    "router_bias": ("mlp.gate.e_score_correction_bias", "mlp.gate.bias"),
    "router_scale": ("mlp.gate.global_scale",),
    "shared_gate": ("mlp.shared_experts.gate_proj",),  # [S, F, D]; originally gate and up interleaved in w13
    "shared_up": ("mlp.shared_experts.up_proj",),
    "shared_w13": ("mlp.shared_experts.shared_w13_weight",),
    "shared_down": ("mlp.shared_experts.down_proj", "mlp.shared_experts.shared_w2_weight"),
    "dense_w13": ("mlp.w13_dn.weight",),  # the original dense MLP: [2F, D], gate and up interleaved
    "dense_down": ("mlp.w2_md.weight",),
    "mlp_scale": ("mlp.global_scale",),
}
QUERY_ROWS = 512  # attention scores are computed for this many queries at a time ([H, rows, S] floats)


@dataclass(frozen=True)
class InklingSettings:
    version: int  # 1: Inkling, 2: Inkling 2
    kernel: int  # short-convolution taps K
    sliding: tuple[bool, ...]  # per layer
    scales: tuple[float, ...]  # per layer: the attention scale (1 / Dh; Inkling 2: Dh ** -0.5)
    log_floor: Optional[float]  # full layers: tau = 1 + log_alpha * log(max(1, (pos + 1) / log_floor)); None: off
    log_alpha: float
    qk_clip: float = 0.0  # Inkling 2: L2 clip thresholds of q / k and of the relative states
    rel_clip: float = 0.0
    block: int = 0  # Inkling 2: layers per block of the attention residuals (0: none, Inkling)


def forward_config(spec: ModelSpec, cfg: Cfg, family: str) -> ForwardConfig:
    """The ForwardConfig of an Inkling ("inkling") or Inkling 2 ("inkling2_text") text config."""
    from ..arch.inkling import layer_types

    v2 = family == "inkling2_text"
    n, d = spec.num_layers, spec.hidden_size
    types = layer_types(cfg, n, 2 if v2 else 1)
    bad = sorted(set(types) - {"hybrid", "hybrid_sliding"})
    if bad:
        raise BadConfig(f"{cfg.where}: layer_types must be \"hybrid\" or \"hybrid_sliding\", got {bad[0]!r}")
    sliding = tuple(t == "hybrid_sliding" for t in types)
    window = cfg.first_int(["sliding_window_size", "sliding_window"], 1024 if v2 else 512, min_value=1)
    dims = []
    for s in sliding:
        pre = "swa_" if s else ""
        heads = cfg.int(f"{pre}num_attention_heads", 48 if v2 else 64, min_value=1)
        kv = cfg.int(f"{pre}num_key_value_heads", 8 if (v2 or not s) else 16, min_value=1)
        if heads % kv:
            raise BadConfig(f"{cfg.where}: {pre}num_attention_heads ({heads}) must be a multiple of "
                            f"{pre}num_key_value_heads ({kv})")
        hd = cfg.int(f"{pre}head_dim", 128, min_value=1)
        dims.append((heads, kv, hd, hd))
    kernel = cfg.first_int(["conv_kernel_size", "sconv_kernel_size"], 4, min_value=1)
    floor = cfg.raw("log_scaling_n_floor", 128000 if v2 else None)
    act = "softcapped_swiglu" if v2 else cfg.str("hidden_act", "silu")
    if act not in ACTIVATIONS and act != "softcapped_swiglu":
        raise UnsupportedArchitecture(f"hidden_act {act!r} is not supported by the reference forward; "
                                      f"supported: {', '.join(sorted(ACTIVATIONS))}")
    if v2 and cfg.str("scoring_func", "sigmoid") != "sigmoid":
        raise UnsupportedArchitecture(f"{cfg.where}: Inkling 2 with scoring_func {cfg.raw('scoring_func')!r} is not "
                                      "supported by the reference forward (sigmoid only)")
    settings = InklingSettings(
        version=2 if v2 else 1, kernel=kernel, sliding=sliding,
        scales=tuple(hd ** -0.5 if v2 else 1.0 / hd for _, _, hd, _ in dims),
        log_floor=None if floor is None else cfg.float("log_scaling_n_floor"), log_alpha=cfg.float("log_scaling_alpha", 0.1),
        qk_clip=cfg.float("qk_l2_clip_threshold", 22.627416997969522) if v2 else 0.0,
        rel_clip=cfg.float("rel_l2_clip_threshold", 8.0) if v2 else 0.0,
        block=cfg.int("n_layers_per_attn_res_block", 6, min_value=1) if v2 else 0)
    H, Hkv, hd, _ = dims[0]
    fc = ForwardConfig(family=family, hidden=d, vocab=spec.vocab_size, layers=n, heads=H, kv_heads=Hkv, head_dim=hd,
                       eps=cfg.float("rms_norm_eps", 1e-6), norm="rms", rope=Rope(theta=10000.0, dim=hd),
                       attn_scale=settings.scales[0], windows=[window if s else None for s in sliding],
                       use_rope=[False] * n, max_positions=cfg.raw("max_position_embeddings"), expert_act=act,
                       layer_dims=dims, embed_norm=("embed_tokens.embed_norm.weight", "embed_norm.weight"),
                       inkling=settings)
    if cfg.raw("unpadded_vocab_size") is not None or v2:
        fc.logit_rows = cfg.int("unpadded_vocab_size", 200058, min_value=1)
    if fc.max_positions is not None:
        fc.max_positions = cfg.int("max_position_embeddings", min_value=1)
    if v2:
        fc.swiglu_limit, fc.swiglu_alpha = cfg.float("mlp_gate_softcap", 4.0), cfg.float("mlp_up_softcap", 25.0)
        fc.final_softcap = cfg.float("final_logit_softcapping", 30.0)
    else:
        fc.logits_scaling = cfg.float("logits_mup_width_multiplier", cfg.float("embedding_multiplier", 24.0))
    return fc


# --- the layer ------------------------------------------------------------------------------------

def layer(dec, i: int, x: torch.Tensor, masks: dict, routes: list, record: bool) -> torch.Tensor:
    """Decoder layer i on x [T, D] (one sequence, or a block of prompts when `masks` holds Segments)."""
    seg = next((m for m in masks.values() if isinstance(m, Segments)), None)
    parts = [(a, b) for a, b, _ in seg.parts] if seg is not None else [(0, x.shape[0])]
    if dec.fc.inkling.version == 2:
        return _layer2(dec, i, x, parts, routes, record)
    return _layer1(dec, i, x, parts, routes, record)


def _w(dec, i: int, role: str, required: bool = True) -> Optional[torch.Tensor]:
    return dec.w(dec.names.find(i, *NAMES[role], required=required))


def _layer1(dec, i, x, parts, routes, record):
    fc = dec.fc
    a = _attention(dec, i, norm(x, _w(dec, i, "input_norm"), None, fc), parts)
    x = x + _conv(dec, i, a, _w(dec, i, "attn_conv"), "attn_conv", parts, 1.0)
    h = norm(x, _w(dec, i, "post_norm"), None, fc)
    f = _moe(dec, i, h, routes, record) if dec.spec.layers[i].moe else _dense(dec, i, h)
    return x + _conv(dec, i, f, _w(dec, i, "mlp_conv"), "mlp_conv", parts, 1.0)


def _layer2(dec, i, x, parts, routes, record):
    s, fc = dec.fc.inkling, dec.fc
    if i == 0:
        dec._inkling_blocks = []
    blocks: list = dec._inkling_blocks
    dtype, sc = x.dtype, 1.0 / math.sqrt(s.kernel + 1)
    nrm = lambda role, t: norm(t.float(), _w(dec, i, role).float(), None, fc).to(dtype)
    if s.sliding[i]:
        h = x if i == 0 else _mix(_query(dec, i, "attention"), blocks, x)[0]
        a = _attention(dec, i, nrm("input_norm", h), parts)
    else:
        hq, hk, hv = (x, x, x) if i == 0 else _mix(_query(dec, i, "attention"), blocks, x)
        a = _attention(dec, i, nrm("q_input_norm", hq), parts, nrm("k_input_norm", hk), nrm("v_input_norm", hv))
    a = _conv(dec, i, a, _w(dec, i, "attn_conv"), "attn_conv", parts, sc).float()
    if i % s.block == 0:  # the layer input becomes a block state; the attention output starts the next block
        blocks.append(x)
        residual = a
    else:
        residual = x.float() + a
    h = _mix(_query(dec, i, "mlp"), blocks, residual)[0]
    f = _moe(dec, i, nrm("post_norm", h), routes, record)
    return (residual + _conv(dec, i, f, _w(dec, i, "mlp_conv"), "mlp_conv", parts, sc).float()).to(dtype)


def final_input(dec, x: torch.Tensor) -> torch.Tensor:
    """Inkling 2: the head's input, a block attention residual over the block states and x."""
    q = dec.w(dec.names.find_root("final_input.query", "attn_res.output_query"))
    return _mix(q, dec._inkling_blocks, x)[0].to(x.dtype)


def _query(dec, i: int, kind: str) -> torch.Tensor:
    """The learned queries of layer i's block attention residual before the attention ([D], or [3, D]
    on full layers) or before the MLP; the original checkpoint numbers the attention ones from layer 1."""
    if kind == "attention":
        return dec.w(dec.names.find(i, "attention_input.query", required=False)
                     or dec.names.find_root(f"attn_res.attn_queries.{i - 1}"))
    return dec.w(dec.names.find(i, "mlp_input.query", required=False) or dec.names.find_root(f"attn_res.mlp_queries.{i}"))


def _mix(queries: torch.Tensor, blocks: list, partial: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Block attention residual: each query [D] attends, per token, over the RMS-normalised (no weight,
    eps 1e-6) block states and partial state [T, D]; returns one float32 [T, D] per query."""
    states = rms_norm(torch.stack([b.float() for b in blocks] + [partial.float()], dim=1), None, 1e-6)  # [T, N, D]
    q = queries.float().reshape(-1, states.shape[-1])  # [Q, D]
    p = torch.softmax((states @ q.t()) * states.shape[-1] ** -0.5, dim=1)  # [T, N, Q]
    return torch.einsum("tnq,tnd->tqd", p, states).unbind(1)


# --- attention ------------------------------------------------------------------------------------

def _attention(dec, i: int, x: torch.Tensor, parts: list, k_in: Optional[torch.Tensor] = None,
               v_in: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Layer i's attention on x [T, D] (Inkling 2's full layers: keys and values from their own inputs)."""
    s, fc = dec.fc.inkling, dec.fc
    T = x.shape[0]
    H, Hkv, Dh, _ = fc.dims_of(i)
    k_in = x if k_in is None else k_in
    v_in = x if v_in is None else v_in
    q, k, v, r = (linear(t, _w(dec, i, role)) for t, role in ((x, "q"), (k_in, "k"), (v_in, "v"), (x, "r")))
    if q.shape[-1] != H * Dh or k.shape[-1] != Hkv * Dh or v.shape[-1] != Hkv * Dh or r.shape[-1] % H:
        raise BadCheckpoint(f"layer {i}: the q/k/v projections give {q.shape[-1]}/{k.shape[-1]}/{v.shape[-1]} "
                            f"features, config.json implies {H * Dh}/{Hkv * Dh}/{Hkv * Dh}")
    full = not s.sliding[i]
    if s.version == 2 and full:  # dynamic taps
        k = _dynamic_conv(dec, i, k, k_in, "k", Hkv, parts)
        v = _dynamic_conv(dec, i, v, v_in, "v", Hkv, parts)
    else:
        sc = 1.0 if s.version == 1 else 1.0 / math.sqrt(s.kernel + 1)
        k = _conv(dec, i, k, _w(dec, i, "k_conv"), "k_conv", parts, sc)
        v = _conv(dec, i, v, _w(dec, i, "v_conv"), "v_conv", parts, sc)
    q, k, v, r = q.view(T, H, Dh), k.view(T, Hkv, Dh), v.view(T, Hkv, Dh), r.view(T, H, -1)
    gate = sinks = None
    if s.version == 1:
        q = rms_norm(q, _w(dec, i, "q_norm"), fc.eps)
        k = rms_norm(k, _w(dec, i, "k_norm"), fc.eps)
    else:
        q = _clip(q, s.qk_clip, _w(dec, i, "q_clip"))
        k = _clip(k, s.qk_clip)
        v = rms_norm(v, None, fc.eps)
        r = _clip(r, s.rel_clip, _w(dec, i, "rel_clip"))
        gate = linear(x, _w(dec, i, "gate"))  # [T, H * Dh]
        sinks = linear(x, _w(dec, i, "sink"))  # [T, H]
    if dec.cache is not None:  # keys and values of the earlier tokens
        k, v = dec.cache.extend(i, k=k, v=v)
    P = _w(dec, i, "rel")
    window = fc.windows[i]
    out = []
    for a, b in parts:
        kk, vv = (k, v) if dec.cache is not None else (k[a:b], v[a:b])
        S = kk.shape[0]
        qpos = torch.arange(S - (b - a), S, device=x.device)
        kpos = torch.arange(S, device=x.device)
        qa, ra = q[a:b], r[a:b]
        tau = None
        if full and s.log_floor is not None:
            tau = 1.0 + s.log_alpha * torch.log(((qpos + 1).float() / s.log_floor).clamp(min=1.0))  # [L]
            qa = (qa.float() * tau[:, None, None]).to(qa.dtype)
            if s.version == 2:
                ra = (ra.float() * tau[:, None, None]).to(ra.dtype)
        out.append(_attend(qa, kk, vv, ra, P, qpos, kpos, window, s.scales[i],
                           tau if s.version == 1 else None, None if sinks is None else sinks[a:b]))
    o = torch.cat(out).reshape(T, H * Dh)
    if gate is not None:
        o = (o.float() * torch.sigmoid(gate.float())).to(o.dtype)
    return linear(o, _w(dec, i, "o"))


def _attend(q, k, v, r, P, qpos, kpos, window, scale, bias_tau=None, sinks=None) -> torch.Tensor:
    """Softmax attention with the relative bias, causal (and windowed): q [L, H, Dh], k / v [S, Hkv, Dh],
    r [L, H, d_rel], P [d_rel, extent], positions qpos [L] / kpos [S]; Inkling's bias times `bias_tau` [L];
    Inkling 2's per-token sink logits [L, H]. Float32 scores, QUERY_ROWS queries at a time -> [L, H, Dh]."""
    H, Hkv = q.shape[1], k.shape[1]
    kf = k.float().repeat_interleave(H // Hkv, dim=1).permute(1, 2, 0)  # [H, Dh, S]
    vf = v.float().repeat_interleave(H // Hkv, dim=1).transpose(0, 1)  # [H, S, Dh]
    extent = P.shape[1]
    out = []
    for a in range(0, q.shape[0], QUERY_ROWS):
        b = min(a + QUERY_ROWS, q.shape[0])
        scores = (q[a:b].float().transpose(0, 1) @ kf) * scale  # [H, l, S]
        dist = qpos[a:b, None] - kpos[None, :]  # [l, S]
        rel = (r[a:b].float() @ P.float()).transpose(0, 1)  # [H, l, extent]
        bias = rel.gather(-1, dist.clamp(0, extent - 1).expand(H, -1, -1))
        bias = bias.masked_fill((dist < 0) | (dist >= extent), 0.0)
        if bias_tau is not None:
            bias = bias * bias_tau[a:b, None]
        allowed = dist >= 0
        if window:
            allowed &= dist < window
        scores = (scores + bias).masked_fill(~allowed, float("-inf"))
        if sinks is not None:  # one more logit per query and head, with no value
            p = torch.softmax(torch.cat((scores, sinks[a:b].float().t()[:, :, None]), dim=-1), dim=-1)[..., :-1]
        else:
            p = torch.softmax(scores, dim=-1)
        out.append((p @ vf).transpose(0, 1))  # [l, H, Dh]
    return torch.cat(out).to(q.dtype)


def _clip(x: torch.Tensor, threshold: float, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inkling 2's L2 clip per head vector (after a learned per-head scale where given), in float32."""
    dtype, x = x.dtype, x.float()
    if scale is not None:
        x = x * scale.float()
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return (x * (threshold / (n + 1e-6)).clamp(max=1.0)).to(dtype)


# --- short convolutions ---------------------------------------------------------------------------

def _state(dec, i: int, parts: list) -> Optional[dict]:
    if dec.cache is None:
        return None
    if len(parts) != 1:
        raise RuntimeError("a KV cache runs one sequence")
    return dec.cache.layer(i)


def _conv(dec, i: int, x: torch.Tensor, weight: torch.Tensor, key: str, parts: list, scale: float) -> torch.Tensor:
    """(depthwise causal conv(x) + x) * scale, in float32, per prompt; x [T, C], weight [C, 1, K]."""
    state = _state(dec, i, parts)
    xf = x.float()
    if weight.shape[0] != x.shape[1]:
        raise BadCheckpoint(f"layer {i}: a short convolution has {weight.shape[0]} channels, its input {x.shape[1]}")
    y = torch.cat([causal_conv(xf[a:b], weight.float(), None, state, key) for a, b in parts])
    return ((y + xf) * scale).to(x.dtype) if scale != 1.0 else (y + xf).to(x.dtype)


def _dynamic_conv(dec, i: int, x: torch.Tensor, inp: torch.Tensor, which: str, heads: int, parts: list) -> torch.Tensor:
    """Inkling 2's key / value convolution on full layers: taps static_weight [K, C] (tap 0: the current
    token) plus weight_proj(inp) per token and KV head; (conv + x) / sqrt(2K + 1), float32."""
    K, (T, C) = dec.fc.inkling.kernel, x.shape
    static = _w(dec, i, f"{which}_static").float()
    check_shape(f"{which}_sconv.static_weight", static, (K, C), "[conv_kernel_size, num_key_value_heads * head_dim]")
    taps = linear(inp, _w(dec, i, f"{which}_dyn")).float().view(T, heads, 1, K)
    taps = static.t().reshape(heads, C // heads, K) + taps  # [T, Hkv, Dh, K]
    state = _state(dec, i, parts)
    xf = x.float()
    out = []
    for a, b in parts:
        prev = state.get(f"{which}_conv") if state is not None else None
        ctx = torch.cat((xf.new_zeros(K - 1, C) if prev is None else prev, xf[a:b]))  # [K - 1 + L, C]
        if state is not None:
            state[f"{which}_conv"] = ctx[ctx.shape[0] - (K - 1):].clone()
        windows = ctx.unfold(0, K, 1).flip(-1)  # [L, C, K]: [t, c, lag] = x[t - lag, c]
        out.append((windows.reshape(b - a, heads, C // heads, K) * taps[a:b]).sum(-1).reshape(b - a, C))
    return ((torch.cat(out) + xf) / math.sqrt(2 * K + 1)).to(x.dtype)


# --- MLPs -----------------------------------------------------------------------------------------

def _dense(dec, i: int, h: torch.Tensor) -> torch.Tensor:
    """Inkling's dense layers: SwiGLU times the learned global_scale."""
    if dec.ffn_hook:
        dec.ffn_hook(dec, i, h, None)
    w13 = _w(dec, i, "dense_w13", required=False)
    if w13 is not None:
        y = linear(glu(linear(h, w13[0::2]), linear(h, w13[1::2]), dec.fc.expert_act), _w(dec, i, "dense_down"))
    else:
        y = dec.gated_mlp(f"{dec.names.layers}{i}.mlp.", h)
    return y * _w(dec, i, "mlp_scale")


def _moe(dec, i: int, h: torch.Tensor, routes: list, record: bool) -> torch.Tensor:
    fc, moe, s = dec.fc, dec.spec.moe, dec.fc.inkling
    E, k, S = moe.num_experts, moe.top_k, (moe.num_shared_experts if s.version == 1 else 0)
    rw = dec.names.find(i, *NAMES["router"])
    router_w = dec.store.get(rw, torch.float32, device=dec.device)  # routing in float32, as transformers
    check_shape(rw, router_w, (E + S, h.shape[1]), "[n_routed_experts + n_shared_experts, hidden_size]" if S
                else "[n_routed_experts, hidden_size]")
    logits = linear(h.float(), router_w)  # [T, E + S]
    if not torch.isfinite(logits).all():
        raise BadCheckpoint(non_finite_router(i, h, rw, router_w, None))
    bias = dec.store.get(dec.names.find(i, *NAMES["router_bias"]), torch.float32, device=dec.device).reshape(-1)
    if s.version == 1:  # the k chosen and the S shared experts share one normalisation (shared: a sink)
        routed = logits[:, :E]
        choice = torch.sigmoid(logits)[:, :E] + bias
        idx = torch.topk(choice, k, dim=-1).indices
        lp = F_.logsigmoid(torch.cat((routed.gather(1, idx), logits[:, E:]), dim=-1))
        w = torch.exp(lp - torch.logsumexp(lp, dim=-1, keepdim=True))
        w = w * moe.router.routed_scaling_factor * _w(dec, i, "router_scale").float()
        weights, gammas = w[:, :k], w[:, k:]
    else:
        routed = logits
        idx, weights, choice = route(logits, moe, fc.family, bias)
    if dec.route_hook is not None:
        idx, weights = dec.route_hook(i, idx, weights)
    if record:
        routes.append(LayerRoute(i, idx.cpu(), weights.float().cpu(), routed.cpu(), choice.float().cpu()))
    if dec.ffn_hook:
        dec.ffn_hook(dec, i, h, (idx, weights))
    experts = Experts(dec.store, dec.names, i, fc.family, moe.expert_ffn, dec.dtype, dec.device)
    out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    for e in torch.unique(idx).tolist():  # each chosen expert once, on all its tokens
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        gate, up, down, *_ = experts.load(e)
        x = h.index_select(0, tok)
        y = linear(glu(linear(x, gate), linear(x, up), fc.expert_act, fc.swiglu_limit, fc.swiglu_alpha), down)
        if getattr(dec, "expert_hook", None):  # profile: ||expert output|| per routed (token, slot) t*K+s (REAP)
            dec.expert_hook(i, e, tok * k + slot, y)
        out.index_add_(0, tok, (y * weights[tok, slot][:, None].to(y.dtype)).float())
        del gate, up, down
        dec.store.release()
    if S:  # Inkling's shared experts [S, F, D] / [S, D, F], each scaled by its weight before the down projection
        w13 = _w(dec, i, "shared_w13", required=False)
        g, u = (w13[:, 0::2], w13[:, 1::2]) if w13 is not None else (_w(dec, i, "shared_gate"), _w(dec, i, "shared_up"))
        d_ = _w(dec, i, "shared_down")
        for j in range(S):
            act = glu(linear(h, g[j]), linear(h, u[j]), fc.expert_act) * gammas[:, j:j + 1].to(h.dtype)
            out += linear(act, d_[j]).float()
    return out.to(h.dtype)
