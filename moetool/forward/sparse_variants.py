"""DeepSeek Sparse Attention variants whose attention is more than data on the MLA path
(forward/model.py `Decoder.mla`): Mistral-Large-4 (`mistral_large4`, transformers'
MistralLarge4TextAttention) and dots3 (`dots3_note_text` / `dots3_note`, Dots3NoteTextAttention).
Both use the DeepSeek-V3.2 indexer (forward/indexer.py) as data (`fc.indexer`: heads, dim, top-k,
the RoPE layout; Mistral-Large-4 adds GLM-5's "shared" layers that reuse the keys the previous full
layer kept). `configure` sets a variant up from config.json; `attention` runs one layer.

Mistral-Large-4, per layer i (T tokens, H heads, D hidden):

    q = q_proj(h) [T, H, nope + rope]                      (no query LoRA)
    latent, k_rot = kv_a_proj_with_mqa(h) -> RMSNorm(latent) [T, Rkv], k_rot [T, rope]
        or, on a KV-sharing layer (kv_source_layers[i] = j < i), layer j's latent and rotated k_rot
    LeRoPE: RoPE (interleaved pairs, YaRN by default) with inverse frequencies times exp(alpha),
        alpha the learned buffer `rotary_emb.alpha` [rope / 2] (zeros when not stored)
    NoPE layers (no_rope_layers[i] = 0): the rope dims join the no-rope part, nothing is rotated
    q = q * (scale[h] * log(position + 1) + bias[h])       (softmax_scaling, after RoPE)
    k, v = kv_b_proj(latent) per head, k = [k_nope | k_rot]
    keep = the indexer's top-k keys: its query from LayerNorm(h) (q_input_norm) through wq_b, times
        its own softmax scaling, before RoPE (none on NoPE layers); "shared" layers reuse the keys
        the previous full layer kept
    out = o_proj(softmax(q k^T * (nope + rope)^-0.5 over kept keys) v)

A KV-sharing layer reads its source's latent from this forward (`Decoder._kv_shared`, filled by
the source layer, which runs first); with a KV cache every layer keeps its own decompressed keys
and values, so sharing needs nothing more there. Final logits are soft-capped (30 by default).

dots3, per layer i (its own MLA sizes: per_layer_config, e.g. the sliding layers'):

    q_resid = RMSNorm(q_a_proj(h)) * sqrt(D / q_lora_rank);  q = q_b_proj(q_resid) [T, H, nope + rope]
    latent = RMSNorm(kv latent) * sqrt(D / kv_lora_rank);     k_rot = RMSNorm(k_rot) (k_rope_only_layernorm)
    RoPE (interleaved pairs) of the layer type: rope_parameters per type ("indexed_attention",
        "sliding_attention", "full_attention"), over the type's qk_rope_head_dim
    keep = the causal keys, within `sliding_window` on sliding layers, the indexer's top-k (its query
        from q_resid) on indexed layers
    out = o_proj(attention(q, k, v) * sigmoid(g_proj(h)) per head)
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F_

from ..errors import BadConfig
from ..spec import Cfg, ModelSpec
from .indexer import kpool_keep, sparse_attention_keep

FAMILIES = ("mistral_large4", "dots3")


def configure(fc, spec: ModelSpec, cfg: Cfg) -> None:
    """The variant's settings on top of the MLA ones forward/config.py set (fc.mla, fc.rope,
    fc.attn_scale): `fc.sparse_variant` and the DeepSeek-V3.2 indexer as data (`fc.indexer`)."""
    from ..arch.deepseek import _indexer_types

    n = spec.num_layers
    if fc.family == "mistral_large4":
        use_rope = _per_layer(cfg, "no_rope_layers", n) or [
            int((i + 1) % cfg.int("no_rope_layer_interval", 4, min_value=1) != 0) for i in range(n)]
        sources = [int(s) for s in (_per_layer(cfg, "kv_source_layers", n) or range(n))]
        for i, j in enumerate(sources):
            if not 0 <= j <= i or sources[j] != j:
                raise BadConfig(f"{cfg.where}: kv_source_layers[{i}] = {j}: a layer shares the latent KV of an "
                                "earlier (or its own) layer that owns its cache")
            # transformers keeps one shared latent per RoPE kind ("rope" / "nope"), stored by the layers that
            # others read: a layer reads the last such layer of its kind, which must be its source
            producers = [p for p in range(i) if p in sources[p + 1:] and bool(use_rope[p]) == bool(use_rope[i])]
            if j != i and (not producers or producers[-1] != j):
                raise BadConfig(f"{cfg.where}: kv_source_layers[{i}] = {j}: transformers gives layer {i} the "
                                "latent KV of the last sharing layer of its own RoPE kind; this schedule differs")
        fc.use_rope = [bool(u) for u in use_rope]
        types = _indexer_types(cfg, n)
        if len(types) < n or types[0] != "full":
            raise BadConfig(f"{cfg.where}: indexer_types must give all {n} layers, the first \"full\" (a "
                            "\"shared\" layer reuses the previous full layer's top-k)")
        fc.indexer = dict(heads=cfg.int("index_n_heads", 32), dim=cfg.int("index_head_dim", 128),
                          topk=cfg.int("index_topk", 2048), layout="interleave",
                          shared=frozenset(i for i, t in enumerate(types[:n]) if t != "full"))
        fc.final_softcap = cfg.float("final_logit_softcapping", 30.0) or 0.0
        fc.sparse_variant = dict(kind="mistral_large4", kv_source=sources, eps=fc.eps)
    elif fc.family == "dots3":
        _configure_dots3(fc, spec, cfg)


def _configure_dots3(fc, spec: ModelSpec, cfg: Cfg) -> None:
    """dots3: each layer's MLA sizes (per_layer_config, as arch/dots3.py reads them), RoPE per layer
    type (theta, and the rotary width of the type's first layer), the indexer on "indexed_attention"
    layers only, sliding windows from the count spec."""
    from ..arch import dots3
    from .config import Rope, _check_rope

    n = spec.num_layers
    types = dots3._layer_types(cfg, n)
    overrides = dots3._layer_overrides(cfg, types)
    fc.eps = cfg.float("rms_norm_eps", 1e-5)
    dims = []
    for i in range(n):
        lc = Cfg({**cfg.d, **overrides.get(i, {})}, cfg.where)
        dims.append(dict(heads=lc.int("num_attention_heads", min_value=1), q_lora=lc.int("q_lora_rank", min_value=1),
                         kv_lora=lc.int("kv_lora_rank", min_value=1), nope=lc.int("qk_nope_head_dim", min_value=0),
                         rope=lc.int("qk_rope_head_dim", min_value=0), v=lc.int("v_head_dim", min_value=1),
                         head_dim=lc.int("head_dim", min_value=1)))
    params = cfg.raw("rope_parameters") or cfg.raw("rope_scaling")
    nested = isinstance(params, dict) and any(isinstance(v, dict) for v in params.values())
    ropes = {}
    for t in dict.fromkeys(types):
        first = dims[types.index(t)]
        if nested:
            if not isinstance(params.get(t), dict):
                raise BadConfig(f"{cfg.where}: rope_parameters has no entry for the layer type {t!r}")
            p = dict(params[t])
        elif isinstance(params, dict):
            p = dict(params)
        else:
            p = {"rope_type": "default", "rope_theta": cfg.float("swa_rope_theta", 50000.0) if t == "sliding_attention"
                 else cfg.float("rope_theta", 80_000_000.0)}
        kind = p.get("rope_type") or "default"
        _check_rope(kind, p, cfg)
        # Dots3NoteTextConfig always sets the type's rotary fraction from its first layer's sizes
        prf = first["rope"] / first["head_dim"]
        ropes[t] = Rope(theta=float(p.get("rope_theta") or 10000.0), dim=int(first["head_dim"] * prf), kind=kind,
                        params=p, layout="interleave", max_position_embeddings=fc.max_positions)
    for i, t in enumerate(types):
        if ropes[t].dim != dims[i]["rope"]:
            raise BadConfig(f"{cfg.where}: layer {i} has qk_rope_head_dim {dims[i]['rope']}, but its layer type "
                            f"{t!r} rotates {ropes[t].dim} dimensions (the first such layer's)")
    fc.rope = ropes[types[0]]
    fc.layer_rope = [ropes[t] for t in types]
    fc.use_rope = [True] * n
    indexed = [i for i, t in enumerate(types) if t == "indexed_attention"]
    if indexed:
        fc.indexer = dict(heads=cfg.int("index_n_heads", 64), dim=cfg.int("index_head_dim", 128),
                          topk=cfg.int("index_topk", 2048), layout="interleave", layers=frozenset(indexed),
                          shared=frozenset())
    fc.sparse_variant = dict(kind="dots3", dims=dims)


def _per_layer(cfg: Cfg, key: str, n: int) -> Optional[list]:
    values = cfg.raw(key)
    if values is None:
        return None
    if not isinstance(values, list) or len(values) < n:
        raise BadConfig(f"{cfg.where}: {key} must be a list with one entry per layer ({n})")
    return values[:n]


def attention(dec, i: int, h: torch.Tensor, cos, sin, masks) -> torch.Tensor:
    """The attention of layer i for the variant `dec.fc.sparse_variant` (h [T, D] normed input)."""
    if dec.fc.sparse_variant["kind"] == "dots3":
        return _dots3(dec, i, h, cos, sin, masks)
    return _mistral_large4(dec, i, h, masks)


def _lerope(dec, T: int):
    """cos, sin [T, rope / 2] of Mistral-Large-4's LeRoPE: the model's RoPE frequencies times
    exp(alpha), at this forward's positions (a KV cache's offset, a profile block's per-prompt
    positions), in float32 as transformers' rotary embedding."""
    inv, factor = dec.fc.rope.inv_freq_and_factor(T + getattr(dec, "past", 0))
    alpha_name = dec.names.layers[: -len("layers.")] + "rotary_emb.alpha"
    if alpha_name in dec.store:
        inv = inv * dec.store.get(alpha_name, torch.float32).exp()
    freqs = torch.outer(dec._positions(T, "cpu"), inv)
    return (freqs.cos() * factor).to(dec.device), (freqs.sin() * factor).to(dec.device)


