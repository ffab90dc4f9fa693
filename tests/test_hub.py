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


# --- transport failures: each its own true line, exit 2, no retry storm (127.0.0.1 only) ----------

import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hubserver import COMMIT


class FaultHub:
    """A hub that fails one way: `mode` picks the fault; config.json and one tiny shard otherwise."""

    def __init__(self, mode: str):
        shard_header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
        shard = len(shard_header).to_bytes(8, "little") + shard_header + bytes(8)
        config = json.dumps(MIXTRAL_CFG).encode()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self._go(False)

            def do_GET(self):
                self._go(True)

            def _go(self, body):
                if mode in ("500", "429"):
                    self.send_response(int(mode))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if mode == "redirect loop":
                    self.send_response(302)
                    self.send_header("Location", self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                name = self.path.rsplit("/", 1)[-1]
                data = {"config.json": config, "model.safetensors": shard}.get(name)
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                shard_req = name.endswith(".safetensors")
                self.send_response(206 if shard_req else 200)
                self.send_header("X-Repo-Commit", "not a commit" if mode == "bad commit header" else COMMIT)
                self.send_header("ETag", '"e%d"' % len(data))
                if shard_req:
                    total = "9" * 40 if mode == "absurd content-range" else str(len(data))
                    self.send_header("Content-Range", f"bytes 0-{len(data) - 1}/{total}")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not body:
                    return
                if (mode == "truncated body" and not shard_req) or (mode == "truncated shard" and shard_req):
                    self.wfile.write(data[:10])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _env(url: str, cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=url, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1")
    env.update(extra)
    return env


FAULTS = {
    "500": "HTTP 500",
    "429": "HTTP 429",
    "redirect loop": "redirected in a loop",
    "truncated body": "broke before the whole response arrived",
    "truncated shard": "broke before the whole response arrived",
    "absurd content-range": "claims the file is 9999",
    "bad commit header": "malformed commit id",
}


@pytest.mark.parametrize("mode", sorted(FAULTS))
def test_hub_transport_failure_is_one_true_line(mode, tmp_path):
    hub = FaultHub(mode)
    try:
        t0 = time.monotonic()
        r = count_cli("org/repo", _env(hub.url, tmp_path / "cache"))
        elapsed = time.monotonic() - t0
    finally:
        hub.close()
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("moetool: error: org/repo"), r.stderr
    assert FAULTS[mode] in r.stderr and "no config.json" not in r.stderr
    assert elapsed < 20, elapsed  # no retry storm


def test_hub_connection_refused(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t0 = time.monotonic()
    r = count_cli("org/repo", _env(f"http://127.0.0.1:{port}", tmp_path / "cache"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "connection refused" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 20


def test_hub_offline_with_empty_cache(tmp_path):
    r = count_cli("org/repo", _env("http://127.0.0.1:9", tmp_path / "cache", HF_HUB_OFFLINE="1"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "HF_HUB_OFFLINE" in r.stderr and "no config.json" not in r.stderr


def test_hub_that_never_answers_times_out(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)  # accepts connections (the kernel's backlog), never answers
    try:
        t0 = time.monotonic()
        r = count_cli("org/repo", _env(f"http://127.0.0.1:{s.getsockname()[1]}", tmp_path / "cache",
                                       MOETOOL_HUB_TIMEOUT="1"))
        elapsed = time.monotonic() - t0
    finally:
        s.close()
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "did not answer within 1 s" in r.stderr, r.stderr
    assert elapsed < 15


def test_bad_hub_timeout_setting(tmp_path):
    r = count_cli("org/repo", _env("http://127.0.0.1:9", tmp_path / "cache", MOETOOL_HUB_TIMEOUT="soon"))
    assert r.returncode == 2 and "MOETOOL_HUB_TIMEOUT" in r.stderr


def test_dns_failure_message():
    """The wording for a name that does not resolve (no network in CI: the exception is built here)."""
    from moetool.hub import transport_message

    class ConnectError(Exception):
        pass

    assert "DNS failure" in transport_message(ConnectError("[Errno -2] Name or service not known"))
    assert "refused" in transport_message(ConnectError("[Errno 111] Connection refused"))


def test_corrupt_cached_header_is_refetched(tmp_path, tiny_checkpoint):
    path, tf_count = tiny_checkpoint("qwen3_moe")
    cache = tmp_path / "cache"
    with FakeHub({"org/tiny": path}) as hub:
        assert count_cli("org/tiny", hub_env(hub, cache)).returncode == 0
        headers = list((cache / "moetool-headers").rglob("*.header"))
        assert headers
        for h in headers:
            h.write_bytes(h.read_bytes()[:12])  # truncated: a crash mid-write, a bad disk
        r = count_cli("org/tiny", hub_env(hub, cache))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["total_params"] == tf_count
    for h in headers:
        h.write_bytes(b"garbage")
    r = count_cli("org/tiny", hub_env(hub, cache, offline=True))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cached header is corrupt" in r.stderr, r.stderr
    assert not any(h.exists() for h in headers)
