"""`moetool prune`: the pruned checkpoint loads in transformers, and its logits equal transformers'
run of the ORIGINAL model with the dropped experts masked out of the router (their router logits
at -inf); moetool counts and traces it too."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_tokenizer

PROMPTS = ["def add(a, b): return a + b", "The quick brown fox jumps over the lazy dog."]
ROUTER = re.compile(r"\.(?:layers|blocks)\.(\d+)\..*(?:\.gate\.weight|router\.weight|router\.layer\.weight)$")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetool", *args], capture_output=True, text=True, timeout=300)


@contextlib.contextmanager
def masked_routers(model, kept: dict[int, list[int]], E: int):
    """Add -inf to the router logits of dropped experts: patch F.linear for the routers' weights only."""
    import torch
    import torch.nn.functional as F

    masks = {}
    for name, p in model.named_parameters():
        m = ROUTER.search(name)
        if m and int(m.group(1)) in kept and p.shape[0] == E:
            mask = torch.full((E,), float("-inf"))
            mask[kept[int(m.group(1))]] = 0.0
            masks[id(p)] = mask
    assert masks, "no router found"
    orig = F.linear

    def linear(x, w, b=None):
        out = orig(x, w, b)
        return out + masks[id(w)].to(out.dtype) if id(w) in masks else out

    F.linear = linear
    try:
        yield len(masks)
    finally:
        F.linear = orig


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "dbrx"])  # per-expert, stacked + bias, [E x F, D]
def test_pruned_checkpoint_equals_masked_original(tiny_checkpoint, tmp_path, family):
    import torch
    import transformers

    src, _ = tiny_checkpoint(family)
    d = tmp_path / "orig"
    shutil.copytree(src, d)
    write_tokenizer(d)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    r = run_cli("trace", "--file", str(prompts), "--model", str(d), "--json", "-o", str(tmp_path / "t.json"))
    assert r.returncode == 0, r.stderr
    cfg = json.loads((d / "config.json").read_text())
    E = json.loads(run_cli("count", str(d), "--json").stdout)["num_experts"]
    keep = E // 2 if E // 2 >= 2 else E - 1
    out = tmp_path / "pruned"
    r = run_cli("prune", str(d), "--profile", str(tmp_path / "t.json"), "--criterion", "frequency", "--keep", str(keep),
                "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    kept = {int(l): v for l, v in rep["kept"].items()}
    # the kept experts are the most frequent of each layer (an independent recount from the trace)
    t = json.loads((tmp_path / "t.json").read_text())
    for j, l in enumerate(t["prompts"][0]["layers"]):
        load = sum(np.bincount(np.array(p["layers"][j]["experts"]).reshape(-1), minlength=E) for p in t["prompts"])
        top = sorted(range(E), key=lambda e: (-load[e], e))[:keep]
        assert kept[l["layer"]] == sorted(top)
    ids = torch.tensor([[3, 17, 42, 5, 99, 8, 64, 1, 23, 77]])
    with torch.no_grad():
        pruned = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        orig = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in orig.parameters())
        lp = pruned(ids).logits
        with masked_routers(orig, kept, E):
            lo = orig(ids).logits
        unmasked = orig(ids).logits
    torch.testing.assert_close(lp, lo, atol=2e-5, rtol=1e-5)
    assert (lp - unmasked).abs().max() > 1e-4  # pruning changed something, the mask mattered
    # moetool reads the pruned checkpoint: exact count, trace equal to transformers
    c = json.loads(run_cli("count", str(out), "--json").stdout)
    assert c["num_experts"] == keep and c["total_params"] == sum(p.numel() for p in pruned.parameters())
    r = run_cli("trace", "--tokens", ",".join(map(str, ids[0].tolist())), "--model", str(out),
                "--save-logits", str(tmp_path / "l.npy"), "--json")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), lp[0].numpy(), atol=1e-4)


def test_prune_report_only_criteria_and_bad_input(tmp_path):
    import moetool

    r = run_cli("trace", PROMPTS[0], "--json", "-o", str(tmp_path / "t.json"))
    assert r.returncode == 0, r.stderr
    r = run_cli("prune", "--profile", str(tmp_path / "t.json"), "--criterion", "weighted-frequency", "--report-only",
                "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    t = json.loads((tmp_path / "t.json").read_text())
    for row in rep["experts"]:  # weighted frequency = sum of the expert's gate weights, recounted from the trace
        l = next(x for x in t["layers"] if x["layer"] == row["layer"])
        w = sum(wt for es, ws in zip(l["experts"], l["weights"]) for e, wt in zip(es, ws) if e == row["expert"])
        assert row["weighted_frequency"] == pytest.approx(w)
        assert row["reap"] is None  # a trace has no expert-output norms
    for args, needle in ((["--criterion", "reap", "--keep", "4", "-o", str(tmp_path / "x")], "no expert-output norms"),
                         (["--keep", "1", "-o", str(tmp_path / "x")], "between top-k"),
                         (["--keep", "4"], "-o DIR"),
                         (["--keep", "4", "--drop-fraction", "0.5", "-o", str(tmp_path / "x")], "one of --keep"),
                         (["--drop-fraction", "1.5", "-o", str(tmp_path / "x")], "[0, 1)"),
                         (["--keep", "4", "-o", str(tmp_path)], "exists")):
        r = run_cli("prune", "--profile", str(tmp_path / "t.json"), *args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "x").exists() and not any(p.name.startswith(".moetool-prune") for p in tmp_path.iterdir())


def test_prune_check_kl(tmp_path):
    """The bundled model pruned 8 -> 6 experts: KL against the original on held-out text, with a gate."""
    r = run_cli("trace", PROMPTS[0], "--json", "-o", str(tmp_path / "t.json"))
    assert r.returncode == 0, r.stderr
    r = run_cli("prune", "--profile", str(tmp_path / "t.json"), "--criterion", "frequency", "--keep", "6",
                "-o", str(tmp_path / "p"), "--check-kl", "--max-kl", "10", "--json")
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)["kl_check"]
    assert c["tokens"] > 100 and 0 < c["kl_mean"] < 10 and 0 <= c["top1_agreement"] <= 1
