"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2, `deepseek_v32`).

Every MLA layer has a small indexer that scores each query against every (causally visible) key and
keeps the `index_topk` best keys; attention then sees only those. As transformers' DeepseekV32Indexer
(the bf16 equivalent of DeepSeek's reference: the Hadamard rotation is orthogonal and left out, scores
in float32):

    q = wq_b(q_resid) [T, Hi, Di]     k = LayerNorm(wk(x)) [T, Di]   (RoPE, rotate-half layout, on the
                                                                      first qk_rope_head_dim dims of each)
    score[s, t] = sum_h  w[s, h] * relu(q[s, h] . k[t] * Di^-0.5),   w = weights_proj(x) * Hi^-0.5
    keep[s] = top-`index_topk` of score[s] over the keys the causal mask allows

GLM-5 (`glm_moe_dsa`) rotates with interleaved pairs and runs an indexer only on its "full" layers;
a "shared" layer keeps the keys the previous full layer kept (forward/model.py). HY-V4 (`hy_v4`) too,
with RoPE on the last qk_rope_head_dim dims of q and k (`rope_tail`), its LayerNorm's eps
rms_norm_eps, and the Di^-0.5 scale on the head weights instead of the scores (`scale_weights`).

Shapes: T tokens, Hi indexer heads, Di indexer head dim, Rq q_lora_rank.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F_


def sparse_attention_keep(get: Callable[[str, torch.dtype], torch.Tensor], prefix: str, h: torch.Tensor,
                          q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal: torch.Tensor,
                          heads: int, dim: int, topk: int, rope_dim: int, apply_rope,
                          cache: Optional[dict] = None, width: Optional[int] = None,
                          layout: str = "half", rope_tail: bool = False, eps: float = 1e-6,
                          scale_weights: bool = False, q_scale: Optional[torch.Tensor] = None,
                          rope: bool = True) -> torch.Tensor:
    """-> [T, S] bool, True where query s keeps key t (always within `causal` [T, S]). `get(name, dtype)`
    reads a tensor of the layer's indexer (`prefix` + name); h [T, D] the attention input,
    q_resid [T, Rq] the normalised query latent. With a `cache` (the layer's dict of a KV cache) the
    indexer keys of the S - T earlier tokens come from it and the new ones are added.

    Ties: scores are often exactly equal (0 after the ReLU in every head), and which tied keys
    torch.topk keeps depends on the row's length. `width` (the whole traced sequence's length)
    pads each row with -inf to that length, so a cached step keeps the same keys as the full
    forward of the whole sequence does (forward/cache.py). `layout`: the indexer's RoPE layout
    ("half" in DeepSeek-V3.2, "interleave" in GLM-5). Mistral-Large-4 (forward/sparse_variants.py):
    `q_scale` [T, Hi] multiplies the queries before RoPE (its learned softmax scaling), and its NoPE
    layers' indexers rotate nothing (`rope` False); HY-V4: the rotary dims last (`rope_tail`), its own
    norm `eps`, the head weights scaled by Di^-0.5 instead of the scores (`scale_weights`). A block of
    prompts (moetool profile) runs this per prompt: forward/sparse_variants.py `index_keep`."""
    T = h.shape[0]
    dtype = h.dtype
    q = F_.linear(q_resid, get(prefix + "wq_b.weight", dtype)).view(T, heads, dim)
    if q_scale is not None:
        q = q * q_scale[:, :, None]
    k = F_.layer_norm(F_.linear(h, get(prefix + "wk.weight", dtype)), (dim,), get(prefix + "k_norm.weight", dtype),
                      get(prefix + "k_norm.bias", dtype), eps)  # [T, Di]
    if rope_tail:  # HY-V4: the rotary dims last
        q = torch.cat((q[..., :dim - rope_dim], apply_rope(q[..., dim - rope_dim:], cos, sin, layout)), dim=-1)
        k = torch.cat((k[:, :dim - rope_dim], apply_rope(k[:, None, dim - rope_dim:], cos, sin, layout)[:, 0]), dim=-1)
    elif rope:
        q = torch.cat((apply_rope(q[..., :rope_dim], cos, sin, layout), q[..., rope_dim:]), dim=-1)
        k = torch.cat((apply_rope(k[:, None, :rope_dim], cos, sin, layout)[:, 0], k[:, rope_dim:]), dim=-1)
    if cache is not None:
        if cache.get("index_k") is not None:
            k = torch.cat((cache["index_k"], k), dim=0)  # [S, Di]
        cache["index_k"] = k
    S = k.shape[0]
    # Same operations, shapes and order as transformers (batch of one), so ties break the same way.
    scores = torch.matmul(q[None].float(), k[None].transpose(-1, -2).float().unsqueeze(1))  # [1, T, Hi, S]
    scores = F_.relu(scores if scale_weights else scores * dim ** -0.5)
    w = F_.linear(h.float(), get(prefix + "weights_proj.weight", torch.float32)) * heads ** -0.5  # [T, Hi] (fp32 module)
    if scale_weights:
        w = w * dim ** -0.5
    index = torch.matmul(w[None].unsqueeze(-2), scores).squeeze(-2)[0]  # [T, S]
    index = index.masked_fill(~causal, float("-inf"))
    if width is not None and width > S:
        index = F_.pad(index, (0, width - S), value=float("-inf"))
    chosen = index.topk(min(topk, index.shape[-1]), dim=-1).indices  # [T, topk]
    keep = torch.zeros(T, index.shape[-1], dtype=torch.bool, device=h.device).scatter(-1, chosen, True)[:, :S]
    return keep & causal


