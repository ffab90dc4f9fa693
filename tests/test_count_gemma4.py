"""`count` of DiffusionGemma (arch/diffusion_gemma.py) and the Gemma 4 count paths the census configs do
not reach (arch/gemma4.py), against transformers 5.23: the parameter count of the class the census picks
(DiffusionGemmaForBlockDiffusion, Gemma4ForCausalLM), config-only and header totals, cross-check clean;
and Gemma 4's KV cache from the layer types, head sizes and sharing modes Gemma4TextConfig resolves.

DiffusionGemma ties its decoder's layer weights to the encoder's, but not their biases: with
attention_bias the decoder's biases are extra parameters; with the top-level tie_word_embeddings false
nothing is tied (two text models and an LM head)."""

from __future__ import annotations

import copy

import pytest

import moetool
from census_reference import _merge, build, param_count, shrunk_config

VARIANTS = {
    "shrunk": {},
    "attention-bias": {"text_config": {"attention_bias": True}},
    "untied": {"tie_word_embeddings": False},
    "untied-bias": {"tie_word_embeddings": False, "text_config": {"attention_bias": True}},
    # no per_layer_config: the full layers' head size and KV heads from global_head_dim /
    # num_global_key_value_heads (not gated by attention_k_eq_v, which DiffusionGemma has not)
    "global-dims": {"text_config": {"global_head_dim": 16, "num_global_key_value_heads": 1}},
}


def _config(extra: dict) -> dict:
    cfg = _merge(shrunk_config("diffusion_gemma"), copy.deepcopy(extra))
    if "global_head_dim" in extra.get("text_config", {}):
        cfg["text_config"].pop("per_layer_config")
    return cfg


@pytest.mark.parametrize("name", list(VARIANTS))
def test_diffusion_gemma_count_equals_transformers(name, tmp_path):
    model = build("diffusion_gemma", _config(VARIANTS[name]), device="cpu")
    model.save_pretrained(tmp_path)
    expected = param_count(model)
    headers, config_only = moetool.count(str(tmp_path)), moetool.count(str(tmp_path / "config.json"))
    assert config_only.counted_from == "config" and headers.counted_from == "headers"
    assert headers.total_params == config_only.total_params == expected
    d = headers.to_dict()
    assert d["cross_check"]["match"], d["cross_check"]["differences"]
    assert sum(d["breakdown"].values()) == expected and not d["breakdown"].get("other")
    assert d["num_experts"] == 8 and d["top_k"] == 2


def test_gemma4_global_kv_heads_need_attention_k_eq_v(tmp_path):
    """Gemma4TextConfig gives full layers num_global_key_value_heads only with attention_k_eq_v, whose
    default is false: a config.json without per_layer_config and without attention_k_eq_v keeps
    num_key_value_heads on its full layers (moetool assumed true before)."""
    import json

    cfg = shrunk_config("gemma4_text")
    cfg.pop("per_layer_config")
    cfg.update(global_head_dim=16, num_global_key_value_heads=1, num_key_value_heads=2)
    model = build("gemma4_text", cfg)
    saved = dict(cfg)
    saved.pop("attention_k_eq_v", None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert moetool.count(str(tmp_path / "config.json")).total_params == param_count(model)


@pytest.mark.parametrize("layer_types", [None, ["sliding_attention"] * 4], ids=["default-pattern", "last-forced-full"])
def test_gemma4_kv_cache_follows_transformers_layer_types(layer_types, tmp_path):
    """The KV cache of Gemma 4 from the layer types, head sizes, KV heads and sharing modes transformers'
    Gemma4TextConfig resolves: sliding layers keep `sliding_window` tokens, also without layer_types
    (the default 5:1 pattern) and with a last layer it forces to full attention; KV-shared ("reuse")
    layers keep none. (moetool gave no layer a window without layer_types, and kept the last
    layer's window.)"""
    import json

    import transformers

    cfg = {k: v for k, v in shrunk_config("gemma4_text").items() if k not in ("layer_types", "per_layer_config")}
    cfg.update(num_hidden_layers=8 if layer_types is None else 4, sliding_window=16, global_head_dim=16,
               num_kv_shared_layers=2 if layer_types is None else 0)
    if layer_types is not None:
        cfg["layer_types"] = layer_types
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tc = transformers.AutoConfig.for_model(**cfg)
    context = 64
    expected = sum(2 * tc.per_layer_config[i].num_key_value_heads * tc.per_layer_config[i].head_dim
                   * (min(context, tc.sliding_window) if t == "sliding_attention" else context)
                   for i, (t, mode) in enumerate(zip(tc.layer_types, tc.kv_sharing_modes)) if mode != "reuse")
    kv = moetool.count(str(tmp_path / "config.json"), context=context, kv_dtype="fp32").kv_cache
    assert kv["bytes"] == 4 * expected
    assert kv["windowed_layers"] == sum(t == "sliding_attention" for t in tc.layer_types)


def test_active_excl_embedding_leaves_out_the_per_layer_embedding_when_tied(tmp_path):
    """With tied embeddings the input embedding is the LM head and stays in active_params_excl_embedding;
    Gemma 4's per-layer input embedding is a lookup table all the same, and leaves it (it stayed before:
    ~2.3B for the real E2B / E4B sizes)."""
    import json

    from transformers import AutoConfig

    cfg = AutoConfig.for_model("gemma4_text", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=128,
                               hidden_size_per_layer_input=8, vocab_size_per_layer_input=96, enable_moe_block=True,
                               num_experts=4, top_k_experts=2, moe_intermediate_size=16, tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    r = moetool.count(str(tmp_path))
    model = build("gemma4_text", cfg.to_dict())
    assert r.total_params == param_count(model)
    table = model.model.embed_tokens_per_layer.weight.numel()
    assert table == 96 * 2 * 8
    assert r.active_params - r.active_params_excl_embedding == table
