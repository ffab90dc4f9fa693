"""Zyphra ZAYA1's decoder layer (transformers' zaya, ZayaForCausalLM); arch/zaya.py counts it.

    x0 = (embed + input_hidden_states_bias) * input_hidden_states_scale
    r  = post_attention_residual_scale(CCA(norm_in(x)), x)        # (a + b_a) * s_a + (x + b_r) * s_r
    x' = post_mlp_residual_scale(MoE(norm_post(r)), r)

Compressed Convolutional Attention (CCA): q = q_proj(h), k = k_proj(h); the [q | k] channels
(C = (H + Hkv) * Dh) pass through a causal depthwise Conv1d (kernel cca_time0) then a grouped one
(kernel cca_time1, groups H + Hkv), both over a sequence left-padded with cca_time0 - 1 + cca_time1 - 1
zeros; the residual paths add (q + k repeated per query head) / 2 to the queries and its mean over each
KV group to the keys. Then q and k are L2-normalised to sqrt(Dh), the keys times a learned scale per
KV head (`qk_norm.temp`), and rotated (partial RoPE per layer type). Values: half of each [current |
delayed] width from v_proj_current(h_t) and half from v_proj_delayed(h_{t-1}) (at the first token of a
sequence, v_proj_delayed of zeros). Sliding layers: layer_types "hybrid_sliding".

Router: r_i = down_proj(h) (+ r_{i-1} * router_states_scale from layer 1 on: the previous layer's
router state of the same token), logits = out_proj(gelu(fc2(gelu(fc1(RMSNorm(r_i)))))) over E experts
and a skip expert; softmax; top-1 of (probabilities + balancing_biases); the gate weight is the chosen
probability, 0 for the skip expert, which runs nothing. The skip expert is recorded as expert id E.

A KV cache holds, per layer, the keys and values, the convolution's last inputs and the last
delayed value projection; a block of prompts (`moetool profile`) restarts both at each prompt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F_

from ..errors import BadCheckpoint
from .model import Experts, LayerRoute, apply_rope, attention_mask, linear, non_finite_router, norm, rms_norm, sdpa, swiglu


def zaya_layer(dec, i: int, x, cos, sin, masks, routes: list, record: bool):
    find = lambda *s, required=True: dec.names.find(i, *s, required=required)
    if i == 0:  # the embeddings' affine scaling; the router state starts afresh
        root = dec.names.layers[: -len("layers.")]
        x = (x + dec.w(root + "input_hidden_states_bias")) * dec.w(root + "input_hidden_states_scale")
        dec.zaya_router_state = None
    h = norm(x, dec.w(find("input_layernorm.weight")), None, dec.fc)
    r = _residual_scale(dec, i, "post_attention_residual_scale", cca_attention(dec, i, h, cos, sin, masks), x)
    h = norm(r, dec.w(find("post_attention_layernorm.weight")), None, dec.fc)
    return _residual_scale(dec, i, "post_mlp_residual_scale", moe(dec, i, h, routes, record), r)


def _residual_scale(dec, i: int, name: str, f, residual):
    w = lambda p: dec.w(dec.names.find(i, f"{name}.{p}"))
    return (f + w("hidden_states_bias")) * w("hidden_states_scale") + (residual + w("residual_bias")) * w("residual_scale")


def _segments(dec, T: int) -> list[tuple[int, int]]:
    """The sequences in these T rows: one, or each prompt of a profile block (positions restart at 0)."""
    pos = getattr(dec, "positions", None)
    if pos is None:
        return [(0, T)]
    starts = torch.nonzero(pos == 0).flatten().tolist() + [T]
    return list(zip(starts[:-1], starts[1:]))


def cca_attention(dec, i: int, h, cos, sin, masks) -> torch.Tensor:
    fc = dec.fc
    find = lambda *s, required=True: dec.names.find(i, *s, required=required)
    w = lambda s: dec.w(find(f"self_attn.qkv_proj.{s}", required=not s.endswith(".bias")))
    T = h.shape[0]
    H, Hkv, Dh, _ = fc.dims_of(i)
    G = H // Hkv
    t0, t1 = fc.cca
    K = t0 - 1 + t1 - 1
    q = linear(h, w("q_proj.weight"), w("q_proj.bias"))  # [T, H*Dh]
    k = linear(h, w("k_proj.weight"), w("k_proj.bias"))  # [T, Hkv*Dh]
    if q.shape[-1] != H * Dh or k.shape[-1] != Hkv * Dh:
        raise BadCheckpoint(f"layer {i}: q_proj / k_proj give {q.shape[-1]} / {k.shape[-1]} features, config.json "
                            f"implies {H * Dh} / {Hkv * Dh}")
    q_res = (q.view(T, H, Dh) + k.view(T, Hkv, Dh).repeat_interleave(G, dim=1)) * 0.5
    k_res = q_res.view(T, Hkv, G, Dh).mean(dim=-2)
    qk = torch.cat((q, k), dim=-1)  # [T, C]
    dw_w, dw_b, gr_w, gr_b = (w(n) for n in ("conv_qk_depthwise.weight", "conv_qk_depthwise.bias",
                                             "conv_qk_grouped.weight", "conv_qk_grouped.bias"))
    state = dec.cache.layer(i) if dec.cache is not None else None
    vc = linear(h, w("v_proj_current.weight"), w("v_proj_current.bias"))
    vd_w, vd_b = w("v_proj_delayed.weight"), w("v_proj_delayed.bias")
    vd = linear(h, vd_w, vd_b)
    first_v = vd_b.view(1, -1) if vd_b is not None else vd.new_zeros(1, vd.shape[1])  # v_proj_delayed(0)
    conv = torch.empty_like(qk)
    delayed = torch.empty_like(vd)
    for a, b in _segments(dec, T):
        seq = qk[a:b].t()[None]  # [1, C, L]
        tail = state.get("cca_tail") if state is not None else None
        seq = torch.cat((tail, seq), dim=-1) if tail is not None else F_.pad(seq, (K, 0))
        if state is not None:
            state["cca_tail"] = seq[..., seq.shape[-1] - K:]
        y = F_.conv1d(seq, dw_w, dw_b, groups=dw_w.shape[0])
        conv[a:b] = F_.conv1d(y, gr_w, gr_b, groups=H + Hkv)[0].t()
        prev = state.get("v_prev") if state is not None else None
        delayed[a:b] = torch.cat((first_v if prev is None else prev, vd[a:b - 1]), dim=0)
        if state is not None:
            state["v_prev"] = vd[b - 1:b]
    query = conv[:, :H * Dh].reshape(T, H, Dh) + q_res
    key = conv[:, H * Dh:].reshape(T, Hkv, Dh) + k_res
    value = torch.cat((vc, delayed), dim=-1).view(T, Hkv, Dh)
    eps = torch.finfo(query.dtype).eps  # L2 norm to sqrt(Dh); keys times a learned scale per KV head
    query = query * (math.sqrt(Dh) / query.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
    key = key * (math.sqrt(Dh) / key.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
    key = key * dec.w(find("self_attn.qk_norm.temp")).view(1, Hkv, 1)
    if fc.use_rope[i]:
        rope, cos, sin = dec.layer_rope(i, T, cos, sin)
        r = rope.dim
        query = torch.cat((apply_rope(query[..., :r], cos, sin, rope.layout), query[..., r:]), dim=-1)
        key = torch.cat((apply_rope(key[..., :r], cos, sin, rope.layout), key[..., r:]), dim=-1)
    mkey = (fc.windows[i], None)
    if mkey not in masks:
        masks[mkey] = attention_mask(T, fc.windows[i], None, query.device, past=dec.past)
    if dec.cache is not None:
        key, value = dec.cache.extend(i, k=key, v=value)
    out = sdpa(query, key, value, masks[mkey], fc.attn_scale).reshape(T, H * Dh)
    return linear(out, dec.w(find("self_attn.o_proj.weight")), dec.w(find("self_attn.o_proj.bias", required=False)))


def moe(dec, i: int, h, routes: list, record: bool) -> torch.Tensor:
    spec, fc = dec.spec.moe, dec.fc
    find = lambda *s, required=True: dec.names.find(i, *s, required=required)
    g = lambda s: dec.store.get_optional(find(f"mlp.gate.{s}", required=False), dec.router_dtype, device=dec.device)
    E = spec.num_experts
    state = linear(h.to(dec.router_dtype), g("down_proj.weight"), g("down_proj.bias"))  # [T, R]
    if i and dec.zaya_router_state is not None:  # the previous layer's router state of the same token
        state = state + dec.zaya_router_state * g("router_states_scale")
    dec.zaya_router_state = state
    z = rms_norm(state, g("router_mlp.norm.weight"), fc.eps)
    z = F_.gelu(linear(z, g("router_mlp.fc1.weight"), g("router_mlp.fc1.bias")))
    z = F_.gelu(linear(z, g("router_mlp.fc2.weight"), g("router_mlp.fc2.bias")))
    out_w = g("router_mlp.out_proj.weight")
    logits = linear(z, out_w).float()  # [T, E + 1]: the last class is the skip expert
    if logits.shape[-1] != E + 1:
        raise BadCheckpoint(f"layer {i}: the router scores {logits.shape[-1]} classes, config.json implies "
                            f"{E + 1} (num_experts and the skip expert)")
    if not torch.isfinite(logits).all():
        raise BadCheckpoint(non_finite_router(i, h, find("mlp.gate.router_mlp.out_proj.weight"), out_w, None))
    probs = torch.softmax(logits, dim=-1)
    bias = dec.store.get_optional(find("mlp.gate.balancing_biases", required=False), torch.float32, device=dec.device)
    if bias is None:  # not stored: transformers' initial value, the skip expert's selection lowered by 1
        bias = torch.zeros(E + 1, device=probs.device)
        bias[E] = -1.0
    choice = probs + bias
    idx = torch.topk(choice, spec.top_k, dim=-1).indices  # [T, K]
    weights = probs.gather(1, idx).masked_fill(idx == E, 0.0)
    if dec.route_hook is not None:
        idx, weights = dec.route_hook(i, idx, weights)
    if record:
        routes.append(LayerRoute(i, idx.cpu(), weights.float().cpu(), logits.cpu(), choice.cpu()))
    if dec.ffn_hook:  # the tokens that run an expert (quantize-report): the skip expert runs nothing
        keep = (idx != E).all(dim=-1)
        dec.ffn_hook(dec, i, h[keep], (idx[keep], weights[keep]))
    experts = Experts(dec.store, dec.names, i, fc.family, spec.expert_ffn, dec.dtype, dec.device)
    out = torch.zeros_like(h)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E + 1).tolist()
    tokens, w_flat = order // spec.top_k, weights.reshape(-1)[order]
    start = 0
    for e, c in enumerate(counts[:E]):
        if not c:
            continue
        tok, w_e = tokens[start:start + c], w_flat[start:start + c]
        start += c
        gate, up, down, gb, ub, db = experts.load(e)
        y = swiglu(h.index_select(0, tok), gate, up, down, gb, ub, db, fc.expert_act)
        if getattr(dec, "expert_hook", None):
            dec.expert_hook(i, e, order[start - c:start], y)
        out.index_add_(0, tok, y * w_e[:, None].to(y.dtype))
        del gate, up, down
        dec.store.release()
    return out

