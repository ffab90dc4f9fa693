"""GGUF in `count`: the pure-Python header reader against the `gguf` package's GGUFReader, exact
counts against transformers for GGUF files written with GGUFWriter (F16, Q8_0, Q4_0, MXFP4) from
tiny models of several families, split files, and bad input (one line, exit 2)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import gguf
import pytest
from gguf import GGMLQuantizationType as Q

import moetool
from gguf_convert import tiny_gguf
from moetool.errors import BadCheckpoint
from moetool.gguf.reader import GGML_TYPES, NeedMore, parse_gguf, read_gguf

FAMILIES = ["mixtral", "mixtral-tied", "qwen2_moe", "qwen3_moe", "qwen3_moe-bias", "deepseek_v2", "deepseek_v3",
            "gpt_oss"]


def _reader_view(path):
    """Metadata and tensor infos as the gguf package's GGUFReader reads them."""
    r = gguf.GGUFReader(str(path))
    md = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        md[k] = v
    tensors = [(t.name, int(t.tensor_type), tuple(int(x) for x in reversed(t.shape.tolist())), int(t.data_offset),
                int(t.n_bytes)) for t in r.tensors]
    return md, tensors


@pytest.mark.parametrize("name,qtype,expert_q", [("mixtral", Q.Q8_0, None), ("qwen3_moe", Q.F16, Q.Q4_0),
                                                  ("gpt_oss", Q.Q8_0, Q.MXFP4), ("deepseek_v3", Q.Q4_0, None)])
def test_reader_agrees_with_gguf_package(tmp_path_factory, name, qtype, expert_q):
    path = tiny_gguf(tmp_path_factory, name, qtype, expert_q)[0]
    h = read_gguf(path)
    md, tensors = _reader_view(path)
    assert set(h.metadata) == set(md)
    for k, v in md.items():
        mine = h.metadata[k]
        if isinstance(v, float):
            assert mine == pytest.approx(v, rel=1e-7), k
        else:
            assert mine == v, k
    # GGUFReader's data_offset is absolute; ours is relative to the data section
    assert [(t.name, t.type_id, t.shape, h.data_start + t.offset, t.nbytes) for t in h.tensors] == tensors


def test_reader_reads_tokenizer_arrays(tmp_path_factory):
    path = tiny_gguf(tmp_path_factory, "qwen3_moe", Q.F32, tokenizer=True)[0]
    h = read_gguf(path)
    md, _ = _reader_view(path)
    assert h.metadata["tokenizer.ggml.tokens"] == md["tokenizer.ggml.tokens"]
    assert h.metadata["tokenizer.ggml.merges"] == md["tokenizer.ggml.merges"]
    assert len(h.metadata["tokenizer.ggml.tokens"]) == 128


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("qtype,expert_q", [(Q.F16, None), (Q.Q8_0, None), (Q.Q4_0, Q.MXFP4)])
def test_count_equals_transformers(tmp_path_factory, name, qtype, expert_q):
    from fakes import transformers_param_count

    path, _, model, cfg = tiny_gguf(tmp_path_factory, name, qtype, expert_q)
    r = moetool.count(str(path))
    assert r.counted_from == "headers"
    assert r.total_params == transformers_param_count(model)
    assert r.cross_check["match"], r.cross_check["differences"]
    # the cross-check names what it compared: a GGUF has no config.json
    assert r.cross_check["config_from"] == "the GGUF metadata"
    # the safetensors checkpoint of the same model counts the same, group by group
    st = moetool.count(str(tiny_gguf(tmp_path_factory, name, qtype, expert_q)[1]))
    assert st.cross_check["config_from"] == "config.json"
    assert r.breakdown == st.breakdown and r.active_params == st.active_params
    assert (r.num_experts, r.top_k, r.num_shared_experts) == (st.num_experts, st.top_k, st.num_shared_experts)
    # exact bytes: what GGUFReader says each tensor occupies, by type
    by_type: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    assert r.bytes_stored_by_dtype == dict(sorted(by_type.items()))


