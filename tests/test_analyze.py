"""`moetool analyze`: each engine's recording format, written from a real moetool trace of a tiny
transformers checkpoint (DeepSeek-V3 with a dense first layer, so the layer mapping matters),
must give back exactly the metrics `trace` reports on the same tokens."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import write_tokenizer

PROMPTS = ["def add(a, b): return a + b", "The quick brown fox jumps over the lazy dog."]
# metrics an engine recording cannot have: they need the router's logits
LOGIT_METRICS = {"router_entropy_mean", "topk_mass_mean", "near_tie_rate", "switch_balance_loss"}
LOAD_METRICS = ["tokens", "load", "max_mean_ratio", "maxvio", "cv", "gini", "load_entropy_norm", "dead_experts",
                "dead_count", "cold_experts", "cold_count"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetool", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    """A tiny DeepSeek-V3 (layer 0 dense, MoE layers 1 and 2; 8 experts, top-2, 4 groups) with a
    tokenizer, and moetool's corpus trace of two prompts."""
    import moetool
    from moetool.arch import spec_from_config
    from moetool.tracing import trace_many

    src, _ = tiny_checkpoint("deepseek_v3")
    d = tmp_path_factory.mktemp("analyze_model")
    for f in os.listdir(src):
        shutil.copy(src / f, d / f)
    write_tokenizer(d)
    corpus = trace_many(PROMPTS, model=str(d))
    spec = spec_from_config(json.loads((d / "config.json").read_text()))
    assert spec.moe_layers != list(range(spec.num_layers))  # dense layers exist: mapping is exercised
    single = moetool.trace(PROMPTS[0], model=str(d))
    return d, spec, corpus, single


def choices(report) -> np.ndarray:
    """[T, moe_layers, k] of one TraceReport."""
    return np.stack([np.array(l.experts) for l in report.layers], axis=1)


def assert_same_metrics(trace_layers, analyzed: dict, keys=None) -> None:
    assert [l["layer"] for l in analyzed["layers"]] == [l["layer"] for l in trace_layers]
    for lt, la in zip(trace_layers, analyzed["layers"]):
        for key in keys or [k for k in lt["metrics"] if k not in LOGIT_METRICS]:
            assert la["metrics"][key] == lt["metrics"][key], (lt["layer"], key)


def corpus_layers(corpus):
    return corpus.layers  # [{"layer", "metrics"}], pooled over the prompts


def analyze_json(paths, model, *extra) -> dict:
    r = run_cli("analyze", *map(str, paths), "--model", str(model), "--json", *extra)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["schema_version"] == 1 and out["command"] == "analyze"
    return out


def test_vllm_npy_and_json(setup, tmp_path):
    d, spec, corpus, single = setup
    # one request as .npy (int16 as vLLM returns it): equals the single-prompt trace
    np.save(tmp_path / "r0.npy", choices(single).astype(np.int16))
    out = analyze_json([tmp_path / "r0.npy"], d)
    assert out["format"] == "vllm" and out["tokens"] == len(single.tokens)
    assert_same_metrics([{"layer": l.layer, "metrics": l.metrics} for l in single.layers], out)
    # both requests in one JSON list: equals the pooled corpus metrics of `trace --file`
    reqs = [{"request_id": str(i), "routed_experts": choices(p).tolist()} for i, p in enumerate(corpus.prompts)]
    (tmp_path / "reqs.json").write_text(json.dumps(reqs))
    out = analyze_json([tmp_path / "reqs.json"], d)
    assert out["sequences"] == 2
    assert_same_metrics(corpus_layers(corpus), out)
    # vLLM with every decoder layer recorded (dense layers' rows are meaningless and dropped)
    full = np.zeros((len(single.tokens), spec.num_layers, spec.moe.top_k), dtype=np.int16)
    full[:, spec.moe_layers] = choices(single)
    np.save(tmp_path / "all.npy", full)
    out = analyze_json([tmp_path / "all.npy"], d)
    assert_same_metrics([{"layer": l.layer, "metrics": l.metrics} for l in single.layers], out)


def test_sglang_base64(setup, tmp_path):
    d, spec, corpus, _ = setup
    lines = []
    for p in corpus.prompts:
        arr = np.zeros((len(p.tokens), spec.num_layers, spec.moe.top_k), dtype="<i4")  # every decoder layer
        arr[:, spec.moe_layers] = choices(p)
        lines.append(json.dumps({"text": "...", "meta_info": {
            "prompt_tokens": len(p.tokens), "completion_tokens": 0,
            "routed_experts": base64.b64encode(arr.tobytes()).decode()}}))
    (tmp_path / "sglang.jsonl").write_text("\n".join(lines) + "\n")
    out = analyze_json([tmp_path / "sglang.jsonl"], d)
    assert out["format"] == "sglang"
    assert_same_metrics(corpus_layers(corpus), out)


