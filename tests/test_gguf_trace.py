"""GGUF in `trace`: an F32 GGUF traces exactly like the safetensors checkpoint it was converted
from (identical routing, logits within 1e-4); a quantized GGUF (Q8_0, MXFP4 experts) traces like
transformers' forward of the weights gguf.quants dequantises; only the chosen experts are read;
llama.cpp's semantics where the file says nothing (Qwen3-MoE renormalises); the tokenizer rebuilt
from the GGUF's arrays encodes like tokenizer.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from fakes import DEVICE, TINY_CONFIGS, build_transformers_model, randomize_biases, transformers_routes
from gguf_convert import dequantized_model, write_gguf
from moetool.forward import run_forward
from moetool.source import resolve

CONFIGS = dict(TINY_CONFIGS)
IDS = [3, 17, 99, 4, 56, 120, 7, 7, 31, 64, 2, 88, 45, 101, 9, 77]


def _convert(tmp_path, name: str, qtype=Q.F32, expert_qtype=None, cfg=None, seed=0, **kw):
    cfg = cfg or CONFIGS[name]
    model = build_transformers_model(cfg, seed=seed).eval()
    randomize_biases(model, seed)
    model.save_pretrained(tmp_path / "st")
    path = write_gguf(tmp_path / "m.gguf", model, cfg, qtype, expert_qtype=expert_qtype, **kw)[0]
    return model, cfg, tmp_path / "st", path


def _same_routes(a, b, weights_tol=1e-5):
    assert [r.layer for r in a.routes] == [r.layer for r in b.routes]
    for x, y in zip(a.routes, b.routes):
        assert torch.equal(x.experts, y.experts), f"layer {x.layer}"
        assert (x.weights - y.weights).abs().max().item() < weights_tol


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe-bias", "deepseek_v2", "deepseek_v3", "gpt_oss"])
def test_f32_gguf_traces_like_safetensors(tmp_path, name):
    _, _, st, path = _convert(tmp_path, name)
    a = run_forward(resolve(str(st)), IDS, device=DEVICE)
    b = run_forward(resolve(str(path)), IDS, device=DEVICE)
    _same_routes(a, b)
    assert (a.logits - b.logits).abs().max().item() < 1e-4


def test_per_expert_tensors_of_old_mixtral_files(tmp_path):
    """GGUFs converted before llama.cpp stacked the experts hold blk.N.ffn_gate.E.weight: counted
    and traced like the stacked form."""
    import moetool
    from fakes import transformers_param_count

    model, _, st, path = _convert(tmp_path, "mixtral", Q.Q8_0, per_expert=True)
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in resolve(str(path)).tensors
    r = moetool.count(str(path))
    assert r.total_params == transformers_param_count(model) and r.cross_check["match"]
    stacked = write_gguf(tmp_path / "stacked.gguf", model, CONFIGS["mixtral"], Q.Q8_0)[0]
    a, b = run_forward(resolve(str(stacked)), IDS, device=DEVICE), run_forward(resolve(str(path)), IDS, device=DEVICE)
    _same_routes(a, b)
    assert torch.equal(a.logits, b.logits)


def test_deepseek_yarn(tmp_path):
    """DeepSeek's YaRN: factor, original context and mscale (from yarn_log_multiplier) round-trip."""
    from fakes import FORWARD_VARIANTS

    cfg = dict(FORWARD_VARIANTS)["deepseek_v3-yarn"]
    _, _, st, path = _convert(tmp_path, "deepseek_v3", cfg=cfg)
    rs = resolve(str(path)).config["rope_scaling"]
    assert (rs["rope_type"], rs["factor"], rs["mscale_all_dim"]) == ("yarn", 4.0, 1.0)
    a = run_forward(resolve(str(st)), IDS, device=DEVICE)
    b = run_forward(resolve(str(path)), IDS, device=DEVICE)
    _same_routes(a, b)
    assert (a.logits - b.logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2"])
def test_mla_split_into_k_b_and_v_b(tmp_path, name):
    """Newer converters store DeepSeek's kv_b_proj as attn_k_b (transposed) + attn_v_b: counted and
    traced like the original."""
    import moetool
    from fakes import transformers_param_count

    model, _, st, path = _convert(tmp_path, name, split_kv_b=True)
    ckpt = resolve(str(path))
    assert any(n.endswith("k_b_proj.weight") for n in ckpt.tensors) and not any("kv_b" in n for n in ckpt.tensors)
    r = moetool.count(str(path))
    assert r.total_params == transformers_param_count(model) and r.cross_check["match"]
    a = run_forward(resolve(str(st)), IDS, device=DEVICE)
    b = run_forward(ckpt, IDS, device=DEVICE)
    _same_routes(a, b)
    assert (a.logits - b.logits).abs().max().item() < 1e-4


def test_qwen3_moe_renormalises_like_llama_cpp(tmp_path):
    """transformers' Qwen3-MoE default is norm_topk_prob=False; llama.cpp always renormalises:
    same experts, weights divided by their sum."""
    _, cfg, st, path = _convert(tmp_path, "qwen3_moe")
    assert not cfg.get("norm_topk_prob")
    a = run_forward(resolve(str(st)), IDS, device=DEVICE)
    b = run_forward(resolve(str(path)), IDS, device=DEVICE)
    x, y = a.routes[0], b.routes[0]  # (later layers see the first one's different output)
    assert torch.equal(x.experts, y.experts)
    assert torch.allclose(x.weights / x.weights.sum(-1, keepdim=True), y.weights, atol=1e-6)
    assert not torch.allclose(x.weights, y.weights, atol=1e-3)


# Dimensions that are whole Q8_0 / MXFP4 blocks (32), so every matrix is really quantized.
QCFG = {
    "mixtral": dict(CONFIGS["mixtral"], hidden_size=64, intermediate_size=64),
    "deepseek_v3": dict(CONFIGS["deepseek_v3"], hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32),
    "gpt_oss": dict(CONFIGS["gpt_oss"], hidden_size=64, intermediate_size=64, head_dim=16),
    "qwen3_moe-bias": dict(CONFIGS["qwen3_moe-bias"], hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                           head_dim=32, vocab_size=128),
}


@pytest.mark.parametrize("name,qtype,expert_q", [("mixtral", Q.Q8_0, None), ("deepseek_v3", Q.Q8_0, None),
                                                 ("gpt_oss", Q.Q8_0, Q.MXFP4), ("qwen3_moe-bias", Q.Q8_0, Q.Q4_0)])
def test_quantized_gguf_traces_like_its_dequantized_weights(tmp_path, name, qtype, expert_q):
    model, cfg, _, path = _convert(tmp_path, name, qtype, expert_q, cfg=QCFG[name], seed=1)
    ref = dequantized_model(model, {**model.config.to_dict(), **cfg}, qtype, expert_q)
    ref_logits, ref_routes = transformers_routes(ref, torch.tensor([IDS]))
    ckpt = resolve(str(path))
    assert set(ckpt.stats.bytes_by_dtype()) >= {qtype.name} | ({expert_q.name} if expert_q else set())
    out = run_forward(ckpt, IDS, device=DEVICE)
    assert (out.logits - ref_logits).abs().max().item() < 1e-4
    for r in out.routes:
        idx, w = ref_routes[r.layer]
        for t in range(len(IDS)):
            ours = dict(zip(r.experts[t].tolist(), r.weights[t].tolist()))
            theirs = dict(zip(idx[t].tolist(), w[t].float().tolist()))
            assert set(ours) == set(theirs)
            assert all(abs(ours[e] - theirs[e]) < 1e-5 for e in ours)
    # and quantization really changed the model
    assert (transformers_routes(model, torch.tensor([IDS]))[0] - ref_logits).abs().max().item() > 1e-4


def test_only_the_chosen_experts_are_read(tmp_path):
    _, cfg, _, path = _convert(tmp_path, "mixtral-tied", Q.Q8_0, cfg=CONFIGS["mixtral-tied"])
    ckpt = resolve(str(path))
    out = run_forward(ckpt, IDS[:1], device=DEVICE)  # one token: k of E experts per layer
    experts = {n: t for n, t in ckpt.tensors.items() if ".mlp.experts." in n}
    total = sum(t.end - t.begin for t in ckpt.tensors.values())
    E, k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    unread = sum((t.end - t.begin) // E * (E - k) for t in experts.values())
    embed = ckpt.tensors["model.embed_tokens.weight"]
    assert out.bytes_read == total - unread + (embed.end - embed.begin)  # tied: the embedding is read again as the head
    assert {len(r.experts[0]) for r in out.routes} == {k}


def test_tokenizer_from_gguf_arrays(tmp_path_factory):
    from tokenizers import Tokenizer

    from gguf_convert import tiny_gguf
    from moetool.tracing import load_tokenizer

    path, st, _, _ = tiny_gguf(tmp_path_factory, "qwen3_moe", Q.F32, tokenizer=True)
    assert not (path.parent / "tokenizer.json").exists()
    ours = load_tokenizer(resolve(str(path)))
    ref = Tokenizer.from_file(str(st / "tokenizer.json"))
    for text in ("def add(a, b): return a + b", "The quick brown fox", "import os, sys\n  x = 1", "zebra ü 42"):
        assert ours.encode(text).ids == ref.encode(text).ids, text
        ids = ref.encode(text).ids
        assert ours.decode(ids) == ref.decode(ids)


def test_trace_cli_on_gguf(tmp_path_factory):
    from gguf_convert import tiny_gguf

    path = tiny_gguf(tmp_path_factory, "qwen3_moe", Q.Q8_0, tokenizer=True)[0]
    r = subprocess.run([sys.executable, "-m", "moetool", "trace", "The quick brown fox", "--model", str(path), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["command"] == "trace" and len(d["layers"]) == 2 and d["tokens"][0]["text"]


def test_profile_of_a_gguf_equals_the_safetensors_profile(tmp_path):
    """`moetool profile` runs on a GGUF through the same store factory as trace: the bundled model
    converted to F32 GGUF gives the loads and co-activations of its safetensors original."""
    import json
    import subprocess
    import sys

    import torch
    import transformers

    from gguf_convert import tokenizer_arrays, write_gguf

    d = Path(__file__).resolve().parents[1] / "moetool" / "data" / "default"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    write_gguf(tmp_path / "m.gguf", model, json.loads((d / "config.json").read_text()),
               tokenizer=tokenizer_arrays(d / "tokenizer.json"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("def add(a, b): return a + b\nThe quick brown fox jumps over the lazy dog.\nimport os, sys\n")
    out = {}
    for name, m in (("gguf", tmp_path / "m.gguf"), ("st", d)):
        r = subprocess.run([sys.executable, "-m", "moetool", "profile", str(corpus), "--model", str(m), "-o",
                            str(tmp_path / name)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        out[name] = json.loads((tmp_path / name / "profile.json").read_text())
    assert out["gguf"]["tokens"] == out["st"]["tokens"] > 0
    for a, b in zip(out["gguf"]["layers"], out["st"]["layers"]):
        assert a["load"] == b["load"]
        assert a["metrics"]["coactivation_top_pairs"] == b["metrics"]["coactivation_top_pairs"]
