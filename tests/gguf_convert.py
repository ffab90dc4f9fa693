"""Test-only converter: a transformers model -> a GGUF file, written with the `gguf` package's
GGUFWriter and quantized with `gguf.quants`, following llama.cpp's convert_hf_to_gguf.py: names from
`gguf.TENSOR_NAMES`, experts stacked [E, F, D] (transformers 5's fused gate_up split in two;
gpt-oss's interleaved gate/up de-interleaved and transposed), q/k rows permuted for `llama`
(Mixtral), metadata through the writer's `add_*` methods. Not shipped: moetool never converts.

Tensors whose innermost dimension is not a whole number of blocks of the chosen type fall back to
F16 (llama.cpp does the same); 1-D tensors (norms, biases) and biases of any shape stay F32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import gguf
import numpy as np
from gguf import MODEL_TENSOR as T
from gguf import GGMLQuantizationType as Q

ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "deepseek_v3": "deepseek2",
        "deepseek_v2": "deepseek2", "gpt_oss": "gpt-oss"}


def _name(t: T, bid: Optional[int] = None, suffix: str = ".weight") -> str:
    return gguf.TENSOR_NAMES[t].format(bid=bid) + suffix


def permute(w: np.ndarray, n_head: int, n_head_kv: Optional[int]) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# transformers suffix (after model.layers.N.) -> GGUF tensor
_LAYER = {
    "input_layernorm.weight": (T.ATTN_NORM, ".weight"), "post_attention_layernorm.weight": (T.FFN_NORM, ".weight"),
    "self_attn.q_proj.weight": (T.ATTN_Q, ".weight"), "self_attn.q_proj.bias": (T.ATTN_Q, ".bias"),
    "self_attn.k_proj.weight": (T.ATTN_K, ".weight"), "self_attn.k_proj.bias": (T.ATTN_K, ".bias"),
    "self_attn.v_proj.weight": (T.ATTN_V, ".weight"), "self_attn.v_proj.bias": (T.ATTN_V, ".bias"),
    "self_attn.o_proj.weight": (T.ATTN_OUT, ".weight"), "self_attn.o_proj.bias": (T.ATTN_OUT, ".bias"),
    "self_attn.q_norm.weight": (T.ATTN_Q_NORM, ".weight"), "self_attn.k_norm.weight": (T.ATTN_K_NORM, ".weight"),
    "self_attn.sinks": (T.ATTN_SINKS, ".weight"),
    "self_attn.q_a_proj.weight": (T.ATTN_Q_A, ".weight"), "self_attn.q_a_layernorm.weight": (T.ATTN_Q_A_NORM, ".weight"),
    "self_attn.q_b_proj.weight": (T.ATTN_Q_B, ".weight"),
    "self_attn.kv_a_proj_with_mqa.weight": (T.ATTN_KV_A_MQA, ".weight"),
    "self_attn.kv_a_layernorm.weight": (T.ATTN_KV_A_NORM, ".weight"), "self_attn.kv_b_proj.weight": (T.ATTN_KV_B, ".weight"),
    "mlp.gate.weight": (T.FFN_GATE_INP, ".weight"), "mlp.router.weight": (T.FFN_GATE_INP, ".weight"),
    "mlp.router.bias": (T.FFN_GATE_INP, ".bias"), "mlp.gate.e_score_correction_bias": (T.FFN_EXP_PROBS_B, ".bias"),
    "mlp.shared_experts.gate_proj.weight": (T.FFN_GATE_SHEXP, ".weight"),
    "mlp.shared_experts.up_proj.weight": (T.FFN_UP_SHEXP, ".weight"),
    "mlp.shared_experts.down_proj.weight": (T.FFN_DOWN_SHEXP, ".weight"),
    "mlp.shared_expert.gate_proj.weight": (T.FFN_GATE_SHEXP, ".weight"),
    "mlp.shared_expert.up_proj.weight": (T.FFN_UP_SHEXP, ".weight"),
    "mlp.shared_expert.down_proj.weight": (T.FFN_DOWN_SHEXP, ".weight"),
    "mlp.shared_expert_gate.weight": (T.FFN_GATE_INP_SHEXP, ".weight"),
    "mlp.gate_proj.weight": (T.FFN_GATE, ".weight"), "mlp.up_proj.weight": (T.FFN_UP, ".weight"),
    "mlp.down_proj.weight": (T.FFN_DOWN, ".weight"),
}
_GLOBAL = {"model.embed_tokens.weight": _name(T.TOKEN_EMBD), "model.norm.weight": _name(T.OUTPUT_NORM),
           "lm_head.weight": _name(T.OUTPUT)}


def hf_to_gguf_tensors(model, cfg: dict, split_kv_b: bool = False, per_expert: bool = False) -> dict[str, np.ndarray]:
    """The model's state dict under GGUF names and layouts (float32 numpy arrays). `split_kv_b`:
    DeepSeek's kv_b_proj as attn_k_b (transposed) and attn_v_b, as newer convert_hf_to_gguf.py does."""
    mt = cfg["model_type"]
    arch = ARCH[mt]
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}
    for name, w in sd.items():
        if name in _GLOBAL:
            if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                continue
            out[_GLOBAL[name]] = w
            continue
        assert name.startswith("model.layers."), name
        bid_s, rest = name[len("model.layers."):].split(".", 1)
        bid = int(bid_s)
        if rest == "mlp.experts.gate_up_proj":
            if mt == "gpt_oss":  # [E, D, 2F], gate/up interleaved along 2F -> [E, F, D] each
                gate, up = w[:, :, 0::2].transpose(0, 2, 1), w[:, :, 1::2].transpose(0, 2, 1)
            else:  # [E, 2F, D]
                f = w.shape[1] // 2
                gate, up = w[:, :f], w[:, f:]
            out[_name(T.FFN_GATE_EXP, bid)] = np.ascontiguousarray(gate)
            out[_name(T.FFN_UP_EXP, bid)] = np.ascontiguousarray(up)
        elif rest == "self_attn.kv_b_proj.weight" and split_kv_b:
            h, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
            kv_b = w.reshape(h, nope + v, w.shape[-1])
            out[_name(T.ATTN_K_B, bid)] = np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))
            out[_name(T.ATTN_V_B, bid)] = np.ascontiguousarray(kv_b[:, nope:])
        elif rest == "mlp.experts.down_proj":
            out[_name(T.FFN_DOWN_EXP, bid)] = np.ascontiguousarray(w.transpose(0, 2, 1) if mt == "gpt_oss" else w)
        elif rest == "mlp.experts.gate_up_proj_bias":  # gpt-oss [E, 2F] interleaved
            out[_name(T.FFN_GATE_EXP, bid, ".bias")] = np.ascontiguousarray(w[:, 0::2])
            out[_name(T.FFN_UP_EXP, bid, ".bias")] = np.ascontiguousarray(w[:, 1::2])
        elif rest == "mlp.experts.down_proj_bias":
            out[_name(T.FFN_DOWN_EXP, bid, ".bias")] = w
        else:
            t, suffix = _LAYER[rest]
            if mt == "gpt_oss" and rest == "post_attention_layernorm.weight":
                t = T.ATTN_POST_NORM
            if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                heads = cfg["num_attention_heads"]
                w = permute(w, heads, heads if rest.startswith("self_attn.q") else cfg["num_key_value_heads"])
            out[_name(t, bid, suffix)] = w
    if per_expert:  # the layout of GGUFs made before llama.cpp stacked experts: blk.N.ffn_gate.E.weight
        for name in [n for n in out if "_exps.weight" in n]:
            stacked = out.pop(name)
            for e in range(stacked.shape[0]):
                out[name.replace("_exps.weight", f".{e}.weight")] = np.ascontiguousarray(stacked[e])
    return out