def test_sglang_recorder_dump_without_unpickling(setup, tmp_path):
    import torch

    d, spec, corpus, _ = setup
    E, k = spec.moe.num_experts, spec.moe.top_k
    # physical slots: experts permuted plus two redundant copies, as EPLB lays them out
    rng = np.random.default_rng(0)
    p2l = np.concatenate([rng.permutation(E), [0, 1]])
    l2p = {int(l): i for i, l in enumerate(p2l) if i < E}
    records = []
    for i, p in enumerate(corpus.prompts):
        t = np.full((spec.num_layers, len(p.tokens), 8), -1, dtype=np.int32)
        logical = choices(p)  # [T, L_moe, k]
        phys = np.vectorize(l2p.get)(logical)
        if i == 1:  # use a redundant physical copy for expert 0 / 1: must map back to the same expert
            phys = np.where(logical == 0, E, np.where(logical == 1, E + 1, phys))
        t[spec.moe_layers, :, :k] = phys.transpose(1, 0, 2)
        records.append(dict(forward_pass_id=i, rank=0, gatherer_key="primary", input_ids=[1] * len(p.tokens),
                            positions=list(range(len(p.tokens))), extend_seq_lens=[len(p.tokens)], forward_mode=1,
                            topk_ids_of_layer=torch.from_numpy(t), misc_objects=[],
                            global_physical_count=torch.zeros(spec.num_layers, E + 2, dtype=torch.int64)))
    p2l_t = torch.from_numpy(np.tile(p2l, (spec.num_layers, 1)))
    torch.save(dict(records=records, last_physical_to_logical_map=p2l_t), tmp_path / "expert_distribution_recorder_1.pt")
    out = analyze_json([tmp_path / "expert_distribution_recorder_1.pt"], d)
    assert out["format"] == "sglang-pt"
    assert_same_metrics(corpus_layers(corpus), out)


def test_router_jsonl_with_weights(setup, tmp_path):
    d, spec, corpus, _ = setup
    lines = []
    for b, p in enumerate(corpus.prompts):
        for l in p.layers:
            lines.append(json.dumps({"layer": l.layer, "batch_id": b, "origin_rows": [0] * len(l.experts),
                                     "topk_experts": l.experts, "topk_weights": l.weights}))
    (tmp_path / "router_trace.jsonl").write_text("\n".join(lines[::-1]) + "\n")  # order must not matter
    out = analyze_json([tmp_path / "router_trace.jsonl"], d)
    assert out["format"] == "router-jsonl"
    assert_same_metrics(corpus_layers(corpus), out)


def test_trtllm_expert_statistics(setup, tmp_path):
    from safetensors.numpy import save_file

    d, spec, corpus, _ = setup
    E = spec.moe.num_experts
    stat = tmp_path / "expert_statistic"
    stat.mkdir()
    (stat / "meta_info.json").write_text(json.dumps({"num_experts": E, "num_experts_per_token": spec.moe.top_k}))
    # two ranks, each its own prompt; rank 1 over two iterations (split tokens)
    for rank, p in enumerate(corpus.prompts):
        recs = {}
        c = choices(p)
        halves = [c] if rank == 0 else [c[:3], c[3:]]
        for it, part in enumerate(halves):
            for j, layer in enumerate(spec.moe_layers):
                recs[f"{it}_{layer}"] = np.bincount(part[:, j].reshape(-1), minlength=E).astype(np.int64)
        save_file(recs, str(stat / f"rank{rank}.safetensors"))
    out = analyze_json([stat], d)
    assert out["format"] == "trtllm"
    assert_same_metrics(corpus_layers(corpus), out, LOAD_METRICS)
    assert out["layers"][0]["metrics"]["coactivation_top_pairs"] is None  # not in the recording: null, not invented


