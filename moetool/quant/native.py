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
on stderr and the report goes on with the torch kernels. The calls release the GIL: a block's rows
are scored by `torch.get_num_threads()` threads in chunks taken from a shared counter (see _parallel).
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
    lib.moetool_score.argtypes = [p, ctypes.c_int, i64, i64, i64, p, ctypes.c_int, p, p, p, p, i64, p, p]
    lib.moetool_score.restype = ctypes.c_int
    lib.moetool_amax.argtypes = [p, ctypes.c_int, i64, i64, i64, i64, p, p]
    lib.moetool_amax.restype = ctypes.c_int
    lib.moetool_combine.argtypes = [p, p, ctypes.c_int, i64, i64, i64, p, p]
    lib.moetool_combine.restype = None
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
          diff: Optional[torch.Tensor] = None, threads: Optional[int] = None, sums: bool = False):
    """W [B, out, in] -> (parts, stats, errors): with `moments`, each row's moments as
    kernels.row_moments gives them (float32 [7, B, out]) and each matrix's statistics as
    kernels.combine_moments gives them (||W||^2, kurtosis, max|W| / std, max|W|: float64 [4, B]), else
    None, None; errors {scheme: sum over each row of ((Q(W) - W) scale)^2, float32 [B, out]}.
    Q(W) - W into `diff` (float32 [B, out, in], one scheme only). `scale`: float32 [B] or None.
    With `sums`, a fourth: each scheme's row errors summed per matrix in float64 ([len(schemes), B], the
    schemes' order). The block's rows are split over `threads` (torch.get_num_threads()) in chunks."""
    lib = library()
    B, out, n = w.shape
    R = B * out
    ns = len(schemes)
    ids, chunk, nvfp4 = _plan(tuple(schemes), out)
    nchunks = B * -(-out // chunk)
    threads = max(1, min(threads or torch.get_num_threads(), nchunks))
    f32 = torch.empty(((7 if moments else 0) + ns) * R, dtype=torch.float32)  # one allocation: rows' moments, errors
    m4 = 4 if moments else 0
    f64 = torch.empty(m4 + (ns if sums else 0), B, dtype=torch.float64)  # matrices' statistics, error sums
    assert diff is None or (ns == 1 and diff.is_contiguous() and diff.dtype == torch.float32)
    wp, fp, dt, f64p = w.data_ptr(), f32.data_ptr(), _DTYPES[w.dtype], f64.data_ptr()
    mp, ep = (fp, fp + 28 * R) if moments else (None, fp)
    scp = scale.to(torch.float32).contiguous() if scale is not None else None
    dp = diff.data_ptr() if diff is not None else None
    part = pp = None
    if nvfp4:  # its tensor scale (each matrix's max |W|) before any row is scored
        part = torch.empty(nchunks, dtype=torch.float32)
        pp = part.data_ptr()
        _parallel(threads, lambda nxt: lib.moetool_amax(wp, dt, B, out, n, chunk, nxt, pp))
    sp = scp.data_ptr() if scp is not None else None
    _parallel(threads, lambda nxt: lib.moetool_score(wp, dt, B, out, n, sp, ns, ids, mp, ep, dp, chunk, nxt, pp))
    if moments or sums:
        lib.moetool_combine(mp, ep, ns if sums else 0, B, out, n, f64p if moments else None, f64p + 8 * m4 * B)
    rows = f32.view(-1, B, out)
    result = (rows[:7], f64[:4]) if moments else (None, None)
    result += (dict(zip(schemes, rows[7 if moments else 0:].unbind(0))),)
    return result + (f64[m4:],) if sums else result


def _plan(schemes: tuple, out: int) -> tuple:
    """(the schemes' ids as a C int32 array, rows per chunk: fp8_block's 128-row bands whole, nvfp4 among them)"""
    key = (schemes, out)
    plan = _PLANS.get(key)
    if plan is None:
        ids = (ctypes.c_int32 * max(1, len(schemes)))(*(SCHEME_IDS[s] for s in schemes))  # kept: read during calls
        plan = _PLANS[key] = (ids, min(out, 128 if "fp8_block" in schemes else CHUNK_ROWS), "nvfp4" in schemes)
    return plan


_PLANS: dict = {}
_POOLS: dict = {}
CHUNK_ROWS = 32  # rows a thread takes at a time (~10-30 us of work at 1-4k columns)


def _parallel(threads: int, call) -> None:
    """call(next) on up to `threads` threads: this one and threads - 1 tasks on the shared pool (workers()),
    `next` the address of their shared chunk counter; no torch call in `call` (the pool's threads are
    outside the caller's inference mode). When this thread runs out of chunks, a task still queued
    behind other work on the pool (the report's read of the next block) is cancelled, not waited for:
    the reading thread joins the scoring once its read is done, and no call waits on a read. A memory
    failure (-1 from any thread) raises MemoryError."""
    counter = ctypes.c_int64(0)
    nxt = ctypes.addressof(counter) if threads > 1 else None
    futures = [workers(threads).submit(call, nxt) for _ in range(threads - 1)]
    rcs = []
    try:
        rcs.append(call(nxt))
    finally:  # the counter lives in this frame: no task may still be taking chunks once it returns
        for f in futures:
            if not f.cancel():
                rcs.append(f.result())
    if any(rcs):
        raise MemoryError("quantize-report: out of memory for a row buffer")


def workers(threads: Optional[int] = None) -> ThreadPoolExecutor:
    """The pool shared by the kernel's threads and the report's read-ahead (kept for the process: starting
    threads for each call cost ~0.1 ms, a block's kernel ~1-5 ms): threads - 1 threads (the caller is the
    other), one at least for the read-ahead; `threads`: torch.get_num_threads() by default. One pool, so
    that reading the next block and scoring this one never run on more threads than the CPU has cores: a
    kernel thread that waits for a core holds up its call (measured: two kernel threads beside a read
    thread on two cores were slower than one)."""
    n = max(1, (threads or torch.get_num_threads()) - 1)
    pool = _POOLS.get(n)
    if pool is None:
        pool = _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="moetool-work")
    return pool
