"""trace of the multimodal MoE families (and their text models) with text-only input, against
transformers 5.23: tiny random checkpoints written by `save_pretrained` from the class the census
picks (Qwen3VLMoeForConditionalGeneration, ...), called with input_ids only; two seeds each; every
bias, correction bias and norm weight randomised.

Logits within 1e-4 (float32) and, in every MoE layer, the same expert set for every token and the same
gate weights (1e-5), read from the `top_k_index` / `top_k_weights` transformers' experts modules
receive (a forward pre-hook, independent of transformers' router classes). MiniMax-M3 multiplies the
experts' output by routed_scaling_factor after that module; moetool records that product as the gate
weight, so its reference weights are scaled the same way.

Multimodal RoPE: Qwen3-VL / Qwen3-Omni's interleaved MRoPE and GLM-4V's mrope_section are set to
layouts where a wrong section order or width would rotate the wrong dimensions; with text-only input
transformers gives all three sections the text position, and the logits agree.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import moetool
from census_reference import _merge, shrunk_config
from fakes import save_both_layouts, PROFILE_PROMPTS, assert_profile_routes_like_traces, DEVICE, assert_matches_transformers, randomize_biases
from moetool.forward import run_forward
from moetool.source import resolve
from test_forward_families import reference_routes

T = 40
_ATT = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128,
            max_position_embeddings=256, initializer_range=0.1)

_ARIA_TEXT = dict(model_type="aria_text", intermediate_size=24, moe_num_experts=8, moe_topk=2, moe_num_shared_experts=2,
                  attention_bias=True, mlp_bias=True, num_hidden_layers=3, **_ATT)
_QWEN3_VL_TEXT = dict(model_type="qwen3_vl_moe_text", intermediate_size=40, moe_intermediate_size=24, num_experts=8,
                      num_experts_per_tok=2, num_hidden_layers=3, mlp_only_layers=[1], attention_bias=True,
                      rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1],
                                           mrope_interleaved=True), **_ATT)
_OMNI_TEXT = dict(_QWEN3_VL_TEXT, model_type="qwen3_omni_moe_text", norm_topk_prob=False, num_experts_per_tok=3,
                  rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[1, 2, 1], interleaved=True))
_GLM4V_TEXT = dict(model_type="glm4v_moe_text", intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
                   n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                   routed_scaling_factor=2.5, attention_bias=True, num_hidden_layers=3,
                   rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                        mrope_section=[2, 1, 1]),
                   **{**_ATT, "head_dim": 16})
_M3_TEXT = dict(model_type="minimax_m3_vl_text", intermediate_size=16, dense_intermediate_size=40,
                shared_intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, routed_scaling_factor=2.0,
                num_hidden_layers=4, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
                layer_types=["full_attention", "minimax_m3_sparse", "full_attention", "minimax_m3_sparse"],
                index_n_heads=2, index_head_dim=8, index_block_size=4, index_topk_blocks=3, index_local_blocks=1,
                swiglu_limit=0.5, rotary_dim=64,
                rope_parameters=dict(rope_type="default", rope_theta=5e6, partial_rotary_factor=0.5), **_ATT)


def _multimodal(model_type: str, text: dict, **top) -> dict:
    """The census' tiny config of `model_type` (its towers) with this text model."""
    cfg = shrunk_config(model_type)
    cfg["text_config"] = _merge(cfg["text_config"], copy.deepcopy(text))
    return {**cfg, "initializer_range": 0.1, **top}


CONFIGS = {
    "aria_text": _ARIA_TEXT,
    # gelu shared experts (routed ones stay SiLU), D == 2F: the fused experts' orientation is not in the shapes
    "aria_text-gelu": dict(_ARIA_TEXT, hidden_act="gelu_pytorch_tanh", intermediate_size=16, tie_word_embeddings=True),
    "aria": lambda: _multimodal("aria", _ARIA_TEXT),
    "glm4v_moe": lambda: _multimodal("glm4v_moe", _GLM4V_TEXT),
    "qwen3_vl_moe": lambda: _multimodal("qwen3_vl_moe", _QWEN3_VL_TEXT),
    "qwen3_vl_moe-tied": lambda: _multimodal("qwen3_vl_moe", dict(_QWEN3_VL_TEXT, num_experts_per_tok=3),
                                             tie_word_embeddings=True),
    "qwen3_omni_moe_thinker": lambda: _multimodal("qwen3_omni_moe_thinker", _OMNI_TEXT),
    "minimax_m3_vl_text": _M3_TEXT,
    # indexer heads narrower than the rotary width, two local blocks, full-width RoPE
    "minimax_m3_vl_text-narrow": dict(_M3_TEXT, index_head_dim=6, index_local_blocks=2, index_topk_blocks=2,
                                      swiglu_limit=7.0, rope_parameters=dict(rope_type="default", rope_theta=5e6)),
    "minimax_m3_vl": lambda: _multimodal("minimax_m3_vl", _M3_TEXT),
}
SEEDS = (0, 1)
CASES = [(n, s) for n in CONFIGS for s in SEEDS]


