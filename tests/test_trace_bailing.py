"""trace of Ling 3.0 (bailing_hybrid, BailingHybridForCausalLM) against transformers 5.23.

Ling 3.0 mixes two token mixers, both under `self_attn.` (`attention.` as published):
- KDA layers (BailingHybridDeltaAttention): Kimi Delta Attention with full-rank forget and output
  gate projections and, with kda_safe_gate (the default), the bounded forget gate
  lower_bound * sigmoid(exp(A_log) * (f_proj x + dt_bias)); moetool/forward/mixers/kda.py;
- MLA without a query LoRA, RoPE always interleaved, a head-wise sigmoid output gate g_proj [H, D];
then DeepSeek-V3's MoE (sigmoid, correction bias, groups, shared experts).

Tiny random checkpoints written by `save_pretrained` (the published names: word_embeddings,
attention.dense, q/k/v_conv1d, expert_bias), two seeds, every bias, correction bias and norm weight
randomised (test_trace_text_families.randomize) and A_log / dt_bias perturbed
(test_hybrid_trace.randomize_mixer_params), initializer_range 0.2 so routing depends on the token
(asserted): logits within 1e-4 (float32), the same expert set for every token in every MoE layer,
gate weights within 1e-5. Also: transformers' runtime names (state_dict), `generate` with the KV cache
equals transformers' greedy `generate`, and `moetool profile` on a block of prompts routes every
token as one trace per prompt (the recurrent state does not cross prompts).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from fakes import save_both_layouts, DEVICE, assert_matches_transformers, build_transformers_model
from moetool.forward import run_forward
from moetool.source import resolve
from test_hybrid_trace import hybrid_checkpoint, randomize_mixer_params  # noqa: F401 (a fixture)
from test_trace_text_families import T, randomize, routes_and_logits

_C = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, vocab_size=128, num_hidden_layers=4,
          max_position_embeddings=256, initializer_range=0.2, pad_token_id=0, eos_token_id=2)
_MLA = dict(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)

FAMILIES: dict[str, dict] = {
    # layer types from layer_group_size (every 2nd layer MLA), the first layer dense, grouped routing,
    # the bounded (safe) forget gate, KDA heads from num_attention_heads / head_dim
    "bailing_hybrid": dict(model_type="bailing_hybrid", intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                           num_experts_per_token=2, num_shared_experts=1, num_expert_group=2, topk_group=1,
                           routed_scaling_factor=2.5, layer_group_size=2, first_k_dense_replace=1, head_dim=8,
                           **_MLA, **_C),
    # the softplus forget gate, explicit layer schedules, KDA heads of their own size, no renormalisation,
    # two shared experts, attention biases, YaRN RoPE with mscale_all_dim (attention scale), kernel 3
    "bailing_hybrid-unsafe": dict(model_type="bailing_hybrid", intermediate_size=40, moe_intermediate_size=16,
                                  num_experts=6, num_experts_per_token=3, num_shared_experts=2, num_expert_group=1,
                                  topk_group=1, routed_scaling_factor=1.5, moe_renormalize=False, kda_safe_gate=False,
                                  layer_types=["full_attention", "linear_attention", "linear_attention",
                                               "full_attention"],
                                  mlp_layer_types=["sparse", "dense", "sparse", "sparse"], linear_num_heads=2,
                                  linear_head_dim=16, short_conv_kernel_size=3, attention_bias=True,
                                  rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                       original_max_position_embeddings=64, mscale_all_dim=1.0,
                                                       beta_fast=32, beta_slow=1),
                                  **_MLA, **_C),
}
SEEDS = (0, 1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread (two spin-wait on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(config: dict, seed: int):
    return build_transformers_model(config, seed=seed)


def _randomize(model, seed: int) -> None:
    randomize(model, seed)
    randomize_mixer_params(model, seed)


@pytest.fixture(scope="session")
def bailing(tmp_path_factory):
    """bailing(name, seed) -> (published dir, ids, reference logits, reference routes, model, runtime dir)."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            model = _build(FAMILIES[name], seed).eval()
            _randomize(model, seed)
            d, runtime = save_both_layouts(model, tmp_path_factory, f"{name}-{seed}")
            ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(seed))
            logits, routes = routes_and_logits(model, ids)
            cache[name, seed] = (d, ids[0].tolist(), logits, routes, model, runtime)
        return cache[name, seed]

    return get


CASES = [(n, s) for n in FAMILIES for s in SEEDS]


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, bailing):
    d, ids, ref_logits, ref_routes, model, _ = bailing(name, seed)
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE, streaming=True)
    assert_matches_transformers(out, ref_logits, ref_routes, nonzero=True, varied="every")
    kinds = [type(l.self_attn).__name__ for l in model.model.layers]
    assert {"BailingHybridDeltaAttention", "BailingHybridAttention"} <= set(kinds)  # both mixers ran


