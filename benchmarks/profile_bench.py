"""Benchmark: routing statistics of a corpus three ways, same checkpoint, same prompts, one process:

  1. `moetool profile` (layer-major blocks of prompts: each layer's weights once per block),
  2. `moetool trace --file` (trace_many: one full forward per prompt),
  3. transformers, batched and right-padded with an attention mask, `output_router_logits=True`,
     top-k of the router's softmax counted over the real (unpadded) tokens.

Checkpoint: Qwen3-MoE-shaped, written by transformers with random weights (default hidden 512,
4 layers, 64 experts, top-8, expert FFN 256, float32, CPU), small enough to run in about two
minutes on a shared 2-core machine; `--hidden 1024 --layers 8 --ffn 512` is trace_bench's 0.9B
shape. Prints tokens/s of each, the ratios, and how many per-layer expert loads differ from
transformers' (0 expected).

Run: python benchmarks/profile_bench.py [--prompts 64] [--hidden 512] [--layers 4]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

WORDS = ("the of and to in is for on that with as by from it at def return import class self if else for while "
         "data model expert router token layer value print list dict range open file read write").split()


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16, help="transformers batch size")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time ~ wall time on a shared box)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from conftest import write_tokenizer
    from fakes import build_transformers_model
    from tokenizers import Tokenizer

    from moetool.profile.engine import profile
    from moetool.source import resolve
    from moetool.tracing import trace_many

    E, K = 64, 8
    cfg = dict(model_type="qwen3_moe", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
               moe_intermediate_size=args.ffn, num_hidden_layers=args.layers, num_attention_heads=8,
               num_key_value_heads=4, head_dim=64, num_experts=E, num_experts_per_tok=K, vocab_size=4096,
               max_position_embeddings=4096, norm_topk_prob=True)
    model = build_transformers_model(cfg, seed=0).eval()
    prompts = corpus(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        write_tokenizer(Path(tmp))
        tok = Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))
        ids = [tok.encode(p).ids for p in prompts]
        n_tokens = sum(map(len, ids))
        ckpt = resolve(tmp)
        profile(prompts[:2], model=ckpt, device="cpu")  # map the pages once (transformers' weights are loaded)

        t, c = time.perf_counter(), time.process_time()
        stats = profile(prompts, model=ckpt, device="cpu")
        t_profile, c_profile = time.perf_counter() - t, time.process_time() - c

        t, c = time.perf_counter(), time.process_time()
        trace_many(prompts, model=ckpt, device="cpu")
        t_trace, c_trace = time.perf_counter() - t, time.process_time() - c

        t, c = time.perf_counter(), time.process_time()
        loads = np.zeros((args.layers, E), dtype=np.int64)
        with torch.inference_mode():
            for b in range(0, len(ids), args.batch):
                batch = ids[b:b + args.batch]
                S = max(map(len, batch))
                x = torch.zeros(len(batch), S, dtype=torch.long)
                mask = torch.zeros(len(batch), S, dtype=torch.long)
                for i, row in enumerate(batch):
                    x[i, :len(row)] = torch.tensor(row)
                    mask[i, :len(row)] = 1
                out = model(x, attention_mask=mask, output_router_logits=True)
                real = mask.reshape(-1).bool()
                for l, r in enumerate(out.router_logits):
                    top = torch.topk(torch.softmax(r.float(), -1), K, dim=-1).indices[real]
                    loads[l] += np.bincount(top.reshape(-1).numpy(), minlength=E)
        t_hf, c_hf = time.perf_counter() - t, time.process_time() - c
    params = sum(p.numel() for p in model.parameters())
    ours = np.stack([stats.layers[l].load for l in stats.meta["moe_layers"]])
    differ = int((ours != loads).any(axis=1).sum())
    print(f"checkpoint: Qwen3-MoE shape, {params / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} layers, "
          f"{E} experts, top-{K}, expert FFN {args.ffn}), float32, CPU, {torch.get_num_threads()} threads")
    print(f"corpus: {len(prompts)} prompts, {n_tokens} tokens (8-40 words each)")
    for name, s, c in (("moetool profile (layer-major blocks)", t_profile, c_profile),
                       ("moetool trace --file (per prompt)", t_trace, c_trace),
                       (f"transformers batched (batch {args.batch}, padded)", t_hf, c_hf)):
        print(f"{name:45s} {n_tokens / s:9.1f} tokens/s wall ({s:.2f} s), {n_tokens / c:9.1f} tokens/CPU-s ({c:.2f} s)")
    print(f"speed-up of profile, wall: {t_trace / t_profile:.2f}x trace --file, {t_hf / t_profile:.2f}x transformers "
          f"batched; CPU time: {c_trace / c_profile:.2f}x, {c_hf / c_profile:.2f}x")
    print(f"layers whose expert loads differ from transformers': {differ} of {args.layers}")


if __name__ == "__main__":
    main()
