"""Routing metrics: balance, confidence, reuse, co-activation, capacity drops. numpy only.

Every metric is defined, with its formula and source, in docs/metrics.md. Inputs per MoE layer:
`experts` [T, K] (best first), `probs` [T, E] the router's distribution over experts (rows sum to
1), `selection` [T, E] the scores top-k selection ranks (None: the margin metrics are null).

Example:
    >>> import numpy as np
    >>> m = layer_metrics(np.array([[0, 1], [0, 2], [0, 1]]), num_experts=4)
    >>> m["load"], m["dead_experts"]
    ([3, 2, 1, 0], [3])
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

COLD_ALPHA = 0.01  # family-wise, Bonferroni-corrected over the E experts
NEAR_TIE = 1e-3  # margin below this fraction of the selection-score scale counts as a near tie
TOP_PAIRS = 10

# Which direction is worse, for the summary's worst layer.
HIGHER_IS_WORSE = {"max_mean_ratio", "maxvio", "cv", "gini", "switch_balance_loss", "near_tie_rate",
                   "dead_count", "cold_count", "drop_rate"}
LOWER_IS_WORSE = {"load_entropy_norm"}
SUMMARISED = ["max_mean_ratio", "maxvio", "cv", "gini", "load_entropy_norm", "dead_count", "cold_count",
              "switch_balance_loss", "router_entropy_mean", "topk_mass_mean", "near_tie_rate", "reuse_first_choice",
              "reuse_any_overlap", "transition_nmi", "drop_rate"]


def load_vector(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Tokens routed to each expert: [E] ints summing to T x K."""
    return np.bincount(np.asarray(experts).reshape(-1), minlength=num_experts)[:num_experts]


def balance(load: np.ndarray) -> dict[str, Any]:
    E = len(load)
    total = int(load.sum())
    mean = total / E if E else 0.0
    if total == 0:
        return {"max_mean_ratio": None, "maxvio": None, "cv": None, "gini": None, "load_entropy_norm": None}
    shares = load / total
    nz = shares[shares > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    diffs = np.abs(load[:, None] - load[None, :]).sum()
    return {
        "max_mean_ratio": float(load.max() / mean),
        "maxvio": float(load.max() / mean - 1.0),
        "cv": float(load.std() / mean),
        "gini": float(diffs / (2 * E * total)),
        "load_entropy_norm": float(entropy / math.log(E)) if E > 1 else None,
    }


def binom_cdf(x: int, n: int, p: float) -> float:
    """P(X <= x) for X ~ Binomial(n, p), summed in log space (exact enough for any n here)."""
    if x < 0:
        return 0.0
    if x >= n or p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    ks = np.arange(0, x + 1)
    logc = np.array([math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) for k in ks])
    logpmf = logc + ks * math.log(p) + (n - ks) * math.log1p(-p)
    m = logpmf.max()
    return float(min(1.0, math.exp(m) * np.exp(logpmf - m).sum()))


def cold_experts(load: np.ndarray, tokens: int, k: int) -> list[int]:
    """Experts whose load is significantly below a uniform router's: under uniform routing each
    token picks a given expert with probability k/E, so its load ~ Binomial(T, k/E); flag experts
    with P(X <= load) < alpha / E (one-sided, Bonferroni over the E experts)."""
    E = len(load)
    p = k / E
    return [i for i, l in enumerate(load.tolist()) if binom_cdf(l, tokens, p) < COLD_ALPHA / E]


def router_confidence(probs: Optional[np.ndarray], experts: np.ndarray,
                      selection: Optional[np.ndarray]) -> dict[str, Any]:
    out = {"router_entropy_mean": None, "topk_mass_mean": None, "near_tie_rate": None, "switch_P": None}
    T, K = experts.shape
    if probs is not None and probs.size:
        E = probs.shape[1]
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)
        ent = -plogp.sum(axis=1)
        out["router_entropy_mean"] = float(ent.mean() / math.log(E)) if E > 1 else None
        out["topk_mass_mean"] = float(np.take_along_axis(probs, experts, axis=1).sum(axis=1).mean())
        out["switch_P"] = probs.mean(axis=0)
    if selection is not None and selection.size and selection.shape[1] > K:
        margins = token_margins(selection, K)
        finite = selection[np.isfinite(selection)]
        scale = float(finite.std()) if finite.size > 1 else 0.0
        out["near_tie_rate"] = float((margins < NEAR_TIE * scale).mean()) if scale > 0 else None
    return out


def token_margins(selection: np.ndarray, k: int) -> np.ndarray:
    """Per token: k-th best selection score minus the (k+1)-th (masked groups' -inf/NaN ignored)."""
    s = np.where(np.isfinite(selection), selection, -np.inf)
    top = -np.sort(-s, axis=1)[:, : k + 1]
    m = top[:, k - 1] - top[:, k]
    return np.where(np.isfinite(m), m, np.inf)


