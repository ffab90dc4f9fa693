"""trace of Gemma 4 (gemma4_text: Gemma4ForCausalLM; gemma4: Gemma4ForConditionalGeneration on text-only
input) against transformers 5.23: tiny random checkpoints written by `save_pretrained`, two seeds each.

Randomised beyond the weights: every bias and norm weight (test_trace_text_families.randomize), the
router's `scale` and `per_expert_scale`, and each layer's `layer_scalar` buffer, so a dropped factor shows.
The configs reach every structural path of forward/gemma4.py: per-layer input embeddings, KV sharing
(the last layers read the K/V of the last earlier layer of their type, sliding and full), full layers of
another head size and KV heads (per_layer_config, global_head_dim / num_global_key_value_heads), V = K
(attention_k_eq_v), the double-wide MLP of shared layers, proportional RoPE (partial, and with a
factor), sliding windows shorter than the prompt, final logit soft-capping; and the plain model
(no per-layer inputs, no sharing, default layer types).

Logits within 1e-4 (float32); in every MoE layer the same expert set for every token and gate weights
within 1e-5 (per_expert_scale included), read from the `top_k_index` / `top_k_weights` that
transformers' Gemma4TextExperts modules receive (test_forward_families.reference_routes).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from census_reference import shrunk_config
from fakes import assert_profile_routes_like_traces, DEVICE, assert_matches_transformers
from moetool.forward import run_forward
from moetool.source import resolve
from test_bad_input import run_cli
from test_trace_text_families import randomize, routes_and_logits

T = 40
_SFSSF = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]
# per-layer inputs, KV sharing over both layer types, V = K on full layers of their own head size and
# KV heads, double-wide MLP, partial proportional RoPE, soft-capped logits
_SHARED = dict(model_type="gemma4_text", vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=5,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
               initializer_range=0.2, hidden_size_per_layer_input=8, vocab_size_per_layer_input=128,
               enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=12,
               num_kv_shared_layers=2, attention_k_eq_v=True, use_double_wide_mlp=True, layer_types=_SFSSF,
               per_layer_config={"1": {"head_dim": 16, "num_key_value_heads": 1},
                                 "4": {"head_dim": 16, "num_key_value_heads": 1}},
               sliding_window=4, attention_bias=True, final_logit_softcapping=5.0,
               rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                                   "rope_theta": 1000.0}})
CONFIGS = {
    "gemma4_text": _SHARED,
    # no per-layer inputs, no sharing, the default layer types (last layer forced full) and full-layer
    # dims from global_head_dim / num_global_key_value_heads, proportional RoPE with a factor, top-3
    "gemma4_text-plain": dict(model_type="gemma4_text", vocab_size=128, hidden_size=32, intermediate_size=16,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              global_head_dim=16, num_global_key_value_heads=1, attention_k_eq_v=True,
                              max_position_embeddings=256, initializer_range=0.2, hidden_size_per_layer_input=0,
                              enable_moe_block=True, num_experts=6, top_k_experts=3, moe_intermediate_size=16,
                              sliding_window=5,
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                                               "full_attention": {"rope_type": "proportional", "factor": 2.0,
                                                                  "partial_rotary_factor": 0.25,
                                                                  "rope_theta": 10000.0}}),
    # the census' tiny Gemma4Config (no towers) with this text model
    "gemma4": lambda: {**shrunk_config("gemma4"), "text_config": copy.deepcopy(_SHARED), "initializer_range": 0.2},
}
SEEDS = (0, 1)
CASES = [(n, s) for n in CONFIGS for s in SEEDS]


def _build(config: dict, seed: int):
    import transformers

    torch.manual_seed(seed)
    if config["model_type"] == "gemma4":
        cfg = transformers.Gemma4Config(**{k: v for k, v in config.items() if k != "model_type"})
        return transformers.Gemma4ForConditionalGeneration(cfg).eval()
    return transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(
        **{k: v for k, v in config.items() if k != "model_type"})).eval()


def _randomize(model, seed: int) -> None:
    """randomize (biases, norms), then the router scales and the layer scalars."""
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 4000)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("router.scale", "router.per_expert_scale", "layer_scalar")):
                p.copy_(1.0 + 0.4 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="session")
def gemma4_case(tmp_path_factory):
    """gemma4_case(name, seed) -> (directory, ids, reference logits, reference routes), built once."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            config = CONFIGS[name]() if callable(CONFIGS[name]) else CONFIGS[name]
            model = _build(config, seed)
            _randomize(model, seed)
            d = tmp_path_factory.mktemp(f"{name}-{seed}")
            model.save_pretrained(d)
            ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(seed))
            logits, routes = routes_and_logits(model, ids)
            cache[name, seed] = (d, ids[0].tolist(), logits, routes)
        return cache[name, seed]

    return get


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, gemma4_case):
    d, ids, ref_logits, ref_routes = gemma4_case(name, seed)
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE)
    assert_matches_transformers(out, ref_logits, ref_routes, nonzero=True, varied="every")


def test_profile_blocks_route_as_traces(gemma4_case, tmp_path):
    """`moetool profile` runs several prompts per block (their own masks and positions, per-layer inputs
    and shared K/V per token): each prompt routes as its own trace; the CLI writes the profile."""
    import shutil

    from conftest import write_tokenizer

    d = tmp_path / "g4"
    shutil.copytree(gemma4_case("gemma4_text", 1)[0], d)
    write_tokenizer(d)
    prompts = ["The quick brown fox jumps over the lazy dog. " * 2, "def add(a, b): return a + b", "import os, sys " * 3]
    assert_profile_routes_like_traces(d, tmp_path, prompts, min_tokens=5)  # longer than the sliding window (4)
    (tmp_path / "corpus.txt").write_text("\n".join(prompts) + "\n")
    out = run_cli("profile", str(tmp_path / "corpus.txt"), "--model", str(d), "-o", str(tmp_path / "prof"))
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert summary["command"] == "profile" and [l["layer"] for l in summary["layers"]] == list(range(5))


