"""`moetool plan pin --objective slot|step`: every reported rate recomputed independently from the
per-token routing (the trace's expert lists, or the token sets a synthetic profile was built from),
never from the profile's counts; the co-activation-aware plan against frequency on a case where they
must differ; budgets; the held-out profile really held out."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from moetool.errors import MoetoolError
from moetool.plans.pin import pin_plan
from moetool.profile.stats import ProfileStats

FIT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
HOLDOUT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on."
OTHER = "import os\nfor root, dirs, files in os.walk('.'):\n    print(root, len(files))\n"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetool", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("pin")
    for name, text in (("fit", FIT), ("holdout", HOLDOUT), ("other", OTHER)):
        r = run_cli("trace", text, "--json", "-o", str(d / f"{name}.json"))
        assert r.returncode == 0, r.stderr
    return d


def recount(token_sets: dict[int, list[list[int]]], resident: dict[int, set[int]]) -> dict:
    """Rates from per-token routing: token_sets[layer] = each token's chosen experts."""
    slots = hits = steps = tokens = pairs = pairs_in = 0
    for layer, rows in token_sets.items():
        for row in rows:
            inside = [e in resident[layer] for e in row]
            slots += len(row)
            hits += sum(inside)
            steps += all(inside)
            tokens += 1
            for a, b in itertools.combinations(inside, 2):
                pairs += 1
                pairs_in += a and b
    return {"hit_rate": hits / slots, "step_hit_rate": steps / tokens,
            "pair_hit_rate": pairs_in / pairs if pairs else None}


def trace_sets(path) -> dict[int, list[list[int]]]:
    t = json.loads(path.read_text())
    return {l["layer"]: l["experts"] for l in t["layers"]}


def residents(plan: dict) -> dict[int, set[int]]:
    return {l["layer"]: set(l["resident"]) for l in plan["layers"]}


@pytest.mark.parametrize("objective", ["slot", "step"])
def test_rates_equal_a_recount_of_the_trace(traces, objective, tmp_path):
    """Bundled model (top-2): hit, step-hit and pair-hit rates, fitted and held-out, equal a recount
    over every token's choices in the traces; the plan stays within the budget."""
    budget = 2_500_000
    r = run_cli("plan", "pin", "--profile", str(traces / "fit.json"), "--holdout", str(traces / "holdout.json"),
                "--budget", str(budget), "--objective", objective, "--json", "--plot", str(tmp_path / "c.svg"))
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["objective"] == objective and plan["top_k"] == 2 and (tmp_path / "c.svg").stat().st_size > 0
    res = residents(plan)
    assert plan["resident_bytes"] == sum(len(res[l["layer"]]) * l["expert_bytes"] for l in plan["layers"]) <= budget
    for name, sfx in (("fit", ""), ("holdout", "_holdout")):
        want = recount(trace_sets(traces / f"{name}.json"), res)
        for key, v in want.items():
            assert plan[key + sfx] == pytest.approx(v), (name, key)
        lo, hi = plan["step_hit_bounds" + sfx]
        assert lo == pytest.approx(want["step_hit_rate"]) and hi == pytest.approx(want["step_hit_rate"])
    if objective == "step":  # on this trace the two objectives pick different sets
        slot = plan["other_objective"]
        assert plan["step_hit_rate"] > slot["step_hit_rate"] and slot["hit_rate"] > plan["hit_rate"]


def _stats(token_sets: dict[int, np.ndarray], E: int, k: int) -> ProfileStats:
    s = ProfileStats.empty(E, k, sorted(token_sets))
    for layer in sorted(token_sets):
        s.add(layer, token_sets[layer])
    return s


def test_coactivation_beats_frequency_where_they_must_differ():
    """Experts 0 and 3 are the most frequent but rarely chosen together; 4 and 5 are chosen together
    by 6 of 19 tokens. With room for two experts, frequency pins {0, 3} (a full hit for 2 tokens), the
    step objective {4, 5} (6 tokens), the best of all 15 pairs."""
    rows = [[0, 2]] * 5 + [[0, 3]] * 2 + [[1, 3]] * 5 + [[1, 2]] * 1 + [[4, 5]] * 6
    sets = {0: np.array(rows)}
    stats = _stats(sets, 6, 2)
    eb = {0: 1000}
    slot = pin_plan(stats, eb, 2000, objective="slot")
    step = pin_plan(stats, eb, 2000, objective="step")
    assert residents(slot)[0] == {0, 3} and residents(step)[0] == {4, 5}
    for plan, want in ((slot, 2 / 19), (step, 6 / 19)):
        assert plan["step_hit_rate"] == pytest.approx(want)
        assert plan["step_hit_rate"] == pytest.approx(recount({0: rows}, residents(plan))["step_hit_rate"])
    best = max(sum(set(r) <= set(p) for r in rows) for p in itertools.combinations(range(6), 2))
    assert step["step_hit_rate"] == pytest.approx(best / 19)
    assert slot["hit_rate"] > step["hit_rate"]  # and frequency still wins its own objective


