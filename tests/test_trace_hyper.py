"""trace of the hyper-connection families (forward/hyper.py) against transformers 5.23: HY-V4 (`hy_v4`,
HYV4ForCausalLM). Tiny random checkpoints written by `save_pretrained` (with the original checkpoints'
names it writes back: hc_pre.*, linear_gate, learnable_sink_param), two seeds each; biases, correction
biases, sinks, norm weights and the hyper-connection bases and scales randomised, initializer_range 0.2
so that routing depends on the token (asserted).

Logits within 1e-4 of transformers' (float32) and, in every MoE layer, the same expert set and gate
weights (1e-5) for every token, read by a pre-hook on transformers' experts modules
(tests/test_forward_families.py's `reference_routes`), independently of its router classes.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fakes import PROFILE_PROMPTS, assert_profile_routes_like_traces, DEVICE, assert_matches_transformers
from moetool.forward import run_forward
from moetool.source import resolve
from test_trace_text_families import build_case, randomize as randomize_text

_C = dict(hidden_size=32, num_attention_heads=4, vocab_size=128, num_hidden_layers=4, max_position_embeddings=256,
          initializer_range=0.2, pad_token_id=0, bos_token_id=0, eos_token_id=1)
_MLA = dict(q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)

FAMILIES: dict[str, dict] = {
    # HY-V4: GLM-5's MLA with sinks and a sigmoid output gate, a DSA indexer on "full" layers (RoPE on its
    # last dims; "shared" layers reuse the previous full layer's keys), sigmoid router + correction bias,
    # routed SwiGLU clamped at swiglu_limit (0.8: it cuts in), shared expert; 3 residual streams.
    # index_topk 8 of 40 tokens: the indexer cuts in.
    "hy_v4": dict(model_type="hy_v4", intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                  n_shared_experts=1, num_experts_per_tok=2, routed_scaling_factor=2.0, swiglu_limit=0.8,
                  index_topk=8, index_head_dim=8, index_n_heads=2, indexer_types=["full", "shared", "full", "shared"],
                  mlp_layer_types=["dense", "sparse", "sparse", "sparse"], hc_mult=3, hc_magnitude=1.5,
                  **_MLA, **_C),
    # grouped routing, two shared experts, two dense layers, the default indexer schedule, 2 streams, YaRN
    "hy_v4-groups": dict(model_type="hy_v4", intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
                         n_shared_experts=2, num_experts_per_tok=3, n_group=2, topk_group=1, routed_scaling_factor=1.0,
                         swiglu_limit=10.0, index_topk=6, index_head_dim=16, index_n_heads=4,
                         mlp_layer_types=["dense", "sparse", "dense", "sparse", "sparse"], hc_mult=2,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                          "original_max_position_embeddings": 64, "mscale_all_dim": 1.0},
                         **_MLA, **{**_C, "num_hidden_layers": 5}),
    # DeepSeek-V4: shared-KV MQA (sinks, grouped output, RoPE on the last dims, undone on the output);
    # a sliding layer, compressed-sparse layers (overlapping windows of 4, indexer keeping 2 entries) and a
    # heavily compressed layer (windows of 8); two hash-routed MoE layers, sqrtsoftplus top-k with a
    # correction bias; clamped SwiGLU in routed and shared experts; 3 streams with Sinkhorn mixing.
    "deepseek_v4": dict(model_type="deepseek_v4", head_dim=16, num_key_value_heads=1, q_lora_rank=16, o_groups=2,
                        o_lora_rank=8, partial_rotary_factor=0.25, index_n_heads=2, index_head_dim=8, index_topk=2,
                        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, routed_scaling_factor=1.5,
                        swiglu_limit=0.8, hc_mult=3, sliding_window=4,
                        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                                     "compressed_sparse_attention"], mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
                        **_C),
    # the default layer schedule (2 HCA, then HCA / CSA), YaRN on the compressed layers, sigmoid scoring,
    # 2 streams, 3 default hash layers, legacy compress_rate_* fields
    "deepseek_v4-yarn": dict(model_type="deepseek_v4", head_dim=16, num_key_value_heads=1, q_lora_rank=16, o_groups=4,
                             o_lora_rank=4, partial_rotary_factor=0.5, index_n_heads=4, index_head_dim=8, index_topk=3,
                             n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, scoring_func="sigmoid",
                             routed_scaling_factor=1.0, hc_mult=2, hc_sinkhorn_iters=5, sliding_window=6,
                             compress_rate_csa=4, compress_rate_hca=16,
                             rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                             **{**_C, "num_hidden_layers": 5}),
}
SEEDS = (0, 1)


def randomize(model, seed: int) -> None:
    """test_trace_text_families.randomize, plus the hyper-connections' bases and scales (their inits
    make every token's coefficients nearly equal: scale 0.01 in HY-V4, 1 and base 0 in DeepSeek-V4)."""
    randomize_text(model, seed)
    g = torch.Generator().manual_seed(seed + 3000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".base", ".scale", ".hc_base", ".hc_scale")) and ("hc" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "scale" in name else 0.0))
            if name.endswith("position_bias"):  # DeepSeek-V4's compressors: zeros by init
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):  # DeepSeek-V4's hash table (zeros by init): k distinct experts per token
                E = model.config.n_routed_experts
                b.copy_(torch.stack([torch.randperm(E, generator=g)[:b.shape[1]] for _ in range(b.shape[0])]))


