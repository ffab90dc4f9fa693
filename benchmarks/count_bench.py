"""Benchmark: `moetool count` on a DeepSeek-V3-shaped checkpoint of 163 header-only shards
(fp8 weights + scales, full-size shapes, sparse files) against instantiating the same config in
transformers on the meta device (what `accelerate estimate-memory` does). Both are timed end to
end as fresh processes, the way a user runs them; the ratio is printed.

Run: python benchmarks/count_bench.py [--runs 5]
Needs the test extras (transformers, torch) for the reference side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

META = """
import json, sys, torch, transformers
cfg = json.load(open(sys.argv[1]))
for k in ("auto_map", "quantization_config"):
    cfg.pop(k, None)
config = transformers.AutoConfig.for_model(**cfg)
with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(config)
print(sum(p.numel() for p in model.parameters()))
"""


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from fakes import deepseek_v3_tensors, write_sharded

    config = json.loads((REPO / "sample_configs" / "deepseek-v3.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "deepseek-v3"
        write_sharded(root, deepseek_v3_tensors(config), 163, config)
        cmd = [sys.executable, "-m", "moetool", "count", str(root), "--json"]
        serial_env = {**os.environ, "MOETOOL_JOBS": "1"}
        ours, serial, ref = [], [], []
        for _ in range(args.runs):  # interleaved, so drifts in machine load hit every side alike
            t, out = timed(cmd)
            ours.append(t)
            total = json.loads(out)["total_params"]
            t, out_serial = timed(cmd, serial_env)
            serial.append(t)
            assert out_serial == out
            t, out = timed([sys.executable, "-c", META, str(root / "config.json")])
            ref.append(t)
            assert int(out) == total, (out, total)
    m, s, r = statistics.median(ours), statistics.median(serial), statistics.median(ref)
    print(f"checkpoint: DeepSeek-V3 shape, 163 header-only shards, {total:,} parameters (both sides agree)")
    print(f"moetool count (headers, fresh process):          median {m:.3f} s over {args.runs} runs "
          f"(shards scanned in parallel on {os.cpu_count()} CPUs)")
    print(f"moetool count, MOETOOL_JOBS=1 (one process):     median {s:.3f} s")
    print(f"transformers meta instantiation (fresh process): median {r:.3f} s over {args.runs} runs")
    print(f"ratio: moetool is {r / m:.1f}x faster ({r / s:.1f}x in one process)")


if __name__ == "__main__":
    main()
