"""trace of the DeepSeek-Sparse-Attention variants forward/sparse_variants.py runs, against
transformers 5.23: tiny random checkpoints written by `save_pretrained`, two seeds each, every
bias, norm weight and learned scale randomised, initializer_range 0.2 so that routing depends on
the token (asserted in every MoE layer).

Mistral-Large-4 (`mistral_large4`, MistralLarge4ForConditionalGeneration, text-only input: the
Pixtral tower is not run): MLA without a query LoRA, LeRoPE (the learned `rotary_emb.alpha`
scales the RoPE frequencies: randomised here, zero in a fresh model), the learned softmax scaling
of the queries (attention and indexer: scale * log(position + 1) + bias, randomised), NoPE layers,
KV-sharing layers (kv_source_layers), "shared" indexer layers, the Mistral-4 group router, shared
experts, final logit soft-capping. index_topk 8 of 40 tokens: the indexer cuts in.

dots3 (`dots3_note_text`, Dots3NoteForCausalLM; and `dots3_note`, Dots3NoteForConditionalGeneration with
text-only input: the vision and audio towers are not run): MLA with LoRA-scaled query / KV latents, an
RMSNorm on the RoPE key, a per-head sigmoid output gate, per-layer MLA sizes (sliding layers of their own
heads and ranks), RoPE per layer type, sliding windows (6 of 40 tokens), the GLM-5 indexer on
"indexed_attention" layers, a plain full-attention layer, DeepSeek-V3's group router with correction bias.

Logits within 1e-4 (float32), the same expert set for every token in every MoE layer and gate
weights within 1e-5, read by a pre-hook on transformers' experts modules
(tests/test_forward_families.py's `reference_routes`), independently of its router classes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from fakes import PROFILE_PROMPTS, assert_profile_routes_like_traces, DEVICE, assert_matches_transformers, build_transformers_model, randomize_biases
from moetool.errors import BadConfig
from moetool.forward import run_forward
from moetool.source import resolve
from test_forward_families import reference_routes
from census_reference import shrunk_config
from test_trace_gap_families import FAMILIES as GAP_FAMILIES
from test_trace_multimodal import _build as _build_class
from test_trace_text_families import build_case

T = 40
_ML4_TEXT = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, vocab_size=128, num_hidden_layers=5,
                 max_position_embeddings=256, initializer_range=0.2, intermediate_size=48, moe_intermediate_size=16,
                 n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                 routed_scaling_factor=2.5, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                 index_topk=8, index_head_dim=8, index_n_heads=2,
                 mlp_layer_types=["dense", "sparse", "sparse", "sparse", "sparse"])

_DOTS3 = dict(model_type="dots3_note_text", hidden_size=32, num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
              num_hidden_layers=6, max_position_embeddings=256, initializer_range=0.2, intermediate_size=48,
              moe_intermediate_size=16, shared_experts_intermediate_size=24, n_routed_experts=8, n_shared_experts=1,
              num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, q_lora_rank=16,
              kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, head_dim=12, index_topk=8,
              index_head_dim=8, index_n_heads=2, sliding_window=6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              mlp_layer_types=["dense", "sparse", "sparse", "sparse", "dense", "sparse"])
# dots3's sliding layers: MLA of other sizes (their head_dim = nope + rope, as Dots3NoteTextConfig requires)
_DOTS3_SWA = dict(num_attention_heads=2, num_key_value_heads=2, q_lora_rank=8, kv_lora_rank=12, qk_nope_head_dim=6,
                  qk_rope_head_dim=6, head_dim=12, v_head_dim=4)

FAMILIES = {
    # KV sharing (layer 1 reads layer 0's latent, layer 4 the NoPE layer 2's), NoPE layers 2 and 4, shared
    # indexer layers 1 and 4, the default YaRN + LeRoPE, soft-capping 30
    "mistral_large4": lambda: _multimodal("mistral_large4", dict(
        _ML4_TEXT, no_rope_layers=[1, 1, 0, 1, 0], kv_source_layers=[0, 0, 2, 3, 2],
        indexer_types=["full", "shared", "full", "full", "shared"]), initializer_range=0.2),
    # no sharing, the default NoPE schedule (every 4th layer), indexers on every layer, plain RoPE, attention
    # biases, ungrouped routing, a tight soft-cap
    "mistral_large4-plain": lambda: _multimodal("mistral_large4", dict(
        _ML4_TEXT, n_group=1, topk_group=1, num_experts_per_tok=3, routed_scaling_factor=1.0, attention_bias=True,
        final_logit_softcapping=2.0, indexer_types=["full"] * 5,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0)), initializer_range=0.2),
    # dots3: MLA with LoRA-scaled latents, an RMSNorm on the RoPE key, a per-head output gate; indexed layers
    # (the GLM-5 indexer on the scaled query latent), sliding layers (window 6) of other MLA sizes (their own
    # RoPE width and theta), a plain full-attention layer; DeepSeek-V3's group sigmoid router + correction bias
    "dots3_note_text": lambda: dict(
        _DOTS3, layer_types=["indexed_attention", "indexed_attention", "sliding_attention", "sliding_attention",
                             "indexed_attention", "full_attention"],
        per_layer_config={"2": _DOTS3_SWA, "3": _DOTS3_SWA},
        rope_parameters={"indexed_attention": dict(rope_type="default", rope_theta=10000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=100.0),
                         "full_attention": dict(rope_type="default", rope_theta=500000.0)}),
    # every full layer indexed (use_dsa), sliding layers of the top-level sizes, ungrouped routing without
    # renormalisation, attention biases, two shared experts
    "dots3_note_text-plain": lambda: dict(
        _DOTS3, n_group=1, topk_group=1, norm_topk_prob=False, num_experts_per_tok=3, n_shared_experts=2,
        attention_bias=True, use_dsa=True,
        layer_types=["indexed_attention", "sliding_attention", "indexed_attention", "sliding_attention",
                     "sliding_attention", "indexed_attention"]),
    # the image-text-audio model with the first dots3 text model (its towers are not run on text)
    "dots3_note": lambda: _dots3_note(),
}
SEEDS = (0, 1)


def _dots3_note() -> dict:
    cfg = shrunk_config("dots3_note")
    text = FAMILIES["dots3_note_text"]()
    return {**cfg, "text_config": text, "initializer_range": 0.2}


def _multimodal(model_type: str, text: dict, **top) -> dict:
    """The census' tiny config of `model_type` (its towers) with exactly this text config (the text
    model's defaults for every field not given)."""
    return {**shrunk_config(model_type), "text_config": dict(text, model_type=f"{model_type}_text"), **top}