def write_gguf(path: str | Path, model, cfg: dict, qtype: Q = Q.F32, *, expert_qtype: Optional[Q] = None,
               tokenizer: Optional[dict] = None, split: int = 1, split_kv_b: bool = False,
               per_expert: bool = False) -> list[Path]:
    """Write `model` (transformers, config dict `cfg`) as GGUF: 2-D+ weights in `qtype` (experts in
    `expert_qtype` if given), norms and biases F32. `split` > 1 writes `-0000i-of-0000n` parts."""
    cfg = {**{k: v for k, v in model.config.to_dict().items() if v is not None}, **cfg}  # transformers' defaults
    rp = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
    if rp.get("rope_type", "default") != "default":
        cfg.setdefault("rope_scaling", rp)
    mt = cfg["model_type"]
    arch = ARCH[mt]
    tensors = hf_to_gguf_tensors(model, cfg, split_kv_b, per_expert)
    cfg = {**cfg, "_split_kv_b": split_kv_b}
    path = Path(path)
    names = list(tensors)
    parts = [names[i::split] for i in range(split)] if split > 1 else [names]
    files = []
    for i, part in enumerate(parts):
        p = path if split == 1 else path.with_name(f"{path.stem}-{i + 1:05d}-of-{split:05d}.gguf")
        w = gguf.GGUFWriter(str(p), arch)
        if i == 0:
            _metadata(w, cfg, arch, tokenizer)
            ft = "MOSTLY_MXFP4_MOE" if expert_qtype == Q.MXFP4 else {"F32": "ALL_F32"}.get(qtype.name, "MOSTLY_" + qtype.name)
            w.add_file_type(gguf.LlamaFileType[ft])
        if split > 1:
            w.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, i)
            w.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, split)
            w.add_int32(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, len(names))
        for name in part:
            arr = tensors[name]
            q = expert_qtype if (expert_qtype is not None and "_exps.weight" in name) else qtype
            _add(w, name, arr, q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        files.append(p)
    return files


def _add(w, name: str, arr: np.ndarray, q: Q) -> None:
    if arr.ndim == 1 or q == Q.F32 or not name.endswith(".weight"):  # llama-quantize: only *.weight
        w.add_tensor(name, arr.astype(np.float32))
        return
    block = gguf.GGML_QUANT_SIZES[q][0]
    if arr.shape[-1] % block:
        q = Q.F16
    if q == Q.F16:
        w.add_tensor(name, arr.astype(np.float16))
        return
    w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), q), raw_dtype=q)


