"""trace of GLM-5.3-Flash (`glm5_next`, transformers 5.23's Glm5NextForConditionalGeneration, the class
the census picks) on text-only input: the vision tower is not run, moetool runs the language model as
`glm5_next_text` (forward/config.py _glm5_next). Tiny random `save_pretrained` checkpoints, two seeds
each, built as tests/test_trace_text_families.py's `build_case` does (with the census' class) and
randomised as its `randomize` does, plus the
hyper-connections' bases and scales (tests/test_trace_hyper.py), KDA's A_log / dt_bias
(tests/test_hybrid_trace.py) and the k-pool compression's gate and position table; initializer_range 0.2.

Logits within 1e-4 (float32); in every MoE layer the same expert set for every token and gate weights
within 1e-5 (fakes.assert_matches_transformers, read from transformers' experts modules), routing
varying by token in every MoE layer. The text model combines:
- Kimi Delta Attention with the bounded forget gate ("linear_attention" layers, forward/mixers/kda.py);
- NoPE MLA on "indexed_attention" layers (latent norms at rms_norm_eps) with GLM-5's indexer plus the
  k-pool compression (forward/indexer.py kpool_keep), "shared" layers reusing the keys of the full
  layer just before them; index_topk small enough that the indexer drops keys (asserted);
- SwiGLU clamped at swiglu_limit in the routed experts, the shared experts and the dense MLPs;
- DeepSeek-V4's hyper-connections (comb matrix, Sinkhorn), the head's collapse an unweighted mean.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import moetool
from fakes import DEVICE, assert_matches_transformers
from moetool.forward import run_forward
from moetool.source import resolve
from test_hybrid_trace import randomize_mixer_params
from test_trace_hyper import randomize as randomize_hyper
from test_trace_multimodal import _build, _multimodal
from test_trace_text_families import T, routes_and_logits

_TEXT = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, vocab_size=128, num_hidden_layers=6,
             intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
             num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=0,
             qk_nope_head_dim=8, v_head_dim=8, mlp_layer_types=["dense"] + ["sparse"] * 5,
             layer_types=["linear_attention", "indexed_attention", "indexed_attention", "linear_attention",
                          "indexed_attention", "indexed_attention"],
             indexer_types=["full", "full", "shared", "full", "full", "shared"],
             index_topk=8, index_kpool=4, index_head_dim=8, index_n_heads=2, linear_head_dim=8, linear_num_heads=4,
             hc_mult=3, hc_sinkhorn_iters=5, swiglu_limit=1.0, initializer_range=0.2)

CONFIGS = {
    "glm5_next": lambda: _multimodal("glm5_next", _TEXT, initializer_range=0.2),
    # pools of 3 without the tail, 2 streams, 3 experts a token, no top-k renormalisation, two shared
    # experts, the softplus forget gate (linear_lower_bound null), KDA kernel 3, an indexed layer first
    "glm5_next-plain": lambda: _multimodal("glm5_next", dict(
        _TEXT, index_kpool=3, index_topk=6, index_kpool_always_select_tail=False, hc_mult=2, num_experts_per_tok=3,
        norm_topk_prob=False, n_shared_experts=2, linear_lower_bound=None, linear_conv_kernel_dim=3,
        layer_types=["indexed_attention", "indexed_attention", "linear_attention", "linear_attention",
                     "indexed_attention", "linear_attention"],
        indexer_types=["full", "shared", "full", "full", "full", "full"],
        mlp_layer_types=["sparse", "dense", "sparse", "sparse", "sparse", "sparse"], swiglu_limit=2.0),
        initializer_range=0.2),
}
SEEDS = (0, 1)
CASES = [(n, s) for n in CONFIGS for s in SEEDS]


def randomize(model, seed: int) -> None:
    """build_case's randomisation, the hyper-connections' bases and scales, KDA's A_log / dt_bias and
    norms, and the k-pool compression's gate (ones by init) and position table (zeros by init)."""
    randomize_hyper(model, seed)
    randomize_mixer_params(model, seed)
    g = torch.Generator().manual_seed(seed + 4000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("index_kpool_compress_gate", "index_kpool_compress_ape")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread (two spin-wait on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def glm5(tmp_path_factory):
    """glm5(name, seed) -> (directory, ids, reference logits, reference routes, model), built once."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:  # build_case's steps with the census' class (the whole model)
            model = _build(CONFIGS[name](), seed).eval()
            randomize(model, seed)
            d = tmp_path_factory.mktemp(f"{name}-{seed}")
            model.save_pretrained(d)
            ids = torch.randint(0, _TEXT["vocab_size"], (1, T), generator=torch.Generator().manual_seed(seed))
            logits, routes = routes_and_logits(model, ids)
            cache[name, seed] = (d, ids[0].tolist(), logits, routes, model)
        return cache[name, seed]

    return get


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, glm5):
    d, ids, logits, routes, _ = glm5(name, seed)
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE, streaming=True)
    assert_matches_transformers(out, logits, routes, nonzero=True, varied="every")


def test_trace_of_runtime_layout(glm5, tmp_path):
    """The same weights under transformers' in-memory names (one conv1d, forget_gate.*, attn_hc.fn)."""
    d, ids, logits, routes, model = glm5("glm5_next", 0)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    shutil.copy(d / "config.json", tmp_path / "config.json")
    names = set(model.state_dict())
    assert any(n.endswith("self_attn.conv1d.weight") for n in names) and any(n.endswith("attn_hc.fn") for n in names)
    out = run_forward(resolve(str(tmp_path)), ids, dtype="float32", device=DEVICE)
    assert_matches_transformers(out, logits, routes, nonzero=True, varied="every")


def test_kpool_indexer_and_its_pieces_matter(glm5, monkeypatch):
    """The indexer drops keys here, and its pieces each change the logits: attending to every causal
    key, pools without their learned weighting (a plain mean), or no tail breaks the match."""
    from moetool.forward import indexer, sparse_variants

    d, ids, logits, _, _ = glm5("glm5_next", 0)
    real = indexer.kpool_keep
    dropped = []

    def spy(*a, **k):
        keep = real(*a, **k)
        dropped.append(bool((keep != a[4]).any()))
        return keep

    variants = {
        "all causal keys": lambda *a, **k: a[4].clone(),
        "no tail": lambda *a, **k: real(*a[:9], False, **k),
        "plain mean pools": lambda get, *a, **k: real(
            lambda n, dt: torch.zeros_like(get(n, dt)) if "kpool_compress" in n else get(n, dt), *a, **k),
    }
    monkeypatch.setattr(sparse_variants, "kpool_keep", spy)
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE)
    assert (out.logits - logits).abs().max().item() < 1e-4 and all(dropped) and len(dropped) == 2  # full layers 1 and 4
    for what, fn in variants.items():
        monkeypatch.setattr(sparse_variants, "kpool_keep", fn)
        wrong = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE).logits
        assert (wrong - logits).abs().max().item() > 1e-3, what