def reuse(experts: np.ndarray, num_experts: int) -> dict[str, Any]:
    T, K = experts.shape
    E = num_experts
    chance_first = 1.0 / E
    chance_any = 1.0 - math.comb(E - K, K) / math.comb(E, K) if E - K >= K else 1.0
    if T < 2:
        first = anyo = None
    else:
        first = float((experts[1:, 0] == experts[:-1, 0]).mean())
        sets = [set(row) for row in experts.tolist()]
        anyo = float(np.mean([bool(a & b) for a, b in zip(sets[:-1], sets[1:])]))
    return {"reuse_first_choice": first, "reuse_first_choice_chance": chance_first,
            "reuse_any_overlap": anyo, "reuse_any_overlap_chance": chance_any}


def coactivation(experts: np.ndarray, load: np.ndarray, top: int = TOP_PAIRS) -> list[dict[str, Any]]:
    """Pairs of experts chosen by the same token, most frequent first, with lift against
    independence: count / (T x (load_i / T) x (load_j / T))."""
    T, K = experts.shape
    if K < 2:
        return []
    counts: dict[tuple[int, int], int] = {}
    for row in experts.tolist():
        row = sorted(set(row))
        for a in range(len(row)):
            for b in range(a + 1, len(row)):
                key = (row[a], row[b])
                counts[key] = counts.get(key, 0) + 1
    pairs = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [{"experts": [i, j], "count": c, "lift": float(c * T / (load[i] * load[j]))} for (i, j), c in pairs]


def nmi(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Normalised mutual information (arithmetic mean of the entropies) of two labelings."""
    if len(a) == 0:
        return None
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    h = lambda p: float(-(p[p > 0] * np.log(p[p > 0])).sum())
    ha, hb = h(pa), h(pb)
    if ha + hb == 0:
        return None
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    return max(0.0, 2 * mi / (ha + hb))


def capacity_drops(experts: np.ndarray, num_experts: int, capacity_factor: float,
                   buckets: int = 4) -> dict[str, Any]:
    """Switch / GShard capacity: each expert takes at most C = ceil(CF x T x K / E) assignments;
    assignments are served in token-position order (slot order within a token), the rest dropped."""
    T, K = experts.shape
    cap = math.ceil(capacity_factor * T * K / num_experts)
    used = np.zeros(num_experts, dtype=int)
    dropped = np.zeros((T, K), dtype=bool)
    for t in range(T):
        for s in range(K):
            e = experts[t, s]
            if used[e] >= cap:
                dropped[t, s] = True
            else:
                used[e] += 1
    edges = np.linspace(0, T, buckets + 1).round().astype(int)
    by_pos = []
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a:
            by_pos.append({"start": int(a), "end": int(b), "drop_rate": float(dropped[a:b].mean())})
    return {"capacity_factor": capacity_factor, "capacity": cap, "drop_rate": float(dropped.mean()),
            "by_position": by_pos}


def layer_metrics(experts, num_experts: int, probs=None, selection=None, prev_first=None,
                  capacity_factor: Optional[float] = None) -> dict[str, Any]:
    """All metrics of one MoE layer (see docs/metrics.md)."""
    experts = np.asarray(experts, dtype=np.int64)
    T, K = experts.shape
    load = load_vector(experts, num_experts)
    m: dict[str, Any] = {"tokens": T, "load": load.tolist()}
    m.update(balance(load))
    dead = [i for i, l in enumerate(load.tolist()) if l == 0]
    cold = cold_experts(load, T, K) if T else []
    m.update({"dead_experts": dead, "dead_count": len(dead), "cold_experts": cold, "cold_count": len(cold)})
    conf = router_confidence(None if probs is None else np.asarray(probs, dtype=np.float64), experts,
                             None if selection is None else np.asarray(selection, dtype=np.float64))
    P = conf.pop("switch_P")
    f = load / (T * K) if T else None
    m["switch_balance_loss"] = float(num_experts * (f * P).sum()) if P is not None and f is not None else None
    m.update(conf)
    m.update(reuse(experts, num_experts))
    m["coactivation_top_pairs"] = coactivation(experts, load)
    m["transition_nmi"] = nmi(prev_first, experts[:, 0]) if prev_first is not None else None
    if capacity_factor is not None:
        drops = capacity_drops(experts, num_experts, capacity_factor)
        m["drop_rate"] = drops["drop_rate"]
        m["drop_rate_at_capacity"] = drops
    else:
        m["drop_rate"] = None
        m["drop_rate_at_capacity"] = None
    return m


def summarise(layers: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Mean over layers and the worst layer of each scalar metric."""
    out: dict[str, Any] = {}
    for name in SUMMARISED:
        vals = [(layer, m.get(name)) for layer, m in layers if m.get(name) is not None]
        if not vals:
            out[name] = {"mean": None, "min": None, "max": None, "worst_layer": None}
            continue
        xs = [v for _, v in vals]
        entry = {"mean": float(np.mean(xs)), "min": float(min(xs)), "max": float(max(xs)), "worst_layer": None}
        if name in HIGHER_IS_WORSE:
            entry["worst_layer"] = max(vals, key=lambda lv: lv[1])[0]
        elif name in LOWER_IS_WORSE:
            entry["worst_layer"] = min(vals, key=lambda lv: lv[1])[0]
        out[name] = entry
    return out