def test_published_names_are_traced(bailing):
    """save_pretrained writes Ling's own names; moetool reads them, not only transformers' runtime ones."""
    from safetensors import safe_open

    d = bailing("bailing_hybrid", 0)[0]
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.word_embeddings.weight" in keys and "model.layers.0.attention.dense.weight" in keys
    assert "model.layers.0.attention.q_conv1d.weight" in keys and "model.layers.1.mlp.gate.expert_bias" in keys


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_trace_of_runtime_layout(name, bailing):
    """The same weights under transformers' in-memory names (self_attn., forget_gate., one conv1d,
    fused experts, e_score_correction_bias) trace the same."""
    _, ids, ref_logits, ref_routes, _, runtime = bailing(name, 0)
    out = run_forward(resolve(str(runtime)), ids, dtype="float32", device=DEVICE)
    assert_matches_transformers(out, ref_logits, ref_routes, nonzero=True)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_forget_gate_and_output_gates_matter(name, bailing, monkeypatch):
    """Each Ling-specific piece changes the logits: the forget gate's form (bounded vs softplus) and
    MLA's head-wise output gate. Swapping either breaks the match with transformers."""
    import dataclasses

    from moetool.forward import config as config_mod

    d, ids, ref_logits, _, _, _ = bailing(name, 0)
    real = config_mod._bailing_hybrid

    def swapped_gate(fc, spec, cfg, rope):
        real(fc, spec, cfg, rope)
        c = fc.mixers["kda"]
        fc.mixers["kda"] = dataclasses.replace(c, lower_bound=None if c.lower_bound is not None else -5.0)

    def no_out_gate(fc, spec, cfg, rope):
        real(fc, spec, cfg, rope)
        fc.out_gate = None

    for wrong in (swapped_gate, no_out_gate):
        monkeypatch.setitem(config_mod.HYBRID, "bailing_hybrid", wrong)
        logits = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE).logits
        assert (logits - ref_logits).abs().max().item() > 1e-3, wrong.__name__


def test_generate_with_cache_equals_transformers_generate(bailing):
    """Greedy generation with moetool's KV cache (MLA keys/values, KDA conv and recurrent state)
    gives transformers' `generate` (its own cache) token for token."""
    from moetool.forward.cache import generate

    d, ids, _, _, model, _ = bailing("bailing_hybrid", 0)
    prompt = ids[:14]
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, use_cache=True,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
    ours = generate(resolve(str(d)), prompt, 6, device=DEVICE)
    assert ours.cached and ours.ids == ref[0].tolist()


@pytest.mark.parametrize("name", ["bailing_hybrid", "jamba", "qwen3_next"])
def test_profile_routes_each_prompt_as_its_own_trace(name, bailing, hybrid_checkpoint, tmp_path):
    """`moetool profile` runs a block of several prompts through the layers at once: a recurrent
    mixer's state (KDA, Mamba, Gated DeltaNet) must start afresh for every prompt, as in one trace
    per prompt (before the fix it ran across the prompts' boundaries and routed later prompts
    differently, in every hybrid family). Ling through the CLI, the others through the library."""
    import os

    from conftest import write_tokenizer
    from test_bad_input import run_cli

    from moetool.profile.corpus import read_corpus
    from moetool.profile.engine import profile
    from moetool.profile.stats import ProfileStats
    from moetool.tracing import load_tokenizer

    src = bailing(name, 0)[0] if name in FAMILIES else hybrid_checkpoint(name, 0)[0]
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    write_tokenizer(d)
    prompts = ["def add(a, b): return a + b", "The quick brown fox jumps over the lazy dog.", "import os, sys"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    if name in FAMILIES:
        r = run_cli("profile", str(tmp_path / "p.txt"), "--model", str(d), "-o", str(tmp_path / "out"), "--device",
                    "cpu", "--block-tokens", "1000", env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        stats = ProfileStats.load(str(tmp_path / "out"))
    else:
        stats = profile(read_corpus(str(tmp_path / "p.txt")), model=str(d), block_tokens=1000, device=DEVICE)
    tok = load_tokenizer(resolve(str(d)))
    expected: dict = {}
    for p in prompts:
        out = run_forward(resolve(str(d)), tok.encode(p).ids, dtype="float32", device=DEVICE)
        for route in out.routes:
            load = expected.setdefault(route.layer, torch.zeros(stats.num_experts, dtype=torch.long))
            load += torch.bincount(route.experts.reshape(-1), minlength=stats.num_experts)
    assert sorted(stats.layers) == sorted(expected)
    for layer, load in expected.items():
        assert stats.layers[layer].load.tolist() == load.tolist(), layer
