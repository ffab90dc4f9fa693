"""trace of Qwen4-Exp (qwen4_exp_text, Qwen4ExpForCausalLM; qwen4_exp, Qwen4ExpForConditionalGeneration)
against transformers 5.23 (moetool/forward/qwen4_exp.py): hyper-connection residual streams, Gated
DeltaNet, gated attention with the QSA token indexer (budget 8 of 40 tokens: it cuts in), Per-Layer
Embedding (hashed n-grams; eos tokens in the prompt restart the n-gram segments), MoE with a gated
shared expert.

Tiny random checkpoints written by `save_pretrained` (n-gram tables in row shards), two seeds, every
norm weight and bias randomised (test_trace_text_families.randomize; the PLE conv starts at zero and
gets random values there), A_log / dt_bias perturbed, initializer_range 0.2 so routing depends on the
token (asserted): logits within 1e-4 (float32), the same expert set for every token in every MoE
layer, gate weights within 1e-5."""

from __future__ import annotations

import pytest
import torch

from fakes import DEVICE, assert_matches_transformers, build_transformers_model
from moetool.forward import run_forward
from moetool.source import resolve
from test_hybrid_trace import randomize_mixer_params
from test_trace_text_families import T, randomize, routes_and_logits

_TEXT = dict(model_type="qwen4_exp_text", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             vocab_size=128, num_hidden_layers=4, max_position_embeddings=256, initializer_range=0.2,
             moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
             hc_count=3, hc_lowrank=8, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8,
             indexer_compress_ratio=4, ple_layer_ids=[1, 3], ple_embed_dim=16, heads_per_ngram=2,
             ngram_vocab_size_base=50, make_ngram_vocab_size_divisible_by=8, split_ngram_parts=2, eos_token_id=2,
             pad_token_id=0, layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"])

FAMILIES: dict[str, dict] = {
    "qwen4_exp_text": _TEXT,
    # the sigmoid output gate of the DeltaNet norm, partial RoPE (the indexer rotates its first half too),
    # attention biases, no top-k renormalisation, a bigger n-gram (order 4) and PLE on one layer
    "qwen4_exp_text-variant": {**_TEXT, "output_gate_type": "sigmoid", "attention_bias": True, "norm_topk_prob": False,
                               "rope_parameters": dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
                               "ngram_size": 4, "heads_per_ngram": 2, "ple_embed_dim": 24, "ple_layer_ids": [3],
                               "ple_conv_kernel_size": 3, "indexer_budget": 12, "indexer_compress_ratio": 3},
    # the image-text model (its language model under model.language_model., the vision tower not run)
    "qwen4_exp": dict(model_type="qwen4_exp", text_config={k: v for k, v in _TEXT.items() if k != "model_type"},
                      vision_config=dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                                         patch_size=4, num_position_embeddings=16)),
}
SEEDS = (0, 1)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(config: dict, seed: int):
    if config["model_type"] == "qwen4_exp":
        import transformers

        torch.manual_seed(seed)
        return transformers.Qwen4ExpForConditionalGeneration(transformers.AutoConfig.for_model(**config))
    return build_transformers_model(config, seed=seed)


def _randomize(model, seed: int) -> None:
    randomize(model, seed)
    randomize_mixer_params(model, seed)


@pytest.fixture(scope="session")
def qwen4(tmp_path_factory):
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            model = _build(FAMILIES[name], seed).eval()
            _randomize(model, seed)
            d = tmp_path_factory.mktemp(f"{name}-{seed}")
            model.save_pretrained(d)
            text = model.config.get_text_config()
            ids = torch.randint(0, text.vocab_size, (1, T), generator=torch.Generator().manual_seed(seed))
            ids[0, 9] = ids[0, 25] = text.eos_token_id  # n-gram segments restart after an eos
            logits, routes = routes_and_logits(model, ids)
            cache[name, seed] = (d, ids[0].tolist(), logits, routes, model)
        return cache[name, seed]

    return get


CASES = [(n, s) for n in FAMILIES for s in SEEDS]


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, qwen4):
    d, ids, ref_logits, ref_routes, _ = qwen4(name, seed)
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE)
    assert_matches_transformers(out, ref_logits, ref_routes, nonzero=True, varied="every")


def test_ple_and_indexer_matter(qwen4, monkeypatch):
    """Dropping the PLE or the QSA selection changes the logits beyond the tolerance (both are exercised)."""
    from moetool.forward import qwen4_exp

    d, ids, ref_logits, _, _ = qwen4("qwen4_exp_text", 0)
    for attr, fake in (("ple", lambda dec, i, prefix, x: torch.zeros_like(x)),
                       ("qsa_keep", lambda dec, i, h, cos, sin, mask: mask)):
        with monkeypatch.context() as m:
            m.setattr(qwen4_exp, attr, fake)
            logits = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE).logits
        assert (logits - ref_logits).abs().max().item() > 1e-3, attr


def test_profile_refuses_in_one_line(qwen4, tmp_path):
    """`moetool profile` runs blocks of prompts; Qwen4-Exp's n-gram embedding and QSA indexer run one
    sequence at a time: one line, exit 2, nothing written."""
    import os
    import shutil

    from conftest import write_tokenizer
    from test_bad_input import run_cli

    d = tmp_path / "ckpt"
    shutil.copytree(qwen4("qwen4_exp_text", 0)[0], d)
    write_tokenizer(d)
    (tmp_path / "p.txt").write_text("def add(a, b): return a + b\nimport os, sys\n")
    r = run_cli("profile", str(tmp_path / "p.txt"), "--model", str(d), "-o", str(tmp_path / "out"), "--device", "cpu",
                env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "Qwen4-Exp" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out" / "profile.json").exists()
