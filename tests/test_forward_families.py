"""count and trace of the text MoE families added for issue 11, against transformers 5.23: tiny random
checkpoints written by `save_pretrained` (every bias and correction bias non-zero), two seeds each.

trace: logits within 1e-4 of transformers' (float32) and, in every MoE layer, the same expert set and
gate weights (1e-5) for every token. transformers' expert modules receive the router's choice as
`top_k_index` / `top_k_weights`; a pre-hook on them reads it, independently of its router classes.
count: config-only and header counts both equal transformers' parameter count of the model.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch

import moetool
from fakes import DEVICE, assert_matches_transformers, build_transformers_model
from moetool.forward import run_forward
from moetool.source import resolve

_C = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_hidden_layers=3,
          max_position_embeddings=256)
_MLA = dict(q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            **{**_C, "num_key_value_heads": 4})

FAMILIES: dict[str, dict] = {
    "glm4_moe_lite": dict(model_type="glm4_moe_lite", intermediate_size=48, moe_intermediate_size=16,
                          n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                          routed_scaling_factor=1.8, **_MLA),
    "deepseek_v32": dict(model_type="deepseek_v32", intermediate_size=48, moe_intermediate_size=16,
                         n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                         first_k_dense_replace=1, index_topk=8, index_head_dim=8, index_n_heads=2,
                         routed_scaling_factor=2.5, **_MLA),
    "ernie4_5_moe": dict(model_type="ernie4_5_moe", intermediate_size=48, moe_intermediate_size=16, moe_num_experts=8,
                         moe_k=2, moe_num_shared_experts=2, use_bias=True, tie_word_embeddings=False,
                         moe_layer_start_index=1, moe_layer_interval=1, **_C),
    "hunyuan_v1_moe": dict(model_type="hunyuan_v1_moe", intermediate_size=24, num_experts=8, moe_topk=2, head_dim=8,
                           attention_bias=True, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, alpha=1000.0,
                                                                     factor=1.0), **_C),
    "flex_olmo": dict(model_type="flex_olmo", intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                      attention_bias=True, norm_topk_prob=True, pad_token_id=0, **_C),
    "minimax_m2": dict(model_type="minimax_m2", intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                       head_dim=16, rotary_dim=8, **_C),
    "dots1": dict(model_type="dots1", intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                  n_shared_experts=2, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                  routed_scaling_factor=2.0, head_dim=8, attention_bias=True, sliding_window=4, max_window_layers=2,
                  **_C),
    "granitemoeshared": dict(model_type="granitemoeshared", intermediate_size=24, shared_intermediate_size=40,
                             num_local_experts=8, num_experts_per_tok=2, attention_bias=True, embedding_multiplier=2.0,
                             attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=4.0, **_C),
    "solar_open": dict(model_type="solar_open", moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2,
                       num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=1.5, head_dim=16,
                       attention_bias=True, **_C),
    "exaone_moe": dict(model_type="exaone_moe", intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                       num_shared_experts=2, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                       routed_scaling_factor=2.5, head_dim=8, sliding_window=4, sliding_window_pattern=2,
                       **{**_C, "num_hidden_layers": 4}),
    "mistral4": dict(model_type="mistral4", intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                     n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1,
                     routed_scaling_factor=1.5, pad_token_id=0,
                     rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
                                          beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                          llama_4_scaling_beta=0.1, partial_rotary_factor=0.5),
                     **{**_MLA, "qk_nope_head_dim": 4}),
    "cohere2_moe": dict(model_type="cohere2_moe", intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                        num_shared_experts=2, prefix_dense_intermediate_size=40, first_k_dense_replace=1, head_dim=8,
                        attention_bias=True, sliding_window=4, sliding_window_pattern=2, logit_scale=0.25,
                        tie_word_embeddings=False, **{**_C, "num_hidden_layers": 4}),
    "cohere2_moe-sigmoid": dict(model_type="cohere2_moe", intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                                num_shared_experts=1, shared_expert_combination_strategy="sum",
                                expert_selection_fn="sigmoid", rms_norm_eps=1e-6, head_dim=8, sliding_window=4,
                                sliding_window_pattern=3, **_C),
    "jetmoe": dict(model_type="jetmoe", hidden_size=32, num_key_value_heads=2, kv_channels=8, vocab_size=128,
                   num_hidden_layers=3, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                   tie_word_embeddings=False, max_position_embeddings=256),
}
SEEDS = (0, 1)
T = 40


def randomize_biases(model, seed: int) -> None:
    """Every bias (attention, router, experts, norms) and correction bias non-zero."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("bias", "e_score_correction_bias")) and p.dtype.is_floating_point:
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "correction" in name else 0.5))


