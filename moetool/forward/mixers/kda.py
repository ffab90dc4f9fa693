"""Kimi Delta Attention (KDA, Kimi Linear): Gated DeltaNet with a per-channel forget gate.
One sequence x [T, D] -> [T, D]; H heads of d (keys and values alike).

    q, k, v = silu(causal_conv([q_proj x, k_proj x, v_proj x]))
    q, k    = l2norm(q), l2norm(k); q = q / sqrt(d)
    g       = -exp(A_log_h) * softplus(f_b(f_a(x)) + dt_bias)      [T, H, d]: one decay per key channel
    beta    = sigmoid(b_proj x)                                      [T, H]
    S_t     = diag(exp(g_t)) S_{t-1}                                 state S [H, d, d]
    S_t    += k_t (beta_t (v_t - S_t^T k_t))^T;   o_t = S_t^T q_t
    out     = o_proj(RMSNorm(o) * o_norm.weight * sigmoid(g_b(g_a(x))))   norm per head

Ling 3.0 (bailing_hybrid) runs the same recurrence with full-rank gate projections (f_proj,
g_proj instead of the f_a/f_b and g_a/g_b pairs) and, with `kda_safe_gate` (its default), the
bounded forget gate `lower_bound * sigmoid(exp(A_log_h) * (f_proj x + dt_bias))` (KDAConfig.lower_bound).

Stored layouts: Moonshot's (and what transformers' save_pretrained writes): q_conv1d / k_conv1d /
v_conv1d and f_a_proj, f_b_proj, dt_bias, A_log directly under the attention; transformers' runtime
names: one conv1d and a forget_gate module. Ling's original layout names o_proj `dense`.
State per sequence: conv (kernel - 1) x 3 H d and H x d x d values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F_

from .common import act, causal_conv, wide


@dataclass(frozen=True)
class KDAConfig:
    heads: int
    head_dim: int
    kernel: int
    eps: float = 1e-6
    activation: str = "silu"
    prefix: str = "self_attn."
    lower_bound: Optional[float] = None  # Ling's bounded gate: g = lower_bound * sigmoid(exp(A_log) * (f + dt_bias))


def state_elems(c: KDAConfig) -> int:
    return (c.kernel - 1) * 3 * c.heads * c.head_dim + c.heads * c.head_dim * c.head_dim


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + eps)  # FLA's form (sqrt, then divide)


def forward(w: dict, x: torch.Tensor, c: KDAConfig, state: Optional[dict] = None) -> torch.Tensor:
    T, dtype, ct = x.shape[0], x.dtype, wide(x)
    H, d = c.heads, c.head_dim
    qkv = torch.cat([F_.linear(x, w[f"{p}_proj.weight"]) for p in "qkv"], dim=-1)
    conv = w.get("conv1d.weight")
    if conv is None:
        conv = torch.cat([w[f"{p}_conv1d.weight"] for p in "qkv"], dim=0)
    qkv = act(causal_conv(qkv, conv, None, state), c.activation).to(ct)
    fg = lambda n: w[f"forget_gate.{n}"] if f"forget_gate.{n}" in w else w[n]
    q, k, v = (t.view(T, H, d) for t in qkv.split(H * d, dim=-1))
    q, k = _l2norm(q) * d ** -0.5, _l2norm(k)
    f = _proj(w, x, "f", fg).to(ct) + fg("dt_bias").to(ct)
    rate = torch.exp(fg("A_log").to(ct).view(1, H, 1))
    if c.lower_bound is None:
        g = -rate * F_.softplus(f.view(T, H, d))  # [T, H, d]
    else:  # bounded in (lower_bound, 0)
        g = c.lower_bound * torch.sigmoid(rate * f.view(T, H, d))
    beta = torch.sigmoid(F_.linear(x, w["b_proj.weight"]).to(ct))  # [T, H]
    S = state.get("ssm") if state is not None else None
    S = torch.zeros(H, d, d, dtype=ct, device=x.device) if S is None else S.to(ct)
    out = []
    for t in range(T):
        S = S * torch.exp(g[t])[:, :, None]
        delta = (v[t] - torch.einsum("hkv,hk->hv", S, k[t])) * beta[t][:, None]
        S = S + k[t][:, :, None] * delta[:, None, :]
        out.append(torch.einsum("hkv,hk->hv", S, q[t]))
    if state is not None:
        state["ssm"] = S
    o = torch.stack(out)  # [T, H, d]
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + c.eps) * w["o_norm.weight"].to(ct)
    gate = _proj(w, x, "g", lambda n: w[n]).to(ct).view(T, H, d)
    o = (o * torch.sigmoid(gate)).reshape(T, H * d).to(dtype)
    o_name = "o_proj" if "o_proj.weight" in w else "dense"  # Ling's original name
    return F_.linear(o, w[f"{o_name}.weight"], w.get(f"{o_name}.bias"))


def _proj(w: dict, x: torch.Tensor, p: str, get) -> torch.Tensor:
    """The forget (p = "f") or output (p = "g") gate's projection of x: full rank (`f_proj`, Ling)
    or low rank (`f_a_proj` then `f_b_proj`, Kimi)."""
    full = f"forget_gate.{p}_proj.weight" if f"forget_gate.{p}_proj.weight" in w else f"{p}_proj.weight"
    if full in w:
        return F_.linear(x, w[full])
    return F_.linear(F_.linear(x, get(f"{p}_a_proj.weight")), get(f"{p}_b_proj.weight"))