def _position_scale(dec, name: str, T: int, device) -> torch.Tensor:
    """MistralLarge4TextSoftmaxScaling: scale * log(position + 1) + bias, [T, heads]."""
    w = lambda s: dec.store.get(name + s, dec.dtype, device=device)
    log_pos = torch.log(dec._positions(T, device) + 1).to(dec.dtype)
    return w("scale")[None, :] * log_pos[:, None] + w("bias")[None, :]


def _mistral_large4(dec, i: int, h: torch.Tensor, masks) -> torch.Tensor:
    from .model import apply_rope, attention_mask, linear, rms_norm, sdpa

    fc, m, var = dec.fc, dec.fc.mla, dec.fc.sparse_variant
    find = lambda *s, required=True: dec.names.find(i, *s, required=required)
    T, H = h.shape[0], fc.heads
    use_rope = fc.use_rope[i]
    r = m["rope"] if use_rope else 0
    nope, v_dim, kvr = m["nope"] + m["rope"] - r, m["v"], m["kv_lora"]
    cos, sin = _lerope(dec, T) if use_rope or fc.indexer else (None, None)
    q = linear(h, dec.w(find("self_attn.q_proj.weight"))).view(T, H, nope + r)
    src = var["kv_source"][i]
    if i == 0:
        dec._kv_shared = {}
    if src == i:
        kv = linear(h, dec.w(find("self_attn.kv_a_proj_with_mqa.weight")),
                    dec.w(find("self_attn.kv_a_proj_with_mqa.bias", required=False)))  # [T, Rkv + r]
        latent, k_rot = kv.split([kvr, r], dim=-1)
        latent = rms_norm(latent, dec.w(find("self_attn.kv_a_layernorm.weight")), var["eps"])
        k_rot = k_rot.reshape(T, 1, r)
        if use_rope:
            k_rot = apply_rope(k_rot, cos, sin, "interleave")
        if src in var["kv_source"][i + 1:]:
            dec._kv_shared[i] = (latent, k_rot)
    else:
        latent, k_rot = dec._kv_shared[src]
    if use_rope:
        q = torch.cat((q[..., :nope], apply_rope(q[..., nope:], cos, sin, "interleave")), dim=-1)
    q = q * _position_scale(dec, dec.names.find(i, "self_attn.softmax_scaling.scale")[: -len("scale")], T,
                            q.device)[:, :, None]
    k_nope, v = linear(latent, dec.w(find("self_attn.kv_b_proj.weight"))).view(T, H, nope + v_dim).split(
        [nope, v_dim], dim=-1)
    k = torch.cat((k_nope, k_rot.expand(T, H, r)), dim=-1)
    if (None, None) not in masks:
        masks[(None, None)] = attention_mask(T, None, None, q.device, past=dec.past)
    mask = masks[(None, None)]
    if dec.cache is not None:  # this layer's decompressed keys and values of the earlier tokens
        k, v = dec.cache.extend(i, k=k, v=v)
    mask = index_keep(dec, i, h, cos, sin, mask, use_rope)
    out = sdpa(q, k, v, mask, fc.attn_scale).reshape(T, H * v_dim)
    return linear(out, dec.w(find("self_attn.o_proj.weight")), dec.w(find("self_attn.o_proj.bias", required=False)))


