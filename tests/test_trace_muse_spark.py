"""trace of Muse Spark (MuseSparkForConditionalGeneration) with text-only input, against transformers
5.23: tiny random checkpoints written by `save_pretrained` (vision and audio towers included, not
run), called with input_ids only; two seeds each; correction biases, every norm weight (centred and
input-scaled RMSNorms, the experts' pre / post norms) and the residual gates randomised.

Logits within 1e-4 (float32) and, in every MoE layer, the same expert set for every token and the same
gate weights (1e-5), read from the `top_k_index` / `top_k_weights` transformers' experts module receives
(a forward pre-hook, independent of transformers' router class). Routing is asserted to vary by token
in every MoE layer. The configs cover sliding layers (window 8 < 40 tokens), NoPE layers
(layer_rope_theta 0; a non-zero entry other than rope_theta, which transformers 5.23 does not read),
a dense layer, the tanh soft cap after output_multiplier, attention biases, k = 3, routed_scaling_factor.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from census_reference import _merge, shrunk_config
from fakes import assert_profile_routes_like_traces, DEVICE, assert_matches_transformers
from moetool.forward import run_forward
from moetool.source import resolve
from test_forward_families import reference_routes
from test_trace_multimodal import _build, _randomize

T = 40
_TEXT = dict(model_type="muse_spark_text", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             vocab_size=128, max_position_embeddings=256, intermediate_size=40, moe_intermediate_size=16,
             moe_hidden_size=24, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=4,
             mlp_layer_types=["dense", "sparse", "sparse", "sparse"], sliding_window=8, initializer_range=0.2,
             layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
             layer_rope_theta=[10000.0, 0, 20000.0, 0], rope_parameters=dict(rope_type="default", rope_theta=10000.0),
             bos_token_id=1, eos_token_id=2, final_logit_softcapping=3.0, output_multiplier=0.5,
             residual_gate_temperature=0.5)


def muse_spark_config(**text) -> dict:
    """The census' tiny Muse Spark config (its vision and audio towers) with this text model."""
    cfg = shrunk_config("muse_spark")
    cfg["text_config"] = _merge(cfg["text_config"], {**copy.deepcopy(_TEXT), **text})
    return {**cfg, "initializer_range": 0.2}


CONFIGS = {
    "muse_spark": muse_spark_config,
    # attention biases, three experts per token scaled by 2.5, another QK scale, every layer sparse and sliding but the last
    "muse_spark-variant": lambda: muse_spark_config(
        attention_bias=True, num_experts_per_tok=3, routed_scaling_factor=2.5, qk_scale_factor=2.0,
        mlp_layer_types=["sparse"] * 4, layer_types=["sliding_attention"] * 3 + ["full_attention"],
        layer_rope_theta=[10000.0, 10000.0, 10000.0, 0], post_norm_eps=1e-6),
}
SEEDS = (0, 1)
CASES = [(n, s) for n in CONFIGS for s in SEEDS]


@pytest.fixture(scope="session")
def muse_checkpoint(tmp_path_factory):
    """muse_checkpoint(name, seed) -> (checkpoint dir, ids, logits, routes)."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            model = _build(CONFIGS[name](), seed)
            _randomize(model, seed)
            d = tmp_path_factory.mktemp(f"{name}-{seed}")
            model.save_pretrained(d)
            ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(seed))
            logits, routes = reference_routes(model, ids)
            cache[name, seed] = (d, ids[0].tolist(), logits, routes)
        return cache[name, seed]

    return get


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, muse_checkpoint):
    d, ids, logits, routes = muse_checkpoint(name, seed)
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE, streaming=True)
    assert_matches_transformers(out, logits, routes, nonzero=True, varied="every")


def test_soft_cap_binds(muse_checkpoint):
    """The tanh cap (3.0 after output_multiplier) bends the logits: a forward without it would differ."""
    _, _, logits, _ = muse_checkpoint("muse_spark", 0)
    assert logits.abs().max() > 1.5


def test_profile_routes_as_traces(muse_checkpoint, tmp_path):
    """`moetool profile` (the same Decoder, several prompts per block with their own masks and positions)
    routes each prompt as its own trace does; the CLI writes the profile."""
    import shutil

    from conftest import write_tokenizer

    d = tmp_path / "muse"
    shutil.copytree(muse_checkpoint("muse_spark", 1)[0], d)
    write_tokenizer(d)
    prompts = ["The quick brown fox jumps over the lazy dog. " * 2, "def add(a, b): return a + b", "import os, sys " * 3]
    stats = assert_profile_routes_like_traces(d, tmp_path, prompts, min_tokens=8)  # longer than the sliding window (8)
    assert stats.meta["moe_layers"] == [1, 2, 3]
    (tmp_path / "corpus.txt").write_text("\n".join(prompts) + "\n")
    r = subprocess.run([sys.executable, "-m", "moetool", "profile", str(tmp_path / "corpus.txt"), "--model", str(d),
                        "-o", str(tmp_path / "prof")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert summary["command"] == "profile" and [l["layer"] for l in summary["layers"]] == [1, 2, 3]


@pytest.mark.parametrize("field,value,message", [
    ("layer_rope_theta", [0, "x"], "layer_rope_theta must hold a number for each of the 4 layers"),
    ("residual_gate_temperature", 0, "residual_gate_temperature must not be 0"),
    ("output_multiplier", -1.0, "output_multiplier and final_logit_softcapping must be positive"),
])
def test_bad_config_is_one_line(field, value, message, muse_checkpoint, tmp_path):
    """A malformed Muse Spark field: one line on stderr, exit 2, no traceback."""
    import shutil

    from conftest import write_tokenizer

    d = tmp_path / "muse"
    shutil.copytree(muse_checkpoint("muse_spark", 0)[0], d)
    write_tokenizer(d)
    config = json.loads((d / "config.json").read_text())
    config["text_config"][field] = value
    (d / "config.json").write_text(json.dumps(config))
    r = subprocess.run([sys.executable, "-m", "moetool", "trace", "hello world", "--model", str(d)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
