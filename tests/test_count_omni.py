"""Qwen3-Omni (qwen3_omni_moe, arch/qwen3_omni.py): the whole Qwen3OmniMoeForConditionalGeneration counted
exactly against transformers (its census checks: tests/test_census.py -k qwen3_omni), plus the config
variants the census does not reach and the convention: active parameters, FLOPs, E and k are the thinker's
per text token; the talker (its own routed experts included) and code2wav are in the "audio" group."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from census_reference import build, param_count, shrunk_config

import moetool

ROOT = Path(__file__).resolve().parents[1]


def _count(tmp_path: Path, config: dict):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(config))
    return moetool.count(str(p))


def _variant(edit) -> dict:
    c = copy.deepcopy(shrunk_config("qwen3_omni_moe"))
    edit(c)
    return c


VARIANTS = {
    "talker_tied_codec_head": lambda c: c["talker_config"].update(tie_word_embeddings=True),
    "talker_head_dim": lambda c: c["talker_config"]["text_config"].update(head_dim=16),
    "code2wav_head_dim": lambda c: c["code2wav_config"].update(head_dim=16),
    # the talker's layers are all MoE whatever mlp_only_layers / decoder_sparse_step say (its decoder
    # layer replaces the mlp unconditionally)
    "talker_mlp_only_layers": lambda c: c["talker_config"]["text_config"].update(mlp_only_layers=[0],
                                                                                 decoder_sparse_step=2),
    "no_audio_output": lambda c: c.update(enable_audio_output=False),
    "talker_attention_bias": lambda c: (c["talker_config"]["text_config"].update(attention_bias=True),
                                        c["code2wav_config"].update(attention_bias=True)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_equal_transformers(variant, tmp_path):
    config = _variant(VARIANTS[variant])
    model = build("qwen3_omni_moe", config)
    r = _count(tmp_path, config)
    assert r.total_params == param_count(model)
    assert sum(r.breakdown.values()) == r.total_params
    assert hasattr(model, "talker") == (variant != "no_audio_output")


def test_convention_active_is_the_thinkers_per_text_token(tmp_path):
    config = shrunk_config("qwen3_omni_moe")
    model = build("qwen3_omni_moe", config)
    r = _count(tmp_path, config)
    # the speech output (talker + code2wav) and the audio encoder make up the "audio" group, exactly
    speech = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("talker.", "code2wav.")))
    audio_in = sum(p.numel() for n, p in model.named_parameters() if n.startswith("thinker.model.audio_tower."))
    assert r.breakdown["audio"] == speech + audio_in
    # routed experts: the thinker's only; E and k the thinker's
    thinker_experts = sum(p.numel() for n, p in model.named_parameters()
                          if n.startswith("thinker.") and ".mlp.experts." in n)
    assert r.breakdown["routed_experts"] == thinker_experts
    text = config["thinker_config"]["text_config"]
    assert (r.num_experts, r.top_k) == (text["num_experts"], text["num_experts_per_tok"])
    # active and FLOPs: the same as the thinker alone (the speech output adds nothing per text token)
    thinker_only = _count(tmp_path, {**config, "enable_audio_output": False})
    assert (r.active_params, r.flops_per_token) == (thinker_only.active_params, thinker_only.flops_per_token)
    assert r.total_params - thinker_only.total_params == speech
    assert any("talker" in n and "audio" in n for n in r.notes)


def test_config_without_the_talkers_shared_expert_width_is_refused_in_one_line(tmp_path):
    # transformers 5.23 cannot build it either (AttributeError): no number to guess
    config = shrunk_config("qwen3_omni_moe")
    del config["talker_config"]["text_config"]["shared_expert_intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = subprocess.run([sys.executable, "-m", "moetool", "count", str(tmp_path / "config.json")], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "shared_expert_intermediate_size" in out.stderr