@pytest.fixture(scope="session")
def hyper_family(tmp_path_factory):
    """hyper_family(name, seed) -> (directory, ids, reference logits, reference routes, model), built once."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            cache[name, seed] = build_case(tmp_path_factory, FAMILIES[name], name, seed, randomize)
        return cache[name, seed]

    return get


CASES = [(n, s) for n in FAMILIES for s in SEEDS]


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, hyper_family):
    d, ids, ref_logits, ref_routes, _ = hyper_family(name, seed)
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE)
    assert_matches_transformers(out, ref_logits, ref_routes, nonzero=True, varied="every")


def test_hy_v4_clamp_and_indexer_tail_matter(hyper_family, tmp_path):
    """The pieces HY-V4 adds each change the logits: dropping the routed SwiGLU clamp, or rotating the
    indexer's first dims instead of its last, breaks the match with transformers."""
    from moetool.forward import sparse_variants as model_mod  # where the decoder calls the indexer

    d, ids, ref_logits, _, _ = hyper_family("hy_v4", 0)
    real = model_mod.sparse_attention_keep

    def head_rope(*a, **k):
        return real(*a, **{**k, "rope_tail": False})

    model_mod.sparse_attention_keep = head_rope
    try:
        wrong = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE).logits
    finally:
        model_mod.sparse_attention_keep = real
    assert (wrong - ref_logits).abs().max().item() > 1e-3
    unclamped = tmp_path / "unclamped"  # the same weights with swiglu_limit out of reach
    shutil.copytree(d, unclamped)
    config = json.loads((unclamped / "config.json").read_text())
    (unclamped / "config.json").write_text(json.dumps({**config, "swiglu_limit": 1e9}))
    wrong = run_forward(resolve(str(unclamped)), ids, dtype="float32", device=DEVICE).logits
    assert (wrong - ref_logits).abs().max().item() > 1e-3
    from moetool.arch import spec_from_config
    from moetool.forward.config import forward_config

    ckpt = resolve(str(d))
    fc = forward_config(spec_from_config(ckpt.config, ckpt.config_path), ckpt.config)
    assert fc.hyper.streams == 3 and fc.routed_act == "clamped_silu" and fc.indexer["shared"] == {1, 3}


def test_deepseek_v4_indexer_and_compressed_entries_matter(hyper_family, monkeypatch):
    """The compressed entries and the indexer's choice among them both change the logits: attending to
    every visible entry (no indexer), or to none, breaks the match with transformers."""
    import moetool.forward.deepseek_v4 as v4

    d, ids, ref_logits, _, _ = hyper_family("deepseek_v4", 0)
    real = v4._compressed
    for variant in ("all visible", "none"):
        def patched(dec, i, h, q_res, pos, kind, cache, variant=variant):
            entries, keep = real(dec, i, h, q_res, pos, kind, cache)
            visible = torch.arange(entries.shape[0], device=pos.device)[None] < ((pos.long() + 1) // dec.fc.deepseek_v4["rates"][kind])[:, None]
            assert kind != "compressed_sparse_attention" or (keep != visible).any()  # index_topk 2 cuts in
            return entries, visible if variant == "all visible" else keep & False

        monkeypatch.setattr(v4, "_compressed", patched)
        wrong = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE).logits
        assert (wrong - ref_logits).abs().max().item() > 1e-3, variant


@pytest.mark.parametrize("name", ["hy_v4", "deepseek_v4", "glm_moe_dsa"])
def test_profile_blocks_route_as_traces(name, hyper_family, tmp_path, tmp_path_factory):
    """moetool profile runs several prompts per block (each with its own mask and positions, the
    indexer choosing each prompt's keys on its own): every token routes as in one trace per prompt.
    GLM-5 (tests/test_trace_gap_families.py): DeepSeek's sparse-attention indexer on a block of prompts
    (profile stopped on it with a TypeError before the indexer split blocks)."""

    from conftest import write_tokenizer

    d = tmp_path / name
    if name in FAMILIES:
        shutil.copytree(hyper_family(name, 1)[0], d)
    else:
        from test_trace_gap_families import FAMILIES as GAP

        shutil.copytree(build_case(tmp_path_factory, GAP[name], name, 1)[0], d)
    write_tokenizer(d)
    prompts = PROFILE_PROMPTS
    assert_profile_routes_like_traces(d, tmp_path, prompts, min_tokens=8)  # more keys than index_topk: the indexer drops some


