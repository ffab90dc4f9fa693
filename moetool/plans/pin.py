"""GPU residency of individual experts under a memory budget, from a workload profile.

Which routed experts to keep on the GPU when not all fit (the rest stay in CPU memory and are
either computed there or fetched on use). Two objectives, both measured on the profile (fitted)
and on a held-out profile of other text (the expected rate on unseen traffic):

- `slot`: the hit rate, the share of routed (token, slot) assignments, over all MoE layers, whose
  expert is resident. It decides how many expert bytes cross PCIe (or are read from CPU memory) per
  token. Maximising it under a byte budget is a knapsack; every expert of a layer has the same size,
  so taking experts in order of load per byte is optimal when layers' experts have equal sizes (the
  usual case), and the standard greedy otherwise. This is frequency-based pinning.
- `step`: the step-hit rate, the share of (token, MoE layer) pairs whose whole top-k set is
  resident (the layer runs with no miss, no stall, no CPU or PCIe work at all). A frequency set does
  not maximise it: it is a property of which experts are chosen together. From a profile's counts it
  is exact for k <= 2 (k = 2: the co-activation counts inside the resident set); for k > 2 pairwise
  counts do not determine it, and the plan maximises the pair-hit rate (the share of a token's
  co-activated expert pairs with both experts resident), reports it with sharp moment bounds on the
  step-hit rate (docs/plans.md). Per layer, candidate sets for every size m come from greedy growth
  on co-activation (seeded by the heaviest expert and by the heaviest pair), greedy peeling, and the
  m most frequent experts; the best of them per m, then an exact dynamic programme over the layers
  splits the budget; budget it leaves unused goes to the remaining experts by frequency. Because the
  frequency allocation is one of the DP's options, the step plan's pair hits (its step hits for
  k <= 2) on the fitted profile are never below the frequency plan's under the same budget.

Transitions between consecutive MoE layers are not used: a static resident set's hit rates are per
layer; transitions matter to prefetching (predicting the next layer's experts), not to pinning.

Example:
    >>> plan = pin_plan(stats, {1: 2_000_000, 2: 2_000_000}, budget=8_000_000)   # doctest: +SKIP
    >>> plan["hit_rate"], plan["step_hit_rate"], plan["layers"][0]["resident"]     # doctest: +SKIP
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Optional

import numpy as np

from ..errors import MoetoolError

OBJECTIVES = ("slot", "step")
MAX_DP_CELLS = 20_000_000  # layers x budget units of the step objective's dynamic programme


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


def rates(stats, layers: list[int], resident: np.ndarray) -> dict:
    """Every rate of one resident set [L, E] on one profile, from its counts.

    hit_rate: resident (token, slot) assignments / all. pair_hit_rate (k >= 2): a token's
    co-activated expert pairs with both resident / all such pairs. step_hit_rate: (token, layer)
    pairs with the whole top-k set resident, exact for k <= 2, None for k > 2, where
    step_hit_bounds brackets it: with X the resident experts of a token, E[X] = k * hit and
    E[X(X-1)] = k(k-1) * pair; 1{X=k} <= X/k and <= X(X-1)/(k(k-1)) give the upper bound,
    1{X=k} >= X-(k-1) and >= (X(X-1)-(k-1)(k-2))/(2(k-1)) the lower one."""
    k = stats.top_k
    slots = hits = pairs_in = pairs_all = tokens = 0
    for i, l in enumerate(layers):
        s = stats.layers[l]
        r = resident[i].astype(bool)
        tokens += s.tokens
        slots += int(s.load.sum())
        hits += int(s.load[r].sum())
        pairs_all += int(s.coact.sum())
        pairs_in += int(s.coact[np.ix_(r, r)].sum())  # ordered pairs: (i, j) and (j, i)
    if not tokens:
        return {"hit_rate": None, "pair_hit_rate": None, "step_hit_rate": None, "step_hit_bounds": None}
    hit = hits / slots
    pair = pairs_in / pairs_all if k > 1 and pairs_all else None
    if k == 1:
        step = hit
        lo = hi = hit
    else:
        m2 = pairs_in / tokens  # E[X(X-1)]
        lo = max(0.0, k * hit - (k - 1), (m2 - (k - 1) * (k - 2)) / (2 * (k - 1)))
        hi = min(hit, m2 / (k * (k - 1)))
        step = pairs_in / 2 / tokens if k == 2 else None
        if k == 2:
            lo = hi = step
    return {"hit_rate": hit, "pair_hit_rate": pair, "step_hit_rate": step, "step_hit_bounds": [lo, hi]}


# --- the step objective: per-layer candidate sets, then an exact split of the budget ----------------

def layer_candidates(coact: np.ndarray, load: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every size m = 0..E, the best resident set found: (sets [E+1, E] bool, primary [E+1],
    secondary [E+1]). Primary: the co-activated ordered pairs inside the set (k >= 2; for k = 1 its
    load, the step hits); secondary: its load (more slot hits among equals). Candidates: the m most frequent experts; greedy growth on the co-activation
    gain (seeded by the heaviest expert, and by the heaviest co-activated pair); greedy peeling
    (drop the expert with the fewest co-activations inside the set)."""
    E = len(load)
    c = coact.astype(np.int64)
    ld = load.astype(np.int64)
    seqs = [list(np.lexsort((np.arange(E), -ld)))]  # frequency order (ties: lower index)

    def grow(seed: list[int]) -> list[int]:
        order = list(seed)
        inside = np.zeros(E, dtype=bool)
        inside[order] = True
        gain = c[:, order].sum(axis=1) if order else np.zeros(E, dtype=np.int64)
        while len(order) < E:
            cand = np.flatnonzero(~inside)
            e = int(cand[np.lexsort((cand, -ld[cand], -gain[cand]))[0]])
            order.append(e)
            inside[e] = True
            gain += c[:, e]
        return order

    seqs.append(grow([]))
    if k > 1 and c.any():
        i, j = np.unravel_index(int(np.argmax(c)), c.shape)
        seqs.append(grow([int(i), int(j)] if ld[i] >= ld[j] else [int(j), int(i)]))
        inside = np.ones(E, dtype=bool)
        deg = c.sum(axis=1)
        removed = []
        while inside.any():
            cand = np.flatnonzero(inside)
            e = int(cand[np.lexsort((-cand, ld[cand], deg[cand]))[0]])  # fewest pairs, then lightest
            removed.append(e)
            inside[e] = False
            deg -= c[:, e]
        seqs.append(removed[::-1])
    # value of every prefix of every sequence: adding e to S adds 2 x its pairs with S (ordered pairs)
    vals = []
    for seq in seqs:
        sq = np.asarray(seq)
        if k == 1:
            p = np.concatenate([[0], np.cumsum(ld[sq])])
        else:
            p = np.concatenate([[0], np.cumsum(2 * np.tril(c[np.ix_(sq, sq)], -1).sum(axis=1))])
        vals.append((p, np.concatenate([[0], np.cumsum(ld[sq])])))
    sets = np.zeros((E + 1, E), dtype=bool)
    prim = np.zeros(E + 1, dtype=np.int64)
    sec = np.zeros(E + 1, dtype=np.int64)
    for m in range(1, E + 1):
        j = max(range(len(seqs)), key=lambda q: (vals[q][0][m], vals[q][1][m], -q))
        prim[m], sec[m] = vals[j][0][m], vals[j][1][m]
        sets[m, seqs[j][:m]] = True
    return sets, prim, sec


