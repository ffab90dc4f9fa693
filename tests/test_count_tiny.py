"""Tiny random checkpoints of every family, written by transformers `save_pretrained`: the count
from the safetensors headers equals the analytic count from config.json and transformers' own
parameter count, group by group."""

from __future__ import annotations

import pytest

import moetool
from conftest import ALL_TINY


@pytest.mark.parametrize("name", sorted(ALL_TINY))
def test_headers_equal_analytic_equal_transformers(name, tiny_checkpoint):
    path, tf_count = tiny_checkpoint(name)
    from_headers = moetool.count(str(path))
    from_config = moetool.count(str(path), use_headers=False)
    assert from_headers.counted_from == "headers"
    assert from_config.counted_from == "config"
    assert from_headers.total_params == from_config.total_params == tf_count
    assert from_headers.cross_check["match"], from_headers.cross_check["differences"]
    assert from_headers.breakdown == from_config.breakdown
    assert from_headers.active_params == from_config.active_params
    assert sum(from_headers.breakdown.values()) == tf_count
    assert from_headers.bytes_stored == sum(p.stat().st_size for p in path.glob("*.safetensors")) - sum(
        8 + int.from_bytes(open(p, "rb").read(8), "little") for p in path.glob("*.safetensors"))


@pytest.mark.parametrize("name", sorted(ALL_TINY))
def test_fast_scan_summarises_like_the_full_table(name, tiny_checkpoint):
    """`count` scans headers into a summary (`tensor_table=False`); summarising the full tensor
    table the forward pass uses must give the same rows, and the same report."""
    from moetool.source import resolve

    path, _ = tiny_checkpoint(name)
    table, scanned = resolve(str(path)), resolve(str(path), tensor_table=False)
    assert scanned.tensors is None and table.tensors is not None
    assert scanned.stats.rows == table.stats.rows
    assert scanned.stats.num_tensors == len(table.tensors)
    assert moetool.count(table).to_dict() == moetool.count(scanned).to_dict()


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe-sparse", "deepseek_v3", "gpt_oss", "jamba"])
def test_active_matches_transformers_module_sum(name, tiny_checkpoint):
    """Active = everything but routed experts + k/E of them, computed from transformers' modules."""
    import transformers

    from fakes import build_transformers_model

    model = build_transformers_model(ALL_TINY[name])
    cfg = model.config
    k = cfg.num_experts_per_tok
    E = getattr(cfg, "num_local_experts", None) or getattr(cfg, "n_routed_experts", None) or cfg.num_experts
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and "shared" not in n)
    total = sum(p.numel() for p in model.parameters())
    expected = total - routed + routed * k // E
    path, _ = tiny_checkpoint(name)
    assert moetool.count(str(path)).active_params == expected


def test_per_layer_sums_to_layer_params(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen2_moe-sparse")
    r = moetool.count(str(path))
    assert [l.moe for l in r.per_layer] == [False, True, False, False]  # sparse step 2, layer 3 mlp-only
    layer_total = sum(l.total for l in r.per_layer)
    non_layer = r.breakdown["embedding"] + r.breakdown["lm_head"] + 32  # final norm
    assert layer_total + non_layer == r.total_params
