"""Mixed-precision plans under a budget: a multiple-choice knapsack solved by Lagrangian
relaxation (bisection on the multiplier), then a greedy pass that spends what budget is left on
the best error-per-bit upgrades.

Objective (lower is better): sum over routed experts e of importance_e x sum over projections p
of err_{e,p,s}^2, where err is the activation-space output_rel_error when the expert saw
calibration tokens (else the weight-space rel_error), and importance_e is the expert's summed gate
weight on the calibration text (1 for every expert with --weight-only), plus a small floor so that
unused experts still prefer less error at equal cost.

Two plans: one scheme per expert (what an MoE-aware runtime could run), and one scheme per layer
and projection for all the layer's experts (what vLLM, TensorRT-LLM and llama.cpp can run today);
`constraint_cost` says how much more error the second one has at the same budget.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

from ..errors import MoetoolError

# Nearest llama.cpp tensor type of about the same size (llama.cpp has no exact NF4/NVFP4/fp8 types).
LLAMA_CPP_TYPE = {"int8": "q8_0", "fp8_channel": "q8_0", "fp8_block": "q8_0", "int4_g128": "q4_1",
                  "nf4": "iq4_nl", "mxfp4": "mxfp4", "nvfp4": "q4_K"}
LLAMA_CPP_PROJ = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}


def _items(rows, schemes: list[str], key) -> dict:
    """key(row) -> group; per group and scheme: (cost in bits, error)."""
    routed = [r for r in rows if isinstance(r.expert, int)]
    if not routed:
        raise MoetoolError("no routed experts to plan for")
    gate_sums = defaultdict(float)
    for r in routed:
        gate_sums[(r.layer, r.expert)] = r.gate_weight_sum
    positive = [v for v in gate_sums.values() if v > 0]
    floor = 1e-3 * (sum(positive) / len(positive)) if positive else 1.0
    items: dict = defaultdict(lambda: {s: [0.0, 0.0] for s in schemes})
    for r in routed:
        if r.scheme not in schemes:
            continue
        imp = (r.gate_weight_sum if positive else 1.0) + floor
        err = r.output_rel_error if (r.output_rel_error is not None and r.tokens > 0) else r.rel_error
        entry = items[key(r)][r.scheme]
        entry[0] += r.bits * r.numel
        entry[1] += imp * err * err
    return items


def _solve(items: dict, budget: float, weights: float) -> tuple[dict, float, float]:
    """Choose one option per group minimising total error with total cost <= budget."""
    groups = list(items)
    cheapest = sum(min(c for c, _ in items[g].values()) for g in groups)
    if cheapest > budget * (1 + 1e-12):
        raise MoetoolError(f"the budget is below the cheapest plan ({cheapest / weights:.3f} bits per weight)")

    def pick(lam: float) -> dict:
        return {g: min(items[g], key=lambda s: (items[g][s][1] + lam * items[g][s][0], items[g][s][0])) for g in groups}

    cost = lambda choice: sum(items[g][choice[g]][0] for g in groups)
    lo, hi = 0.0, 1.0
    while cost(pick(hi)) > budget and hi < 1e30:
        hi *= 10
    choice = pick(hi)
    if cost(pick(lo)) <= budget:
        choice = pick(lo)
    else:
        for _ in range(100):
            mid = (lo + hi) / 2
            if cost(pick(mid)) <= budget:
                hi = mid
            else:
                lo = mid
        choice = pick(hi)
    left = budget - cost(choice)
    while True:  # greedy: best error reduction per extra bit that still fits
        best, best_gain = None, 0.0
        for g in groups:
            c0, e0 = items[g][choice[g]]
            for s, (c, e) in items[g].items():
                if e < e0 and c - c0 <= left:
                    gain = (e0 - e) / max(c - c0, 1e-9)
                    if gain > best_gain:
                        best, best_gain = (g, s), gain
        if best is None:
            break
        g, s = best
        left -= items[g][s][0] - items[g][choice[g]][0]
        choice[g] = s
    total_cost = cost(choice)
    return choice, total_cost, sum(items[g][choice[g]][1] for g in groups)


def make_plan(rows, schemes: list[str], *, budget_bits: Optional[float] = None,
              budget_gb: Optional[float] = None) -> dict[str, Any]:
    routed = [r for r in rows if isinstance(r.expert, int) and r.scheme == schemes[0]]
    weights = float(sum(r.numel for r in routed))
    if budget_bits is not None:
        budget = budget_bits * weights
    else:
        budget = budget_gb * 8e9
    per_expert = _items(rows, schemes, lambda r: (r.layer, r.expert))
    per_layer = _items(rows, schemes, lambda r: (r.layer, r.projection))
    choice_e, cost_e, obj_e = _solve(per_expert, budget, weights)
    choice_l, cost_l, obj_l = _solve(per_layer, budget, weights)
    uniform = []
    for s in schemes:
        c = sum(per_expert[g][s][0] for g in per_expert)
        if c <= budget * (1 + 1e-12):
            uniform.append((sum(per_expert[g][s][1] for g in per_expert), s, c))
    best_uniform = min(uniform) if uniform else None
    return {
        "budget_bits_per_weight": budget / weights,
        "budget_bytes": budget / 8,
        "weights": int(weights),
        "objective": "sum over experts of importance x sum over projections of error^2 (docs/quantization.md)",
        "per_expert": {
            "bits_per_weight": cost_e / weights, "bytes": cost_e / 8, "error": obj_e,
            "assignments": [{"layer": l, "expert": e, "scheme": s} for (l, e), s in sorted(choice_e.items())],
        },
        "per_layer": {
            "bits_per_weight": cost_l / weights, "bytes": cost_l / 8, "error": obj_l,
            "constraint_cost": (obj_l / obj_e - 1.0) if obj_e > 0 else 0.0,
            "assignments": [{"layer": l, "projection": p, "scheme": s} for (l, p), s in sorted(choice_l.items())],
        },
        "uniform": None if best_uniform is None else {
            "scheme": best_uniform[1], "bits_per_weight": best_uniform[2] / weights, "error": best_uniform[0]},
        "llama_cpp_tensor_types": [f"blk.{l}.{LLAMA_CPP_PROJ[p]}={LLAMA_CPP_TYPE[s]}"
                                   for (l, p), s in sorted(choice_l.items())],
    }