def index_keep(dec, i: int, h, cos, sin, mask, use_rope: bool = True, q_resid=None):
    """The keys layer i attends to: its indexer's top-k within `mask`, or on a "shared" layer the
    keys the previous full layer kept. The indexer's query input is `q_resid` (the layer's query
    latent: DeepSeek-V3.2, GLM-5, A.X-K2 from Decoder.mla; dots3 scaled) or, for Mistral-Large-4,
    LayerNorm(h) (q_input_norm) with its learned softmax scaling. A profile block (`model.Segments`: many prompts) runs the indexer per prompt,
    each with its own positions and mask."""
    from .model import Segments

    ix, prefix = dec.fc.indexer, "self_attn.indexer."
    if i in ix.get("shared", ()):
        return dec._index_keep
    get = lambda name, dtype: dec.store.get(dec.names.find(i, name), dtype, device=dec.device)
    scale = None
    if q_resid is None:  # Mistral-Large-4
        q_resid = F_.layer_norm(h, (h.shape[-1],), get(prefix + "q_input_norm.weight", dec.dtype),
                                get(prefix + "q_input_norm.bias", dec.dtype), 1e-6)  # [T, D]
        scale = _position_scale(dec, dec.names.find(i, prefix + "softmax_scaling.scale")[: -len("scale")],
                                h.shape[0], h.device)  # [T, Hi]
    rope_dim = cos.shape[-1] * 2 if cos is not None else 0

    def index(a: int, b: int, causal):
        if ix.get("kpool"):  # GLM-5.3-Flash: pools of keys (forward/indexer.py kpool_keep)
            return kpool_keep(get, prefix, h[a:b], q_resid[a:b], causal, ix["heads"], ix["dim"], ix["topk"], ix["kpool"],
                              ix["tail"], cache=dec.cache.layer(i) if dec.cache is not None else None, width=dec.index_width)
        return sparse_attention_keep(get, prefix, h[a:b], q_resid[a:b], cos[a:b] if cos is not None else None,
                                     sin[a:b] if sin is not None else None, causal, ix["heads"], ix["dim"], ix["topk"],
                                     rope_dim, _apply_rope(),
                                     cache=dec.cache.layer(i) if dec.cache is not None else None,
                                     width=dec.index_width, layout=ix["layout"],
                                     q_scale=scale[a:b] if scale is not None else None, rope=use_rope,
                                     **{k: ix[k] for k in ("rope_tail", "eps", "scale_weights") if k in ix})  # HY-V4

    if isinstance(mask, Segments):
        keep = Segments([(a, b, index(a, b, m)) for a, b, m in mask.parts])
    else:
        keep = index(0, h.shape[0], mask)
    dec._index_keep = keep  # layers run in order within one forward
    return keep