def _random_routing(rng, layers: int, E: int, k: int, T: int) -> dict[int, np.ndarray]:
    """Clustered routing: each token draws a cluster of experts and picks k of them (plus noise),
    so co-activation carries information frequency does not."""
    out = {}
    for l in range(layers):
        clusters = [rng.permutation(E)[:k + 1] for _ in range(3)]
        p = rng.dirichlet(np.ones(E) * 0.5)
        rows = []
        for _ in range(T):
            if rng.random() < 0.6:
                rows.append(rng.choice(clusters[rng.integers(3)], size=k, replace=False))
            else:
                rows.append(rng.choice(E, size=k, replace=False, p=p))
        out[l] = np.array(rows)
    return out


@pytest.mark.parametrize("k", [2, 4])
def test_step_objective_never_below_frequency_and_budget_kept(k):
    """Over a sweep of budgets on clustered routing: neither plan exceeds the budget; the step plan's
    co-activated pairs inside the resident sets (its step hits for k = 2) are never fewer than the
    frequency plan's, and never more than the best possible (brute force over every split); for
    k = 4 the step-hit bounds contain the recounted step-hit rate and the pair-hit rate is exact."""
    rng = np.random.default_rng(k)
    E, L = 7, 2
    sets = _random_routing(rng, L, E, k, 60)
    stats = _stats(sets, E, k)
    ho_sets = _random_routing(np.random.default_rng(k + 100), L, E, k, 40)
    ho = _stats(ho_sets, E, k)
    rows = {l: v.tolist() for l, v in sets.items()}
    ho_rows = {l: v.tolist() for l, v in ho_sets.items()}

    def pairs_in(res):
        return sum(sum(a in res[l] and b in res[l] for a, b in itertools.combinations(r, 2)) for l in rows for r in rows[l])

    # brute force: the most co-activated pairs any m experts of a layer can hold, every m
    best_of = {l: [max(sum(set(p) <= set(c) for r in rows[l] for p in itertools.combinations(r, 2))
                       for c in itertools.combinations(range(E), m)) for m in range(E + 1)] for l in rows}
    for n_experts in range(0, L * E + 1):
        budget = n_experts * 1000 + 999
        slot = pin_plan(stats, {0: 1000, 1: 1000}, budget, holdout=ho, objective="slot")
        step = pin_plan(stats, {0: 1000, 1: 1000}, budget, holdout=ho, objective="step")
        for plan in (slot, step):
            assert plan["resident_bytes"] <= budget
            assert all(c["bytes"] <= c["budget_bytes"] for c in plan["curve"])
            for data, sfx in ((rows, ""), (ho_rows, "_holdout")):
                want = recount(data, residents(plan))
                assert plan["hit_rate" + sfx] == pytest.approx(want["hit_rate"])
                assert plan["pair_hit_rate" + sfx] == pytest.approx(want["pair_hit_rate"])
                lo, hi = plan["step_hit_bounds" + sfx]
                assert lo - 1e-12 <= want["step_hit_rate"] <= hi + 1e-12
                if k == 2:
                    assert plan["step_hit_rate" + sfx] == pytest.approx(want["step_hit_rate"])
                else:
                    assert plan["step_hit_rate" + sfx] is None
        best = max(best_of[0][m] + best_of[1][n_experts - m] for m in range(E + 1) if 0 <= n_experts - m <= E)
        assert pairs_in(residents(slot)) <= pairs_in(residents(step)) <= best


