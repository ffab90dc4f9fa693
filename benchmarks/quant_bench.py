"""Benchmark: quantize-report's weight-space throughput against the raw read speed of the same
files, before and after the batched kernels (issue 16), and its peak memory as E grows.

A Qwen3-MoE-shaped checkpoint is written with random bf16 weights (hidden 1024, expert FFN 512,
4 layers, E experts: `--experts`, 16 by default). Raw read: reading every routed-expert tensor's bytes from the file (page
cache warm, as the report sees them). After: `quantize_report(weight_only=True)` with one scheme at
a time (and all seven at once), in expert-weight bytes per second. Before: the scoring as it was,
run here on the same bytes: each expert's matrices read as float32 through the same WeightStore,
one matrix per call, float64 statistics, the old kernels (kept verbatim in
tests/test_quant_schemes.py and tests/test_quantize_report.py). Ratios are printed twice: wall
time against the raw read's wall time (what a user waits; the report reads the next block in a
thread while the kernel scores this one, so the read hides behind the scoring where there is a
second core), and CPU time against CPU time (what the work costs per core; the raw read's own CPU
time is copying out of the page cache), which a shared machine disturbs far less. Peak RSS (`/usr/bin/time -v`) of
the report at E = 16 and E = 64: blocks of a fixed size, so it should not grow with E.

Three "after"s: the native kernel (moetool/quant/native.c, what a CPU report runs by default), the
eager torch kernels (MOETOOL_QUANT_NATIVE=0: a machine without a C compiler, or a GPU's kernels run on
the CPU) and the compiled ones (torch.compile / inductor, fused: MOETOOL_QUANT_NATIVE=0
MOETOOL_QUANT_COMPILE=1); the compiled kernels are built by a first report whose wall time is printed
on its own, then timed like the others. Best of 5 runs each, raw read best of 5.

Run: python benchmarks/quant_bench.py [--schemes int8,nf4] [--experts 16] [--no-before] [--no-rss] [--no-compile]
     [--no-eager] [--threads 1]
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def make(root: Path, experts: int) -> None:
    import json

    from safetensors.torch import save_file

    D, F, L = 1024, 512, 4
    cfg = dict(model_type="qwen3_moe", hidden_size=D, intermediate_size=2048, moe_intermediate_size=F,
               num_hidden_layers=L, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
               num_experts=experts, num_experts_per_tok=8, vocab_size=1000, max_position_embeddings=4096)
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": torch.randn(1000, D, generator=g).bfloat16(),
         "model.norm.weight": torch.ones(D).bfloat16(), "lm_head.weight": torch.randn(1000, D, generator=g).bfloat16()}
    for i in range(L):
        p = f"model.layers.{i}"
        for n, shape in (("q_proj", (1024, D)), ("k_proj", (256, D)), ("v_proj", (256, D)), ("o_proj", (D, 1024))):
            t[f"{p}.self_attn.{n}.weight"] = (torch.randn(*shape, generator=g) * 0.02).bfloat16()
        t[f"{p}.self_attn.q_norm.weight"] = torch.ones(64).bfloat16()
        t[f"{p}.self_attn.k_norm.weight"] = torch.ones(64).bfloat16()
        t[f"{p}.input_layernorm.weight"] = torch.ones(D).bfloat16()
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(D).bfloat16()
        t[f"{p}.mlp.gate.weight"] = (torch.randn(experts, D, generator=g) * 0.02).bfloat16()
        for e in range(experts):
            for n, shape in (("gate_proj", (F, D)), ("up_proj", (F, D)), ("down_proj", (D, F))):
                t[f"{p}.mlp.experts.{e}.{n}.weight"] = (torch.randn(*shape, generator=g) * 0.02).bfloat16()
    root.mkdir(parents=True, exist_ok=True)
    save_file(t, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(cfg))


def _expert_tensors(root: Path) -> tuple[list, int]:
    """The routed experts' tensors in file order, and where the file's data starts (after its header)."""
    from moetool.source import resolve

    ck = resolve(str(root))
    experts = sorted((t for n, t in ck.tensors.items() if ".experts." in n), key=lambda t: t.begin)
    return experts, 8 + int.from_bytes(open(experts[0].file, "rb").read(8), "little")


def raw_reader(root: Path):
    """(read, bytes): read() reads every routed-expert tensor's bytes from the file once (page cache warm)
    and returns its (wall, CPU) seconds: the read's own CPU time is copying out of the page cache."""
    experts, start = _expert_tensors(root)
    n = sum(t.nbytes for t in experts)
    with open(experts[0].file, "rb") as f:  # warm the page cache
        while f.read(1 << 24):
            pass

    def read() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        with open(experts[0].file, "rb") as f:
            for t in experts:
                f.seek(start + t.begin)
                f.read(t.nbytes)
        return time.perf_counter() - t0, time.process_time() - c0

    return read, n


