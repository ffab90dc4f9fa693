"""Expert pruning: per-expert saliency from a workload profile, and a pruned safetensors checkpoint.

Criteria (per MoE layer, over the profiled tokens; higher = more salient, kept first):
- `frequency`: how many (token, slot) assignments the expert received (`load`).
- `weighted-frequency`: the sum of its gate weights over them.
- `reap`: REAP (Lasby et al., 2025, "REAP: Router-weighted Expert Activation Pruning"): the mean,
  over the tokens routed to the expert, of gate weight x L2 norm of the expert's output. Needs a
  profile made by `moetool profile` (it measures the output norms); 0 for an expert never routed.

The pruned checkpoint keeps the same number of experts `keep` in every MoE layer (config.json has
one expert count): the `keep` most salient of each layer, in their original order. Router rows
(and router bias / score-correction bias entries) of dropped experts are removed, per-expert
tensors renumbered, stacked expert tensors sliced ([E, ...], and DBRX's [E x F, D]). Such a model
routes exactly as the original would with the dropped experts masked out of the router (their
logits at -inf); tests check this against transformers. Group-limited routers (n_group > 1) keep
keep / n_group experts per group, so the group structure survives; their group scores can still
differ from the masked original's, and `prune` says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Optional

import numpy as np

from ..errors import MoetoolError

CRITERIA = ("reap", "frequency", "weighted-frequency")
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def saliency(stats, criterion: str) -> dict[int, np.ndarray]:
    if criterion not in CRITERIA:
        raise MoetoolError(f"--criterion must be one of {', '.join(CRITERIA)}")
    out = {}
    for l, s in stats.layers.items():
        if criterion == "frequency":
            out[l] = s.load.astype(np.float64)
        elif criterion == "weighted-frequency":
            out[l] = s.weight_sum.astype(np.float64)
        else:
            if not s.reap_count.any():
                raise MoetoolError("this profile has no expert-output norms (REAP); make one with `moetool profile`, "
                                   "or use --criterion frequency / weighted-frequency")
            out[l] = np.where(s.reap_count > 0, s.reap_sum / np.maximum(s.reap_count, 1), 0.0)
    return out


def choose(sal: dict[int, np.ndarray], keep: int, n_group: int = 1) -> dict[int, list[int]]:
    """The kept experts of each layer (ascending ids): the most salient; ties keep the lower id."""
    kept = {}
    for l, v in sal.items():
        E = len(v)
        if n_group > 1:
            size, per = E // n_group, keep // n_group
            ids = []
            for g in range(n_group):
                block = v[g * size:(g + 1) * size]
                ids += [g * size + int(i) for i in np.argsort(-block, kind="stable")[:per]]
        else:
            ids = [int(i) for i in np.argsort(-v, kind="stable")[:keep]]
        kept[l] = sorted(ids)
    return kept


def report_rows(stats, kept: Optional[dict[int, list[int]]]) -> list[dict]:
    rows = []
    reap = {l: (np.where(s.reap_count > 0, s.reap_sum / np.maximum(s.reap_count, 1), 0.0) if s.reap_count.any()
                else None) for l, s in stats.layers.items()}
    for l, s in stats.layers.items():
        for e in range(len(s.load)):
            rows.append({"layer": l, "expert": e, "frequency": int(s.load[e]),
                         "weighted_frequency": float(s.weight_sum[e]),
                         "reap": None if reap[l] is None else float(reap[l][e]),
                         "kept": None if kept is None else e in set(kept[l])})
    return rows


_PER_EXPERT = re.compile(r"^(.*\.experts\.)(\d+)(\..*)$")
# tensors indexed by expert along their first dimension: stacked experts, the router, its biases
_ROUTED = re.compile(r"\.experts(\.|_|$)|router|\.gate\.(weight|bias|e_score_correction_bias)$|"
                     r"e_score_correction_bias|\.gate_inp")


def _layer_of(name: str) -> Optional[int]:
    m = re.search(r"\.(?:layers|blocks)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def prune_checkpoint(src: str, dst: str, config: dict, kept: dict[int, list[int]], E: int, expert_ffn: int) -> dict:
    """Write the pruned checkpoint to `dst` (a new directory, written in a temp directory first and
    renamed into place). Returns {tensors_written, tensors_dropped, bytes}."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if os.path.exists(dst):
        raise MoetoolError(f"{dst} exists; name a new directory for the pruned checkpoint")
    parent = os.path.dirname(os.path.abspath(dst)) or "."
    if not os.access(parent, os.W_OK):
        raise MoetoolError(f"cannot write into {parent}")
    shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    if not shards:
        raise MoetoolError(f"{src}: no safetensors weights to prune")
    keep = len(next(iter(kept.values())))
    index = {}
    written = dropped = total = 0
    tmp = tempfile.mkdtemp(prefix=".moetool-prune-", dir=parent)
    try:
        for shard in shards:
            out = {}
            with safe_open(os.path.join(src, shard), "pt") as f:
                meta = f.metadata()
                for name in f.keys():
                    layer = _layer_of(name)
                    ids = kept.get(layer) if layer is not None else None
                    m = _PER_EXPERT.match(name)
                    if ids is not None and m:
                        e = int(m.group(2))
                        if e not in ids:
                            dropped += 1
                            continue
                        new = f"{m.group(1)}{ids.index(e)}{m.group(3)}"
                        out[new] = f.get_tensor(name)
                        continue
                    t = f.get_tensor(name)
                    if ids is not None and t.ndim >= 1 and _ROUTED.search(name):
                        sel = torch.tensor(ids)
                        if t.shape[0] == E:  # stacked experts, router rows, router / correction bias
                            t = t.index_select(0, sel).contiguous()
                        elif ".experts." in name and t.ndim == 2 and t.shape[0] == E * expert_ffn:  # DBRX [E*F, D]
                            t = t.view(E, expert_ffn, -1).index_select(0, sel).reshape(keep * expert_ffn, -1).contiguous()
                    out[name] = t
            for n, t in out.items():
                index[n] = shard
                total += t.numel() * t.element_size()
            written += len(out)
            save_file(out, os.path.join(tmp, shard), metadata=meta or {"format": "pt"})
        new_cfg = _pruned_config(config, keep)
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(new_cfg, fh, indent=2)
        if len(shards) > 1 or os.path.exists(os.path.join(src, "model.safetensors.index.json")):
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as fh:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, fh, indent=2)
        for f in os.listdir(src):  # tokenizer, generation config, chat template ...
            p = os.path.join(src, f)
            if os.path.isfile(p) and not f.endswith(".safetensors") and f not in ("config.json",
                                                                                 "model.safetensors.index.json"):
                shutil.copy2(p, os.path.join(tmp, f))
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"tensors_written": written, "tensors_dropped": dropped, "bytes": total}


def _pruned_config(config: dict, keep: int) -> dict:
    cfg = json.loads(json.dumps(config))
    hit = False
    for k in EXPERT_KEYS:
        if isinstance(cfg.get(k), int):
            cfg[k] = keep
            hit = True
    ffn = cfg.get("ffn_config")
    if isinstance(ffn, dict) and isinstance(ffn.get("moe_num_experts"), int):  # DBRX
        ffn["moe_num_experts"] = keep
        hit = True
    if not hit:
        raise MoetoolError("config.json names no expert count this pruner knows (num_local_experts, num_experts, "
                           "n_routed_experts, moe_num_experts)")
    return cfg
