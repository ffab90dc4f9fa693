"""Bad input ends in one line on stderr and exit code 2: malformed headers, truncated files,
offsets out of range, missing shards, missing or broken config.json, unknown model_type, pickles."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fakes import write_header_only
from moetool.errors import BadCheckpoint
from moetool.header import read_header, scan_header
from moetool.names import layer_span

MIXTRAL_CFG = json.loads((Path(__file__).parents[1] / "sample_configs" / "mixtral-8x7b.json").read_text())


def run_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetool", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _raw_file(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def _entry(dtype="F32", shape=(2, 2), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _header(**tensors) -> bytes:
    return json.dumps(tensors).encode()


BAD_FILES = {
    "empty": lambda p: p.write_bytes(b""),
    "short prefix": lambda p: p.write_bytes(b"\x01\x02"),
    "header length larger than file": lambda p: _raw_file(p, b"{}", length=10_000),
    "header length zero": lambda p: _raw_file(p, b"", length=0),
    "invalid json": lambda p: _raw_file(p, b"{not json", b""),
    "json not an object": lambda p: _raw_file(p, b"[1, 2, 3]"),
    "unknown dtype": lambda p: _raw_file(p, _header(w=_entry(dtype="F128")), bytes(16)),
    "negative shape": lambda p: _raw_file(p, _header(w=_entry(shape=(-2, 2))), bytes(16)),
    "shape not a list": lambda p: _raw_file(p, _header(w=_entry(shape="2x2")), bytes(16)),
    "offsets reversed": lambda p: _raw_file(p, _header(w=_entry(offsets=(16, 0))), bytes(16)),
    "offsets out of range (truncated data)": lambda p: _raw_file(p, _header(w=_entry()), bytes(8)),
    "shape disagrees with byte size": lambda p: _raw_file(p, _header(w=_entry(shape=(3, 3))), bytes(16)),
    "overlapping tensors": lambda p: _raw_file(p, _header(a=_entry(), b=_entry(offsets=(8, 24))), bytes(24)),
    "entry not an object": lambda p: _raw_file(p, _header(w=[1, 2]), bytes(16)),
    "metadata not strings": lambda p: _raw_file(p, json.dumps({"__metadata__": {"a": 1}}).encode()),
    "non-utf8 header": lambda p: _raw_file(p, b"\xff\xfe{}"),
    "offsets missing": lambda p: _raw_file(p, _header(w={"dtype": "F32", "shape": [2, 2]}), bytes(16)),
    "float offsets": lambda p: _raw_file(p, _header(w=_entry(offsets=(0.0, 16.0))), bytes(16)),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_safetensors_header(case, tmp_path):
    """One line naming the file; `count`'s fast scan (no tensor table) gives the very same line."""
    p = tmp_path / "model.safetensors"
    BAD_FILES[case](p)
    with pytest.raises(BadCheckpoint) as e:
        read_header(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)
    with pytest.raises(BadCheckpoint) as scan:
        scan_header(str(p), layer_span)
    assert str(scan.value) == str(e.value)


def test_truncated_shard_via_cli(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_CFG))
    size = write_header_only(tmp_path / "model.safetensors", {"lm_head.weight": ("BF16", [32000, 4096])})
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(size - 100)
    r = run_cli("count", str(tmp_path))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "truncated" in r.stderr and "Traceback" not in r.stderr


def _cli_bad(tmp_path: Path, setup) -> subprocess.CompletedProcess:
    arg = setup(tmp_path)
    return run_cli("count", str(arg))


