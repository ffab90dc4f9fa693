"""quantize-report: a planted heavy-tailed expert is ranked most sensitive under int4 and gets
more bits; the activation-space error is recomputed independently; the JSON contract; the plan
respects its budget; bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from test_bad_input import run_cli
from fakes import DEVICE


PLANT_LAYER = 1


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny Mixtral (8 experts); the expert of layer 1 that the calibration text uses most gets
    heavy-tailed weights (Student-t, df = 1.5). Returns (directory, planted expert)."""
    from conftest import ALL_TINY, write_tokenizer
    from fakes import build_transformers_model

    import moetool
    from moetool.quant.check import default_calibration_text

    model = build_transformers_model(dict(ALL_TINY["mixtral-tied"], intermediate_size=128, hidden_size=128,
                                          num_attention_heads=4, head_dim=32), seed=3).eval()
    d = tmp_path_factory.mktemp("planted")
    model.save_pretrained(d)
    write_tokenizer(d)
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(d / "tokenizer.json")).encode(default_calibration_text()).ids[:256]
    t = moetool.trace(model=str(d), tokens=ids, device=DEVICE)  # the tokens the report calibrates on
    busiest = max(range(8), key=lambda e: t.layers[PLANT_LAYER].metrics["load"][e])
    torch.manual_seed(7)
    with torch.no_grad():
        experts = model.model.layers[PLANT_LAYER].mlp.experts
        for p in (experts.gate_up_proj, experts.down_proj):
            sample = torch.distributions.StudentT(1.5).sample(p[busiest].shape) * 0.02
            p[busiest].copy_(sample.clamp(-2, 2))
    model.save_pretrained(d)
    return d, busiest


def test_planted_expert_is_most_sensitive_and_gets_more_bits(planted):
    from moetool.quant.report import quantize_report

    d, e = planted
    for weight_only in (False, True):
        r = quantize_report(str(d), schemes=["int8", "int4_g128", "nf4"], budget_bits=5.0, device=DEVICE,
                            weight_only=weight_only)
        worst = r.worst("int4_g128", 3)
        assert (worst[0].layer, worst[0].expert) == (PLANT_LAYER, e), [(w.layer, w.expert) for w in worst]
        assert worst[0].kurtosis > 10
        plan = {(a["layer"], a["expert"]): a["scheme"] for a in r.plan["per_expert"]["assignments"]}
        assert plan[(PLANT_LAYER, e)] == "int8"
        others = [s for k, s in plan.items() if k != (PLANT_LAYER, e)]
        assert others.count("int8") < len(others) / 2  # the budget forces most experts to 4 bits
    assert r.plan["per_expert"]["bits_per_weight"] <= 5.0 + 1e-9
    assert r.plan["per_layer"]["bits_per_weight"] <= 5.0 + 1e-9
    assert r.plan["per_layer"]["error"] >= r.plan["per_expert"]["error"] - 1e-12


def test_activation_error_recomputed(planted):
    """output_rel_error of one expert, recomputed from transformers' own expert weights and the
    routed hidden states captured from transformers' forward."""
    import transformers
    from tokenizers import Tokenizer

    from moetool.quant import schemes
    from moetool.quant.check import default_calibration_text
    from moetool.quant.report import quantize_report

    planted = planted[0]
    r = quantize_report(str(planted), schemes=["int4_g128"], layers={0}, experts={2}, device=DEVICE,
                        calibration_tokens=200)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(planted), dtype=torch.float32).eval()
    ids = Tokenizer.from_file(str(planted / "tokenizer.json")).encode(default_calibration_text()).ids[:200]
    cap = {}
    moe = model.model.layers[0].mlp
    h1 = moe.register_forward_pre_hook(lambda m, a: cap.__setitem__("h", a[0][0]))
    h2 = moe.gate.register_forward_hook(lambda m, a, o: cap.__setitem__("route", (o[2], o[1])))
    with torch.no_grad():
        model(torch.tensor([ids]))
    h1.remove(), h2.remove()
    idx, w = cap["route"]
    tok, slot = torch.where(idx == 2)
    X, g = cap["h"][tok], w[tok, slot]
    W = moe.experts.down_proj[2]
    gate, up = moe.experts.gate_up_proj[2].chunk(2, dim=0)
    hmid = torch.nn.functional.silu(X @ gate.T) * (X @ up.T)
    e = hmid @ (schemes.int4_g128(W) - W).T
    expected = torch.sqrt(((g ** 2) * e.pow(2).sum(1)).sum() / ((g ** 2) * (hmid @ W.T).pow(2).sum(1)).sum())
    row = next(x for x in r.rows if x.projection == "down" and x.expert == 2)
    assert row.tokens == len(tok)
    assert row.output_rel_error == pytest.approx(float(expected), rel=1e-4)


