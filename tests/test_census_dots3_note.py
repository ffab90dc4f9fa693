"""`count` of dots3_note (Dots3NoteForConditionalGeneration: the dots3 text MoE, an MoE vision tower and
an audio encoder) from a config written as the released checkpoints write it, against transformers 5.23:
the text model's fields at the top level (no text_config), the vision tower's sparse layers and expert
counts from `pyramid_num_routed`, the audio encoder's sizes in a Whisper-style `whisper_config`.
The census (tests/test_census.py) checks the transformers-written config and the headers."""

from __future__ import annotations

import copy
import json

import moetool
from census_reference import build, param_count, shrunk_config


def _published(cfg: dict) -> dict:
    out = {k: v for k, v in cfg.items() if k != "text_config"}
    out.update({k: v for k, v in cfg["text_config"].items() if k not in ("model_type", "architectures")})
    v = out["vision_config"] = copy.deepcopy(cfg["vision_config"])
    for key in ("mlp_layer_types", "per_layer_config"):
        v.pop(key, None)
    v["pyramid_num_routed"] = [-1, 4]  # layer 0 dense, layer 1 with 4 routed experts
    v["embed_dim"] = v.pop("hidden_size")
    a = out["audio_config"] = copy.deepcopy(cfg["audio_config"])
    a["whisper_config"] = {"d_model": a.pop("hidden_size"), "encoder_layers": 2,
                           "encoder_attention_heads": a.pop("num_attention_heads"),
                           "encoder_ffn_dim": 24, "num_mel_bins": a.pop("feature_size")}
    for key in ("conv_output_size", "head_dim", "num_key_value_heads", "num_hidden_layers", "intermediate_size"):
        a.pop(key, None)
    return out


def test_published_config_count_equals_transformers(tmp_path):
    cfg = _published(shrunk_config("dots3_note"))
    model = build("dots3_note", cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = moetool.count(str(tmp_path / "config.json"))
    assert r.total_params == param_count(model)
    towers = {g: sum(p.numel() for p in getattr(model.model, f"{g}_tower").parameters()) for g in ("vision", "audio")}
    assert {g: r.breakdown[g] for g in towers} == towers
    assert len(model.model.audio_tower.layers) == 2 and model.model.vision_tower.blocks[1].mlp.experts.num_experts == 4
