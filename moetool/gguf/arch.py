"""GGUF -> moetool's vocabulary: tensor names as transformers stores them, and config.json from
the `{arch}.` metadata keys, so that counting and the forward pass work on GGUF unchanged.

Names follow llama.cpp's `gguf-py/gguf/tensor_mapping.py` (in reverse): `blk.N.ffn_gate_exps`
(experts stacked [E, F, D]) is transformers' routed experts, `ffn_*_shexp` the shared expert(s),
`ffn_gate_inp` the router, `exp_probs_b` DeepSeek-V3's `e_score_correction_bias` (a buffer).
A tensor no rule knows keeps its GGUF name: `count` reports it under "other".

The config follows llama.cpp's semantics where they are not in the file (llama-model.cpp):
Mixtral (`llama` with experts) and Qwen3-MoE renormalise the top-k weights, Qwen2-MoE does
not; DeepSeek-2 without `expert_gating_func` is softmax (V2); gpt-oss: top-k logits, softmax.

Example:
    >>> hf_name("blk.3.ffn_down_exps.weight")
    'model.layers.3.mlp.experts.down_proj'
"""

from __future__ import annotations

import re
from typing import Any, Optional

from ..errors import BadCheckpoint

# GGUF per-layer suffix -> transformers suffix (after `model.layers.N.`).
_LAYER_NAMES: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_norm.bias": "input_layernorm.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.bias": "post_attention_layernorm.bias",
    "post_attention_norm.weight": "post_attention_layernorm.weight",  # gpt-oss
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_sinks.weight": "self_attn.sinks",
    # MLA (deepseek2)
    "attn_q_a.weight": "self_attn.q_a_proj.weight", "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight", "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight", "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
    "attn_k_b.weight": "self_attn.k_b_proj.weight", "attn_v_b.weight": "self_attn.v_b_proj.weight",
    # MoE
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_inp.bias": "mlp.gate.bias",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj", "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_exps.bias": "mlp.experts.gate_proj_bias", "ffn_up_exps.bias": "mlp.experts.up_proj_bias",
    "ffn_down_exps.bias": "mlp.experts.down_proj_bias",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    # dense FFN
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output_norm.bias": "model.norm.bias",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "model.rotary_emb.rope_freqs.inv_freq",  # llama3 RoPE factors: a buffer
}
# per architecture: transformers' spelling where it differs from the default above
_ARCH_NAMES: dict[str, dict[str, str]] = {
    "qwen2moe": {"ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
                 "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
                 "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight"},
    "gpt-oss": {"ffn_gate_inp.weight": "mlp.router.weight", "ffn_gate_inp.bias": "mlp.router.bias"},
}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
_OLD_EXPERT = re.compile(r"^ffn_(gate|up|down)\.(\d+)\.weight$")
STACKED = ("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj")


def hf_name(name: str, arch: str = "") -> str:
    """transformers' name for a GGUF tensor (the GGUF name itself when no rule knows it)."""
    m = _BLK.match(name)
    if m is None:
        return _GLOBAL_NAMES.get(name, name)
    layer, rest = m.groups()
    if rest.startswith("nextn."):  # DeepSeek-V3 / GLM MTP extras: counted as MTP by their layer
        return f"model.layers.{layer}.{rest}"
    mapped = _ARCH_NAMES.get(arch, {}).get(rest) or _LAYER_NAMES.get(rest)
    if mapped is None:
        e = _OLD_EXPERT.match(rest)  # GGUFs converted before experts were stacked (2023 Mixtral files)
        if e:
            return f"model.layers.{layer}.mlp.experts.{e.group(2)}.{e.group(1)}_proj.weight"
    return f"model.layers.{layer}.{mapped}" if mapped else name


# --- config.json from metadata ----------------------------------------------------------------

class _Meta:
    """`{arch}.` keys with typed access; errors name the key."""

    def __init__(self, md: dict[str, Any], arch: str, where: str):
        self.md, self.arch, self.where = md, arch, where

    def get(self, key: str, default: Any = None) -> Any:
        return self.md.get(f"{self.arch}.{key}", default)

    def int(self, key: str, default: Any = ...) -> int:
        v = self.get(key)
        if v is None:
            if default is ...:
                raise BadCheckpoint(f"{self.where}: GGUF metadata has no {self.arch}.{key}")
            return default
        if isinstance(v, list):  # per-layer arrays (e.g. head_count_kv): all equal or unsupported
            if not v or len(set(v)) != 1:
                raise BadCheckpoint(f"{self.where}: {self.arch}.{key} varies per layer ({v[:4]}...); not supported")
            v = v[0]
        if type(v) is bool or not isinstance(v, int) or v < 0:
            raise BadCheckpoint(f"{self.where}: GGUF metadata {self.arch}.{key} = {v!r} is not a non-negative integer")
        return v

    def float(self, key: str, default: Any = ...) -> float:
        v = self.get(key)
        if v is None:
            if default is ...:
                raise BadCheckpoint(f"{self.where}: GGUF metadata has no {self.arch}.{key}")
            return default
        if type(v) is bool or not isinstance(v, (int, float)) or v != v:
            raise BadCheckpoint(f"{self.where}: GGUF metadata {self.arch}.{key} = {v!r} is not a number")
        return _shortest_f32(float(v))


