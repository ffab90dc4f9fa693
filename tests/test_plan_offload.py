"""`moetool plan offload`: never over budget, every tensor listed once, flags that say what the plan
says, a device_map that covers the transformers model exactly, and the estimate's arithmetic."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from safetensors import safe_open


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetool", *args], capture_output=True, text=True, timeout=300)


def plan_json(*args: str) -> dict:
    r = run_cli("plan", "offload", *args, "--json")
    assert r.returncode in (0, 1), r.stderr
    out = json.loads(r.stdout)
    assert out["schema_version"] == 1 and out["command"] == "plan offload"
    return out


def header_tensors(d) -> dict[str, int]:
    out = {}
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "np") as h:
            for name in h.keys():
                t = h.get_slice(name)
                out[name] = t.get_shape()
    return out


def library_plan(d, vram: int) -> dict:
    """The plan through the library (the sweep below would cost a process start per budget)."""
    from moetool.arch import spec_from_config
    from moetool.counting import count
    from moetool.plans.offload import items_from_checkpoint, offload_plan
    from moetool.source import resolve

    ckpt = resolve(str(d))
    spec = spec_from_config(ckpt.config, ckpt.config_path)
    items, _ = items_from_checkpoint(ckpt, spec)
    kv = count(ckpt, context=4096, use_headers=False).kv_cache["bytes"]
    return offload_plan(items, spec, vram=vram, ram=None, kv_bytes=kv, kv_per_step=kv, context=4096, reserve=0)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_offload_budgets_and_tensor_list(tiny_checkpoint, family):
    import numpy as np

    d, _ = tiny_checkpoint(family)
    names = header_tensors(d)
    full = plan_json(str(d), "--vram", "1GB", "--reserve", "0")  # everything fits (and the CLI agrees)
    weights = sum(t["bytes"] for t in full["tensors"])
    assert sorted(t["name"] for t in full["tensors"]) == sorted(names)  # every stored tensor exactly once
    assert full == {**full, **{k: v for k, v in library_plan(d, 10**9).items() if not k.startswith("_")}}
    kv = full["kv_cache_bytes"]
    L = len(full["layers"])
    # sweep budgets from "barely the non-expert part" to "everything": never over, monotone in experts on GPU
    prev = -1
    for vram in np.linspace(weights * 0.2 + kv, weights + kv, 13).astype(int):
        p = library_plan(d, int(vram))
        assert p["gpu_bytes"] <= vram
        gpu_w = sum(t["bytes"] for t in p["tensors"] if t["device"] == "gpu")
        cpu_w = sum(t["bytes"] for t in p["tensors"] if t["device"] == "cpu")
        assert gpu_w + cpu_w == weights and cpu_w == p["cpu_bytes"]
        kv_gpu = kv if p["gpu_layers"] == L else kv * p["gpu_layers"] // L
        assert p["gpu_bytes"] == gpu_w + kv_gpu
        assert p["expert_layers_on_gpu"] >= prev
        prev = p["expert_layers_on_gpu"]
        # --n-cpu-moe N: experts of layers < N on the CPU, the rest on the GPU; the -ot regex names exactly those
        if p["gpu_layers"] == L:
            n = p["n_cpu_moe"]
            for l in p["layers"]:
                if l["expert_bytes"]:
                    assert l["expert_device"] == ("cpu" if l["layer"] < n else "gpu")
        m = re.search(r'-ot "([^"]+)=CPU"', p["llama_cpp_override"])
        rx = re.compile(m.group(1)) if m else None
        for l in p["layers"]:
            if not l["expert_bytes"]:
                continue  # a dense layer has no *_exps tensors to match
            for proj in ("ffn_up_exps", "ffn_gate_exps", "ffn_down_exps"):
                hit = bool(rx and rx.search(f"blk.{l['layer']}.{proj}.weight"))
                assert hit == (l["expert_device"] == "cpu"), (l, p["llama_cpp_override"])
            assert not (rx and rx.search(f"blk.{l['layer']}.attn_q.weight"))
    assert prev == sum(1 for l in full["layers"] if l["expert_bytes"])


def test_offload_estimate_arithmetic(tiny_checkpoint):
    d, _ = tiny_checkpoint("mixtral")
    p = plan_json(str(d), "--vram", "1GB", "--reserve", "0", "--gpu-bandwidth", "100GB", "--cpu-bandwidth", "10GB")
    cfg = json.loads((d / "config.json").read_text())
    E, k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    gpu = p["kv_cache_bytes"]
    for t in p["tensors"]:
        if t["group"] == "embedding":
            continue  # a lookup, not a read of the whole matrix
        share = k / E if t["group"] == "routed_experts" else 1.0
        gpu += t["bytes"] * share
    assert p["estimate"]["llama_cpp_tokens_per_s"] == pytest.approx(1 / (gpu / 100e9), rel=1e-6)


def test_offload_device_map_covers_the_model(tiny_checkpoint, tmp_path):
    import torch
    import transformers

    d, _ = tiny_checkpoint("qwen3_moe")
    weights = plan_json(str(d), "--vram", "1GB", "--reserve", "0")
    expert = sum(t["bytes"] for t in weights["tensors"] if t["group"] == "routed_experts")
    vram = sum(t["bytes"] for t in weights["tensors"]) + weights["kv_cache_bytes"] - expert // 2
    r = run_cli("plan", "offload", str(d), "--vram", str(vram), "--reserve", "0", "--device-map", str(tmp_path / "dm.json"))
    assert r.returncode == 0, r.stderr
    dm = json.loads((tmp_path / "dm.json").read_text())
    cfg = transformers.AutoConfig.from_pretrained(str(d))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    params = [n for n, _ in model.named_parameters()]
    for n in params:  # every parameter is under exactly one key
        owners = [k for k in dm if n == k or n.startswith(k + ".")]
        assert len(owners) == 1, (n, owners)
    assert set(dm.values()) == {0, "cpu"}
    plan = plan_json(str(d), "--vram", str(vram), "--reserve", "0")
    for l in plan["layers"]:
        keys = [k for k in dm if re.search(rf"\.layers\.{l['layer']}\..*experts$", k)]
        assert keys and all(dm[k] == (0 if l["expert_device"] == "gpu" else "cpu") for k in keys)


def test_offload_table_and_bad_input():
    r = run_cli("plan", "offload", "mixtral-8x7b", "--vram", "24GB", "--context", "8k")
    assert r.returncode == 0, r.stderr
    assert "--n-cpu-moe" in r.stdout and "tokens/s" in r.stdout
    for args, needle in ((["--vram", "lots"], "cannot read 'lots'"), (["--context", "x"], "--context"),
                         (["--format", "fp3"], "--format must be one of")):
        r = run_cli("plan", "offload", "mixtral-8x7b", *args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
