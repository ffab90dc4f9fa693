"""Quantization schemes as fake-quantize-and-dequantize functions on a weight W [out, in]
(float32 in, float32 out), and their exact storage cost in bits per weight, scales included.

| scheme      | definition                                                                                  |
|-------------|---------------------------------------------------------------------------------------------|
| int8        | per output channel, symmetric: s = absmax(row) / 127, q = clamp(round(W / s), -127, 127)    |
| int4_g128   | groups of 128 along the input, asymmetric, GPTQ's RTN quantizer: the range always includes 0, s = (max - min) / 15, integer zero point z = round(-min / s), q = clamp(round(W / s) + z, 0, 15), W' = s (q - z) |
| nf4         | bitsandbytes NF4: the tensor flattened in blocks of 64, absmax per block, nearest of the 16 NormalFloat code points |
| fp8_channel | E4M3 per output channel: s = absmax(row) / 448, W' = fp8(W / s) * s                        |
| fp8_block   | E4M3 in 128 x 128 blocks, fp32 scale per block (DeepSeek-V3's `weight_scale_inv`)           |
| mxfp4       | OCP MX: blocks of 32 along the input, shared E8M0 scale 2^(floor(log2 absmax) - 2), E2M1 elements rounded to nearest even, saturating at +-6 (torchao's FLOOR mode; gpt-oss's experts) |
| nvfp4       | blocks of 16 along the input, E2M1 elements, E4M3 block scale relative to an fp32 tensor scale amax / (448 x 6) |

Storage (bits per weight) comes from `moetool.formats`, the same accounting `moetool count` uses.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .. import formats

SCHEMES = ("int8", "int4_g128", "nf4", "fp8_channel", "fp8_block", "mxfp4", "nvfp4")
_FORMAT = {"int8": "int8", "int4_g128": "int4_g128", "nf4": "nf4", "fp8_channel": "fp8_channel",
           "fp8_block": "fp8", "mxfp4": "mxfp4", "nvfp4": "nvfp4", "bf16": "bf16"}
E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# bitsandbytes' NF4 code book (NormalFloat, Dettmers et al. 2023), ascending.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


def bits(scheme: str, out: int, inp: int) -> float:
    """Exact storage of an [out, in] matrix in `scheme`, in bits per weight (scales included)."""
    return 8 * formats.matrix_bytes(_FORMAT[scheme], out, inp) / (out * inp)


def _pad_cols(w: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    pad = (-w.shape[1]) % block
    return (torch.nn.functional.pad(w, (0, pad)) if pad else w), pad


def int8(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(dim=1, keepdim=True) / 127.0
    s = torch.where(s == 0, torch.ones_like(s), s)
    return torch.clamp(torch.round(w / s), -127, 127) * s


def int4_g128(w: torch.Tensor, group: int = 128) -> torch.Tensor:
    out, inp = w.shape
    x, pad = _pad_cols(w, group)
    x = x.reshape(out, -1, group)
    xmin = torch.minimum(x.amin(dim=-1, keepdim=True), torch.zeros(()))
    xmax = torch.maximum(x.amax(dim=-1, keepdim=True), torch.zeros(()))
    both0 = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(both0, -1.0, xmin), torch.where(both0, 1.0, xmax)
    scale = (xmax - xmin) / 15
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, 15)
    return (scale * (q - zero)).reshape(out, -1)[:, :inp]


def nf4(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    flat = w.reshape(-1)
    n = flat.numel()
    pad = (-n) % block
    x = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)
    absmax = x.abs().amax(dim=1, keepdim=True)
    normed = x / torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    mids = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2  # decision thresholds between code points
    idx = torch.bucketize(normed, mids)
    return (NF4_CODE[idx] * absmax).reshape(-1)[:n].reshape(w.shape)


def _fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def fp8_channel(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX
    s = torch.where(s == 0, torch.ones_like(s), s)
    return _fp8(w / s) * s


def fp8_block(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    out, inp = w.shape
    po, pi = (-out) % block, (-inp) % block
    x = torch.nn.functional.pad(w, (0, pi, 0, po)).reshape((out + po) // block, block, (inp + pi) // block, block)
    s = x.abs().amax(dim=(1, 3), keepdim=True) / E4M3_MAX
    s = torch.where(s == 0, torch.ones_like(s), s)
    return (_fp8(x / s) * s).reshape(out + po, inp + pi)[:out, :inp]


def e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP4 E2M1 value (ties to the even code), saturating at +-6."""
    a = x.abs().clamp(max=E2M1_MAX)
    grid = E2M1_GRID.to(x.device)
    lo = torch.bucketize(a, grid, right=True).clamp(1, len(grid) - 1) - 1  # grid[lo] <= a
    hi = (lo + 1).clamp(max=len(grid) - 1)
    dlo, dhi = a - grid[lo], grid[hi] - a
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    return torch.copysign(torch.where(pick_hi, grid[hi], grid[lo]), x)


def mxfp4(w: torch.Tensor, block: int = 32) -> torch.Tensor:
    out, inp = w.shape
    x, _ = _pad_cols(w, block)
    x = x.reshape(out, -1, block)
    amax = x.abs().amax(dim=-1, keepdim=True)
    exp = torch.floor(torch.log2(amax.clamp(min=torch.finfo(torch.float32).tiny)))
    exp = torch.where(amax == 0, torch.full_like(exp, -127.0), exp)
    scale = torch.exp2((exp - 2).clamp(-127, 128)).clamp(min=torch.finfo(torch.float32).tiny)  # E8M0, emax(E2M1) = 2
    return (e2m1(x / scale) * scale).reshape(out, -1)[:, :inp]


def nvfp4(w: torch.Tensor, block: int = 16) -> torch.Tensor:
    out, inp = w.shape
    x, _ = _pad_cols(w, block)
    x = x.reshape(out, -1, block)
    amax_t = w.abs().max()
    tensor_scale = amax_t / (E4M3_MAX * E2M1_MAX) if amax_t > 0 else torch.tensor(1.0)
    block_scale = x.abs().amax(dim=-1, keepdim=True) / E2M1_MAX
    tiny = torch.finfo(torch.float8_e4m3fn).tiny
    s8 = (block_scale / tensor_scale).clamp(min=tiny, max=E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    q = e2m1((x * ((1.0 / tensor_scale) / s8)).clamp(-E2M1_MAX, E2M1_MAX))
    return (q * s8 * tensor_scale).reshape(out, -1)[:, :inp]


FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "int8": int8, "int4_g128": int4_g128, "nf4": nf4, "fp8_channel": fp8_channel, "fp8_block": fp8_block,
    "mxfp4": mxfp4, "nvfp4": nvfp4,
}


def fake_quantize(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """W [out, in] -> quantize with `scheme`, dequantize, float32."""
    return FUNCTIONS[scheme](w.to(torch.float32))


def parse_schemes(value: str | None) -> list[str]:
    from ..errors import MoetoolError

    if value is None:
        return list(SCHEMES)
    names = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in names if s not in SCHEMES]
    if bad or not names:
        raise MoetoolError(f"--schemes: unknown scheme {bad[0] if bad else '(none)'!r}; known: {', '.join(SCHEMES)}")
    return list(dict.fromkeys(names))
