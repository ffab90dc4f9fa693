"""The torch ports of ggml's block formats are bit-identical to the `gguf` package's numpy
dequantisation (random blocks of every supported type, and real quantized data where gguf.quants
can quantize)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from moetool.gguf.dequant import _KERNELS, dequantize

# byte ranges of each type's fp16 fields (set to finite values: random bytes could be NaN)
F16_FIELDS = {"Q4_0": [(0, 2)], "Q4_1": [(0, 4)], "Q5_0": [(0, 2)], "Q5_1": [(0, 4)], "Q8_0": [(0, 2)],
              "Q4_K": [(0, 4)], "Q5_K": [(0, 4)], "Q6_K": [(-2, None)], "IQ4_NL": [(0, 2)], "IQ4_XS": [(0, 2)],
              "MXFP4": []}


def _random_blocks(name: str, n: int, seed: int) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[Q[name]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for a, b in F16_FIELDS[name]:
        width = (b if b is not None else size) - (a % size)
        raw[:, a:b] = rng.uniform(-2, 2, size=(n, width // 2)).astype(np.float16).view(np.uint8)
    return raw


def _bits(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("name", sorted(_KERNELS))
def test_random_blocks_bit_identical(name):
    assert set(F16_FIELDS) == set(_KERNELS)
    block, _ = gguf.GGML_QUANT_SIZES[Q[name]]
    rows, cols = 6, 2 * max(block, 256)
    raw = _random_blocks(name, rows * cols // block, seed=len(name)).reshape(rows, -1)
    ref = gguf.quants.dequantize(raw, Q[name])
    ours = dequantize(torch.from_numpy(raw.copy()).reshape(-1), name, (rows, cols))
    assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape
    assert np.array_equal(_bits(ours.numpy()), _bits(ref))


@pytest.mark.parametrize("q", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.MXFP4])
def test_quantized_data_bit_identical(q):
    x = np.random.default_rng(1).normal(size=(8, 256)).astype(np.float32)
    raw = gguf.quants.quantize(x, q)
    ref = gguf.quants.dequantize(raw, q)
    ours = dequantize(torch.from_numpy(raw.copy()).reshape(-1), q.name, x.shape)
    assert np.array_equal(_bits(ours.numpy()), _bits(ref))
    assert np.abs(ref - x).mean() < 0.2  # and it is a real quantization of x


def test_unsupported_type_is_one_line():
    from moetool.errors import BadCheckpoint

    with pytest.raises(BadCheckpoint, match="GGUF type IQ2_XXS cannot be dequantised"):
        dequantize(torch.zeros(66, dtype=torch.uint8), "IQ2_XXS", (256,))
