"""Benchmark: trace a Mixtral-8x7B-shaped checkpoint (46.7B parameters, 93 GB of bf16 written as
sparse files) on a machine with less RAM than that, and report wall time and peak RSS as
`/usr/bin/time -v` measures it (file-backed pages included).

Only the embedding, the norms, the routers and the LM head hold real (random) values; every other
tensor is a hole in the file that reads as zeros. Routing is therefore real (router weights times
normalised embeddings), the attention and expert outputs are zero.

Run: python benchmarks/stream_bench.py [--dir /tmp/mixtral-sparse] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def mixtral_tensors(cfg: dict) -> dict:
    d, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (d // cfg["num_attention_heads"])
    t = {"model.embed_tokens.weight": ("BF16", [V, d])}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = ("BF16", [d])
        for proj, out in (("q", d), ("k", kv), ("v", kv), ("o", d)):
            t[f"{p}.self_attn.{proj}_proj.weight"] = ("BF16", [out, d])
        t[f"{p}.post_attention_layernorm.weight"] = ("BF16", [d])
        t[f"{p}.block_sparse_moe.gate.weight"] = ("BF16", [cfg["num_local_experts"], d])
        for e in range(cfg["num_local_experts"]):
            t[f"{p}.block_sparse_moe.experts.{e}.w1.weight"] = ("BF16", [F, d])
            t[f"{p}.block_sparse_moe.experts.{e}.w2.weight"] = ("BF16", [d, F])
            t[f"{p}.block_sparse_moe.experts.{e}.w3.weight"] = ("BF16", [F, d])
    t["model.norm.weight"] = ("BF16", [d])
    t["lm_head.weight"] = ("BF16", [V, d])
    return t


def bf16_bytes(values: np.ndarray) -> bytes:
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()


def build(root: Path, shards: int = 19, layers: int = 0) -> None:
    """The sparse checkpoint; `layers` > 0 keeps only that many decoder layers (same shapes)."""
    from fakes import write_sharded

    from moetool.source import resolve

    cfg = json.loads((REPO / "sample_configs" / "mixtral-8x7b.json").read_text())
    if layers:
        cfg["num_hidden_layers"] = layers
    write_sharded(root, mixtral_tensors(cfg), shards, cfg)
    ckpt = resolve(str(root))
    rng = np.random.default_rng(0)
    for name, t in ckpt.tensors.items():
        if name.endswith("norm.weight"):
            data = bf16_bytes(np.ones(t.shape))
        elif name.endswith(("embed_tokens.weight", "lm_head.weight", "gate.weight")):
            data = bf16_bytes(rng.standard_normal(t.shape, dtype=np.float32) * 0.02)
        else:
            continue
        with open(t.file, "r+b") as f:
            start = 8 + int.from_bytes(f.read(8), "little")
            f.seek(start + t.begin)
            f.write(data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/mixtral-sparse")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    root = Path(args.dir)
    if not (root / "model.safetensors.index.json").exists():
        t = time.perf_counter()
        build(root)
        print(f"built {root} in {time.perf_counter() - t:.0f} s")
    apparent = sum(p.stat().st_size for p in root.glob("*.safetensors"))
    on_disk = sum(p.stat().st_blocks * 512 for p in root.glob("*.safetensors"))
    ids = ",".join(str(i) for i in np.random.default_rng(1).integers(0, 32000, args.tokens))
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "moetool", "trace", "--model", str(root), "--tokens", ids,
           "--json", "--device", "cpu"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(r.stderr[-2000:])
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    out = json.loads(r.stdout)
    used = {e for l in out["layers"] for row in l["experts"] for e in row}
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"checkpoint: Mixtral-8x7B shape, {apparent / 1e9:.1f} GB of safetensors ({on_disk / 1e9:.2f} GB on disk), "
          f"machine RAM {mem / 1e9:.1f} GB")
    print(f"trace of {args.tokens} tokens, float32 compute, CPU: wall {wall:.0f} s, peak RSS {rss_kb / 1e6:.2f} GB "
          f"(/usr/bin/time -v); {len(out['layers'])} MoE layers, {len(used)} distinct experts chosen")


if __name__ == "__main__":
    main()
