"""Routing metrics, each recomputed independently here in plain Python (no numpy, other
formulas where there are several) on hand-made assignments, edge cases included (one token, all
tokens to one expert, k = E), and on a trace of a transformers-made tiny checkpoint."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import pytest

from moetool.metrics import binom_cdf, capacity_drops, layer_metrics, nmi
from fakes import DEVICE


def ref_balance(experts, E):
    T, K = len(experts), len(experts[0])
    load = [0] * E
    for row in experts:
        for e in row:
            load[e] += 1
    mean = T * K / E
    var = sum((l - mean) ** 2 for l in load) / E
    gini = sum(abs(a - b) for a in load for b in load) / (2 * E * sum(load))
    shares = [l / (T * K) for l in load]
    ent = -sum(p * math.log(p) for p in shares if p > 0)
    return dict(load=load, max_mean_ratio=max(load) / mean, maxvio=max(load) / mean - 1, cv=math.sqrt(var) / mean,
                gini=gini, load_entropy_norm=ent / math.log(E) if E > 1 else None)


CASES = {
    "mixed": ([[0, 1], [0, 2], [0, 1], [3, 1], [2, 0]], 4),
    "one token": ([[2, 0]], 4),
    "all to one expert (k=1)": ([[1]] * 12, 6),
    "k equals E": ([[0, 1, 2], [2, 1, 0], [1, 0, 2]], 3),
    "balanced": ([[0, 1], [2, 3], [1, 0], [3, 2]], 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_balance_metrics(case):
    experts, E = CASES[case]
    m = layer_metrics(experts, E)
    ref = ref_balance(experts, E)
    assert m["load"] == ref["load"] and sum(m["load"]) == len(experts) * len(experts[0])
    for key in ("max_mean_ratio", "maxvio", "cv", "gini"):
        assert m[key] == pytest.approx(ref[key], abs=1e-12)
    if ref["load_entropy_norm"] is None:
        assert m["load_entropy_norm"] is None
    else:
        assert m["load_entropy_norm"] == pytest.approx(ref["load_entropy_norm"], abs=1e-12)
    assert m["dead_experts"] == [e for e in range(E) if ref["load"][e] == 0]


def test_edge_values():
    m = layer_metrics([[1]] * 12, 6)
    assert m["max_mean_ratio"] == pytest.approx(6.0) and m["maxvio"] == pytest.approx(5.0)
    assert m["load_entropy_norm"] == 0.0 and m["dead_count"] == 5
    assert m["reuse_first_choice"] == 1.0 and m["coactivation_top_pairs"] == []
    m = layer_metrics([[0, 1], [2, 3], [1, 0], [3, 2]], 4)
    assert m["max_mean_ratio"] == 1.0 and m["gini"] == 0.0 and m["load_entropy_norm"] == pytest.approx(1.0)
    m = layer_metrics([[0, 1, 2], [2, 1, 0], [1, 0, 2]], 3)  # k = E: every expert always chosen
    assert m["reuse_any_overlap_chance"] == 1.0 and m["reuse_any_overlap"] == 1.0 and m["near_tie_rate"] is None
    one = layer_metrics([[2, 0]], 4)
    assert one["reuse_first_choice"] is None and one["cold_experts"] == []


def test_switch_balance_loss_and_router_confidence():
    probs = [[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.6, 0.2, 0.1]]
    experts = [[0, 1], [0, 1], [1, 2]]
    m = layer_metrics(experts, 4, probs=probs, selection=probs)
    T, K, E = 3, 2, 4
    f = [sum(row.count(i) for row in experts) / (T * K) for i in range(E)]
    P = [sum(p[i] for p in probs) / T for i in range(E)]
    assert m["switch_balance_loss"] == pytest.approx(E * sum(a * b for a, b in zip(f, P)))
    ent = [-sum(x * math.log(x) for x in p) / math.log(E) for p in probs]
    assert m["router_entropy_mean"] == pytest.approx(sum(ent) / T)
    mass = [sum(p[e] for e in row) for p, row in zip(probs, experts)]
    assert m["topk_mass_mean"] == pytest.approx(sum(mass) / T)
    # tokens 0 and 1 have equal 2nd and 3rd scores (margin 0 < 1e-3 x scale); token 2's margin is 0.1
    assert m["near_tie_rate"] == pytest.approx(2 / 3)
    uniform = layer_metrics([[0, 1], [2, 3]], 4, probs=[[0.25] * 4] * 2)
    assert uniform["switch_balance_loss"] == pytest.approx(1.0)  # 1 at perfect balance


def test_reuse_and_chance_levels():
    experts = [[0, 1], [0, 2], [3, 1], [3, 2], [1, 0]]
    m = layer_metrics(experts, 5)
    pairs = list(zip(experts[:-1], experts[1:]))
    assert m["reuse_first_choice"] == pytest.approx(sum(a[0] == b[0] for a, b in pairs) / len(pairs))
    assert m["reuse_any_overlap"] == pytest.approx(sum(bool(set(a) & set(b)) for a, b in pairs) / len(pairs))
    assert m["reuse_first_choice_chance"] == pytest.approx(1 / 5)
    # chance that two random 2-subsets of 5 intersect, by enumeration
    subsets = list(itertools.combinations(range(5), 2))
    hit = sum(bool(set(a) & set(b)) for a in subsets for b in subsets) / len(subsets) ** 2
    assert m["reuse_any_overlap_chance"] == pytest.approx(hit)


def test_coactivation_lift():
    experts = [[0, 1], [0, 1], [0, 2], [1, 2], [0, 1]]
    m = layer_metrics(experts, 3)
    counts = Counter(tuple(sorted(r)) for r in experts)
    load = Counter(e for r in experts for e in r)
    T = len(experts)
    top = m["coactivation_top_pairs"][0]
    assert top["experts"] == [0, 1] and top["count"] == counts[(0, 1)] == 3
    assert top["lift"] == pytest.approx(3 / (T * (load[0] / T) * (load[1] / T)))


def test_cold_experts_binomial():
    # 20 tokens, top-2 of 8: an expert never chosen has P = 0.75^20 = 0.003 > 0.01 / 8: not flagged.
    experts = [[i % 7, (i + 1) % 7] for i in range(20)]
    assert layer_metrics(experts, 8)["cold_experts"] == []
    # 400 tokens: never choosing an expert is far below Binomial(400, 1/4): flagged.
    experts = [[i % 7, (i + 3) % 7] for i in range(400)]
    assert 7 in layer_metrics(experts, 8)["cold_experts"]
    assert binom_cdf(0, 20, 0.25) == pytest.approx(0.75 ** 20)
    assert binom_cdf(3, 10, 0.5) == pytest.approx(sum(math.comb(10, k) for k in range(4)) / 1024)


def test_transition_nmi():
    a, b = [0, 0, 1, 1, 2, 2], [5, 5, 3, 3, 4, 4]
    assert nmi(a, b) == pytest.approx(1.0)  # a relabelling: perfectly informative
    a, b = [0, 1, 0, 1], [0, 0, 1, 1]
    assert nmi(a, b) == pytest.approx(0.0, abs=1e-12)  # independent
    # the reference formula: 2 I(X;Y) / (H(X) + H(Y))
    a, b = [0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 0]
    n = len(a)
    px, py, pxy = Counter(a), Counter(b), Counter(zip(a, b))
    H = lambda c: -sum(v / n * math.log(v / n) for v in c.values())
    I = sum(v / n * math.log((v / n) / (px[x] / n * py[y] / n)) for (x, y), v in pxy.items())
    assert nmi(a, b) == pytest.approx(2 * I / (H(px) + H(py)))
    m = layer_metrics([[0, 1], [1, 0]], 2, prev_first=[1, 0])
    assert m["transition_nmi"] == pytest.approx(1.0)


def test_capacity_drops_in_position_order():
    # 8 tokens, top-1 of 2 experts, CF 1.0 -> capacity ceil(8 / 2) = 4; expert 0 is chosen by tokens
    # 0, 1, 3, 4, 5, 7: it serves the first four, tokens 5 and 7 are dropped (buckets [4, 6) and [6, 8)).
    experts = [[0], [0], [1], [0], [0], [0], [1], [0]]
    d = capacity_drops(experts := __import__("numpy").array(experts), 2, 1.0)
    assert d["capacity"] == 4 and d["drop_rate"] == pytest.approx(2 / 8)
    assert [b["drop_rate"] for b in d["by_position"]] == [0.0, 0.0, 0.5, 0.5]


def test_trace_metrics_on_a_transformers_checkpoint(tiny_checkpoint):
    import numpy as np

    import moetool

    path, _ = tiny_checkpoint("deepseek_v3")
    t = moetool.trace(model=str(path), tokens=list(range(2, 60)), device=DEVICE, capacity_factor=1.0)
    prev = None
    for l in t.layers:
        m = l.metrics
        ref = ref_balance(l.experts, 8)
        assert m["load"] == ref["load"] and m["cv"] == pytest.approx(ref["cv"])
        assert m["gini"] == pytest.approx(ref["gini"])
        first = [row[0] for row in l.experts]
        if prev is None:
            assert m["transition_nmi"] is None
        else:
            assert m["transition_nmi"] == pytest.approx(nmi(prev, first))
        prev = first
        # sigmoid router: the distribution is the normalised sigmoid of the router logits
        s = 1 / (1 + np.exp(-t.router_logits[l.layer].double().numpy()))
        P = (s / s.sum(1, keepdims=True)).mean(0)
        f = np.array(ref["load"]) / (len(l.experts) * 2)
        assert m["switch_balance_loss"] == pytest.approx(8 * (f * P).sum())
    assert t.summary["max_mean_ratio"]["worst_layer"] in [l.layer for l in t.layers]
    assert t.summary["max_mean_ratio"]["max"] == max(l.metrics["max_mean_ratio"] for l in t.layers)


def test_trace_cli_metrics_file_and_exports(tmp_path, tiny_checkpoint):
    from conftest import write_tokenizer
    from test_bad_input import run_cli

    import shutil

    src, _ = tiny_checkpoint("qwen3_moe")
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    write_tokenizer(d)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "def add(a, b): return a + b"}\n{"text": "The quick brown fox"}\n')
    r = run_cli("trace", "--model", str(d), "--file", str(prompts), "--json", "--capacity-factor", "1.5", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["prompts"]) == 2 and out["prompts"][1]["text"] == "The quick brown fox"
    agg = out["aggregate"]
    pooled_load = [sum(p["layers"][0]["metrics"]["load"][e] for p in out["prompts"]) for e in range(8)]
    assert agg["layers"][0]["metrics"]["load"] == pooled_load
    assert "max_mean_ratio" in agg["sequence_level"] and agg["summary"]["max_mean_ratio"]["mean"] is not None
    assert out["prompts"][0]["layers"][0]["metrics"]["drop_rate_at_capacity"]["capacity_factor"] == 1.5

    csv_path, png = tmp_path / "t.csv", tmp_path / "t.png"
    r = run_cli("trace", "def add", "--model", str(d), "--format", "csv", "-o", str(csv_path), "--plot", str(png),
                "--generate", "2", "--layers", "1", "--logits", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    import csv
    with open(csv_path, newline="") as f:  # a generated token may be a comma or a newline: parse, don't split
        rows = list(csv.reader(f))
    assert rows[0] == "prompt_index,layer,token_index,token_id,token,generated,slot,expert,weight".split(",")
    assert {r[1] for r in rows[1:]} == {"1"} and all(len(r) == len(rows[0]) for r in rows)
    assert png.read_bytes()[:4] == b"\x89PNG"
    r = run_cli("trace", "def add", "--model", str(d), "--json", "--generate", "2", "--logits", "--device", "cpu")
    out = json.loads(r.stdout)
    assert [t["generated"] for t in out["tokens"]][-2:] == [True, True] and not out["tokens"][0]["generated"]
    layer = out["layers"][0]
    assert len(layer["router_logits"][0]) == 8 and len(layer["margin"]) == len(out["tokens"])


@pytest.mark.parametrize("args", [["--capacity-factor", "nan"], ["--capacity-factor", "-1"], ["--layers", "x"],
                                  ["--layers", "40"], ["--format", "parquet"], ["--plot", "a.jpg"]])
def test_trace_metric_options_bad_input(args, tiny_checkpoint):
    from test_bad_input import run_cli

    d, _ = tiny_checkpoint("qwen3_moe")
    r = run_cli("trace", "--model", str(d), "--tokens", "1,2,3", *args, "--device", "cpu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