def _shortest_f32(v: float) -> float:
    """The shortest decimal that is the same float32 (metadata floats are f32: 1e-5 is stored as
    9.99999974738e-06; config.json said 1e-05)."""
    import struct

    bits = struct.pack("<f", v)
    for digits in range(1, 10):
        d = float(f"{v:.{digits}g}")
        if struct.pack("<f", d) == bits:
            return d
    return v


def gguf_config(md: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, Any]:
    """A transformers config.json for the GGUF's architecture, from its metadata; `shapes` (GGUF
    name -> shape) supplies what the metadata leaves out (vocabulary, biases, tied head)."""
    arch = md.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise BadCheckpoint(f"{where}: GGUF metadata has no general.architecture")
    builder = _BUILDERS.get(arch)
    if builder is None:
        raise BadCheckpoint(f"{where}: GGUF architecture {arch!r} is not supported "
                            f"(supported: {', '.join(sorted(_BUILDERS))})")
    m = _Meta(md, arch, where)
    emb = shapes.get("token_embd.weight")
    if emb is None:
        raise BadCheckpoint(f"{where}: GGUF has no token_embd.weight")
    d = m.int("embedding_length")
    heads = m.int("attention.head_count")
    if not d or not heads:
        raise BadCheckpoint(f"{where}: {arch}.embedding_length and {arch}.attention.head_count must be positive")
    cfg: dict[str, Any] = {
        "vocab_size": emb[0], "hidden_size": d, "num_hidden_layers": m.int("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": m.int("attention.head_count_kv", heads),
        "max_position_embeddings": m.int("context_length", 4096),
        "rms_norm_eps": m.float("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": m.float("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in shapes,
    }
    if m.get("attention.key_length") is not None and m.get("attention.key_length_mla") is None and arch != "deepseek2":
        cfg["head_dim"] = m.int("attention.key_length")
    scaling = _rope_scaling(m)
    if scaling:
        cfg["rope_scaling"] = scaling
    builder(cfg, m, shapes)
    cfg["architectures"] = [f"gguf:{arch}"]
    ftype = md.get("general.file_type")
    cfg["quantization_config"] = {"quant_method": "gguf",
                                  "fmt": FILE_TYPES.get(ftype, f"file_type {ftype}") if ftype is not None else None}
    return cfg


# general.file_type (llama.h llama_ftype) -> the name llama.cpp's quantize tool uses
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
              19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
              26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
              36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0"}


def _rope_scaling(m: _Meta) -> Optional[dict]:
    kind = m.get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    out: dict[str, Any] = {"rope_type": kind, "factor": m.float("rope.scaling.factor", 1.0)}
    orig = m.get("rope.scaling.original_context_length")
    if orig is not None:
        out["original_max_position_embeddings"] = m.int("rope.scaling.original_context_length")
    if kind == "yarn":
        out["beta_fast"] = m.float("rope.scaling.yarn_beta_fast", 32.0)
        out["beta_slow"] = m.float("rope.scaling.yarn_beta_slow", 1.0)
        log_mul = m.float("rope.scaling.yarn_log_multiplier", 0.0)
        if log_mul:  # DeepSeek: convert_hf_to_gguf.py writes 0.1 * mscale_all_dim (mscale = mscale_all_dim there)
            out["mscale"] = out["mscale_all_dim"] = _shortest_f32(log_mul / 0.1)
    return out


def _moe_common(cfg: dict, m: _Meta) -> None:
    cfg["num_experts_per_tok"] = m.int("expert_used_count")


def _llama(cfg: dict, m: _Meta, shapes: dict) -> None:
    cfg["intermediate_size"] = m.int("feed_forward_length")
    cfg["attention_bias"] = "blk.0.attn_q.bias" in shapes
    experts = m.int("expert_count", 0)
    if experts:  # Mixtral: llama.cpp's `llama` architecture with experts
        cfg.update(model_type="mixtral", num_local_experts=experts)
        _moe_common(cfg, m)
    else:
        cfg["model_type"] = "llama"


def _qwen2moe(cfg: dict, m: _Meta, shapes: dict) -> None:
    cfg.update(model_type="qwen2_moe", num_experts=m.int("expert_count"),
               moe_intermediate_size=m.int("expert_feed_forward_length"),
               shared_expert_intermediate_size=m.int("expert_shared_feed_forward_length", 0),
               intermediate_size=m.int("feed_forward_length", m.int("expert_feed_forward_length")),
               qkv_bias="blk.0.attn_q.bias" in shapes, norm_topk_prob=False, decoder_sparse_step=1,
               mlp_only_layers=_dense_layers(cfg, shapes))
    _moe_common(cfg, m)


def _qwen3moe(cfg: dict, m: _Meta, shapes: dict) -> None:
    # llama.cpp renormalises Qwen3-MoE's top-k weights (build_moe_ffn(..., norm_w = true))
    cfg.update(model_type="qwen3_moe", num_experts=m.int("expert_count"),
               moe_intermediate_size=m.int("expert_feed_forward_length"),
               intermediate_size=m.int("feed_forward_length", m.int("expert_feed_forward_length")),
               attention_bias="blk.0.attn_q.bias" in shapes, norm_topk_prob=True, decoder_sparse_step=1,
               mlp_only_layers=_dense_layers(cfg, shapes))
    _moe_common(cfg, m)


def _dense_layers(cfg: dict, shapes: dict) -> list[int]:
    """Layers stored with a dense FFN and no router (Qwen's `mlp_only_layers`)."""
    return [i for i in range(cfg["num_hidden_layers"])
            if f"blk.{i}.ffn_gate_inp.weight" not in shapes and f"blk.{i}.ffn_down.weight" in shapes]


def _deepseek2(cfg: dict, m: _Meta, shapes: dict) -> None:
    gating = m.int("expert_gating_func", 1)  # 1 softmax (V2, the default when missing), 2 sigmoid (V3)
    v3 = gating == 2 or any(n.endswith("exp_probs_b.bias") for n in shapes)
    rope = m.int("rope.dimension_count")
    key = m.int("attention.key_length_mla", None) or m.int("attention.key_length")
    value = m.int("attention.value_length_mla", None) or m.int("attention.value_length")
    nextn = m.int("nextn_predict_layers", 0)
    groups = m.int("expert_group_count", 1)
    cfg.update(
        model_type="deepseek_v3" if v3 else "deepseek_v2",
        num_hidden_layers=cfg["num_hidden_layers"] - nextn, num_nextn_predict_layers=nextn,
        intermediate_size=m.int("feed_forward_length"), moe_intermediate_size=m.int("expert_feed_forward_length"),
        n_routed_experts=m.int("expert_count"), n_shared_experts=m.int("expert_shared_count", 0),
        first_k_dense_replace=m.int("leading_dense_block_count", 0),
        routed_scaling_factor=m.float("expert_weights_scale", 1.0),
        norm_topk_prob=bool(m.get("expert_weights_norm", False)),
        n_group=groups, topk_group=m.int("expert_group_used_count", groups),
        q_lora_rank=m.int("attention.q_lora_rank", 0) or None, kv_lora_rank=m.int("attention.kv_lora_rank"),
        qk_rope_head_dim=rope, qk_nope_head_dim=key - rope, v_head_dim=value,
        scoring_func="sigmoid" if gating == 2 else "softmax",
    )
    if v3:
        cfg["topk_method"] = "noaux_tc"
    else:
        cfg["topk_method"] = "group_limited_greedy" if groups > 1 else "greedy"
    _moe_common(cfg, m)


def _gpt_oss(cfg: dict, m: _Meta, shapes: dict) -> None:
    cfg.update(model_type="gpt_oss", num_local_experts=m.int("expert_count"),
               intermediate_size=m.int("expert_feed_forward_length"), attention_bias=True,
               sliding_window=m.int("attention.sliding_window", 128),
               # llama.cpp: every other layer is sliding-window, starting with layer 0 (as transformers)
               layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                            for i in range(cfg["num_hidden_layers"])])
    cfg.setdefault("head_dim", m.int("attention.key_length", cfg["hidden_size"] // cfg["num_attention_heads"]))
    if cfg.get("rope_scaling", {}).get("rope_type") == "yarn":
        # gpt-oss's reference YaRN does not round the correction range (transformers: truncate=False);
        # ggml's rope rounds it (floor / ceil): a difference of ~1e-3 in the logits, kept as the reference's.
        cfg["rope_scaling"]["truncate"] = False
    _moe_common(cfg, m)


_BUILDERS = {"llama": _llama, "qwen2moe": _qwen2moe, "qwen3moe": _qwen3moe, "deepseek2": _deepseek2,
             "gpt-oss": _gpt_oss}

# Architectures whose converter permutes q/k rows for llama.cpp's interleaved RoPE (undone on read).
PERMUTED_QK = frozenset({"llama"})


def cross_check(md: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str) -> list[str]:
    """Metadata against tensor shapes: expert count, expert FFN width, layers. -> notes (empty: agree)."""
    arch = md.get("general.architecture", "")
    notes = []
    experts = md.get(f"{arch}.expert_count")
    blocks = md.get(f"{arch}.block_count")
    for name, shape in shapes.items():
        m = _BLK.match(name)
        if m is None:
            continue
        layer, rest = int(m.group(1)), m.group(2)
        if isinstance(blocks, int) and layer >= blocks:
            notes.append(f"tensor {name} is past {arch}.block_count = {blocks}")
        if rest in ("ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"):
            if isinstance(experts, int) and shape[0] != experts:
                notes.append(f"{name} has {shape[0]} experts but {arch}.expert_count = {experts}")
        if rest == "ffn_gate_exps.weight":
            eff = md.get(f"{arch}.expert_feed_forward_length", md.get(f"{arch}.feed_forward_length"))
            if isinstance(eff, int) and shape[1] != eff:
                notes.append(f"{name}: expert FFN width {shape[1]} but the metadata says {eff}")
    return [f"GGUF metadata and tensors disagree: {n}" for n in notes[:5]]