def test_llama_cpp_imatrix(setup, tmp_path):
    import gguf

    d, spec, corpus, _ = setup
    E = spec.moe.num_experts
    w = gguf.GGUFWriter(str(tmp_path / "imatrix.gguf"), arch="deepseek2")
    w.add_string("general.type", "imatrix")
    w.add_uint32("imatrix.chunk_count", 1)
    allc = np.concatenate([choices(p) for p in corpus.prompts])
    for layer in range(spec.num_layers):
        if layer in spec.moe_layers:
            j = spec.moe_layers.index(layer)
            counts = np.bincount(allc[:, j].reshape(-1), minlength=E).astype(np.float32)
            for proj in ("ffn_up_exps", "ffn_gate_exps", "ffn_down_exps"):
                w.add_tensor(f"blk.{layer}.{proj}.weight.in_sum2", np.ones((E, 16), dtype=np.float32))
                w.add_tensor(f"blk.{layer}.{proj}.weight.counts", counts.reshape(E, 1))
        w.add_tensor(f"blk.{layer}.attn_q.weight.counts", np.array([[5.0]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = analyze_json([tmp_path / "imatrix.gguf"], d)
    assert out["format"] == "imatrix"
    assert_same_metrics(corpus_layers(corpus), out, LOAD_METRICS)


def test_long_table_csv_from_trace(setup, tmp_path):
    d, _, corpus, _ = setup
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    r = run_cli("trace", "--file", str(prompts), "--model", str(d), "--format", "csv", "-o", str(tmp_path / "t.csv"))
    assert r.returncode == 0, r.stderr
    out = analyze_json([tmp_path / "t.csv"], d)
    assert out["format"] == "csv"
    assert_same_metrics(corpus_layers(corpus), out)


def test_table_output_and_gate(setup, tmp_path):
    d, _, _, single = setup
    np.save(tmp_path / "r0.npy", choices(single).astype(np.int16))
    r = run_cli("analyze", str(tmp_path / "r0.npy"), "--model", str(d))
    assert r.returncode == 0, r.stderr
    assert "Routing metrics per MoE layer (recorded by vllm)" in r.stdout
    r = run_cli("analyze", str(tmp_path / "r0.npy"), "--model", str(d), "--max-imbalance", "1.0")
    assert r.returncode == 1 and "gate failed" in r.stderr


def test_crafted_pt_never_runs_code(setup, tmp_path):
    import pickle
    import zipfile

    d = setup[0]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"records": [Evil()]}, protocol=2))
    r = run_cli("analyze", str(tmp_path / "evil.pt"), "--model", str(d))
    assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("name,content,needle", [
    ("empty.json", b"", "empty file"),
    ("bad.json", b"\xff\xfe{", "not UTF-8"),
    ("deep.json", b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    ("notjson.jsonl", b'{"topk_experts": [[0, 1]], "layer": 1}\n{oops\n', "invalid JSON"),
    ("trunc.npy", None, "unreadable .npy"),
    ("range.npy", "range", "outside 0.."),
    ("k.npy", "k", "routes to top-"),
    ("trunc.gguf", b"GGUF\x03\x00\x00\x00\x05", "truncated"),
    ("sg.json", b'{"meta_info": {"routed_experts": "!!notbase64"}}', "not valid base64"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 40 else "-")
def test_bad_recordings_one_line_exit_2(setup, tmp_path, name, content, needle):
    d, spec, _, single = setup
    p = tmp_path / name
    c = choices(single).astype(np.int16)
    if content is None:
        np.save(p, c)
        p.write_bytes(p.read_bytes()[:-7])
    elif content == "range":
        c[0, 0, 0] = spec.moe.num_experts
        np.save(p, c)
    elif content == "k":
        np.save(p, c[:, :, :1])
    else:
        p.write_bytes(content)
    r = run_cli("analyze", str(p), "--model", str(d))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_profile_out_merges_with_profile(setup, tmp_path):
    """A recording turned into a profile equals `moetool profile` of the same prompts (the counts
    exactly), merges with it, and feeds `plan pin`."""
    d, _, corpus, _ = setup
    reqs = [{"routed_experts": choices(p).tolist()} for p in corpus.prompts]
    (tmp_path / "reqs.json").write_text(json.dumps(reqs))
    r = run_cli("analyze", str(tmp_path / "reqs.json"), "--model", str(d), "--profile-out", str(tmp_path / "prof"))
    assert r.returncode == 0, r.stderr
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    r = run_cli("profile", str(prompts), "--model", str(d), "-o", str(tmp_path / "real"))
    assert r.returncode == 0, r.stderr
    a = json.loads((tmp_path / "prof" / "profile.json").read_text())
    b = json.loads((tmp_path / "real" / "profile.json").read_text())
    assert a["tokens"] == b["tokens"] and [l["load"] for l in a["layers"]] == [l["load"] for l in b["layers"]]
    for la, lb in zip(a["layers"], b["layers"]):
        assert la["metrics"]["coactivation_top_pairs"] == lb["metrics"]["coactivation_top_pairs"]
        assert la["metrics"]["transition_nmi"] == lb["metrics"]["transition_nmi"]
    r = run_cli("merge", str(tmp_path / "prof"), str(tmp_path / "real"), "-o", str(tmp_path / "both"))
    assert r.returncode == 0, r.stderr
    both = json.loads((tmp_path / "both" / "profile.json").read_text())
    assert both["tokens"] == 2 * a["tokens"]
    r = run_cli("plan", "pin", "--profile", str(tmp_path / "prof"), "--model", str(d), "--budget", "20KB", "--json")
    assert r.returncode == 0, r.stderr