# Sparse-attention indexers keep their top keys, and their scores tie exactly (0 after the ReLU in
# every head). CPU and CUDA torch.topk break such ties differently, so where moetool runs on a GPU
# (MOETOOL_TEST_DEVICE=cuda) transformers' reference for these families runs on it too: DeepSeek's
# indexer (V3.2, GLM-5, A.X-K2, HY-V4, DeepSeek-V4, Mistral-Large-4, dots3) and Qwen4-Exp's QSA.
TIES_ON_DEVICE = {"deepseek_v32", "glm_moe_dsa", "axk2", "hy_v4", "deepseek_v4", "mistral_large4", "dots3_note",
                  "dots3_note_text", "qwen4_exp", "qwen4_exp_text"}


def reference_routes(model, ids) -> tuple[torch.Tensor, dict]:
    """transformers' logits [T, V] and {layer: (experts [T, K], weights [T, K])} as its experts
    modules receive them (on the CPU; on DEVICE for the TIES_ON_DEVICE families)."""
    if DEVICE != "cpu" and ids.device.type == "cpu" and model.config.model_type in TIES_ON_DEVICE:
        logits, routes = reference_routes(model.to(DEVICE), ids.to(DEVICE))
        model.to("cpu")
        return logits.cpu(), {i: (a.cpu(), b.cpu()) for i, (a, b) in routes.items()}
    captured: dict[int, tuple] = {}
    hooks = []
    for name, module in model.named_modules():
        params = inspect.signature(module.forward).parameters
        m = re.search(r"layers\.(\d+)\.", name)
        if m and "top_k_index" in params and "top_k_weights" in params:
            order = list(params)

            def hook(mod, args, kwargs, layer=int(m.group(1)), order=order):
                bound = dict(zip(order, args), **kwargs)
                captured[layer] = (bound["top_k_index"].detach().clone(), bound["top_k_weights"].detach().float().clone())

            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        elif m and name.endswith(".mlp.router") and type(module).__name__ == "JetMoeTopKGating":
            # JetMoE's gating returns its decisions grouped by expert: (sorted slots, token of each,
            # gate of each, tokens per expert, logits); turn them back into [T, K] per token.
            def jet_hook(mod, args, out, layer=int(m.group(1))):
                _, tokens, gates, sizes, _ = out
                experts = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
                T = int(tokens.max()) + 1
                order = torch.argsort(tokens, stable=True)
                captured[layer] = (experts[order].view(T, -1), gates[order].float().view(T, -1))

            hooks.append(module.register_forward_hook(jet_hook))
    assert hooks, "no experts module with top_k_index found"
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    for h in hooks:
        h.remove()
    return logits, captured


def _build(config: dict, seed: int):
    """transformers' causal LM of `config`; Mistral 4 has no AutoModelForCausalLM mapping in 5.23."""
    if config["model_type"] == "mistral4":
        import transformers

        cfg = transformers.AutoConfig.for_model(**config)
        torch.manual_seed(seed)
        return transformers.Mistral4ForCausalLM(cfg)
    return build_transformers_model(config, seed=seed)


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """family_checkpoint(name, seed) -> (directory, ids, ref logits, ref routes, transformers count), built once."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            model = _build(FAMILIES[name], seed).eval()
            randomize_biases(model, seed)
            d = tmp_path_factory.mktemp(f"{name}-{seed}")
            model.save_pretrained(d)
            ids = torch.randint(0, FAMILIES[name]["vocab_size"], (1, T), generator=torch.Generator().manual_seed(seed))
            logits, routes = reference_routes(model, ids)
            cache[name, seed] = (d, ids[0].tolist(), logits, routes, sum(p.numel() for p in model.parameters()))
        return cache[name, seed]

    return get


CASES = [(n, s) for n in FAMILIES for s in SEEDS]


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, family_checkpoint):
    d, ids, ref_logits, ref_routes, _ = family_checkpoint(name, seed)
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE)
    assert_matches_transformers(out, ref_logits, ref_routes)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_count_matches_transformers(name, family_checkpoint):
    d, _, _, _, tf_count = family_checkpoint(name, 0)
    from_headers = moetool.count(str(d))
    from_config = moetool.count(str(d), use_headers=False)
    assert from_config.total_params == tf_count
    assert from_headers.total_params == tf_count
    assert from_headers.cross_check["match"], from_headers.cross_check["differences"]
    assert from_headers.breakdown == from_config.breakdown
    assert from_headers.active_params == from_config.active_params