def _build(config: dict, seed: int):
    import transformers

    from census_families import moe_model_types

    cls = getattr(transformers, moe_model_types()[config["model_type"]])
    torch.manual_seed(seed)
    return cls(transformers.AutoConfig.for_model(**config)).eval()


def _randomize(model, seed: int) -> None:
    """Biases and correction biases (fakes.randomize_biases); norm weights (1, or 0 for MiniMax-M3's
    (1 + w) norms) perturbed so a norm applied wrongly shows."""
    randomize_biases(model, seed)
    g = torch.Generator().manual_seed(seed + 3000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="session")
def mm_checkpoint(tmp_path_factory):
    """mm_checkpoint(name, seed) -> (published dir, runtime dir, ids, logits, routes, count, scale)."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            config = CONFIGS[name]() if callable(CONFIGS[name]) else CONFIGS[name]
            model = _build(config, seed)
            _randomize(model, seed)
            d, runtime = save_both_layouts(model, tmp_path_factory, f"{name}-{seed}")
            text = model.config.get_text_config()
            ids = torch.randint(0, text.vocab_size, (1, T), generator=torch.Generator().manual_seed(seed))
            logits, routes = reference_routes(model, ids)
            scale = getattr(text, "routed_scaling_factor", 1.0) if "minimax_m3" in text.model_type else 1.0
            cache[name, seed] = (d, runtime, ids[0].tolist(), logits, routes, sum(p.numel() for p in model.parameters()),
                                 scale)
        return cache[name, seed]

    return get


def _assert_same(out, ref_logits, ref_routes, scale: float = 1.0) -> None:
    assert_matches_transformers(out, ref_logits, ref_routes, scale=scale, nonzero=True)


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, mm_checkpoint):
    d, _, ids, logits, routes, _, scale = mm_checkpoint(name, seed)
    _assert_same(run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE, streaming=True), logits, routes, scale)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trace_of_runtime_layout(name, mm_checkpoint):
    """The same weights under transformers' in-memory names (model.language_model.*, fused experts)."""
    _, runtime, ids, logits, routes, _, scale = mm_checkpoint(name, 0)
    _assert_same(run_forward(resolve(str(runtime)), ids, dtype="float32", device=DEVICE), logits, routes, scale)


