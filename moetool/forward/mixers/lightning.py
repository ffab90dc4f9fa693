"""MiniMax's lightning attention (linear attention with a fixed per-head exponential decay), as in
MiniMax-Text-01 (`minimax`): one sequence x [T, D] -> [T, D]. H heads of Dh.

    q, k, v = act(qkv_proj(x))                   per head [q, k, v] (Dh each)
    s_h     = base^(h+1) * (1 - l / (L - 1 + 1e-5) + 1e-5),   base = 2^(-8/H), layer l of L
    S_t     = exp(-s) S_{t-1} + k_t^T v_t        state S [H, Dh, Dh]
    o_t     = q_t S_t                            (no softmax, no 1/sqrt(Dh))
    out     = out_proj(sigmoid(output_gate(x)) * RMSNorm(o))     RMSNorm over H*Dh, eps 1e-6

transformers computes the same sum blockwise (`block_size`); the recurrence is the definition.
State per sequence: H x Dh x Dh values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F_

from .common import act, rms, wide


@dataclass(frozen=True)
class LightningConfig:
    heads: int
    head_dim: int
    num_layers: int
    layer: int = 0  # set per call by mixers.run: the decay rate depends on the layer index
    activation: str = "silu"
    eps: float = 1e-6
    prefix: str = "self_attn."


def state_elems(c: LightningConfig) -> int:
    return c.heads * c.head_dim * c.head_dim


def slopes(c: LightningConfig) -> torch.Tensor:
    """Per-head decay rates [H] of layer `c.layer` (MiniMax's ALiBi-like schedule)."""
    base = 1 / (2 ** (8 / c.heads))
    rate = base ** (torch.arange(c.heads) + 1)
    return rate * (1 - c.layer / (c.num_layers - 1 + 1e-5) + 1e-5)


def for_layer(c: LightningConfig, layer: int) -> LightningConfig:
    return dataclasses.replace(c, layer=layer)


def forward(w: dict, x: torch.Tensor, c: LightningConfig, state: Optional[dict] = None) -> torch.Tensor:
    T, dtype, ct = x.shape[0], x.dtype, wide(x)
    H, Dh = c.heads, c.head_dim
    qkv = act(F_.linear(x, w["qkv_proj.weight"]), c.activation).to(ct).view(T, H, 3 * Dh)
    q, k, v = qkv.split(Dh, dim=-1)  # [T, H, Dh]
    decay = torch.exp(-slopes(c).to(device=x.device, dtype=ct))[:, None, None]  # [H, 1, 1]
    S = state.get("kv") if state is not None else None
    S = torch.zeros(H, Dh, Dh, dtype=ct, device=x.device) if S is None else S.to(ct)
    out = []
    for t in range(T):
        S = decay * S + k[t][:, :, None] * v[t][:, None, :]
        out.append(torch.einsum("hd,hde->he", q[t], S))
    if state is not None:
        state["kv"] = S
    o = rms(torch.stack(out).reshape(T, H * Dh).to(dtype), w["norm.weight"], c.eps)
    o = torch.sigmoid(F_.linear(x, w["output_gate.weight"])) * o
    return F_.linear(o, w["out_proj.weight"])
