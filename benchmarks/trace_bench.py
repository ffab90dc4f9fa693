"""Benchmark: tokens per second of moetool's reference forward against transformers' on the same
Qwen3-MoE-shaped checkpoint (hidden 1024, 8 layers, 64 experts, top-8, expert FFN 512; 512
tokens; float32; CPU), in the same process, same tokens. Prints the ratio.

moetool maps the weights straight from the safetensors files (zero-copy); a checkpoint this size
next to the machine's memory stays mapped between runs, as transformers' model stays loaded;
neither side's load time is in the median (the first of moetool's runs maps the pages).

Run: python benchmarks/trace_bench.py [--tokens 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

CONFIG = dict(model_type="qwen3_moe", hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
              num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=64,
              num_experts_per_tok=8, vocab_size=32000, max_position_embeddings=4096, norm_topk_prob=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from fakes import build_transformers_model

    from moetool.forward import run_forward
    from moetool.source import resolve

    torch.set_num_threads(torch.get_num_threads())
    model = build_transformers_model(CONFIG, seed=0).eval()
    ids = torch.randint(0, CONFIG["vocab_size"], (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        ckpt = resolve(tmp)
        ours, theirs = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            out = run_forward(ckpt, ids[0].tolist(), dtype="float32", device="cpu")
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.inference_mode():
                ref = model(ids).logits[0]
            theirs.append(time.perf_counter() - t)
        diff = (out.logits - ref.float()).abs().max().item()
    n = args.tokens
    a, b = statistics.median(ours), statistics.median(theirs)
    params = sum(p.numel() for p in model.parameters())
    print(f"checkpoint: Qwen3-MoE shape, {params / 1e6:.0f}M parameters, {n} tokens, float32, CPU, "
          f"{torch.get_num_threads()} threads; max |logit diff| {diff:.1e}")
    print(f"moetool forward (weights mapped from the files): {n / a:8.1f} tokens/s  (median {a:.2f} s of {args.runs})")
    print(f"transformers forward (weights loaded):           {n / b:8.1f} tokens/s  (median {b:.2f} s of {args.runs})")
    print(f"ratio: moetool / transformers = {b / a:.2f}x")


if __name__ == "__main__":
    main()
