"""count and trace of Zyphra ZAYA1 (ZayaForCausalLM) against transformers 5.23: tiny random
checkpoints written by `save_pretrained`, two seeds each.

Randomised so that every part shows: biases (fakes.randomize_biases; the residual-scaling and router
down-projection biases scaled down so that the token, not a constant, decides the routing), every norm
weight, the residual and embedding scales, the learned key scale `qk_norm.temp` (0 at init: keys would
all be zero), the router's balancing biases (the skip expert's -1 lifted so that it is chosen on some
tokens), and the router's output projection (scaled up: routing varies by token in every layer, asserted).

trace: logits within 1e-4 (float32) and, in every MoE layer, the same expert for every token and the
same gate weight (1e-5), read from the `top_k_index` / `top_k_weights` transformers' experts module
receives (tests/test_forward_families.py's `reference_routes`). transformers hands the skip expert to
that module as expert 0 with weight 0 (it runs nothing); moetool records it as expert id E with weight 0,
so the reference is mapped the same way (a real expert's softmax probability is never 0).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import moetool
from fakes import assert_profile_routes_like_traces, DEVICE, assert_matches_transformers, randomize_biases
from moetool.forward import run_forward
from moetool.source import resolve
from test_forward_families import reference_routes

T = 40
_C = dict(model_type="zaya", vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
          moe_intermediate_size=16, num_experts_per_tok=1, initializer_range=0.2, max_position_embeddings=256)
CONFIGS: dict[str, dict] = {
    # sliding layers (window 5 of 40 tokens), attention biases, untied head with a bias, kernels 2 and 3
    "zaya": dict(_C, num_hidden_layers=4, head_dim=8, num_experts=6, router_hidden_size=24, sliding_window=5,
                 layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"], attention_bias=True,
                 tie_word_embeddings=False, lm_head_bias=True, cca_time0=2, cca_time1=3,
                 rope_parameters={"hybrid": {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5},
                                  "hybrid_sliding": {"rope_type": "default", "rope_theta": 1e4,
                                                     "partial_rotary_factor": 0.5}}),
    # full attention only, tied head with a bias, kernels 3 and 2, wider heads, full-width RoPE, 4 query heads a KV head
    "zaya-tied": dict(_C, num_hidden_layers=3, num_key_value_heads=1, head_dim=16, num_experts=8,
                      router_hidden_size=16, tie_word_embeddings=True, lm_head_bias=True, cca_time0=3, cca_time1=2,
                      rope_parameters={"hybrid": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0},
                                       "hybrid_sliding": {"rope_type": "default", "rope_theta": 1e4}}),
}
SEEDS = (0, 1)
CASES = [(n, s) for n in CONFIGS for s in SEEDS]


def _build(config: dict, seed: int):
    import transformers

    torch.manual_seed(seed)
    return transformers.ZayaForCausalLM(transformers.AutoConfig.for_model(**config)).eval()


def randomize(model, seed: int) -> None:
    randomize_biases(model, seed)
    g = torch.Generator().manual_seed(seed + 5000)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("_scale", "norm.weight", "layernorm.weight", "qk_norm.temp")):
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g) + (1.0 if name.endswith("temp") else 0.0))
            elif name.endswith("balancing_biases"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
                p[-1] = -0.1
            elif "router_mlp.fc" in name and name.endswith("bias") or name.endswith(
                    ("hidden_states_bias", "residual_bias", "gate.down_proj.bias")):
                p.mul_(0.1)
            elif name.endswith("out_proj.weight"):
                p.mul_(4.0)


@pytest.fixture(scope="session")
def zaya_checkpoint(tmp_path_factory):
    """zaya_checkpoint(name, seed) -> (directory, ids, reference logits, reference routes, transformers' count)."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            config = CONFIGS[name]
            model = _build(config, seed)
            randomize(model, seed)
            d = tmp_path_factory.mktemp(f"{name}-{seed}")
            model.save_pretrained(d)
            ids = torch.randint(0, config["vocab_size"], (1, T), generator=torch.Generator().manual_seed(seed))
            logits, routes = reference_routes(model, ids)
            E = config["num_experts"]
            for layer, (idx, w) in routes.items():  # the skip expert: expert 0 with weight 0 -> id E
                routes[layer] = (torch.where(w == 0, torch.full_like(idx, E), idx), w)
            cache[name, seed] = (d, ids[0].tolist(), logits, routes, sum(p.numel() for p in model.parameters()))
        return cache[name, seed]

    return get


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, zaya_checkpoint):
    d, ids, logits, routes, _ = zaya_checkpoint(name, seed)
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE, streaming=True)
    assert_matches_transformers(out, logits, routes, nonzero=True, varied="every")
    E = CONFIGS[name]["num_experts"]
    skipped = sum(int((r.experts == E).sum()) for r in out.routes)
    assert 0 < skipped < sum(r.experts.numel() for r in out.routes)  # the skip expert is exercised, not everywhere


