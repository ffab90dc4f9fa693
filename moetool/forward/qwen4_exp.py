"""Qwen4-Exp's decoder layer (qwen4_exp_text; the image-text qwen4_exp runs its language model):
the residual is `hc` streams of D ([T, hc*D]), mixed into each block's input by gated residuals
(hyper-connections); Per-Layer Embedding (PLE) adds hashed n-gram features on its layers; indexed
layers attend only to the tokens the QSA indexer keeps. The token mixers (Gated DeltaNet, gated
attention), the MoE block and its router are the Decoder's own (forward/model.py).

Per layer (transformers' Qwen4ExpTextDecoderLayer):

    x  += PLE(x, ids)                                   PLE layers only
    h, inj = mix(attn_hyper_connection, x);  x += (mixer(h)[:, None] * inj[..., None]).flatten
    h, inj = mix(mlp_hyper_connection, x);   x += (moe(h)[:, None] * inj[..., None]).flatten

    mix:  xn = RMSNorm_per_stream(x) * (1 + hc_norm.w)
          w  = sigmoid(up(silu(down(xn) / hc)));   h = mean over streams of w * xn       [T, D]
          inj = 2 sigmoid(block_inject(xn) / hc)                                          [T, hc]

After the last layer `hyper_connection_mixer` (mix without inject) gives [T, D]; no final norm.

PLE: n-gram ids of orders 2..n from the token history (eos before the sequence; an eos starts a new
segment), hashed per head: (XOR over positions j of token[t - j] * multiplier_j) mod prime_head,
looked up in the layer's table (ngram_embedding, stored in row shards) -> e [T, P];
k = RMSNorm_per_stream(key_proj e), q = RMSNorm_per_stream(x), g = <k, q>_stream / sqrt(D),
g = sign(g) sqrt(max(|g|, 1e-6)); v = sigmoid(g) value_proj(e) per stream [T, hc*D];
PLE(x) = v + silu(causal dilated depthwise conv(RMSNorm_per_stream(v)))  (dilation ngram_size).

QSA indexer (Qwen4ExpTextQSAIndexer): index_qk_proj(h) -> queries [T, Hi, d] (per-head RMSNorm,
RoPE at their positions) and one raw key per token; keys averaged over consecutive blocks of
`compress_ratio` tokens, RMSNorm, RoPE at the block's first position; query t scores the complete
blocks before it, sum over heads of relu(q . k) / sqrt(d), keeps the best budget / ratio blocks'
tokens plus its incomplete last block's, torch.topk over exactly those blocks, as transformers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F_

from ..errors import BadCheckpoint, MoetoolError

_MASK64 = (1 << 64) - 1


def stream_norm(x: torch.Tensor, w: torch.Tensor, D: int, eps: float) -> torch.Tensor:
    """(1 + w) RMSNorm over each group of D features (Qwen4ExpTextRMSNorm with group_size), in float32."""
    shape, xf = x.shape, x.float()
    g = xf.reshape(*shape[:-1], -1, D)
    out = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).reshape(shape)
    return (out * (1.0 + w.float())).to(x.dtype)


def mix(dec, prefix: str, x: torch.Tensor, inject: bool = True):
    """A gated residual's block input [T, D] and, with `inject`, its injection weights [T, hc]."""
    fc, hc = dec.fc, dec.fc.qwen4_exp["hc"]
    D = fc.hidden
    w = lambda n: dec.w(prefix + n)
    xn = stream_norm(x, w("hc_norm.weight"), D, fc.eps)
    m = torch.sigmoid(F_.linear(F_.silu(F_.linear(xn, w("input_mix_weight_down.weight")) / hc),
                                w("input_mix_weight_up.weight")))
    h = (m.unflatten(-1, (hc, D)) * xn.unflatten(-1, (hc, D))).mean(dim=-2)
    if not inject:
        return h
    return h, 2 * torch.sigmoid(F_.linear(xn, w("block_inject_weight.weight")) / hc)


def _inject(x: torch.Tensor, y: torch.Tensor, inj: torch.Tensor) -> torch.Tensor:
    return x + (y.unsqueeze(-2) * inj.unsqueeze(-1)).flatten(-2)


