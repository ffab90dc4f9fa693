"""LFM2's gated short convolution: one sequence x [T, D] -> [T, D].

    B, C, u = in_proj(h)                  [T, D] each
    y       = C * causal_conv(B * u)      depthwise, kernel L (conv_L_cache), no activation
    out     = out_proj(y)

State per sequence: the last L - 1 values of B * u, (L - 1) x D.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F_

from .common import causal_conv


@dataclass(frozen=True)
class ShortConvConfig:
    kernel: int  # L
    prefix: str = "conv."


def state_elems(c: ShortConvConfig, hidden: int) -> int:
    return (c.kernel - 1) * hidden


def forward(w: dict, x: torch.Tensor, c: ShortConvConfig, state: Optional[dict] = None) -> torch.Tensor:
    B, C, u = F_.linear(x, w["in_proj.weight"], w.get("in_proj.bias")).chunk(3, dim=-1)
    y = C * causal_conv(B * u, w["conv.weight"], w.get("conv.bias"), state)
    return F_.linear(y, w["out_proj.weight"], w.get("out_proj.bias"))