def _dots3(dec, i: int, h: torch.Tensor, cos, sin, masks) -> torch.Tensor:
    """dots3's MLA (Dots3NoteTextAttention): the layer's own sizes; the query and KV latents times
    sqrt(D / rank) after their norms; an RMSNorm on the RoPE key; interleaved RoPE of the layer
    type; a sliding window or the indexer; a per-head sigmoid gate (g_proj [H, D]) on the output."""
    from .model import apply_rope, attention_mask, linear, rms_norm, sdpa

    fc, dm = dec.fc, dec.fc.sparse_variant["dims"][i]
    find = lambda *s, required=True: dec.names.find(i, *s, required=required)
    bias = lambda name: dec.w(find(name, required=False))
    T, D, eps = h.shape[0], h.shape[1], fc.eps
    H, nope, r, v_dim, kvr, qr = dm["heads"], dm["nope"], dm["rope"], dm["v"], dm["kv_lora"], dm["q_lora"]
    q_resid = rms_norm(linear(h, dec.w(find("self_attn.q_a_proj.weight")), bias("self_attn.q_a_proj.bias")),
                       dec.w(find("self_attn.q_a_layernorm.weight")), eps) * (D / qr) ** 0.5  # [T, Rq]
    q = linear(q_resid, dec.w(find("self_attn.q_b_proj.weight"))).view(T, H, nope + r)
    kv = linear(h, dec.w(find("self_attn.kv_a_proj_with_mqa.weight")), bias("self_attn.kv_a_proj_with_mqa.bias"))
    latent, k_rot = kv.split([kvr, r], dim=-1)
    latent = rms_norm(latent, dec.w(find("self_attn.kv_a_layernorm.weight")), eps) * (D / kvr) ** 0.5
    k_rot = rms_norm(k_rot, dec.w(find("self_attn.k_rope_only_layernorm.weight")), eps).reshape(T, 1, r)
    _, cos, sin = dec.layer_rope(i, T, cos, sin)
    q = torch.cat((q[..., :nope], apply_rope(q[..., nope:], cos, sin, "interleave")), dim=-1)
    k_rot = apply_rope(k_rot, cos, sin, "interleave")
    k_nope, v = linear(latent, dec.w(find("self_attn.kv_b_proj.weight"))).view(T, H, nope + v_dim).split(
        [nope, v_dim], dim=-1)
    k = torch.cat((k_nope, k_rot.expand(T, H, r)), dim=-1)
    key = (fc.windows[i], None)
    if key not in masks:
        masks[key] = attention_mask(T, key[0], None, q.device, past=dec.past)
    mask = masks[key]
    if dec.cache is not None:  # this layer's decompressed keys and values of the earlier tokens
        k, v = dec.cache.extend(i, k=k, v=v)
    if fc.indexer and i in fc.indexer["layers"]:
        mask = index_keep(dec, i, h, cos, sin, mask, q_resid=q_resid)
    out = sdpa(q, k, v, mask, (nope + r) ** -0.5)  # [T, H, v]
    gate = torch.sigmoid(linear(h, dec.w(find("self_attn.g_proj.weight"))))  # [T, H]
    out = (out * gate[:, :, None]).reshape(T, H * v_dim)
    return linear(out, dec.w(find("self_attn.o_proj.weight")), bias("self_attn.o_proj.bias"))


