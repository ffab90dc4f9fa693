"""trace of Inkling (`inkling_text`), Inkling 2 (`inkling2_text`) and Inkling 2's image-text model
(`inkling2`, text-only input: the vision tower is not run) against transformers 5.23: tiny random
checkpoints written by `save_pretrained` from the class the census picks (InklingForCausalLM,
Inkling2ForCausalLM, Inkling2ForConditionalGeneration), two seeds each.

Randomised beyond the init: biases, the correction bias and every norm weight
(test_trace_text_families.randomize), the router's and the dense MLP's `global_scale`, the L2-clip
scales, the block attention residual queries (zero at init: a uniform mix), the dynamic convolutions'
static taps; initializer_range 0.2 so routing depends on the token (asserted in every MoE layer).
The configs make every feature cut in on 40 tokens: windows of 5, relative tables shorter than the
prompt (rel_extent 12), log scaling from position 4, L2 clips, SwiGLU soft-caps and the logit soft-cap
below the values the tiny models produce, a head padded past unpadded_vocab_size.

Logits within 1e-4 (float32), the same expert set for every token in every MoE layer and gate weights
within 1e-5, read by a pre-hook on transformers' experts modules (test_forward_families.reference_routes).
"""

from __future__ import annotations

import copy

import pytest
import torch

from census_reference import _merge, shrunk_config
from fakes import assert_profile_routes_like_traces, DEVICE, assert_matches_transformers
from moetool.forward import run_forward
from moetool.source import resolve
from test_forward_families import reference_routes
from test_trace_multimodal import _build as build_model
from test_trace_text_families import randomize as randomize_text

T = 40
SEEDS = (0, 1)
_ATT = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, swa_num_attention_heads=4,
            swa_num_key_value_heads=1, swa_head_dim=16, vocab_size=128, d_rel=4, initializer_range=0.2,
            max_position_embeddings=256)
# Inkling: a dense first layer, sliding and full layers of other head shapes, log scaling on the full layers.
INKLING = dict(model_type="inkling_text", num_hidden_layers=4, sliding_window_size=5, rel_extent=12,
               n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, moe_intermediate_size=16,
               intermediate_size=48, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
               layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"], log_scaling_n_floor=4,
               route_scale=2.5, **_ATT)
# Inkling 2: block attention residuals every 2 layers, two full layers (dynamic K/V convolutions, three queries).
INKLING2 = dict(model_type="inkling2_text", num_hidden_layers=5, sliding_window_size=5, rel_extent=12,
                n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid_sliding", "hybrid"],
                n_layers_per_attn_res_block=2, log_scaling_n_floor=4, qk_l2_clip_threshold=1.0,
                rel_l2_clip_threshold=0.5, mlp_gate_softcap=1.0, mlp_up_softcap=2.0, final_logit_softcapping=3.0,
                unpadded_vocab_size=120, route_scale=2.0, eos_token_id=2, **_ATT)

FAMILIES = {
    "inkling_text": INKLING,
    # the default layer pattern from local_layer_ids, kernel 3, no log scaling, a padded head, top-3 of 6, one shared
    "inkling_text-b": dict(INKLING, layer_types=None, local_layer_ids=[0, 2], mlp_layer_types=None,
                           conv_kernel_size=3, log_scaling_n_floor=None, unpadded_vocab_size=100, n_routed_experts=6,
                           num_experts_per_tok=3, n_shared_experts=1, logits_mup_width_multiplier=4.0),
    "inkling2_text": INKLING2,
    # a full first layer (no attention residual before it), blocks of 3, kernel 2, top-3 of 6
    "inkling2_text-b": dict(INKLING2, num_hidden_layers=4, layer_types=["hybrid", "hybrid_sliding", "hybrid_sliding",
                                                                        "hybrid"],
                            n_layers_per_attn_res_block=3, conv_kernel_size=2, n_routed_experts=6,
                            num_experts_per_tok=3, unpadded_vocab_size=128),
    "inkling2": lambda: _multimodal("inkling2", INKLING2),
    # Inkling's image-text-audio model as published: model.llm.*, gate and up interleaved in w13 tensors
    "inkling_mm_model": lambda: _multimodal("inkling_mm_model", INKLING),
}
CASES = [(n, s) for n in FAMILIES for s in SEEDS]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread (more spin-wait on a busy 2-core machine: 10-50x the time)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _multimodal(model_type: str, text: dict) -> dict:
    """The census' tiny config of `model_type` (its vision tower) with this text model."""
    cfg = shrunk_config(model_type)
    cfg["text_config"] = _merge(cfg["text_config"], copy.deepcopy(text))
    cfg["vision_config"]["text_hidden_size"] = text["hidden_size"]
    return cfg


