"""What fits where: GPU / CPU placement of every tensor under a VRAM budget, as llama.cpp flags
and a transformers/accelerate device_map, with a decode-speed estimate.

Bytes are exact: from the safetensors headers when the checkpoint has weights (every stored
tensor, scales included), else from config.json and a storage format (formats.py). The placement
follows what the runtimes can do:

1. GPU first holds a reserve (CUDA context and compute buffers, `--reserve`), the KV cache of
   `--context` x `--batch`, and every non-expert tensor of every layer plus the final norm and LM
   head. The input embedding stays in CPU memory (a row lookup per token; llama.cpp does the same).
   If that alone does not fit, whole layers move to the CPU from the first layer on (llama.cpp
   `-ngl N` keeps the last N layers on the GPU) and all routed experts stay on the CPU.
2. The routed experts of the last MoE layers take the VRAM left, one whole layer at a time (both
   runtimes move an expert layer as one stacked tensor / module): llama.cpp `--n-cpu-moe N` keeps
   the experts of layers 0..N-1 on the CPU.

Decode estimate (memory-bound roofline: every step reads the weights it uses once; compute, PCIe
latency and kernel overheads are ignored, so it is an upper bound). Per step of B tokens, each MoE
layer reads the distinct experts its B tokens chose: k for B = 1; with a profile,
sum_e 1 - (1 - p_e)^B with p_e the measured share of tokens choosing e (without one, p_e = k/E).
- llama.cpp: CPU-resident experts are computed on the CPU from RAM:
  t = bytes_on_gpu / gpu_bandwidth + bytes_on_cpu / cpu_bandwidth.
- accelerate offload: CPU-resident modules are copied to the GPU whole on every forward:
  t = bytes_on_gpu / gpu_bandwidth + offloaded_module_bytes / pcie_bandwidth.
tokens/s = B / t. Bandwidth defaults (overridable): GPU 1000 GB/s (an RTX 4090 is ~1008 GB/s, an
H100 SXM ~3350), CPU 60 GB/s (dual-channel DDR5), PCIe 25 GB/s (PCIe 4.0 x16 in practice).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ..errors import MoetoolError

GPU_BW, CPU_BW, PCIE_BW = 1000e9, 60e9, 25e9
RESERVE = 1 << 30


@dataclass
class Item:
    name: str
    group: str
    layer: Optional[int]
    nbytes: int
    expert: bool


def items_from_checkpoint(ckpt, spec) -> tuple[list[Item], list[str]]:
    """Every stored tensor once (headers), grouped by role; MTP copies are not loaded by the runtimes."""
    from ..names import classify

    items, notes = [], []
    mtp = 0
    for t in ckpt.tensors.values():
        role = classify(t.name, dtype=t.dtype, num_layers=spec.num_layers)
        if role.group == "mtp" or (role.layer is not None and role.layer >= spec.num_layers):
            mtp += t.end - t.begin
            continue
        expert = role.group == "routed_experts" or ".experts." in t.name or t.name.endswith((".experts", "_exps"))
        items.append(Item(t.name, role.group, role.layer, t.end - t.begin, expert))
    if mtp:
        notes.append(f"multi-token-prediction layers ({mtp:,} bytes) are not loaded by llama.cpp or transformers; left out")
    return items, notes


def items_from_config(spec, fmt: str) -> list[Item]:
    from ..formats import param_bytes

    return [Item(p.name, p.group, p.layer, param_bytes(p, fmt), p.group == "routed_experts")
            for p in spec.params if p.group != "mtp"]


def _distinct(load, tokens: int, batch: int, E: int, k: int) -> float:
    if load is None or not tokens:
        return E * (1 - (1 - k / E) ** batch)
    return float(sum(1 - (1 - min(1.0, l / tokens)) ** batch for l in load))


def offload_plan(items: list[Item], spec, *, vram: int, ram: Optional[int], kv_bytes: int, kv_per_step: int,
                 context: int, batch: int = 1, reserve: int = RESERVE, stats=None, gpu_bw: float = GPU_BW,
                 cpu_bw: float = CPU_BW, pcie_bw: float = PCIE_BW) -> dict:
    if vram <= 0:
        raise MoetoolError("--vram must be positive")
    L = spec.num_layers
    E = spec.moe.num_experts if spec.moe else 1
    k = spec.moe.top_k if spec.moe else 1
    nonexp = [0] * L
    exp = [0] * L
    glob = {"embedding": 0, "head": 0}
    for it in items:
        if it.layer is None:
            glob["embedding" if it.group == "embedding" else "head"] += it.nbytes
        elif it.expert:
            exp[it.layer] += it.nbytes
        else:
            nonexp[it.layer] += it.nbytes
    fixed = reserve + kv_bytes
    notes = []
    # 1. layers on the GPU (non-expert parts); the output layer joins them only when all fit (llama.cpp)
    gpu_layers = L
    need = fixed + glob["head"] + sum(nonexp)
    if need > vram:
        per_layer_kv = kv_bytes / L if L else 0
        used = reserve
        gpu_layers = 0
        for i in reversed(range(L)):
            if used + nonexp[i] + per_layer_kv > vram:
                break
            used += nonexp[i] + per_layer_kv
            gpu_layers += 1
        notes.append(f"the non-expert weights and the KV cache alone need {need:,} bytes, more than --vram: only the "
                     f"last {gpu_layers} of {L} layers run on the GPU, every routed expert stays in CPU memory")
    all_on_gpu = need <= vram  # every layer and the output layer: only then do routed experts get VRAM
    on_gpu_layer = [i >= L - gpu_layers for i in range(L)]
    kv_gpu = kv_bytes if gpu_layers == L else (kv_bytes * gpu_layers // L if L else 0)
    gpu_used = reserve + (glob["head"] if all_on_gpu else 0) + kv_gpu + sum(nonexp[i] for i in range(L) if on_gpu_layer[i])
    # 2. routed experts of the last MoE layers into what is left
    moe_layers = [i for i in range(L) if exp[i]]
    experts_gpu = [False] * L
    n_cpu_moe = 0
    if all_on_gpu:
        free = vram - gpu_used
        for i in reversed(moe_layers):
            if exp[i] > free:
                n_cpu_moe = i + 1
                break
            free -= exp[i]
            experts_gpu[i] = True
    else:
        n_cpu_moe = L
    gpu_total = gpu_used + sum(exp[i] for i in range(L) if experts_gpu[i])
    if gpu_total > vram:  # the reserve alone does not fit
        raise MoetoolError(f"--vram {vram:,} bytes cannot hold even the reserve ({reserve:,} bytes); lower --reserve")
    cpu_total = glob["embedding"] + (0 if all_on_gpu else glob["head"]) + sum(nonexp[i] for i in range(L) if not on_gpu_layer[i]) + \
        sum(exp[i] for i in range(L) if not experts_gpu[i])
    fits_ram = ram is None or cpu_total <= ram
    if not fits_ram:
        notes.append(f"CPU-side weights ({cpu_total:,} bytes) exceed --ram: llama.cpp would page them from disk "
                     "(mmap); the estimate below assumes RAM speed and is far too high")
    # 3. flags
    cpu_moe_layers = [i for i in moe_layers if not experts_gpu[i]]
    ngl = L + 1 if all_on_gpu else gpu_layers  # + 1: the output layer too
    flags = [f"-ngl {ngl}"]
    ot = None
    if cpu_moe_layers and all_on_gpu:
        flags.append(f"--n-cpu-moe {n_cpu_moe}")
        ot = "blk\\.(" + "|".join(map(str, cpu_moe_layers)) + ")\\.ffn_.*_exps\\.=CPU"
    elif cpu_moe_layers:
        ot = "\\.ffn_.*_exps\\.=CPU"
    llama_cpp = " ".join(flags)
    llama_cpp_ot = f"-ngl {ngl} -ot \"{ot}\"" if ot else f"-ngl {ngl}"
    # 4. estimate
    per_step_gpu = per_step_cpu = pcie = 0.0
    loads = {}
    if stats is not None:
        loads = {l: stats.layers[l].load for l in stats.meta["moe_layers"]}
    distinct = {}
    for i in range(L):
        active_nonexp = nonexp[i]
        if on_gpu_layer[i]:
            per_step_gpu += active_nonexp
        else:
            per_step_cpu += active_nonexp
        if exp[i]:
            d = min(E, _distinct(loads.get(i), stats.tokens if stats is not None else 0, batch, E, k))
            distinct[i] = d
            read = exp[i] / E * d
            if experts_gpu[i]:
                per_step_gpu += read
            else:
                per_step_cpu += read
                pcie += exp[i]
    if all_on_gpu:
        per_step_gpu += glob["head"]
    else:
        per_step_cpu += glob["head"]
    per_step_gpu += kv_per_step * gpu_layers / L
    per_step_cpu += kv_per_step * (1 - gpu_layers / L)
    t_llama = per_step_gpu / gpu_bw + per_step_cpu / cpu_bw
    # accelerate: offloaded expert modules cross PCIe whole each forward (only modelled when every
    # non-expert part is on the GPU)
    t_acc = per_step_gpu / gpu_bw + pcie / pcie_bw if all_on_gpu else None
    layers = [{"layer": i, "non_expert_bytes": nonexp[i], "non_expert_device": "gpu" if on_gpu_layer[i] else "cpu",
               "expert_bytes": exp[i], "expert_device": ("gpu" if experts_gpu[i] else "cpu") if exp[i] else None,
               "distinct_experts_per_step": distinct.get(i)} for i in range(L)]
    dev = lambda it: ("cpu" if it.group == "embedding" or not all_on_gpu else "gpu") if it.layer is None else \
        ("gpu" if (experts_gpu[it.layer] if it.expert else on_gpu_layer[it.layer]) else "cpu")
    return {
        "vram_bytes": vram, "ram_bytes": ram, "reserve_bytes": reserve, "context": context, "batch": batch,
        "kv_cache_bytes": kv_bytes, "gpu_bytes": gpu_total, "cpu_bytes": cpu_total, "fits_vram": gpu_total <= vram,
        "fits_ram": fits_ram, "gpu_layers": gpu_layers, "n_cpu_moe": n_cpu_moe,
        "expert_layers_on_gpu": sum(experts_gpu), "expert_layers": len(moe_layers),
        "llama_cpp": llama_cpp, "llama_cpp_override": llama_cpp_ot,
        "estimate": {
            "model": "memory-bound roofline: each decode step reads every weight it uses once (k distinct experts per "
                     "MoE layer at batch 1; with a profile, the expected distinct experts of the batch); compute, "
                     "latency and overheads ignored: an upper bound",
            "gpu_bandwidth": gpu_bw, "cpu_bandwidth": cpu_bw, "pcie_bandwidth": pcie_bw,
            "bytes_per_step_gpu": int(per_step_gpu), "bytes_per_step_cpu": int(per_step_cpu),
            "llama_cpp_tokens_per_s": batch / t_llama if t_llama > 0 else None,
            "accelerate_tokens_per_s": (batch / t_acc) if t_acc else None,
            "from_profile": stats is not None,
        },
        "layers": layers,
        "tensors": [{"name": it.name, "group": it.group, "layer": it.layer, "bytes": it.nbytes, "device": dev(it)}
                    for it in items],
        "notes": notes,
        "_experts_gpu": experts_gpu, "_on_gpu_layer": on_gpu_layer,
    }


def device_map(config: dict, plan: dict) -> tuple[Optional[dict], Optional[str]]:
    """A transformers/accelerate device_map with the plan's placement, keyed by the real module
    names of the transformers model (built on the meta device: no memory, no weights). None and a
    reason when transformers is not installed or cannot build the model."""
    try:
        import torch
        import transformers
    except ImportError:
        return None, "install transformers for the accelerate device_map (pip install 'moetool[transformers]')"
    try:
        cfg = transformers.AutoConfig.for_model(**config) if "model_type" in config else None
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # any failure of an optional third-party build: say so, keep the plan
        return None, f"transformers could not build this model on the meta device ({e.__class__.__name__}); no device_map"
    experts_gpu, on_gpu_layer = plan["_experts_gpu"], plan["_on_gpu_layer"]
    out: dict[str, object] = {}
    for name, _ in model.named_parameters():
        m = re.search(r"\.layers\.(\d+)\.", name)
        parts = name.split(".")
        if ".experts." in name or parts[-2:-1] == ["experts"]:
            key = name[: name.index(".experts") + len(".experts")]
            layer = int(m.group(1)) if m else None
            on = experts_gpu[layer] if layer is not None and layer < len(experts_gpu) else True
        else:
            key = ".".join(parts[:-1]) or name
            layer = int(m.group(1)) if m else None
            if layer is None:
                on = "embed" not in key
            else:
                on = on_gpu_layer[layer] if layer < len(on_gpu_layer) else True
        out[key] = 0 if on else "cpu"
    return out, None
