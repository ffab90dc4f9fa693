"""The 14 published configs: our total equals transformers' meta-device parameter count
(computed here, independently), and active parameters match the published table in
shared/reference/README.md (the golden numbers below are copied from it)."""

from __future__ import annotations

import json

import pytest

import moetool
from moetool.source import sample_dir

# name -> (total (exact), active excl. input embedding), from shared/reference/README.md
REFERENCE = {
    "mixtral-8x7b": (46_702_792_704, 12_748_853_248),
    "qwen1.5-moe-a2.7b": (14_315_784_192, 2_378_008_576),
    "qwen3-30b-a3b": (30_532_122_624, 3_041_867_776),
    "deepseek-v3": (671_026_404_352, 36_625_603_584),
    "deepseek-v2-lite": (15_706_484_224, 2_451_435_008),
    "olmoe-1b-7b-0924": (6_919_161_856, 1_178_994_688),
    "gpt-oss-20b": (20_914_757_184, 3_608_307_264),
    "phi-3.5-moe-instruct": (41_873_153_344, 6_509_665_600),
    "granite-3.0-3b-a800m": (3_298_793_472, 882_874_368),
    "dbrx": (131_596_523_520, 35_853_146_112),
    "llama-4-scout-17b-16e": (108_641_793_536, 16_138_408_960),
    "glm-4.5-air": (106_852_245_504, 12_803_366_912),
    "jamba-v0.1": (51_570_323_328, 11_841_875_840),
    "switch-base-8": (619_339_008, 222_977_280),
}


def test_all_samples_shipped():
    assert sorted(p.stem for p in sample_dir().glob("*.json")) == sorted(REFERENCE)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_published_figures(name):
    r = moetool.count(name)
    total, active_excl = REFERENCE[name]
    assert r.total_params == total
    assert r.active_params_excl_embedding == active_excl
    assert sum(r.breakdown.values()) == r.total_params


def _meta_count(config: dict) -> int:
    import torch
    import transformers

    config = {k: v for k, v in config.items() if k not in ("auto_map", "quantization_config")}
    cfg = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        if config["model_type"] == "llama4":
            model = transformers.Llama4ForConditionalGeneration(cfg)
        elif config["model_type"] == "switch_transformers":
            model = transformers.SwitchTransformersForConditionalGeneration(cfg)
        else:
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_total_equals_transformers_meta_count(name):
    config = json.loads((sample_dir() / f"{name}.json").read_text())
    assert moetool.count(name).total_params == _meta_count(config)


def test_deepseek_v3_mtp_and_active_with_embedding():
    r = moetool.count("deepseek-v3")
    assert r.mtp_params == 11_610_067_968  # shared/reference/README.md
    assert r.active_params == r.active_params_excl_embedding + 129_280 * 7168


def test_tied_embedding_is_the_head():
    r = moetool.count("granite-3.0-3b-a800m")
    assert r.tie_word_embeddings and r.breakdown["lm_head"] == 0
    assert r.active_params == r.active_params_excl_embedding  # the one matrix is the head


def test_llama4_vision_is_its_own_group_and_not_active():
    r = moetool.count("llama-4-scout-17b-16e")
    assert r.breakdown["vision"] == 871_932_416
    assert r.total_params - r.breakdown["vision"] == 107_769_861_120


def test_published_active_with_embedding():
    # Qwen3-30B-A3B's model card gives 3.3B active including the embedding: 3,353,032,704.
    assert moetool.count("qwen3-30b-a3b").active_params == 3_353_032_704
    assert moetool.count("olmoe-1b-7b-0924").active_params == 1_282_017_280