@pytest.mark.parametrize("name", list(CONFIGS))
def test_count_matches_transformers(name, zaya_checkpoint):
    """Config-only and header counts equal transformers' (tests/test_census.py checks the default and
    the census' tiny config; these add biases, an LM-head bias, tied and untied heads, other kernels)."""
    d, _, _, _, tf_count = zaya_checkpoint(name, 0)
    from_headers, from_config = moetool.count(str(d)), moetool.count(str(d), use_headers=False)
    assert from_headers.total_params == from_config.total_params == tf_count
    assert from_headers.cross_check["match"], from_headers.cross_check["differences"]
    assert from_headers.breakdown == from_config.breakdown and "other" not in from_headers.breakdown


def test_sliding_windows_and_state_as_transformers_cache(zaya_checkpoint):
    """count's per-layer KV windows are transformers' cache layers' (sliding on "hybrid_sliding"), and its
    fixed per-sequence state is the CCA's convolution tail plus the last delayed value projection, the
    sizes transformers' cache keeps after a prefill."""
    import transformers

    d, ids, _, _, _ = zaya_checkpoint("zaya", 0)
    spec = moetool.arch.spec_from_config(json.loads((d / "config.json").read_text()), None)
    model = transformers.ZayaForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        cache = model(torch.tensor([ids[:8]]), use_cache=True).past_key_values
    assert [l.window for l in spec.layers] == [5, None, 5, None]
    for i, layer in enumerate(spec.layers):
        conv = cache.get_conv_state(i, state_idx=0)
        rec = cache.get_recurrent_state(i, state_idx=0)
        assert layer.state_elems == conv[0].numel() + rec[0].numel()


def test_trace_cli_and_skip_expert_id(zaya_checkpoint):
    import subprocess
    import sys

    d, ids, _, routes, _ = zaya_checkpoint("zaya", 1)
    r = subprocess.run([sys.executable, "-m", "moetool", "trace", "--model", str(d), "--tokens", ",".join(map(str, ids)),
                        "--format", "json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [layer["layer"] for layer in out["layers"]] == sorted(routes)
    for layer in out["layers"]:
        assert [e for row in layer["experts"] for e in row] == routes[layer["layer"]][0].reshape(-1).tolist()


def test_profile_restarts_the_convolution_at_each_prompt(zaya_checkpoint, tmp_path):
    """moetool profile runs several prompts in one block: the CCA convolution and the delayed values
    restart at each prompt, so each prompt routes as its own trace."""

    from conftest import write_tokenizer

    d = tmp_path / "zaya"
    shutil.copytree(zaya_checkpoint("zaya", 0)[0], d)
    write_tokenizer(d)
    prompts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b): return a + b", "import os, sys " * 3]
    assert_profile_routes_like_traces(d, tmp_path, prompts)


def test_checkpoint_without_balancing_biases(zaya_checkpoint, tmp_path):
    """balancing_biases is a buffer: a checkpoint may lack it; transformers then starts from its
    initial value (0, and -1 for the skip expert), and so does moetool."""
    import transformers
    from safetensors.torch import load_file, save_file

    d, ids, _, _, _ = zaya_checkpoint("zaya-tied", 1)
    tensors = load_file(str(d / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.endswith("balancing_biases")}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copy(d / "config.json", tmp_path / "config.json")
    model = transformers.ZayaForCausalLM.from_pretrained(tmp_path).eval()
    assert model.model.layers[0].mlp.gate.balancing_biases[-1] == -1.0
    logits, routes = reference_routes(model, torch.tensor([ids]))
    E = CONFIGS["zaya-tied"]["num_experts"]
    routes = {l: (torch.where(w == 0, torch.full_like(i, E), i), w) for l, (i, w) in routes.items()}
    assert_matches_transformers(run_forward(resolve(str(tmp_path)), ids, dtype="float32", device=DEVICE), logits, routes)


def test_router_of_other_width_refused(zaya_checkpoint, tmp_path):
    """A router scoring E classes instead of E + 1 (no skip expert): one line, exit 2."""
    from safetensors.torch import load_file, save_file

    from test_bad_input import run_cli

    d, _, _, _, _ = zaya_checkpoint("zaya", 0)
    tensors = load_file(str(d / "model.safetensors"))
    name = "model.layers.0.mlp.gate.router_mlp.out_proj.weight"
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(d / "config.json", tmp_path / "config.json")
    r = run_cli("trace", "--model", str(tmp_path), "--tokens", "1,2,3")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert "skip expert" in r.stderr