def _apply_rope():
    from .model import apply_rope

    return apply_rope


# Mistral-Large-4 as published: Mistral's own tensor names, which transformers renames on load
# (conversion_mapping.py "mistral_large4" + "mistral_large4_text"); experts stay one tensor each.
_MISTRAL_NAMES = [(re.compile(a), b) for a, b in (
    (r"^tok_embeddings\.", "model.language_model.embed_tokens."),
    (r"^lerope\.alpha$", "model.language_model.rotary_emb.alpha"),
    (r"^norm\.", "model.language_model.norm."),
    (r"^output\.", "lm_head."),
    (r"^layers\.(\d+)\.", r"model.language_model.layers.\1."),
    (r"\.attention\.", ".self_attn."),
    (r"\.wq\.", ".q_proj."), (r"\.wkv_a_with_mqa\.", ".kv_a_proj_with_mqa."), (r"\.wkv_b\.", ".kv_b_proj."),
    (r"\.wo\.", ".o_proj."),
    (r"\.attention_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.kv_a_norm\.", ".kv_a_layernorm."),
    (r"\.ssmax_scaling\.s$", ".softmax_scaling.scale"), (r"\.ssmax_scaling\.b$", ".softmax_scaling.bias"),
    (r"\.(feed_forward|shared_experts|experts\.\d+)\.w1\.", r".\1.gate_proj."),
    (r"\.(feed_forward|shared_experts|experts\.\d+)\.w2\.", r".\1.down_proj."),
    (r"\.(feed_forward|shared_experts|experts\.\d+)\.w3\.", r".\1.up_proj."),
    (r"(layers\.\d+)\.feed_forward\.", r"\1.mlp."), (r"(layers\.\d+)\.gate\.", r"\1.mlp.gate."),
    (r"(layers\.\d+)\.(experts|shared_experts)\.", r"\1.mlp.\2."))]


def runtime_names(config: dict, tensors: dict) -> dict:
    """The checkpoint's tensor table under transformers' names: a Mistral-Large-4 checkpoint in
    Mistral's published layout (`tok_embeddings.weight`, `layers.N.attention.wq.weight`, ...) is
    renamed as transformers renames it on load; every other table is returned as it is."""
    if config.get("model_type") != "mistral_large4" or "tok_embeddings.weight" not in tensors:
        return tensors
    out = {}
    for name, info in tensors.items():
        if not name.startswith(("vision_encoder.", "vision_language_adapter.", "patch_merger.",
                                "pre_mm_projector_norm.")):
            for pattern, repl in _MISTRAL_NAMES:
                name = pattern.sub(repl, name)
        out[name] = info
    return out
