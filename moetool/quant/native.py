"""quantize-report's CPU kernel (native.c): each row's moments and every scheme's error in one pass
over the row, built with the system C compiler on first use and loaded with ctypes.

Why C and not torch: the scores need, per row, a reduction (max, sum) and then an elementwise pass
that depends on it, for seven schemes; torch runs each as separate passes over memory with
temporaries, and torch.compile (inductor) split several schemes into extra loops and moved
float <-> int bit casts through memory (fp8: 2.1 ns per weight, nvfp4 4.9). The C loop reads
a row once into L1 and does everything there (benchmarks/quant_bench.py).

Build: `$CC` (default `cc`) -O3 -march=native -ffp-contract=off, about half a second, into
`~/.cache/moetool/native/<hash>/` (`$MOETOOL_CACHE` moves it) keyed by the source, the compiler's
version, the flags and this CPU's feature flags; written to a temporary name and renamed, so a
half-written library is never loaded. `MOETOOL_QUANT_NATIVE=0` turns it off (then the eager torch
kernels, or inductor's with `MOETOOL_QUANT_COMPILE=1`); a missing or failing compiler says so once
on stderr and the report goes on with the torch kernels. The calls release the GIL: a block's
matrices are split over `torch.get_num_threads()` threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("native.c")
SCHEME_IDS = {"int8": 0, "int4_g128": 1, "nf4": 2, "fp8_channel": 3, "fp8_block": 4, "mxfp4": 5, "nvfp4": 6}
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-std=gnu11", "-Wno-psabi", "-lm"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lib: Optional[ctypes.CDLL] = None
_state: dict = {}  # "failed": why building failed (said once), "tried": True


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="ascii", errors="replace"):
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    base = os.environ.get("MOETOOL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moetool")
    return Path(base) / "native"


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no C compiler ({cc}: {e.strerror if isinstance(e, OSError) else e})") from None
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(FLAGS).encode(), platform.machine().encode(),
                                     _cpu_flags().encode()])).hexdigest()[:20]
    target = _cache_dir() / key / "libmoetool_quant.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
        os.close(fd)
        try:
            r = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                lines = r.stderr.strip().splitlines() or ["failed"]
                first = next((ln for ln in lines if "error" in ln), lines[0])
                raise RuntimeError(f"{cc} failed: {first[:160]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.moetool_score.argtypes = [p, ctypes.c_int, i64, i64, i64, p, ctypes.c_int, p, p, p, p, i64, p, i64]
    lib.moetool_score.restype = ctypes.c_int
    lib.moetool_has_f16.restype = ctypes.c_int
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The built kernel, or None (off, or the build failed: said once on stderr)."""
    global _lib
    if os.environ.get("MOETOOL_QUANT_NATIVE", "auto").strip().lower() in ("0", "no", "false", "off"):
        return None
    if _lib is None and not _state.get("tried"):
        _state["tried"] = True
        try:
            _lib = _build()
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _state["failed"] = str(e)
            print(f"quantize-report: native kernel unavailable ({e}); using torch kernels", file=sys.stderr)
    return _lib


def supports(w: torch.Tensor, scheme: str) -> bool:
    """Whether the native kernel scores `scheme` on W [B, out, in]: on the CPU, rows a multiple of 16
    long, nf4 with whole blocks of 64 in each row (its blocks run across rows otherwise)."""
    n = w.shape[-1]
    return (w.device.type == "cpu" and w.dtype in _DTYPES and n % 16 == 0 and w.is_contiguous()
            and (scheme != "nf4" or n % 64 == 0) and scheme in SCHEME_IDS
            and (w.dtype != torch.float16 or bool(library() and library().moetool_has_f16())))


def score(w: torch.Tensor, schemes: list[str], *, moments: bool, scale: Optional[torch.Tensor] = None,
          diff: Optional[torch.Tensor] = None, threads: Optional[int] = None):
    """W [B, out, in] -> (parts, stats, errors): with `moments`, each row's moments as
    kernels.row_moments gives them (float32 [7, B, out]) and each matrix's statistics as
    kernels.combine_moments gives them (||W||^2, kurtosis, max|W| / std, max|W|: float64 [4, B]), else
    None, None; errors {scheme: sum over each row of ((Q(W) - W) scale)^2, float32 [B, out]}.
    Q(W) - W into `diff` (float32 [B, out, in], one scheme only). `scale`: float32 [B] or None."""
    lib = library()
    B, out, n = w.shape
    R = B * out
    ns = len(schemes)
    f32 = torch.empty((7 if moments else 0) * R + ns * R, dtype=torch.float32)  # one allocation: rows' moments, errors
    stats = torch.empty(4, B, dtype=torch.float64) if moments else None
    ids = _ids(tuple(schemes))
    sc = scale.to(torch.float32).contiguous() if scale is not None else None
    assert diff is None or (ns == 1 and diff.is_contiguous() and diff.dtype == torch.float32)
    threads = max(1, min(threads or torch.get_num_threads(), B))
    step = -(-B // threads)
    isz = w.element_size()
    wp, fp, dt = w.data_ptr(), f32.data_ptr(), _DTYPES[w.dtype]
    ep = fp + (28 * R if moments else 0)

    def run(b0: int) -> int:  # matrices [b0, b0 + step): their rows of mom / errs (no torch call here:
        nb = min(B, b0 + step) - b0  # the pool's threads are outside the caller's inference mode)
        return lib.moetool_score(wp + b0 * out * n * isz, dt, nb, out, n,
                                 sc.data_ptr() + 4 * b0 if sc is not None else None, ns, ids,
                                 fp + 4 * b0 * out if moments else None, ep + 4 * b0 * out,
                                 diff.data_ptr() + 4 * b0 * out * n if diff is not None else None, R,
                                 stats.data_ptr() + 8 * b0 if moments else None, B)

    if threads == 1:
        rcs = [run(0)]
    else:
        rcs = list(_pool(threads).map(run, range(0, B, step)))
    if any(rcs):
        raise MemoryError("quantize-report: out of memory for a row buffer")
    rows = f32.view(-1, B, out)
    errs = rows[7:] if moments else rows
    return (rows[:7] if moments else None), stats, dict(zip(schemes, errs.unbind(0)))


_ID_ARRAYS: dict = {}
_POOLS: dict = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool kept for the process (starting threads for each call cost ~0.1 ms, a block's kernel ~1-5 ms)."""
    pool = _POOLS.get(threads)
    if pool is None:
        pool = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="moetool-quant")
    return pool


def _ids(schemes: tuple) -> ctypes.Array:
    """The schemes' ids as a C int32 array (kept: the kernel reads it during the call)."""
    a = _ID_ARRAYS.get(schemes)
    if a is None:
        a = _ID_ARRAYS[schemes] = (ctypes.c_int32 * max(1, len(schemes)))(*(SCHEME_IDS[s] for s in schemes))
    return a
