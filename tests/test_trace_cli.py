"""`moetool trace`: the JSON contract (checked against transformers' router choices), the
per-token view, --save-logits (checked against transformers' logits), --tokens, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import write_tokenizer
from fakes import DEVICE, build_transformers_model, randomize_biases, transformers_routes
from test_bad_input import run_cli


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    from conftest import ALL_TINY

    d = tmp_path_factory.mktemp("qwen3")
    model = build_transformers_model(ALL_TINY["qwen3_moe"], seed=5).eval()
    randomize_biases(model, 5)
    model.save_pretrained(d)
    write_tokenizer(d)
    return d, model


def test_trace_json_contract_and_fidelity(qwen_ckpt, tmp_path):
    d, model = qwen_ckpt
    logits_path = tmp_path / "logits.npy"
    r = run_cli("trace", "def add(a, b): return a + b", "--model", str(d), "--json", "--save-logits", str(logits_path),
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert list(out)[:2] == ["schema_version", "command"] and out["command"] == "trace"
    assert out["model_type"] == "qwen3_moe" and out["num_experts"] == 8 and out["top_k"] == 2
    ids = [t["id"] for t in out["tokens"]]
    assert [t["index"] for t in out["tokens"]] == list(range(len(ids)))
    assert "".join(t["text"] for t in out["tokens"]) == "def add(a, b): return a + b"

    ref_logits, ref_routes = transformers_routes(model, torch.tensor([ids]))
    assert [l["layer"] for l in out["layers"]] == sorted(ref_routes)
    for l in out["layers"]:
        idx, w = ref_routes[l["layer"]]
        for t in range(len(ids)):
            assert sorted(l["experts"][t]) == sorted(idx[t].tolist())
            assert len(l["weights"][t]) == 2 and l["weights"][t][0] >= l["weights"][t][1] - 1e-7
    saved = np.load(logits_path)
    assert saved.dtype == np.float32 and saved.shape == (len(ids), 128)
    assert np.abs(saved - ref_logits.numpy()).max() < 1e-4


def test_trace_tokens_and_table(qwen_ckpt):
    d, _ = qwen_ckpt
    r = run_cli("trace", "--model", str(d), "--tokens", "5,6,7", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "L0" in r.stdout and "L1" in r.stdout and "3 tokens" in r.stdout


def test_trace_dataframe(qwen_ckpt):
    import moetool

    d, _ = qwen_ckpt
    t = moetool.trace(model=str(d), tokens=[1, 2, 3, 4], device=DEVICE)
    df = t.to_dataframe()
    assert list(df.columns) == ["prompt_index", "layer", "token_index", "token_id", "token", "generated", "slot",
                                "expert", "weight"]
    assert len(df) == 2 * 4 * 2  # layers x tokens x slots


@pytest.mark.parametrize("args,needle", [
    (["--tokens", "1,x"], "--tokens"),
    (["--tokens", "999999"], "outside the vocabulary"),
    (["--tokens", ",".join(["1"] * 300)], "context"),
    (["--tokens", "1,2", "--save-logits", "out.txt"], ".npy"),
    (["--tokens", "1,2", "--device", "cuda"], None),
])
def test_trace_bad_input(qwen_ckpt, args, needle):
    d, _ = qwen_ckpt
    if args[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = run_cli("trace", "--model", str(d), *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    if needle:
        assert needle in r.stderr


def test_trace_no_tokenizer(tiny_checkpoint):
    d, _ = tiny_checkpoint("mixtral")
    r = run_cli("trace", "hello", "--model", str(d))
    assert r.returncode == 2 and "tokenizer.json" in r.stderr and "--tokens" in r.stderr


def test_trace_missing_tensor(tiny_checkpoint, tmp_path):
    """A checkpoint missing a tensor the spec needs: one line, exit 2."""
    from safetensors.torch import load_file, save_file

    d, _ = tiny_checkpoint("mixtral")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    r = run_cli("trace", "--model", str(tmp_path), "--tokens", "1,2,3")
    assert r.returncode == 2 and "k_proj" in r.stderr and r.stderr.count("\n") == 1


def test_trace_pickle_and_sample_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04.")
    r = run_cli("trace", "--model", str(tmp_path), "--tokens", "1")
    assert r.returncode == 2 and "never unpickles" in r.stderr
    r = run_cli("trace", "--model", "mixtral-8x7b", "--tokens", "1")
    assert r.returncode == 2 and "without weights" in r.stderr


def test_trace_unsupported_family(tiny_checkpoint):
    d, _ = tiny_checkpoint("llama")  # a dense model (switch_transformers traces: tests/test_trace_encdec.py)
    r = run_cli("trace", "--model", str(d), "--tokens", "1,2")
    assert r.returncode == 2 and "no reference forward" in r.stderr