def config_of(name: str) -> dict:
    c = FAMILIES[name]
    return c() if callable(c) else {k: v for k, v in c.items() if v is not None}


def randomize(model, seed: int) -> None:
    """test_trace_text_families.randomize, plus the parameters Inkling initialises to ones or zeros."""
    randomize_text(model, seed)
    g = torch.Generator().manual_seed(seed + 4000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("global_scale", "l2_clip.scale", ".query", "static_weight")):
                p.add_(0.5 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="session")
def inkling_case(tmp_path_factory):
    """inkling_case(name, seed) -> (directory, ids, reference logits, reference routes, model), built once."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            model = build_model(config_of(name), seed)
            randomize(model, seed)
            d = tmp_path_factory.mktemp(f"{name}-{seed}")
            model.save_pretrained(d)
            vocab = model.config.get_text_config().vocab_size
            ids = torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(seed))
            logits, routes = reference_routes(model, ids)
            cache[name, seed] = (d, ids[0].tolist(), logits, routes, model)
        return cache[name, seed]

    return get


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, inkling_case):
    d, ids, ref_logits, ref_routes, _ = inkling_case(name, seed)
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE)
    assert out.logits.shape == ref_logits.shape  # the padded head cut to unpadded_vocab_size
    assert_matches_transformers(out, ref_logits, ref_routes, nonzero=True, varied="every")


@pytest.mark.parametrize("name", ["inkling_text", "inkling2_text", "inkling2", "inkling_mm_model"])
def test_count_matches_transformers(name, inkling_case):
    """The checkpoints traced here (original model.llm.* names for Inkling 2) count as transformers builds them."""
    import moetool

    d, _, _, _, model = inkling_case(name, 0)
    n = sum(p.numel() for p in model.parameters())
    from_headers, from_config = moetool.count(str(d)), moetool.count(str(d), use_headers=False)
    assert from_headers.total_params == from_config.total_params == n
    assert from_headers.cross_check["match"], from_headers.cross_check["differences"]


@pytest.mark.parametrize("name", ["inkling_text-b", "inkling2_text"])
def test_profile_blocks_route_as_traces(name, inkling_case, tmp_path):
    """moetool profile runs several prompts per block: the relative bias, the windows and every short
    convolution (dynamic ones included) restart at each prompt, so each prompt routes as its own trace."""
    import shutil

    from conftest import write_tokenizer
    from moetool.tracing import trace

    d = tmp_path / name
    shutil.copytree(inkling_case(name, 1)[0], d)
    write_tokenizer(d)
    prompts = ["The quick brown fox jumps over the lazy dog. " * 3, "def add(a, b): return a + b", "import os, sys " * 4]
    stats = assert_profile_routes_like_traces(d, tmp_path, prompts, min_tokens=8)  # past the window and the kernel
    assert stats.tokens == sum(len(trace(p, model=str(d), device=DEVICE).tokens) for p in prompts)


def test_trace_cli_says_the_tower_is_not_run(inkling_case):
    import json
    import subprocess
    import sys

    d, ids, _, routes, _ = inkling_case("inkling2", 0)
    args = [sys.executable, "-m", "moetool", "trace", "--model", str(d), "--tokens", ",".join(map(str, ids[:8])),
            "--format", "json"]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [layer["layer"] for layer in out["layers"]] == sorted(routes)
    assert out["notes"] == ["text-only input: the vision tower is not run; the trace is of the language model"]


def test_inkling_vision_scales_equal_transformers():
    """count's torch-free plan of Inkling's vision encoder (arch/multimodal.inkling_vision_scales) equals
    transformers' plan_out_scales (torch; scipy's linear_sum_assignment with fewer layers than candidates)
    over patch sizes, temporal patch sizes, layer counts and channels, or is refused where two plans tie
    (transformers' pick then depends on float32 rounding or scipy's solver). The published 40 x 40 x 2 with
    24 layers is planned."""
    from transformers.models.inkling.modeling_inkling import plan_out_scales

    from moetool.arch.multimodal import inkling_vision_scales
    from moetool.errors import UnsupportedArchitecture

    cases = [(t, p, n, c) for t in (1, 2, 4) for p in (2, 4, 7, 12, 14, 16, 20, 30, 40, 49) for n in (1, 2, 3, 5, 8, 24)
             for c in (1, 3)]
    refused = 0
    for t, p, n, c in cases + [(2, 40, 24, 3)]:
        try:
            ours = inkling_vision_scales(t, p, n, c)
        except UnsupportedArchitecture:
            assert (t, p, n, c) != (2, 40, 24, 3)
            refused += 1
            continue
        assert ours == [tuple(int(x) for x in r) for r in plan_out_scales(t, p, n, c).tolist()], (t, p, n, c)
    assert refused < len(cases) // 5