def layer(dec, i: int, x, cos, sin, masks, routes, record):
    fc, hc = dec.fc, dec.fc.qwen4_exp["hc"]
    if any(not isinstance(m, torch.Tensor) for m in masks.values()):
        raise MoetoolError("Qwen4-Exp runs one sequence at a time (its n-gram embedding and QSA indexer): "
                           "use `moetool trace`, not blocks of prompts")
    if x.shape[-1] == fc.hidden:  # the embedding, copied into every stream
        x = x.repeat(1, hc)
    base = f"{dec.names.layers}{i}."
    if i in fc.qwen4_exp["ple_layers"]:
        x = x + ple(dec, i, base + "ple.", x)
    h, inj = mix(dec, base + "attn_hyper_connection.", x)
    x = _inject(x, dec.attention(i, h, cos, sin, masks), inj)
    h, inj = mix(dec, base + "mlp_hyper_connection.", x)
    return _inject(x, dec.moe(i, h, routes, record), inj)


def final(dec, x: torch.Tensor) -> torch.Tensor:
    return mix(dec, dec.names.layers[: -len("layers.")] + "hyper_connection_mixer.", x, inject=False)


# --- Per-Layer Embedding --------------------------------------------------------------------------

def _splitmix64(v: int) -> int:
    v = (v + 0x9E3779B97F4A7C15) & _MASK64
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (v ^ (v >> 31)) & _MASK64


