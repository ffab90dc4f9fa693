"""DeepSeek-V4's attention and hash routers (`deepseek_v4`; transformers' DeepseekV4ForCausalLM).

Attention on every layer: shared-KV multi-query attention of head_dim Dh (one KV head, read as both
key and value), as transformers' DeepseekV4Attention (eager path):

    q_res = RMSNorm(wq_a h)                     q = unweighted RMSNorm per head of (wq_b q_res)  [T, H, Dh]
    kv = RMSNorm(wkv h)  [T, 1, Dh]             RoPE (interleaved pairs) on the last R dims of q and kv
    keys = values = [the kv of the last `sliding_window` positions | compressed entries]
    o = softmax attention with a learnt sink per head (scale Dh^-0.5), then RoPE at -position on its
        last R dims; grouped output: o_a per group of heads (G groups: [Ro, H*Dh/G] each), then o_b.

Sliding layers ("sliding_attention") use the "main" RoPE (rope_theta); compressed layers the
"compress" one (compress_rope_theta, optionally YaRN) and add a compressor of the KV stream:
every `rate` tokens (a closed window) become one entry

    entry_w = RMSNorm(sum_j softmax_j(gate_j + ape_j) * kv_j)   (softmax per channel over the window),
    RoPE at position w * rate; a query at position p sees entries w < (p + 1) // rate.

"heavily_compressed_attention" (HCA): kv / gate of width Dh, windows of `rate` tokens, every visible
entry attended. "compressed_sparse_attention" (CSA): width 2*Dh, each entry mixes the first half of
the previous window with the second half of its own (2*rate slots); a lightning indexer (its own
CSA compressor of width Di, queries wq_b q_res [T, Hi, Di] with the compress RoPE) scores
sum_h w_h * relu(q_h . k) * Di^-0.5 (w = weights_proj h * Hi^-0.5) and the query attends only to its
top `index_topk` visible entries.

Hash layers ("hash_moe"): the router's scores weight experts chosen by a fixed token -> experts table
`tid2eid` [V, K]; they are recorded as the layer's router decisions like any other.

KV cache (forward/cache.py): the sliding kv of every token (the mask keeps the window) and the
compressors' projections of every token; each step compresses the closed windows again, so a cached
step equals the full forward. Indexer ties are ranked over rows of `Decoder.index_width` // rate
entries, as DeepSeek-V3.2's indexer does (forward/indexer.py).

Shapes: T tokens, S keys (cached + new), H heads, Dh head dim, R rotary dims, W windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_

from ..errors import BadCheckpoint, BadConfig, UnsupportedArchitecture
from ..spec import Cfg, ModelSpec
from .model import Segments, apply_rope, attention_mask, linear, rms_norm, sdpa

# Stored names: the original checkpoint's (as save_pretrained writes them back), then transformers' module names.
_NAMES = {
    "q_a": ("attn.wq_a.weight", "self_attn.q_a_proj.weight"), "q_norm": ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    "q_b": ("attn.wq_b.weight", "self_attn.q_b_proj.weight"), "kv": ("attn.wkv.weight", "self_attn.kv_proj.weight"),
    "kv_norm": ("attn.norm.weight", "self_attn.kv_norm.weight"), "sinks": ("attn.attn_sink", "self_attn.sinks"),
    "o_a": ("attn.wo_a.weight", "self_attn.o_a_proj.weight"), "o_b": ("attn.wo_b.weight", "self_attn.o_b_proj.weight"),
    "index_q": ("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"),
    "index_w": ("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
}


def _compressor_names(prefix: str, indexer: bool) -> dict:
    """kv, gate, ape, norm of the attention's compressor or (indexer) of the indexer's."""
    ours, theirs = ("attn.indexer.compressor.", "self_attn.compressor.indexer.") if indexer else \
        ("attn.compressor.", "self_attn.compressor.")
    return {"kv": (ours + "wkv.weight", theirs + "kv_proj.weight"), "gate": (ours + "wgate.weight", theirs + "gate_proj.weight"),
            "ape": (ours + "ape", theirs + "position_bias"), "norm": (ours + "norm.weight", theirs + "kv_norm.weight")}


def forward_config(spec: ModelSpec, cfg: Cfg):
    """DeepSeek-V4's ForwardConfig (forward/config.py): `deepseek_v4` (layer types, compression rates,
    the two RoPEs, output groups, indexer), hyper-connections, clamped SwiGLU in every FFN (routed and
    shared), one KV head."""
    from ..arch.deepseek_v4 import DEFAULT_RATES, _layer_types
    from .config import ForwardConfig, Rope, _check_rope
    from .hyper import HyperConfig
    from .model import ACTIVATIONS

    act = cfg.str("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise UnsupportedArchitecture(f"hidden_act {act!r} is not supported by the reference forward; "
                                      f"supported: {', '.join(sorted(ACTIVATIONS))}")
    hd, heads = cfg.int("head_dim", 512, min_value=1), cfg.int("num_attention_heads", min_value=1)
    fc = ForwardConfig(family="deepseek_v4", hidden=spec.hidden_size, vocab=spec.vocab_size, layers=spec.num_layers,
                       heads=heads, kv_heads=1, head_dim=hd, eps=cfg.float("rms_norm_eps", 1e-6), norm="rms",
                       rope=Rope(theta=10000.0, dim=hd), attn_scale=hd ** -0.5, use_rope=[True] * spec.num_layers,
                       max_positions=cfg.int("max_position_embeddings", None, min_value=1))
    n, hd = spec.num_layers, fc.head_dim
    rates = dict(DEFAULT_RATES)
    if isinstance(cfg.raw("compress_rates"), dict):
        rates.update(cfg.raw("compress_rates"))
    for key, legacy in (("compressed_sparse_attention", "compress_rate_csa"), ("heavily_compressed_attention", "compress_rate_hca")):
        if cfg.has(legacy):
            rates[key] = cfg.int(legacy, min_value=1)
    types = _layer_types(cfg, n)  # checked there
    prf = cfg.raw("partial_rotary_factor")
    prf = float(prf) if prf is not None else (cfg.int("qk_rope_head_dim") / hd if cfg.has("qk_rope_head_dim") else 64 / 512)
    rope_dim = int(hd * prf)
    params = cfg.raw("rope_parameters") or {}
    nested = isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict)
    main = params["main"] if nested else {"rope_type": "default", "rope_theta": cfg.float("rope_theta", 10000.0)}
    if nested:
        compress = params["compress"]
    else:  # DeepseekV4Config.__post_init__: a flat rope_parameters (YaRN) applies to the compressed layers
        compress = {**{k: v for k, v in params.items() if k not in ("main", "compress")},
                    "rope_theta": cfg.float("compress_rope_theta", 160000.0)}
        compress.setdefault("rope_type", "default")
        if compress["rope_type"] == "yarn":
            compress.setdefault("attention_factor", 1.0)
    ropes = {}
    for name, p in (("main", main), ("compress", compress)):
        kind = p.get("rope_type") or p.get("type") or "default"
        _check_rope(kind, p, cfg)
        dim = int(hd * float(p.get("partial_rotary_factor", prf)))
        if dim != rope_dim or dim % 2 or dim > hd:
            raise BadConfig(f"{cfg.where}: rope_parameters[{name!r}] rotates {dim} of head_dim {hd} dims, "
                            f"the model {rope_dim} (partial_rotary_factor)")
        ropes[name] = Rope(theta=float(p.get("rope_theta") or 10000.0), dim=dim, kind=kind, params=p,
                           layout="interleave", max_position_embeddings=fc.max_positions)
    fc.rope = ropes["main"]
    heads, groups = fc.heads, cfg.int("o_groups", 8, min_value=1)
    if heads % groups:
        raise BadConfig(f"{cfg.where}: num_attention_heads ({heads}) must be a multiple of o_groups ({groups})")
    index_dim = cfg.int("index_head_dim", 128, min_value=1)
    if "compressed_sparse_attention" in types and index_dim < rope_dim:
        raise BadConfig(f"{cfg.where}: index_head_dim ({index_dim}) is smaller than the rotary dims ({rope_dim})")
    fc.deepseek_v4 = dict(types=types, rates=rates, main=ropes["main"], compress=ropes["compress"], groups=groups,
                          window=cfg.int("sliding_window", 128, min_value=1),
                          index_heads=cfg.int("index_n_heads", 64, min_value=1), index_dim=index_dim,
                          index_topk=cfg.int("index_topk", 512, min_value=1))
    fc.windows = [fc.deepseek_v4["window"]] * n
    fc.expert_act, fc.swiglu_limit = "clamped_" + act, cfg.float("swiglu_limit", 10.0)
    scoring = cfg.str("scoring_func", "sqrtsoftplus")
    if scoring not in SCORES:
        raise UnsupportedArchitecture(f"DeepSeek-V4 scoring_func {scoring!r} is not supported; supported: "
                                      f"{', '.join(SCORES)}")
    fc.hyper = HyperConfig(streams=cfg.int("hc_mult", 4, min_value=1), norm_eps=fc.eps, eps=cfg.float("hc_eps", 1e-6),
                           post_scale=2.0, post_eps=0.0, sinkhorn_iters=cfg.int("hc_sinkhorn_iters", 20, min_value=1),
                           norm_first=True)
    return fc


# --- routers --------------------------------------------------------------------------------------

SCORES = {"sqrtsoftplus": lambda x: F_.softplus(x).sqrt(), "sigmoid": torch.sigmoid}


def route(logits: torch.Tensor, moe, bias):
    """Top-k router: scores = scoring_func(logits); top-k of scores + correction bias; the chosen
    scores renormalised (always), times routed_scaling_factor."""
    scores = SCORES[moe.router.scoring](logits)
    idx = torch.topk(scores + bias if bias is not None else scores, moe.top_k, dim=-1).indices
    return idx, _weights(scores, idx, moe), scores


def hash_route(dec, table: str, logits: torch.Tensor, moe):
    """Hash router: the experts of each token id from `tid2eid` [V, K], weighted by their scores."""
    ids = dec.token_ids.to(dec.device)
    tid2eid = dec.store.get(table, torch.float32, device=dec.device).round().long()
    if tid2eid.dim() != 2 or tid2eid.shape[1] != moe.top_k or int(ids.max()) >= tid2eid.shape[0]:
        raise BadCheckpoint(f"{table}: shape {list(tid2eid.shape)} is not [vocab_size, num_experts_per_tok = {moe.top_k}]")
    idx = tid2eid[ids]
    if idx.min() < 0 or idx.max() >= moe.num_experts:
        raise BadCheckpoint(f"{table}: expert ids must be in 0..{moe.num_experts - 1}")
    scores = SCORES[moe.router.scoring](logits)
    return idx, _weights(scores, idx, moe), scores


def _weights(scores: torch.Tensor, idx: torch.Tensor, moe) -> torch.Tensor:
    w = scores.gather(1, idx)
    return w / (w.sum(dim=-1, keepdim=True) + 1e-20) * moe.router.routed_scaling_factor


# --- attention ------------------------------------------------------------------------------------

def attention(dec, i: int, h: torch.Tensor, masks: dict) -> torch.Tensor:
    """Layer i's attention of h [T, D] -> [T, D]; a block of prompts (moetool profile, whose masks are
    `Segments`) runs prompt by prompt."""
    seg = masks.get((None, None))
    pos = dec._positions(h.shape[0], "cpu")
    if isinstance(seg, Segments):
        return torch.cat([_attention(dec, i, h[a:b], pos[a:b], 0, None) for a, b, _ in seg.parts])
    return _attention(dec, i, h, pos, dec.past, dec.cache.layer(i) if dec.cache is not None else None)


def _tables(rope, pos: torch.Tensor, device):
    inv, factor = rope.inv_freq_and_factor(int(pos.max()) + 1 if len(pos) else 1)
    freqs = pos[:, None].float() * inv[None, :]
    return (freqs.cos() * factor).to(device), (freqs.sin() * factor).to(device)


def _rope_tail(x: torch.Tensor, cos, sin) -> torch.Tensor:
    """x [T, h, d]: interleaved RoPE on its last 2 * cos.shape[-1] dims."""
    r = 2 * cos.shape[-1]
    return torch.cat((x[..., :-r], apply_rope(x[..., -r:], cos, sin, "interleave")), dim=-1)


def _attention(dec, i: int, h: torch.Tensor, pos: torch.Tensor, past: int, cache) -> torch.Tensor:
    fc, v4 = dec.fc, dec.fc.deepseek_v4
    W = lambda role: dec.w(dec.names.find(i, *_NAMES[role]))
    T, H, Dh, kind = h.shape[0], fc.heads, fc.head_dim, v4["types"][i]
    rope = v4["main"] if kind == "sliding_attention" else v4["compress"]
    cos, sin = _tables(rope, pos, h.device)
    q_res = rms_norm(linear(h, W("q_a")), W("q_norm"), fc.eps)
    q = _rope_tail(rms_norm(linear(q_res, W("q_b")).view(T, H, Dh), None, fc.eps), cos, sin)
    kv = _rope_tail(rms_norm(linear(h, W("kv")), W("kv_norm"), fc.eps).view(T, 1, Dh), cos, sin)
    mask = attention_mask(T, v4["window"], None, h.device, past=past)  # [T, S]
    if cache is not None:
        kv, = dec.cache.extend(i, kv=kv)
    if kind != "sliding_attention":
        entries, keep = _compressed(dec, i, h, q_res, pos, kind, cache)  # [W, Dh], [T, W]
        kv = torch.cat((kv, entries[:, None, :].to(kv.dtype)), dim=0)
        mask = torch.cat((mask, keep), dim=-1)
    out = sdpa(q, kv, kv, mask, fc.attn_scale, W("sinks"))  # [T, H, Dh]
    out = _rope_tail(out, cos, -sin)
    G = v4["groups"]
    wa = W("o_a")  # [G * Ro, H * Dh / G]
    grouped = torch.bmm(out.reshape(T, G, -1).transpose(0, 1), wa.view(G, -1, wa.shape[-1]).transpose(1, 2))  # [G, T, Ro]
    return linear(grouped.transpose(0, 1).reshape(T, -1), W("o_b"))


def _compressed(dec, i: int, h, q_res, pos: torch.Tensor, kind: str, cache):
    """The compressed entries [W, Dh] of layer i and which of them each query attends to [T, W]."""
    fc, v4 = dec.fc, dec.fc.deepseek_v4
    csa = kind == "compressed_sparse_attention"
    rate = v4["rates"][kind]
    entries = _compress(dec, i, h, _compressor_names("", False), fc.head_dim, rate, csa, cache, "compressor")
    n = entries.shape[0]
    threshold = (pos.to(h.device).long() + 1) // rate  # [T]: a query sees entries w < (p + 1) // rate
    visible = torch.arange(n, device=h.device)[None, :] < threshold[:, None]  # [T, W]
    if not csa:
        return entries, visible
    # the lightning indexer: its own compressor of width Di, top-k visible entries per query
    Hi, Di = v4["index_heads"], v4["index_dim"]
    keys = _compress(dec, i, h, _compressor_names("", True), Di, rate, True, cache, "indexer")
    cos, sin = _tables(v4["compress"], pos, h.device)
    q = _rope_tail(linear(q_res, dec.w(dec.names.find(i, *_NAMES["index_q"]))).view(h.shape[0], Hi, Di), cos, sin)
    scores = F_.relu(torch.matmul(q.float(), keys.float().t())) * Di ** -0.5  # [T, Hi, W]
    w = linear(h, dec.w(dec.names.find(i, *_NAMES["index_w"]))).float() * Hi ** -0.5  # [T, Hi]
    index = (scores * w.unsqueeze(-1)).sum(dim=1).masked_fill(~visible, float("-inf"))  # [T, W]
    width = dec.index_width // rate if dec.index_width else n  # generation: rows as long as the final sequence's
    if width > n:
        index = F_.pad(index, (0, width - n), value=float("-inf"))
    if index.shape[-1] == 0:
        return entries, visible
    chosen = index.topk(min(v4["index_topk"], index.shape[-1]), dim=-1).indices  # [T, k]
    keep = torch.zeros(index.shape, dtype=torch.bool, device=h.device).scatter(-1, chosen, True)[:, :n]
    return entries, keep & visible


def _compress(dec, i: int, h, names: dict, dim: int, rate: int, overlap: bool, cache, key: str) -> torch.Tensor:
    """One compressor: the closed windows of `rate` tokens -> entries [W, dim] (RMSNorm, compress RoPE at
    w * rate). `overlap` (CSA): projections of width 2 * dim, entry w over the first half of window
    w - 1 and the second half of window w. With a cache, the projections of the earlier tokens too."""
    fc = dec.fc
    W = lambda role: dec.w(dec.names.find(i, *names[role]))
    kv, gate = linear(h, W("kv")), linear(h, W("gate"))  # [T, dim or 2 dim]
    if cache is not None:
        kv, gate = dec.cache.extend(i, **{key + "_kv": kv, key + "_gate": gate})
    n = kv.shape[0] // rate
    if n == 0:
        return kv.new_zeros(0, dim)
    kv = kv[:n * rate].view(n, rate, -1)
    gate = gate[:n * rate].view(n, rate, -1) + W("ape")
    if overlap:
        kv2 = kv.new_zeros(n, 2 * rate, dim)
        gate2 = gate.new_full((n, 2 * rate, dim), float("-inf"))
        kv2[:, rate:], gate2[:, rate:] = kv[..., dim:], gate[..., dim:]
        kv2[1:, :rate], gate2[1:, :rate] = kv[:-1, :, :dim], gate[:-1, :, :dim]
        kv, gate = kv2, gate2
    entries = rms_norm((kv * gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)).sum(dim=1), W("norm"), fc.eps)
    cos, sin = _tables(fc.deepseek_v4["compress"], torch.arange(n) * rate, h.device)
    return _rope_tail(entries[:, None, :], cos, sin)[:, 0]
