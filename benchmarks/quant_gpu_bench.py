"""quantize-report's scheme kernels on a GPU, as ratios to moving the same expert bytes (issue 16).

    python benchmarks/quant_gpu_bench.py [--experts 16 --rows 2048 --cols 1408]

One block of experts (bf16, [E, rows, cols]) as the report scores it: converted to float32 on the
device, the batched weight statistics (`_stats`) and, per scheme, Q(W) - W and its squared error
(`_errors`), exactly the calls of quant/report.py's `_Scorer.score_block`. References, timed in the
same run on the same bytes:
- `h2d`: copying the block from pinned host memory to the GPU (where the report's weights come from:
  the host page cache), and
- `d2d`: a device-to-device copy of the block (the GPU's own memory speed).
Each ratio is bytes per second of the scheme over bytes per second of the reference (1.0: as fast as
the copy). CUDA events, 2 warm-ups, the median of 5. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moetool.quant.report import _errors, _stats  # noqa: E402
from moetool.quant.schemes import SCHEMES  # noqa: E402


def timed(fn, reps: int = 5) -> float:
    for _ in range(2):
        fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=1408)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("quant_gpu_bench: no CUDA device")
    g = torch.Generator().manual_seed(0)
    host = (torch.randn(args.experts, args.rows, args.cols, generator=g) * 0.02).bfloat16().pin_memory()
    dev = torch.empty_like(host, device="cuda")
    nbytes = host.numel() * host.element_size()
    h2d = timed(lambda: dev.copy_(host, non_blocking=True))
    other = torch.empty_like(dev)
    d2d = timed(lambda: other.copy_(dev))
    print(f"{torch.cuda.get_device_name()}: block {list(host.shape)} bf16 = {nbytes / 1e6:.0f} MB; "
          f"h2d {nbytes / h2d / 1e9:.1f} GB/s, d2d {nbytes / d2d / 1e9:.1f} GB/s")
    w = torch.empty(host.shape, dtype=torch.float32, device="cuda")
    diff = torch.empty_like(w)
    stats = timed(lambda: (w.copy_(dev), _stats(w)))
    print(f"{'scheme':12} {'GB/s':>7} {'x h2d':>7} {'x d2d':>7}   (each: bf16 -> f32, statistics, Q(W) - W, error)")
    for scheme in SCHEMES:
        t = timed(lambda: (w.copy_(dev), _stats(w), _errors(w, scheme, diff, None)))
        print(f"{scheme:12} {nbytes / t / 1e9:7.1f} {h2d / t:7.3f} {d2d / t:7.3f}")
    print(f"{'(stats only)':12} {nbytes / stats / 1e9:7.1f} {h2d / stats:7.3f} {d2d / stats:7.3f}")


if __name__ == "__main__":
    main()
