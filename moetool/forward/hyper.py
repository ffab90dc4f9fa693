"""Hyper-connections: several residual streams per token, mixed in and out of every sublayer
(Tencent HY-V4 `hy_v4`, DeepSeek-V4 `deepseek_v4`; transformers' *HyperConnection / *HyperHead).

The embedding is copied into N = hc_mult streams [T, N, D]. Before each sublayer (attention, FFN) a
mixer reads the flattened streams [T, N*D], scaled by their inverse RMS (an unweighted RMSNorm,
eps = rms_norm_eps), through one projection `fn` into per-token coefficients:

    pre  = sigmoid(fn_pre . x * scale[0] + base_pre) + hc_eps          [T, N]   collapse the streams
    post = post_scale * sigmoid(fn_post . x * scale[1] + base_post) + post_eps   [T, N]   spread the output
    comb = Sinkhorn(softmax(fn_comb . x * scale[2] + base_comb) + hc_eps)         [T, N, N] (DeepSeek-V4)

    h = sum_n pre[n] * x[n]             (the sublayer's input, [T, D], then its RMSNorm)
    x'[n] = post[n] * sublayer(h) + x[n]                                  (HY-V4)
    x'[n] = post[n] * sublayer(h) + sum_m comb[m, n] * x[m]               (DeepSeek-V4)

HY-V4 projects to 2N coefficients (no comb), post_scale = hc_magnitude, post_eps = hc_eps, and
scales the projection by the inverse RMS after it; DeepSeek-V4 projects to (2 + N) * N coefficients,
post_scale = 2, post_eps = 0, normalises before the projection and makes comb doubly stochastic with
`hc_sinkhorn_iters` Sinkhorn-Knopp steps (columns first). The head collapses the streams once more
with its own `pre` (the `hc_head` mixer) before the final norm. Everything in float32, as upstream.

The settings are data (`HyperConfig`); the attention and FFN of a layer are the decoder's own
(`Decoder.attention`, `Decoder.moe`), so a family adds only its sublayers.
Shapes: T tokens, N streams, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F_


@dataclass
class HyperConfig:
    streams: int  # hc_mult
    norm_eps: float  # the unweighted RMSNorm of the flattened streams (rms_norm_eps)
    eps: float  # hc_eps: added to pre (and comb)
    post_scale: float  # HY-V4: hc_magnitude; DeepSeek-V4: 2
    post_eps: float  # HY-V4: hc_eps; DeepSeek-V4: 0
    sinkhorn_iters: int = 0  # 0: no stream mixing (HY-V4); DeepSeek-V4: hc_sinkhorn_iters
    norm_first: bool = False  # normalise before the projection (DeepSeek-V4) or scale its output (HY-V4)
    mean_head: bool = False  # the head's collapse: an unweighted mean of the streams (GLM-5.3-Flash), no mixer


# Stored names of a layer's mixers, by role ("attn" before attention, "ffn" before the FFN) and parameter:
# transformers' module names, then the original checkpoints' (DeepSeek-V4: hc_attn_fn; HY-V4: hc_pre.hc_attn_layer.hc_fn).
_HC_MLP = {"attn": "attn", "ffn": "mlp"}


def _mixer_names(role: str, p: str) -> tuple[str, ...]:
    return f"{role}_hc.{p}", f"hc_{role}_{p}", f"hc_pre.hc_{_HC_MLP[role]}_layer.hc_{p}"


def _head_names(p: str) -> tuple[str, ...]:
    return f"hc_head.hc_{p}", f"hc_head_{p}", f"hc_pre.hc_head.hc_head_{p}"


# The two RMSNorms of a layer (before attention, before the FFN): transformers' names, DeepSeek-V4's.
LAYER_NORMS = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"))


def streams(x: torch.Tensor, hc: HyperConfig) -> torch.Tensor:
    """The embedding [T, D] copied into the N streams [T, N, D]."""
    return x[:, None, :].expand(x.shape[0], hc.streams, x.shape[1]).contiguous()


def _project(x: torch.Tensor, fn: torch.Tensor, hc: HyperConfig) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1).float()  # [T, N*D]
    inv = torch.rsqrt(flat.square().mean(-1, keepdim=True) + hc.norm_eps)
    return F_.linear(flat * inv, fn.float()) if hc.norm_first else F_.linear(flat, fn.float()) * inv


def collapse(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc: HyperConfig):
    """x [T, N, D] -> (post [T, N], comb [T, N, N] or None, h [T, D]) for one sublayer."""
    N = hc.streams
    mixes = _project(x, fn, hc)  # [T, 2N] or [T, (2 + N) N]
    base, scale = base.float(), scale.float()
    pre = torch.sigmoid(mixes[:, :N] * scale[0] + base[:N]) + hc.eps
    post = hc.post_scale * torch.sigmoid(mixes[:, N:2 * N] * scale[1] + base[N:2 * N])
    if hc.post_eps:
        post = post + hc.post_eps
    comb = None
    if hc.sinkhorn_iters:
        logits = mixes[:, 2 * N:].view(-1, N, N) * scale[2] + base[2 * N:].view(N, N)
        comb = torch.softmax(logits, dim=-1) + hc.eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc.eps)
        for _ in range(hc.sinkhorn_iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + hc.eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + hc.eps)
    h = (pre.unsqueeze(-1) * x).sum(dim=1).to(x.dtype)
    return post, comb, h


def expand(post: torch.Tensor, comb, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The sublayer's output f [T, D] spread over the streams x [T, N, D] (see the module docstring)."""
    if comb is None:  # HY-V4: in float32
        return (post.float().unsqueeze(-1) * f.float().unsqueeze(-2) + x.float()).to(x.dtype)
    dtype = x.dtype
    return post.to(dtype).unsqueeze(-1) * f.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), x)