def _metadata(w, cfg: dict, arch: str, tokenizer: Optional[dict]) -> None:
    mt = cfg["model_type"]
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    w.add_name("tiny-" + mt)
    w.add_block_count(cfg["num_hidden_layers"] + cfg.get("num_nextn_predict_layers", 0))
    w.add_context_length(cfg.get("max_position_embeddings", 256))
    w.add_embedding_length(d)
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads", heads))
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if mt == "mixtral":
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_expert_count(cfg["num_local_experts"])
        w.add_rope_dimension_count(d // heads)
    elif mt in ("qwen3_moe", "qwen2_moe"):
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("head_dim"):
            w.add_key_length(cfg["head_dim"])
            w.add_value_length(cfg["head_dim"])
        if mt == "qwen2_moe":
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    elif arch == "deepseek2":
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_count(cfg["n_routed_experts"])
        w.add_expert_shared_count(cfg["n_shared_experts"])
        w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
        w.add_expert_weights_scale(cfg.get("routed_scaling_factor", 1.0))
        w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", mt == "deepseek_v3")))
        if mt == "deepseek_v3":
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_group_count(cfg.get("n_group", 1))
        w.add_expert_group_used_count(cfg.get("topk_group", 1))
        if cfg.get("q_lora_rank"):
            w.add_q_lora_rank(cfg["q_lora_rank"])
        w.add_kv_lora_rank(cfg["kv_lora_rank"])
        if cfg.get("_split_kv_b"):  # llama.cpp's MLA (absorbed) form: MQA over the latent
            w.add_key_length(cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"])
            w.add_value_length(cfg["kv_lora_rank"])
            w.add_key_length_mla(cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
            w.add_value_length_mla(cfg["v_head_dim"])
        else:
            w.add_key_length(cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
            w.add_value_length(cfg["v_head_dim"])
        w.add_rope_dimension_count(cfg["qk_rope_head_dim"])
        if cfg.get("num_nextn_predict_layers"):
            w.add_nextn_predict_layers(cfg["num_nextn_predict_layers"])
        rs = cfg.get("rope_scaling") or {}
        if rs.get("rope_type", rs.get("type")) == "yarn":  # as convert_hf_to_gguf.py DeepseekV2Model
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rs["factor"])
            w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
            w.add_rope_scaling_yarn_log_mul(0.1 * rs["mscale_all_dim"])
    elif mt == "gpt_oss":
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_expert_count(cfg["num_local_experts"])
        w.add_expert_feed_forward_length(cfg["intermediate_size"])
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        w.add_sliding_window(cfg.get("sliding_window", 128))
        rs = cfg["rope_scaling"]
        assert rs["rope_type"] == "yarn"
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs["factor"])
        w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
    if tokenizer is not None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokenizer["tokens"])
        w.add_token_types(tokenizer["types"])
        w.add_token_merges(tokenizer["merges"])
        if tokenizer.get("bos") is not None:
            w.add_bos_token_id(tokenizer["bos"])


def tokenizer_arrays(tokenizer_json: str | Path) -> dict:
    """tokenizer.ggml.* arrays from a byte-level BPE tokenizer.json (as llama.cpp's gpt2 vocab does)."""
    import json

    tj = json.loads(Path(tokenizer_json).read_text())
    vocab = tj["model"]["vocab"]
    tokens = [None] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    types = [1] * len(tokens)
    for added in tj.get("added_tokens", []):
        if added["id"] < len(tokens):
            types[added["id"]] = 3 if added.get("special") else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges, "bos": None}