def test_cli_json_contract_and_exports(planted, tmp_path):
    planted = planted[0]
    r = run_cli("quantize-report", "--model", str(planted), "--schemes", "int8,mxfp4", "--budget-bits", "6",
                "--json", "--device", "cpu", "--export-plan", str(tmp_path / "plan.json"),
                "--llama-cpp", str(tmp_path / "llama.txt"), "--plot", str(tmp_path / "q.png"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert list(out)[:2] == ["schema_version", "command"] and out["command"] == "quantize-report"
    assert set(out["schemes"]) == {"int8", "mxfp4"}
    row = out["experts"][0]
    for k in ("layer", "expert", "projection", "scheme", "rel_error", "sqnr_db", "output_rel_error", "tokens"):
        assert k in row
    assert {x["projection"] for x in out["experts"]} == {"gate", "up", "down"}
    assert json.loads((tmp_path / "plan.json").read_text())["per_expert"]["assignments"]
    assert (tmp_path / "llama.txt").read_text().startswith("--tensor-type blk.")
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
    r = run_cli("quantize-report", "--model", str(planted), "--schemes", "int4_g128", "--format", "csv",
                "--device", "cpu", "--max-output-error", "0.0001")
    assert r.returncode == 1 and r.stdout.startswith("layer,expert,projection,scheme,")


@pytest.mark.parametrize("args,needle", [
    (["--schemes", "int3"], "unknown scheme"), (["--budget-bits", "nan"], "finite"),
    (["--budget-bits", "1"], "below the cheapest"), (["--check-kl"], "need a plan"),
    (["--budget-bits", "4", "--budget-gb", "1"], "not both"), (["--experts", "99"], "between"),
])
def test_cli_bad_input(planted, args, needle):
    r = run_cli("quantize-report", "--model", str(planted[0]), "--device", "cpu", "--weight-only", *args)
    assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr


# --- scoring before issue 16, verbatim (one matrix per call, float64 statistics, the old kernels):
# the "before" the batched scorer must reproduce to float32 rounding

def old_weight_stats(w: torch.Tensor) -> tuple[float, float]:
    x = w.double().reshape(-1)
    mu, sd = x.mean(), x.std(unbiased=False)
    kurt = float(((x - mu) ** 4).mean() / sd ** 4) if sd > 0 else float("nan")
    return kurt, float(x.abs().max() / sd) if sd > 0 else float("nan")


def old_score(schemes_, mats, X, g, act):
    """-> {(projection, scheme): (rel, sqnr, out_rel, kurtosis, outlier)} for one expert."""
    import math

    from test_quant_schemes import old_fake_quantize

    out = {}
    inputs = {}
    if X is not None and len(X):
        gate_out, up_out = X @ mats["gate"].T, X @ mats["up"].T
        inputs = {"gate": (X, gate_out), "up": (X, up_out)}
        h = act(gate_out, up_out)
        inputs["down"] = (h, h @ mats["down"].T)
        w2 = (g.double() ** 2) if g is not None else torch.ones(len(X), dtype=torch.float64)
    for proj, W in mats.items():
        kurt, outlier = old_weight_stats(W)
        norm = W.double().norm()
        for scheme in schemes_:
            Q = old_fake_quantize(W, scheme)
            err = (Q - W).double().norm()
            rel = float(err / norm) if norm > 0 else 0.0
            sqnr = float(10 * math.log10(norm ** 2 / err ** 2)) if err > 0 else float("inf")
            out_rel = None
            if proj in inputs:
                x, y = inputs[proj]
                e = (x @ (Q - W).T).double()
                num = (w2 * e.pow(2).sum(1)).sum()
                den = (w2 * y.double().pow(2).sum(1)).sum()
                out_rel = float(torch.sqrt(num / den)) if den > 0 else None
            out[proj, scheme] = (rel, sqnr, out_rel, kurt, outlier)
    return out


def _close(a, b, rel, name=""):
    """Equal to float32 rounding: relative 1e-5; sqnr_db (a log of a ratio) to 1e-4 dB absolute,
    which is the same relative 1e-5 on the ratio (and holds at 0 dB)."""
    if a is None or b is None:
        return a is None and b is None
    if math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return abs(a - b) <= (1e-4 if name == "sqnr_db" else rel * abs(b))


def _blocks():
    """Blocks of 3 experts (gate/up [F, D], down [D, F]) with awkward weights: Gaussian, heavy-tailed,
    a large mean next to a small spread, constant, zero, subnormal, huge (inf-free) matrices."""
    g = torch.Generator().manual_seed(5)
    F, D = 96, 160
    normal = lambda *s: torch.randn(*s, generator=g)
    student = torch.distributions.StudentT(1.5).sample((3, F, D)).clamp(-50, 50) * 0.02
    yield {"gate": normal(3, F, D) * 0.02, "up": student, "down": normal(3, D, F) * 0.05}
    shifted = 1000 + normal(3, F, D) * 1e-2  # |mean| / std = 1e5: the float32 moments must centre exactly
    const = torch.full((3, D, F), -0.375)
    const[1] = 0.0
    yield {"gate": shifted, "up": normal(3, F, D) * 1e-40, "down": const}
    yield {"gate": normal(3, F, D) * 1e30, "up": normal(3, F, D) * 1e-20 + 3e-20, "down": normal(3, D, F) * 1e-3}


@pytest.mark.parametrize("block", range(3))
def test_batched_scoring_equals_the_old_scoring(block):
    """Every reported number of a block scored at once equals the old per-matrix float64 scoring to
    float32 rounding (relative 1e-5; NaN / inf / None where the old gives them), with and without
    routed tokens."""
    from moetool.forward.model import glu
    from moetool.quant import schemes
    from moetool.quant.report import _Scorer

    mats = list(_blocks())[block]
    g = torch.Generator().manual_seed(6)
    X = torch.randn(40, mats["gate"].shape[2], generator=g)
    gw = torch.rand(40, generator=g)
    data = [(X, gw, 40, float(gw.sum())), (None, None, 0, 0.0), (X[:5], None, 5, 5.0)]
    act = lambda a, b: glu(a, b)
    sc = _Scorer(list(schemes.SCHEMES))
    sc.score_block(1, [0, 1, 2], mats, data, act)
    rows = {(r.expert, r.projection, r.scheme): r for r in sc.rows}
    assert len(rows) == len(sc.rows) == 3 * 3 * len(schemes.SCHEMES)
    for i in range(3):
        old = old_score(schemes.SCHEMES, {p: W[i] for p, W in mats.items()}, data[i][0], data[i][1], act)
        for (proj, scheme), (rel, sqnr, out_rel, kurt, outlier) in old.items():
            r = rows[i, proj, scheme]
            got = (r.rel_error, r.sqnr_db, r.output_rel_error, r.kurtosis, r.outlier_ratio)
            for name, a, b in zip(("rel_error", "sqnr_db", "output_rel_error", "kurtosis", "outlier_ratio"), got,
                                  (rel, sqnr, out_rel, kurt, outlier)):
                assert _close(a, b, 1e-5, name), (block, i, proj, scheme, name, a, b)
            assert (r.tokens, r.numel) == (data[i][2], mats[proj][i].numel())


def test_report_digits_unchanged(planted, monkeypatch, capsys):
    """The whole report (calibrated) with the batched scorer and with the old per-expert scorer swapped
    in: every row to float32 rounding, and the printed table digit for digit."""
    from moetool.quant import report as R
    from moetool.render import render_quant

    kw = dict(schemes=["int8", "nf4", "mxfp4", "nvfp4"], layers={1}, device=DEVICE, calibration_tokens=128)
    new = R.quantize_report(str(planted[0]), **kw)
    render_quant(new)
    new_text = capsys.readouterr().out

    def old_block(self, layer, experts, mats, data, act):
        for i, e in enumerate(experts):
            X, g, tokens, gsum = data[i]
            mats_i = {p: W[i].clone() for p, W in mats.items()}
            for (proj, scheme), (rel, sqnr, out_rel, kurt, outlier) in old_score(self.schemes, mats_i, X, g, act).items():
                out, inp = mats_i[proj].shape
                self.rows.append(R.ExpertRow(layer, e, proj, scheme, rel, sqnr, out_rel, tokens, gsum, kurt, outlier,
                                             out * inp, R.S.bits(scheme, out, inp),
                                             isinstance(e, int) and tokens < R.MIN_TOKENS))

    monkeypatch.setattr(R._Scorer, "score_block", old_block)
    old = R.quantize_report(str(planted[0]), **kw)
    render_quant(old)
    assert capsys.readouterr().out == new_text
    assert [(r.layer, r.expert, r.projection, r.scheme, r.tokens) for r in new.rows] == \
        [(r.layer, r.expert, r.projection, r.scheme, r.tokens) for r in old.rows]
    for a, b in zip(new.rows, old.rows):
        for f in ("rel_error", "sqnr_db", "output_rel_error", "kurtosis", "outlier_ratio", "gate_weight_sum"):
            assert _close(getattr(a, f), getattr(b, f), 1e-5, f), (a, f, getattr(a, f), getattr(b, f))
