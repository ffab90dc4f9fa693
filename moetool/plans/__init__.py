"""Plans in the runtime's own terms, from exact checkpoint bytes and measured routing (docs/plans.md).

- `eplb_plan`: expert-parallel placement (DeepSeek's EPLB) with balancedness before/after and
  exports for SGLang, TensorRT-LLM and vLLM.
- `pin_plan` (pin.py): per-expert GPU residency under a budget, hit-rate curve, held-out hit rate.
- `offload_plan` (offload.py): what fits where, llama.cpp flags and an accelerate device_map.
- prune.py, whatif.py: expert pruning and top-k what-ifs.

Every plan is a JSON-ready dict with `schema_version` and `command`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ..errors import MoetoolError

SCHEMA_VERSION = 1


def load_profile(path: str):
    """A `moetool profile` directory, or a `trace --json` report (one prompt or many) as a profile."""
    import json
    import os

    from ..profile.stats import ProfileStats

    if os.path.isdir(path):
        return ProfileStats.load(path)
    from ..files import read_bounded

    raw = read_bounded(path, "profile or trace report")
    try:
        d = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise MoetoolError(f"{path}: neither a profile directory nor a JSON report ({str(e)[:80]})") from None
    if not isinstance(d, dict) or d.get("command") != "trace":
        raise MoetoolError(f"{path}: expected a `moetool profile` directory or a `moetool trace --json` report")
    prompts = d.get("prompts") or [d]
    try:
        layers = [l["layer"] for l in prompts[0]["layers"]]
        stats = ProfileStats.empty(d["num_experts"], d["top_k"], layers, model=d.get("model", ""),
                                   model_type=d.get("model_type", ""))
        for p in prompts:
            prev = None
            for l in p["layers"]:
                e = np.asarray(l["experts"], dtype=np.int64)
                stats.add(l["layer"], e, np.asarray(l["weights"], dtype=np.float64),
                          token_ids=[t["id"] for t in p["tokens"]], prev_experts=prev)
                prev = e
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise MoetoolError(f"{path}: malformed trace report ({e.__class__.__name__}: {str(e)[:80]})") from None
    return stats


def model_spec(model: Optional[str], stats=None, revision: Optional[str] = None, read_headers: bool = False):
    """(ModelSpec, source name) of --model, or of the model the profile was made with."""
    from ..arch import spec_from_config
    from ..source import resolve

    name = model or (stats.meta.get("model") if stats is not None else None)
    if not name:
        raise MoetoolError("name the model with --model (the profile does not say which model it is)")
    try:
        ckpt = resolve(name, revision=revision, read_headers=read_headers)
    except MoetoolError as e:
        if model is None:
            raise MoetoolError(f"the profile's model {name!r} cannot be found ({e}); name it with --model") from None
        raise
    spec = spec_from_config(ckpt.config, ckpt.config_path)
    if stats is not None:
        if spec.moe is None or spec.moe.num_experts != stats.num_experts or spec.moe.top_k != stats.top_k \
                or spec.moe_layers != list(stats.meta["moe_layers"]):
            raise MoetoolError(f"{name}: not the profiled model (experts, top-k or MoE layers differ)")
    return spec, ckpt


def expert_bytes(spec, fmt: str) -> dict[int, int]:
    """Bytes of one routed expert in each MoE layer, weights in `fmt` (biases bf16; formats.py)."""
    from ..formats import param_bytes

    out: dict[int, int] = {}
    for p in spec.params:
        if p.group == "routed_experts":
            out[p.layer] = out.get(p.layer, 0) + param_bytes(dataclasses.replace(p, copies=1), fmt)
    return out


# --- EPLB ----------------------------------------------------------------------------------------

def eplb_plan(stats, spec, ranks: int, redundant: int = 0, nodes: int = 1, groups: Optional[int] = None) -> dict:
    from .eplb import balancedness, contiguous, gpu_loads, rebalance

    layers = list(stats.meta["moe_layers"])
    E = stats.num_experts
    if ranks < 1 or redundant < 0 or nodes < 1:
        raise MoetoolError("--ranks and --nodes must be >= 1, --redundant >= 0")
    if groups is None:
        groups = spec.moe.router.n_group if spec.moe.router.n_group > 1 else 1
    weight = np.stack([stats.layers[l].load for l in layers]).astype(np.float64)
    if stats.tokens == 0:
        raise MoetoolError("the profile has no tokens")
    placement = rebalance(weight, E + redundant, groups, nodes, ranks)
    after = gpu_loads(weight, placement)
    before = gpu_loads(weight, contiguous(len(layers), E, ranks)) if E % ranks == 0 else None
    b_after = balancedness(after)
    b_before = balancedness(before) if before is not None else None
    policy = ("hierarchical" if groups >= 1 and E % groups == 0 and groups % nodes == 0 and (E + redundant) % nodes == 0
              and not (groups == 1 and nodes == 1) else "global")
    return {
        "schema_version": SCHEMA_VERSION, "command": "plan eplb", "model": stats.meta.get("model"),
        "num_experts": E, "top_k": stats.top_k, "tokens": stats.tokens, "ranks": ranks, "nodes": nodes,
        "groups": groups, "redundant": redundant, "physical_experts": E + redundant,
        "slots_per_rank": (E + redundant) // ranks, "policy": policy,
        "balancedness_before": float(b_before.mean()) if b_before is not None else None,
        "balancedness_after": float(b_after.mean()),
        "layers": [{"layer": l,
                    "balancedness_before": float(b_before[i]) if b_before is not None else None,
                    "balancedness_after": float(b_after[i]),
                    "rank_load_before": before[i].tolist() if before is not None else None,
                    "rank_load_after": after[i].tolist(),
                    "physical_to_logical": placement.physical_to_logical[i].tolist(),
                    "replicas": placement.replica_count[i].tolist()}
                   for i, l in enumerate(layers)],
        "_placement": placement, "_num_layers": spec.num_layers, "_moe_layers": layers,
    }


def _full_layer_map(plan: dict) -> list[list[int]]:
    """physical_to_logical for every decoder layer (engines index all layers; dense layers get
    the default placement: slot s holds expert s mod E)."""
    E, P = plan["num_experts"], plan["physical_experts"]
    by_layer = {l["layer"]: l["physical_to_logical"] for l in plan["layers"]}
    return [by_layer.get(i, [s % E for s in range(P)]) for i in range(plan["_num_layers"])]


def export_sglang(plan: dict) -> dict:
    """SGLang `--init-expert-location FILE.json` (with `--ep-num-redundant-experts`): the
    physical-to-logical map, one row per decoder layer."""
    return {"physical_to_logical_map": _full_layer_map(plan)}


def export_sglang_counts(stats, spec) -> dict:
    """SGLang's other accepted form: `logical_count` [layers, experts], from which SGLang runs EPLB itself."""
    rows = [stats.layers[l].load.tolist() if l in stats.layers else [0] * stats.num_experts
            for l in range(spec.num_layers)]
    return {"logical_count": rows}


def export_trtllm(plan: dict) -> str:
    """TensorRT-LLM MoE load balancer config (YAML): `num_slots` and `initial_global_assignments`
    (decoder layer -> the logical expert in each slot)."""
    lines = ["moe_config:", "  load_balancer:", f"    num_slots: {plan['physical_experts']}",
             "    initial_global_assignments:"]
    for l in plan["layers"]:
        lines.append(f"      {l['layer']}: [{', '.join(map(str, l['physical_to_logical']))}]")
    return "\n".join(lines) + "\n"


def vllm_flags(plan: dict) -> str:
    """vLLM rebalances online from its own counts; it takes the redundancy, not a static map."""
    return (f"--enable-expert-parallel --enable-eplb --eplb-config "
            f"'{{\"num_redundant_experts\": {plan['redundant']}}}'")


def public(plan: dict) -> dict:
    return {k: v for k, v in plan.items() if not k.startswith("_")}
