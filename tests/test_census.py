"""Census of the MoE architectures of the installed transformers (issue 11).

Every census model_type (tests/census_families.py) is either supported, and then:
- config-only count of its default config == transformers' parameter count of the class the auto
  mappings pick (meta device), and the same for a shrunk variant;
- header count (`moetool count DIR --json`) of a tiny random save_pretrained checkpoint == the
  same model's transformers parameter count, breakdown summing to the total, E and k as configured;
or listed in OUT_OF_SCOPE with its reason. An unhandled model_type fails, by name.
Also: a family without an adapter still gets an exact header count, and docs/architectures.md
is the table scripts/gen_arch_table.py generates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from census_families import (GENERIC_VERIFIED, KNOWN_GAPS, NOT_MOE_MODULES, OUT_OF_SCOPE, moe_model_types,
                             moe_modules, status)
from census_reference import build, default_config, param_count, shrunk_config

import moetool
from moetool.arch import ADAPTERS

ROOT = Path(__file__).resolve().parents[1]
CENSUS = list(moe_model_types())
SUPPORTED = [mt for mt in CENSUS if status(mt) == "supported"]


def _count_config(tmp_path: Path, config: dict) -> moetool.counting.CountReport:
    p = tmp_path / "config.json"
    p.write_text(json.dumps(config))
    return moetool.count(str(p))


@pytest.fixture(scope="session")
def census_checkpoint(tmp_path_factory):
    """census_checkpoint(model_type) -> (dir, transformers parameter count, config), built once."""
    cache: dict[str, tuple[Path, int, dict]] = {}

    def get(model_type: str):
        if model_type not in cache:
            config = shrunk_config(model_type)
            model = build(model_type, config, device="cpu")
            import torch

            with torch.no_grad():  # biases and correction biases non-zero: nothing hides behind a zero
                for name, b in model.named_buffers():
                    if "correction_bias" in name:
                        b.uniform_(-0.1, 0.1)
            d = tmp_path_factory.mktemp(f"census-{model_type}")
            model.save_pretrained(d)
            cache[model_type] = (d, param_count(model), config)
        return cache[model_type]

    return get


def test_census_finds_the_known_moe_families():
    # The census itself must not silently shrink: a few families of every kind are found.
    for mt in ("mixtral", "deepseek_v3", "dbrx", "jetmoe", "llama4", "switch_transformers", "nllb-moe", "jamba",
               "qwen3_vl_moe", "gpt_oss", "longcat_flash"):
        assert mt in CENSUS, mt
    assert len(CENSUS) >= 70
    assert set(NOT_MOE_MODULES) <= moe_modules()


def test_out_of_scope_entries_are_census_members():
    assert set(OUT_OF_SCOPE) <= set(CENSUS)
    assert not set(OUT_OF_SCOPE) & set(ADAPTERS)
    # a gap that gets an adapter must leave the list (the list only shrinks)
    assert set(KNOWN_GAPS) <= set(CENSUS) and not set(KNOWN_GAPS) & set(ADAPTERS)


@pytest.mark.parametrize("model_type", GENERIC_VERIFIED)
def test_known_gap_generic_header_count_equals_transformers(model_type, census_checkpoint):
    """No adapter yet: the generic path (arch/generic.py) still counts a checkpoint exactly."""
    d, expected, config = census_checkpoint(model_type)
    out = subprocess.run([sys.executable, "-m", "moetool", "count", str(d), "--json"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["total_params"] == expected and r["num_experts"] and r["top_k"]
    assert "other" not in r["breakdown"], r["breakdown"]  # every stored tensor placed in a group by its name
    assert any("not specifically known" in n or "no adapter" in n for n in r.get("notes", [])), r.get("notes")


@pytest.mark.parametrize("model_type", CENSUS)
def test_handled(model_type):
    assert status(model_type) != "unhandled", (
        f"transformers model_type {model_type!r} has routed experts but no moetool adapter and no OUT_OF_SCOPE "
        "reason: add an adapter (moetool/arch/) or a reason (tests/census_families.py)")


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_config_only_count_equals_transformers(model_type, tmp_path):
    for config in (default_config(model_type), shrunk_config(model_type)):
        r = _count_config(tmp_path, config)
        assert r.counted_from == "config"
        assert r.total_params == param_count(build(model_type, config))
        assert sum(r.breakdown.values()) == r.total_params


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_header_count_equals_transformers(model_type, census_checkpoint):
    d, expected, config = census_checkpoint(model_type)
    out = subprocess.run([sys.executable, "-m", "moetool", "count", str(d), "--json"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["counted_from"] == "headers"
    assert r["total_params"] == expected
    assert r["cross_check"]["match"], r["cross_check"]["differences"]
    assert sum(r["breakdown"].values()) == r["total_params"]
    assert "other" not in r["breakdown"]
    assert r["num_experts"] and r["top_k"] and 1 <= r["top_k"] <= r["num_experts"]


def test_architectures_doc_is_generated():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_arch_table.py")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert (ROOT / "docs" / "architectures.md").read_text() == out.stdout, (
        "docs/architectures.md is stale: python scripts/gen_arch_table.py > docs/architectures.md")


# --- a family moetool has no adapter for -------------------------------------------------------

@pytest.fixture(scope="module")
def renamed(tmp_path_factory):
    """A tiny qwen2_moe (shared expert + gate, q/k/v biases) and a tiny deepseek_v3 (fused experts,
    MLA) saved by transformers, then renamed to model_types nobody knows."""
    out = {}
    for mt, new in (("qwen2_moe", "brand_new_moe"), ("deepseek_v3", "another_new_moe")):
        config = shrunk_config(mt)
        model = build(mt, config, device="cpu")
        d = tmp_path_factory.mktemp(new)
        model.save_pretrained(d)
        c = json.loads((d / "config.json").read_text())
        c["model_type"] = new
        c.pop("architectures", None)
        (d / "config.json").write_text(json.dumps(c))
        out[mt] = (d, param_count(model), model)
    return out


@pytest.mark.parametrize("mt", ["qwen2_moe", "deepseek_v3"])
def test_unknown_family_with_headers_is_counted_exactly(mt, renamed, tmp_path):
    d, expected, model = renamed[mt]
    out = subprocess.run([sys.executable, "-m", "moetool", "count", str(d), "--json"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["total_params"] == expected and r["counted_from"] == "headers"
    assert "not specifically known" in " ".join(r["notes"])
    assert sum(r["breakdown"].values()) == expected and "other" not in r["breakdown"]
    cfg = model.config
    assert (r["num_experts"], r["top_k"]) == (cfg.num_experts if mt == "qwen2_moe" else cfg.n_routed_experts,
                                              cfg.num_experts_per_tok)
    # Per group: the same as transformers' modules of each kind.
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    shared = sum(p.numel() for n, p in model.named_parameters() if ".shared_expert" in n)
    routers = sum(p.numel() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight"))
    assert (r["breakdown"]["routed_experts"], r["breakdown"]["shared_experts"], r["breakdown"]["router"]) == (
        experts, shared, routers)
    # Active: every non-expert parameter plus k of E experts in each MoE layer.
    assert r["active_params"] == expected - experts + experts * cfg.num_experts_per_tok // r["num_experts"]
    # The known family's adapter gives the same total and breakdown on the same tensors.
    known = json.loads((d / "config.json").read_text())
    known["model_type"] = mt
    kd = tmp_path / "known"
    kd.mkdir()
    (kd / "config.json").write_text(json.dumps(known))
    os.symlink(d / "model.safetensors", kd / "model.safetensors")
    k = moetool.count(str(kd))
    assert (k.total_params, k.breakdown, k.active_params) == (r["total_params"], r["breakdown"], r["active_params"])


def test_unknown_family_config_only_is_refused_in_one_line(renamed):
    d = renamed["qwen2_moe"][0]
    out = subprocess.run([sys.executable, "-m", "moetool", "count", str(d / "config.json")], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "unsupported model_type 'brand_new_moe'" in out.stderr


# --- MLA: both KV-cache / attention-FLOPs conventions, labelled (issue 11) ----------------------

def test_mla_kv_cache_conventions_match_transformers_cache(census_checkpoint):
    import torch

    d, _, config = census_checkpoint("deepseek_v3")
    model = build("deepseek_v3", config, device="cpu")
    T = 5
    with torch.no_grad():
        out = model(torch.arange(T)[None] % config["vocab_size"], use_cache=True)
    cache = out.past_key_values
    # transformers 5 caches the compressed latent (kv_nope [B, 1, T, kv_lora], k_rot [B, 1, T, rope])
    latent = sum(layer.keys[0, :, :T].numel() + layer.values[0, :, :T].numel() for layer in cache.layers) // T
    attn = [l.self_attn for l in model.model.layers]
    H = config["num_attention_heads"]
    # decompressed per head: K = [nope from kv_b | shared rope] per head, V per head from kv_b
    per_head = sum(a.kv_b_proj.out_features + H * config["qk_rope_head_dim"] for a in attn)
    r = moetool.count(str(d), context=64, kv_dtype="fp32")
    kv = r.kv_cache
    assert kv["convention"] == "mla_latent"
    assert kv["bytes_per_token"] == 4 * latent  # compressed latent: transformers 5, vLLM, SGLang
    assert kv["bytes_per_token_per_head"] == 4 * per_head  # K and V decompressed per head
    assert kv["bytes_per_head"] == 4 * per_head * 64 and kv["bytes"] == 4 * latent * 64
    kv_lora = config["kv_lora_rank"]
    qk = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    n = len(attn)
    assert r.flops_per_token["attention"] == n * 64 * 2 * H * (qk + config["v_head_dim"])
    assert r.flops_per_token["attention_latent"] == n * 64 * 2 * H * (2 * kv_lora + config["qk_rope_head_dim"])
    assert any("MLA" in note for note in r.notes)


def test_gqa_conventions_coincide(census_checkpoint):
    d, _, _ = census_checkpoint("mixtral")
    r = moetool.count(str(d))
    assert r.kv_cache["convention"] == "per_head"
    assert r.kv_cache["bytes_per_token_per_head"] == r.kv_cache["bytes_per_token"]
    assert r.flops_per_token["attention_latent"] == r.flops_per_token["attention"]


# --- encoder-decoder: untied embeddings and router biases (found while adding their trace) --------

@pytest.mark.parametrize("model_type", ["switch_transformers", "nllb-moe"])
@pytest.mark.parametrize("tie,router_bias", [(True, True), (False, False), (False, True)])
def test_encoder_decoder_untied_and_router_bias_count(model_type, tie, router_bias, tmp_path):
    # transformers 5 unties `shared`, both stacks' embed_tokens and the head when tie_word_embeddings is false,
    # and gives the routers a bias with router_bias: config-only and header counts must follow.
    config = {**shrunk_config(model_type), "tie_word_embeddings": tie, "router_bias": router_bias}
    model = build(model_type, config, device="cpu")
    model.save_pretrained(tmp_path)
    expected = param_count(model)
    assert moetool.count(str(tmp_path / "config.json")).total_params == expected
    r = moetool.count(str(tmp_path))
    assert r.total_params == expected and r.cross_check["match"] and not r.cross_check["stored_not_counted"]