def _build(config: dict, seed: int):
    if config["model_type"] == "dots3_note_text":
        return build_transformers_model(config, seed=seed).eval()
    return _build_class(config, seed)


def randomize(model, seed: int) -> None:
    """Biases (fakes.randomize_biases); norm weights; the learned softmax scales and LeRoPE's alpha,
    which a fresh model leaves at their no-op values (0 / 1 / 0)."""
    randomize_biases(model, seed)
    g = torch.Generator().manual_seed(seed + 2000)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "vision" in name or "projector" in name or "audio" in name:
                continue
            if "norm" in name and name.endswith("weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("softmax_scaling.scale"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("softmax_scaling.bias"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("rotary_emb.alpha"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                p.mul_(0.1)


@pytest.fixture(scope="session")
def dsa_variant(tmp_path_factory):
    """dsa_variant(name, seed) -> (directory, ids, reference logits, reference routes, model), built once."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache and name in GAP_FAMILIES:  # DeepSeek-V3.2-style, on Decoder.mla
            cache[name, seed] = build_case(tmp_path_factory, GAP_FAMILIES[name], name, seed)
        if (name, seed) not in cache:
            model = _build(FAMILIES[name](), seed)
            randomize(model, seed)
            d = tmp_path_factory.mktemp(f"{name}-{seed}")
            model.save_pretrained(d)
            vocab = model.config.get_text_config().vocab_size
            ids = torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(seed))
            logits, routes = reference_routes(model, ids)
            cache[name, seed] = (d, ids[0].tolist(), logits, routes, model)
        return cache[name, seed]

    return get


CASES = [(n, s) for n in FAMILIES for s in SEEDS]


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, dsa_variant):
    d, ids, ref_logits, ref_routes, _ = dsa_variant(name, seed)
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE)
    assert_matches_transformers(out, ref_logits, ref_routes, nonzero=True, varied="every")


def test_mistral_large4_runtime_names_match_too(dsa_variant, tmp_path):
    """save_pretrained writes Mistral's published names (tok_embeddings, layers.N.attention.wq, lerope.alpha,
    experts.E.w1 ...); a checkpoint saved with transformers' in-memory names (fused experts) traces the same."""
    d, ids, ref_logits, ref_routes, model = dsa_variant("mistral_large4", 1)
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert {"tok_embeddings.weight", "lerope.alpha", "layers.1.experts.0.w1.weight"} <= set(f.keys())
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    shutil.copy(d / "config.json", tmp_path / "config.json")
    out = run_forward(resolve(str(tmp_path)), ids, dtype="float32", device=DEVICE)
    assert_matches_transformers(out, ref_logits, ref_routes, nonzero=True, varied="every")


