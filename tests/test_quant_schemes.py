"""Each quantization scheme against an independent reference on random tensors: bitsandbytes for
NF4, torchao for MXFP4 and NVFP4, torch's quantized tensors for int8, a literal port of GPTQ's
quantizer for int4, torch.float8_e4m3fn casts (in another order of operations) for FP8."""

from __future__ import annotations

import math

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


def test_mxfp4_matches_torchao_when_a_block_max_is_just_below_a_power_of_two():
    """The E8M0 scale comes from the exponent bits of the block's max |W| (torchao's FLOOR mode); a float32
    log2 rounds 2^k (1 - 2^-24) up to k and picked a scale twice too large for such blocks."""
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g) * 0.1
    k = torch.arange(-8, 8, dtype=torch.float32)
    w[:, 5] = torch.exp2(k) * (1 - 2.0 ** -24)  # the max of each row's first block
    w[::2, 40] = -torch.exp2(k[::2]) * (1 - 2.0 ** -23)  # and of the second block of every other row
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


# --- the kernels before issue 16, verbatim (one [out, in] matrix per call, float64-free but scalar
# FP4 search by bucketize): the "before" of the equality tests below and of benchmarks/quant_bench.py

OLD_E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def old_pad_cols(w: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    pad = (-w.shape[1]) % block
    return (torch.nn.functional.pad(w, (0, pad)) if pad else w), pad


def old_int8(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(dim=1, keepdim=True) / 127.0
    s = torch.where(s == 0, torch.ones_like(s), s)
    return torch.clamp(torch.round(w / s), -127, 127) * s


def old_int4_g128(w: torch.Tensor, group: int = 128) -> torch.Tensor:
    out, inp = w.shape
    x, pad = old_pad_cols(w, group)
    x = x.reshape(out, -1, group)
    xmin = torch.minimum(x.amin(dim=-1, keepdim=True), torch.zeros(()))
    xmax = torch.maximum(x.amax(dim=-1, keepdim=True), torch.zeros(()))
    both0 = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(both0, -1.0, xmin), torch.where(both0, 1.0, xmax)
    scale = (xmax - xmin) / 15
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, 15)
    return (scale * (q - zero)).reshape(out, -1)[:, :inp]


def old_nf4(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    flat = w.reshape(-1)
    n = flat.numel()
    pad = (-n) % block
    x = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)
    absmax = x.abs().amax(dim=1, keepdim=True)
    normed = x / torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    mids = (schemes.NF4_CODE[1:] + schemes.NF4_CODE[:-1]) / 2  # decision thresholds between code points
    idx = torch.bucketize(normed, mids)
    return (schemes.NF4_CODE[idx] * absmax).reshape(-1)[:n].reshape(w.shape)


def old_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float32)


