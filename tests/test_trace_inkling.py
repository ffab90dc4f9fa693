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
from fakes import assert_matches_transformers
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
}
CASES = [(n, s) for n in FAMILIES for s in SEEDS]


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
    out = run_forward(resolve(str(d)), ids, dtype="float32", device="cpu")
    assert out.logits.shape == ref_logits.shape  # the padded head cut to unpadded_vocab_size
    assert_matches_transformers(out, ref_logits, ref_routes, nonzero=True, varied="every")