_VISION = dict(model_type="gemma4_vision", hidden_size=24, intermediate_size=40, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=2, head_dim=12, patch_size=4, position_embedding_size=32)


_AUDIO = dict(model_type="gemma4_audio", hidden_size=18, num_hidden_layers=2, num_attention_heads=4,
              output_proj_dims=24, subsampling_conv_channels=[8, 4], conv_kernel_size=3)
TOWERS = {
    "vision": dict(vision_config=_VISION),
    "vision-clipped": dict(vision_config=dict(_VISION, use_clipped_linears=True, standardize=True,
                                              num_key_value_heads=1, head_dim=16)),
    # hidden 18 over 4 heads: the attention projections are heads * (18 // 4) wide
    "audio": dict(audio_config=_AUDIO),
    "vision-audio-unclipped": dict(vision_config=_VISION, audio_config=dict(_AUDIO, use_clipped_linears=False,
                                                                            hidden_size=16)),
}


@pytest.mark.parametrize("name", list(TOWERS))
def test_tower_count_equals_transformers(name, tmp_path):
    """Gemma4ForConditionalGeneration with a vision and / or audio tower: config-only and header totals
    equal transformers' parameter count, the `vision` / `audio` groups its towers with their embedders;
    the clipping bounds and standardisation buffers are stored, not counted."""
    import moetool

    config = {**shrunk_config("gemma4"), **TOWERS[name]}
    model = _build(config, 0)
    model.save_pretrained(tmp_path)
    total = sum(p.numel() for p in model.parameters())
    tower = lambda *prefixes: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))
    headers, config_only = moetool.count(str(tmp_path)), moetool.count(str(tmp_path / "config.json"))
    assert headers.total_params == config_only.total_params == total
    d = headers.to_dict()
    assert d["breakdown"]["vision"] == tower("model.vision_tower.", "model.embed_vision.")
    assert d["breakdown"]["audio"] == tower("model.audio_tower.", "model.embed_audio.")
    assert not d["breakdown"].get("other") and d["cross_check"]["match"], d["cross_check"]


def test_trace_with_a_vision_tower_runs_the_language_model(tmp_path):
    """A Gemma 4 checkpoint with a vision tower traces text-only prompts (the tower not run, said in
    notes) as transformers' Gemma4ForConditionalGeneration called with input_ids only."""
    from moetool.tracing import trace

    config = {**shrunk_config("gemma4"), "text_config": copy.deepcopy(_SHARED), "vision_config": _VISION,
              "initializer_range": 0.2}
    model = _build(config, 1)
    _randomize(model, 1)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(5))
    logits, routes = routes_and_logits(model, ids)
    assert_matches_transformers(run_forward(resolve(str(tmp_path)), ids[0].tolist(), dtype="float32", device=DEVICE),
                                logits, routes, nonzero=True, varied="every")
    report = trace(tokens=ids[0].tolist()[:8], model=str(tmp_path), device=DEVICE)
    assert any("vision tower is not run" in n for n in report.notes), report.notes


def test_quantize_report_scores_the_experts(gemma4_case, tmp_path):
    """quantize-report runs on the same decoder: every layer's routed experts (the fused
    `experts.gate_up_proj` / `down_proj`) and the dense MLP beside them are scored."""
    import shutil

    from conftest import write_tokenizer
    from moetool import quantize_report

    d = tmp_path / "g4"
    shutil.copytree(gemma4_case("gemma4_text", 0)[0], d)
    write_tokenizer(d)
    rows = quantize_report(str(d), schemes=["int8"], calibration_tokens=48, device=DEVICE).to_dict()["experts"]
    routed = {(r["layer"], r["expert"]) for r in rows if r["expert"] is not None}
    assert {layer for layer, _ in routed} == set(range(5)) and len(routed) > 10
    assert {r["layer"] for r in rows if r["expert"] is None} == set(range(5))  # the dense MLPs
    assert all(r["rel_error"] > 0 for r in rows)


def test_placeholder_tokens_embed_as_pad(tmp_path):
    """Text-only input to Gemma4ForConditionalGeneration: the image / video / audio placeholder ids
    (no pixels or audio given) are embedded as the pad token, per-layer inputs included, as
    transformers' Gemma4Model does; moetool's logits and routes agree on a prompt holding all three."""
    config = {**shrunk_config("gemma4"), "text_config": copy.deepcopy(_SHARED), "initializer_range": 0.2,
              "image_token_id": 5, "video_token_id": 6, "audio_token_id": 7}
    model = _build(config, 0)
    _randomize(model, 0)
    model.save_pretrained(tmp_path)
    ids = torch.randint(8, 128, (1, 24), generator=torch.Generator().manual_seed(3))
    ids[0, [2, 9, 15]] = torch.tensor([5, 6, 7])
    logits, routes = routes_and_logits(model, ids)
    out = run_forward(resolve(str(tmp_path)), ids[0].tolist(), dtype="float32", device=DEVICE)
    assert_matches_transformers(out, logits, routes, nonzero=True)
