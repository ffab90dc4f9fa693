"""Checkpoints made by the tests themselves: tiny random configs of every family (saved by
transformers `save_pretrained`, the real on-disk naming) and header-only safetensors files with
full-size shapes (the data region is a hole: sparse files cost no disk)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from moetool.header import DTYPE_BITS

# The device moetool's forward runs on in the tests: `MOETOOL_TEST_DEVICE=cuda pytest ...` runs the
# forward, trace, profile and quantize-report tests on a GPU (transformers, the reference, stays on CPU).
DEVICE = os.environ.get("MOETOOL_TEST_DEVICE", "cpu")

_C = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_hidden_layers=2,
          max_position_embeddings=256)

# (id, config dict). Variants cover the options that change the parameter inventory or routing.
TINY_CONFIGS: list[tuple[str, dict]] = [
    ("mixtral", dict(model_type="mixtral", intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **_C)),
    ("mixtral-tied", dict(model_type="mixtral", intermediate_size=40, num_local_experts=8, num_experts_per_tok=3,
                          tie_word_embeddings=True, **_C)),
    ("phimoe", dict(model_type="phimoe", intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                    attention_bias=True, lm_head_bias=True, **_C)),
    ("olmoe", dict(model_type="olmoe", intermediate_size=48, num_experts=8, num_experts_per_tok=2, **_C)),
    ("qwen2_moe", dict(model_type="qwen2_moe", intermediate_size=48, moe_intermediate_size=24,
                       shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2, **_C)),
    ("qwen2_moe-sparse", dict(model_type="qwen2_moe", intermediate_size=48, moe_intermediate_size=24,
                              shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2,
                              decoder_sparse_step=2, mlp_only_layers=[3], qkv_bias=False,
                              norm_topk_prob=True, **{**_C, "num_hidden_layers": 4})),
    ("qwen3_moe", dict(model_type="qwen3_moe", intermediate_size=48, moe_intermediate_size=24, num_experts=8,
                       num_experts_per_tok=2, head_dim=16, **_C)),
    ("qwen3_moe-bias", dict(model_type="qwen3_moe", intermediate_size=48, moe_intermediate_size=24, num_experts=8,
                            num_experts_per_tok=3, head_dim=8, attention_bias=True, mlp_only_layers=[0],
                            norm_topk_prob=True, **_C)),
    ("granitemoe", dict(model_type="granitemoe", intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                        tie_word_embeddings=True, **_C)),
    ("gpt_oss", dict(model_type="gpt_oss", intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                     head_dim=8, sliding_window=8, **_C)),
    ("glm4_moe", dict(model_type="glm4_moe", intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
                      n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
                      head_dim=8, use_qk_norm=True, attention_bias=True, num_nextn_predict_layers=0,
                      **{**_C, "num_hidden_layers": 3})),
    ("deepseek_v2", dict(model_type="deepseek_v2", intermediate_size=48, moe_intermediate_size=16,
                         first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
                         n_group=2, topk_group=1, topk_method="group_limited_greedy", q_lora_rank=None,
                         kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                         **{**_C, "num_key_value_heads": 4, "num_hidden_layers": 3})),
    ("deepseek_v3", dict(model_type="deepseek_v3", intermediate_size=48, moe_intermediate_size=16,
                         first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                         n_group=4, topk_group=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
                         qk_rope_head_dim=4, v_head_dim=8, routed_scaling_factor=2.5, num_nextn_predict_layers=0,
                         **{**_C, "num_key_value_heads": 4, "num_hidden_layers": 3})),
    ("dbrx", dict(model_type="dbrx", d_model=32, n_layers=2, n_heads=4, vocab_size=128, max_seq_len=256,
                  ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2),
                  attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=0.5))),
    ("llama4_text", dict(model_type="llama4_text", intermediate_size=48, intermediate_size_mlp=64,
                         num_local_experts=4, num_experts_per_tok=1, head_dim=8, interleave_moe_layer_step=2,
                         attention_chunk_size=16, **{**_C, "num_hidden_layers": 4})),
    ("jamba", dict(model_type="jamba", intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                   attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                   mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, **{**_C, "num_hidden_layers": 4})),
    ("qwen3_next", dict(model_type="qwen3_next", intermediate_size=48, moe_intermediate_size=24,
                        shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=8,
                        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                        linear_value_head_dim=8, **{**_C, "num_hidden_layers": 4})),
    ("switch_transformers", dict(model_type="switch_transformers", d_model=32, d_ff=48, d_kv=8, num_heads=4,
                                 num_layers=4, num_decoder_layers=2, num_experts=4, vocab_size=128,
                                 encoder_sparse_step=2, decoder_sparse_step=1)),
    ("llama", dict(model_type="llama", intermediate_size=48, **_C)),
    ("qwen2", dict(model_type="qwen2", intermediate_size=48, **_C)),
    ("mistral", dict(model_type="mistral", intermediate_size=48, head_dim=8, **_C)),
    ("qwen3", dict(model_type="qwen3", intermediate_size=48, head_dim=8, tie_word_embeddings=True, **_C)),
]

LLAMA4_MULTIMODAL = dict(
    model_type="llama4",
    text_config=dict(model_type="llama4_text", intermediate_size=48, intermediate_size_mlp=64, num_local_experts=4,
                     num_experts_per_tok=1, head_dim=8, **_C),
    vision_config=dict(model_type="llama4_vision_model", hidden_size=16, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, image_size=28, patch_size=14, projector_input_dim=32,
                       projector_output_dim=32, vision_output_dim=32, pixel_shuffle_ratio=0.5),
)


def build_transformers_model(config: dict, seed: int = 0):
    """A random-weight transformers model of `config` (test-only dependency)."""
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    if config["model_type"] == "switch_transformers":
        return transformers.SwitchTransformersForConditionalGeneration(cfg)
    if config["model_type"] == "llama4":
        return transformers.Llama4ForConditionalGeneration(cfg)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def transformers_param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --- header-only safetensors ------------------------------------------------------------------

def write_header_only(path: str | os.PathLike, tensors: dict[str, tuple[str, list[int]]],
                      metadata: dict | None = None) -> int:
    """Write a safetensors file whose data region is a hole of the full size. Returns file size."""
    entries, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        entries["__metadata__"] = metadata
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def write_sharded(root: Path, tensors: dict[str, tuple[str, list[int]]], shards: int, config: dict) -> None:
    """Split `tensors` over `shards` header-only files with a model.safetensors.index.json."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
        write_header_only(root / fname, part)
        for n in part:
            weight_map[n] = fname
        total += sum((math.prod(sh) * DTYPE_BITS[dt] + 7) // 8 for dt, sh in part.values())
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))