def parallel_reader(root: Path, threads: int):
    """read() as raw_reader's, the tensors dealt out to `threads` threads (os.preadv into one reused buffer
    each; both release the GIL): the read a machine with that many cores can do, for --threads > 1."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    experts, start = _expert_tensors(root)
    bufs = [memoryview(bytearray(max(t.nbytes for t in experts))) for _ in range(threads)]
    pool = ThreadPoolExecutor(threads)

    def part(k: int, fd: int) -> None:
        for t in experts[k::threads]:
            os.preadv(fd, [bufs[k][:t.nbytes]], start + t.begin)

    def read() -> float:
        fd = os.open(experts[0].file, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            list(pool.map(lambda k: part(k, fd), range(threads)))
            return time.perf_counter() - t0
        finally:
            os.close(fd)

    return read


def before_report(root: Path, schemes: list[str]) -> None:
    """The weight-space report as it was before issue 16: one expert at a time read as float32,
    one matrix per kernel call, float64 statistics and norms, the old kernels."""
    import torch

    from moetool.arch import spec_from_config
    from moetool.forward.config import forward_config
    from moetool.forward.model import Experts, Names
    from moetool.forward.weights import WeightStore
    from moetool.tracing import _resolve_for_forward
    from test_quantize_report import old_score

    ckpt = _resolve_for_forward(str(root), None)
    spec = spec_from_config(ckpt.config, ckpt.config_path)
    fc = forward_config(spec, ckpt.config)
    store = WeightStore(ckpt.tensors, streaming=True)
    names = Names(store)
    for layer in spec.moe_layers:
        loader = Experts(store, names, layer, fc.family, spec.moe.expert_ffn, torch.float32, "cpu")
        for e in range(spec.moe.num_experts):
            gate, up, down, *_ = loader.load(e)
            old_score(schemes, {"gate": gate, "up": up, "down": down}, None, None, None)
            store.release()
    store.close()


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(): CPU time of this process says what the work costs when the
    machine is shared (wall time then includes waiting for a core)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    import argparse

    from moetool.quant.report import quantize_report
    from moetool.quant.schemes import SCHEMES

    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--no-before", action="store_true")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="no torch.compile kernels")
    ap.add_argument("--no-eager", action="store_true", help="no eager torch kernels")
    ap.add_argument("--experts", type=int, default=16, help="experts per layer of the timed checkpoint (16: 201 MB of "
                    "expert weights; 64: 805 MB, where the report's fixed costs weigh less, as on a real checkpoint)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, the native kernel's too (1: as the raw read, one thread; "
                    "the report's read-ahead thread comes on top; N > 1: the kernel's threads and the read-ahead share N "
                    "threads, and the ratios are also given against a read by N threads)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    schemes = args.schemes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / f"e{args.experts}"
        make(root, args.experts)
        read, nbytes = raw_reader(root)
        secs, cpu_secs = (min(x) for x in zip(*(read() for _ in range(5))))
        raw = nbytes / cpu_secs  # CPU time against CPU time: what each costs, however loaded the machine
        print(f"checkpoint: 4 layers x {args.experts} experts x 3 projections of 1024x512, {nbytes / 1e6:.0f} MB of bf16 expert weights")
        print(f"raw read of the expert tensors (page cache warm, best of 5): {nbytes / secs / 1e9:.2f} GB/s wall, "
              f"{raw / 1e9:.2f} GB/s CPU time; torch threads: {args.threads}")
        pread = parallel_reader(root, args.threads) if args.threads > 1 else None
        if pread is not None:
            print(f"raw read with {args.threads} threads (preadv, best of 5): "
                  f"{nbytes / min(pread() for _ in range(5)) / 1e9:.2f} GB/s wall; each report's wall ratio is also "
                  f"given against the best {args.threads}-thread read of its window ('x {args.threads}T')")
        print("weight-space report, MB/s of expert weights (x raw read); after: best of 5 reports, each after a raw "
              "read, the ratio against the best of those 5 reads (the same minutes of a machine whose speed moves); "
              "CPU time of this process")
        rows = [[s] for s in schemes] + ([schemes] if len(schemes) > 1 else [])
        import os

        from moetool.quant import kernels

        # mode -> environment: the native kernel (the default), eager torch kernels, inductor's
        env = {"native": {}, "eager": {"MOETOOL_QUANT_NATIVE": "0", "MOETOOL_QUANT_COMPILE": "0"},
               "compiled": {"MOETOOL_QUANT_NATIVE": "0", "MOETOOL_QUANT_COMPILE": "1"}}
        modes = ["native"] + ([] if args.no_eager else ["eager"]) + ([] if args.no_compile else ["compiled"])

        def use(mode):
            for k in ("MOETOOL_QUANT_NATIVE", "MOETOOL_QUANT_COMPILE"):
                os.environ.pop(k, None)
            os.environ.update(env[mode])

        if "compiled" in modes:  # build the fused kernels once (inductor), timed on its own
            use("compiled")
            t0 = time.perf_counter()
            quantize_report(str(root), schemes=schemes, weight_only=True)
            print(f"compiled kernels: first report (torch.compile of {len(schemes)} schemes + moments, wall, "
                  "inductor's on-disk cache as found): "
                  f"{time.perf_counter() - t0:.1f} s{'; compiling FAILED: ' + kernels._FAILED[0] if kernels._FAILED else ''}")
        for ss in rows:
            line = f"  {ss[0] if len(ss) == 1 else 'all ' + str(len(ss)):12s}"
            cpus = {}
            for mode in modes:
                use(mode)
                runs = [(read(), timed(lambda: quantize_report(str(root), schemes=ss, weight_only=True)),
                         pread() if pread is not None else None) for _ in range(5)]
                near_par = nbytes / min(r[2] for r in runs) if pread is not None else None
                runs = [r[:2] for r in runs]
                near = nbytes / min(r[1] for r, _ in runs)  # the raw read in this window (CPU time)
                near_wall = nbytes / min(r[0] for r, _ in runs)
                wall, cpu = min(w for _, (w, _) in runs), min(c for _, (_, c) in runs)
                cpus[mode] = cpu
                par = (f", {nbytes / wall / near_par:.3f} x {args.threads}T ({near_par / 1e9:.1f} GB/s)"
                       if near_par is not None else "")
                line += (f" {mode} wall {nbytes / wall / 1e6:7.1f} MB/s = {nbytes / wall / near_wall:.3f} x raw "
                         f"({near_wall / 1e9:.1f} GB/s){par}, CPU {nbytes / cpu / 1e6:7.1f} MB/s = "
                         f"{nbytes / cpu / near:.3f} x raw ({near / 1e9:.1f} GB/s);")
            use("native")
            if not args.no_before:
                bwall, bcpu = timed(lambda: before_report(root, ss))
                line += (f"   before: CPU time {nbytes / bcpu / 1e6:6.1f} MB/s = {nbytes / bcpu / raw:.3f} x raw; speed-up "
                         + ", ".join(f"{m} {bcpu / c:.1f}x" for m, c in cpus.items()))
            print(line, flush=True)
        if args.no_rss:
            return
        for name, e in (("e16", 16), ("e64", 64)):
            if not (Path(tmp) / name).exists():
                make(Path(tmp) / name, e)
            code = (f"import torch; torch.set_num_threads({args.threads}); from moetool.quant.report import quantize_report; "
                    f"quantize_report({str(Path(tmp) / name)!r}, schemes=['int4_g128'], weight_only=True)")
            r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True)
            rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
            size = (Path(tmp) / name / "model.safetensors").stat().st_size
            print(f"peak RSS, weight-space report, {name[1:]} experts/layer ({size / 1e6:.0f} MB file): {rss / 1e3:.0f} MB")


if __name__ == "__main__":
    main()
