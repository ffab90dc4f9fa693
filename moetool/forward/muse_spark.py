"""Muse Spark's decoder layer (transformers' muse_spark: the language model of
MuseSparkForConditionalGeneration on text-only input; the vision and audio towers are not run).

What differs from the Llama-like layer of forward/model.py:

- the token embedding goes through a weightless RMSNorm (MuseSparkTextNormedEmbedding), applied here
  before layer 0;
- norms: "centred" RMSNorms norm(x) * (1 + w) before attention and FFN (input_layernorm,
  pre_feedforward_layernorm, the experts' pre_expert_norm); a weightless RMSNorm (eps post_norm_eps)
  on the attention output; "input-scaled" RMSNorms norm(x * (1 + w)) on the FFN output
  (post_feedforward_layernorm) and on every expert's output (experts.post_expert_norm);
- residual gates instead of additions: w = gate / residual_gate_temperature, beta = sigmoid(w),
  alpha = sqrt(max(sigmoid(-w) * (1 + beta), 1e-3)), x' = alpha * x + beta * sublayer;
- attention: weightless per-head RMSNorm on Q and K (Q then times qk_scale_factor), RoPE (the global
  rope_theta, rotate-half) on the layers whose layer_rope_theta is non-zero (0: NoPE; transformers 5.23
  uses only whether it is zero, not the value), sliding window on "sliding_attention" layers, a
  weightless per-head RMSNorm on the attention output, then times sigmoid(gate_proj(h)), then o_proj;
- the MoE block: router logits (fp32) times output_multiplier, sigmoid, correction bias for the
  choice (DeepSeek-V3's router with one group, weights renormalised); the experts run in a space of
  moe_hidden_size: pre_expert_proj, pre_expert_norm, SwiGLU experts, post_expert_norm, times the gate
  weight, summed, post_expert_proj;
- final logits cap * tanh(lm_head(x) * output_multiplier / cap) (final_logit_softcapping): set as data
  in `configure` (fc.final_softcap = cap / multiplier, fc.logits_scaling = 1 / multiplier).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BadCheckpoint, BadConfig
from ..spec import Cfg, ModelSpec
from .model import (Experts, LayerRoute, _route_sigmoid_group, apply_rope, attention_mask, check_shape, linear,
                    non_finite_router, rms_norm, sdpa, swiglu)


@dataclass
class MuseSparkSettings:
    qk_scale: float  # qk_scale_factor: Q times this after its norm
    router_scale: float  # output_multiplier: router logits times this
    post_eps: float  # post_norm_eps: the norms between a sublayer's output and the residual gate
    temperature: float  # residual_gate_temperature


def configure(fc, spec: ModelSpec, cfg: Cfg) -> None:
    """Fill `fc` (forward/config.py's ForwardConfig, built from the text config `cfg`) for Muse Spark."""
    n = spec.num_layers
    theta = cfg.raw("layer_rope_theta")
    if theta is None:  # MuseSparkTextConfig's default: NoPE on every 4th layer counted from the last
        theta = [0 if (n - 1 - i) % 4 == 0 else 1 for i in range(n)]
    if not isinstance(theta, list) or len(theta) < n or any(isinstance(t, bool) or not isinstance(t, (int, float))
                                                            for t in theta):
        raise BadConfig(f"{cfg.where}: layer_rope_theta must hold a number for each of the {n} layers")
    fc.use_rope, fc.layer_rope = [bool(t) for t in theta[:n]], []
    mult = cfg.float("output_multiplier", 0.1767766952966369)
    cap = cfg.float("final_logit_softcapping", 20.0)
    if mult <= 0 or cap <= 0:
        raise BadConfig(f"{cfg.where}: output_multiplier and final_logit_softcapping must be positive")
    # cap * tanh(l * mult / cap) == (1 / mult)^-1 * (cap / mult) * tanh(l / (cap / mult)): Decoder._final's data
    fc.final_softcap, fc.logits_scaling = cap / mult, 1.0 / mult
    fc.eps = cfg.float("rms_norm_eps", 1e-5)
    fc.muse_spark = MuseSparkSettings(qk_scale=cfg.float("qk_scale_factor", 5.4730064863875), router_scale=mult,
                                      post_eps=cfg.float("post_norm_eps", 1e-8),
                                      temperature=cfg.float("residual_gate_temperature", 0.3))
    if fc.muse_spark.temperature == 0:
        raise BadConfig(f"{cfg.where}: residual_gate_temperature must not be 0")


def centred(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """MuseSparkTextCenteredRMSNorm: norm(x) * (1 + w), in float32."""
    return (rms_norm(x.float(), None, eps) * (1.0 + w.float())).to(x.dtype)


def input_scaled(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """MuseSparkTextInputScaledRMSNorm: norm(x * (1 + w)), in float32."""
    return rms_norm((x.float() * (1.0 + w.float())).to(x.dtype).float(), None, eps).to(x.dtype)


def residual_gate(gate: torch.Tensor, temperature: float, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """MuseSparkResidualGate: alpha * x + beta * f (the gate [D] kept in float32, as transformers does)."""
    w = gate.float() / temperature
    beta = torch.sigmoid(w)
    alpha = torch.sqrt(torch.clamp(torch.sigmoid(-w) * (1.0 + beta), min=1e-3))
    return (alpha * x + beta * f).to(x.dtype)


def layer(dec, i: int, x: torch.Tensor, cos, sin, masks: dict, routes: list, record: bool) -> torch.Tensor:
    fc, s = dec.fc, dec.fc.muse_spark
    find = lambda *n, required=True: dec.names.find(i, *n, required=required)
    gate = lambda name: dec.store.get(find(name), torch.float32, device=dec.device)
    if i == 0:  # the normed embedding (MuseSparkTextNormedEmbedding): a weightless RMSNorm
        x = rms_norm(x, None, fc.eps)
    a = attention(dec, i, centred(x, dec.w(find("input_layernorm.weight")), fc.eps), cos, sin, masks)
    x = residual_gate(gate("post_attention_residual_gate.gate"), s.temperature, x, rms_norm(a, None, s.post_eps))
    h = centred(x, dec.w(find("pre_feedforward_layernorm.weight")), fc.eps)
    if dec.spec.layers[i].moe:
        f = moe(dec, i, h, routes, record)
    else:
        if dec.ffn_hook:
            dec.ffn_hook(dec, i, h, None)
        f = dec.gated_mlp(f"{dec.names.layers}{i}.mlp.", h)
    f = input_scaled(f, dec.w(find("post_feedforward_layernorm.weight")), s.post_eps)
    return residual_gate(gate("post_feedforward_residual_gate.gate"), s.temperature, x, f)


def attention(dec, i: int, h: torch.Tensor, cos, sin, masks: dict) -> torch.Tensor:
    fc, s = dec.fc, dec.fc.muse_spark
    find = lambda *n, required=True: dec.names.find(i, *n, required=required)
    w = lambda name: dec.w(find(name, required=False))
    T, H, Hkv, Dh = h.shape[0], fc.heads, fc.kv_heads, fc.head_dim
    q = linear(h, dec.w(find("self_attn.q_proj.weight")), w("self_attn.q_proj.bias"))
    k = linear(h, dec.w(find("self_attn.k_proj.weight")), w("self_attn.k_proj.bias"))
    v = linear(h, dec.w(find("self_attn.v_proj.weight")), w("self_attn.v_proj.bias"))
    if q.shape[-1] != H * Dh or k.shape[-1] != Hkv * Dh or v.shape[-1] != Hkv * Dh:
        raise BadCheckpoint(f"layer {i}: the q/k/v projections give {q.shape[-1]}/{k.shape[-1]}/{v.shape[-1]} "
                            f"features, config.json implies {H * Dh}/{Hkv * Dh}/{Hkv * Dh}")
    q = rms_norm(q.view(T, H, Dh), None, fc.eps) * s.qk_scale
    k = rms_norm(k.view(T, Hkv, Dh), None, fc.eps)
    v = v.view(T, Hkv, Dh)
    if fc.use_rope[i]:  # NoPE layers: layer_rope_theta 0
        q, k = apply_rope(q, cos, sin, "half"), apply_rope(k, cos, sin, "half")
    key = (fc.windows[i], None)
    if key not in masks:
        masks[key] = attention_mask(T, fc.windows[i], None, q.device, past=dec.past)
    if dec.cache is not None:  # keys and values of the earlier tokens, after the norm and RoPE
        k, v = dec.cache.extend(i, k=k, v=v)
    out = rms_norm(sdpa(q, k, v, masks[key], fc.attn_scale), None, fc.eps).reshape(T, H * Dh)
    out = out * torch.sigmoid(linear(h, dec.w(find("self_attn.gate_proj.weight"))))
    return linear(out, dec.w(find("self_attn.o_proj.weight")), w("self_attn.o_proj.bias"))


def moe(dec, i: int, h: torch.Tensor, routes: list, record: bool) -> torch.Tensor:
    """The MoE block on h [T, D]: routed on h, the experts in the projected space of moe_hidden_size."""
    fc, s, spec = dec.fc, dec.fc.muse_spark, dec.spec.moe
    find = lambda *n, required=True: dec.names.find(i, *n, required=required)
    rw = find("mlp.gate.weight")
    router_w = dec.store.get(rw, torch.float32, device=dec.device)
    check_shape(rw, router_w, (spec.num_experts, h.shape[1]), "[num_experts, hidden_size]")
    logits = linear(h.float(), router_w) * s.router_scale  # [T, E] in fp32
    if not torch.isfinite(logits).all():
        raise BadCheckpoint(non_finite_router(i, h, rw, router_w, None))
    corr = dec.store.get(find("mlp.gate.e_score_correction_bias"), torch.float32, device=dec.device).reshape(-1)
    idx, weights, scores = _route_sigmoid_group(logits, spec, corr)  # [T, K], [T, K], [T, E]
    if dec.route_hook is not None:
        idx, weights = dec.route_hook(i, idx, weights)
    if record:
        routes.append(LayerRoute(i, idx.cpu(), weights.float().cpu(), logits.cpu(), scores.float().cpu()))
    hp = centred(linear(h, dec.w(find("mlp.pre_expert_proj.weight"))), dec.w(find("mlp.pre_expert_norm.weight")),
                 fc.eps)  # [T, moe_hidden_size]: the experts' input
    if dec.ffn_hook:
        dec.ffn_hook(dec, i, hp, (idx, weights))
    post = dec.w(find("mlp.experts.post_expert_norm.weight"))
    experts = Experts(dec.store, dec.names, i, fc.family, spec.expert_ffn, dec.dtype, dec.device)
    out = torch.zeros_like(hp)
    for e in torch.unique(idx).tolist():  # each chosen expert once, on all its tokens
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        g, u, d, gb, ub, db = experts.load(e)
        y = input_scaled(swiglu(hp.index_select(0, tok), g, u, d, gb, ub, db, fc.expert_act), post, s.post_eps)
        if getattr(dec, "expert_hook", None):  # profile: ||expert output|| per routed (token, slot) t*K+s (REAP)
            dec.expert_hook(i, e, tok * idx.shape[1] + slot, y)
        out.index_add_(0, tok, y * weights[tok, slot][:, None].to(y.dtype))
        del g, u, d
        dec.store.release()
    return linear(out, dec.w(find("mlp.post_expert_proj.weight")))
