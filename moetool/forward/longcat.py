"""LongCat-Flash's decoder layer (meituan-longcat/LongCat-Flash-Chat, transformers' longcat_flash).

Each layer holds two MLA sublayers and two dense SwiGLU MLPs, each with its own pre-norm, and one
shortcut MoE that reads the input of the first MLP and joins the residual stream at the end of the
layer:

    x = x + MLA_0(norm_in0(x));  h = norm_post0(x);  s = MoE(h);  x = x + MLP_0(h)
    x = x + MLA_1(norm_in1(x));  x = x + MLP_1(norm_post1(x)) + s

The router (`mlp.router.classifier`, [E + Z, D]) scores E routed experts and Z zero-computation
experts with one softmax; the correction bias shifts the choice only; the gate weights are the chosen
softmax scores times routed_scaling_factor (no renormalisation). A zero expert returns its input:
its token costs no expert FLOPs. Zero experts are recorded with ids E..E+Z-1.
"""

from __future__ import annotations

import torch

from ..errors import BadCheckpoint
from .model import Experts, LayerRoute, check_shape, linear, non_finite_router, norm, swiglu


def longcat_layer(dec, i: int, x, cos, sin, masks, routes: list, record: bool):
    fc = dec.fc
    nrm = lambda name, t: norm(t, dec.w(dec.names.find(i, name + ".weight")), None, fc)
    mlp = lambda j, t: dec.gated_mlp(f"{dec.names.layers}{i}.mlps.{j}.", t)
    x = x + dec.mla(i, nrm("input_layernorm.0", x), cos, sin, masks, prefix="self_attn.0.")
    h = nrm("post_attention_layernorm.0", x)
    shortcut = moe(dec, i, h, routes, record)
    x = x + mlp(0, h)
    x = x + dec.mla(i, nrm("input_layernorm.1", x), cos, sin, masks, prefix="self_attn.1.")
    return x + mlp(1, nrm("post_attention_layernorm.1", x)) + shortcut


def route(logits: torch.Tensor, bias: torch.Tensor, k: int, scale: float):
    """Router logits [T, E + Z] (fp32) -> (experts [T, K] best first, weights [T, K], selection scores [T, E + Z])."""
    probs = torch.softmax(logits, dim=-1)
    choice = probs + bias
    idx = torch.topk(choice, k, dim=-1).indices
    return idx, probs.gather(1, idx) * scale, choice


def moe(dec, i: int, h: torch.Tensor, routes: list, record: bool) -> torch.Tensor:
    spec, find = dec.spec.moe, (lambda *s, required=True: dec.names.find(i, *s, required=required))
    E, Z, D = spec.num_experts, spec.zero_experts, h.shape[1]
    rw = find("mlp.router.classifier.weight")
    router_w = dec.store.get(rw, dec.router_dtype, device=dec.device)
    check_shape(rw, router_w, (E + Z, D), "[n_routed_experts + zero_expert_num, hidden_size]")
    router_b = dec.store.get_optional(find("mlp.router.classifier.bias", required=False), dec.router_dtype,
                                      device=dec.device)
    logits = linear(h.to(dec.router_dtype), router_w, router_b).float()  # [T, E + Z]
    if not torch.isfinite(logits).all():
        raise BadCheckpoint(non_finite_router(i, h, rw, router_w, router_b))
    bias = dec.store.get_optional(find("mlp.router.e_score_correction_bias", required=False), torch.float32,
                                  device=dec.device)
    if bias is None:
        raise BadCheckpoint(f"layer {i}: LongCat-Flash's router needs mlp.router.e_score_correction_bias")
    idx, weights, choice = route(logits, bias.reshape(-1), spec.top_k, spec.router.routed_scaling_factor)
    if dec.route_hook is not None:
        idx, weights = dec.route_hook(i, idx, weights)
    if record:
        routes.append(LayerRoute(i, idx.cpu(), weights.float().cpu(), logits.cpu(), choice.float().cpu()))
    if dec.ffn_hook:  # quantize-report scores the real experts (ids < E) from these decisions
        dec.ffn_hook(dec, i, h, (idx, weights))
    experts = Experts(dec.store, dec.names, i, dec.fc.family, spec.expert_ffn, dec.dtype, dec.device)
    out = torch.zeros_like(h)
    for e in torch.unique(idx).tolist():  # each chosen expert once, on all its tokens, in expert order
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        w = weights[tok, slot][:, None].to(h.dtype)
        if e >= E:  # a zero-computation expert: the identity
            out.index_add_(0, tok, h[tok] * w)
            continue
        gate, up, down, gb, ub, db = experts.load(e)
        y = swiglu(h[tok], gate, up, down, gb, ub, db, dec.fc.expert_act)
        if getattr(dec, "expert_hook", None):  # profile: ||expert output|| per routed (token, slot) t*K+s (REAP)
            dec.expert_hook(i, e, tok * idx.shape[1] + slot, y)
        out.index_add_(0, tok, y * w)
        del gate, up, down
        dec.store.release()
    return out
