"""Mamba (selective SSM, Gu & Dao 2023) as in Jamba: one sequence x [T, D] -> [T, D].

    x, z   = in_proj(h)                          [T, I] each (I = mamba_expand * D)
    u      = act(causal_conv(x))                 depthwise, kernel d_conv
    dt, B, C = x_proj(u)                          [T, R], [T, N], [T, N]
    (Jamba: RMSNorm on dt, B and C)
    dt     = softplus(dt_proj(dt))                [T, I]   (dt_proj has a bias)
    A      = -exp(A_log)                          [I, N]
    s_t    = exp(dt_t A) * s_{t-1} + (dt_t u_t) B_t^T    state s [I, N]
    y_t    = s_t C_t + D u_t, then y_t * silu(z_t)
    out    = out_proj(y)

State per sequence: conv (d_conv - 1) x I and SSM I x N values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F_

from .common import act, causal_conv, wide, rms


@dataclass(frozen=True)
class MambaConfig:
    inner: int  # I
    d_state: int  # N
    d_conv: int
    dt_rank: int  # R
    eps: float = 1e-6
    activation: str = "silu"
    bc_dt_norm: bool = True  # Jamba's RMSNorms on dt, B, C
    prefix: str = "mamba."


def state_elems(c: MambaConfig) -> int:
    return c.inner * (c.d_conv - 1 + c.d_state)


def forward(w: dict, x: torch.Tensor, c: MambaConfig, state: Optional[dict] = None) -> torch.Tensor:
    """w: the layer's tensors by local name (in_proj.weight, conv1d.weight, x_proj.weight, dt_proj.weight,
    dt_proj.bias, A_log, D, out_proj.weight, dt_layernorm.weight, ...). `state` (a dict) carries the
    conv and SSM state across calls; None runs a fresh sequence."""
    dtype, ct = x.dtype, wide(x)
    xz = F_.linear(x, w["in_proj.weight"], w.get("in_proj.bias"))  # [T, 2I]
    u, z = xz.chunk(2, dim=-1)
    u = act(causal_conv(u, w["conv1d.weight"], w.get("conv1d.bias"), state), c.activation)  # [T, I]
    dt, B, C = F_.linear(u, w["x_proj.weight"]).split([c.dt_rank, c.d_state, c.d_state], dim=-1)
    if c.bc_dt_norm:
        dt = rms(dt, w["dt_layernorm.weight"], c.eps)
        B = rms(B, w["b_layernorm.weight"], c.eps)
        C = rms(C, w["c_layernorm.weight"], c.eps)
    dt = F_.softplus(F_.linear(dt, w["dt_proj.weight"]).to(ct) + w["dt_proj.bias"].to(ct))  # [T, I]
    A = -torch.exp(w["A_log"].to(ct))  # [I, N]
    dA = torch.exp(dt[:, :, None] * A)  # [T, I, N]
    dBu = dt[:, :, None] * B.to(ct)[:, None, :] * u.to(ct)[:, :, None]  # [T, I, N]
    s = state.get("ssm") if state is not None else None
    s = torch.zeros(c.inner, c.d_state, dtype=ct, device=x.device) if s is None else s.to(ct)
    ys = []
    for t in range(x.shape[0]):
        s = dA[t] * s + dBu[t]
        ys.append(s @ C[t].to(ct))  # [I]
    if state is not None:
        state["ssm"] = s
    y = torch.stack(ys) + u.to(ct) * w["D"].to(ct)
    y = y * F_.silu(z.to(ct))
    return F_.linear(y.to(dtype), w["out_proj.weight"], w.get("out_proj.bias"))
