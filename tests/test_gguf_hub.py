"""Hub GGUF over the fake hub server: the header by growing range requests only (bytes served are
counted: never the tensor data), `org/name:TAG` and `org/name/FILE.gguf`, split sets, the cache
for offline runs, a server that ignores ranges."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from hubserver import FakeHub, hub_env
from moetool.gguf.reader import read_gguf

MIXTRAL_CFG = json.loads((Path(__file__).parents[1] / "sample_configs" / "mixtral-8x7b.json").read_text())


def write_header_only_gguf(path: Path, vocab: int = 32000) -> int:
    """A Mixtral-8x7B-shaped Q4_K_M-style GGUF with a 32k-token vocabulary in its metadata and a
    hole for its ~26 GB of tensor data (a sparse file). Returns the file size."""
    c = MIXTRAL_CFG
    d, F, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L); w.add_context_length(32768); w.add_embedding_length(d); w.add_feed_forward_length(F)
    w.add_head_count(32); w.add_head_count_kv(8); w.add_layer_norm_rms_eps(1e-5); w.add_rope_freq_base(1e6)
    w.add_expert_count(8); w.add_expert_used_count(2); w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<tok{i}>" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)

    def t(name, shape, q):
        block, size = gguf.GGML_QUANT_SIZES[q]
        w.add_tensor_info(name, shape, np.float32, int(np.prod(shape)) // block * size, raw_dtype=q)

    t("token_embd.weight", (V, d), Q.Q4_K)
    t("output_norm.weight", (d,), Q.F32)
    t("output.weight", (V, d), Q.Q6_K)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", (d,), Q.F32)
        t(f"blk.{i}.ffn_norm.weight", (d,), Q.F32)
        for name, out, q in (("attn_q", 4096, Q.Q4_K), ("attn_k", 1024, Q.Q4_K), ("attn_v", 1024, Q.Q6_K),
                             ("attn_output", 4096, Q.Q4_K)):
            t(f"blk.{i}.{name}.weight", (out, d), q)
        t(f"blk.{i}.ffn_gate_inp.weight", (8, d), Q.F32)
        t(f"blk.{i}.ffn_gate_exps.weight", (8, F, d), Q.Q4_K)
        t(f"blk.{i}.ffn_up_exps.weight", (8, F, d), Q.Q4_K)
        t(f"blk.{i}.ffn_down_exps.weight", (8, d, F), Q.Q6_K)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file()
    total = sum(GGUFWriter_pad(ti.nbytes) for ti in w.tensors[0].values())
    w.close()
    with open(path, "r+b") as f:
        f.seek(0, 2)
        start = GGUFWriter_pad(f.tell())  # the data section starts aligned
        f.truncate(start + total)
    return start + total


def GGUFWriter_pad(n: int, align: int = 32) -> int:
    return -(-n // align) * align


@pytest.fixture(scope="module")
def q4km_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ggufrepo")
    write_header_only_gguf(root / "Mixtral-8x7B-Q4_K_M.gguf")
    (root / "README.md").write_text("a GGUF repo\n")
    return root


def count_cli(model: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetool", "count", model, "--json"], capture_output=True,
                          text=True, env=env, timeout=120)


def test_hub_gguf_reads_the_header_only(q4km_repo, tmp_path):
    local = q4km_repo / "Mixtral-8x7B-Q4_K_M.gguf"
    h = read_gguf(local)
    assert h.data_start > 300_000  # the 32k vocabulary makes the header span several range requests
    with FakeHub({"org/Mixtral-GGUF": q4km_repo}) as hub:
        env = hub_env(hub, tmp_path / "cache")
        r = count_cli("org/Mixtral-GGUF:Q4_K_M", env)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["total_params"] == 46_702_792_704
        assert out["active_params_excl_embedding"] == 12_748_853_248
        assert out["bytes_stored"] == sum(t.nbytes for t in h.tensors) > 25e9
        assert out["quantization"] == "gguf (Q4_K_M)"
        sent = hub.bytes_sent["Mixtral-8x7B-Q4_K_M.gguf"]
        ranged = [h_.get("Range") for m, p, h_ in hub.requests if p.endswith(".gguf")]
        assert len(ranged) >= 3 and all(ranged)  # a growing range, never the whole file
        # the header and at most 64 KB past it: never the tensor data (26 GB)
        assert h.data_start <= sent <= h.data_start + 65536, (sent, h.data_start)
        # the same file by name
        r2 = count_cli("org/Mixtral-GGUF/Mixtral-8x7B-Q4_K_M.gguf", env)
        assert r2.returncode == 0 and json.loads(r2.stdout)["total_params"] == 46_702_792_704
        assert hub.bytes_sent["Mixtral-8x7B-Q4_K_M.gguf"] == sent  # the second run came from the cache
    r = count_cli("org/Mixtral-GGUF:Q4_K_M", hub_env(hub, tmp_path / "cache", offline=True))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total_params"] == 46_702_792_704


def test_hub_gguf_split_and_no_range(tmp_path_factory, tmp_path):
    from gguf_convert import tiny_gguf

    first, st_dir, model, _ = tiny_gguf(tmp_path_factory, "qwen3_moe", Q.Q8_0, split=2)
    from fakes import transformers_param_count

    with FakeHub({"org/tiny-GGUF": first.parent}, honour_range=False) as hub:
        r = count_cli("org/tiny-GGUF:Q8_0", hub_env(hub, tmp_path / "cache", token=None))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["total_params"] == transformers_param_count(model)
        assert len([p for _, p, _ in hub.requests if p.endswith(".gguf")]) >= 2  # both parts


def test_hub_gguf_errors(q4km_repo, tmp_path):
    with FakeHub({"org/Mixtral-GGUF": q4km_repo}) as hub:
        env = hub_env(hub, tmp_path / "cache")
        for model, msg in (("org/Mixtral-GGUF:Q8_0", "no .gguf file in the repo matches 'Q8_0'"),
                           ("org/missing:Q4_K_M", "repository not found"),
                           ("org/Mixtral-GGUF", "a GGUF repo? name the quantization: org/Mixtral-GGUF:Q4_K_M")):
            r = count_cli(model, env)
            assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = count_cli("org/Mixtral-GGUF:Q5_K_M", hub_env(hub, tmp_path / "fresh", offline=True))
    assert r.returncode == 2 and "HF_HUB_OFFLINE" in r.stderr


def test_choosing_files_of_a_repo():
    from moetool.errors import MoetoolError
    from moetool.gguf.hub import _choose, match

    files = ["M-Q4_K_M.gguf", "M-Q8_0-00001-of-00002.gguf", "M-Q8_0-00002-of-00002.gguf", "mmproj-Q8_0.gguf",
             "sub/M-IQ4_XS.gguf", "M-Q4_K_S.gguf"]
    assert _choose(files, "q4_k_m", None, "x") == ["M-Q4_K_M.gguf"]
    assert _choose(files, "Q8_0", None, "x") == files[1:3]  # both parts; mmproj skipped
    assert _choose(files, None, "M-Q8_0-00002-of-00002.gguf", "x") == files[1:3]
    assert _choose(files, "IQ4_XS", None, "x") == ["sub/M-IQ4_XS.gguf"]
    for tag, file, msg in (("Q4_K", None, "2 .gguf files match"), ("Q2_K", None, "no .gguf file"),
                           (None, "other.gguf", "the repo has no file 'other.gguf'")):
        with pytest.raises(MoetoolError, match=msg):
            _choose(files, tag, file, "x")
    with pytest.raises(MoetoolError, match="part 'M-00002-of-00002.gguf' is not in the repo"):
        _choose(["M-00001-of-00002.gguf"], None, "M-00001-of-00002.gguf", "x")
    assert match("org/name:Q4_K_M") and match("org/name/a/b.gguf")
    assert not match("org/name") and not match("./x.gguf") and not match("org/name/x.bin")