def deepseek_v3_tensors(config: dict) -> dict[str, tuple[str, list[int]]]:
    """The tensor names, dtypes and shapes of the published DeepSeek-V3 checkpoint: fp8 E4M3
    linear weights with fp32 128x128 `weight_scale_inv`, bf16 norms / router / embedding / head,
    fp32 `e_score_correction_bias`, and the MTP layer (layer 61) with its embedding and head copies."""
    d, V = config["hidden_size"], config["vocab_size"]
    H, L = config["num_attention_heads"], config["num_hidden_layers"]
    E, F, Fd = config["n_routed_experts"], config["moe_intermediate_size"], config["intermediate_size"]
    qr, kvr = config["q_lora_rank"], config["kv_lora_rank"]
    nope, rope, v = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    t: dict[str, tuple[str, list[int]]] = {}

    def fp8(name, out, inp):
        t[f"{name}.weight"] = ("F8_E4M3", [out, inp])
        t[f"{name}.weight_scale_inv"] = ("F32", [-(-out // 128), -(-inp // 128)])

    def bf16(name, *shape):
        t[name] = ("BF16", list(shape))

    bf16("model.embed_tokens.weight", V, d)
    for i in range(L + config.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{i}"
        if i >= L:
            bf16(f"{p}.embed_tokens.weight", V, d)
            bf16(f"{p}.enorm.weight", d)
            bf16(f"{p}.hnorm.weight", d)
            bf16(f"{p}.eh_proj.weight", d, 2 * d)
            bf16(f"{p}.shared_head.norm.weight", d)
            bf16(f"{p}.shared_head.head.weight", V, d)
        fp8(f"{p}.self_attn.q_a_proj", qr, d)
        bf16(f"{p}.self_attn.q_a_layernorm.weight", qr)
        fp8(f"{p}.self_attn.q_b_proj", H * (nope + rope), qr)
        fp8(f"{p}.self_attn.kv_a_proj_with_mqa", kvr + rope, d)
        bf16(f"{p}.self_attn.kv_a_layernorm.weight", kvr)
        fp8(f"{p}.self_attn.kv_b_proj", H * (nope + v), kvr)
        fp8(f"{p}.self_attn.o_proj", d, H * v)
        bf16(f"{p}.input_layernorm.weight", d)
        bf16(f"{p}.post_attention_layernorm.weight", d)
        if i < config["first_k_dense_replace"]:
            fp8(f"{p}.mlp.gate_proj", Fd, d)
            fp8(f"{p}.mlp.up_proj", Fd, d)
            fp8(f"{p}.mlp.down_proj", d, Fd)
            continue
        bf16(f"{p}.mlp.gate.weight", E, d)
        t[f"{p}.mlp.gate.e_score_correction_bias"] = ("F32", [E])
        for e in range(E):
            fp8(f"{p}.mlp.experts.{e}.gate_proj", F, d)
            fp8(f"{p}.mlp.experts.{e}.up_proj", F, d)
            fp8(f"{p}.mlp.experts.{e}.down_proj", d, F)
        Fs = F * config["n_shared_experts"]
        fp8(f"{p}.mlp.shared_experts.gate_proj", Fs, d)
        fp8(f"{p}.mlp.shared_experts.up_proj", Fs, d)
        fp8(f"{p}.mlp.shared_experts.down_proj", d, Fs)
    bf16("model.norm.weight", d)
    bf16("lm_head.weight", V, d)
    return t


def _variant(base: str, **changes) -> dict:
    d = dict(dict(TINY_CONFIGS)[base])
    d.update(changes)
    return d


# Extra option combinations for the forward tests (RoPE scaling kinds, routing options).
FORWARD_VARIANTS: list[tuple[str, dict]] = [
    ("deepseek_v3-yarn", _variant("deepseek_v3", rope_scaling=dict(type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=1.0,
                                                                   original_max_position_embeddings=64, beta_fast=32,
                                                                   beta_slow=1), norm_topk_prob=False)),
    ("deepseek_v3-nogroup", _variant("deepseek_v3", n_group=1, topk_group=1, num_experts_per_tok=3, q_lora_rank=None)),
    ("deepseek_v2-greedy", _variant("deepseek_v2", topk_method="greedy", routed_scaling_factor=16.0, n_shared_experts=1)),
    ("llama4_text-llama3rope", _variant("llama4_text", rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                         high_freq_factor=4.0,
                                                                         original_max_position_embeddings=32),
                                        num_experts_per_tok=2, attn_temperature_tuning=True, floor_scale=4)),
    ("phimoe-longrope", _variant("phimoe", rope_scaling=dict(type="longrope", short_factor=[1.0, 1.1, 1.3, 1.7],
                                                             long_factor=[1.0, 2.0, 4.0, 8.0], short_mscale=1.1,
                                                             long_mscale=1.3, original_max_position_embeddings=64),
                                 # 40 tokens < 64: the short regime, where transformers 5.x agrees with Phi's
                                 # reference (past it, transformers keeps the short factors with the long mscale).
                                 max_position_embeddings=256)),
    ("olmoe-clip", _variant("olmoe", clip_qkv=0.3, norm_topk_prob=True)),
    ("glm4_moe-noqknorm", _variant("glm4_moe", use_qk_norm=False, attention_bias=False, n_group=1, topk_group=1,
                                   routed_scaling_factor=1.5)),
    ("gpt_oss-window", _variant("gpt_oss", sliding_window=4, num_experts_per_tok=3)),
]
FORWARD_FAMILY_CONFIGS = [(n, c) for n, c in TINY_CONFIGS if c["model_type"] in (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss", "granitemoe",
    "phimoe", "dbrx", "llama4_text")] + FORWARD_VARIANTS


def randomize_biases(model, seed: int) -> None:
    """Routers start with zero biases and zero correction biases: give every bias, sink and buffer
    of that kind random values so the tests exercise them."""
    import torch

    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("bias", "sinks", "e_score_correction_bias")) and p.dtype.is_floating_point:
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "correction" in name else 0.5))