class StepPlanner:
    """Exact split of a byte budget over layers given each layer's candidate values: a dynamic
    programme over budget units (the gcd of the layers' expert sizes), maximising the summed
    primary value, then the secondary."""

    def __init__(self, stats, layers: list[int], eb: np.ndarray):
        k, E = stats.top_k, stats.num_experts
        self.cands = [layer_candidates(stats.layers[l].coact, stats.layers[l].load, k) for l in layers]
        sizes = [int(b) for b in eb]
        self.unit = reduce(math.gcd, sizes) or 1
        self.w = [b // self.unit for b in sizes]
        n = sum(w * E for w in self.w)
        if (n + 1) * len(layers) > MAX_DP_CELLS:
            raise MoetoolError("--objective step: the MoE layers' experts differ too much in size for the exact "
                               "budget split; use --objective slot")
        best_p = np.full(n + 1, -1, dtype=np.int64)
        best_s = np.zeros(n + 1, dtype=np.int64)
        best_p[0] = 0
        self.choice = np.zeros((len(layers), n + 1), dtype=np.int32)
        for li, (_, prim, sec) in enumerate(self.cands):
            w = self.w[li]
            new_p = np.full(n + 1, -1, dtype=np.int64)
            new_s = np.zeros(n + 1, dtype=np.int64)
            for m in range(E + 1):
                sh = m * w
                if sh > n:
                    break
                src_p, src_s = best_p[:n + 1 - sh], best_s[:n + 1 - sh]
                cp, cs = src_p + prim[m], src_s + sec[m]
                ok = src_p >= 0
                dst_p, dst_s = new_p[sh:], new_s[sh:]
                better = ok & ((cp > dst_p) | ((cp == dst_p) & (cs > dst_s)))
                dst_p[better], dst_s[better] = cp[better], cs[better]
                self.choice[li, sh:][better] = m
            best_p, best_s = new_p, new_s
        self.best_p, self.best_s = best_p, best_s

    def resident(self, budget: int) -> np.ndarray:
        cap = min(int(budget) // self.unit, len(self.best_p) - 1)
        p, s = self.best_p[:cap + 1], self.best_s[:cap + 1]
        top = p.max()
        idx = int(np.flatnonzero(p == top)[np.argmax(s[p == top])])  # best primary, then secondary, fewest bytes
        out = []
        for li in range(len(self.cands) - 1, -1, -1):
            m = int(self.choice[li, idx])
            out.append(self.cands[li][0][m])
            idx -= m * self.w[li]
        return np.stack(out[::-1]).astype(np.int8)


# --- the plan --------------------------------------------------------------------------------------

def _same_counts(a, b, layers: list[int]) -> bool:
    return all(np.array_equal(a.layers[l].load, b.layers[l].load) and np.array_equal(a.layers[l].coact, b.layers[l].coact)
               for l in layers)


def pin_plan(stats, expert_bytes: dict[int, int], budget: int, holdout=None, curve_points: int = 24,
             objective: str = "slot") -> dict:
    """The residency plan under `budget` bytes. expert_bytes: bytes of one routed expert per MoE layer."""
    if objective not in OBJECTIVES:
        raise MoetoolError(f"--objective must be one of {', '.join(OBJECTIVES)}")
    layers = list(stats.meta["moe_layers"])
    if sorted(expert_bytes) != sorted(layers):
        raise MoetoolError("the model's MoE layers do not match the profile's "
                           f"({sorted(expert_bytes)[:6]} vs {layers[:6]}): is this the profiled model?")
    if holdout is not None:
        if holdout.meta["moe_layers"] != layers or holdout.num_experts != stats.num_experts or \
                holdout.top_k != stats.top_k or holdout.meta.get("fingerprint") != stats.meta.get("fingerprint"):
            raise MoetoolError("--holdout is a profile of a different model or configuration")
        if holdout.tokens == 0:
            raise MoetoolError("the --holdout profile has no tokens")
        if _same_counts(stats, holdout, layers):
            raise MoetoolError("--holdout has exactly the fitted profile's counts: it is not held-out text "
                               "(profile another part of the corpus)")
    if stats.tokens == 0:
        raise MoetoolError("the profile has no tokens")
    loads = _loads(stats, layers)
    eb = np.array([expert_bytes[l] for l in layers], dtype=np.float64)
    L, E = loads.shape
    order = greedy_order(loads, eb)

    def slot_resident(b: int) -> np.ndarray:
        """Greedy by load per byte; an expert that does not fit is skipped (unequal sizes)."""
        r = np.zeros((L, E), dtype=np.int8)
        used = 0
        for i, e in order:
            if used + eb[i] <= b:
                r[i, e] = 1
                used += int(eb[i])
        return r

    planner = None

    def step_resident(b: int) -> np.ndarray:
        nonlocal planner
        if planner is None:
            planner = StepPlanner(stats, layers, eb)
        r = planner.resident(b)
        used = int((r.sum(axis=1) * eb).sum())
        for i, e in order:  # budget the split left unused (experts that add no pairs): by frequency
            if not r[i, e] and used + eb[i] <= b:
                r[i, e] = 1
                used += int(eb[i])
        return r

    pick = {"slot": slot_resident, "step": step_resident}

    def measured(r: np.ndarray) -> dict:
        fit = rates(stats, layers, r)
        ho = rates(holdout, layers, r) if holdout is not None else dict.fromkeys(fit)
        return {**fit, **{f"{k}_holdout": v for k, v in ho.items()}}

    all_bytes = int(eb.sum() * E)
    budgets = sorted(set(np.linspace(0, all_bytes, curve_points).astype(np.int64).tolist() + [min(budget, all_bytes)]))
    curves = {}
    for obj in OBJECTIVES:
        curves[obj] = []
        for b in budgets:
            r = pick[obj](b)
            curves[obj].append({"budget_bytes": int(b), "experts": int(r.sum()),
                                "bytes": int((r.sum(axis=1) * eb).sum()), **measured(r)})
    resident = pick[objective](budget)
    other = [o for o in OBJECTIVES if o != objective][0]
    r_other = pick[other](budget)
    ho_loads = _loads(holdout, layers) if holdout is not None else None
    out = {
        "objective": objective,
        "budget_bytes": int(budget), "resident_bytes": int((resident.sum(axis=1) * eb).sum()),
        "all_experts_bytes": all_bytes, "resident_experts": int(resident.sum()), "experts_total": L * E,
        **measured(resident),
        "tokens": stats.tokens, "holdout_tokens": holdout.tokens if holdout is not None else None,
        "other_objective": {"objective": other, "resident_experts": int(r_other.sum()), **measured(r_other)},
        "layers": [{"layer": l, "expert_bytes": int(eb[i]), "resident": np.flatnonzero(resident[i]).tolist(),
                    "hit_rate": hit_rate(loads[i:i + 1], resident[i:i + 1]),
                    "hit_rate_holdout": hit_rate(ho_loads[i:i + 1], resident[i:i + 1]) if holdout is not None else None}
                   for i, l in enumerate(layers)],
        "curve": curves[objective],
        "curves": curves,
    }
    return out
