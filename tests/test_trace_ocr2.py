"""DeepSeek-OCR-2 (deepseek_ocr2): `count` and text-only `trace` against transformers 5.23.

Its language model is built by transformers from Unlimited-OCR's text modules (GQA attention with
biases, DeepSeek-V2's softmax router, greedy or group-limited, weights times routed_scaling_factor,
shared experts, dense layers per mlp_layer_types) with plain causal attention; moetool runs it as
unlimited_ocr_text (forward/config.py MULTIMODAL_FORWARD). The vision towers (SAM and the Qwen2-style
encoder) are counted, not run. The published layout is DeepSeek-OCR-2's original names (model.layers.*,
one tensor per expert, sam_model.*, qwen2_model.*), which transformers' save_pretrained writes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import moetool
from fakes import save_both_layouts, DEVICE, assert_matches_transformers
from moetool.forward import run_forward
from moetool.source import resolve
from test_forward_families import reference_routes
from test_trace_multimodal import _build, _multimodal, _randomize

T = 40
_TEXT = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_hidden_layers=3,
             intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2,
             num_experts_per_tok=2, mlp_layer_types=["dense", "sparse", "sparse"], routed_scaling_factor=1.7,
             attention_bias=True, mlp_bias=True, max_position_embeddings=256, initializer_range=0.2)
CONFIGS = {
    "deepseek_ocr2": lambda: _multimodal("deepseek_ocr2", _TEXT, initializer_range=0.2),
    # group-limited greedy (2 of 4 groups), three experts a token, every layer sparse, no biases, another theta
    "deepseek_ocr2-group": lambda: _multimodal("deepseek_ocr2", dict(
        _TEXT, topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3,
        mlp_layer_types=["sparse", "sparse", "sparse"], attention_bias=False, mlp_bias=False, n_shared_experts=1,
        rope_parameters=dict(rope_type="default", rope_theta=5000.0)), initializer_range=0.2),
}
SEEDS = (0, 1)
CASES = [(n, s) for n in CONFIGS for s in SEEDS]


@pytest.fixture(scope="session")
def ocr2_checkpoint(tmp_path_factory):
    """ocr2_checkpoint(name, seed) -> (published dir, runtime dir, ids, logits, routes, count)."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            model = _build(CONFIGS[name](), seed)
            _randomize(model, seed)
            d, runtime = save_both_layouts(model, tmp_path_factory, f"{name}-{seed}")
            ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, T),
                                generator=torch.Generator().manual_seed(seed))
            logits, routes = reference_routes(model, ids)
            cache[name, seed] = (d, runtime, ids[0].tolist(), logits, routes, sum(p.numel() for p in model.parameters()))
        return cache[name, seed]

    return get


def _assert_same(out, logits, routes) -> None:
    assert_matches_transformers(out, logits, routes, nonzero=True, varied="every")


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, ocr2_checkpoint):
    d, _, ids, logits, routes, _ = ocr2_checkpoint(name, seed)
    assert any(k.startswith("model.qwen2_model.") for k in json.loads((d / "model.safetensors").read_bytes()[
        8:8 + int.from_bytes((d / "model.safetensors").read_bytes()[:8], "little")]))  # the original names
    _assert_same(run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE, streaming=True), logits, routes)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trace_of_runtime_layout(name, ocr2_checkpoint):
    """The same weights under transformers' in-memory names (fused experts, language_model.*)."""
    _, runtime, ids, logits, routes, _ = ocr2_checkpoint(name, 0)
    _assert_same(run_forward(resolve(str(runtime)), ids, dtype="float32", device=DEVICE), logits, routes)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_count_matches_transformers(name, ocr2_checkpoint):
    d, runtime, _, _, _, tf_count = ocr2_checkpoint(name, 0)
    r = moetool.count(str(d))
    assert r.total_params == moetool.count(str(d), use_headers=False).total_params == tf_count
    assert moetool.count(str(runtime)).total_params == tf_count
    assert r.breakdown["vision"] > 0 and "other" not in r.breakdown


def test_config_without_mlp_layer_types_is_counted_with_a_note(tmp_path):
    """transformers cannot build a DeepSeek-OCR-2 config without mlp_layer_types; moetool counts it as
    DeepSeek-OCR's layout (dense first layer) and says so; with the list it equals transformers."""
    from census_reference import build, param_count, shrunk_config

    cfg = shrunk_config("deepseek_ocr2")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert moetool.count(str(tmp_path)).total_params == param_count(build("deepseek_ocr2", cfg))
    assert cfg["text_config"]["mlp_layer_types"] == ["dense", "sparse", "sparse"]
    del cfg["text_config"]["mlp_layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = moetool.count(str(tmp_path))
    assert r.total_params == param_count(build("deepseek_ocr2", shrunk_config("deepseek_ocr2")))
    assert any("no mlp_layer_types" in n for n in r.notes)


def test_trace_cli_says_the_towers_are_not_run(ocr2_checkpoint):
    d, _, ids, _, routes, _ = ocr2_checkpoint("deepseek_ocr2", 0)
    args = [sys.executable, "-m", "moetool", "trace", "--model", str(d), "--tokens", ",".join(map(str, ids[:8]))]
    r = subprocess.run(args + ["--format", "json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [layer["layer"] for layer in out["layers"]] == sorted(routes)
    assert "text-only input: the vision tower is not run; the trace is of the language model" in out["notes"]


def test_profile_runs(ocr2_checkpoint, tmp_path):
    """moetool profile (the same Decoder, prompts in blocks) routes each prompt as its own trace does."""
    import pyarrow.parquet as pq

    from conftest import write_tokenizer
    from moetool.profile.engine import profile
    from moetool.tracing import trace

    d = tmp_path / "ocr2"
    shutil.copytree(ocr2_checkpoint("deepseek_ocr2", 1)[0], d)
    write_tokenizer(d)
    prompts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b): return a + b"]
    profile(prompts, model=str(d), block_tokens=200, device=DEVICE, per_token=str(tmp_path / "t.parquet"))
    rows = pq.read_table(tmp_path / "t.parquet").to_pandas()
    for i, text in enumerate(prompts):
        t = trace(text, model=str(d), device=DEVICE)
        assert t.layers
        for l in t.layers:
            got = rows[(rows.prompt_index == i) & (rows.layer == l.layer)].sort_values(["token_index", "slot"])
            assert got.expert.to_numpy().reshape(len(t.tokens), -1).tolist() == l.experts