def transformers_routes(model, ids) -> tuple:
    """Run transformers' model; capture each MoE layer's chosen experts and gate weights from its
    router module: {layer: (experts [T, K], weights [T, K])}, plus the logits [T, V]."""
    import re

    import torch

    captured: dict[int, tuple] = {}
    family = model.config.get_text_config().model_type
    hooks = []

    def hook_for(layer: int, module):
        def hook(mod, args, out):
            if family == "llama4_text":
                scores, logits = out
                k = model.config.get_text_config().num_experts_per_tok
                idx = torch.topk(logits, k, dim=-1).indices
                captured[layer] = (idx, scores.gather(1, idx))
            elif family == "dbrx":
                w, idx = mod_parent[layer].route_tokens_to_experts(out)
                captured[layer] = (idx, w)
            else:
                _, w, idx = out
                captured[layer] = (idx, w)
        return hook

    mod_parent = {}
    for name, module in model.named_modules():
        m = re.search(r"\.(layers|blocks)\.(\d+)\.(mlp|block_sparse_moe|feed_forward|ffn|mixer)\.(gate|router)$", name)
        if m and not isinstance(module, torch.nn.ModuleList):
            layer = int(m.group(2))
            if family == "dbrx":
                mod_parent[layer] = model.get_submodule(name.rsplit(".", 1)[0])
            hooks.append(module.register_forward_hook(hook_for(layer, module)))
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    for h in hooks:
        h.remove()
    return logits, captured