def old_fp8_channel(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(dim=1, keepdim=True) / 448.0
    s = torch.where(s == 0, torch.ones_like(s), s)
    return old_fp8(w / s) * s


def old_fp8_block(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    out, inp = w.shape
    po, pi = (-out) % block, (-inp) % block
    x = torch.nn.functional.pad(w, (0, pi, 0, po)).reshape((out + po) // block, block, (inp + pi) // block, block)
    s = x.abs().amax(dim=(1, 3), keepdim=True) / 448.0
    s = torch.where(s == 0, torch.ones_like(s), s)
    return (old_fp8(x / s) * s).reshape(out + po, inp + pi)[:out, :inp]


def old_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP4 E2M1 value (ties to the even code), saturating at +-6."""
    a = x.abs().clamp(max=6.0)
    grid = OLD_E2M1_GRID.to(x.device)
    lo = torch.bucketize(a, grid, right=True).clamp(1, len(grid) - 1) - 1  # grid[lo] <= a
    hi = (lo + 1).clamp(max=len(grid) - 1)
    dlo, dhi = a - grid[lo], grid[hi] - a
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    return torch.copysign(torch.where(pick_hi, grid[hi], grid[lo]), x)


def old_mxfp4(w: torch.Tensor, block: int = 32) -> torch.Tensor:
    out, inp = w.shape
    x, _ = old_pad_cols(w, block)
    x = x.reshape(out, -1, block)
    amax = x.abs().amax(dim=-1, keepdim=True)
    exp = torch.floor(torch.log2(amax.clamp(min=torch.finfo(torch.float32).tiny)))
    exp = torch.where(amax == 0, torch.full_like(exp, -127.0), exp)
    scale = torch.exp2((exp - 2).clamp(-127, 128)).clamp(min=torch.finfo(torch.float32).tiny)  # E8M0, emax(E2M1) = 2
    return (old_e2m1(x / scale) * scale).reshape(out, -1)[:, :inp]


def old_nvfp4(w: torch.Tensor, block: int = 16) -> torch.Tensor:
    out, inp = w.shape
    x, _ = old_pad_cols(w, block)
    x = x.reshape(out, -1, block)
    amax_t = w.abs().max()
    tensor_scale = amax_t / (448.0 * 6.0) if amax_t > 0 else torch.tensor(1.0)
    block_scale = x.abs().amax(dim=-1, keepdim=True) / 6.0
    tiny = torch.finfo(torch.float8_e4m3fn).tiny
    s8 = (block_scale / tensor_scale).clamp(min=tiny, max=448.0).to(torch.float8_e4m3fn).to(torch.float32)
    q = old_e2m1((x * ((1.0 / tensor_scale) / s8)).clamp(-6.0, 6.0))
    return (q * s8 * tensor_scale).reshape(out, -1)[:, :inp]


OLD = {"int8": old_int8, "int4_g128": old_int4_g128, "nf4": old_nf4, "fp8_channel": old_fp8_channel,
       "fp8_block": old_fp8_block, "mxfp4": old_mxfp4, "nvfp4": old_nvfp4}


def old_fake_quantize(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """The kernels before, on the CPU whatever w's device (their CPU constants; the CPU's true division)."""
    return OLD[scheme](w.to(torch.float32).cpu()).to(w.device)


# --- the batched kernels against the kernels before (bit for bit, the sign of zero included) ---

def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _ties(scheme: str) -> torch.Tensor:
    """Values that land exactly on the scheme's rounding boundaries (and 1 ulp either side), in
    rows/blocks whose scale makes them land there: a row/block's absmax is planted so that the
    scale is 1 (int8: 127, fp8: 448, int4: group range [0, 15], mxfp4: 6 -> 2^0, nf4: 1)."""
    if scheme == "int8":
        amax, mids = 127.0, torch.arange(-126.5, 127, 1.0)
    elif scheme == "int4_g128":
        amax, mids = 15.0, torch.arange(0.5, 15, 1.0)
    elif scheme in ("fp8_channel", "fp8_block"):
        grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # all finite codes >= 0
        amax, mids = 448.0, (grid[1:] + grid[:-1]) / 2
    elif scheme == "nf4":
        amax, mids = 1.0, (schemes.NF4_CODE[1:] + schemes.NF4_CODE[:-1]) / 2
    else:  # mxfp4 / nvfp4: the E2M1 grid's midpoints
        amax, mids = 6.0, (OLD_E2M1_GRID[1:] + OLD_E2M1_GRID[:-1]) / 2
    mids = mids if scheme == "int4_g128" else torch.cat([mids, -mids])  # int4: the group's range stays [0, 15]
    vals = torch.cat([mids, torch.nextafter(mids, torch.full_like(mids, math.inf)),
                      torch.nextafter(mids, torch.full_like(mids, -math.inf)), torch.tensor([0.0, -0.0])])
    blk = 16 if scheme == "nvfp4" else 32 if scheme == "mxfp4" else 64
    vals = torch.nn.functional.pad(vals, (0, (-len(vals)) % (blk - 1))).reshape(-1, blk - 1)
    vals = torch.cat([torch.full((len(vals), 1), amax), vals], dim=1).reshape(-1)  # each block starts at amax
    return torch.nn.functional.pad(vals, (0, (-len(vals)) % 128)).reshape(-1, 128)


def adversarial() -> list[torch.Tensor]:
    """[B, out, in] batches: typical and odd shapes (padding in every scheme), zero rows and
    blocks, subnormals, extremes, outliers, constants, exact ties at every rounding boundary."""
    g = torch.Generator().manual_seed(1)
    mats = [torch.randn(3, 64, 256, generator=g) * 0.02, torch.randn(2, 33, 200, generator=g),
            torch.randn(2, 130, 72, generator=g) * 3, torch.zeros(2, 16, 128), torch.full((2, 8, 64), -0.5),
            torch.randn(2, 16, 96, generator=g) * 1e-40, torch.randn(2, 8, 64, generator=g) * 1e30,
            torch.randn(2, 8, 64, generator=g) * 1e-30]
    t = torch.randn(3, 48, 512, generator=g) * 0.05
    t[0, 3, 7], t[1, 11, 100], t[2, :, :64] = 4.0, -3.0, 0.0  # outliers, a zero band
    t[2, 5, 300:340] = torch.tensor(1e-42)  # subnormals next to normals
    mats.append(t)
    few_ulps = torch.randint(-160, 161, (2, 16, 128), generator=g).float()  # subnormals a few ulps wide:
    mats.append(torch.ldexp(few_ulps, torch.tensor(-149)))  # the scales round coarsely (int8 needs its clamp)
    u = torch.randint(0, 2**31 - 1, (2, 32, 128), generator=g, dtype=torch.int64).to(torch.int32)
    u = (u & 0x807FFFFF) | (torch.randint(0, 120, u.shape, generator=g, dtype=torch.int32) << 23)  # any bits, |x| < 2^-7
    mats.append(u.view(torch.float32))
    return mats


@pytest.mark.parametrize("scheme", schemes.SCHEMES)
def test_batched_kernels_are_bit_identical_to_the_old_ones(scheme):
    for w in adversarial() + [_ties(scheme).unsqueeze(0)]:
        new = schemes.fake_quantize(w, scheme)
        old = torch.stack([old_fake_quantize(m, scheme) for m in w])
        if scheme == "nvfp4" and w.abs().max() < 2688 * 2.0**-149:
            # nvfp4's tensor scale underflows to 0: the old kernel computed 0 * inf = NaN for exact
            # zeros (and NaN for all-zero blocks), the new one keeps every output +-0: equal values
            assert not new.isnan().any() and torch.equal(new[~old.isnan()], old[~old.isnan()]) and not new.any()
            continue
        assert torch.equal(_bits(new), _bits(old)), (scheme, tuple(w.shape))


@pytest.mark.parametrize("scheme", schemes.SCHEMES)
def test_bands_give_the_whole_matrix_result(scheme):
    """The band driver (rows aligned to the scheme's blocks, nvfp4's tensor scale from the whole
    matrix) reproduces the whole-matrix kernel whatever the band size."""
    g = torch.Generator().manual_seed(2)
    for w in (torch.randn(2, 300, 200, generator=g), torch.randn(2, 256, 136, generator=g) * 0.01):
        whole = torch.stack([schemes.FUNCTIONS[scheme](m.unsqueeze(0))[0] for m in w])
        for chunk in (1000, 40000, 10**9):
            out = torch.full_like(w, math.nan)
            for mats, rows, x, q in schemes.chunks(w, scheme, chunk):
                assert torch.equal(x, w[mats, rows])
                out[mats, rows] = q
            assert torch.equal(_bits(out), _bits(whole)), (scheme, tuple(w.shape), chunk)


def test_minifloat_rounding_on_random_bit_patterns():
    """e4m3 by exponent arithmetic = torch's float8_e4m3fn cast; e2m1 = the old grid search;
    on 4M random finite float32 bit patterns (every exponent, both signs, subnormals)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2**31, 2**31 - 1, (1 << 22,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = x[torch.isfinite(x)]
    assert torch.equal(_bits(schemes.e4m3(x)), _bits(x.clamp(-448, 448).to(torch.float8_e4m3fn).float()))
    assert torch.equal(_bits(schemes.e2m1(x)), _bits(old_e2m1(x)))
    y = torch.randn(1 << 20, generator=g) * 4  # the E2M1 range densely
    assert torch.equal(_bits(schemes.e2m1(y)), _bits(old_e2m1(y)))


@pytest.mark.parametrize("scheme", ["nf4", "mxfp4", "nvfp4"])
def test_batched_against_the_independent_references(scheme):
    """A batch of matrices in one call, each against bitsandbytes / torchao."""
    w = torch.stack(list(tensors())[0:1] * 2) * torch.tensor([1.0, 0.01]).view(2, 1, 1)
    q = schemes.fake_quantize(w, scheme)
    for m, qm in zip(w, q):
        if scheme == "nf4":
            bnb = pytest.importorskip("bitsandbytes.functional")
            code, state = bnb.quantize_4bit(m, blocksize=64, quant_type="nf4")
            assert torch.allclose(qm, bnb.dequantize_4bit(code, state).float(), atol=1e-6 * m.abs().max(), rtol=0)
        elif scheme == "mxfp4":
            mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
            scale, data = mx.to_mx(m.contiguous(), torch.float4_e2m1fn_x2, 32)
            assert torch.equal(qm, mx.to_dtype(data, scale, torch.float4_e2m1fn_x2, 32, torch.float32).float())
        else:
            nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
            t = nv.NVFP4Tensor.to_nvfp4(m.contiguous(), per_tensor_scale=nv.per_tensor_amax_to_scale(m.abs().max()))
            assert torch.allclose(qm, t.dequantize(torch.float32).float(), rtol=1e-6, atol=1e-9 * m.abs().max())


@pytest.mark.parametrize("scheme", schemes.SCHEMES)
def test_kernels_stay_on_the_input_device(scheme):
    """Kernels, band driver and the report's batched statistics / errors on the meta device: any
    tensor made on a fixed device (a CPU constant, a host round trip) would fail here, which is
    what lets them run unchanged on a GPU."""
    from moetool.quant.report import _errors, _stats

    w = torch.empty(3, 130, 200, device="meta")
    assert schemes.fake_quantize(w, scheme).device.type == "meta"
    assert all(t.device.type == "meta" for t in _stats(w))
    assert _errors(w, scheme, torch.empty_like(w), torch.ones(3, device="meta")).device.type == "meta"
