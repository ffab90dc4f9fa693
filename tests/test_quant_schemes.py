"""Each quantization scheme against an independent reference on random tensors: bitsandbytes for
NF4, torchao for MXFP4 and NVFP4, torch's quantized tensors for int8, a literal port of GPTQ's
quantizer for int4, torch.float8_e4m3fn casts (in another order of operations) for FP8."""

from __future__ import annotations

import pytest
import torch

from moetool.quant import schemes


def tensors():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(64, 256, generator=g)
    yield torch.randn(32, 384, generator=g) * 0.02  # typical weight scale
    t = torch.randn(48, 512, generator=g) * 0.05
    t[3, 7], t[11, 100] = 4.0, -3.0  # outliers
    yield t


@pytest.mark.parametrize("i", range(3))
def test_nf4_matches_bitsandbytes(i):
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = list(tensors())[i]
    q, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ref = bnb.dequantize_4bit(q, state).float()
    assert torch.allclose(schemes.nf4(w), ref, atol=1e-6, rtol=0)
    assert torch.allclose(schemes.NF4_CODE, state.code.float()[:16].sort().values, atol=1e-7)


@pytest.mark.parametrize("i", range(3))
def test_mxfp4_matches_torchao(i):
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    w = list(tensors())[i]
    scale, data = mx.to_mx(w.contiguous(), torch.float4_e2m1fn_x2, 32)
    ref = mx.to_dtype(data, scale, torch.float4_e2m1fn_x2, 32, torch.float32)
    assert torch.equal(schemes.mxfp4(w), ref.float())


@pytest.mark.parametrize("i", range(3))
def test_nvfp4_matches_torchao(i):
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    w = list(tensors())[i]
    pts = nv.per_tensor_amax_to_scale(w.abs().max())
    t = nv.NVFP4Tensor.to_nvfp4(w.contiguous(), per_tensor_scale=pts)
    ref = t.dequantize(torch.float32)
    assert torch.allclose(schemes.nvfp4(w), ref.float(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("i", range(3))
def test_int8_matches_torch_quantize_per_channel(i):
    w = list(tensors())[i]
    s = (w.abs().amax(dim=1) / 127).double()
    q = torch.quantize_per_channel(w, s, torch.zeros(len(s), dtype=torch.long), 0, torch.qint8)
    assert torch.allclose(schemes.int8(w), q.dequantize(), atol=1e-6, rtol=1e-6)


def _gptq_quantize(x, scale, zero, maxq):  # from GPTQ's quant.py
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


@pytest.mark.parametrize("i", range(3))
def test_int4_g128_matches_gptq_rtn(i):
    w = list(tensors())[i]
    cols = []
    for g in range(0, w.shape[1], 128):  # GPTQ's Quantizer.find_params(perchannel=True, sym=False) per group
        x = w[:, g:g + 128]
        tmp = torch.zeros(x.shape[0])
        xmin, xmax = torch.minimum(x.min(1)[0], tmp), torch.maximum(x.max(1)[0], tmp)
        scale = (xmax - xmin) / 15
        zero = torch.round(-xmin / scale)
        cols.append(_gptq_quantize(x, scale.unsqueeze(1), zero.unsqueeze(1), 15))
    assert torch.allclose(schemes.int4_g128(w), torch.cat(cols, 1), atol=1e-7)


@pytest.mark.parametrize("i", range(3))
def test_fp8_against_plain_casts(i):
    w = list(tensors())[i]
    amax = w.abs().max(dim=1, keepdim=True).values
    ref = (w * (448.0 / amax)).to(torch.float8_e4m3fn).float() * (amax / 448.0)
    assert torch.allclose(schemes.fp8_channel(w), ref, rtol=1e-6, atol=0)
    blocks = torch.zeros_like(w)
    for r in range(0, w.shape[0], 128):
        for c in range(0, w.shape[1], 128):
            b = w[r:r + 128, c:c + 128]
            s = b.abs().max() / 448.0
            blocks[r:r + 128, c:c + 128] = (b / s).to(torch.float8_e4m3fn).float() * s
    assert torch.allclose(schemes.fp8_block(w), blocks, rtol=1e-6, atol=0)


def test_bits_per_weight():
    assert schemes.bits("int4_g128", 4096, 4096) == pytest.approx(4 + 20 / 128)
    assert schemes.bits("nf4", 4096, 4096) == pytest.approx(4.5)
    assert schemes.bits("mxfp4", 4096, 4096) == pytest.approx(4.25)
    assert schemes.bits("nvfp4", 4096, 4096) == pytest.approx(4.5, abs=1e-5)
    assert schemes.bits("fp8_block", 4096, 4096) == pytest.approx(8 + 32 / 16384)
    assert schemes.bits("int8", 4096, 4096) == pytest.approx(8 + 16 / 4096)


def test_error_ordering_is_sane():
    w = list(tensors())[0]
    err = {s: ((schemes.fake_quantize(w, s) - w).norm() / w.norm()).item() for s in schemes.SCHEMES}
    assert err["int8"] < err["int4_g128"] and err["fp8_channel"] < err["mxfp4"] and err["nvfp4"] < err["mxfp4"]