def assert_matches_transformers(out, ref_logits, ref_routes, *, scale: float = 1.0, tol: float = 1e-4,
                                nonzero: bool = False, varied: str | None = None) -> None:
    """moetool's forward result `out` against transformers' logits and routing ({layer: (experts,
    weights)} read from its router or experts modules): logits within `tol`; in every MoE layer the
    same expert set for every token and gate weights within 1e-5 (transformers' weights times `scale`
    where it applies a factor after its experts module). `nonzero`: the logits are not two near-zero
    tensors; `varied` "any" / "every": routing depends on the token in some / every MoE layer, without
    which the expert-set check proves little."""
    if nonzero:
        assert ref_logits.abs().max() > 0.1, "the reference logits are near zero: nothing is compared"
    diff = (out.logits - ref_logits).abs().max().item()
    assert diff < tol, f"logits differ by {diff}"
    assert ref_routes and sorted(ref_routes) == [r.layer for r in out.routes]
    for r in out.routes:
        T = r.experts.shape[0]
        ref_idx, ref_w = (x.reshape(T, -1) for x in ref_routes[r.layer])
        for t in range(T):
            ours = dict(zip(r.experts[t].tolist(), r.weights[t].tolist()))
            theirs = dict(zip(ref_idx[t].tolist(), (ref_w[t].float() * scale).tolist()))
            assert set(ours) == set(theirs), f"layer {r.layer} token {t}: {sorted(ours)} vs {sorted(theirs)}"
            for e, w in ours.items():
                assert abs(w - theirs[e]) < 1e-5, (r.layer, t, e, w, theirs[e])
    if varied:
        per_layer = [len({tuple(sorted(e)) for e in r.experts.tolist()}) > 1 for r in out.routes]
        assert (all if varied == "every" else any)(per_layer), f"routing does not vary by token: {per_layer}"


PROFILE_PROMPTS = ["The quick brown fox jumps over the lazy dog. " * 3, "def add(a, b): return a + b", "import os, sys " * 4]


def assert_profile_routes_like_traces(d, tmp_path, prompts=PROFILE_PROMPTS, min_tokens: int = 0):
    """`moetool profile` of `prompts` in one block (per-token table) routes every token of every MoE layer
    as one trace per prompt does: whatever a family does across tokens (indexers, convolutions, recurrent
    state, KV sharing) restarts at each prompt. `min_tokens`: each prompt is longer (so that an indexer's
    top-k or a window cuts in). Returns the profile's ProfileStats."""
    import pyarrow.parquet as pq

    from moetool.profile.engine import profile
    from moetool.tracing import trace

    stats = profile(prompts, model=str(d), block_tokens=200, device=DEVICE, per_token=str(tmp_path / "t.parquet"))
    rows = pq.read_table(tmp_path / "t.parquet").to_pandas()
    for i, text in enumerate(prompts):
        t = trace(text, model=str(d), device=DEVICE)
        assert len(t.tokens) > min_tokens
        for l in t.layers:
            got = rows[(rows.prompt_index == i) & (rows.layer == l.layer)].sort_values(["token_index", "slot"])
            assert got.expert.to_numpy().reshape(len(t.tokens), -1).tolist() == l.experts
    return stats


def save_both_layouts(model, tmp_path_factory, tag: str):
    """A transformers model written twice: `save_pretrained` (the published layout: transformers reverses
    its weight conversions) and its state_dict under transformers' in-memory names, with the same
    config.json -> (published dir, runtime dir)."""
    import shutil

    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp(tag)
    model.save_pretrained(d)
    runtime = tmp_path_factory.mktemp(f"{tag}-runtime")
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(runtime / "model.safetensors"))
    shutil.copy(d / "config.json", runtime / "config.json")
    return d, runtime
