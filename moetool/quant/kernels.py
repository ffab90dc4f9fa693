"""The weight-space scoring kernels of quantize-report: per-row moments of a block of matrices and
per-row sums of a scheme's squared error, each one function of W [B, out, in] (any float dtype,
converted to float32 inside) written once and run two ways:

- compiled: `torch.compile` (inductor; on CPU a C++ kernel built with the system compiler) fuses
  the conversion from the stored dtype, the scheme and the error into one loop nest per row:
  no temporary tensors, the weights read from memory once per scheme. Used on CPU when the work
  is large enough to pay for the compile (`MOETOOL_QUANT_COMPILE=1` forces it, `=0` disables
  it) and falls back to eager, once, when compiling fails (no compiler, an unsupported op);
- eager: the same functions band by band (`schemes.chunks`: 2^18 elements, the temporaries stay
  in cache), on any device.

Both give the same fake-quantized values bit for bit (the schemes are the same Python code, and
inductor's CPU code keeps IEEE division, rounding and the order of operations: checked in
tests/test_quant_kernels.py); the sums differ only in the order of float32 additions.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from typing import Callable, Optional

import torch

from . import schemes as S


def row_scale_exp(hi: torch.Tensor, lo: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """k (int32, in [-126, 126]) with max |W - m| 2^k in [1/2, 1) for a row of max `hi`, min `lo`
    and mean `m`; 0 for a constant row. From the exponent bits of the spread (integer operations:
    the same k in the compiled kernel and in the eager combine, whatever their log2)."""
    spread = torch.maximum(hi - m, m - lo)
    e = torch.bitwise_right_shift(spread.view(torch.int32), 23) - 127  # floor(log2(spread)), spread normal
    return torch.where(spread > 0, -1 - e, 0).clamp(-126, 126)


def exp2_int(k: torch.Tensor) -> torch.Tensor:
    """2^k as float32 for int32 k in [-126, 127], exactly, from the exponent bits (no exp2 call: in
    the compiled kernel a libm call per vector of the inner loop, which the C++ compiler does not
    hoist)."""
    return torch.bitwise_left_shift(k + 127, 23).view(torch.float32)


def row_moments(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per row of W [..., n]: (s, hi, lo, s1, s2, s3, s4), float32 [...]: s the row's float32 sum
    (m = s / n its mean), hi / lo its max / min, and s_p = sum of z^p with z = W 2^k - m 2^k (both
    products exact; k = row_scale_exp(hi, lo, m), max |z| in [1/2, 1)): moments about m, free of
    overflow and underflow of z^4 for extreme weights. Neither m nor k is an output, so the
    compiled kernel computes them per row between its two passes over the row (one loop over the
    rows, each row read from memory once; with them as outputs inductor ran two loops over the
    block, 1.8x the time)."""
    x = w.float()
    n = x.shape[-1]
    s = x.sum(-1, keepdim=True)
    m = s / n
    hi, lo = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
    sc = exp2_int(row_scale_exp(hi, lo, m))
    z = x * sc - m * sc
    z2 = z * z
    return (s.squeeze(-1), hi.squeeze(-1), lo.squeeze(-1), z.sum(-1), z2.sum(-1), (z2 * z).sum(-1),
            (z2 * z2).sum(-1))


def combine_moments(parts: tuple[torch.Tensor, ...], n: int) -> tuple[torch.Tensor, ...]:
    """Rows' moments [B, R] (row_moments, rows of n weights) -> per matrix (float64 [B]): sum of W^2,
    kurtosis (Pearson), max|W| / std(W), max|W|. Each row's sums about its own mean are moved to
    the matrix mean exactly in float64 (the binomial expansion of (z + d)^p)."""
    s, hi, lo = parts[:3]
    m = s / n  # float32, as in row_moments
    k = row_scale_exp(hi, lo, m)
    m, hi, lo, k, s1, s2, s3, s4 = (t.double() for t in (m, hi, lo, k, *parts[3:]))
    inv = torch.exp2(-k)  # back to W's units
    t1, t2, t3, t4 = s1 * inv, s2 * inv ** 2, s3 * inv ** 3, s4 * inv ** 4
    R = m.shape[-1]
    N = n * R
    mu = (n * m + t1).sum(-1, keepdim=True) / N
    d = m - mu
    c2 = (t2 + 2 * d * t1 + n * d * d).sum(-1)
    c4 = (t4 + 4 * d * t3 + 6 * d * d * t2 + 4 * d ** 3 * t1 + n * d ** 4).sum(-1)
    norm2 = (t2 + 2 * m * t1 + n * m * m).sum(-1)
    hi_m, lo_m = hi.amax(-1), lo.amin(-1)
    absmax = torch.maximum(hi_m, -lo_m)
    sd = torch.sqrt((c2 / N).clamp(min=0))
    ok = (c2 > 0) & (hi_m > lo_m)  # a constant matrix has std 0 exactly (c2 may round above 0)
    kurt = torch.where(ok, N * c4 / (c2 * c2), math.nan)
    outlier = torch.where(ok, absmax / sd, math.nan)
    return norm2, kurt, outlier, absmax


