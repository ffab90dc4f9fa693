"""quantize-report: a planted heavy-tailed expert is ranked most sensitive under int4 and gets
more bits; the activation-space error is recomputed independently; the JSON contract; the plan
respects its budget; bad input."""

from __future__ import annotations

import json

import pytest
import torch

from test_bad_input import run_cli


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
    t = moetool.trace(model=str(d), tokens=ids, device="cpu")  # the tokens the report calibrates on
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
        r = quantize_report(str(d), schemes=["int8", "int4_g128", "nf4"], budget_bits=5.0, device="cpu",
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
    r = quantize_report(str(planted), schemes=["int4_g128"], layers={0}, experts={2}, device="cpu",
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
