"""Quantization schemes as fake-quantize-and-dequantize functions on a weight W [out, in]
(float32 in, float32 out), and their exact storage cost in bits per weight, scales included.

| scheme      | definition                                                                                  |
|-------------|---------------------------------------------------------------------------------------------|
| int8        | per output channel, symmetric: s = absmax(row) / 127, q = clamp(round(W / s), -127, 127)    |
| int4_g128   | groups of 128 along the input, asymmetric, GPTQ's RTN quantizer: the range always includes 0, s = (max - min) / 15, integer zero point z = round(-min / s), q = clamp(round(W / s) + z, 0, 15), W' = s (q - z) |
| nf4         | bitsandbytes NF4: the tensor flattened in blocks of 64, absmax per block, nearest of the 16 NormalFloat code points |
| fp8_channel | E4M3 per output channel: s = absmax(row) / 448, W' = fp8(W / s) * s                        |
| fp8_block   | E4M3 in 128 x 128 blocks, fp32 scale per block (DeepSeek-V3's `weight_scale_inv`)           |
| mxfp4       | OCP MX: blocks of 32 along the input, shared E8M0 scale 2^(floor(log2 absmax) - 2) (the exponent bits), E2M1 elements rounded to nearest even, saturating at +-6 (torchao's FLOOR mode; gpt-oss's experts) |
| nvfp4       | blocks of 16 along the input, E2M1 elements, E4M3 block scale relative to an fp32 tensor scale amax / (448 x 6) |

Storage (bits per weight) comes from `moetool.formats`, the same accounting `moetool count` uses.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

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
_NF4_BINS = 256  # lookup bins per unit of the normalised value (nf4)


def bits(scheme: str, out: int, inp: int) -> float:
    """Exact storage of an [out, in] matrix in `scheme`, in bits per weight (scales included)."""
    return 8 * formats.matrix_bytes(_FORMAT[scheme], out, inp) / (out * inp)


# --- shared pieces ----------------------------------------------------------------------------------

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """A constant lookup table on `device` (moved there once, then cached)."""
    key = (name, device)
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = _CPU_TABLES[name].to(device)
    return t


def _pad_last(w: torch.Tensor, block: int) -> torch.Tensor:
    pad = (-w.shape[-1]) % block
    return torch.nn.functional.pad(w, (0, pad)) if pad else w


def _absmax(x: torch.Tensor, dim) -> torch.Tensor:
    """max |x| over `dim` (kept) as max(max x, -min x): two reductions, no |x| temporary (abs_ makes
    an all-zero block's +0.0, as x.abs().amax() gives)."""
    return torch.maximum(x.amax(dim=dim, keepdim=True), x.amin(dim=dim, keepdim=True).neg_()).abs_()


def _div(x: torch.Tensor, c: float) -> torch.Tensor:
    """x / c correctly rounded on every device. CUDA divides by a Python scalar as x * (1 / c), which
    differs from a true division (the CPU's, and the references') in the last bit of a few percent of
    values; a 0-dim tensor on x's device keeps the true division there (tests/test_cuda.py)."""
    return x / torch.full((), c, dtype=x.dtype, device=x.device)


def _nonzero(s: torch.Tensor) -> torch.Tensor:
    return s.masked_fill(s == 0, 1.0)


def _round_minifloat(x: torch.Tensor, mbits: int, emin: int) -> torch.Tensor:
    """Round x (already within the format's range) to the nearest float with `mbits` mantissa bits
    and minimum normal exponent `emin` (subnormals below), ties to even, keeping the sign (-0.0 too).

    No search: with E = max(exponent(x), emin) the format's spacing there is 2^(E - mbits), and
    (x + M) - M with M = 1.5 * 2^(23 + E - mbits) rounds x to a multiple of that spacing in float32's
    own round-to-nearest-even (|x| < 2^(E+1) keeps x + M in M's binade). M is built from x's
    exponent bits with integer operations."""
    m = torch.bitwise_and(x.view(torch.int32), 0x7F800000)  # x's exponent field
    m.clamp_(min=(emin + 127) << 23).add_(((23 - mbits) << 23) | 0x400000)
    magic = m.view(torch.float32)
    r = torch.add(x, magic)
    return r.sub_(magic).copysign_(x)


def e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP4 E2M1 value (ties to the even code), saturating at +-6."""
    return _round_minifloat(x.clamp(-E2M1_MAX, E2M1_MAX), 1, 0)


# E2M1's three binades of |x| (after the clamp to +-6) and the magic number of each: 1.5 * 2^(22 + E) with
# E = max(exponent(x), 0), the M that _round_minifloat builds from x's exponent bits.
_E2M1_MAGIC = ((2.0, 1.5 * 2.0 ** 22), (4.0, 1.5 * 2.0 ** 23), (None, 1.5 * 2.0 ** 24))


def e2m1_select(x: torch.Tensor) -> torch.Tensor:
    """e2m1 by comparisons: the magic number chosen by |x| < 2 / < 4 instead of read from x's exponent
    bits. The same values bit for bit (tests/test_quant_kernels.py); for the compiled kernels, where a
    float <-> int32 bitcast goes through a stack buffer element by element and selects vectorise."""
    x = x.clamp(-E2M1_MAX, E2M1_MAX)
    a = x.abs()
    magic = torch.where(a < _E2M1_MAGIC[0][0], _E2M1_MAGIC[0][1],
                        torch.where(a < _E2M1_MAGIC[1][0], _E2M1_MAGIC[1][1], _E2M1_MAGIC[2][1]))
    return ((x + magic) - magic).copysign(x)


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """x.clamp(-448, 448) cast to float8_e4m3fn and back, by arithmetic (ties to even; torch's cast)."""
    return _round_minifloat(x.clamp(-E4M3_MAX, E4M3_MAX), 3, -6)


# --- the schemes: W [..., out, in] float32 -> Q(W), each matrix on its own ---------------------------

def int8(w: torch.Tensor) -> torch.Tensor:
    s = _nonzero(_div(_absmax(w, -1), 127.0))
    q = w / s
    return q.round_().clamp_(-127, 127).mul_(s)


def int4_g128(w: torch.Tensor, group: int = 128) -> torch.Tensor:
    *lead, out, inp = w.shape
    x = _pad_last(w, group).reshape(*lead, out, -1, group)
    zero0 = x.new_zeros(())
    xmin = torch.minimum(x.amin(dim=-1, keepdim=True), zero0)
    xmax = torch.maximum(x.amax(dim=-1, keepdim=True), zero0)
    both0 = (xmin == 0) & (xmax == 0)
    xmin, xmax = xmin.masked_fill(both0, -1.0), xmax.masked_fill(both0, 1.0)
    scale = _div(xmax - xmin, 15.0)
    zero = torch.round(-xmin / scale)
    q = x / scale
    q.round_().add_(zero).clamp_(0, 15).sub_(zero).mul_(scale)
    q = q.reshape(*lead, out, -1)
    return q if q.shape[-1] == inp else q[..., :inp]


def nf4(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Nearest NF4 code point by table lookup: the normalised value's bin of width 1/256 gives the
    number of decision thresholds below it, and the one threshold that can fall in the bin (the
    thresholds are 0.04 apart or more) is compared exactly: bucketize's result without a search."""
    *lead, out, inp = w.shape
    n = out * inp
    x = _pad_last(w.reshape(*lead, n), block).reshape(*lead, -1, block)
    absmax = _absmax(x, -1)
    normed = x / _nonzero(absmax)  # in [-1, 1]
    bins = (normed * _NF4_BINS).add_(_NF4_BINS).to(torch.int32).reshape(-1)
    thr = torch.index_select(_table("nf4_thr", x.device), 0, bins).view_as(normed)
    idx = torch.index_select(_table("nf4_base", x.device), 0, bins).view_as(normed)
    idx.add_(normed > thr)
    q = torch.index_select(_table("nf4_code", x.device), 0, idx.reshape(-1)).view_as(normed).mul_(absmax)
    q = q.reshape(*lead, -1)
    return (q if q.shape[-1] == n else q[..., :n]).reshape(*lead, out, inp)


def nf4_blocks(x: torch.Tensor) -> torch.Tensor:
    """nf4 of blocks x [..., 64] (each block quantized on its own): 15 comparisons against the
    decision thresholds (the float32 midpoints of neighbouring code points, as bucketize and `nf4`
    see them); the code point chosen by a chain of selects with constant operands."""
    absmax = _absmax(x, -1)
    normed = x / _nonzero(absmax)
    q = torch.full_like(normed, _NF4_POINTS[0])
    for thr, point in zip(_NF4_MIDS, _NF4_POINTS[1:]):
        q = torch.where(normed > thr, point, q)
    return q * absmax


def nf4_select(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """nf4 by comparisons (nf4_blocks): the same values as `nf4` bit for bit (tests/test_quant_kernels.py).
    For the compiled kernel, where a table lookup becomes a scalar gather loop (5x slower than the
    eager kernel) and the selects vectorise; eager, `nf4` is the faster."""
    *lead, out, inp = w.shape
    n = out * inp
    if inp % block == 0:  # the same blocks within rows: simple indexing for the compiled kernel
        return nf4_blocks(w.reshape(*lead, out, inp // block, block)).reshape(*lead, out, inp)
    q = nf4_blocks(_pad_last(w.reshape(*lead, n), block).reshape(*lead, -1, block)).reshape(*lead, -1)
    return (q if q.shape[-1] == n else q[..., :n]).reshape(*lead, out, inp)


def fp8_channel(w: torch.Tensor) -> torch.Tensor:
    s = _nonzero(_div(_absmax(w, -1), E4M3_MAX))
    return e4m3(w / s).mul_(s)


def fp8_block(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    *lead, out, inp = w.shape
    po, pi = (-out) % block, (-inp) % block
    x = torch.nn.functional.pad(w, (0, pi, 0, po)) if po or pi else w
    x = x.reshape(*lead, (out + po) // block, block, (inp + pi) // block, block)
    s = _nonzero(_div(_absmax(x, (-3, -1)), E4M3_MAX))
    q = e4m3(x / s).mul_(s).reshape(*lead, out + po, inp + pi)
    return q if not (po or pi) else q[..., :out, :inp]


def mxfp4(w: torch.Tensor, block: int = 32, fp4: Callable = e2m1) -> torch.Tensor:
    *lead, out, inp = w.shape
    x = _pad_last(w, block).reshape(*lead, out, -1, block)
    amax = _absmax(x, -1)
    tiny = torch.finfo(torch.float32).tiny
    # floor(log2(amax)) from the exponent bits, as torchao (FLOOR): a float32 log2 rounds 2^k (1 - 2^-24)
    # up to k. 0 and subnormals give -127, clamped below like the rest.
    exp = (torch.bitwise_right_shift(amax.view(torch.int32), 23) - 127).to(torch.float32)
    scale = torch.exp2((exp - 2).clamp(-127, 128)).clamp(min=tiny)  # E8M0, emax(E2M1) = 2
    q = fp4(x / scale).mul_(scale).reshape(*lead, out, -1)
    return q if q.shape[-1] == inp else q[..., :inp]


def nvfp4(w: torch.Tensor, block: int = 16, amax_t: Optional[torch.Tensor] = None, fp4: Callable = e2m1) -> torch.Tensor:
    """amax_t: the matrix's max |W| [..., 1, 1] when `w` is a band of its rows (else computed). `fp4`:
    the E2M1 rounding (e2m1_select in the compiled kernels), as for mxfp4."""
    *lead, out, inp = w.shape
    x = _pad_last(w, block).reshape(*lead, out, -1, block)
    amax_t = (_absmax(w, (-2, -1)) if amax_t is None else amax_t).unsqueeze(-1)  # per matrix, [..., 1, 1, 1]
    tensor_scale = torch.where(amax_t > 0, _div(amax_t, E4M3_MAX * E2M1_MAX), 1.0)
    block_scale = _div(_absmax(x, -1), E2M1_MAX)
    tiny = torch.finfo(torch.float8_e4m3fn).tiny
    s8 = (block_scale / tensor_scale).clamp(min=tiny, max=E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    factor = (1.0 / tensor_scale) / s8
    # A no-op unless max |W| < 2688 * 2^-149: then the tensor scale underflows to 0, every output is
    # +-0 (q * s8 * 0), and zero factors keep it so where 0 * inf would give NaN.
    underflow = tensor_scale == 0
    s8, factor = s8.masked_fill(underflow, 0.0), factor.masked_fill(underflow, 0.0)
    q = fp4(x * factor).mul_(s8).mul_(tensor_scale).reshape(*lead, out, -1)
    return q if q.shape[-1] == inp else q[..., :inp]


FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "int8": int8, "int4_g128": int4_g128, "nf4": nf4, "fp8_channel": fp8_channel, "fp8_block": fp8_block,
    "mxfp4": mxfp4, "nvfp4": nvfp4,
}


# Elements per kernel call: the kernels' temporaries (a few per call) then stay in the CPU's cache
# and the allocator recycles them; whole tensors' temporaries are fresh pages each time (page faults
# cost more than the arithmetic). On a GPU the bands are simply large launches.
CHUNK = 1 << 18
GPU_CHUNK = 1 << 26  # on a GPU a band is one large launch (256 MB per float32 temporary)


def band_elements(device: torch.device) -> int:
    """Elements per band on `device`: small on a CPU (cache), large on a GPU (launch overhead: with
    CPU-sized bands an H100 scored 0.6-0.8 GB/s, Python issuing kernels; benchmarks/quant_gpu_bench.py)."""
    return CHUNK if device.type in ("cpu", "meta") else GPU_CHUNK


def chunks(w: torch.Tensor, scheme: str, chunk: Optional[int] = None) -> Iterator[tuple[slice, slice, torch.Tensor, torch.Tensor]]:
    """Quantize W [B, out, in] (float32) band by band: yields (matrices, rows, W band, Q(W) band),
    W[matrices, rows] -> its fake-quantized values, each band's result exactly what the scheme gives
    on the whole matrix (bands of whole matrices when they are small, else of rows aligned to the
    scheme's blocks: 128 rows for fp8_block, whole NF4 blocks of 64 for nf4; nvfp4 gets the matrix's
    absmax for its tensor scale)."""
    fn = FUNCTIONS[scheme]
    B, out, inp = w.shape
    chunk = chunk or band_elements(w.device)
    if out * inp <= chunk:
        kb = max(1, chunk // (out * inp))
        for b in range(0, B, kb):
            x = w[b:b + kb]
            yield slice(b, b + kb), slice(0, out), x, fn(x)
        return
    align = 128 if scheme == "fp8_block" else 64 // math.gcd(inp, 64) if scheme == "nf4" else 1
    rows = max(align, chunk // inp // align * align)
    for b in range(B):
        amax = _absmax(w[b], (-2, -1)) if scheme == "nvfp4" else None
        for r in range(0, out, rows):
            x = w[b:b + 1, r:r + rows]
            yield slice(b, b + 1), slice(r, r + rows), x, (fn(x) if amax is None else nvfp4(x, amax_t=amax))


def fake_quantize(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """W [..., out, in] -> quantize each matrix with `scheme`, dequantize; float32, on W's device.
    A batch of matrices (all experts of a layer, or a block of them) is one call."""
    w = w.to(torch.float32)
    w3 = w.reshape(math.prod(w.shape[:-2]), *w.shape[-2:])
    out = torch.empty_like(w3)
    for mats, rows, _, q in chunks(w3, scheme):
        out[mats, rows] = q
    return out.reshape(w.shape)


def _nf4_tables(bins: int = _NF4_BINS, eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """Per bin b of [-1, 1] (normed in [b / bins - 1, (b + 1) / bins - 1], widened by eps for the
    rounding of normed * bins + bins): how many thresholds lie below it, and the threshold inside it
    (+inf when none). Checked: never two thresholds in one bin."""
    mids = ((NF4_CODE[1:] + NF4_CODE[:-1]) / 2).double()  # float32 thresholds, as bucketize sees them
    base, thr = [], []
    for b in range(2 * bins + 1):
        lo, hi = b / bins - 1 - eps, (b + 1) / bins - 1 + eps
        inside = [float(m) for m in mids if lo <= m <= hi]
        assert len(inside) <= 1, "NF4 thresholds closer than a lookup bin"
        base.append(int((mids < lo).sum()))
        thr.append(inside[0] if inside else math.inf)
    return {"nf4_base": torch.tensor(base, dtype=torch.int32), "nf4_thr": torch.tensor(thr, dtype=torch.float32),
            "nf4_code": NF4_CODE.clone()}


_CPU_TABLES = _nf4_tables()
_NF4_POINTS = [float(v) for v in NF4_CODE]  # python floats: float32 values, exactly
_NF4_MIDS = [float(v) for v in (NF4_CODE[1:] + NF4_CODE[:-1]) / 2]  # float32 midpoints


def parse_schemes(value: str | None) -> list[str]:
    from ..errors import MoetoolError

    if value is None:
        return list(SCHEMES)
    names = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in names if s not in SCHEMES]
    if bad or not names:
        raise MoetoolError(f"--schemes: unknown scheme {bad[0] if bad else '(none)'!r}; known: {', '.join(SCHEMES)}")
    return list(dict.fromkeys(names))
