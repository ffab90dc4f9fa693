"""The `count` command line: the JSON contract, CSV, the table, fast start without torch/pandas,
and a DeepSeek-V3-shaped checkpoint of 163 header-only shards (fp8 weights + scales, MTP layer)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import moetool
from fakes import deepseek_v3_tensors, write_sharded
from test_bad_input import run_cli

REPO = Path(__file__).parents[1]


def test_json_contract():
    r = run_cli("count", "mixtral-8x7b", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert list(out)[:2] == ["schema_version", "command"] and out["command"] == "count"
    for key in ("schema_version", "model_type", "total_params", "active_params", "active_params_excl_embedding",
                "mtp_params", "num_experts", "top_k", "num_moe_layers", "breakdown", "bytes_stored"):
        assert key in out
    assert out["model_type"] == "mixtral" and out["num_experts"] == 8 and out["top_k"] == 2
    assert out["num_moe_layers"] == 32 and out["bytes_stored"] is None
    assert sum(out["breakdown"].values()) == out["total_params"]
    assert all(isinstance(v, int) for v in out["breakdown"].values())
    assert out["active_params"] - out["active_params_excl_embedding"] == 32000 * 4096


def test_json_is_deterministic():
    a, b = run_cli("count", "deepseek-v3", "--json"), run_cli("count", "deepseek-v3", "--json")
    assert a.stdout == b.stdout


def test_csv_and_table_and_per_layer():
    r = run_cli("count", "qwen3-30b-a3b", "--format", "csv")
    assert r.returncode == 0 and r.stdout.startswith("metric,value\n") and "total_params,30532122624" in r.stdout
    r = run_cli("count", "qwen3-30b-a3b", "--format", "csv", "--per-layer")
    assert r.stdout.count("\n") == 49  # header + 48 layers
    r = run_cli("count", "qwen3-30b-a3b", "--per-layer")
    assert r.returncode == 0 and "30,532,122,624" in r.stdout and "Per layer" in r.stdout


def test_count_imports_neither_torch_nor_pandas():
    code = ("import sys; from moetool.cli import main\n"
            "sys.argv=['moetool','count','deepseek-v3','--json']\n"
            "import io, contextlib\n"
            "try:\n    main()\nexcept SystemExit: pass\n"
            "heavy=[m for m in ('torch','pandas','matplotlib','transformers','huggingface_hub') if m in sys.modules]\n"
            "sys.stderr.write(repr(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stderr.strip().endswith("[]"), r.stderr


def test_kv_cache_conventions():
    # Mixtral: 32 layers x 8 KV heads x 128 x (K+V) x 2 bytes = 131,072 bytes per token.
    r = moetool.count("mixtral-8x7b", context=1000, batch=2)
    assert r.kv_cache["bytes_per_token"] == 131_072 and r.kv_cache["bytes"] == 131_072 * 1000 * 2
    # DeepSeek-V3 MLA: (512 + 64) x 61 layers x 2 bytes = 70,272 bytes per token (the paper's 70 KB).
    assert moetool.count("deepseek-v3").kv_cache["bytes_per_token"] == 70_272
    # gpt-oss: half the layers slide over 128 tokens.
    g = moetool.count("gpt-oss-20b", context=4096)
    per_layer = 8 * 64 * 2 * 2
    assert g.kv_cache["bytes"] == 12 * per_layer * 4096 + 12 * per_layer * 128
    # Jamba: 4 attention layers of 32; Mamba layers hold a fixed state independent of context.
    j1, j2 = moetool.count("jamba-v0.1", context=1000), moetool.count("jamba-v0.1", context=2000)
    assert j2.kv_cache["bytes"] - j1.kv_cache["bytes"] == 4 * 8 * 128 * 2 * 2 * 1000
    assert j1.kv_cache["state_bytes"] > 0


def test_flops_and_offload():
    r = moetool.count("mixtral-8x7b", context=1)
    # 2 FLOPs per active matmul weight (LM head included, embedding lookup not, norms and router
    # vectors... the router is a matmul too) + attention over one cached position.
    assert r.flops_per_token["matmul"] == 2 * (r.active_params_excl_embedding - r.breakdown["norms"])
    assert r.offload_bytes["bf16"] == 2 * (r.active_params)
    assert r.weights_bytes["bf16"] == 2 * r.total_params


@pytest.fixture(scope="module")
def deepseek_v3_dir(tmp_path_factory):
    config = json.loads((REPO / "sample_configs" / "deepseek-v3.json").read_text())
    root = tmp_path_factory.mktemp("dsv3")
    write_sharded(root, deepseek_v3_tensors(config), 163, config)
    return root


def test_deepseek_v3_163_header_only_shards(deepseek_v3_dir):
    r = run_cli("count", str(deepseek_v3_dir), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(list(deepseek_v3_dir.glob("*.safetensors"))) == 163
    assert out["counted_from"] == "headers"
    assert out["total_params"] == 671_026_404_352
    assert out["active_params_excl_embedding"] == 36_625_603_584
    assert out["mtp_params"] == 11_610_067_968
    assert out["cross_check"]["match"] and out["cross_check"]["differences"] == []
    kinds = {s["kind"]: s for s in out["cross_check"]["stored_not_counted"]}
    assert set(kinds) == {"quant_meta", "buffer", "tied_copy"}
    assert kinds["tied_copy"]["elements"] == 2 * 129_280 * 7168  # MTP's embedding and head copies
    assert kinds["buffer"]["tensors"] == 59  # e_score_correction_bias: 58 MoE layers + MTP
    assert out["quantization"] == "fp8 (e4m3)"
    assert out["bytes_stored_by_dtype"]["F8_E4M3"] > 600e9


def test_deepseek_v3_parallel_scan_equals_serial(deepseek_v3_dir):
    """Shards are scanned in worker processes when there are many: the output may not depend on it."""
    import os

    outs = [run_cli("count", str(deepseek_v3_dir), "--json", env={**os.environ, "MOETOOL_JOBS": j}) for j in "13"]
    assert all(r.returncode == 0 for r in outs), [r.stderr for r in outs]
    assert outs[0].stdout == outs[1].stdout
