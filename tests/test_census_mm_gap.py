"""The multimodal families of arch/mm_gap.py beyond the census's total and per-group checks
(tests/test_census.py): active parameters and the reported MoE structure, against transformers'
modules of each kind on the census's tiny checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from census_reference import build, param_count, shrunk_config

import moetool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(model_type: str):
        if model_type not in cache:
            config = shrunk_config(model_type)
            model = build(model_type, config, device="cpu")
            d = tmp_path_factory.mktemp(model_type)
            model.save_pretrained(d)
            cache[model_type] = (d, model, config)
        return cache[model_type]

    return get


def _numel(model, *parts: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if any(s in n for s in parts))


def _count_both(d: Path):
    """(config-only report, header report via the CLI's JSON)."""
    out = subprocess.run([sys.executable, "-m", "moetool", "count", str(d), "--json"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return moetool.count(str(d / "config.json")), json.loads(out.stdout)


def test_ernie4_5_vl_active_is_per_text_token(saved):
    # A text token runs k of the E text experts and none of the vision experts (Ernie4_5_VLMoeMoeBlock
    # routes by modality); original-format checkpoints store both sets as one expert list.
    d, model, config = saved("ernie4_5_vl_moe")
    text = config["text_config"]
    E, k = text["moe_num_experts"], text["moe_k"]
    total = param_count(model)
    text_experts, vision_experts = _numel(model, ".text_moe.experts."), _numel(model, ".vision_moe.experts.")
    assert text_experts and vision_experts
    active = total - _numel(model, "model.vision_tower.", "model.resampler_model.") - text_experts - vision_experts \
        + text_experts * k // E
    one_text_expert = text_experts // E // sum(t == "sparse" for t in text["mlp_layer_types"])
    for r in _count_both(d):
        r = r if isinstance(r, dict) else r.to_dict()
        assert r["total_params"] == total
        assert r["active_params"] == active
        assert r["expert_params"] == one_text_expert
        assert (r["num_experts"], r["top_k"], r["num_shared_experts"]) == (E, k, text["moe_num_shared_experts"])
        assert r["breakdown"]["routed_experts"] == text_experts + vision_experts
        assert sum(row["active"] for row in r["per_layer"]) == active - r["breakdown"]["embedding"] \
            - r["breakdown"]["lm_head"] - model.model.language_model.norm.weight.numel()
        # FLOPs per token: every matmul weight of the language model a text token runs (k text experts,
        # no vision expert; the tied head once), 2 per multiply-add
        lm = model.model.language_model
        weights = sum(p.numel() for n, p in lm.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n
                      and ".experts." not in n and "moe_statics" not in n)
        assert r["flops_per_token"]["matmul"] == 2 * (weights + text_experts * k // E + lm.embed_tokens.weight.numel())


def test_glm5_next_structure(saved):
    d, model, config = saved("glm5_next")
    text = config["text_config"]
    lm = model.model.language_model
    for r in _count_both(d):
        r = r if isinstance(r, dict) else r.to_dict()
        assert (r["num_experts"], r["top_k"], r["num_shared_experts"]) == (
            text["n_routed_experts"], text["num_experts_per_tok"], text["n_shared_experts"])
        assert r["num_moe_layers"] == sum(t == "sparse" for t in text["mlp_layer_types"])
        mixers = [row["mixer"] for row in r["per_layer"]]
        assert mixers == ["kda" if t == "linear_attention" else "mla" for t in text["layer_types"]]
        # hyper-connections counted with the norms, the vision tower as its own group
        assert r["breakdown"]["vision"] == _numel(model, "model.visual.")
        assert r["breakdown"]["norms"] == sum(p.numel() for n, p in lm.named_parameters()
                                              if "norm" in n or "_hc." in n)
        experts = _numel(model, ".mlp.experts.")
        assert r["active_params"] == param_count(model) - r["breakdown"]["vision"] - experts \
            + experts * text["num_experts_per_tok"] // text["n_routed_experts"]


def test_muse_spark_expert_norm_and_projections_are_active(saved):
    # The experts run in a projected space: pre/post_expert_proj and the experts' shared output
    # norm run once per token (not k/E of them); the vision adapter and the audio encoder are towers.
    d, model, config = saved("muse_spark")
    text = config["text_config"]
    E, k = text["num_local_experts"], text["num_experts_per_tok"]
    experts = sum(p.numel() for n, p in model.named_parameters()
                  if ".mlp.experts." in n and "post_expert_norm" not in n)
    vision = _numel(model, "model.vision_tower.", "model.vision_adapter.", "model.vision_projection.")
    audio = _numel(model, "model.audio_tower.")
    for r in _count_both(d):
        r = r if isinstance(r, dict) else r.to_dict()
        assert (r["breakdown"]["vision"], r["breakdown"]["audio"], r["breakdown"]["routed_experts"]) == (
            vision, audio, experts)
        assert r["active_params"] == param_count(model) - vision - audio - experts + experts * k // E
        assert (r["num_experts"], r["top_k"], r["num_moe_layers"]) == (E, k, sum(t == "sparse" for t in text["mlp_layer_types"]))
        assert not r["tie_word_embeddings"]


def test_muse_spark_sliding_layers_follow_layer_types(tmp_path):
    # Without layer_types the config makes every 4th layer counted from the last full attention.
    import transformers

    from moetool.arch import spec_from_config

    cfg = transformers.AutoConfig.for_model("muse_spark", text_config=dict(num_hidden_layers=6, sliding_window=64))
    text = cfg.to_dict()["text_config"]
    expected = [64 if t == "sliding_attention" else None for t in cfg.text_config.layer_types]
    assert 64 in expected and None in expected
    text.pop("layer_types")
    spec = spec_from_config({"model_type": "muse_spark", "text_config": text})
    assert [l.window for l in spec.layers] == expected


def test_unlimited_ocr_structure(saved):
    d, model, config = saved("unlimited_ocr")
    text = config["text_config"]
    E, k = text["n_routed_experts"], text["num_experts_per_tok"]
    experts = _numel(model, ".mlp.experts.")
    vision = _numel(model, "model.vision_tower.", "model.multi_modal_projector.", "model.image_newline",
                    "model.view_separator")
    for r in _count_both(d):
        r = r if isinstance(r, dict) else r.to_dict()
        assert r["breakdown"]["vision"] == vision
        assert r["active_params"] == param_count(model) - vision - experts + experts * k // E
        assert (r["num_experts"], r["top_k"], r["num_shared_experts"]) == (E, k, text["n_shared_experts"])
    # head_dim is hidden_size / heads whatever the config says (UnlimitedOcrTextConfig overrides it)
    bad = {**config, "text_config": {**text, "head_dim": 3}}
    assert moetool.count(_write(d.parent / "uocr-hd", bad)).total_params == param_count(build("unlimited_ocr", bad))


def test_nemo_speechlm_towers_are_audio(saved):
    # ASR encoder, diarization model, projector and word-timestamp encoder / head: all "audio"
    # (original NeMo names perception.* / ctc_timestamp.*, the LM under llm.*).
    d, model, config = saved("nemo_speechlm")
    text = config["text_config"]
    audio = param_count(model) - sum(p.numel() for p in model.model.language_model.parameters()) \
        - model.lm_head.weight.numel()
    experts = _numel(model, ".mixer.experts.")
    for r in _count_both(d):
        r = r if isinstance(r, dict) else r.to_dict()
        assert r["breakdown"]["audio"] == audio and r["breakdown"]["vision"] == 0
        assert r["active_params"] == param_count(model) - audio - experts \
            + experts * text["num_experts_per_tok"] // text["n_routed_experts"]
        assert [row["mixer"] for row in r["per_layer"]] == ["mamba2", "none", "attention"]
        assert r["num_moe_layers"] == 1 and r["num_shared_experts"] == 1
        assert r["kv_cache"]["state_bytes"] > 0  # the Mamba-2 layer's fixed state


def _write(directory: Path, config: dict) -> str:
    directory.mkdir(exist_ok=True)
    p = directory / "config.json"
    p.write_text(json.dumps(config))
    return str(p)


def test_glm5_next_kv_cache_matches_transformers_cache(saved):
    # MLA layers cache the latent (no RoPE part: NoPE); KDA layers a fixed state: the recurrent
    # state [H, Dh, Dh] and the q|k|v convolution's last K - 1 inputs (transformers keeps K columns,
    # the newest one being the current input). The DSA indexer's key cache is not counted (as for
    # every DSA family: deepseek_v32, glm_moe_dsa).
    import torch

    d, model, config = saved("glm5_next")
    T = 7
    with torch.no_grad():
        cache = model(input_ids=torch.arange(T)[None] % config["text_config"]["vocab_size"], use_cache=True).past_key_values
    latent = state = 0
    for layer in cache.layers:
        if hasattr(layer, "recurrent_states"):
            conv = layer.conv_states[0]
            state += layer.recurrent_states[0][0].numel() + conv[0].numel() * (conv.shape[-1] - 1) // conv.shape[-1]
        else:
            latent += (layer.keys[0, :, :T].numel() + layer.values[0, :, :T].numel()) // T
    kv = moetool.count(str(d), context=T, kv_dtype="fp32").kv_cache
    assert kv["bytes_per_token"] == 4 * latent and kv["state_bytes"] == 4 * state
    assert kv["bytes"] == 4 * (latent * T + state)
