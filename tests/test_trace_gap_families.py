"""trace of families that `count` handled exactly but `trace` refused (issue 11, item 3, the second
batch), against transformers 5.23: tiny random checkpoints written by `save_pretrained`, two seeds
each, every bias, correction bias and norm weight randomised (tests/test_trace_text_families.py's
`randomize`), initializer_range 0.2 so that routing depends on the token (asserted).

Logits within 1e-4 of transformers' (float32) and, in every MoE layer, the same expert set and gate
weights (1e-5) for every token, read by a pre-hook on transformers' experts modules
(tests/test_forward_families.py's `reference_routes`), independently of its router classes.
"""

from __future__ import annotations

import pytest

from fakes import DEVICE, assert_matches_transformers
from moetool.errors import BadConfig
from moetool.forward import run_forward
from moetool.source import resolve
from test_trace_text_families import build_case

_C = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, vocab_size=128, num_hidden_layers=4,
          max_position_embeddings=256, initializer_range=0.2)
_MLA = dict(q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)

FAMILIES: dict[str, dict] = {
    # GLM-5: DeepSeek-V3.2 (MLA, group sigmoid router + correction bias, shared expert, DSA indexer) whose
    # indexer rotates interleaved pairs and runs only on "full" layers; "shared" layers reuse the previous
    # full layer's top-k. index_topk 8 of 40 tokens: the indexer cuts in.
    "glm_moe_dsa": dict(model_type="glm_moe_dsa", intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                        first_k_dense_replace=1, index_topk=8, index_head_dim=8, index_n_heads=2,
                        indexer_types=["full", "shared", "full", "shared"], **_MLA, **_C),
    # the indexer schedule from index_topk_freq / index_skip_topk_offset (full on 0, 1, 3; 2 and 4 shared)
    "glm_moe_dsa-freq": dict(model_type="glm_moe_dsa", intermediate_size=48, moe_intermediate_size=16,
                             n_routed_experts=6, n_shared_experts=2, num_experts_per_tok=3, n_group=1, topk_group=1,
                             routed_scaling_factor=1.5, mlp_layer_types=["sparse", "dense", "sparse", "sparse", "sparse"],
                             index_topk=6, index_head_dim=8, index_n_heads=4, index_topk_freq=2,
                             **_MLA, **{**_C, "num_hidden_layers": 5}),
    # A.X-K2: DeepSeek-V3.2 without q_b_proj: q_gate_proj on [normed | raw] query latent gives the query
    # and a sigmoid gate on the attention output; gated RMSNorms (RMSNorm, then times sigmoid of a
    # rank-`gated_norm_rank` MLP of it) before attention and before every MoE block; indexer on every layer.
    "axk2": dict(model_type="axk2", intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                 mlp_layer_types=["dense", "sparse", "sparse", "dense"], index_topk=8, index_head_dim=8,
                 index_n_heads=2, gated_norm_rank=4, **_MLA, **_C),
    # ungrouped routing (n_group null), schedule from first_k_dense_replace / moe_layer_freq, attention biases
    "axk2-nogroup": dict(model_type="axk2", intermediate_size=48, moe_intermediate_size=16, n_routed_experts=6,
                         n_shared_experts=2, num_experts_per_tok=3, routed_scaling_factor=1.0, first_k_dense_replace=1,
                         moe_layer_freq=1, index_topk=6, index_head_dim=8, index_n_heads=4, gated_norm_rank=8,
                         attention_bias=True,
                         **_MLA, **_C),
}
SEEDS = (0, 1)


@pytest.fixture(scope="session")
def gap_family(tmp_path_factory):
    """gap_family(name, seed) -> (directory, ids, reference logits, reference routes), built once."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            cache[name, seed] = build_case(tmp_path_factory, FAMILIES[name], name, seed)
        return cache[name, seed]

    return get


CASES = [(n, s) for n in FAMILIES for s in SEEDS]


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, gap_family):
    d, ids, ref_logits, ref_routes, _ = gap_family(name, seed)
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE)
    assert_matches_transformers(out, ref_logits, ref_routes, varied="every")


def test_glm_moe_dsa_shared_layers_reuse_the_full_layers_keys(gap_family):
    """GLM-5's "shared" layers have no indexer and attend to the keys the previous full layer kept;
    the indexer's RoPE is interleaved. Both matter: swapping either breaks the match with transformers."""
    import moetool.forward.sparse_variants as model_mod  # where the decoder calls the indexer
    from moetool.forward import indexer as indexer_mod

    d, ids, ref_logits, _, model = gap_family("glm_moe_dsa", 0)
    assert [l.self_attn.indexer is None for l in model.model.layers] == [False, True, False, True]
    real = indexer_mod.sparse_attention_keep

    def half_layout(*a, **k):
        return real(*a, **{**k, "layout": "half"})

    model_mod.sparse_attention_keep = half_layout
    try:
        wrong = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE).logits
    finally:
        model_mod.sparse_attention_keep = real
    assert (wrong - ref_logits).abs().max().item() > 1e-3


def test_glm_moe_dsa_first_layer_shared_refused(tmp_path):
    """A first layer marked "shared" has no full layer to reuse (transformers raises in the forward):
    one clear BadConfig, not a crash inside the forward."""
    from moetool.arch import spec_from_config
    from moetool.forward.config import forward_config
    import transformers

    config = transformers.AutoConfig.for_model(**{**FAMILIES["glm_moe_dsa"],
                                                    "indexer_types": ["shared", "full", "full", "full"]}).to_dict()
    with pytest.raises(BadConfig, match="indexer_types"):
        forward_config(spec_from_config(config, None), config)
