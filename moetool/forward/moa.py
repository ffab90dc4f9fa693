"""JetMoE's mixture of attention heads (MoA), as transformers' JetMoeAttention computes it.

A router [E, D] picks k experts per token (top-k of the logits, softmax over those k). Expert e
projects the token to Hkv query heads (W_in[e] [Hkv*Dh, D]); the token's k experts give it k*Hkv
heads, head j*Hkv + m attending with the shared key/value head m (kv_proj [2*Hkv*Dh, D], RoPE on
queries and keys). Each slot's output goes back through its expert's W_out[e] [D, Hkv*Dh], weighted
by its gate, summed, plus a bias [D]. Experts are read one at a time (streaming). The router's
decisions go to `dec.attention_routes` when the decoder records (trace: layers of kind "attention").

Shapes: T tokens, D hidden, E experts, K top-k, Hkv key/value heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_


def moa_attention(dec, i: int, h: torch.Tensor, cos, sin, masks, apply_rope, attention_mask, sdpa) -> torch.Tensor:
    fc, store = dec.fc, dec.store
    find = lambda s: dec.names.find(i, s)
    T, K, Hkv, Dh = h.shape[0], fc.heads // fc.kv_heads, fc.kv_heads, fc.head_dim
    base = "self_attention.experts."
    logits = F_.linear(h, dec.w(find(base + "router.layer.weight"))).float()  # [T, E]
    top, idx = logits.topk(K, dim=1)  # [T, K]
    gates = torch.softmax(top, dim=1).to(h.dtype)
    routes = getattr(dec, "attention_routes", None)
    if routes is not None:  # trace: this router's decisions, as their own entry (kind "attention")
        from .model import LayerRoute

        routes.append(LayerRoute(i, idx.cpu(), gates.float().cpu(), logits.cpu(), logits.cpu(), kind="attention"))
    w_in, w_out = find(base + "input_linear.weight"), find(base + "output_linear.weight")
    q = h.new_zeros(T, K, Hkv * Dh)
    for e in idx.unique().tolist():
        t, j = torch.where(idx == e)
        q[t, j] = F_.linear(h[t], store.get(w_in, dec.dtype, index=e, device=dec.device))
    kv = F_.linear(h, dec.w(find("self_attention.kv_proj.weight")))
    k, v = kv.chunk(2, dim=-1)
    q = q.view(T, K * Hkv, Dh)
    k, v = k.reshape(T, Hkv, Dh), v.reshape(T, Hkv, Dh)
    q, k = apply_rope(q, cos, sin, fc.rope.layout), apply_rope(k, cos, sin, fc.rope.layout)
    if dec.cache is not None:  # keys and values of the earlier tokens (a KV cache), after RoPE
        k, v = dec.cache.extend(i, k=k, v=v)
    k, v = k.repeat(1, K, 1), v.repeat(1, K, 1)  # head j*Hkv + m reads key/value head m
    if (None, None) not in masks:
        masks[(None, None)] = attention_mask(T, None, None, h.device, past=dec.past)
    out = sdpa(q, k, v, masks[(None, None)], fc.attn_scale).reshape(T, K, Hkv * Dh)
    y = torch.zeros_like(h)
    for e in idx.unique().tolist():
        t, j = torch.where(idx == e)
        y.index_add_(0, t, F_.linear(out[t, j], store.get(w_out, dec.dtype, index=e, device=dec.device))
                     * gates[t, j][:, None])
    store.release()
    return y + dec.w(find(base + "bias"))
