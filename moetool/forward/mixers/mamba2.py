"""Mamba-2 (SSD, Dao & Gu 2024) as in Granite-4.0 (granitemoehybrid) and Nemotron-H: one
sequence x [T, D] -> [T, D]. H heads of P channels (I = H P), G groups sharing B and C, state N.

    z, xBC, dt = in_proj(h)                      [T, I], [T, I + 2 G N], [T, H]
    xBC      = act(causal_conv(xBC))              depthwise, kernel d_conv (with bias)
    x, B, C  = xBC                                x [T, H, P]; B, C [T, G, N] (head h uses group h // (H/G))
    dt       = clamp(softplus(dt + dt_bias), time_step_limit)            [T, H]
    A        = -exp(A_log)                                                [H]
    S_t      = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T                       state S [H, P, N]
    y_t      = S_t C_t + D x_t
    y        = RMSNorm_per_group(y * silu(z)) * norm.weight               (gate before norm)
    out      = out_proj(y)

State per sequence: conv (d_conv - 1) x (I + 2 G N) and H x P x N values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F_

from .common import act, causal_conv, wide


@dataclass(frozen=True)
class Mamba2Config:
    heads: int  # H
    head_dim: int  # P
    groups: int  # G
    d_state: int  # N
    d_conv: int
    eps: float = 1e-6
    activation: str = "silu"
    dt_min: float = 0.0
    dt_max: float = float("inf")
    prefix: str = "mamba."

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim


def state_elems(c: Mamba2Config) -> int:
    return (c.d_conv - 1) * (c.inner + 2 * c.groups * c.d_state) + c.heads * c.head_dim * c.d_state


def forward(w: dict, x: torch.Tensor, c: Mamba2Config, state: Optional[dict] = None) -> torch.Tensor:
    T, dtype, ct = x.shape[0], x.dtype, wide(x)
    H, P, G, N, I = c.heads, c.head_dim, c.groups, c.d_state, c.inner
    z, xBC, dt = F_.linear(x, w["in_proj.weight"], w.get("in_proj.bias")).split([I, I + 2 * G * N, H], dim=-1)
    xBC = act(causal_conv(xBC, w["conv1d.weight"], w.get("conv1d.bias"), state), c.activation)
    u, B, C = xBC.to(ct).split([I, G * N, G * N], dim=-1)
    u = u.view(T, H, P)
    B = B.view(T, G, N).repeat_interleave(H // G, dim=1)  # [T, H, N]
    C = C.view(T, G, N).repeat_interleave(H // G, dim=1)
    dt = F_.softplus(dt.to(ct) + w["dt_bias"].to(ct)).clamp(c.dt_min, c.dt_max)  # [T, H]
    dA = torch.exp(dt * -torch.exp(w["A_log"].to(ct)))  # [T, H]
    S = state.get("ssm") if state is not None else None
    S = torch.zeros(H, P, N, dtype=ct, device=x.device) if S is None else S.to(ct)
    ys = []
    for t in range(T):
        S = S * dA[t][:, None, None] + (dt[t][:, None] * u[t])[:, :, None] * B[t][:, None, :]
        ys.append(torch.einsum("hpn,hn->hp", S, C[t]))
    if state is not None:
        state["ssm"] = S
    y = torch.stack(ys) + u * w["D"].to(ct)[:, None]  # [T, H, P]
    y = y.reshape(T, I) * F_.silu(z.to(ct))
    yg = y.view(T, G, I // G)
    y = (yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + c.eps)).reshape(T, I)
    y = w["norm.weight"] * y.to(dtype)
    return F_.linear(y, w["out_proj.weight"], w.get("out_proj.bias"))