_CACHE: dict = {}


def tiny_gguf(tmp_path_factory, name: str, qtype: Q = Q.F32, expert_qtype: Optional[Q] = None, split: int = 1,
              config: Optional[dict] = None, tokenizer: bool = False):
    """(GGUF path, safetensors directory, transformers model, config) for a tiny model of the
    fakes table (or `config`), built once per session and per quantization."""
    from fakes import TINY_CONFIGS, build_transformers_model

    key = (name, qtype, expert_qtype, split, tokenizer)
    if key not in _CACHE:
        cfg = config or dict(TINY_CONFIGS)[name]
        mkey = ("model", name)
        if mkey not in _CACHE:
            model = build_transformers_model(cfg)
            d = tmp_path_factory.mktemp(f"st-{name}")
            model.save_pretrained(d)
            _CACHE[mkey] = (model, d)
        model, d = _CACHE[mkey]
        if tokenizer and not (d / "tokenizer.json").is_file():
            from conftest import write_tokenizer

            write_tokenizer(d, cfg["vocab_size"])
        out = tmp_path_factory.mktemp(f"gguf-{name}")
        tok = tokenizer_arrays(d / "tokenizer.json") if tokenizer and (d / "tokenizer.json").is_file() else None
        files = write_gguf(out / f"{name}-{qtype.name}.gguf", model, cfg, qtype, expert_qtype=expert_qtype,
                           tokenizer=tok, split=split)
        _CACHE[key] = (files[0], d, model, cfg)
    return _CACHE[key]


def _qdq(arr: np.ndarray, q: Q) -> np.ndarray:
    """What `_add` stores, read back through gguf.quants (the numpy reference)."""
    if arr.ndim == 1 or q == Q.F32:
        return arr.astype(np.float32)
    if arr.shape[-1] % gguf.GGML_QUANT_SIZES[q][0] or q == Q.F16:
        return arr.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(arr.astype(np.float32), q), q).reshape(arr.shape)


def dequantized_model(model, cfg: dict, qtype: Q, expert_qtype: Optional[Q] = None):
    """A copy of `model` whose weights are what `write_gguf(..., qtype, expert_qtype)` stores,
    dequantised by gguf.quants: the reference for the forward of a quantized GGUF. Blocks run along
    the GGUF layout's rows (for gpt-oss's transposed experts: along the other axis)."""
    import copy

    import torch

    out = copy.deepcopy(model)
    gpt_oss = cfg["model_type"] == "gpt_oss"
    eq = expert_qtype if expert_qtype is not None else qtype
    with torch.no_grad():
        for name, p in out.named_parameters():
            w = p.detach().float().numpy()
            if name.endswith("mlp.experts.gate_up_proj") and gpt_oss:  # [E, D, 2F] -> rows along D
                g = _qdq(np.ascontiguousarray(w[:, :, 0::2].transpose(0, 2, 1)), eq).transpose(0, 2, 1)
                u = _qdq(np.ascontiguousarray(w[:, :, 1::2].transpose(0, 2, 1)), eq).transpose(0, 2, 1)
                w = w.copy()
                w[:, :, 0::2], w[:, :, 1::2] = g, u
            elif name.endswith("mlp.experts.down_proj") and gpt_oss:  # [E, F, D] stored [E, D, F]
                w = _qdq(np.ascontiguousarray(w.transpose(0, 2, 1)), eq).transpose(0, 2, 1)
            elif name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                w = _qdq(w, eq)
            elif name.endswith("_bias") or name.endswith("sinks"):
                w = w.astype(np.float32)
            else:
                w = _qdq(w, qtype)
            p.copy_(torch.from_numpy(np.ascontiguousarray(w)))
    return out