def row_errors(w: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """sum over each row of ((Q(W) - W) scale)^2, float32 [B, out], for a block W [B, out, in] of whole
    matrices; `scale` [B, 1, 1] (powers of two: extreme weights squared without overflow) or None
    (1: a graph of its own, whose loops inductor fuses per row; with the per-matrix scale it ran
    some schemes in two passes over the block)."""
    x = w.float()
    if scheme == "nf4" and x.shape[-1] % 64 == 0:  # whole NF4 blocks in each row: summed per block
        x = x.reshape(*x.shape[:-1], -1, 64)  # (one loop nest over the blocks; inductor split the
        d = S.nf4_blocks(x) - x  # row sum into a second pass otherwise)
        if scale is not None:
            d = d * scale.unsqueeze(-1)
        return (d * d).sum(-1).sum(-1)
    d = KERNELS[scheme](x) - x
    if scale is not None:
        d = d * scale
    return (d * d).sum(-1)


def row_errors_diff(w: torch.Tensor, scale: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """row_errors and Q(W) - W itself (float32 [B, out, in]), for the activation-space error."""
    x = w.float()
    if scheme == "nf4" and x.shape[-1] % 64 == 0:
        xb = x.reshape(*x.shape[:-1], -1, 64)
        diff = S.nf4_blocks(xb) - xb
        d = diff if scale is None else diff * scale.unsqueeze(-1)
        return (d * d).sum(-1).sum(-1), diff.reshape(x.shape)
    diff = KERNELS[scheme](x) - x
    d = diff if scale is None else diff * scale
    return (d * d).sum(-1), diff


# --- compiled versions: built on first use, then reused for every shape (dynamic shapes) -------------

_COMPILED: dict[str, Callable] = {}
_FAILED: list[str] = []  # why compiling failed, once per process


def compile_wanted(total_weights: int, device: torch.device) -> bool:
    """Compile for large reports on CPU: inductor's C++ build costs tens of seconds the first time
    (seconds once in its cache), the fused kernels save ~5 ns per weight and scheme."""
    env = os.environ.get("MOETOOL_QUANT_COMPILE", "auto").strip().lower()
    if _FAILED or env in ("0", "no", "false", "off") or device.type != "cpu":
        return False
    if env in ("1", "yes", "true", "on"):
        return True
    return total_weights >= COMPILE_MIN_WEIGHTS


COMPILE_MIN_WEIGHTS = 2_000_000_000  # weight-scheme evaluations (about 10 s of eager kernels)
COMPILED_SCHEMES = ("int8", "int4_g128", "nf4", "fp8_channel", "fp8_block", "mxfp4", "nvfp4")
# The scheme functions the kernels trace: the schemes' own, but nf4 by comparisons (its table
# lookups compiled to a scalar gather loop, 5x slower than the eager kernel; the selects vectorise).
KERNELS: dict[str, Callable] = dict(S.FUNCTIONS, nf4=S.nf4_select, mxfp4=functools.partial(S.mxfp4, fp4=S.e2m1_select),
                                    nvfp4=functools.partial(S.nvfp4, fp4=S.e2m1_select))


def compiled(name: str) -> Optional[Callable]:
    """The compiled kernel `name` ('moments', 'combine', 'errors', 'errors_diff'), or None when compiling is off
    or failed."""
    if _FAILED:
        return None
    fn = _COMPILED.get(name)
    if fn is None:
        base = {"moments": row_moments, "combine": combine_moments, "errors": row_errors, "errors_diff": row_errors_diff}[name]
        import torch._dynamo

        # one graph per scheme (and per specialised size 1): more than dynamo's default of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        fn = _COMPILED[name] = torch.compile(base, dynamic=True)
    return fn


def run_compiled(name: str, *args) -> Optional[object]:
    """Call the compiled kernel; None (and eager from then on) when it cannot be built or run."""
    fn = compiled(name)
    if fn is None:
        return None
    try:
        import torch._dynamo

        # module-level float constants (nf4's code points and thresholds) as literals in the kernel,
        # not as float64 inputs of the graph (dynamo's default)
        with torch._dynamo.config.patch(specialize_float=True):
            return fn(*args)
    except Exception as exc:  # no C++ compiler, an inductor limitation: the eager kernels give the same
        _FAILED.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200])
        print(f"quantize-report: compiled kernels unavailable ({_FAILED[0]}); using eager kernels",
              file=sys.stderr)
        return None
