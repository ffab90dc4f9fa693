"""ggml block formats -> float32, in PyTorch: ports of `gguf.quants` (numpy) dequantisation with the
same float32 operations in the same order, so results are bit-identical (tested). Works on any
torch device; the input is the raw bytes of whole blocks (uint8), the output one float32 value
per element.

Supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, MXFP4, IQ4_NL, IQ4_XS.

Example:
    >>> w = dequantize(raw_bytes, "Q4_K", (4096, 14336))   # doctest: +SKIP
"""

from __future__ import annotations

import torch

from ..errors import BadCheckpoint
from .reader import GGML_TYPES, TYPE_IDS

QK_K = 256


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32 (little-endian fp16)."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """[n, groups*width] uint8 -> [n, groups, 2, width]: low nibbles, then high nibbles."""
    q = qs.reshape(qs.shape[0], groups, 1, width)
    return torch.cat((q & 0x0F, q >> 4), dim=2)


def _q4_0(b):
    n = b.shape[0]
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 1, 16).reshape(n, 32).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _q4_1(b):
    n = b.shape[0]
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], 1, 16).reshape(n, 32).to(torch.float32)
    return d * q + m


def _qh_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] uint8 (a little-endian u32 of high bits) -> [n, 32] of 0/1 (bit i for element i)."""
    bits = qh.to(torch.int32)
    word = bits[:, 0] | (bits[:, 1] << 8) | (bits[:, 2] << 16) | (bits[:, 3] << 24)
    shifts = torch.arange(32, dtype=torch.int32, device=qh.device)
    return (word.unsqueeze(1) >> shifts) & 1


def _q5_0(b):
    n = b.shape[0]
    d = _f16(b[:, :2])
    qh = _qh_bits(b[:, 2:6]).to(torch.uint8)
    ql = _nibbles(b[:, 6:], 1, 16).reshape(n, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 16
    return d * q.to(torch.float32)


def _q5_1(b):
    n = b.shape[0]
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    qh = _qh_bits(b[:, 4:8]).to(torch.uint8)
    ql = _nibbles(b[:, 8:], 1, 16).reshape(n, 32)
    q = (ql | (qh << 4)).to(torch.float32)
    return d * q + m


def _q8_0(b):
    d = _f16(b[:, :2])
    x = b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return x * d


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _scale_min_k4(b[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (dmin * m.to(torch.float32)).reshape(n, -1, 1)
    q = _nibbles(b[:, 16:], 4, 32).reshape(n, -1, 32).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _scale_min_k4(b[:, 4:16])
    qh, qs = b[:, 16:16 + QK_K // 8], b[:, 16 + QK_K // 8:]
    d = (d * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (dmin * m.to(torch.float32)).reshape(n, -1, 1)
    ql = _nibbles(qs, 4, 32).reshape(n, -1, 32)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 1, 8, 1)
    h = ((qh.reshape(n, 1, 1, 32) >> shifts) & 1).reshape(n, -1, 32)
    q = (ql | (h << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, :QK_K // 2], b[:, QK_K // 2:QK_K // 2 + QK_K // 4]
    scales = b[:, QK_K // 2 + QK_K // 4:QK_K // 2 + QK_K // 4 + QK_K // 16]
    d = _f16(b[:, -2:])
    d = (d * scales.contiguous().view(torch.int8).to(torch.float32)).reshape(n, QK_K // 16, 1)
    low = _nibbles(ql, 2, 64).reshape(n, -1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    high = ((qh.reshape(n, -1, 1, 32) >> shifts) & 3).reshape(n, -1, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    q = q.reshape(n, QK_K // 16, -1).to(torch.float32)
    return (d * q).reshape(n, QK_K)


_MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # e2m1, doubled
_IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """ggml_e8m0_to_fp32_half: 2^(e - 128) as float32 bits (subnormal for e < 2)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32, device=e.device) << e, (e - 1) << 23)
    return bits.view(torch.float32)


def _mxfp4(b):
    n = b.shape[0]
    d = _e8m0_half(b[:, :1])
    lut = torch.tensor(_MXFP4_VALUES, dtype=torch.float32, device=b.device)
    q = lut[_nibbles(b[:, 1:], 1, 16).reshape(n, 32).long()]
    return d * q


def _iq4_nl(b):
    n = b.shape[0]
    d = _f16(b[:, :2])
    lut = torch.tensor(_IQ4_VALUES, dtype=torch.float32, device=b.device)
    return d * lut[_nibbles(b[:, 2:], 1, 16).reshape(n, 32).long()]


def _iq4_xs(b):
    n = b.shape[0]
    d = _f16(b[:, :2])
    sh = b[:, 2:4].to(torch.int32)
    scales_h = sh[:, 0] | (sh[:, 1] << 8)  # u16
    scales_l = b[:, 4:4 + QK_K // 64]
    qs = b[:, 4 + QK_K // 64:]
    lo = torch.stack((scales_l & 0x0F, scales_l >> 4), dim=-1).reshape(n, -1).to(torch.int32)  # [n, 8]
    shifts = 2 * torch.arange(QK_K // 32, dtype=torch.int32, device=b.device)
    hi = (scales_h.unsqueeze(1) >> shifts) & 3
    scales = (lo | (hi << 4)).to(torch.int8) - 32
    dl = (d * scales.to(torch.float32)).reshape(n, -1, 1)
    lut = torch.tensor(_IQ4_VALUES, dtype=torch.float32, device=b.device)
    q = lut[_nibbles(qs, 8, 16).reshape(n, -1, 32).long()]
    return (dl * q).reshape(n, -1)


_KERNELS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "Q4_K": _q4_k,
            "Q5_K": _q5_k, "Q6_K": _q6_k, "MXFP4": _mxfp4, "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}
SUPPORTED = frozenset(_KERNELS) | frozenset(_PLAIN)


def dequantize(raw: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw bytes (uint8, whole blocks) of a tensor of `type_name` -> float32 tensor of `shape`
    (F32/F16/BF16 keep their dtype: the caller converts)."""
    if type_name in _PLAIN:
        return raw.view(_PLAIN[type_name]).reshape(shape)
    kernel = _KERNELS.get(type_name)
    if kernel is None:
        raise BadCheckpoint(f"GGUF type {type_name} cannot be dequantised by moetool yet "
                            f"(supported: {', '.join(sorted(SUPPORTED))})")
    _, block, size = GGML_TYPES[TYPE_IDS[type_name]]
    blocks = raw.reshape(-1, size)
    return kernel(blocks).reshape(shape)