def test_quantized_types_are_really_used(tmp_path_factory):
    r = moetool.count(str(tiny_gguf(tmp_path_factory, "gpt_oss", Q.Q4_0, Q.MXFP4)[0]))
    assert {"MXFP4", "F32"} <= set(r.bytes_stored_by_dtype)
    r = moetool.count(str(tiny_gguf(tmp_path_factory, "mixtral", Q.Q8_0)[0]))
    assert "Q8_0" in r.bytes_stored_by_dtype


def test_block_sizes_match_gguf_package():
    for type_id, (name, block, size) in GGML_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[Q(type_id)] == (block, size), name
        assert Q(type_id).name == name


def test_split_gguf_counts_like_one_file(tmp_path_factory):
    one = moetool.count(str(tiny_gguf(tmp_path_factory, "deepseek_v3", Q.Q8_0)[0]))
    first = tiny_gguf(tmp_path_factory, "deepseek_v3", Q.Q8_0, split=3)[0]
    assert first.name.endswith("-00001-of-00003.gguf")
    for part in (first, first.with_name(first.name.replace("00001-of", "00002-of"))):
        r = moetool.count(str(part))
        assert (r.total_params, r.breakdown, r.bytes_stored) == (one.total_params, one.breakdown, one.bytes_stored)


def test_split_gguf_missing_part(tmp_path_factory, tmp_path):
    first = tiny_gguf(tmp_path_factory, "mixtral", Q.F16, split=2)[0]
    lone = tmp_path / first.name
    lone.write_bytes(first.read_bytes())
    with pytest.raises(BadCheckpoint, match="part .*00002-of-00002.gguf is missing"):
        moetool.count(str(lone))


def test_metadata_cross_checked_against_shapes(tmp_path_factory, tmp_path):
    """A file whose expert_count disagrees with its tensors: reported, and the count follows the tensors."""
    src = tiny_gguf(tmp_path_factory, "mixtral", Q.F32)[0]
    blob = bytearray(src.read_bytes())
    key = b"llama.expert_count"
    i = blob.index(key) + len(key)
    assert struct.unpack_from("<I", blob, i)[0] == 4  # value type u32
    struct.pack_into("<I", blob, i + 4, 8)
    p = tmp_path / "lying.gguf"
    p.write_bytes(bytes(blob))
    r = moetool.count(str(p))
    assert any("has 4 experts but llama.expert_count = 8" in n for n in r.notes)
    assert not r.cross_check["match"]
    assert r.total_params == moetool.count(str(src)).total_params


# --- bad input ----------------------------------------------------------------------------------

def _run(*args):
    return subprocess.run([sys.executable, "-m", "moetool", *args], capture_output=True, text=True, timeout=120)


def _valid(tmp_path_factory) -> bytes:
    return tiny_gguf(tmp_path_factory, "qwen3_moe", Q.Q8_0)[0].read_bytes()