def test_holdout_is_held_out(traces, tmp_path):
    """The selection never sees the held-out profile (same experts with, without and with another
    held-out profile); the held-out rates come from the held-out trace alone; the fitted profile
    given as its own held-out is refused."""
    common = ["plan", "pin", "--profile", str(traces / "fit.json"), "--budget", "2MB", "--objective", "step", "--json"]
    plans = []
    for extra in ([], ["--holdout", str(traces / "holdout.json")], ["--holdout", str(traces / "other.json")]):
        r = run_cli(*common, *extra)
        assert r.returncode == 0, r.stderr
        plans.append(json.loads(r.stdout))
    assert residents(plans[0]) == residents(plans[1]) == residents(plans[2])
    assert plans[0]["hit_rate_holdout"] is None and plans[0]["curve"] == [
        {**c, **{k: None for k in c if k.endswith("_holdout")}} for c in plans[1]["curve"]]
    for plan, name in ((plans[1], "holdout"), (plans[2], "other")):
        want = recount(trace_sets(traces / f"{name}.json"), residents(plan))
        assert plan["step_hit_rate_holdout"] == pytest.approx(want["step_hit_rate"])
        assert plan["holdout_tokens"] == len(json.loads((traces / f"{name}.json").read_text())["tokens"])
    assert plans[1]["hit_rate_holdout"] != plans[2]["hit_rate_holdout"]
    r = run_cli(*common, "--holdout", str(traces / "fit.json"))
    assert r.returncode == 2 and "not held-out text" in r.stderr and "Traceback" not in r.stderr


def test_gates_and_bad_input(traces):
    fit, ho = str(traces / "fit.json"), str(traces / "holdout.json")
    r = run_cli("plan", "pin", "--profile", fit, "--holdout", ho, "--budget", "2MB", "--objective", "step",
                "--min-step-hit-rate", "0.99")
    assert r.returncode == 1 and "step_hit_rate_holdout" in r.stderr
    r = run_cli("plan", "pin", "--profile", fit, "--budget", "2MB", "--objective", "both")
    assert r.returncode == 2 and "--objective must be one of slot, step" in r.stderr
    stats = _stats(_random_routing(np.random.default_rng(0), 1, 6, 3, 10), 6, 3)
    with pytest.raises(MoetoolError, match="--objective"):
        pin_plan(stats, {0: 10}, 30, objective="pairs")


def test_top3_model_bounds_and_pair_rate(tiny_checkpoint, tmp_path):
    """A tiny Qwen3-MoE with top-3 routing: the pair-hit and hit rates equal a recount of the traces,
    the step-hit rate is not claimed (null) and its bounds contain the recounted rate; the text
    report prints the range; the step-hit gate is refused for k > 2."""
    import os
    import shutil

    from conftest import write_tokenizer

    src, _ = tiny_checkpoint("qwen3_moe-bias")
    d = tmp_path / "model"
    d.mkdir()
    for f in os.listdir(src):
        shutil.copy(src / f, d / f)
    write_tokenizer(d)
    for name, text in (("fit", FIT), ("holdout", HOLDOUT)):
        r = run_cli("trace", text, "--model", str(d), "--json", "-o", str(tmp_path / f"{name}.json"))
        assert r.returncode == 0, r.stderr
    args = ["plan", "pin", "--profile", str(tmp_path / "fit.json"), "--holdout", str(tmp_path / "holdout.json"),
            "--model", str(d), "--objective", "step"]
    from moetool.arch import spec_from_config
    from moetool.plans import expert_bytes

    eb = set(expert_bytes(spec_from_config(json.loads((d / "config.json").read_text())), "bf16").values()).pop()
    r = run_cli(*args, "--budget", str(eb * 9), "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["top_k"] == 3 and plan["resident_bytes"] <= eb * 9
    for name, sfx in (("fit", ""), ("holdout", "_holdout")):
        want = recount(trace_sets(tmp_path / f"{name}.json"), residents(plan))
        assert plan["hit_rate" + sfx] == pytest.approx(want["hit_rate"])
        assert plan["pair_hit_rate" + sfx] == pytest.approx(want["pair_hit_rate"])
        assert plan["step_hit_rate" + sfx] is None
        lo, hi = plan["step_hit_bounds" + sfx]
        assert lo - 1e-12 <= want["step_hit_rate"] <= hi + 1e-12
    r = run_cli(*args, "--budget", str(eb * 9))
    assert r.returncode == 0 and "pair-hit rate" in r.stdout and "bounded from the pairwise counts" in r.stdout
    r = run_cli(*args, "--budget", str(eb * 9), "--min-step-hit-rate", "0.5")
    assert r.returncode == 2 and "k <= 2 only" in r.stderr