def test_mistral_large4_trace_cli_says_the_tower_is_not_run(dsa_variant):
    d, ids, ref_logits, _, _ = dsa_variant("mistral_large4-plain", 0)
    r = subprocess.run([sys.executable, "-m", "moetool", "trace", str(d), "--tokens", ",".join(map(str, ids[:12])),
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert any("vision tower is not run" in n for n in report["notes"])
    assert [l["layer"] for l in report["layers"]] == [1, 2, 3, 4]


def test_mistral_large4_kv_source_of_another_rope_kind_is_refused(dsa_variant, tmp_path):
    """transformers hands a KV-sharing layer the latent of the last sharing layer of its own RoPE kind; a
    kv_source_layers that points elsewhere would be traced differently: refused in one line."""
    d = dsa_variant("mistral_large4", 0)[0]
    for f in d.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text_config"]["kv_source_layers"] = [0, 0, 2, 3, 0]  # layer 4 (NoPE) onto layer 0 (RoPE)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadConfig, match="kv_source_layers"):
        run_forward(resolve(str(tmp_path)), [1, 2, 3], dtype="float32", device=DEVICE)
    r = subprocess.run([sys.executable, "-m", "moetool", "trace", str(tmp_path), "--tokens", "1,2,3"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "kv_source_layers" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ["mistral_large4", "dots3_note_text", "glm_moe_dsa"])
def test_profile_blocks_route_as_traces(name, dsa_variant, tmp_path):
    """moetool profile runs several prompts per block: each prompt's indexer, positions (LeRoPE, softmax
    scaling, the layer types' RoPE), sliding windows and KV sharing are its own, so the per-token routes
    equal one trace per prompt. GLM-5 (the indexer on Decoder.mla's path, as DeepSeek-V3.2 and A.X-K2):
    profile failed with an internal error (TypeError on the block's per-prompt mask) before the indexer
    ran per prompt."""

    from conftest import write_tokenizer
    from moetool.tracing import trace

    d = tmp_path / name
    shutil.copytree(dsa_variant(name, 0)[0], d)
    write_tokenizer(d)
    prompts = PROFILE_PROMPTS
    assert_profile_routes_like_traces(d, tmp_path, prompts, min_tokens=8)  # longer than index_topk: the indexer drops keys
    # the command line: `moetool profile` on the same checkpoint
    (tmp_path / "corpus.txt").write_text("\n".join(prompts) + "\n")
    r = subprocess.run([sys.executable, "-m", "moetool", "profile", str(tmp_path / "corpus.txt"), "-m", str(d), "-o",
                        str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "profile.json").read_text())
    assert report["command"] == "profile" and [l["layer"] for l in report["layers"]] == [l.layer for l in trace(prompts[0], model=str(d), device=DEVICE).layers]


def test_dots3_note_published_config_traces_the_same(dsa_variant, tmp_path):
    """dots3's released config.json has no text_config (the text model's fields at the top level, as
    Dots3NoteConfig reads them): the trace is the same as from the transformers-written config."""
    d, ids, ref_logits, ref_routes, _ = dsa_variant("dots3_note", 0)
    for f in d.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    text = cfg.pop("text_config")
    cfg.update({k: v for k, v in text.items() if k not in ("model_type", "architectures")})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = run_forward(resolve(str(tmp_path)), ids, dtype="float32", device=DEVICE)
    assert_matches_transformers(out, ref_logits, ref_routes, nonzero=True, varied="every")
