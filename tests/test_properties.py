"""Property-based tests (hypothesis): any bytes given to the safetensors header reader, and any
config given to the adapters, end in a valid result or the one-line MoetoolError, never another
exception or a hang; the header reader never allocates more than the file could hold."""

from __future__ import annotations

import json
import math
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moetool.header as header_mod
from moetool.arch import spec_from_config, supported_model_types
from moetool.counting import count
from moetool.errors import MoetoolError
from moetool.header import parse_header, read_header
from moetool.source import Checkpoint

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 2 ** 40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "F8_E4M3", "U8", "I32", "F4", "X", 3]),
    "shape": st.lists(st.integers(-2, 64), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-4, 4096), min_size=0, max_size=3) | json_values,
})
headers = st.dictionaries(st.text(max_size=12), entry | json_values, max_size=6)


def _outcome(fn):
    try:
        return fn(), None
    except MoetoolError as e:
        return None, str(e)


@SETTINGS
@given(headers, st.binary(max_size=256))
def test_header_reader_never_crashes(tmp_path, obj, tail):
    from moetool.header import TensorStats, scan_header
    from moetool.names import layer_span

    raw = json.dumps(obj).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + tail)
    h, err = _outcome(lambda: read_header(path))
    stats, scan_err = _outcome(lambda: scan_header(str(path), layer_span))  # count's fast path
    assert scan_err == err
    if h is None:
        assert "\n" not in err
        return
    size = path.stat().st_size
    for t in h.tensors.values():
        assert 0 <= t.begin <= t.end <= size - 8 - h.header_bytes
    assert stats.rows == TensorStats.of_tensors(h.tensors.values(), layer_span).rows


@SETTINGS
@given(st.binary(max_size=64), st.integers(0, 2 ** 64 - 1))
def test_header_reader_arbitrary_bytes_and_lengths(tmp_path, body, length):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", length) + body)
    reads = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    header_mod.open = lambda p, mode="r": Spy(real_open(p, mode))  # type: ignore[attr-defined]
    try:
        read_header(path)
    except MoetoolError:
        pass
    finally:
        del header_mod.open
    assert all(n <= path.stat().st_size for n in reads)  # never asks for more than the file holds


@SETTINGS
@given(st.sampled_from(supported_model_types()), st.dictionaries(
    st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                     "intermediate_size", "moe_intermediate_size", "num_local_experts", "num_experts",
                     "n_routed_experts", "num_experts_per_tok", "head_dim", "first_k_dense_replace",
                     "decoder_sparse_step", "mlp_only_layers", "layer_types", "tie_word_embeddings",
                     "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                     "n_group", "text_config", "ffn_config", "attn_config", "d_model", "n_layers", "n_heads"]),
    json_values | st.integers(0, 64), max_size=12))
def test_adapters_never_crash(model_type, fields):
    cfg = {"model_type": model_type, **fields}
    try:
        spec = spec_from_config(cfg)
        r = count(Checkpoint("x", "config", cfg, "config.json"))
    except MoetoolError as e:
        assert "\n" not in str(e)
        return
    assert r.total_params == sum(r.breakdown.values()) >= 0
    assert spec.num_layers >= 1


_NAMES = st.sampled_from([
    "model.layers.{}.block_sparse_moe.experts.{}.w1.weight", "model.layers.{}.self_attn.q_proj.weight{}",
    "model.embed_tokens.weight{}{}", "lm_head.weight", "model.layers.{}.mlp.experts.{}.down_proj.weight_scale_inv",
    "odd\ud800.{}.{}", "model.layers.{}.input_layernorm.weight",
])
valid_entries = st.lists(st.tuples(_NAMES, st.integers(0, 70), st.integers(0, 300),
                                   st.sampled_from(["F32", "BF16", "F8_E4M3", "U8", "I32", "F4"]),
                                   st.lists(st.integers(0, 9), max_size=3)), max_size=12)


@SETTINGS
@given(valid_entries, st.integers(-1, 12), st.sampled_from(["none", "overlap", "short", "bigint", "metadata"]))
def test_fast_scan_agrees_with_the_full_parser(tmp_path, entries, victim, fault):
    """`count` validates through `scan_header`'s fast loop: on valid and faulty headers alike it
    must give the full parser's verdict (same error line, or the same tensors)."""
    from moetool.header import TensorStats, scan_header
    from moetool.names import layer_span

    obj, offset = {}, 0
    for pattern, a, b, dtype, shape in entries:
        n = (math.prod(shape) * header_mod.DTYPE_BITS[dtype] + 7) // 8
        obj[pattern.format(a, b)] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    names = list(obj)
    if names and 0 <= victim < len(names):
        e = obj[names[victim]]
        if fault == "overlap" and e["data_offsets"][1] > 0:
            e["data_offsets"] = [max(0, e["data_offsets"][0] - 1), e["data_offsets"][1] - 1]
        elif fault == "short":
            e["data_offsets"] = [e["data_offsets"][0], e["data_offsets"][1] + 1]
        elif fault == "bigint":
            e["shape"] = [2 ** 70]
    if fault == "metadata":
        obj["__metadata__"] = {"format": "pt"} if victim % 2 else {"n": victim}
    raw = json.dumps(obj).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    full, full_err = _outcome(lambda: read_header(path))
    stats, scan_err = _outcome(lambda: scan_header(str(path), layer_span))
    assert scan_err == full_err
    if full is not None:
        assert stats.rows == TensorStats.of_tensors(full.tensors.values(), layer_span).rows
        assert stats.num_tensors == len(full.tensors)