def kpool_keep(get: Callable[[str, torch.dtype], torch.Tensor], prefix: str, h: torch.Tensor, q_resid: torch.Tensor,
               causal: torch.Tensor, heads: int, dim: int, topk: int, kpool: int, tail: bool = True,
               cache: Optional[dict] = None, width: Optional[int] = None) -> torch.Tensor:
    """GLM-5.3-Flash's indexer (`glm5_next`, transformers' Glm5NextTextIndexer) with k-pool compression:
    -> [T, S] bool, True where query s keeps key t. No RoPE. The keys are grouped in consecutive pools of
    `kpool` tokens from the first one; only complete pools are candidates. A pool's key is a softmax-weighted
    mean of its tokens' keys, per channel, with logits index_kpool_compress_gate . x + index_kpool_compress_ape
    [position in the pool]. Each query scores the pools as DeepSeek-V3.2's indexer scores keys (ReLU per head,
    summed with weights_proj), among the pools whose last token it sees keeps the top-(topk / kpool) and so
    their tokens, and with `tail` also the tokens of its own incomplete pool. With a `cache` (the layer's
    dict of a KV cache) the earlier tokens' keys and gate logits come from it. Ties (pools scoring 0 in
    every head) break by the row's length, in transformers too: `width` (the whole traced sequence's
    length) pads each row to that sequence's pools, as its full forward ranks them (sparse_attention_keep)."""
    T, dtype = h.shape[0], h.dtype
    q = F_.linear(q_resid, get(prefix + "wq_b.weight", dtype)).view(T, heads, dim)
    k = F_.layer_norm(F_.linear(h, get(prefix + "wk.weight", dtype)), (dim,), get(prefix + "k_norm.weight", dtype),
                      get(prefix + "k_norm.bias", dtype), 1e-6)  # [T, Di]
    gate = F_.linear(h, get(prefix + "index_kpool_compress_gate", dtype))  # [T, Di]
    if cache is not None:
        if cache.get("index_k") is not None:
            k, gate = torch.cat((cache["index_k"], k), dim=0), torch.cat((cache["index_gate"], gate), dim=0)
        cache["index_k"], cache["index_gate"] = k, gate
    S = k.shape[0]
    P = S // kpool  # complete pools
    keep = torch.zeros(T, S, dtype=torch.bool, device=h.device)
    if P and topk // kpool:
        ape = get(prefix + "index_kpool_compress_ape", torch.float32)  # [kpool, Di]
        logits = gate[:P * kpool].view(P, kpool, dim).float() + ape[None]
        pool_k = (logits.softmax(dim=1).to(k.dtype) * k[:P * kpool].view(P, kpool, dim)).sum(dim=1)  # [P, Di]
        scores = F_.relu(torch.matmul(q[None].float(), pool_k[None].transpose(-1, -2).float().unsqueeze(1)) * dim ** -0.5)
        w = F_.linear(h.float(), get(prefix + "weights_proj.weight", torch.float32)) * heads ** -0.5  # [T, Hi]
        index = torch.matmul(w[None].unsqueeze(-2), scores).squeeze(-2)[0]  # [T, P]
        ends = torch.arange(P, device=h.device) * kpool + kpool - 1
        visible = causal[:, ends]  # [T, P]
        index = index.masked_fill(~visible, torch.finfo(index.dtype).min)
        if width is not None and width // kpool > P:
            index = F_.pad(index, (0, width // kpool - P), value=torch.finfo(index.dtype).min)
        chosen = index.topk(min(topk // kpool, index.shape[-1]), dim=-1).indices  # [T, k]
        pools = torch.zeros(T, index.shape[-1], dtype=torch.bool, device=h.device).scatter(-1, chosen, True)[:, :P] & visible
        keep[:, :P * kpool] = pools.repeat_interleave(kpool, dim=1)
    if tail and kpool > 1:  # the query's own incomplete pool
        seen = causal.sum(-1)  # [T]
        start = seen - seen.remainder(kpool)
        t = torch.arange(S, device=h.device)
        keep |= (t[None] >= start[:, None]) & (t[None] < seen[:, None])
    return keep & causal
