"""MiniMax-M3's block-sparse attention (`layer_types` "minimax_m3_sparse"): a lightning indexer picks,
for every query, the blocks of keys its attention may see. As transformers' MiniMaxM3VLIndexer and
`build_block_mask` (eager / SDPA path):

    q = q_norm(index_q_proj(x)) [T, Hi, Di]      k = k_norm(index_k_proj(x)) [T, Di]    ((1 + w) RMSNorms)
    RoPE (rotate-half) on the first min(R, Di) dims of each, with the attention's cos / sin tables cut
    to Di columns (R: the attention's rotary width)
    score[h, s, t] = q[s, h] . k[t]  (float32, no scale), -inf for future keys
    block score = max over the `index_block_size` keys of a block (the last block padded with -inf)
    the `index_local_blocks` blocks ending at the query's own block get +inf (always kept)
    keep[h, s] = the top-`index_topk_blocks` blocks of query s (blocks scored -inf are dropped)

Indexer head h selects for the query heads of its KV group (H / Hi each); the attention then sees the
kept blocks within the causal mask. Shapes: T tokens, H attention heads, Hi indexer heads, Di their
head dim, B the block size.
"""

from __future__ import annotations

import torch


def rms_norm_offset(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """MiniMax-M3's RMSNorm: normalised in float32, scaled by (1 + w)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, h, Di] rotated on its first r = cos.shape[-1] dims; cos / sin [T, r] in the concatenated
    (cos, cos) form transformers' rotate_half uses."""
    r = cos.shape[-1]
    xr, rest = x[..., :r].float(), x[..., r:]
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = torch.cat((-xr[..., r // 2:], xr[..., : r // 2]), dim=-1)
    return torch.cat(((xr * c + rotated * s).to(x.dtype), rest), dim=-1)


def block_sparse_keep(get, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal, cfg: dict,
                      heads: int, eps: float):
    """-> the attention mask of layer i: [H, T, T] bool (True: query s may attend to key t), or a
    `Segments` of them for a block of prompts. `get(*names)` reads one of the layer's tensors (the
    first name the checkpoint has); cos / sin [T, R/2] the attention's RoPE tables; `causal` its mask."""
    if hasattr(causal, "parts"):  # a block of prompts (moetool profile): each prompt on its own
        return type(causal)([(a, b, block_sparse_keep(get, i, h[a:b], cos[a:b], sin[a:b], m, cfg, heads, eps))
                             for a, b, m in causal.parts])
    T, Hi, Di, B = h.shape[0], cfg["heads"], cfg["dim"], cfg["block"]
    q = torch.nn.functional.linear(h, get("self_attn.indexer.q_proj.weight", "self_attn.index_q_proj.weight"))
    k = torch.nn.functional.linear(h, get("self_attn.indexer.k_proj.weight", "self_attn.index_k_proj.weight"))
    q = rms_norm_offset(q.view(T, Hi, Di), get("self_attn.indexer.q_norm.weight", "self_attn.index_q_norm.weight"), eps)
    k = rms_norm_offset(k.view(T, 1, Di), get("self_attn.indexer.k_norm.weight", "self_attn.index_k_norm.weight"), eps)
    cos_e, sin_e = torch.cat((cos, cos), dim=-1)[:, :Di], torch.cat((sin, sin), dim=-1)[:, :Di]
    q, k = _rope(q, cos_e, sin_e), _rope(k, cos_e, sin_e)
    scores = torch.matmul(q.transpose(0, 1).float(), k.transpose(0, 1).float().transpose(-1, -2))  # [Hi, T, T]
    pos = torch.arange(T, device=h.device)
    scores = scores.masked_fill(pos[None, None, :] > pos[None, :, None], float("-inf"))
    blocks = -(-T // B)
    scores = torch.nn.functional.pad(scores, (0, blocks * B - T), value=float("-inf"))
    block_scores = scores.view(Hi, T, blocks, B).amax(dim=-1)  # [Hi, T, blocks]
    if cfg["local"] > 0:
        local = (pos[:, None] // B - torch.arange(cfg["local"], device=h.device)[None, :]).clamp(min=0)  # [T, local]
        block_scores.scatter_(-1, local[None].expand(Hi, -1, -1), float("inf"))
    top, idx = block_scores.topk(min(cfg["topk"], blocks), dim=-1)  # [Hi, T, topk]
    kept = torch.zeros(Hi, T, blocks + 1, dtype=torch.bool, device=h.device)
    kept.scatter_(-1, idx.masked_fill(top == float("-inf"), blocks), True)  # dropped slots land in a spare column
    keep = kept[..., :blocks].repeat_interleave(B, dim=-1)[..., :T]  # [Hi, T, T]
    return keep.repeat_interleave(heads // Hi, dim=0) & causal
