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
    """P(X <= x) for X ~ Binomial(n, p), summed in log space. The pmf terms come from the ratio
    pmf(j-1) / pmf(j) = j (1-p) / ((n-j+1) p) (numpy, no Python loop), so loads of millions of
    tokens (profiles) cost milliseconds."""
    if x < 0:
        return 0.0
    if x >= n or p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    log_x = (math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(n - x + 1) + x * math.log(p)
             + (n - x) * math.log1p(-p))
    j = np.arange(1, x + 1, dtype=np.float64)
    log_ratio = np.log(j) + math.log1p(-p) - np.log(n - j + 1) - math.log(p)
    logpmf = log_x + np.append(np.cumsum(log_ratio[::-1])[::-1], 0.0)  # k = 0..x
    m = logpmf.max()
    return float(min(1.0, math.exp(m) * np.exp(logpmf - m).sum()))


def cold_experts(load: np.ndarray, tokens: int, k: int) -> list[int]:
    """Experts whose load is significantly below a uniform router's: under uniform routing each
    token picks a given expert with probability k/E, so its load ~ Binomial(T, k/E); flag experts
    with P(X <= load) < alpha / E (one-sided, Bonferroni over the E experts)."""
    E = len(load)
    p = k / E
    # a load at or above the mean is at or above the median (Kaas and Buhrman 1980): P >= 1/2, not cold
    return [i for i, l in enumerate(load.tolist()) if l < tokens * p and binom_cdf(l, tokens, p) < COLD_ALPHA / E]


def token_margins(selection: np.ndarray, k: int) -> np.ndarray:
    """Per token: k-th best selection score minus the (k+1)-th (masked groups' -inf/NaN ignored)."""
    s = np.where(np.isfinite(selection), selection, -np.inf)
    top = -np.sort(-s, axis=1)[:, : k + 1]
    m = top[:, k - 1] - top[:, k]
    return np.where(np.isfinite(m), m, np.inf)