def _dir_with(config, files=None, index=None):
    def setup(p: Path):
        if config is not None:
            (p / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        for name, tensors in (files or {}).items():
            write_header_only(p / name, tensors)
        if index is not None:
            (p / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
        return p
    return setup


BAD_SOURCES = {
    "directory without config": _dir_with(None),
    "config invalid json": _dir_with("{oops"),
    "config not an object": _dir_with("[1]"),
    "config missing model_type": _dir_with({"hidden_size": 8}),
    "unknown model_type": _dir_with({"model_type": "not_a_model"}),
    "model_type wrong type": _dir_with({"model_type": 7}),
    "config missing hidden_size": _dir_with({k: v for k, v in MIXTRAL_CFG.items() if k != "hidden_size"}),
    "config hidden_size a string": _dir_with({**MIXTRAL_CFG, "hidden_size": "4096"}),
    "config top-k above experts": _dir_with({**MIXTRAL_CFG, "num_experts_per_tok": 9}),
    "config negative layers": _dir_with({**MIXTRAL_CFG, "num_hidden_layers": -1}),
    "index names missing shard": _dir_with(MIXTRAL_CFG, index={"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}),
    "index invalid json": _dir_with(MIXTRAL_CFG, index="{"),
    "index weight_map wrong type": _dir_with(MIXTRAL_CFG, index={"weight_map": [1]}),
    "index shard with path": _dir_with(MIXTRAL_CFG, index={"weight_map": {"a": "../x.safetensors"}}),
    "index tensor missing from shard": _dir_with(
        MIXTRAL_CFG, files={"s1.safetensors": {"x": ("F32", [2])}},
        index={"weight_map": {"lm_head.weight": "s1.safetensors"}}),
    "index puts a tensor in the other shard": _dir_with(
        MIXTRAL_CFG, files={"s1.safetensors": {"x": ("F32", [2])}, "s2.safetensors": {"y": ("F32", [2])}},
        index={"weight_map": {"x": "s2.safetensors", "y": "s1.safetensors"}}),
    "tensor the index does not name in two shards": _dir_with(
        MIXTRAL_CFG, files={"s1.safetensors": {"x": ("F32", [2]), "z": ("F32", [2])},
                            "s2.safetensors": {"y": ("F32", [2]), "z": ("F32", [2])}},
        index={"weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"}}),
    "tensor in two shards, no index": _dir_with(
        MIXTRAL_CFG, files={"s1.safetensors": {"x": ("F32", [2])}, "s2.safetensors": {"x": ("F32", [2])}}),
    "pickle only": lambda p: (_dir_with(MIXTRAL_CFG)(p), (p / "pytorch_model.bin").write_bytes(b"\x80\x04."), p)[2],
    "pickle file": lambda p: ((p / "model.pt").write_bytes(b"\x80\x04."), p / "model.pt")[1],
    "safetensors without config": lambda p: (write_header_only(p / "m.safetensors", {"x": ("F32", [2])}), p / "m.safetensors")[1],
    "missing path": lambda p: p / "nope" / "config.json",
    "not a model file": lambda p: ((p / "notes.txt").write_text("hi"), p / "notes.txt")[1],
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_source_one_line_exit_2(case, tmp_path):
    r = _cli_bad(tmp_path, BAD_SOURCES[case])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == ""
    assert r.stderr.startswith("moetool: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_model_type_lists_supported(tmp_path):
    r = _cli_bad(tmp_path, _dir_with({"model_type": "bert"}))
    assert "'bert'" in r.stderr and "mixtral" in r.stderr and "deepseek_v3" in r.stderr


def test_pickle_message_says_how_to_convert(tmp_path):
    r = _cli_bad(tmp_path, BAD_SOURCES["pickle only"])
    assert "never unpickles" in r.stderr and "safetensors" in r.stderr


def test_bad_usage_exit_2():
    r = run_cli("count", "mixtral-8x7b", "--context", "0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    r = run_cli("count", "mixtral-8x7b", "--kv-dtype", "int3")
    assert r.returncode == 2 and "kv-dtype" in r.stderr


def test_auto_map_is_never_executed(tmp_path):
    cfg = {**MIXTRAL_CFG, "auto_map": {"AutoModelForCausalLM": "evil.Model"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "evil.py").write_text("open(__file__ + '.ran', 'w').write('x')\n")
    r = run_cli("count", str(tmp_path), "--json")
    assert r.returncode == 0 and not (tmp_path / "evil.py.ran").exists()


def _many_shards(p: Path, n: int = 20) -> dict:
    """A Mixtral-named checkpoint of `n` small shards with an index (enough to scan in parallel)."""
    (p / "config.json").write_text(json.dumps(MIXTRAL_CFG))
    weight_map = {}
    for i in range(n):
        shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        names = [f"model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight" for e in range(8)]
        write_header_only(p / shard, {name: ("BF16", [4, 4]) for name in names})
        weight_map.update(dict.fromkeys(names, shard))
    (p / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weight_map


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_bad_shard_among_many_is_one_line_in_parallel_too(jobs, tmp_path):
    import os

    _many_shards(tmp_path)
    bad = tmp_path / "model-00013-of-00020.safetensors"
    bad.write_bytes(bad.read_bytes()[:-10])  # truncated data
    r = run_cli("count", str(tmp_path), env={**os.environ, "MOETOOL_JOBS": jobs})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "model-00013-of-00020.safetensors" in r.stderr and "truncated" in r.stderr


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_index_mismatch_among_many_is_one_line_in_parallel_too(jobs, tmp_path):
    import os

    weight_map = _many_shards(tmp_path)
    name = "model.layers.7.block_sparse_moe.experts.3.w1.weight"
    weight_map[name] = "model-00002-of-00020.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    r = run_cli("count", str(tmp_path), env={**os.environ, "MOETOOL_JOBS": jobs})
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.count("\n") == 1 and name in r.stderr


def test_bad_jobs_setting_is_one_line(tmp_path):
    import os

    _many_shards(tmp_path)
    r = run_cli("count", str(tmp_path), env={**os.environ, "MOETOOL_JOBS": "two"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "MOETOOL_JOBS" in r.stderr


@pytest.mark.parametrize("table", [True, False])
def test_tensor_missing_from_index_is_counted_and_noted(table, tmp_path):
    from moetool.counting import count
    from moetool.source import resolve

    _dir_with(MIXTRAL_CFG, files={"s1.safetensors": {"x": ("F32", [2]), "z": ("F32", [3])}},
              index={"weight_map": {"x": "s1.safetensors"}})(tmp_path)
    ckpt = resolve(str(tmp_path), tensor_table=table)
    assert ckpt.stats.num_tensors == 2 and ckpt.bytes_stored == 20
    assert any("'z'" in n and "not named in model.safetensors.index.json" in n for n in ckpt.notes)
    assert any("'z'" in n for n in count(ckpt).notes)


def test_repeat_across_many_shards_without_index(tmp_path):
    """Without an index a repeated tensor must be caught across every shard, however many."""
    _many_shards(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    name = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    write_header_only(tmp_path / "model-00020-of-00020.safetensors", {name: ("BF16", [4, 4])})
    r = run_cli("count", str(tmp_path))
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1
    assert name in r.stderr and "also in" in r.stderr
