"""A `ModelSpec` for a checkpoint whose model_type has no adapter, built from its safetensors
headers: every stored tensor becomes a `Param` (group by `moetool.names` classification, its
real shape), so the total and the per-group breakdown are exact whatever the family. E and k
come from the usual config keys (top level or `text_config`); E from the headers when the config
has none. What needs the architecture (per-layer mixers, KV cache, attention FLOPs) assumes a
standard attention decoder and says so in the notes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Optional

from ..header import TensorInfo
from ..names import classify_tuple
from ..spec import Cfg, LayerSpec, ModelSpec, MoESpec, Param

EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
                "n_experts", "num_moe_experts")
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "experts_per_token", "moe_top_k", "top_k",
              "moe_k", "num_selected_experts")
SHARED_KEYS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "shared_experts")
LAYERS_KEYS = ("num_hidden_layers", "num_layers", "n_layers", "n_layer", "num_decoder_layers")
HIDDEN_KEYS = ("hidden_size", "d_model", "n_embd", "dim")
_EXPERT_DIGITS = re.compile(r"(\.experts\.(?:expert_)?)(\d+)(\.)")


def _first(cfgs: list[Cfg], keys: Iterable[str]) -> Optional[int]:
    for c in cfgs:
        for k in keys:
            v = c.raw(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def spec_from_tensors(config: dict, tensors: Iterable[TensorInfo], where: str = "config.json") -> ModelSpec:
    cfg = Cfg(config, where)
    cfgs = [cfg] + [cfg.sub(k) for k in ("text_config", "language_config", "llm_config") if cfg.has(k)]
    model_type = str(cfg.raw("model_type"))
    tie = any(c.raw("tie_word_embeddings") is True for c in cfgs)
    n_layers = _first(cfgs, LAYERS_KEYS)
    tensors = list(tensors)
    if n_layers is None:  # no layer count in the config: every numbered block is a layer
        n_layers = 1 + max((classify_tuple(t.name, t.dtype, None, 0, tie, 4, False)[1] or 0 for t in tensors), default=0)

    # One Param per tensor; per-expert tensors of a layer fold into one Param with copies = E.
    params: dict[tuple, list] = {}
    layer_groups: dict[int, set] = defaultdict(set)
    max_expert = -1
    fused_experts = 0
    for t in tensors:
        group, layer, expert, _, kind, mult = classify_tuple(t.name, t.dtype, n_layers, 0, tie, 4, False)
        if kind != "param":
            continue
        shape = tuple(t.shape[:-1]) + ((t.shape[-1] * mult,) if t.shape else ())
        name = t.name
        if expert is not None:
            max_expert = max(max_expert, expert)
            name = _EXPERT_DIGITS.sub(r"\1*\3", name)
        elif group == "routed_experts" and len(shape) == 3:  # fused [E, out, in]
            fused_experts = max(fused_experts, shape[0])
        copies = 1
        if group == "routed_experts" and len(shape) == 3:
            copies, shape = shape[0], shape[1:]
        key = (name, shape)
        if key in params:
            params[key][1] += copies
        else:
            params[key] = [Param(name, group, shape, layer if group not in ("vision", "audio") else None, 1, matmul=len(shape) == 2), copies]
        if layer is not None and group != "mtp":
            layer_groups[layer].add(group)
    plist = [Param(p.name, p.group, p.shape, p.layer, copies, p.matmul) for p, copies in params.values()]

    notes = [f"model_type {model_type!r} is not specifically known to moetool: parameters counted from the "
             "safetensors headers alone (groups by tensor-name classification; E and k from config.json keys)"]
    E = _first(cfgs, EXPERTS_KEYS) or (max_expert + 1 if max_expert >= 0 else fused_experts) or None
    k = _first(cfgs, TOP_K_KEYS)
    moe = None
    if E:
        if k is None or k > E:
            notes.append("top-k not found in config.json: active parameters assume every routed expert is active "
                         "(an upper bound)")
            k = E
        ffn = _first(cfgs, ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size")) or 0
        moe = MoESpec(num_experts=E, top_k=k, expert_ffn=ffn, num_shared_experts=_first(cfgs, SHARED_KEYS) or 0)
    elif any("routed_experts" in g for g in layer_groups.values()):
        notes.append("routed expert tensors found but no number of experts: active parameters count them all")

    heads = _first(cfgs, ("num_attention_heads", "n_head", "num_heads"))
    d = _first(cfgs, HIDDEN_KEYS) or 0
    kv_heads = _first(cfgs, ("num_key_value_heads",)) or heads
    hd = _first(cfgs, ("head_dim",)) or ((d // heads) if heads and d else 0)
    if heads and hd:
        notes.append("KV cache and attention FLOPs assume standard attention (K and V of num_key_value_heads x head_dim "
                     "on every layer with attention tensors)")
    else:
        notes.append("KV cache and attention FLOPs not computed: config.json gives no attention shape")
    layers = []
    for i in range(n_layers):
        groups = layer_groups.get(i, set())
        attn = "attention" in groups and bool(heads and hd)
        mixer = "attention" if "attention" in groups or "ssm" not in groups else "mamba"
        layers.append(LayerSpec(index=i, mixer=mixer, moe="routed_experts" in groups,
                                kv_per_token=2 * kv_heads * hd if attn else 0,
                                attn_flops_per_ctx=2 * heads * 2 * hd if attn else 0))
    vocab = _first(cfgs, ("vocab_size",)) or 0
    return ModelSpec(model_type=model_type, family="generic", hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(plist), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=_first(cfgs, ("max_position_embeddings",)),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"),
                     quantization=cfg.raw("quantization_config") if isinstance(cfg.raw("quantization_config"), dict) else None,
                     notes=tuple(notes))