def nmi(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Normalised mutual information (arithmetic mean of the entropies) of two labelings."""
    if len(a) == 0:
        return None
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(joint, (ai, bi), 1)
    return nmi_from_joint(joint)


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


def sample_adequacy(tokens: int, num_experts: int, k: int) -> dict[str, Any]:
    """How far a sample of `tokens` tokens can be trusted (docs/profile.md). Under a uniform
    router an expert is missed by one token with probability 1 - k/E: `p_dead_by_chance` is the
    chance that a given expert is never chosen at all, `expected_dead_by_chance` how many of the E
    would look dead anyway. `dead_judgeable` is whether a load of 0 is significant (the same
    one-sided binomial test as `cold_experts`); `min_tokens_dead` is the sample that makes it so.
    `min_tokens_load_5pct`: tokens for a relative standard error of 5 % on one expert's load
    (Binomial(T, k/E)); `min_tokens_pairs_5pct`: the same for one co-activation pair count."""
    E, K, T = num_experts, k, tokens
    miss = 1.0 - K / E if E else 0.0
    p_dead = miss ** T if miss > 0 else 0.0
    need_dead = math.ceil(math.log(COLD_ALPHA / E) / math.log(miss)) if 0 < miss < 1 else 0
    p = K / E if E else 1.0
    pp = K * (K - 1) / (E * (E - 1)) if E > 1 and K > 1 else 0.0
    rse = lambda q: math.ceil((1 - q) / (q * 0.05 ** 2)) if 0 < q < 1 else 0
    return {"tokens": T, "p_dead_by_chance": p_dead, "expected_dead_by_chance": E * p_dead,
            "dead_judgeable": T >= need_dead, "min_tokens_dead": need_dead, "min_tokens_load_5pct": rse(p),
            "min_tokens_pairs_5pct": rse(pp) if pp else None}


def metrics_from_sums(s) -> dict[str, Any]:
    """All metrics of one MoE layer from its sums (`moetool.profile.stats.LayerSums`): the one
    code path behind `trace` (one prompt, many prompts pooled) and `profile`. `drop_rate` needs the
    token order and is filled in by the caller (`capacity_drops`)."""
    T, K, E = s.tokens, s.K, s.E
    load = s.load
    m: dict[str, Any] = {"tokens": T, "load": load.tolist()}
    m.update(balance(load))
    dead = [i for i, l in enumerate(load.tolist()) if l == 0]
    cold = cold_experts(load, T, K) if T else []
    ad = sample_adequacy(T, E, K)
    m.update({"dead_experts": dead, "dead_count": len(dead), "cold_experts": cold, "cold_count": len(cold),
              "dead_expected_by_chance": ad["expected_dead_by_chance"], "dead_judgeable": ad["dead_judgeable"],
              "dead_significant_count": len(dead) if ad["dead_judgeable"] else 0})
    full = s.prob_tokens == T and T > 0
    P = s.prob_sum / T if full else None
    f = load / (T * K) if T else None
    m["switch_balance_loss"] = float(E * (f * P).sum()) if P is not None and f is not None else None
    m["router_entropy_mean"] = float(s.entropy_sum / T / math.log(E)) if full and E > 1 else None
    m["topk_mass_mean"] = float(s.topk_mass_sum / T) if full else None
    m["near_tie_rate"] = None
    if s.margin_tokens:
        scale = s.selection_std()
        if scale > 0:
            m["near_tie_rate"] = s.near_ties(NEAR_TIE * scale)[0] / s.margin_tokens
    chance_any = 1.0 - math.comb(E - K, K) / math.comb(E, K) if E - K >= K else 1.0
    m.update({"reuse_first_choice": s.reuse_first / s.pairs if s.pairs else None, "reuse_first_choice_chance": 1.0 / E,
              "reuse_any_overlap": s.reuse_any / s.pairs if s.pairs else None,
              "reuse_any_overlap_chance": chance_any})
    m["coactivation_top_pairs"] = top_pairs(s.coact, load, T) if K >= 2 else []
    m["transition_nmi"] = nmi_from_joint(s.first_transitions) if s.first_transitions is not None else None
    m["drop_rate"] = None
    m["drop_rate_at_capacity"] = None
    return m


def top_pairs(coact: np.ndarray, load: np.ndarray, tokens: int, top: int = TOP_PAIRS) -> list[dict[str, Any]]:
    """The most frequent pairs of the symmetric co-activation counts [E, E], ties by expert index,
    with lift = count / (T x (load_i / T) x (load_j / T)), the count over independent choices."""
    i, j = np.triu_indices(len(load), k=1)
    c = coact[i, j]
    nz = np.nonzero(c)[0]
    order = nz[np.lexsort((j[nz], i[nz], -c[nz]))][:top]
    L = load.tolist()
    return [{"experts": [int(i[o]), int(j[o])], "count": int(c[o]),
             "lift": float(int(c[o]) * tokens / (L[i[o]] * L[j[o]]))} for o in order]


def nmi_from_joint(joint_counts: np.ndarray) -> Optional[float]:
    """`nmi` of two labelings given their joint counts [A, B]."""
    n = joint_counts.sum()
    if n == 0:
        return None
    joint = joint_counts / n
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    h = lambda p: float(-(p[p > 0] * np.log(p[p > 0])).sum())
    ha, hb = h(pa), h(pb)
    if ha + hb == 0:
        return None
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    return max(0.0, 2 * mi / (ha + hb))


def layer_metrics(experts, num_experts: int, probs=None, selection=None, prev_first=None,
                  capacity_factor: Optional[float] = None) -> dict[str, Any]:
    """All metrics of one MoE layer (see docs/metrics.md) for one sequence: its sums, then
    `metrics_from_sums`."""
    from .profile.stats import LayerSums

    experts = np.asarray(experts, dtype=np.int64)
    T, K = experts.shape
    s = LayerSums(num_experts, K, tie_keep=max(T, 1))
    prev = None if prev_first is None else np.asarray(prev_first, dtype=np.int64).reshape(-1, 1)
    s.add(experts, None, probs=probs, selection=selection, prev_experts=prev)
    m = metrics_from_sums(s)
    with_capacity(m, experts, num_experts, capacity_factor)
    return m


def with_capacity(m: dict[str, Any], experts: np.ndarray, num_experts: int, capacity_factor: Optional[float]) -> None:
    if capacity_factor is not None:
        drops = capacity_drops(experts, num_experts, capacity_factor)
        m["drop_rate"] = drops["drop_rate"]
        m["drop_rate_at_capacity"] = drops


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
