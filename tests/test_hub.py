"""Hub ids, against a local HTTP server standing in for the Hugging Face Hub (never the network):
config.json through huggingface-hub, shard headers through range requests only, HF_TOKEN sent,
and a second run with HF_HUB_OFFLINE=1 served from the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import moetool
from fakes import write_header_only
from hubserver import FakeHub, hub_env

MIXTRAL_CFG = json.loads((Path(__file__).parents[1] / "sample_configs" / "mixtral-8x7b.json").read_text())


def count_cli(model: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetool", "count", model, "--json"], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def mixtral_repo(tmp_path_factory):
    """A Mixtral-8x7B-shaped repo: 4 header-only bf16 shards (93 GB of holes) and an index."""
    from fakes import write_sharded

    d = MIXTRAL_CFG["hidden_size"]
    F, V = MIXTRAL_CFG["intermediate_size"], MIXTRAL_CFG["vocab_size"]
    t = {"model.embed_tokens.weight": ("BF16", [V, d]), "model.norm.weight": ("BF16", [d]),
         "lm_head.weight": ("BF16", [V, d])}
    for i in range(MIXTRAL_CFG["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for proj, out in (("q", 4096), ("k", 1024), ("v", 1024), ("o", 4096)):
            t[f"{p}.self_attn.{proj}_proj.weight"] = ("BF16", [out, d])
        t[f"{p}.input_layernorm.weight"] = ("BF16", [d])
        t[f"{p}.post_attention_layernorm.weight"] = ("BF16", [d])
        t[f"{p}.block_sparse_moe.gate.weight"] = ("BF16", [8, d])
        for e in range(8):
            t[f"{p}.block_sparse_moe.experts.{e}.w1.weight"] = ("BF16", [F, d])
            t[f"{p}.block_sparse_moe.experts.{e}.w2.weight"] = ("BF16", [d, F])
            t[f"{p}.block_sparse_moe.experts.{e}.w3.weight"] = ("BF16", [F, d])
    root = tmp_path_factory.mktemp("hubrepo")
    write_sharded(root, t, 4, MIXTRAL_CFG)
    return root


def test_hub_count_reads_headers_only(mixtral_repo, tmp_path):
    with FakeHub({"mistralai/Mixtral-8x7B-v0.1": mixtral_repo}) as hub:
        r = count_cli("mistralai/Mixtral-8x7B-v0.1", hub_env(hub, tmp_path / "cache"))
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["counted_from"] == "headers"
        assert out["total_params"] == 46_702_792_704
        assert out["active_params_excl_embedding"] == 12_748_853_248
        assert out["bytes_stored"] == 2 * 46_702_792_704
        assert out["cross_check"]["match"]
        sent_for_weights = sum(v for k, v in hub.bytes_sent.items() if k.endswith(".safetensors"))
        assert sent_for_weights < 4 * 200_000  # headers only: never the 93 GB of weights
        assert all(h.get("authorization") == "Bearer hf_test_token" or h.get("Authorization") == "Bearer hf_test_token"
                   for _, _, h in hub.requests)
    # The hub is gone now: offline mode is served from the hub cache and moetool's header cache.
    r = count_cli("mistralai/Mixtral-8x7B-v0.1", hub_env(hub, tmp_path / "cache", offline=True))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total_params"] == 46_702_792_704


def test_hub_server_ignoring_range(tmp_path, tiny_checkpoint):
    path, tf_count = tiny_checkpoint("qwen3_moe")
    with FakeHub({"org/tiny": path}, honour_range=False) as hub:
        r = count_cli("org/tiny", hub_env(hub, tmp_path / "cache", token=None))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total_params"] == tf_count


def test_hub_missing_repo_and_offline_miss(tmp_path):
    with FakeHub({}) as hub:
        r = count_cli("org/nothing", hub_env(hub, tmp_path / "cache"))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "org/nothing" in r.stderr
    r = count_cli("org/nothing", hub_env(hub, tmp_path / "cache", offline=True))
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_hub_config_only_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text(json.dumps(MIXTRAL_CFG))
    with FakeHub({"org/cfg": repo}) as hub:
        r = count_cli("org/cfg", hub_env(hub, tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["counted_from"] == "config"


def test_trace_downloads_a_hub_checkpoint(tmp_path, tiny_checkpoint):
    """`trace --model org/name` downloads the safetensors checkpoint into the hub cache, then traces it."""
    import shutil

    from conftest import write_tokenizer

    src, _ = tiny_checkpoint("qwen3_moe")
    repo = tmp_path / "repo"
    shutil.copytree(src, repo)
    write_tokenizer(repo)
    (repo / "pytorch_model.bin").write_bytes(b"\x80\x04.")  # a pickle beside it: never downloaded
    local = subprocess.run([sys.executable, "-m", "moetool", "trace", "def add", "--model", str(repo), "--json",
                            "--device", "cpu"], capture_output=True, text=True, timeout=120)
    with FakeHub({"org/tiny-moe": repo}) as hub:
        r = subprocess.run([sys.executable, "-m", "moetool", "trace", "def add", "--model", "org/tiny-moe", "--json",
                            "--device", "cpu"], capture_output=True, text=True, env=hub_env(hub, tmp_path / "cache"),
                           timeout=180)
        assert r.returncode == 0, r.stderr
        assert "pytorch_model.bin" not in hub.bytes_sent
    a, b = json.loads(local.stdout), json.loads(r.stdout)
    assert b["model"] == "org/tiny-moe"
    assert a["tokens"] == b["tokens"] and [l["experts"] for l in a["layers"]] == [l["experts"] for l in b["layers"]]
