"""Fidelity fixes of the reference forward (issue 11, part 4), each checked against transformers'
own implementation on a tiny random checkpoint it wrote (`save_pretrained`), biases non-zero:
logits within 1e-4 and identical expert sets for every token of every MoE layer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fakes import (DEVICE, LLAMA4_MULTIMODAL, TINY_CONFIGS, assert_matches_transformers, build_transformers_model,
                   randomize_biases, transformers_routes)
from moetool.errors import MoetoolError
from moetool.forward import run_forward
from moetool.source import resolve

TINY = dict(TINY_CONFIGS)
T = 40


def _variant(base: str, **changes) -> dict:
    return {**TINY[base], **changes}


def _tokens(model, seed: int = 0) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(seed))


def _saved(config: dict, directory, seed: int = 0):
    model = build_transformers_model(config, seed=seed).eval()
    randomize_biases(model, seed)
    model.save_pretrained(directory)
    return model


def _edit_config(directory, edit) -> None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def assert_matches(out, ref_logits, ref_routes, tol: float = 1e-4) -> None:
    assert_matches_transformers(out, ref_logits, ref_routes, tol=tol)


def check(config: dict, directory, seed: int = 0, edit=None):
    model = _saved(config, directory, seed)
    if edit:
        _edit_config(directory, edit)
    ids = _tokens(model, seed)
    ref_logits, ref_routes = transformers_routes(model, ids)
    out = run_forward(resolve(str(directory)), ids[0].tolist(), dtype="float32", device=DEVICE)
    assert_matches(out, ref_logits, ref_routes)
    return out


# 1. Llama 4 multimodal: the LM head is `language_model.lm_head.weight`; a missing head is an error.

def test_llama4_multimodal_uses_its_lm_head(tmp_path):
    check(LLAMA4_MULTIMODAL, tmp_path)


def test_missing_lm_head_is_an_error_unless_tied(tmp_path):
    _saved(TINY["mixtral"], tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoetoolError, match="lm_head"):
        run_forward(resolve(str(tmp_path)), [1, 2, 3], device=DEVICE)


# 2. fp8 block dequantisation reads `weight_block_size`, as transformers' finegrained-fp8 code does.

def _fp8_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise E4M3 quantisation: one fp32 scale per block, q = w / scale."""
    rows, cols = w.shape
    bm, bn = block
    sr, sc = -(-rows // bm), -(-cols // bn)
    scale = torch.empty(sr, sc)
    for i in range(sr):
        for j in range(sc):
            blk = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            scale[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
    full = scale.repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    return (w / full).to(torch.float8_e4m3fn), scale


def test_fp8_block_size_from_quantization_config(tmp_path):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    # kv_a_proj_with_mqa has kv_lora_rank + qk_rope_head_dim = 12 rows: 2 row blocks of 8, the
    # second one partial (like DeepSeek-V3's 576 rows in 128-row blocks). ceil(12 / 2) = 6 is wrong.
    block = [8, 8]
    config = _variant("deepseek_v3")
    fp8_dir, ref_dir = tmp_path / "fp8", tmp_path / "ref"
    model = _saved(config, fp8_dir)
    weights = load_file(fp8_dir / "model.safetensors")
    quantized, dequantized = {}, {}
    for name, w in weights.items():
        if name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight"):
            q, s = _fp8_quantize(w.float(), block)
            quantized[name], quantized[name + "_scale_inv"] = q, s
            dequantized[name] = _dequantize_fp8_weight(q, s, block, torch.float32)  # transformers' own
        else:
            quantized[name] = dequantized[name] = w
    assert any("kv_a_proj_with_mqa" in n and n.endswith("scale_inv") for n in quantized)
    save_file(quantized, fp8_dir / "model.safetensors", metadata={"format": "pt"})
    _edit_config(fp8_dir, lambda c: c.update(quantization_config=dict(quant_method="fp8", fmt="e4m3",
                                                                       activation_scheme="dynamic",
                                                                       weight_block_size=block)))
    # The reference: transformers loads the weights its own fp8 code dequantises (same names).
    import transformers

    model.save_pretrained(ref_dir)
    save_file(dequantized, ref_dir / "model.safetensors", metadata={"format": "pt"})
    reference = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    ids = _tokens(reference)
    ref_logits, ref_routes = transformers_routes(reference, ids)
    out = run_forward(resolve(str(fp8_dir)), ids[0].tolist(), dtype="float32", device=DEVICE)
    assert_matches(out, ref_logits, ref_routes)


# 3. GLM-4.5: transformers 5 writes partial_rotary_factor inside rope_parameters.

def test_glm4_moe_partial_rotary_factor_in_rope_parameters(tmp_path):
    config = _variant("glm4_moe", partial_rotary_factor=0.25)
    model = _saved(config, tmp_path / "probe")
    saved = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert saved["rope_parameters"]["partial_rotary_factor"] == 0.25 and "partial_rotary_factor" not in saved
    del model
    check(config, tmp_path / "ckpt")


# 4. DBRX: moe_normalize_expert_weights is the p of a p-norm; null means no normalisation.

@pytest.mark.parametrize("p", [2.0, None])
def test_dbrx_normalize_expert_weights(p, tmp_path):
    base = TINY["dbrx"]
    config = {**base, "ffn_config": {**base["ffn_config"], "moe_normalize_expert_weights": p}}
    check(config, tmp_path)


# 5. Layer schedules as transformers builds them.

@pytest.mark.parametrize("base", ["deepseek_v3", "glm4_moe"])
def test_moe_layer_freq_is_ignored_like_transformers(base, tmp_path):
    # transformers' DeepSeek / GLM-4.5 decoders put experts on every layer >= first_k_dense_replace.
    check(_variant(base, moe_layer_freq=2, num_hidden_layers=4), tmp_path)


def test_qwen2_moe_sliding_window_without_layer_types(tmp_path):
    # Without layer_types, Qwen2-MoE slides on even layers (i + 1 odd) below max_window_layers only.
    config = _variant("qwen2_moe", use_sliding_window=True, sliding_window=4, max_window_layers=3,
                      num_hidden_layers=4)
    check(config, tmp_path, edit=lambda c: c.pop("layer_types"))


# 6. hidden_act honoured for routed experts, shared experts and dense MLPs.

@pytest.mark.parametrize("base,act", [("mixtral", "gelu_pytorch_tanh"), ("deepseek_v3", "gelu"),
                                      ("qwen2_moe", "relu"), ("llama4_text", "gelu_new")])
def test_hidden_act(base, act, tmp_path):
    check(_variant(base, hidden_act=act), tmp_path)


def test_dbrx_ffn_act_fn(tmp_path):
    base = TINY["dbrx"]
    check({**base, "ffn_config": {**base["ffn_config"], "ffn_act_fn": {"name": "gelu"}}}, tmp_path)
