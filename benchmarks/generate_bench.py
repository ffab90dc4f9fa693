"""Benchmark: greedy generation, tokens per second, three ways on the same checkpoint in one process:

  1. `moetool trace --generate N` with its KV cache (forward/cache.py: the prompt once, then one
     token per step through every streamed layer), the whole trace included (routing, metrics);
  2. the same through the full-recompute path (the whole sequence again for each new token: what
     `--generate` did before the cache);
  3. transformers `model.generate(..., do_sample=False, use_cache=True, max_new_tokens=N)`.

Checkpoint: Qwen3-MoE-shaped, written by transformers with random weights (as profile_bench.py:
default hidden 512, 4 layers, 64 experts, top-8, expert FFN 256, float32, CPU, 1 thread);
`--hidden 1024 --layers 8 --ffn 512` is trace_bench's 0.9B shape. One untimed warm-up of each (the
pages of the mapped files, transformers' first-call work), then the median of `--runs`. Wall and CPU
time (process_time: the honest one on a shared machine). Prints tokens/s of each, the ratios, and
whether the generated ids of all three agree.

Run: python benchmarks/generate_bench.py [--new 64] [--prompt 32] [--runs 3] [--hidden 512] [--layers 4]
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
sys.path.insert(0, str(REPO))


def timed(fn, runs: int):
    """(result of the last run, median wall s, median CPU s) after one untimed warm-up."""
    out = fn()
    walls, cpus = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return out, statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=64, help="tokens to generate")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fakes import build_transformers_model

    import moetool
    from moetool.source import resolve

    E, K = 64, 8
    cfg = dict(model_type="qwen3_moe", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
               moe_intermediate_size=args.ffn, num_hidden_layers=args.layers, num_attention_heads=8,
               num_key_value_heads=4, head_dim=64, num_experts=E, num_experts_per_tok=K, vocab_size=4096,
               max_position_embeddings=4096, norm_topk_prob=True)
    model = build_transformers_model(cfg, seed=0).eval()
    model.generation_config.eos_token_id = None  # always N new tokens
    prompt = torch.randint(0, cfg["vocab_size"], (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    n = args.new
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        ckpt = resolve(tmp)

        def ours(kv_cache: bool):
            return lambda: moetool.trace(tokens=prompt, model=ckpt, generate=n, device="cpu", kv_cache=kv_cache)

        def theirs():
            with torch.inference_mode():
                return model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                      max_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)[0].tolist()

        cached, t_cached, c_cached = timed(ours(True), args.runs)
        ref, t_hf, c_hf = timed(theirs, args.runs)
        full, t_full, c_full = timed(ours(False), 1)
    params = sum(p.numel() for p in model.parameters())
    ids_cached, ids_full = [t.id for t in cached.tokens], [t.id for t in full.tokens]
    print(f"checkpoint: Qwen3-MoE shape, {params / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} layers, "
          f"{E} experts, top-{K}, expert FFN {args.ffn}), float32, CPU, {torch.get_num_threads()} threads")
    print(f"greedy generation of {n} tokens after a {len(prompt)}-token prompt; medians of {args.runs} runs "
          "(recompute: 1 run) after a warm-up")
    for name, s, c in (("moetool trace --generate (KV cache)", t_cached, c_cached),
                       ("moetool trace --generate (recompute, before)", t_full, c_full),
                       ("transformers generate (KV cache)", t_hf, c_hf)):
        print(f"{name:46s} {n / s:8.1f} tokens/s wall ({s:.2f} s), {n / c:8.1f} tokens/CPU-s ({c:.2f} s)")
    print(f"ratio KV cache / transformers: {t_hf / t_cached:.2f}x wall, {c_hf / c_cached:.2f}x CPU")
    print(f"ratio KV cache / recompute (after / before): {t_full / t_cached:.2f}x wall, {c_full / c_cached:.2f}x CPU")
    print(f"generated ids: cache == recompute: {ids_cached == ids_full}; cache == transformers: {ids_cached == ref}")


if __name__ == "__main__":
    main()