def test_clamp_matters(glm5, tmp_path):
    """swiglu_limit cuts in: the same weights with the limit out of reach change the logits."""
    d, ids, logits, _, _ = glm5("glm5_next", 0)
    other = tmp_path / "unclamped"
    shutil.copytree(d, other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["swiglu_limit"] = 1e9
    (other / "config.json").write_text(json.dumps(config))
    wrong = run_forward(resolve(str(other)), ids, dtype="float32", device=DEVICE).logits
    assert (wrong - logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("seed", SEEDS)
def test_latent_norms_at_rms_norm_eps(glm5, seed, monkeypatch):
    """The MLA latents' RMSNorms use rms_norm_eps (1e-5 here); with DeepSeek's 1e-6, which the MLA
    forward used for every family before, the trace misses transformers' (logits or gates)."""
    from moetool.forward import config as config_mod

    d, ids, logits, routes, _ = glm5("glm5_next", seed)
    real = config_mod._glm5_next

    def deepseek_eps(fc, spec, cfg):
        real(fc, spec, cfg)
        fc.mla.pop("eps")

    monkeypatch.setattr(config_mod, "_glm5_next", deepseek_eps)
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE)
    with pytest.raises(AssertionError):
        assert_matches_transformers(out, logits, routes)


def test_count_still_matches_transformers(glm5):
    d, _, _, _, model = glm5("glm5_next", 0)
    n = sum(p.numel() for p in model.parameters())
    assert moetool.count(str(d)).total_params == moetool.count(str(d), use_headers=False).total_params == n


def test_trace_cli_says_the_vision_tower_is_not_run(glm5):
    d, ids, _, routes, _ = glm5("glm5_next", 0)
    args = [sys.executable, "-m", "moetool", "trace", "--model", str(d), "--tokens", ",".join(map(str, ids[:8]))]
    r = subprocess.run(args + ["--format", "json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [layer["layer"] for layer in out["layers"]] == sorted(routes)
    assert "text-only input: the vision tower is not run; the trace is of the language model" in out["notes"]


def test_shared_indexer_layer_without_a_full_one_before_is_one_clear_error(glm5, tmp_path):
    """transformers hands a full layer's top-k only to the layer right after it (a "shared" layer after
    a KDA layer raises there): moetool refuses such a config in one line, exit 2."""
    d, ids, _, _, _ = glm5("glm5_next", 0)
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    config = json.loads((bad / "config.json").read_text())
    config["text_config"]["indexer_types"] = ["full", "full", "shared", "full", "shared", "shared"]
    (bad / "config.json").write_text(json.dumps(config))
    r = subprocess.run([sys.executable, "-m", "moetool", "trace", "--model", str(bad), "--tokens", "1,2,3"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "layer 4 is a \"shared\" indexer layer" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_profile_runs_and_routes_as_traces(glm5, tmp_path):
    """moetool profile (the same Decoder, prompts in one block, the indexer and KDA per prompt) routes
    each prompt as its own trace does."""
    import pyarrow.parquet as pq

    from conftest import write_tokenizer
    from moetool.profile.engine import profile
    from moetool.tracing import trace

    d = tmp_path / "glm5_next"
    shutil.copytree(glm5("glm5_next", 1)[0], d)
    write_tokenizer(d)
    prompts = ["The quick brown fox jumps over the lazy dog. " * 2, "def add(a, b): return a + b"]
    profile(prompts, model=str(d), block_tokens=200, device=DEVICE, per_token=str(tmp_path / "t.parquet"))
    rows = pq.read_table(tmp_path / "t.parquet").to_pandas()
    for i, text in enumerate(prompts):
        t = trace(text, model=str(d), device=DEVICE)
        assert len(t.tokens) > 8 and t.layers  # more keys than index_topk: the indexer drops some
        for l in t.layers:
            got = rows[(rows.prompt_index == i) & (rows.layer == l.layer)].sort_values(["token_index", "slot"])
            assert got.expert.to_numpy().reshape(len(t.tokens), -1).tolist() == l.experts


def test_cached_generation_equals_transformers_forward_of_the_whole_sequence(glm5):
    """--generate with the KV cache (KDA states, MLA latents, the indexer's keys and gate logits) against
    transformers' full forward of the generated sequence: logits and routes of every token. Pools that tie
    (0 in every head) are ranked as that full forward ranks them; transformers' own cached generate ranks
    them at the current length, so its forward of the first 16 tokens differs at token 15 from its forward of
    all 20 (asserted: the reason tests/test_generate_cache.py compares this config with recompute only)."""
    from moetool.forward.cache import generate

    d, ids, _, _, model = glm5("glm5_next", 0)
    prompt = ids[:14]
    out = generate(resolve(str(d)), prompt, 6, device=DEVICE)
    assert out.cached and len(out.ids) == 20
    logits, routes = routes_and_logits(model, torch.tensor([out.ids]))
    assert_matches_transformers(out.result, logits, routes, nonzero=True, varied="every")
    with torch.no_grad():
        short = model(torch.tensor([out.ids[:16]])).logits[0]
    assert (short[:15] - logits[:15]).abs().max().item() < 1e-4
    assert (short[15] - logits[15]).abs().max().item() > 1e-2  # transformers ranks ties by the row's length
