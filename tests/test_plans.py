"""`moetool plan eplb` / `plan pin`: placements and hit rates checked against independent
computations (the published EPLB example, slot-by-slot rank loads, per-token recounts)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moetool.plans.eplb import balancedness, contiguous, gpu_loads, rebalance

PROMPT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
HOLDOUT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on."


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetool", *args], capture_output=True, text=True, timeout=300)


def test_eplb_reproduces_the_published_example():
    """deepseek-ai/EPLB README: 2 layers, 12 experts, 4 groups, 2 nodes, 8 GPUs, 16 physical slots."""
    w = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                  [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    p = rebalance(w, num_physical=16, num_groups=4, num_nodes=2, num_gpus=8)
    assert p.physical_to_logical.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                              [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def _independent_rank_loads(w, p2l, gpus):
    """Each logical expert's load split evenly over its replicas, summed slot by slot per GPU."""
    L, P = p2l.shape
    out = np.zeros((L, gpus))
    for i in range(L):
        reps = {e: list(p2l[i]).count(e) for e in set(p2l[i].tolist())}
        for s, e in enumerate(p2l[i]):
            out[i, s // (P // gpus)] += w[i, e] / reps[e]
    return out


@pytest.mark.parametrize("E,gpus,redundant,groups,nodes", [
    (8, 4, 0, 1, 1), (8, 4, 4, 1, 1), (16, 8, 8, 4, 2), (64, 8, 16, 8, 2), (12, 8, 4, 4, 2), (6, 3, 3, 1, 1),
    (16, 4, 4, 3, 1),  # groups do not divide E: global policy
])
def test_eplb_valid_and_balancedness_independent(E, gpus, redundant, groups, nodes):
    rng = np.random.default_rng(E * 100 + gpus)
    w = rng.zipf(1.6, size=(3, E)).astype(float)  # skewed loads, as real routing is
    p = rebalance(w, E + redundant, groups, nodes, gpus)
    P = E + redundant
    for i in range(3):
        row = p.physical_to_logical[i].tolist()
        assert len(row) == P and set(row) == set(range(E))  # every logical expert placed, slots all used
        assert [row.count(e) for e in range(E)] == p.replica_count[i].tolist()
        for e in range(E):  # logical -> physical agrees with physical -> logical
            slots = [s for s in p.logical_to_physical[i, e] if s >= 0]
            assert sorted(slots) == [s for s, x in enumerate(row) if x == e]
    assert p.slots_per_gpu * gpus == P  # equal slots per rank
    loads = gpu_loads(w, p)
    np.testing.assert_allclose(loads, _independent_rank_loads(w, p.physical_to_logical, gpus))
    ind = _independent_rank_loads(w, p.physical_to_logical, gpus)
    np.testing.assert_allclose(balancedness(loads), ind.mean(1) / ind.max(1))
    assert np.isclose(loads.sum(), w.sum())
    if redundant:  # replicas of the hottest experts never make the heaviest rank heavier than no EPLB
        base = gpu_loads(w, contiguous(3, E, gpus)) if E % gpus == 0 else None
        if base is not None:
            assert (loads.max(1) <= base.max(1) + 1e-9).all()


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("plans")
    for name, text in (("fit", PROMPT), ("holdout", HOLDOUT)):
        r = run_cli("trace", text, "--json", "-o", str(d / f"{name}.json"))
        assert r.returncode == 0, r.stderr
    return d


def test_plan_eplb_cli_and_exports(traces, tmp_path):
    r = run_cli("plan", "eplb", "--profile", str(traces / "fit.json"), "--ranks", "4", "--redundant", "4",
                "--export-sglang", str(tmp_path / "sg.json"), "--export-trtllm", str(tmp_path / "trt.yaml"), "--json",
                "--min-balancedness", "0.5")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["schema_version"] == 1 and plan["command"] == "plan eplb" and plan["gate"]["passed"]
    trace = json.loads((traces / "fit.json").read_text())
    w = np.array([np.bincount(np.array(l["experts"]).reshape(-1), minlength=8) for l in trace["layers"]], float)
    p2l = np.array([l["physical_to_logical"] for l in plan["layers"]])
    ind = _independent_rank_loads(w, p2l, 4)
    assert plan["balancedness_after"] == pytest.approx(float((ind.mean(1) / ind.max(1)).mean()))
    sg = json.loads((tmp_path / "sg.json").read_text())
    assert sg["physical_to_logical_map"] == p2l.tolist()  # every decoder layer of the bundled model is MoE
    yaml = (tmp_path / "trt.yaml").read_text()
    assert "num_slots: 12" in yaml and f"0: [{', '.join(map(str, p2l[0]))}]" in yaml
    r = run_cli("plan", "eplb", "--profile", str(traces / "fit.json"), "--ranks", "4", "--min-balancedness", "1.0")
    assert r.returncode == 1 and "gate failed" in r.stderr


def test_plan_pin_hit_rates_independent(traces, tmp_path):
    r = run_cli("plan", "pin", "--profile", str(traces / "fit.json"), "--holdout", str(traces / "holdout.json"),
                "--budget", "1.5MB", "--json", "--plot", str(tmp_path / "pin.png"))
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["resident_bytes"] <= 1_500_000 and (tmp_path / "pin.png").stat().st_size > 0
    resident = {l["layer"]: set(l["resident"]) for l in plan["layers"]}
    assert plan["resident_experts"] == sum(len(v) for v in resident.values())
    assert plan["resident_bytes"] == sum(len(resident[l["layer"]]) * l["expert_bytes"] for l in plan["layers"])
    for name, key, full_key in (("fit", "hit_rate", "step_hit_rate"), ("holdout", "hit_rate_holdout",
                                                                         "step_hit_rate_holdout")):
        t = json.loads((traces / f"{name}.json").read_text())
        hits = total = full = tl = 0
        for l in t["layers"]:  # per token, per slot: is the chosen expert resident?
            for row in l["experts"]:
                hits += sum(e in resident[l["layer"]] for e in row)
                total += len(row)
                full += all(e in resident[l["layer"]] for e in row)
                tl += 1
        assert plan[key] == pytest.approx(hits / total)
        assert plan[full_key] == pytest.approx(full / tl)  # top-2: exact from co-activation counts
    # the greedy plan is optimal for equal-size experts: no other set of the same size hits more
    t = json.loads((traces / "fit.json").read_text())
    loads = sorted((c for l in t["layers"] for c in np.bincount(np.array(l["experts"]).reshape(-1), minlength=8)),
                   reverse=True)
    assert plan["hit_rate"] == pytest.approx(sum(loads[:plan["resident_experts"]]) / sum(loads))
    r = run_cli("plan", "pin", "--profile", str(traces / "fit.json"), "--holdout", str(traces / "holdout.json"),
                "--budget", "1.5MB", "--min-hit-rate", "0.99")
    assert r.returncode == 1 and "gate failed" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["plan", "pin", "--profile", "{fit}", "--budget", "lots"], "cannot read 'lots' as a size"),
    (["plan", "pin", "--profile", "{fit}", "--budget", "1GB", "--min-hit-rate", "80"], "between 0 and 1"),
    (["plan", "pin", "--profile", "/nonexistent", "--budget", "1GB"], "cannot read"),
    (["plan", "eplb", "--profile", "{fit}", "--ranks", "3"], "do not split evenly"),
    (["plan", "eplb", "--profile", "{fit}", "--ranks", "4", "--model", "mixtral-8x7b"], "not the profiled model"),
])
def test_plan_bad_input(traces, args, needle):
    r = run_cli(*[a.format(fit=traces / "fit.json") for a in args])
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
