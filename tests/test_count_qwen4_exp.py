"""Qwen4-Exp's count adapter (moetool/arch/qwen4_exp.py) beyond the census (tests/test_census.py checks the
default config with a QSA indexer, the shrunk config with PLE, and the save_pretrained headers):
Per-Layer Embedding at its real size (n-gram tables of primes after 20,000,000) equals transformers'
parameter count on the meta device; an indexed layer without the indexer fields is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from census_reference import _merge, build, default_config, param_count

import moetool
from moetool.arch.qwen4_exp import _is_prime, _primes_after


def _count(tmp_path, config: dict):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(config))
    return moetool.count(str(p))


def test_real_size_ple_tables_equal_transformers(tmp_path):
    config = _merge(default_config("qwen4_exp_text"), dict(ple_layer_ids=[6, 2], eos_token_id=2, ple_embed_dim=1024))
    r = _count(tmp_path, config)
    assert r.total_params == param_count(build("qwen4_exp_text", config))
    assert sum(r.breakdown.values()) == r.total_params
    # the two n-gram tables dominate: 2 layers x 16 heads of ~20M rows x 64, in the embedding group
    assert r.breakdown["embedding"] > 2 * 16 * 20_000_000 * 64
    assert r.breakdown["dense_mlp"] == 2 * (4 * 2048 * 1024 + 2048 * 1024 + 4 * 2048 * 4)


def test_primes_are_transformers_primes():
    from transformers.models.qwen4_exp.modeling_qwen4_exp import _find_nth_prime_after, _is_prime as tf_is_prime

    assert _primes_after(19_999_999, 5) == [_find_nth_prime_after(19_999_999, n) for n in range(1, 6)]
    assert [n for n in range(2000) if _is_prime(n)] == [n for n in range(2000) if tf_is_prime(n)]


@pytest.mark.parametrize("model_type", ["qwen4_exp_text", "qwen4_exp"])
def test_indexed_layers_without_indexer_fields_refused_in_one_line(model_type, tmp_path):
    """transformers 5.23's default config leaves the QSA fields None and cannot build the model
    (TypeError); count says which fields are missing, exit 2, no traceback."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = subprocess.run([sys.executable, "-m", "moetool", "count", str(tmp_path / "config.json")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "indexer_n_heads" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
