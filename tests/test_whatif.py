"""`moetool whatif topk`: the variant's KL against transformers run with the same top-k' (an
independent reference), and the identities of the min-p variant."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

IDS = [3, 17, 42, 5, 99, 8, 64, 1, 23, 77, 12, 31, 9, 88, 40, 2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetool", *args], capture_output=True, text=True, timeout=300)


def whatif(d, *args) -> dict:
    r = run_cli("whatif", "topk", "--model", str(d), "--tokens", ",".join(map(str, IDS)), "--json", *args)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["schema_version"] == 1 and out["command"] == "whatif topk"
    return out


@pytest.mark.parametrize("family,k2", [("mixtral-tied", 1), ("qwen3_moe", 1), ("olmoe", 1)])
def test_topk_variant_matches_transformers(tiny_checkpoint, family, k2):
    import torch
    import transformers

    d, _ = tiny_checkpoint(family)
    out = whatif(d, "--k", str(k2))
    ids = torch.tensor([IDS])
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()(ids).logits[0]
        alt = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32,
                                                                num_experts_per_tok=k2).eval()(ids).logits[0]
    lp, lq = torch.log_softmax(base.double(), -1), torch.log_softmax(alt.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    assert out["kl_mean"] == pytest.approx(float(kl.mean()), abs=1e-5)
    assert out["kl_max"] == pytest.approx(float(kl.max()), abs=1e-5)
    assert out["top1_agreement"] == pytest.approx(float((base.argmax(-1) == alt.argmax(-1)).double().mean()))
    assert out["experts_per_token"] == k2 and out["kl_mean"] > 0


def test_identities(tiny_checkpoint):
    d, _ = tiny_checkpoint("mixtral")
    same = whatif(d, "--k", json.loads((d / "config.json").read_text())["num_experts_per_tok"].__str__())
    assert same["kl_mean"] == 0 and same["top1_agreement"] == 1
    assert all(l["jaccard_mean"] == 1 for l in same["layers"])
    tiny_p = whatif(d, "--min-p", "1e-9")  # keeps every chosen expert: the original
    assert tiny_p["kl_mean"] == 0 and tiny_p["compute_saved"] == 0
    # Mixtral renormalises its top-k: keeping only the top weight, scaled back to 1, is top-1
    a, b = whatif(d, "--min-p", "1", "--renormalize"), whatif(d, "--k", "1")
    assert a["kl_mean"] == pytest.approx(b["kl_mean"], abs=1e-9)
    assert [l["first_choice_unchanged"] for l in a["layers"]] == [l["first_choice_unchanged"] for l in b["layers"]]


def test_whatif_bad_input_and_gate(tiny_checkpoint):
    d, _ = tiny_checkpoint("mixtral")
    for args, needle in ((["--k", "99"], "between 1 and"), (["--min-p", "0"], "(0, 1]"), ([], "one of --k or --min-p"),
                         (["--k", "1", "--min-p", "0.5"], "one of --k or --min-p"), (["--k", "1", "--renormalize"],
                                                                                      "goes with --min-p")):
        r = run_cli("whatif", "topk", "--model", str(d), "--tokens", "1,2,3", *args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = run_cli("whatif", "topk", "--model", str(d), "--tokens", ",".join(map(str, IDS)), "--k", "1", "--max-kl", "1e-12")
    assert r.returncode == 1 and "gate failed" in r.stderr
