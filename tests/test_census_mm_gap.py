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