def test_qwen3_vl_experts_in_either_orientation(mm_checkpoint, tmp_path):
    """Published Qwen3-VL-MoE checkpoints store the fused experts for x @ W ([E, D, 2F], [E, F, D]);
    transformers transposes them when the shapes say so (Transpose(check_dims)): so does moetool."""
    d, _, ids, logits, routes, _, _ = mm_checkpoint("qwen3_vl_moe", 1)
    tensors = load_file(str(d / "model.safetensors"))
    fused = [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert fused
    save_file({k: (v.transpose(1, 2).contiguous() if k in fused else v) for k, v in tensors.items()},
              str(tmp_path / "model.safetensors"))
    shutil.copy(d / "config.json", tmp_path / "config.json")
    _assert_same(run_forward(resolve(str(tmp_path)), ids, dtype="float32", device=DEVICE), logits, routes)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_count_matches_transformers(name, mm_checkpoint):
    d, _, _, _, _, tf_count, _ = mm_checkpoint(name, 0)
    from_headers, from_config = moetool.count(str(d)), moetool.count(str(d), use_headers=False)
    assert from_headers.total_params == from_config.total_params == tf_count
    assert from_headers.cross_check["match"], from_headers.cross_check["differences"]
    assert from_headers.breakdown == from_config.breakdown


def test_minimax_m3_legacy_config_keys(mm_checkpoint, tmp_path):
    """Released MiniMax-M3 configs may say `sparse_attention_config` / `moe_layer_freq` instead of
    `layer_types` / `mlp_layer_types` / index_*: transformers reads them to the same model, so must moetool."""
    import json

    import transformers

    d, _, ids, logits, routes, tf_count, scale = mm_checkpoint("minimax_m3_vl_text", 0)
    config = json.loads((d / "config.json").read_text())
    legacy = {k: v for k, v in config.items() if k not in ("layer_types", "mlp_layer_types") and not k.startswith("index_")}
    legacy["moe_layer_freq"] = [int(t == "sparse") for t in config["mlp_layer_types"]]
    legacy["sparse_attention_config"] = dict(
        sparse_attention_freq=[int(t == "minimax_m3_sparse") for t in config["layer_types"]],
        sparse_num_index_heads=config["index_n_heads"], sparse_index_dim=config["index_head_dim"],
        sparse_block_size=config["index_block_size"], sparse_topk_blocks=config["index_topk_blocks"],
        sparse_local_block=config["index_local_blocks"])
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    shutil.copy(d / "model.safetensors", tmp_path / "model.safetensors")
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert theirs.layer_types == config["layer_types"] and theirs.mlp_layer_types == config["mlp_layer_types"]
    assert moetool.count(str(tmp_path), use_headers=False).total_params == tf_count
    _assert_same(run_forward(resolve(str(tmp_path)), ids, dtype="float32", device=DEVICE), logits, routes, scale)


@pytest.mark.parametrize("name,towers", [("qwen3_omni_moe_thinker", "audio and vision towers are"),
                                         ("glm4v_moe", "vision tower is"), ("aria_text", None)])
def test_trace_cli_says_the_towers_are_not_run(name, towers, mm_checkpoint):
    import json
    import subprocess
    import sys

    d, _, ids, _, routes, _, _ = mm_checkpoint(name, 0)
    args = [sys.executable, "-m", "moetool", "trace", "--model", str(d), "--tokens", ",".join(map(str, ids[:8]))]
    r = subprocess.run(args + ["--format", "json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [layer["layer"] for layer in out["layers"]] == sorted(routes)
    if towers is None:
        assert "notes" not in out
    else:
        assert out["notes"] == [f"text-only input: the {towers} not run; the trace is of the language model"]
        r = subprocess.run(args, capture_output=True, text=True)
        assert r.returncode == 0 and f"note: text-only input: the {towers} not run" in r.stdout


@pytest.mark.parametrize("name", ["glm4v_moe", "minimax_m3_vl"])
def test_tied_head_from_text_config(name, tmp_path):
    """GLM-4.5V and MiniMax-M3 configs written before transformers 5 say tie_word_embeddings inside
    text_config only; transformers ties the head then (its config moves the flag up): so does moetool."""
    import json

    import transformers

    model = _build(CONFIGS[name](), 0)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    _randomize(model, 0)
    model.save_pretrained(tmp_path)
    assert not any("lm_head" in k for k in load_file(str(tmp_path / "model.safetensors")))
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_word_embeddings"] = False
    config["text_config"]["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert transformers.AutoConfig.from_pretrained(tmp_path).tie_word_embeddings
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(0))
    logits, routes = reference_routes(model, ids)
    scale = 2.0 if name == "minimax_m3_vl" else 1.0
    _assert_same(run_forward(resolve(str(tmp_path)), ids[0].tolist(), dtype="float32", device=DEVICE), logits, routes, scale)
    assert moetool.count(str(tmp_path)).total_params == sum(p.numel() for p in model.parameters())


def test_profile_blocks_route_as_traces_with_block_sparse_attention(mm_checkpoint, tmp_path):
    """moetool profile runs several prompts per block (each with its own mask and positions): the
    block-sparse layers select each prompt's key blocks on their own, as one trace per prompt."""

    from conftest import write_tokenizer

    d = tmp_path / "m3"
    shutil.copytree(mm_checkpoint("minimax_m3_vl_text", 1)[0], d)
    write_tokenizer(d)
    prompts = PROFILE_PROMPTS
    assert_profile_routes_like_traces(d, tmp_path, prompts, min_tokens=8)  # longer than two key blocks: the indexer drops blocks
