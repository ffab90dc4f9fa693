"""Hybrid-mixer families (Mamba, Gated DeltaNet, ...): our streamed forward against transformers
5.x on tiny random checkpoints written by `save_pretrained` (two seeds; biases, correction biases,
norm weights and SSM parameters randomised; initializer_range 0.1 so the mixers matter). Logits
within 1e-4 in float32, the same expert set for every token of every MoE layer, gate weights
within 1e-5; and count from headers == count from config == transformers' parameter count."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

import moetool
from fakes import (DEVICE, assert_matches_transformers, build_transformers_model, randomize_biases, transformers_param_count,
                   transformers_routes)
from moetool.forward import run_forward
from moetool.source import resolve

_C = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_hidden_layers=4,
          max_position_embeddings=256, initializer_range=0.1)

HYBRID_CONFIGS = {
    "jamba": dict(model_type="jamba", intermediate_size=48, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
                  attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_d_conv=4,
                  mamba_expand=2, mamba_dt_rank=4, **_C),
    "jamba-k1": dict(model_type="jamba", intermediate_size=40, num_experts=6, num_experts_per_tok=1, attn_layer_period=4,
                     attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=0, mamba_d_state=8, mamba_d_conv=3,
                     mamba_expand=1, mamba_proj_bias=True, **_C),
    "qwen3_next": dict(model_type="qwen3_next", intermediate_size=48, moe_intermediate_size=24,
                       shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=8,
                       linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                       **_C),
    "qwen3_next-sparse": dict(model_type="qwen3_next", intermediate_size=48, moe_intermediate_size=16,
                              shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=3, head_dim=16,
                              linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
                              linear_value_head_dim=16, decoder_sparse_step=2, norm_topk_prob=False,
                              full_attention_interval=2, attention_bias=True, **_C),
    "qwen3_5_moe_text": dict(model_type="qwen3_5_moe_text", moe_intermediate_size=24, shared_expert_intermediate_size=24,
                             num_experts=4, num_experts_per_tok=2, head_dim=8, linear_num_value_heads=4,
                             linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, **_C),
    "granitemoehybrid": dict(model_type="granitemoehybrid", intermediate_size=48, shared_intermediate_size=40,
                             num_local_experts=4, num_experts_per_tok=2,
                             layer_types=["mamba", "attention", "mamba", "attention"], mamba_n_heads=4, mamba_d_head=16,
                             mamba_d_state=8, mamba_n_groups=2, mamba_expand=2, embedding_multiplier=2.0,
                             attention_multiplier=0.3, residual_multiplier=0.5, logits_scaling=3.0,
                             position_embedding_type="rope", **_C),
    "granitemoehybrid-nope": dict(model_type="granitemoehybrid", intermediate_size=32, shared_intermediate_size=24,
                                  num_local_experts=6, num_experts_per_tok=3,
                                  layer_types=["mamba", "mamba", "attention", "mamba"], mamba_n_heads=8,
                                  mamba_d_state=4, mamba_n_groups=1, mamba_expand=1, mamba_proj_bias=True,
                                  time_step_limit=[0.05, 2.0], attention_bias=True, tie_word_embeddings=True, **_C),
    "lfm2_moe": dict(model_type="lfm2_moe", intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                     num_experts_per_tok=2, num_dense_layers=1, routed_scaling_factor=1.7, pad_token_id=0,
                     layer_types=["conv", "full_attention", "conv", "full_attention"], **_C),
    "lfm2_moe-nobias": dict(model_type="lfm2_moe", intermediate_size=40, moe_intermediate_size=16, num_experts=8,
                            num_experts_per_tok=3, num_dense_layers=0, use_expert_bias=False, norm_topk_prob=False,
                            conv_L_cache=4, conv_bias=True, tie_word_embeddings=False, pad_token_id=0,
                            layer_types=["full_attention", "conv", "conv", "full_attention"], **_C),
    "nemotron_h": dict(model_type="nemotron_h", intermediate_size=48, moe_intermediate_size=24,
                       moe_shared_expert_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                       topk_group=1, routed_scaling_factor=2.0, hybrid_override_pattern="M*E-ME", mamba_num_heads=4,
                       mamba_head_dim=16, ssm_state_size=8, n_groups=2, head_dim=8,
                       **{k: v for k, v in _C.items() if k != "num_hidden_layers"}),
    "nemotron_h-latent": dict(model_type="nemotron_h", intermediate_size=48, moe_intermediate_size=24,
                              moe_shared_expert_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=3,
                              moe_latent_size=16, mlp_bias=True, use_bias=True, norm_topk_prob=False,
                              time_step_min=0.05, hybrid_override_pattern="ME*E", mamba_num_heads=8, mamba_head_dim=4,
                              ssm_state_size=8, n_groups=1, head_dim=16,
                              **{k: v for k, v in _C.items() if k != "num_hidden_layers"}),
    "minimax": dict(model_type="minimax", intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                    block_size=16, layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
                    full_attn_alpha_factor=0.7, full_attn_beta_factor=1.3, linear_attn_alpha_factor=1.2,
                    linear_attn_beta_factor=0.6, mlp_alpha_factor=0.9, mlp_beta_factor=1.1, **_C),
    "minimax-window": dict(model_type="minimax", intermediate_size=40, num_local_experts=6, num_experts_per_tok=3,
                           block_size=7, sliding_window=9, **_C),
    "kimi_linear": dict(model_type="kimi_linear", intermediate_size=48, moe_intermediate_size=24, num_experts=8,
                        num_experts_per_token=2, num_shared_experts=1, num_expert_group=2, topk_group=1,
                        routed_scaling_factor=2.0, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=None,
                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, linear_attn_config=dict(kda_layers=[1, 2, 4], full_attn_layers=[3], num_heads=4,
                                                                head_dim=8, short_conv_kernel_size=4),
                        **{**_C, "num_key_value_heads": 4}),
    "kimi_linear-qlora": dict(model_type="kimi_linear", intermediate_size=40, moe_intermediate_size=16, num_experts=6,
                              num_experts_per_token=3, num_shared_experts=2, routed_scaling_factor=1.5,
                              moe_renormalize=False, mlp_layer_types=["sparse", "dense", "sparse", "sparse"],
                              kv_lora_rank=8, q_lora_rank=16, attention_bias=True, qk_nope_head_dim=8,
                              qk_rope_head_dim=4, v_head_dim=6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"],
                              linear_attn_config=dict(num_heads=2, head_dim=16, short_conv_kernel_size=3),
                              **{**_C, "num_key_value_heads": 4}),
    "qwen3_5_moe": dict(model_type="qwen3_5_moe", initializer_range=0.1,
                        text_config=dict(model_type="qwen3_5_moe_text", moe_intermediate_size=24,
                                         shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                         head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2,
                                         linear_key_head_dim=8, linear_value_head_dim=8, **_C),
                        vision_config=dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                                           patch_size=4, num_position_embeddings=16)),
}
CASES = [(name, seed) for name in HYBRID_CONFIGS for seed in (0, 1)]
T = 40


def randomize_mixer_params(model, seed: int) -> None:
    """Norm weights start at 1 (or 0), A_log / dt_bias / D at fixed values: perturb them all."""
    g = torch.Generator().manual_seed(seed + 2000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias", ".D")) or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _build(config: dict, seed: int):
    if config["model_type"] == "qwen3_5_moe":  # the image-text model, as published checkpoints are
        import transformers

        torch.manual_seed(seed)
        return transformers.Qwen3_5MoeForConditionalGeneration(transformers.AutoConfig.for_model(**config))
    return build_transformers_model(config, seed=seed)


@pytest.fixture(scope="session")
def hybrid_checkpoint(tmp_path_factory):
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            model = _build(HYBRID_CONFIGS[name], seed).eval()
            randomize_biases(model, seed)
            randomize_mixer_params(model, seed)
            d = tmp_path_factory.mktemp(f"{name}-{seed}")
            model.save_pretrained(d)  # the published layout (transformers reverses its weight conversions)
            # transformers' runtime names (fused experts, Nemotron-H under model., Kimi's forget_gate ...)
            runtime = tmp_path_factory.mktemp(f"{name}-{seed}-runtime")
            save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                      str(runtime / "model.safetensors"))
            shutil.copy(d / "config.json", runtime / "config.json")
            ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, T), generator=torch.Generator().manual_seed(seed))
            logits, routes = transformers_routes(model, ids)
            cache[name, seed] = (d, ids[0].tolist(), logits, routes, transformers_param_count(model), runtime)
        return cache[name, seed]

    return get


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, hybrid_checkpoint):
    d, ids, ref_logits, ref_routes, _, _ = hybrid_checkpoint(name, seed)
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE, streaming=True)
    _assert_same(out, ref_logits, ref_routes)


@pytest.mark.parametrize("name", sorted(HYBRID_CONFIGS))
def test_trace_of_runtime_layout(name, hybrid_checkpoint):
    """The same weights stored under transformers' in-memory names (state_dict) trace the same."""
    _, ids, ref_logits, ref_routes, _, runtime = hybrid_checkpoint(name, 0)
    _assert_same(run_forward(resolve(str(runtime)), ids, dtype="float32", device=DEVICE), ref_logits, ref_routes)


