"""trace of StepFun Step-3.7 (Step3p7ForConditionalGeneration) with text-only input, against
transformers 5.23: tiny random checkpoints written by `save_pretrained` (the published layout: stacked
`moe.{gate,up,down}_proj.weight` experts, `moe.gate.weight` + `moe.router_bias`, `share_expert.*`) and
under transformers' in-memory names; two seeds; biases, the router's correction bias and every (1 + w)
norm weight randomised (tests/test_trace_text_families.py's `randomize`), initializer_range 0.2 so that
routing depends on the token in every MoE layer (asserted).

Logits within 1e-4 (float32) and, in every MoE layer, the same expert set for every token and gate
weights within 1e-5, read from the `top_k_index` / `top_k_weights` that transformers' experts module
receives (tests/test_forward_families.py's `reference_routes`). moe_router_scaling_factor scales the
routed sum after that module in both implementations, so the gate weights compare unscaled.

The configs switch on what Step-3.7 adds: sliding layers (window 5 of 40 tokens) with their own head
count (per_layer_config), RoPE per layer type (partial on full layers), query_pre_attn_scalar, a sigmoid
output gate per head or per channel, per-layer SwiGLU clamps of the routed and shared experts and the
dense MLP (bounds small enough to cut in), dense and MoE layers by mlp_layer_types.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import moetool
from census_reference import _merge, shrunk_config
from fakes import save_both_layouts, assert_profile_routes_like_traces, DEVICE, assert_matches_transformers
from moetool.forward import run_forward
from moetool.source import resolve
from test_bad_input import run_cli
from test_forward_families import reference_routes
from test_trace_text_families import randomize

T = 40
_SWA4 = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
_TEXT = dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             vocab_size=128, intermediate_size=48, moe_intermediate_size=16, share_expert_dim=24, initializer_range=0.2,
             layer_types=_SWA4, sliding_window=5, mlp_layer_types=["dense", "sparse", "sparse", "sparse"])

CONFIGS: dict[str, dict] = {
    # per-head gate, sliding layers with 2 heads, partial RoPE on full layers, clamps on some layers
    # (0: none), routed sum times 2, query_pre_attn_scalar apart from head_dim
    "step3p7": dict(_TEXT, n_routed_experts=8, num_experts_per_tok=2, query_pre_attn_scalar=12,
                    swiglu_limits=[0, 0.5, 0, 2.0], swiglu_limits_shared=[0.3, 0, 0.4, 0], moe_router_scaling_factor=2.0,
                    per_layer_config={"0": {"num_attention_heads": 2}, "2": {"num_attention_heads": 2}},
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5e5,
                                                        "partial_rotary_factor": 0.5},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    # attention biases, top-3 of 6, no clamps, sliding heads from num_sliding_attention_heads, a dense
    # layer between MoE layers, tied head
    "step3p7-tied": dict(_TEXT, n_routed_experts=6, num_experts_per_tok=3, gating="per-head", attention_bias=True,
                            num_sliding_attention_heads=6, mlp_layer_types=["sparse", "dense", "sparse", "sparse"],
                            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0,
                                                                   "partial_rotary_factor": 0.5}}),
}
TIED = {"step3p7-tied"}
SEEDS = (0, 1)
CASES = [(n, s) for n in CONFIGS for s in SEEDS]


def full_config(name: str) -> dict:
    """The census' tiny Step-3.7 (its vision tower) with this text model."""
    cfg = shrunk_config("step3p7")
    text = {k: v for k, v in cfg["text_config"].items() if k not in ("per_layer_config", "num_sliding_attention_heads",
                                                                     "query_pre_attn_scalar")}
    cfg["text_config"] = _merge(text, copy.deepcopy(CONFIGS[name]))
    return {**cfg, "initializer_range": 0.2, "tie_word_embeddings": name in TIED}


def _build(config: dict, seed: int):
    import transformers

    torch.manual_seed(seed)
    return transformers.Step3p7ForConditionalGeneration(transformers.AutoConfig.for_model(**config)).eval()


@pytest.fixture(scope="session")
def step_checkpoint(tmp_path_factory):
    """step_checkpoint(name, seed) -> (published dir, runtime dir, ids, logits, routes, transformers' count)."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            model = _build(full_config(name), seed)
            randomize(model, seed)
            d, runtime = save_both_layouts(model, tmp_path_factory, f"{name}-{seed}")
            ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(seed))
            logits, routes = reference_routes(model, ids)
            cache[name, seed] = (d, runtime, ids[0].tolist(), logits, routes, sum(p.numel() for p in model.parameters()))
        return cache[name, seed]

    return get


def _same(out, logits, routes) -> None:
    assert_matches_transformers(out, logits, routes, nonzero=True, varied="every")


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, step_checkpoint):
    d, _, ids, logits, routes, _ = step_checkpoint(name, seed)
    _same(run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE, streaming=True), logits, routes)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trace_of_runtime_layout(name, step_checkpoint):
    """The same weights under transformers' names (model.language_model.*, experts gate_up_proj [E, 2F, D])."""
    _, runtime, ids, logits, routes, _ = step_checkpoint(name, 0)
    _same(run_forward(resolve(str(runtime)), ids, dtype="float32", device=DEVICE), logits, routes)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_count_matches_transformers(name, step_checkpoint):
    d, _, _, _, _, tf_count = step_checkpoint(name, 0)
    from_headers, from_config = moetool.count(str(d)), moetool.count(str(d), use_headers=False)
    assert from_headers.total_params == from_config.total_params == tf_count


