"""GPU residency of individual experts under a memory budget, from a workload profile.

Which routed experts to keep on the GPU when not all fit (the rest stay in CPU memory and are
either computed there or fetched on use). The hit rate is the share of routed (token, slot)
assignments, over all MoE layers, whose expert is resident: it is what decides how many expert
bytes cross PCIe (or are computed from CPU memory) per token. Maximising it under a byte budget is
a knapsack; every expert of a layer has the same size, so taking experts in order of load per byte
is optimal when layers' experts have equal sizes (the usual case), and the standard greedy
otherwise.

The hit rate measured on the profile the plan was fitted on is optimistic; `holdout` (a profile of
other text of the same workload, e.g. another shard: `moetool profile` on it) gives the expected
hit rate on unseen traffic. For top-1 and top-2 routers the share of (token, layer) pairs whose
whole top-k set is resident ("full hits": no stall at all) follows exactly from the co-activation
counts; for k > 2 it is not determined by pairwise counts and is reported as null.

Example:
    >>> plan = pin_plan(stats, {1: 2_000_000, 2: 2_000_000}, budget=8_000_000)   # doctest: +SKIP
    >>> plan["hit_rate"], plan["resident"]                                       # doctest: +SKIP
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import MoetoolError


def _loads(stats, layers: list[int]) -> np.ndarray:
    return np.stack([stats.layers[l].load.astype(np.float64) for l in layers])  # [L, E]


def greedy_order(loads: np.ndarray, expert_bytes: np.ndarray) -> list[tuple[int, int]]:
    """(layer position, expert) in the order residency should be granted: load per byte, descending
    (ties: heavier load, then layer, then expert, for a deterministic plan)."""
    L, E = loads.shape
    density = loads / expert_bytes[:, None]
    keys = [(-density[i, e], -loads[i, e], i, e) for i in range(L) for e in range(E)]
    return [(i, e) for _, _, i, e in sorted(keys)]


def hit_rate(loads: np.ndarray, resident: np.ndarray) -> Optional[float]:
    total = loads.sum()
    return float((loads * resident).sum() / total) if total else None


def full_hit_rate(stats, layers: list[int], resident: np.ndarray) -> Optional[float]:
    """Share of (token, layer) pairs whose whole top-k set is resident (k <= 2: exact)."""
    k = stats.top_k
    hits = tokens = 0
    for i, l in enumerate(layers):
        s = stats.layers[l]
        tokens += s.tokens
        r = resident[i].astype(bool)
        if k == 1:
            hits += int(s.load[r].sum())
        elif k == 2:
            hits += int(s.coact[np.ix_(r, r)].sum() // 2)  # each token's pair counted at (i,j) and (j,i)
        else:
            return None
    return hits / tokens if tokens else None


def pin_plan(stats, expert_bytes: dict[int, int], budget: int, holdout=None, curve_points: int = 24) -> dict:
    """The residency plan under `budget` bytes. expert_bytes: bytes of one routed expert per MoE layer."""
    layers = list(stats.meta["moe_layers"])
    if sorted(expert_bytes) != sorted(layers):
        raise MoetoolError("the model's MoE layers do not match the profile's "
                           f"({sorted(expert_bytes)[:6]} vs {layers[:6]}): is this the profiled model?")
    if holdout is not None:
        if holdout.meta["moe_layers"] != layers or holdout.num_experts != stats.num_experts or \
                holdout.meta.get("fingerprint") != stats.meta.get("fingerprint"):
            raise MoetoolError("--holdout is a profile of a different model or configuration")
    if stats.tokens == 0:
        raise MoetoolError("the profile has no tokens")
    loads = _loads(stats, layers)
    ho = _loads(holdout, layers) if holdout is not None else None
    eb = np.array([expert_bytes[l] for l in layers], dtype=np.float64)
    L, E = loads.shape
    order = greedy_order(loads, eb)
    resident = np.zeros((L, E), dtype=np.int8)
    used = 0
    cum_bytes, cum_fit, cum_ho = [0], [0.0], [0.0]
    fit_total, ho_total = loads.sum(), (ho.sum() if ho is not None else 0)
    chosen_bytes = 0
    for i, e in order:
        used += int(eb[i])
        cum_bytes.append(used)
        cum_fit.append(cum_fit[-1] + loads[i, e] / fit_total)
        cum_ho.append(cum_ho[-1] + (ho[i, e] / ho_total if ho is not None and ho_total else 0.0))
        if used <= budget:
            resident[i, e] = 1
            chosen_bytes = used
    all_bytes = int(eb.sum() * E)
    budgets = sorted(set(np.linspace(0, all_bytes, curve_points).astype(np.int64).tolist() + [min(budget, all_bytes)]))
    curve = []
    cb = np.array(cum_bytes)
    for b in budgets:
        n = int(np.searchsorted(cb, b, side="right") - 1)  # experts that fit in b, in greedy order
        curve.append({"budget_bytes": int(b), "experts": n, "hit_rate": float(min(1.0, cum_fit[n])),
                      "hit_rate_holdout": float(min(1.0, cum_ho[n])) if ho is not None else None})
    fit = hit_rate(loads, resident)
    out = {
        "budget_bytes": int(budget), "resident_bytes": int(chosen_bytes), "all_experts_bytes": all_bytes,
        "resident_experts": int(resident.sum()), "experts_total": L * E,
        "hit_rate": fit, "hit_rate_holdout": hit_rate(ho, resident) if ho is not None else None,
        "full_hit_rate": full_hit_rate(stats, layers, resident),
        "full_hit_rate_holdout": full_hit_rate(holdout, layers, resident) if holdout is not None else None,
        "tokens": stats.tokens, "holdout_tokens": holdout.tokens if holdout is not None else None,
        "layers": [{"layer": l, "expert_bytes": int(eb[i]), "resident": np.flatnonzero(resident[i]).tolist(),
                    "hit_rate": hit_rate(loads[i:i + 1], resident[i:i + 1]),
                    "hit_rate_holdout": hit_rate(ho[i:i + 1], resident[i:i + 1]) if ho is not None else None}
                   for i, l in enumerate(layers)],
        "curve": curve,
    }
    return out