def _assert_same(out, ref_logits, ref_routes):
    assert_matches_transformers(out, ref_logits, ref_routes, nonzero=True)


@pytest.mark.parametrize("name", sorted(HYBRID_CONFIGS))
def test_count_matches_transformers(name, hybrid_checkpoint):
    d, _, _, _, tf_count, _ = hybrid_checkpoint(name, 0)
    from_headers, from_config = moetool.count(str(d)), moetool.count(str(d), use_headers=False)
    assert from_headers.total_params == from_config.total_params == tf_count
    assert from_headers.cross_check["match"], from_headers.cross_check["differences"]
    assert from_headers.breakdown == from_config.breakdown
    assert sum(from_headers.breakdown.values()) == tf_count


def test_quantize_report_refuses_ungated_experts_in_one_line(hybrid_checkpoint):
    """Nemotron-H's experts have no gate projection: quantize-report says so (exit 2), no traceback."""
    import subprocess
    import sys

    d = hybrid_checkpoint("nemotron_h", 0)[0]
    r = subprocess.run([sys.executable, "-m", "moetool", "quantize-report", "--model", str(d), "--weight-only"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "ungated experts" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ["jamba", "nemotron_h"])
def test_trace_cli_on_hybrid_checkpoint(name, hybrid_checkpoint):
    import json
    import subprocess
    import sys

    d, ids, _, ref_routes, _, _ = hybrid_checkpoint(name, 0)
    r = subprocess.run([sys.executable, "-m", "moetool", "trace", "--model", str(d), "--tokens",
                        ",".join(map(str, ids[:8])), "--format", "json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [layer["layer"] for layer in out["layers"]] == sorted(ref_routes)


def test_missing_or_misshapen_mixer_tensor_is_one_line(hybrid_checkpoint, tmp_path):
    """A checkpoint whose mixer lacks a tensor, or whose config disagrees with its shapes: exit 2."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    d = hybrid_checkpoint("jamba", 0)[0]
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.0.mamba.A_log"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(d / "config.json", tmp_path / "config.json")
    r = subprocess.run([sys.executable, "-m", "moetool", "trace", "--model", str(tmp_path), "--tokens", "1,2,3"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "mamba.A_log" in r.stderr and "Traceback" not in r.stderr
    config = json.loads((d / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "mamba_d_state": 5}))
    save_file(load_file(str(d / "model.safetensors")), str(tmp_path / "model.safetensors"))
    r = subprocess.run([sys.executable, "-m", "moetool", "trace", "--model", str(tmp_path), "--tokens", "1,2,3"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
