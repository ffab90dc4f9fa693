"""The bundled default model: small enough, loads in transformers with the same logits as our
forward, and every command works on it with no model named. Also runs the CI recipe of
docs/ci.md against it and against a copy whose router collapses onto one expert."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from moetool.source import default_model_dir
from test_bad_input import run_cli
from fakes import DEVICE

PROBE = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)"


def test_bundled_files_and_size():
    d = default_model_dir()
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert sum(p.stat().st_size for p in d.iterdir()) <= 12 * 1024 * 1024


def test_same_logits_as_transformers():
    import transformers
    from tokenizers import Tokenizer

    from moetool.forward import run_forward
    from moetool.source import resolve

    d = default_model_dir()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    ids = Tokenizer.from_file(str(d / "tokenizer.json")).encode(PROBE).ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    ours = run_forward(resolve(None), ids, device=DEVICE)
    assert (ours.logits - ref).abs().max().item() < 1e-4
    assert int(ours.logits[-1].argmax()) == int(ref[-1].argmax())


def test_commands_default_to_the_bundled_model():
    import transformers

    r = run_cli("count", "--json")
    assert r.returncode == 0 and "bundled default model" in r.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(str(default_model_dir()))
    assert json.loads(r.stdout)["total_params"] == sum(p.numel() for p in model.parameters())
    r = run_cli("trace", "--device", "cpu")
    assert r.returncode == 0 and "built-in example" in r.stderr and "L0" in r.stdout
    r = run_cli("trace", "def add(a, b): return a + b", "--json", "--device", "cpu")
    out = json.loads(r.stdout)
    assert out["model"] == "moetool-default" and out["num_experts"] == 8 and len(out["layers"]) == 4


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory):
    """A 'fine-tune' whose routers send every token to expert 0 first."""
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("collapsed")
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(default_model_dir() / f, d / f)
    t = load_file(str(default_model_dir() / "model.safetensors"))
    for name in t:
        if name.endswith("block_sparse_moe.gate.weight"):
            w = t[name].float()
            w[0] = w.abs().max() * 50 * torch.sign(torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0)))
            w[1:] *= 0.0
            t[name] = w.to(torch.bfloat16)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_ci_recipe(collapsed, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROBE.replace("\n", " ") + "\nThe for statement is used to iterate over a sequence.\n")
    gates = ["--max-dead-experts", "0", "--max-imbalance", "3", "--device", "cpu", "--format", "json"]
    base = run_cli("trace", "--file", str(prompts), *gates, "-o", str(tmp_path / "base-trace.json"))
    assert base.returncode == 0, base.stderr
    tuned = run_cli("trace", "--model", str(collapsed), "--file", str(prompts), *gates,
                    "-o", str(tmp_path / "tuned-trace.json"))
    assert tuned.returncode == 1 and "gate failed" in tuned.stderr
    report = json.loads((tmp_path / "tuned-trace.json").read_text())
    assert not report["gate"]["passed"] and report["gate"]["violations"]
    a = run_cli("trace", PROBE, "--device", "cpu", "--logits", "--json")
    b = run_cli("trace", PROBE, "--model", str(collapsed), "--device", "cpu", "--logits", "--json")
    (tmp_path / "a.json").write_text(a.stdout)
    (tmp_path / "b.json").write_text(b.stdout)
    same = run_cli("diff", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--max-first-choice-change", "0.5")
    assert same.returncode == 0
    moved = run_cli("diff", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--max-first-choice-change", "0.5")
    assert moved.returncode == 1
