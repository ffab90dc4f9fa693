"""Benchmark: `moetool profile` on a checkpoint larger than RAM (the Mixtral-8x7B-shaped sparse
checkpoint of stream_bench.py, 93 GB of bf16) against one streamed pass (`trace` of 64 tokens), in
the same command. Each run is a fresh process under `/usr/bin/time -v`: wall time, CPU time
(user + system, all threads) and peak RSS (file-backed pages included).

The issue's target is 256 prompts x 64 tokens in at most 2x one streamed pass, peak RSS under 6 GB.
The script also measures this machine's float32 matmul throughput at the expert shape
(tokens x 4096 @ 4096 x 14336) and prints the arithmetic: the FLOPs of P x 64 tokens through the
12.9B active parameters, and the time they need at that throughput.

The checkpoint's expert and attention weights are holes that read as zeros; the matmuls cost the
same FLOPs as with real values (BLAS does not skip zeros), routing is real (random routers).

Run: python benchmarks/profile_large_bench.py [--dir /tmp/perf-mixtral] [--prompts 16] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from stream_bench import build  # noqa: E402

VOCAB = 32000
TOKENS = 64


def word_tokenizer(path: Path) -> None:
    """A word-level tokenizer: 'w<id>' is token id, so a prompt of 64 words is exactly 64 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def timed(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, dict]:
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{r.stderr[-3000:]}")
    num = lambda pat: float(re.search(pat, r.stderr).group(1))
    return r, {"wall": wall, "cpu": num(r"User time \(seconds\): ([\d.]+)") + num(r"System time \(seconds\): ([\d.]+)"),
               "rss_gb": num(r"Maximum resident set size \(kbytes\): (\d+)") * 1024 / 1e9}


def expert_matmul_rate(tokens: int, threads: int) -> float:
    """FLOP/s of one expert's SwiGLU (gate, up [14336, 4096], down [4096, 14336]) on `tokens` tokens."""
    import torch

    torch.set_num_threads(threads)
    D, F = 4096, 14336
    x, g, u, d = torch.randn(tokens, D), torch.randn(F, D), torch.randn(F, D), torch.randn(D, F)
    f = lambda: torch.nn.functional.linear(torch.nn.functional.silu(x @ g.T) * (x @ u.T), d)
    f()
    c = time.perf_counter()
    f()
    return 3 * 2 * tokens * D * F / (time.perf_counter() - c)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/perf-mixtral")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-memory", default="2GB")
    ap.add_argument("--keep", action="store_true", help="keep the sparse checkpoint afterwards")
    ap.add_argument("--layers", type=int, default=0,
                    help="build only this many of the 32 decoder layers (same shapes; per-layer costs x 32/N)")
    args = ap.parse_args()
    root = Path(args.dir)
    if not (root / "model.safetensors.index.json").exists():
        t = time.perf_counter()
        build(root, shards=max(1, min(19, args.layers or 19)), layers=args.layers)
        print(f"built {root} in {time.perf_counter() - t:.0f} s", flush=True)
    if not (root / "tokenizer.json").exists():
        word_tokenizer(root / "tokenizer.json")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    rate = expert_matmul_rate(512, threads)
    active = 12.88e9  # Mixtral-8x7B active parameters per token (moetool count)
    rng = np.random.default_rng(1)
    work = Path(tempfile.mkdtemp(prefix="profile-large-"))
    try:
        ids = rng.integers(1, VOCAB, TOKENS)
        _, one = timed([sys.executable, "-m", "moetool", "trace", "--model", str(root), "--device", "cpu", "--json",
                        "--tokens", ",".join(map(str, ids))], env)
        print(f"one streamed pass (trace of {TOKENS} tokens): wall {one['wall']:.0f} s, CPU {one['cpu']:.0f} s, "
              f"peak RSS {one['rss_gb']:.2f} GB", flush=True)
        corpus = work / "corpus.txt"
        corpus.write_text("".join(" ".join(f"w{i}" for i in rng.integers(1, VOCAB, TOKENS)) + "\n"
                                  for _ in range(args.prompts)))
        r, prof = timed([sys.executable, "-m", "moetool", "profile", str(corpus), "--model", str(root), "-o",
                         str(work / "out"), "--json", "--max-memory", args.max_memory], env)
        summary = json.loads(r.stdout)
        n = args.prompts * TOKENS
        if summary["tokens"] != n:
            sys.exit(f"profile counted {summary['tokens']} tokens, expected {n}")
        print(f"profile of {args.prompts} prompts x {TOKENS} tokens ({n} tokens, --max-memory {args.max_memory}): "
              f"wall {prof['wall']:.0f} s, CPU {prof['cpu']:.0f} s, peak RSS {prof['rss_gb']:.2f} GB; "
              f"{prof['wall'] / one['wall']:.2f}x the wall time of one streamed pass", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    # the arithmetic, and an extrapolation from the two measured runs: per-pass cost (reading and
    # converting the weights) + per-token cost (the matmuls), in CPU time (the machine may be shared)
    scale = 32 / args.layers if args.layers else 1.0
    per_token = max(prof["cpu"] - one["cpu"], 0.0) / (n - TOKENS)
    print(f"expert SwiGLU at 512 tokens x 4096 x 14336, float32, {threads} threads: {rate / 1e9:.0f} GFLOP/s")
    for P in (args.prompts, 256):
        flops = 2 * active * P * TOKENS
        print(f"{P} prompts x {TOKENS} tokens through all 32 layers: {flops:.2e} FLOPs, {flops / rate:.0f} s of matmuls "
              f"at that rate")
    if args.layers:
        print(f"EXTRAPOLATION to 32 layers (x{scale:g}, not measured): one pass {one['cpu'] * scale:.0f} CPU-s, "
              f"profile of {n} tokens {prof['cpu'] * scale:.0f} CPU-s")
    est = (one["cpu"] + per_token * (256 * TOKENS - TOKENS)) * scale
    print(f"EXTRAPOLATION (not measured) for 256 x {TOKENS} tokens, 32 layers, one block: one pass "
          f"{one['cpu'] * scale:.0f} CPU-s + {per_token * scale * 1e3:.0f} CPU-ms per further token x "
          f"{256 * TOKENS - TOKENS} = {est:.0f} CPU-s ({est / (one['cpu'] * scale):.1f}x one pass)")

if __name__ == "__main__":
    main()