@pytest.mark.parametrize("name", ["hy_v4", "deepseek_v4"])
def test_quantize_report_scores_experts_as_transformers_runs_them(name, hyper_family, tmp_path):
    """quantize-report's output error of one routed expert, recomputed from transformers' expert weights,
    its routed hidden states and gates and its own clamped SwiGLU (`_apply_gate`); the shared experts
    (stored as linear_gate / w1 w3 w2) are scored too."""
    from tokenizers import Tokenizer

    from conftest import write_tokenizer
    from moetool.quant import schemes
    from moetool.quant.check import default_calibration_text
    from moetool.quant.report import quantize_report

    src, _, _, _, model = hyper_family(name, 0)
    d = tmp_path / name
    shutil.copytree(src, d)
    write_tokenizer(d)
    ids = Tokenizer.from_file(str(d / "tokenizer.json")).encode(default_calibration_text()).ids[:120]
    layer = 2
    experts = model.model.layers[layer].mlp.experts
    cap = {}
    hook = experts.register_forward_pre_hook(lambda m, a: cap.__setitem__("in", a))
    with torch.no_grad():
        model(torch.tensor([ids]))
    hook.remove()
    h, idx, w = cap["in"]
    e = int(torch.bincount(idx.reshape(-1)).argmax())  # the most routed expert
    tok, slot = torch.where(idx == e)
    X, g, W = h[tok], w[tok, slot], experts.down_proj[e]
    with torch.no_grad():
        mid = experts._apply_gate(torch.nn.functional.linear(X, experts.gate_up_proj[e]))
        err = mid @ (schemes.int4_g128(W) - W).T
        expected = torch.sqrt(((g ** 2) * err.pow(2).sum(1)).sum() / ((g ** 2) * (mid @ W.T).pow(2).sum(1)).sum())
        unclamped = experts.gate_up_proj[e].chunk(2, dim=0)
        plain = torch.nn.functional.silu(X @ unclamped[0].T) * (X @ unclamped[1].T)
    assert (plain - mid).abs().max() > 1e-3  # the clamp cuts in: an unclamped score would differ
    r = quantize_report(str(d), schemes=["int4_g128"], layers={layer}, experts={e}, device=DEVICE, calibration_tokens=120)
    row = next(x for x in r.rows if x.projection == "down" and x.expert == e)
    assert row.tokens == len(tok)
    assert row.output_rel_error == pytest.approx(float(expected), rel=1e-4)
    full = quantize_report(str(d), schemes=["int4_g128"], layers={layer}, device=DEVICE, calibration_tokens=40)
    assert {x.expert for x in full.rows if not isinstance(x.expert, int)} == {"shared"}


def test_deepseek_v4_original_layout(hyper_family, tmp_path):
    """DeepSeek-V4's own checkpoint layout (embed.weight, layers.*, norm.weight, head.weight, hc_head_fn at
    the top, no model. prefix), which transformers loads through its conversion mapping: the same logits."""
    import transformers
    from safetensors.torch import load_file, save_file

    src, ids, ref_logits, _, _ = hyper_family("deepseek_v4", 0)
    d = tmp_path / "original"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    tensors = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        name = name.removeprefix("model.").replace("embed_tokens.", "embed.")
        tensors[name.replace("hc_head.hc_", "hc_head_")] = t
    assert {"embed.weight", "norm.weight", "head.weight", "hc_head_fn", "layers.0.attn.wq_a.weight"} <= set(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (loaded(torch.tensor([ids])).logits[0] - ref_logits).abs().max().item() < 1e-5  # transformers reads it so
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE)
    assert (out.logits - ref_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("edit,error,needle", [
    (lambda c, t: c.update(o_groups=3), "BadConfig", "o_groups"),
    (lambda c, t: c.update(layer_types=["sliding_attention", "full_attention"] * 2), "BadConfig", "layer_types"),
    (lambda c, t: t.__setitem__("model.layers.0.ffn.gate.tid2eid", t["model.layers.0.ffn.gate.tid2eid"] + 100),
     "BadCheckpoint", "expert ids"),
])
def test_deepseek_v4_bad_input_is_one_clear_error(edit, error, needle, hyper_family, tmp_path):
    """A config or hash table DeepSeek-V4 cannot run: one MoetoolError naming the field, not a crash."""
    from safetensors.torch import load_file, save_file

    from moetool import errors

    src, ids, _, _, _ = hyper_family("deepseek_v4", 0)
    config = json.loads((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    edit(config, tensors)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(getattr(errors, error), match=needle):
        run_forward(resolve(str(tmp_path)), ids, dtype="float32", device=DEVICE)