def test_legacy_config_keys(step_checkpoint, tmp_path):
    """Step-3.7-Flash's hub config.json spells the schedule and RoPE the old way (moe_layers_enum,
    attention_other_setting, rope_theta / partial_rotary_factors per layer, lists padded with the MTP
    layer): transformers reads it to the same model, and moetool traces it as transformers runs it."""
    import transformers

    d, _, ids, _, _, _ = step_checkpoint("step3p7", 1)
    config = json.loads((d / "config.json").read_text())
    text = config["text_config"]
    for key in ("rope_parameters", "mlp_layer_types", "per_layer_config", "num_sliding_attention_heads"):
        text.pop(key, None)
    text.update(moe_layers_enum="1,2,3", attention_other_setting={"num_attention_heads": 2},
                rope_theta=[1e4, 5e5, 1e4, 5e5, 5e5], partial_rotary_factors=[1.0, 0.5, 1.0, 0.5, 0.5],
                layer_types=_SWA4 + ["full_attention"], swiglu_limits=[0, 0.5, 0, 2.0, 0],
                swiglu_limits_shared=[0.3, 0, 0.4, 0, 0], num_nextn_predict_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(d / "model.safetensors", tmp_path / "model.safetensors")
    model = transformers.Step3p7ForConditionalGeneration.from_pretrained(tmp_path).eval()
    theirs = model.config.text_config
    assert theirs.mlp_layer_types == ["dense", "sparse", "sparse", "sparse"] and theirs.layer_types == _SWA4
    assert theirs.rope_parameters["full_attention"]["partial_rotary_factor"] == 0.5
    logits, routes = reference_routes(model, torch.tensor([ids]))
    _same(run_forward(resolve(str(tmp_path)), ids, dtype="float32", device=DEVICE), logits, routes)


def test_sliding_windows_as_transformers_cache(step_checkpoint):
    """count's per-layer KV windows (and so its KV cache) are transformers' cache layers: sliding on
    the `sliding_attention` layers only (they were full before)."""
    import transformers
    from transformers.cache_utils import DynamicSlidingWindowLayer

    d, _, _, _, _, _ = step_checkpoint("step3p7", 0)
    config = json.loads((d / "config.json").read_text())
    spec = moetool.arch.spec_from_config(config, None)
    cache = transformers.DynamicCache(config=transformers.AutoConfig.from_pretrained(d).get_text_config())
    theirs = [5 if isinstance(l, DynamicSlidingWindowLayer) else None for l in cache.layers]
    assert [l.window for l in spec.layers] == theirs == [5, None, 5, None]


def test_trace_cli_notes_the_vision_tower(step_checkpoint):
    d, _, ids, _, routes, _ = step_checkpoint("step3p7", 0)
    r = run_cli("trace", "--model", str(d), "--tokens", ",".join(map(str, ids[:8])), "--format", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [layer["layer"] for layer in out["layers"]] == sorted(routes)
    assert out["notes"] == ["text-only input: the vision tower is not run; the trace is of the language model"]


@pytest.mark.parametrize("key,value", [("use_bidirectional_attention", True), ("gating", "per-element")])
def test_unverifiable_variants_refused(key, value, step_checkpoint, tmp_path):
    """Bidirectional attention (not implemented), and a gate per channel: transformers 5.23 cannot run
    that one (Step3p7Attention multiplies [.., H, Dh] by the gate unsqueezed to [.., H * Dh, 1]), so
    there is no reference to match. Refused in one line."""
    d, _, _, _, _, _ = step_checkpoint("step3p7", 0)
    config = json.loads((d / "config.json").read_text())
    config["text_config"][key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(d / "model.safetensors", tmp_path / "model.safetensors")
    r = run_cli("trace", "--model", str(tmp_path), "--tokens", "1,2,3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and key in r.stderr


def test_profile_runs(step_checkpoint, tmp_path):
    """moetool profile (blocks of prompts on the same Decoder) routes each prompt as its own trace."""

    from conftest import write_tokenizer

    d = tmp_path / "step"
    shutil.copytree(step_checkpoint("step3p7", 0)[0], d)
    write_tokenizer(d)
    prompts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b): return a + b", "import os, sys " * 3]
    assert_profile_routes_like_traces(d, tmp_path, prompts, min_tokens=5)  # longer than the sliding window
