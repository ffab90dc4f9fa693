"""Storage formats: the exact bytes a weight matrix takes in each format, scales included.

Conventions (see docs/count.md): formats apply to linear-layer weights (attention, experts,
dense and shared MLPs, SSM projections, vision linears). Embeddings, the LM head, routers, norms,
biases and other 1-D / conv parameters stay in bf16, as GPTQ, AWQ, bitsandbytes and gpt-oss's
MXFP4 checkpoints keep them. A weight is [out, in]; blocks and groups run along `in`.

| name      | data            | scales                                                        |
|-----------|-----------------|---------------------------------------------------------------|
| bf16      | 2 bytes         | none                                                          |
| fp8       | 1 byte (E4M3)   | fp32 per 128x128 block (DeepSeek-V3's `weight_scale_inv`)      |
| fp8_channel | 1 byte (E4M3) | fp32 per output channel                                       |
| int8      | 1 byte          | fp16 per output channel                                       |
| int4_g128 | 4 bits          | fp16 scale + 4-bit zero point per 128 inputs (GPTQ layout)    |
| nf4       | 4 bits          | fp32 absmax per 64 elements (bitsandbytes, no double quant)   |
| mxfp4     | 4 bits (E2M1)   | one E8M0 byte per 32 inputs (OCP MX; gpt-oss experts)         |
| nvfp4     | 4 bits (E2M1)   | one E4M3 byte per 16 inputs + one fp32 per tensor             |
"""

from __future__ import annotations

import math
from typing import Callable

from .spec import Param

KEEP_BF16_GROUPS = {"embedding", "lm_head", "router", "norms"}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


# bytes of one [out, in] matrix
_MATRIX: dict[str, Callable[[int, int], int]] = {
    "bf16": lambda o, i: 2 * o * i,
    "fp8": lambda o, i: o * i + 4 * _ceil(o, 128) * _ceil(i, 128),
    "fp8_channel": lambda o, i: o * i + 4 * o,
    "int8": lambda o, i: o * i + 2 * o,
    "int4_g128": lambda o, i: _ceil(o * i, 2) + o * _ceil(i, 128) * 2 + _ceil(o * _ceil(i, 128), 2),
    "nf4": lambda o, i: _ceil(o * i, 2) + 4 * _ceil(o * i, 64),
    "mxfp4": lambda o, i: _ceil(o * i, 2) + o * _ceil(i, 32),
    "nvfp4": lambda o, i: _ceil(o * i, 2) + o * _ceil(i, 16) + 4,
}
FORMATS = tuple(_MATRIX)


def param_bytes(p: Param, fmt: str) -> int:
    """Bytes of a parameter (all its copies) stored in `fmt`."""
    if fmt not in _MATRIX:
        raise ValueError(f"unknown storage format {fmt!r}; known: {', '.join(FORMATS)}")
    if not p.matmul or p.group in KEEP_BF16_GROUPS or len(p.shape) != 2:
        return 2 * p.numel
    out, inp = p.shape
    return _MATRIX[fmt](out, inp) * p.copies


def matrix_bytes(fmt: str, out: int, inp: int) -> int:
    return _MATRIX[fmt](out, inp)


def bits_per_weight(fmt: str, out: int = 4096, inp: int = 4096) -> float:
    """Effective bits per weight of a matrix in `fmt`, scales included."""
    return 8 * _MATRIX[fmt](out, inp) / (out * inp)


DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "fp8": 1, "float8": 1,
               "int8": 1}


def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(sorted(DTYPE_BYTES))}") from None
