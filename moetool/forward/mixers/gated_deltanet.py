"""Gated DeltaNet (Yang et al. 2024) as in Qwen3-Next and Qwen3.5: one sequence x [T, D] -> [T, D].

    q, k, v, z, b, a = projections of x         q, k: Hk heads of dk; v, z: Hv heads of dv; b, a: Hv
    q, k, v = silu(causal_conv([q, k, v]))      depthwise over the concatenated channels
    q, k    = l2norm(q), l2norm(k); q = q / sqrt(dk); each q/k head serves Hv/Hk value heads
    beta    = sigmoid(b);  g = -exp(A_log) * softplus(a + dt_bias)        [T, Hv]
    S_t     = exp(g_t) S_{t-1}                                            state S [Hv, dk, dv]
    S_t    += k_t (beta_t (v_t - S_t^T k_t))^T                            the delta rule
    o_t     = S_t^T q_t
    out     = out_proj(RMSNorm(o) * silu(z))                               norm per head of dv

Two stored layouts: Qwen3-Next fuses `in_proj_qkvz` and `in_proj_ba` grouped per key head
([q, k, v..., z...] for each of the Hk groups); Qwen3.5 stores `in_proj_qkv` (flat q, k, v),
`in_proj_z`, `in_proj_b`, `in_proj_a`.
State per sequence: conv (kernel - 1) x (2 Hk dk + Hv dv) and Hv x dk x dv values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F_

from .common import act, causal_conv, wide, l2norm, rms


@dataclass(frozen=True)
class GatedDeltaNetConfig:
    k_heads: int  # Hk
    v_heads: int  # Hv
    k_dim: int  # dk
    v_dim: int  # dv
    kernel: int
    eps: float = 1e-6
    activation: str = "silu"
    prefix: str = "linear_attn."
    gate_act: str = "silu"  # the output norm's gate (Qwen4-Exp: output_gate_type, sigmoid or silu)


def state_elems(c: GatedDeltaNetConfig) -> int:
    return (c.kernel - 1) * (2 * c.k_heads * c.k_dim + c.v_heads * c.v_dim) + c.v_heads * c.k_dim * c.v_dim


def _project(w: dict, x: torch.Tensor, c: GatedDeltaNetConfig):
    """q, k [T, Hk*dk], v, z [T, Hv*dv], b, a [T, Hv] from either stored layout."""
    T, Hk, r = x.shape[0], c.k_heads, c.v_heads // c.k_heads
    if "in_proj_qkvz.weight" in w:  # Qwen3-Next: grouped per key head
        qkvz = F_.linear(x, w["in_proj_qkvz.weight"]).view(T, Hk, 2 * c.k_dim + 2 * r * c.v_dim)
        q, k, v, z = qkvz.split([c.k_dim, c.k_dim, r * c.v_dim, r * c.v_dim], dim=-1)
        b, a = F_.linear(x, w["in_proj_ba.weight"]).view(T, Hk, 2 * r).split([r, r], dim=-1)
        return (q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1), z.reshape(T, -1),
                b.reshape(T, -1), a.reshape(T, -1))
    q, k, v = F_.linear(x, w["in_proj_qkv.weight"]).split([Hk * c.k_dim, Hk * c.k_dim, c.v_heads * c.v_dim], dim=-1)
    return q, k, v, F_.linear(x, w["in_proj_z.weight"]), F_.linear(x, w["in_proj_b.weight"]), F_.linear(x, w["in_proj_a.weight"])


def forward(w: dict, x: torch.Tensor, c: GatedDeltaNetConfig, state: Optional[dict] = None) -> torch.Tensor:
    T, dtype, ct = x.shape[0], x.dtype, wide(x)
    Hk, Hv, dk, dv = c.k_heads, c.v_heads, c.k_dim, c.v_dim
    q, k, v, z, b, a = _project(w, x, c)
    qkv = act(causal_conv(torch.cat((q, k, v), dim=-1), w["conv1d.weight"], w.get("conv1d.bias"), state), c.activation)
    q, k, v = qkv.to(ct).split([Hk * dk, Hk * dk, Hv * dv], dim=-1)
    q = l2norm(q.view(T, Hk, dk)).repeat_interleave(Hv // Hk, dim=1) * dk ** -0.5  # [T, Hv, dk]
    k = l2norm(k.view(T, Hk, dk)).repeat_interleave(Hv // Hk, dim=1)
    v = v.view(T, Hv, dv)
    beta = torch.sigmoid(b.to(ct))  # [T, Hv]
    g = -torch.exp(w["A_log"].to(ct)) * F_.softplus(a.to(ct) + w["dt_bias"].to(ct))  # [T, Hv]
    S = state.get("ssm") if state is not None else None
    S = torch.zeros(Hv, dk, dv, dtype=ct, device=x.device) if S is None else S.to(ct)
    out = []
    for t in range(T):
        S = S * torch.exp(g[t])[:, None, None]
        kv_mem = torch.einsum("hkv,hk->hv", S, k[t])
        delta = (v[t] - kv_mem) * beta[t][:, None]  # [Hv, dv]
        S = S + k[t][:, :, None] * delta[:, None, :]
        out.append(torch.einsum("hkv,hk->hv", S, q[t]))
    if state is not None:
        state["ssm"] = S
    o = torch.stack(out)  # [T, Hv, dv]
    o = rms(o, w["norm.weight"].to(ct), c.eps) * act(z.to(ct).view(T, Hv, dv), c.gate_act)
    return F_.linear(o.reshape(T, Hv * dv).to(dtype), w["out_proj.weight"], w.get("out_proj.bias"))