def head(dec, x: torch.Tensor) -> torch.Tensor:
    """The head's collapse of the streams [T, N, D] -> [T, D] (before the final norm)."""
    hc, root = dec.fc.hyper, dec.names.layers[: -len("layers.")]
    if hc.mean_head:
        return x.mean(dim=1)
    fn, base, scale = (dec.w(_stored(dec, [root + n for n in _head_names(p)])) for p in ("fn", "base", "scale"))
    mixes = _project(x, fn, hc)  # [T, N]
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + hc.eps
    return (pre.unsqueeze(-1) * x).sum(dim=1).to(x.dtype)


def _stored(dec, names) -> str:
    from ..errors import BadCheckpoint

    for n in names:
        if n in dec.store:
            return n
    raise BadCheckpoint(f"checkpoint is missing a hyper-connection tensor: none of {', '.join(names)}")


def layer(dec, i: int, x: torch.Tensor, cos, sin, masks, routes: list, record: bool) -> torch.Tensor:
    """One decoder layer on the streams x [T, N, D]: attention, then the FFN, each between a collapse
    and an expand of the streams, each after its RMSNorm."""
    from .model import norm

    fc, find = dec.fc, (lambda *s, required=True: dec.names.find(i, *s, required=required))
    for role, norm_names in zip(("attn", "ffn"), LAYER_NORMS):
        fn, base, scale = (dec.w(find(*_mixer_names(role, p))) for p in ("fn", "base", "scale"))
        post, comb, h = collapse(x, fn, base, scale, fc.hyper)
        h = norm(h, dec.w(find(*(n + ".weight" for n in norm_names))), None, fc)
        f = dec.attention(i, h, cos, sin, masks) if role == "attn" else ffn(dec, i, h, routes, record)
        x = expand(post, comb, f, x)
    return x


def ffn(dec, i: int, h: torch.Tensor, routes: list, record: bool) -> torch.Tensor:
    """The layer's MoE (Decoder.moe: router, routed and shared experts) or dense MLP."""
    if dec.spec.layers[i].moe:
        return dec.moe(i, h, routes, record)
    if dec.ffn_hook:
        dec.ffn_hook(dec, i, h, None)
    base = dec.names.find(i, "mlp.gate_proj.weight", "mlp.linear_gate.weight").rsplit(".", 2)[0] + "."
    return dec.gated_mlp(base, h)
