"""Pieces every recurrent mixer shares: the causal depthwise convolution (with its rolling state),
RMS norms, activations. x is [T, C] throughout (one sequence, time first)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F_


def act(x: torch.Tensor, name: Optional[str]) -> torch.Tensor:
    if name is None or name == "identity":
        return x
    if name in ("silu", "swish"):
        return F_.silu(x)
    if name == "relu2":
        return torch.relu(x).square()
    if name == "relu":
        return torch.relu(x)
    if name in ("gelu", "gelu_pytorch_tanh"):
        return F_.gelu(x, approximate="tanh" if name == "gelu_pytorch_tanh" else "none")
    if name == "sigmoid":
        return torch.sigmoid(x)
    raise ValueError(f"activation {name!r} is not supported by the reference mixers")


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], state: Optional[dict],
                key: str = "conv") -> torch.Tensor:
    """Depthwise causal convolution over time: x [T, C], weight [C, 1, K] (or [C, K]) -> [T, C].
    y[t, c] = b[c] + sum_j w[c, j] x[t - K + 1 + j, c], with x before the sequence taken from
    `state[key]` ([K-1, C], the previous inputs; zeros for a fresh sequence). When `state` is a
    dict, the last K-1 inputs are written back to it."""
    w = weight.reshape(weight.shape[0], -1)  # [C, K]
    K = w.shape[1]
    prev = state.get(key) if state is not None else None
    if prev is None:
        prev = x.new_zeros(K - 1, x.shape[1])
    xx = torch.cat((prev.to(x.dtype), x), dim=0)  # [K-1+T, C]
    if state is not None:
        state[key] = xx[xx.shape[0] - (K - 1):].clone()
    out = F_.conv1d(xx.t()[None], w[:, None, :].to(x.dtype), bias, groups=w.shape[0])  # [1, C, T]
    return out[0].t()


def wide(x: torch.Tensor) -> torch.dtype:
    """The dtype recurrences run in: float32, or float64 for float64 inputs (exact-maths tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dimension in float32 (at least), times (offset + weight)."""
    dtype, ct = x.dtype, wide(x)
    y = x.to(ct) * torch.rsqrt(x.to(ct).pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return y.to(dtype)
    return ((offset + weight.to(ct)) * y).to(dtype) if offset else weight * y.to(dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)