def _bad_files(good: bytes) -> dict[str, bytes]:
    h = parse_gguf(good, len(good), "x")
    n_kv_pos = 16
    return {
        "bad magic": b"GGUX" + good[4:],
        "version 1": good[:4] + struct.pack("<I", 1) + good[8:],
        "version 4": good[:4] + struct.pack("<I", 4) + good[8:],
        "absurd tensor count": good[:8] + struct.pack("<Q", 1 << 60) + good[16:],
        "absurd metadata count": good[:n_kv_pos] + struct.pack("<Q", 1 << 59) + good[24:],
        "absurd key length": good[:24] + struct.pack("<Q", 1 << 62) + good[32:],
        "truncated header": good[: h.data_start // 2],
        "truncated data": good[: h.data_start + 10],
        "empty": b"",
        "three bytes": b"GGU",
    }


def test_bad_files_fail_in_one_line(tmp_path_factory, tmp_path):
    good = _valid(tmp_path_factory)
    for label, blob in _bad_files(good).items():
        p = tmp_path / f"{label.replace(' ', '_')}.gguf"
        p.write_bytes(blob)
        with pytest.raises(BadCheckpoint):
            read_gguf(p)
        if label not in ("bad magic", "version 1", "truncated header", "absurd key length"):
            continue  # the CLI path is the same for all: a few are enough (each run is a process)
        r = _run("count", str(p))
        assert r.returncode == 2, (label, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, (label, r.stderr)
        assert r.stdout == ""


def test_every_truncation_is_refused(tmp_path_factory):
    good = _valid(tmp_path_factory)
    h = parse_gguf(good, len(good), "x")
    for cut in sorted({0, 1, 4, 8, 15, 23, 24, 40, 100, h.data_start - 1, h.data_start, len(good) - 1}):
        with pytest.raises(BadCheckpoint):
            parse_gguf(good[:cut], cut, "x")  # the file is `cut` bytes long
        if 4 <= cut < h.data_start - 32:  # (past that, only alignment padding is missing)
            with pytest.raises(NeedMore):
                parse_gguf(good[:cut], len(good), "x")  # a prefix of a longer file: needs more


def test_bad_tensor_infos(tmp_path_factory):
    good = _valid(tmp_path_factory)
    h = parse_gguf(good, len(good), "x")
    t = h.tensors[0]
    name = t.name.encode()
    i = good.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)  # -> n_dims
    n_dims = struct.unpack_from("<I", good, i)[0]
    type_pos = i + 4 + 8 * n_dims
    cases = {
        "dimensions": good[:i] + struct.pack("<I", 9) + good[i + 4:],
        "unknown ggml type": good[:type_pos] + struct.pack("<I", 77) + good[type_pos + 4:],
        "not aligned": good[:type_pos + 4] + struct.pack("<Q", 3) + good[type_pos + 12:],
        "overlap|past the end": good[:type_pos + 4] + struct.pack("<Q", h.tensors[1].offset) + good[type_pos + 12:],
        "absurd shape": good[:i + 4] + struct.pack("<Q", 1 << 50) + good[i + 12:],
    }
    for what, blob in cases.items():
        with pytest.raises(BadCheckpoint, match=what):
            parse_gguf(blob, len(blob), "x")


def test_unsupported_architecture_is_one_line(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    import numpy as np

    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    r = _run("count", str(tmp_path / "bert.gguf"))
    assert r.returncode == 2 and "GGUF architecture 'bert' is not supported" in r.stderr


def test_count_cli_json_and_torch_free(tmp_path_factory):
    path = tiny_gguf(tmp_path_factory, "deepseek_v3", Q.Q8_0)[0]
    r = _run("count", str(path), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["command"] == "count" and d["model_type"] == "deepseek_v3" and d["counted_from"] == "headers"
    code = ("import sys; from moetool.cli import app\n"
            f"sys.argv=['moetool','count',{str(path)!r},'--json']\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('torch','numpy','gguf','pandas') if m in sys.modules], file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stderr.strip().splitlines()[-1] == "[]", r.stderr


def test_file_type_names_match_gguf_package():
    from moetool.gguf.arch import FILE_TYPES

    for i, name in FILE_TYPES.items():
        assert gguf.LlamaFileType(i).name.replace("MOSTLY_", "").replace("ALL_", "") == name


def test_bytes_by_group_are_exact(tmp_path_factory):
    from moetool.gguf.checkpoint import bytes_by_group
    from moetool.source import resolve

    path = tiny_gguf(tmp_path_factory, "deepseek_v3", Q.Q4_0, Q.MXFP4)[0]
    ckpt = resolve(str(path))
    groups = bytes_by_group(ckpt.config, ckpt.tensors.values())
    ref: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        g = ("routed_experts" if "_exps" in t.name else "shared_experts" if "_shexp" in t.name
             else "router" if "ffn_gate_inp" in t.name else "buffer" if "exp_probs_b" in t.name else "rest")
        ref[g] = ref.get(g, 0) + int(t.n_bytes)
    assert sum(groups["routed_experts"].values()) == ref["routed_experts"]
    assert "MXFP4" in groups["routed_experts"]  # (F16 where a row is not whole blocks: F = 16)
    assert sum(groups["shared_experts"].values()) == ref["shared_experts"]
    assert sum(groups["router"].values()) == ref["router"] and sum(groups["buffer"].values()) == ref["buffer"]
    assert sum(sum(b.values()) for b in groups.values()) == sum(ref.values())
    assert any(n.startswith("GGUF bytes by group: routed experts") for n in moetool.count(str(path)).notes)
