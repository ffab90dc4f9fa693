"""`moetool profile` / `moetool merge`: the statistics against brute-force recounts, the layer-major
engine against independent `trace` runs (one full forward per prompt) and against transformers'
own router, merge of shards against the whole corpus, resume after an interruption, bad corpora."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest

from moetool.errors import MoetoolError
from moetool.metrics import layer_metrics
from moetool.profile.stats import LayerSums, ProfileStats
from fakes import DEVICE

PROMPTS = [
    "def add(a, b): return a + b",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps again and again.",
    "import os, sys",
    "x",
    "for i in range(10): print(i) # the loop prints the numbers and the fox jumps over the dog",
    "The lazy dog sleeps.",
    "def f(x):\n    return x * x + 1",
]
DOMAINS = ["code", "prose", "code", None, "code", "prose", "code"]


def random_routing(rng, T, E, K):
    return np.stack([rng.choice(E, K, replace=False) for _ in range(T)]), rng.dirichlet(np.ones(K), T)


# --- the statistics ---------------------------------------------------------------------------

def test_sums_match_brute_force_counts():
    rng = np.random.default_rng(0)
    E, K = 6, 3
    segs = [5, 1, 7, 3]
    T = sum(segs)
    ex, w = random_routing(rng, T, E, K)
    prev, _ = random_routing(rng, T, E, K)
    ids = rng.integers(0, 20, T)
    doms = ["a", "b", "a", None]
    norms = rng.random((T, K))
    s = LayerSums(E, K)
    s.add(ex, w, ids, doms, segs, prev_experts=prev, expert_output_norms=norms)
    rows = ex.tolist()
    assert s.load.tolist() == [sum(r.count(e) for r in rows) for e in range(E)]
    assert s.first_load.tolist() == [sum(r[0] == e for r in rows) for e in range(E)]
    pairs = Counter((a, b) for r in rows for a in r for b in r if a != b)
    assert all(s.coact[a, b] == pairs[(a, b)] for a in range(E) for b in range(E))
    trans = Counter((a, b) for p, r in zip(prev.tolist(), rows) for a in p for b in r)
    assert all(s.transitions[a, b] == trans[(a, b)] for a in range(E) for b in range(E))
    first = Counter((p[0], r[0]) for p, r in zip(prev.tolist(), rows))
    assert all(s.first_transitions[a, b] == first[(a, b)] for a in range(E) for b in range(E))
    vocab = Counter((int(i), r[0]) for i, r in zip(ids, rows))
    tid, exp, cnt = s.vocab_table()
    assert dict(zip(zip(tid.tolist(), exp.tolist()), cnt.tolist())) == dict(vocab)
    # consecutive pairs inside each sequence only
    starts = np.cumsum([0] + segs[:-1]).tolist()
    inner = [t for t in range(1, T) if t not in starts]
    assert s.pairs == len(inner)
    assert s.reuse_first == sum(rows[t][0] == rows[t - 1][0] for t in inner)
    assert s.reuse_any == sum(bool(set(rows[t]) & set(rows[t - 1])) for t in inner)
    per_tok = [d or "" for d, n in zip(doms, segs) for _ in range(n)]
    for d in ("a", "b", ""):
        assert s.domain_load[d].tolist() == [sum(r.count(e) for r, x in zip(rows, per_tok) if x == d) for e in range(E)]
    reap = [np.mean([w[t, j] * norms[t, j] for t in range(T) for j in range(K) if ex[t, j] == e]) for e in range(E)]
    assert np.allclose(s.reap(), reap)
    assert np.allclose(s.weight_sum, [w[ex == e].sum() for e in range(E)])


def test_merge_of_shards_equals_the_whole_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    E, K, layers = 8, 2, [1, 3]
    data = []
    for _ in range(6):
        T = int(rng.integers(1, 30))
        data.append((T, {l: random_routing(rng, T, E, K) for l in layers}, rng.integers(0, 50, T),
                     rng.dirichlet(np.ones(E), T), rng.standard_normal((T, E)), ["x", "y"][T % 2]))

    def build(part):
        s = ProfileStats.empty(E, K, layers, fingerprint="f")
        for T, routing, ids, probs, sel, dom in part:
            prev = None
            for l in layers:
                ex, w = routing[l]
                s.add(l, ex, w, ids, dom, w, probs=probs, selection=sel, prev_experts=prev)
                prev = ex
        return s

    whole = build(data)
    merged = build(data[:2]).merge(build(data[2:5])).merge(build(data[5:]))
    for l in layers:
        a, b = whole.layers[l], merged.layers[l]
        for name in ("load", "first_load", "coact", "transitions", "first_transitions", "reap_count", "margin_hist",
                     "vocab_keys", "vocab_counts"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert (a.tokens, a.pairs, a.reuse_first, a.reuse_any) == (b.tokens, b.pairs, b.reuse_first, b.reuse_any)
        assert {d: v.tolist() for d, v in a.domain_load.items()} == {d: v.tolist() for d, v in b.domain_load.items()}
        ma, mb = whole.layer_metrics(l), merged.layer_metrics(l)
        for k, v in ma.items():
            assert mb[k] == (pytest.approx(v, rel=1e-9) if isinstance(v, float) else v), k
    whole.save(str(tmp_path / "p"))
    back = ProfileStats.load(str(tmp_path / "p"))
    assert back.meta == whole.meta
    for l in layers:
        for name in ("load", "coact", "weight_sum", "prob_sum", "margins", "vocab_keys"):
            assert np.array_equal(getattr(back.layers[l], name), getattr(whole.layers[l], name))
        assert back.layer_metrics(l) == whole.layer_metrics(l)
    other = ProfileStats.empty(E, K, layers, fingerprint="g")
    with pytest.raises(MoetoolError, match="fingerprint"):
        whole.merge(other)


def test_near_tie_sketch_is_exact_and_falls_back_to_the_histogram():
    rng = np.random.default_rng(2)
    T, E, K = 400, 8, 2
    sel = rng.standard_normal((T, E))
    sel[: T // 2, 0] = 10.0
    sel[: T // 2, 1:3] = 5.0 + rng.random((T // 2, 2)) * 1e-3  # many near ties between the 2nd and 3rd
    ex = np.argsort(-sel, axis=1)[:, :K]
    direct = layer_metrics(ex, E, selection=sel)["near_tie_rate"]
    assert 0.3 < direct < 0.7
    finite = sel.ravel()
    top = -np.sort(-sel, axis=1)
    assert direct == pytest.approx(np.mean(top[:, K - 1] - top[:, K] < 1e-3 * finite.std()))
    from moetool.metrics import metrics_from_sums

    for keep in (4, 32, 10_000):  # bounded sketches, merged from four parts
        parts = []
        for chunk in np.array_split(np.arange(T), 4):
            s = LayerSums(E, K, tie_keep=keep)
            s.add(ex[chunk], None, selection=sel[chunk])
            parts.append(s)
        for p in parts[1:]:
            parts[0].merge(p)
        got = metrics_from_sums(parts[0])["near_tie_rate"]
        exact = parts[0].near_ties(1e-3 * parts[0].selection_std())[1]
        assert exact == (keep > 200)
        assert got == (pytest.approx(direct) if exact else pytest.approx(direct, abs=0.05))
        assert len(parts[0].margins) <= keep


def test_small_samples_are_flagged_and_the_dead_expert_gate_accounts_for_it():
    from moetool.gates import trace_gate

    rng = np.random.default_rng(3)
    ex, _ = random_routing(rng, 5, 64, 8)  # 5 tokens x top-8 over 64 experts: >= 24 experts unused
    m = layer_metrics(ex, 64)
    assert m["dead_count"] >= 24 and not m["dead_judgeable"] and m["dead_significant_count"] == 0
    assert m["dead_expected_by_chance"] == pytest.approx(64 * (56 / 64) ** 5)
    assert trace_gate({}, [(0, m)], max_dead_experts=0).passed
    # 400 tokens that never choose expert 63: a dead expert beyond chance
    ex = np.stack([rng.choice(63, 8, replace=False) for _ in range(400)])
    m = layer_metrics(ex, 64)
    assert m["dead_judgeable"] and m["dead_significant_count"] == m["dead_count"] >= 1
    g = trace_gate({}, [(0, m)], max_dead_experts=0)
    assert not g.passed and g.violations[0]["metric"] == "dead_significant_count"
    from moetool.metrics import sample_adequacy

    need = sample_adequacy(5, 64, 8)["min_tokens_dead"]
    assert (56 / 64) ** need < 0.01 / 64 <= (56 / 64) ** (need - 1)


# --- the engine ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tok_checkpoint(tiny_checkpoint, tmp_path_factory):
    from conftest import write_tokenizer

    cache = {}

    def get(name):
        if name not in cache:
            src, _ = tiny_checkpoint(name)
            d = tmp_path_factory.mktemp(f"tok-{name}")
            for f in src.iterdir():
                shutil.copy(f, d / f.name)
            write_tokenizer(d)
            cache[name] = d
        return cache[name]

    return get


def _int_keys(m):
    return {k: v for k, v in m.items() if not isinstance(v, float) and k != "coactivation_top_pairs"}


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss", "llama4_text", "deepseek_v3"])
def test_profile_equals_independent_traces(name, tok_checkpoint, tmp_path):
    """Blocks of several prompts (sliding windows, chunked attention, MLA, sigmoid groups) route
    every token exactly as one trace per prompt; the corpus metrics equal `trace --file`'s."""
    import pyarrow.parquet as pq

    from moetool.profile.engine import profile
    from moetool.tracing import trace, trace_many

    d = str(tok_checkpoint(name))
    pt = tmp_path / "tokens.parquet"
    stats = profile(PROMPTS, model=d, block_tokens=40, device=DEVICE, per_token=str(pt))
    rows = pq.read_table(pt).to_pandas()
    for i, text in enumerate(PROMPTS):
        t = trace(text, model=d, device=DEVICE)
        for l in t.layers:
            got = rows[(rows.prompt_index == i) & (rows.layer == l.layer)].sort_values(["token_index", "slot"])
            assert got.expert.to_numpy().reshape(len(t.tokens), -1).tolist() == l.experts
            assert np.allclose(got.weight.to_numpy().reshape(len(t.tokens), -1), l.weights, atol=1e-5)
    corpus = trace_many(PROMPTS, model=d, device=DEVICE)
    for l in corpus.layers:
        mine, ref = stats.layer_metrics(l["layer"]), l["metrics"]
        assert mine.keys() == ref.keys()
        assert _int_keys(mine) == _int_keys(ref)
        assert [p["experts"] for p in mine["coactivation_top_pairs"]] == [p["experts"] for p in ref["coactivation_top_pairs"]]
        for k, v in ref.items():
            if isinstance(v, float):
                assert mine[k] == pytest.approx(v, rel=1e-5, abs=1e-9), k
    assert stats.tokens == sum(len(p.tokens) for p in corpus.prompts)