def multipliers(vocab: int, n: int, ple_index: int, seed: int) -> list[int]:
    """The odd hash multiplier of each n-gram position of the ple_index-th PLE layer."""
    half = max(1, ((1 << 63) - 1) // max(vocab, 1) // 2)
    base = seed + 10007 * ple_index
    return [2 * (_splitmix64((base + 0x9E3779B97F4A7C15 * (j + 1)) & _MASK64) % half) + 1 for j in range(n)]


def ngram_ids(ids: list[int], p: dict, ple_index: int) -> torch.Tensor:
    """Table rows [T, heads] of every token's n-grams (orders 2..n, heads_per_ngram heads each)."""
    n, eos, per = p["ngram_size"], p["eos"], p["heads_per_ngram"]
    hist = torch.tensor([eos] * (n - 1) + list(ids), dtype=torch.long)
    L = hist.shape[0]
    pos = torch.arange(L)
    eos_pos = torch.where(hist == eos, pos, -1)
    prev = torch.cat([torch.tensor([-1]), torch.cummax(eos_pos, 0).values[:-1]])  # the last eos strictly before
    in_segment = pos - (prev + 1)
    shifted = []
    for s in range(n):
        src = (pos - s).clamp_min(0)
        shifted.append(torch.where((in_segment >= s) & (pos - s >= 0), hist[src], torch.full_like(hist, eos)))
    mult = multipliers(p["vocab"], n, ple_index, p["seed"])
    sizes, offsets = p["sizes"][ple_index], p["offsets"][ple_index]
    blocks = []
    for order in range(2, n + 1):
        mixed = shifted[0] * mult[0]
        for j in range(1, order):
            mixed = torch.bitwise_xor(mixed, shifted[j] * mult[j])
        a = (order - 2) * per
        size = torch.tensor(sizes[a:a + per], dtype=torch.long)
        blocks.append(torch.remainder(mixed[:, None], size[None]) + torch.tensor(offsets[a:a + per])[None])
    return torch.cat(blocks, dim=-1)[n - 1:]


def _table_rows(dec, prefix: str, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the n-gram table, from its row shards (save_pretrained) or one tensor (runtime names)."""
    whole = prefix + "ple_embedding.ngram_embedding.weight"
    if whole in dec.store:
        names = [whole]
    else:
        names, k = [], 0
        while f"{prefix}ple_embedding.ngram_embedding.shard_{k}.weight" in dec.store:
            names.append(f"{prefix}ple_embedding.ngram_embedding.shard_{k}.weight")
            k += 1
        if not names:
            raise BadCheckpoint(f"checkpoint has no n-gram embedding at {prefix}ple_embedding.ngram_embedding")
    starts, total = [], 0
    for n in names:
        starts.append(total)
        total += dec.store.tensors[n].shape[0]
    flat = rows.reshape(-1).tolist()
    if max(flat) >= total:
        raise BadCheckpoint(f"{prefix}ple_embedding.ngram_embedding has {total} rows; the n-gram hash needs row "
                            f"{max(flat)} (config.json's ngram fields do not fit the checkpoint)")
    out = {}
    for r in sorted(set(flat)):  # only the rows these n-grams use are read
        s = max(j for j, a in enumerate(starts) if a <= r)
        out[r] = dec.store.get(names[s], dec.dtype, index=r - starts[s], device=dec.device)
    return torch.stack([out[r] for r in flat]).reshape(*rows.shape, -1)


def ple(dec, i: int, prefix: str, x: torch.Tensor) -> torch.Tensor:
    fc = dec.fc
    p, hc, D = fc.qwen4_exp["ple"], fc.qwen4_exp["hc"], fc.hidden
    index = fc.qwen4_exp["ple_layers"].index(i)
    ids = getattr(dec, "token_ids", None)
    if ids is None or len(ids) != x.shape[0]:
        raise MoetoolError("Qwen4-Exp's per-layer embedding needs the token ids of the sequence")
    w = lambda n: dec.w(prefix + n)
    e = _table_rows(dec, prefix, ngram_ids(ids, p, index)).flatten(-2)  # [T, P]
    k = stream_norm(F_.linear(e, w("key_proj.weight")), w("norm_key.weight"), D, fc.eps).unflatten(-1, (hc, D))
    q = stream_norm(x, w("norm_query.weight"), D, fc.eps).unflatten(-1, (hc, D))
    v = F_.linear(e, w("value_proj.weight"))
    g = (k * q).sum(dim=-1, keepdim=True) / math.sqrt(D)
    g = g.abs().clamp_min(1e-6).sqrt() * g.sign()
    gv = torch.sigmoid(g) * v.unsqueeze(-2)  # [T, hc, D]
    gvn = stream_norm(gv.flatten(-2), w("norm_conv.weight"), D, fc.eps)
    conv = w("conv1d.weight")  # [hc*D, 1, K], dilation ngram_size
    K, dil = conv.shape[-1], p["ngram_size"]
    y = F_.conv1d(F_.pad(gvn.t()[None], ((K - 1) * dil, 0)), conv, groups=conv.shape[0], dilation=dil)[0].t()
    return gv.flatten(-2) + F_.silu(y)


# --- QSA indexer --------------------------------------------------------------------------------

def _rope_part(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate_half RoPE on the first 2 * cos.shape[-1] features of t [..., d] (the rest unrotated)."""
    r = 2 * cos.shape[-1]
    c, s = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    x1, x2 = t[..., : r // 2], t[..., r // 2: r]
    rot = torch.cat((-x2, x1), -1)
    return torch.cat((t[..., :r] * c + rot * s, t[..., r:]), -1)


def qsa_keep(dec, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The causal mask [T, T] restricted to the tokens layer i's QSA indexer keeps."""
    fc, q_cfg = dec.fc, dec.fc.qwen4_exp["qsa"]
    T, nh, d, ratio = h.shape[0], q_cfg["heads"], q_cfg["dim"], q_cfg["ratio"]
    if mask.shape[0] != mask.shape[1]:
        raise MoetoolError("Qwen4-Exp's QSA indexer is not cached: generation recomputes the sequence")
    find = lambda s: dec.w(dec.names.find(i, s))
    qk = F_.linear(h, find("self_attn.indexer.index_qk_proj.weight"))
    q, keys = qk.split([nh * d, q_cfg["kv_heads"] * d], dim=-1)
    q = dec_norm(q.view(T, nh, d), find("self_attn.indexer.q_layernorm.weight"), fc.eps)
    q = _rope_part(q, cos[:, None, :], sin[:, None, :])
    nb_all = T // ratio
    keep = torch.zeros(T, T, dtype=torch.bool, device=h.device)
    if nb_all:
        pooled = keys[: nb_all * ratio].view(nb_all, ratio, d).float().mean(dim=1).to(keys.dtype)
        pooled = dec_norm(pooled, find("self_attn.indexer.k_layernorm.weight"), fc.eps)
        starts = torch.arange(nb_all, device=h.device) * ratio
        pooled = _rope_part(pooled, cos[starts], sin[starts])
    for t in range(T):
        nb = (t + 1) // ratio
        if nb:  # as transformers: this query's scores over exactly its complete blocks, then topk
            scores = torch.relu(torch.matmul(q[t].float(), pooled[:nb].float().t()).t()).sum(-1) / math.sqrt(d)
            chosen = scores.topk(min(q_cfg["block_topk"], nb), dim=0).indices
            tok = (chosen[:, None] * ratio + torch.arange(ratio, device=h.device)[None]).reshape(-1)
            keep[t, tok] = True
        keep[t, nb * ratio: t + 1] = True
    return mask & keep


def dec_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """(1 + w) RMSNorm over the last dimension, in float32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).to(x.dtype)
