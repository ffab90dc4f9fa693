"""quantize-report calibrated through profile's layer-major engine (`corpus=`, `--corpus`): one
prompt gives today's report (the calibration-text path) row for row; many prompts, in one block or
many, give the activation-space error transformers' own forward gives on the same prompts."""

from __future__ import annotations

import math

import pytest
import torch

from test_bad_input import run_cli
from fakes import DEVICE

PROMPTS = ["def add(a, b): return a + b  # the quick brown fox", "import os, sys\nThe lazy dog.",
           "The quick brown fox jumps over the lazy dog. def f(x): return x * 2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import ALL_TINY, write_tokenizer
    from fakes import build_transformers_model

    model = build_transformers_model(dict(ALL_TINY["mixtral-tied"], intermediate_size=64, hidden_size=64,
                                          num_attention_heads=4, head_dim=16), seed=11).eval()
    d = tmp_path_factory.mktemp("fused")
    model.save_pretrained(d)
    write_tokenizer(d)
    return d


def _close(a, b, rel=1e-5):
    if a is None or b is None:
        return a is None and b is None
    if math.isinf(a) or math.isinf(b) or math.isnan(a) or math.isnan(b):
        return a == b or (math.isnan(a) and math.isnan(b))
    return abs(a - b) <= rel * abs(b) + 1e-12


def test_one_prompt_equals_the_calibration_path(tiny, tmp_path):
    from moetool.quant.report import quantize_report

    (tmp_path / "p.txt").write_text(PROMPTS[2])
    kw = dict(schemes=["int8", "int4_g128", "nvfp4"], device=DEVICE)
    today = quantize_report(str(tiny), calibration=str(tmp_path / "p.txt"), calibration_tokens=10**6, **kw)
    fused = quantize_report(str(tiny), corpus=[PROMPTS[2]], **kw)
    assert today.calibration_tokens == fused.calibration_tokens > 16
    key = lambda r: (r.layer, r.expert, r.projection, r.scheme)
    assert [key(r) for r in today.rows] == [key(r) for r in fused.rows]
    assert any(r.output_rel_error for r in fused.rows)
    for a, b in zip(fused.rows, today.rows):
        assert (a.tokens, a.numel, a.low_calibration) == (b.tokens, b.numel, b.low_calibration), key(a)
        for f in ("rel_error", "sqnr_db", "output_rel_error", "kurtosis", "outlier_ratio", "gate_weight_sum"):
            assert _close(getattr(a, f), getattr(b, f)), (key(a), f, getattr(a, f), getattr(b, f))


def _transformers_sums(d, prompts, layer, expert, scheme):
    """sum_t g_t^2 ||h_t (Q(W) - W)^T||^2 and sum_t g_t^2 ||h_t W^T||^2 of the `down` projection over
    every token of every prompt routed to `expert`, from transformers' forward, one prompt at a time."""
    import transformers
    from tokenizers import Tokenizer

    from moetool.quant import schemes

    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    moe = model.model.layers[layer].mlp
    W = moe.experts.down_proj[expert].detach()
    gate, up = moe.experts.gate_up_proj[expert].detach().chunk(2, dim=0)
    dW = schemes.FUNCTIONS[scheme](W.unsqueeze(0))[0] - W
    num = den = 0.0
    tokens = 0
    for p in prompts:
        cap = {}
        h1 = moe.register_forward_pre_hook(lambda m, a: cap.__setitem__("h", a[0][0]))
        h2 = moe.gate.register_forward_hook(lambda m, a, o: cap.__setitem__("route", (o[2], o[1])))
        with torch.no_grad():
            model(torch.tensor([tok.encode(p).ids]))
        h1.remove(), h2.remove()
        idx, w = cap["route"]
        t, slot = torch.where(idx == expert)
        X, g = cap["h"][t], w[t, slot].double()
        hmid = torch.nn.functional.silu(X @ gate.T) * (X @ up.T)
        num += float((g ** 2 * (hmid @ dW.T).double().pow(2).sum(1)).sum())
        den += float((g ** 2 * (hmid @ W.T).double().pow(2).sum(1)).sum())
        tokens += len(t)
    return num, den, tokens


@pytest.mark.parametrize("block_tokens", [None, 20])
def test_many_prompts_against_transformers(tiny, block_tokens):
    """Three prompts in one block (None: the default budget) and in blocks of at most 20 tokens (one
    prompt each): every expert's down-projection error over all its routed tokens equals the one
    recomputed from transformers' forward and weights."""
    from moetool.quant.report import quantize_report

    r = quantize_report(str(tiny), corpus=PROMPTS, schemes=["int4_g128"], layers={1}, device=DEVICE,
                        reservoir=10**6, block_tokens=block_tokens)
    checked = 0
    for e in range(8):
        num, den, tokens = _transformers_sums(tiny, PROMPTS, 1, e, "int4_g128")
        row = next(x for x in r.rows if x.expert == e and x.projection == "down")
        assert row.tokens == tokens
        if tokens:
            assert row.output_rel_error == pytest.approx(math.sqrt(num / den), rel=1e-4), e
            checked += 1
        else:
            assert row.output_rel_error is None
    assert checked >= 4
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert r.calibration_tokens == sum(len(tok.encode(p).ids) for p in PROMPTS)


def test_cli_corpus(tiny, tmp_path):
    import json

    (tmp_path / "c.txt").write_text("\n".join(PROMPTS) + "\n")
    r = run_cli("quantize-report", "--model", str(tiny), "--schemes", "int8", "--corpus", str(tmp_path / "c.txt"),
                "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["command"] == "quantize-report" and any(x["output_rel_error"] for x in out["experts"])
    r = run_cli("quantize-report", "--model", str(tiny), "--corpus", str(tmp_path / "c.txt"), "--weight-only")
    assert r.returncode == 2 and "--corpus" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    r = run_cli("quantize-report", "--model", str(tiny), "--corpus", str(tmp_path / "bad.jsonl"))
    assert r.returncode == 2 and "not valid JSON" in r.stderr and r.stderr.count("\n") == 1, r.stderr