def test_profile_loads_equal_transformers_router(tok_checkpoint):
    """Independent reference: transformers' own router logits (output_router_logits), top-k
    counted here, one prompt at a time."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    from moetool.profile.engine import profile

    d = tok_checkpoint("qwen3_moe")
    stats = profile(PROMPTS, model=str(d), block_tokens=64, device=DEVICE)
    model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    loads = None
    with torch.no_grad():
        for text in PROMPTS:
            ids = torch.tensor([tok.encode(text).ids])
            out = model(ids, output_router_logits=True)
            top = [torch.topk(torch.softmax(r.float(), -1), 2, dim=-1).indices for r in out.router_logits]
            cur = [np.bincount(t.reshape(-1).numpy(), minlength=8) for t in top]
            loads = cur if loads is None else [a + b for a, b in zip(loads, cur)]
    assert [stats.layers[l].load.tolist() for l in stats.meta["moe_layers"]] == [x.tolist() for x in loads]


def test_resume_after_interruption_equals_uninterrupted(tok_checkpoint, tmp_path):
    from moetool.profile.engine import profile

    d = str(tok_checkpoint("qwen3_moe"))
    full = profile(PROMPTS, model=d, block_tokens=30, device=DEVICE, out=str(tmp_path / "full"))

    def stop(block):
        if block == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile(PROMPTS, model=d, block_tokens=30, device=DEVICE, out=str(tmp_path / "run"), on_block=stop)
    state = json.loads((tmp_path / "run" / "partial" / "profile.json").read_text())["resume"]
    assert 0 < state["prompts_done"] < len(PROMPTS)
    assert not (tmp_path / "run" / "profile.json").exists()
    resumed = profile(PROMPTS, model=d, block_tokens=30, device=DEVICE, out=str(tmp_path / "run"), resume=True)
    assert (tmp_path / "run" / "stats.safetensors").read_bytes() == (tmp_path / "full" / "stats.safetensors").read_bytes()
    assert resumed.meta == full.meta and not (tmp_path / "run" / "partial").exists()


# --- the command line ---------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_profile_merge_show_plot(tok_checkpoint, tmp_path):
    from test_bad_input import run_cli

    d = str(tok_checkpoint("qwen3_moe"))
    lines = [json.dumps({"text": t, **({"domain": g} if g else {})}) for t, g in zip(PROMPTS, DOMAINS)]
    (tmp_path / "all.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[3:]) + "\n")
    from moetool.profile.corpus import read_corpus
    from moetool.profile.engine import profile

    r = run_cli("profile", str(tmp_path / "a.jsonl"), "--model", d, "-o", str(tmp_path / "a"), "--device", "cpu",
                "--json", "--block-tokens", "1000")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads((tmp_path / "a" / "profile.json").read_text())
    for part in ("all", "b"):
        profile(read_corpus(str(tmp_path / f"{part}.jsonl")), model=d, out=str(tmp_path / part), block_tokens=1000,
                device=DEVICE)
    whole = json.loads((tmp_path / "all" / "profile.json").read_text())
    assert whole["command"] == "profile" and whole["schema_version"] == 1 and whole["tokens"] > 0
    assert set(whole["domains"]) == {"code", "prose", ""}
    r = run_cli("merge", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "m"), "--json")
    assert r.returncode == 0, r.stderr
    merged = json.loads(r.stdout)
    assert merged["tokens"] == whole["tokens"]
    assert [l["load"] for l in merged["layers"]] == [l["load"] for l in whole["layers"]]
    a, b = ProfileStats.load(str(tmp_path / "m")), ProfileStats.load(str(tmp_path / "all"))
    for l in a.layers:
        for name in ("load", "first_load", "coact", "transitions", "vocab_keys", "vocab_counts"):
            assert np.array_equal(getattr(a.layers[l], name), getattr(b.layers[l], name)), name
        assert {k: v.tolist() for k, v in a.layers[l].domain_load.items()} == \
               {k: v.tolist() for k, v in b.layers[l].domain_load.items()}
    png = tmp_path / "p.png"
    r = run_cli("profile", str(tmp_path / "m"), "--show", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert "Hottest" in r.stdout and png.read_bytes()[:4] == b"\x89PNG"
    other = tok_checkpoint("gpt_oss")
    profile(read_corpus(str(tmp_path / "a.jsonl")), model=str(other), out=str(tmp_path / "o"), device=DEVICE)
    r = run_cli("merge", str(tmp_path / "a"), str(tmp_path / "o"), "-o", str(tmp_path / "bad"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "different models" in r.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("content,message", [
    (b"", "no prompts"),
    (b"\n  \n", "no prompts"),
    (b"hello\n\xff\xfe world\n", ":2: not UTF-8"),
    (b'{"text": "a"}\n{"text": "b"\n', ":2: not valid JSON"),
    (b'{"text": "a"}\n[1, 2]\n', ':2: expected an object with a "text" string'),
])
def test_bad_corpora(content, message, tmp_path):
    from test_bad_input import run_cli

    name = "c.txt" if b"{" not in content else "c.jsonl"
    (tmp_path / name).write_bytes(content)
    r = run_cli("profile", str(tmp_path / name), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_memory_budget_and_block_packing():
    from moetool.gates import parse_bytes
    from moetool.profile.engine import pack_blocks

    parse = lambda v: parse_bytes(v, "--max-memory")
    assert parse("2GB") == 2_000_000_000 and parse("512MiB") == 512 << 20 and parse("1e6") == 10 ** 6
    for bad in ("abc", "-1GB", "0", "nan"):
        with pytest.raises(MoetoolError):
            parse(bad)
    lengths = [5, 3, 9, 20, 1, 1, 4]
    blocks = list(pack_blocks(lengths, 10))
    assert blocks == [(0, 2), (2, 3), (3, 4), (4, 7)]  # a prompt longer than a block gets its own
    assert list(pack_blocks(lengths, 10, start=2)) == blocks[1:]  # resuming packs the same blocks
