"""Gemma 4's decoder layer (transformers' gemma4: Gemma4ForCausalLM, and the language model of
Gemma4ForConditionalGeneration on text-only input).

What differs from the Llama-like layer of forward/model.py:

- embeddings times sqrt(D) (cast to the weight dtype); with hidden_size_per_layer_input P > 0, per-layer
  inputs [T, L, P]: (RMSNorm_P(per_layer_model_projection(x0) / sqrt(D)) + embed_tokens_per_layer(ids) *
  sqrt(P)) / sqrt(2), and after each layer's FFN x += norm(per_layer_projection(act(per_layer_input_gate(x))
  * input_l));
- attention: QK RMSNorm per head (with weights), V RMSNorm per head (no weight), scale 1 (no 1/sqrt(Dh));
  sliding layers (window `sliding_window`) and full layers with their own head size / KV heads
  (`per_layer_config`); with `attention_k_eq_v` full layers have no v_proj (V is K's projection);
  the last `num_kv_shared_layers` layers compute no K/V: they read those of the last earlier layer of
  their type (transformers' `kv_sharing_modes`, "store" / "reuse");
- RoPE per layer type from `rope_parameters`: "default" over the head, or "proportional" (the full
  layers): the first partial_rotary_factor * Dh / 2 frequencies base^(-2j/Dh), the others 0 (not rotated),
  rotate-half pairs (j, j + Dh/2) over the whole head;
- the FFN: a dense GeGLU MLP and, with `enable_moe_block`, the MoE block beside it, read from the
  residual stream (the MLP's input before its norm): router = weightless RMSNorm * scale / sqrt(D),
  proj, softmax, top-k, renormalised, times per_expert_scale[expert]; experts on
  pre_feedforward_layernorm_2(x); both outputs normed (post_feedforward_layernorm_1 / _2), summed, then
  post_feedforward_layernorm;
- every layer's output times its stored `layer_scalar`; the final logits soft-capped
  (`final_logit_softcapping`).

RMSNorms are x * w (not Gemma 2/3's 1 + w). The multimodal model replaces its image / video / audio
placeholder token ids by the pad token before embedding (what Gemma4Model does without pixel or audio input).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import BadCheckpoint, BadConfig, MoetoolError, UnsupportedArchitecture
from ..spec import Cfg, ModelSpec
from .model import (Experts, LayerRoute, apply_rope, attention_mask, check_shape, linear, non_finite_router, norm,
                    rms_norm, sdpa, swiglu)


@dataclass
class Gemma4Settings:
    types: list[str]  # layer type per layer ("sliding_attention" / "full_attention")
    kv_heads: list[int]
    head_dims: list[int]
    k_eq_v: list[bool]  # no v_proj: V is K's projection (attention_k_eq_v, full layers)
    reuse: list[bool]  # reads the K/V of the last earlier layer of its type (num_kv_shared_layers)
    store: frozenset  # the layers whose K/V the reusing layers read
    inv_freq: dict = field(default_factory=dict)  # layer type -> [Dh / 2] inverse frequencies (0: not rotated)
    per_layer: int = 0  # P (hidden_size_per_layer_input)
    placeholders: frozenset = frozenset()  # multimodal: image / video / audio token ids, embedded as `pad`
    pad: int = 0


def _inv_freq(p: dict, t: str, head_dim: int) -> torch.Tensor:
    """transformers' compute_default_rope_parameters / _compute_proportional_rope_parameters for one
    layer type's rope_parameters entry."""
    kind = p.get("rope_type") or "default"
    theta = float(p.get("rope_theta") or 10000.0)
    if kind == "default":
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    if kind == "proportional":
        angles = int(float(p.get("partial_rotary_factor", 1.0)) * head_dim // 2)
        inv = 1.0 / (theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
        inv = torch.cat((inv, torch.zeros(head_dim // 2 - angles))) if head_dim // 2 > angles else inv
        return inv / float(p.get("factor", 1.0))
    raise UnsupportedArchitecture(f"config.json: Gemma 4 RoPE type {kind!r} (rope_parameters[{t!r}]) is not supported "
                                  "by the reference forward (default and proportional are)")


def configure(fc, spec: ModelSpec, cfg: Cfg, top: Cfg) -> None:
    """Fill `fc` (forward/config.py's ForwardConfig, built from the text config `cfg`) for Gemma 4;
    `top`: the whole config.json (the multimodal model's placeholder token ids)."""
    from ..arch import gemma4 as count

    if cfg.raw("use_bidirectional_attention") == "all":
        raise UnsupportedArchitecture("config.json: Gemma 4 with use_bidirectional_attention \"all\" (an encoder) is "
                                      "not supported by the reference forward")
    n = spec.num_layers
    types = count.layer_types(cfg, n)
    over = count.layer_overrides(cfg, types)
    heads = cfg.int("num_attention_heads", min_value=1)
    hd = cfg.int("head_dim", 256, min_value=1)
    kv = cfg.int("num_key_value_heads", heads, min_value=1)
    dims = [(Cfg(over.get(i, {}), cfg.where).int("num_key_value_heads", kv, min_value=1),
             Cfg(over.get(i, {}), cfg.where).int("head_dim", hd, min_value=1)) for i in range(n)]
    shared = cfg.int("num_kv_shared_layers", 0, min_value=0)
    first = n - shared
    reuse = [shared > 0 and i >= first for i in range(n)]
    store = set()
    for t in set(types[first:]) if shared else ():
        producers = [i for i in range(first) if types[i] == t]
        if not producers:
            raise BadConfig(f"config.json: num_kv_shared_layers: no earlier {t} layer computes the keys and values "
                            "the shared layers read")
        store.add(producers[-1])
    params = cfg.raw("rope_parameters") or {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}
    inv = {}
    for t in dict.fromkeys(types):
        p = params.get(t) if isinstance(params, dict) else None
        if not isinstance(p, dict):
            raise BadConfig(f"config.json: rope_parameters has no entry for the layer type {t!r}")
        inv[t] = _inv_freq(p, t, dims[types.index(t)][1])
    k_eq_v = cfg.bool("attention_k_eq_v", False)
    fc.gemma4 = Gemma4Settings(
        types=types, kv_heads=[d[0] for d in dims], head_dims=[d[1] for d in dims],
        k_eq_v=[k_eq_v and t != "sliding_attention" for t in types], reuse=reuse, store=frozenset(store),
        inv_freq=inv, per_layer=cfg.int("hidden_size_per_layer_input", 0, min_value=0),
        placeholders=frozenset(top.int(k) for k in ("image_token_id", "video_token_id", "audio_token_id")
                               if top is not cfg and top.raw(k) is not None),
        pad=cfg.int("pad_token_id", 0) if cfg.raw("pad_token_id") is not None else 0)
    fc.layer_dims = [(heads, k, d, d) for k, d in dims]
    fc.windows = count.layer_windows(cfg, types)
    fc.use_rope, fc.layer_rope = [True] * n, []
    fc.eps = cfg.float("rms_norm_eps", 1e-6)
    fc.attn_scale = 1.0
    fc.expert_act = cfg.str("hidden_activation", "gelu_pytorch_tanh")
    fc.final_softcap = float(cfg.raw("final_logit_softcapping") or 0.0)
    fc.embedding_multiplier = 1.0  # sqrt(D), cast to the weight dtype, in embed() below


def embed(dec, ids: list[int]) -> torch.Tensor:
    """The scaled token embeddings [T, D]; keeps the per-layer inputs [T, L, P] on `dec` for the layers
    and clears the K/V the shared layers read (a new forward)."""
    g = dec.fc.gemma4
    if g.placeholders:
        ids = [g.pad if t in g.placeholders else t for t in ids]
    x = dec.embed_rows(ids)
    x = x * torch.tensor(dec.fc.hidden ** 0.5, dtype=x.dtype)
    dec.gemma4_kv, dec.gemma4_inputs = {}, None
    if g.per_layer:
        root = dec.names.layers[: -len("layers.")]
        name = root + "embed_tokens_per_layer.weight"
        if name not in dec.store:
            raise BadCheckpoint(f"checkpoint has no {name!r} (hidden_size_per_layer_input is {g.per_layer})")
        L, P, T = dec.fc.layers, g.per_layer, len(ids)
        rows_stored = dec.store.tensors[name].shape[0]
        if any(not 0 <= i < rows_stored for i in ids):
            raise MoetoolError(f"token id out of range for the per-layer input embedding ({rows_stored} rows)")
        rows = {i: dec.store.get(name, dec.dtype, index=i, device=dec.device) for i in sorted(set(ids))}
        tokens = torch.stack([rows[i] for i in ids]) * torch.tensor(P ** 0.5, dtype=dec.dtype)
        check_shape(name, tokens, (T, L * P), "[vocab_size_per_layer_input, num_hidden_layers * "
                                              "hidden_size_per_layer_input]")
        proj = linear(x, dec.w(root + "per_layer_model_projection.weight")) * (dec.fc.hidden ** -0.5)
        proj = norm(proj.view(T, L, P), dec.w(root + "per_layer_projection_norm.weight"), None, dec.fc)
        dec.gemma4_inputs = (proj + tokens.view(T, L, P)) * (2.0 ** -0.5)
    return x


def layer(dec, i: int, x: torch.Tensor, masks: dict, routes: list, record: bool) -> torch.Tensor:
    fc, g = dec.fc, dec.fc.gemma4
    find = lambda *s, required=True: dec.names.find(i, *s, required=required)
    nrm = lambda name, t: norm(t, dec.w(find(name + ".weight")), None, fc)
    x = x + nrm("post_attention_layernorm", attention(dec, i, nrm("input_layernorm", x), masks))
    h = nrm("pre_feedforward_layernorm", x)
    if dec.ffn_hook:
        dec.ffn_hook(dec, i, h, None)
    f = dec.gated_mlp(f"{dec.names.layers}{i}.mlp.", h)
    if dec.spec.layers[i].moe:
        f = nrm("post_feedforward_layernorm_1", f) + nrm("post_feedforward_layernorm_2", moe(dec, i, x, routes, record))
    x = x + nrm("post_feedforward_layernorm", f)
    if g.per_layer:
        from .model import ACTIVATIONS

        gate = ACTIVATIONS[fc.expert_act](linear(x, dec.w(find("per_layer_input_gate.weight"))))
        y = linear(gate * dec.gemma4_inputs[:, i], dec.w(find("per_layer_projection.weight")))
        x = x + nrm("post_per_layer_input_norm", y)
    scalar = find("layer_scalar", required=False)
    return x * dec.w(scalar) if scalar else x


def attention(dec, i: int, h: torch.Tensor, masks: dict) -> torch.Tensor:
    fc, g = dec.fc, dec.fc.gemma4
    find = lambda *s, required=True: dec.names.find(i, *s, required=required)
    w = lambda name: dec.w(find(name, required=False))
    T, H, Hkv, Dh = h.shape[0], fc.heads, g.kv_heads[i], g.head_dims[i]
    pos = dec._positions(T, "cpu")  # this forward's positions (a KV cache's offset, a profile block's prompts)
    freqs = torch.outer(pos, g.inv_freq[g.types[i]])
    cos, sin = freqs.cos().to(dec.device), freqs.sin().to(dec.device)
    q = linear(h, dec.w(find("self_attn.q_proj.weight")), w("self_attn.q_proj.bias"))
    if q.shape[-1] != H * Dh:
        raise BadCheckpoint(f"layer {i}: q_proj gives {q.shape[-1]} features, config.json implies {H * Dh} "
                            "(num_attention_heads x this layer's head_dim)")
    q = apply_rope(rms_norm(q.view(T, H, Dh), dec.w(find("self_attn.q_norm.weight")), fc.eps), cos, sin, "half")
    if g.reuse[i]:  # the K/V of the last earlier layer of this type (already cached there)
        k, v = dec.gemma4_kv[g.types[i]]
    else:
        k = linear(h, dec.w(find("self_attn.k_proj.weight")), w("self_attn.k_proj.bias"))
        if g.k_eq_v[i]:
            v = k
        else:
            v = linear(h, dec.w(find("self_attn.v_proj.weight")), w("self_attn.v_proj.bias"))
        if k.shape[-1] != Hkv * Dh or v.shape[-1] != Hkv * Dh:
            raise BadCheckpoint(f"layer {i}: k/v_proj give {k.shape[-1]}/{v.shape[-1]} features, config.json implies "
                                f"{Hkv * Dh} (this layer's key-value heads x head_dim)")
        k = apply_rope(rms_norm(k.view(T, Hkv, Dh), dec.w(find("self_attn.k_norm.weight")), fc.eps), cos, sin, "half")
        v = rms_norm(v.view(T, Hkv, Dh), None, fc.eps)
        if dec.cache is not None:  # keys and values of the earlier tokens
            k, v = dec.cache.extend(i, k=k, v=v)
        if i in g.store:
            dec.gemma4_kv[g.types[i]] = (k, v)
    key = (fc.windows[i], None)
    if key not in masks:
        masks[key] = attention_mask(T, fc.windows[i], None, q.device, past=dec.past)
    out = sdpa(q, k, v, masks[key], fc.attn_scale).reshape(T, H * Dh)
    return linear(out, dec.w(find("self_attn.o_proj.weight")), w("self_attn.o_proj.bias"))


def route(logits: torch.Tensor, k: int, per_expert_scale: torch.Tensor):
    """Router logits [T, E] (fp32) -> (experts [T, K] best first, weights [T, K], softmax scores [T, E])."""
    probs = torch.softmax(logits, dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    return idx, top * per_expert_scale[idx], probs


def moe(dec, i: int, x: torch.Tensor, routes: list, record: bool) -> torch.Tensor:
    """The MoE block on the residual stream x [T, D] (the dense MLP's input before its norm)."""
    fc, spec = dec.fc, dec.spec.moe
    find = lambda *s, required=True: dec.names.find(i, *s, required=required)
    E, D = spec.num_experts, x.shape[1]
    rw = find("router.proj.weight")
    router_w = dec.store.get(rw, dec.router_dtype, device=dec.device)
    check_shape(rw, router_w, (E, D), "[num_experts, hidden_size]")
    scale = dec.store.get(find("router.scale"), dec.router_dtype, device=dec.device)
    per_expert = dec.store.get(find("router.per_expert_scale"), torch.float32, device=dec.device).reshape(-1)
    hr = rms_norm(x, None, fc.eps).to(dec.router_dtype) * scale * (D ** -0.5)
    logits = linear(hr, router_w).float()  # [T, E]
    if not torch.isfinite(logits).all():
        raise BadCheckpoint(non_finite_router(i, x, rw, router_w, None))
    idx, weights, probs = route(logits, spec.top_k, per_expert)
    if dec.route_hook is not None:
        idx, weights = dec.route_hook(i, idx, weights)
    if record:
        routes.append(LayerRoute(i, idx.cpu(), weights.float().cpu(), logits.cpu(), probs.float().cpu()))
    h = norm(x, dec.w(find("pre_feedforward_layernorm_2.weight")), None, fc)
    if dec.ffn_hook:
        dec.ffn_hook(dec, i, h, (idx, weights))
    experts = Experts(dec.store, dec.names, i, fc.family, spec.expert_ffn, dec.dtype, dec.device)
    out = torch.zeros_like(h)
    for e in torch.unique(idx).tolist():  # each chosen expert once, on all its tokens
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        gate, up, down, gb, ub, db = experts.load(e)
        y = swiglu(h.index_select(0, tok), gate, up, down, gb, ub, db, fc.expert_act)
        if getattr(dec, "expert_hook", None):  # profile: ||expert output|| per routed (token, slot) t*K+s (REAP)
            dec.expert_hook(i, e, tok * idx.shape[1] + slot, y)
        out.index_add_(0, tok, y * weights[tok, slot][:, None].to(y.dtype))
        del gate, up, down
        dec.store.release()
    return out
