"""The reference MoE decoder: our own forward pass, streamed layer by layer from the checkpoint.

The whole prompt goes through one decoder layer at a time: load the layer's attention, norms and
router, run it, load only the experts the router chose (grouped: each chosen expert runs once on
all its tokens), drop everything, go to the next layer. Peak memory is about one layer plus the
activations, whatever the model's size.

Shape legend: T tokens, D hidden, H heads, Hkv key/value heads, Dh head dim, E routed experts,
K experts per token (top-k), F expert FFN size, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F_

from ..errors import BadCheckpoint, MoetoolError
from ..spec import ModelSpec, MoESpec
from . import mixers
from .config import ForwardConfig
from .block_sparse import block_sparse_keep
from . import sparse_variants
from .moa import moa_attention
from . import hyper
from .weights import WeightStore


@dataclass
class LayerRoute:
    """Router decisions of one MoE layer. `experts` [T, K] in selection order (best first),
    `weights` [T, K] the final gate weights, `logits` [T, E] router logits (fp32),
    `scores` [T, E] the scores selection ranks (softmax / sigmoid, + correction bias)."""

    layer: int
    experts: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor
    scores: torch.Tensor
    stack: Optional[str] = None  # encoder-decoder models: "encoder" / "decoder" (forward/encdec.py)
    dropped: list = field(default_factory=list)  # [token, slot] pairs over their expert's capacity (not run)
    kind: str = "ffn"  # "attention": JetMoE's mixture-of-attention router (forward/moa.py)


@dataclass
class ForwardResult:
    logits: torch.Tensor  # [T, V] float32, on the CPU
    routes: list[LayerRoute] = field(default_factory=list)
    bytes_read: int = 0
    attention_routes: list[LayerRoute] = field(default_factory=list)  # JetMoE: the attention experts' router


HEAD_BLOCK_BYTES = 256 * 1024 * 1024  # the LM head is converted in blocks of rows above this size


def check_shape(name: str, t: torch.Tensor, expected: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise BadCheckpoint(f"tensor {name!r} has shape {list(t.shape)}, but config.json implies {list(expected)} "
                            f"({what})")


def non_finite_router(i: int, h: torch.Tensor, name: str, w: torch.Tensor, b) -> str:
    """Which input made layer i's router logits NaN or infinite."""
    if not torch.isfinite(h).all():
        where = "its input (the hidden state)"
        cause = "a weight of this layer's attention or of an earlier layer is NaN or infinite"
    elif not torch.isfinite(w).all() or (b is not None and not torch.isfinite(b).all()):
        where, cause = f"its weight {name!r}", "the checkpoint stores NaN or infinite values there"
    else:
        where, cause = "an overflow", "the hidden state is too large for the router dtype"
    return f"layer {i}: the router's logits are not finite, from {where}: {cause}; routing would be meaningless"


# --- names --------------------------------------------------------------------------------------

class Names:
    """Finds the checkpoint's tensor names for each role (families and wrappers differ)."""

    FINAL_NORM_ALIASES = ("final_layernorm.", "embedding_norm.", "norm_f.")  # Jamba, LFM2, Nemotron-H
    EMBED = ("model.embed_tokens.weight", "transformer.wte.weight", "language_model.model.embed_tokens.weight",
             "model.language_model.embed_tokens.weight", "model.embeddings.weight", "backbone.embeddings.weight",
             "model.llm.embed.weight",  # Inkling 2 as published and saved: model.llm.{embed,layers,norm,unembed}
             "model.word_embeddings.weight",  # Ling (bailing_hybrid) as published
             "embed.weight",  # DeepSeek-V4's original layout: embed, layers.*, norm, head, hc_head_* at the top
             # NeMo SpeechLM as published (llm.model.*, llm.lm_head) and in transformers (Nemotron-H's names)
             "llm.model.embed_tokens.weight", "model.language_model.embeddings.weight",
             # Qwen3-Omni whole (thinker.*: as saved, and transformers' in-memory names)
             "thinker.model.embed_tokens.weight", "thinker.model.language_model.embed_tokens.weight",
             "model.encoder.language_model.embed_tokens.weight")  # DiffusionGemma's encoder (forward/diffusion_gemma.py)

    def __init__(self, store: WeightStore, aliases: tuple = ()):
        self.store = store
        # (transformers' name prefix, the original checkpoint's) pairs under a layer, tried after the
        # name itself (ForwardConfig.name_aliases: Ling's attention. / dense / expert_bias)
        self.aliases = aliases
        embed = next((n for n in self.EMBED if n in store.tensors), None)
        if embed is None:
            raise BadCheckpoint("checkpoint has no token embedding (looked for model.embed_tokens.weight, "
                                "transformer.wte.weight)")
        self.embed = embed
        if embed.startswith("transformer."):
            self.layers, self.final_norm = "transformer.blocks.", "transformer.norm_f."
            self.head = "lm_head.weight"
        elif embed == "embed.weight":
            self.layers, self.final_norm, self.head = "layers.", "norm.", "head.weight"
        else:
            root = embed.rsplit(".", 2)[0] + "."  # "model." of model.embed_tokens.weight
            self.layers, self.final_norm = root + "layers.", root + "norm."
            for alt in self.FINAL_NORM_ALIASES:  # families whose final norm has another name
                if root + "norm.weight" not in store and root + alt + "weight" in store:
                    self.final_norm = root + alt
            # Llama 4 multimodal (as published): language_model.model.* with language_model.lm_head.
            wrapper = next((w for w in ("language_model.", "llm.", "thinker.") if embed.startswith(w)), "")
            self.head = wrapper + "lm_head.weight"
            if self.head not in store and "head.weight" in store:  # DeepSeek-V4 as saved
                self.head = "head.weight"
            if self.head not in store and "score.weight" in store:  # token classification: `score` [labels, D]
                self.head = "score.weight"
            if self.head not in store and root + "unembed.weight" in store:  # Inkling 2: model.llm.unembed
                self.head = root + "unembed.weight"

    def find_root(self, *suffixes: str) -> str:
        """The first stored name of `suffixes` under the model root ("model." of model.layers.)."""
        root = self.layers[: -len("layers.")]
        for s in suffixes:
            if root + s in self.store:
                return root + s
        raise BadCheckpoint(f"checkpoint is missing a tensor: none of {', '.join(root + s for s in suffixes)}")

    def alternatives(self, suffix: str) -> list[str]:
        """`suffix` (a name under a layer), then its spellings by `aliases`."""
        return [suffix] + [alt + suffix[len(p):] for p, alt in self.aliases if suffix.startswith(p)]

    def find(self, layer: int, *suffixes: str, required: bool = True) -> Optional[str]:
        for s in suffixes:
            for a in self.alternatives(s):
                name = f"{self.layers}{layer}.{a}"
                if name in self.store:
                    return name
        if required:
            raise BadCheckpoint(f"checkpoint is missing a tensor of layer {layer}: none of "
                                f"{', '.join(self.layers + str(layer) + '.' + s for s in suffixes[:3])}")
        return None


# --- building blocks ----------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    x = x.to(dtype)
    if weight is None:
        return x
    # weight * x, in place when that keeps the dtype (x is a fresh tensor here): the same products
    return x.mul_(weight) if weight.dtype == x.dtype and x.dtype == dtype else weight * x


def norm(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], fc: ForwardConfig) -> torch.Tensor:
    if fc.norm == "layernorm":
        return F_.layer_norm(x, (x.shape[-1],), w, b, fc.eps)
    if fc.norm_offset and w is not None:  # (1 + w) RMSNorm, in float32 (Qwen3-Next)
        return (rms_norm(x.float(), None, fc.eps) * (fc.norm_offset + w.float())).to(x.dtype)
    return rms_norm(x, w, fc.eps)


def rope_tables(fc: ForwardConfig, T: int, device, past: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rope_dim / 2] for positions past..past+T-1 (cos/sin scaled by the attention
    factor), frequencies as for a sequence of past + T tokens."""
    inv, factor = fc.rope.inv_freq_and_factor(past + T)
    pos = torch.arange(past, past + T, dtype=torch.float32)
    freqs = torch.outer(pos, inv)  # [T, r/2]
    return (freqs.cos() * factor).to(device), (freqs.sin() * factor).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """x [T, H, r] rotated by position. `half`: pairs (i, i + r/2); `interleave`: pairs (2i, 2i+1)."""
    dtype = x.dtype
    x = x.float()
    c, s = cos[:, None, :], sin[:, None, :]
    if layout == "half":  # (x1 * c - x2 * s, x2 * c + x1 * s), written into one output (no cat)
        x1, x2 = x.chunk(2, dim=-1)
        out = torch.empty_like(x)
        o1, o2 = out.chunk(2, dim=-1)
        torch.mul(x1, c, out=o1).sub_(x2 * s)
        torch.mul(x2, c, out=o2).add_(x1 * s)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    return out.to(dtype)


def attention_mask(T: int, window: Optional[int], chunk: Optional[int], device, bidirectional: bool = False,
                   past: int = 0) -> torch.Tensor:
    """[T, past + T] bool, True where query i (position past + i) may attend to key j (position j):
    causal, within the window / chunk. `past` keys come from a KV cache (forward/cache.py).
    Bidirectional (an encoder: OpenAI's privacy filter): |i - j| <= window, both directions."""
    i = torch.arange(past, past + T, device=device)[:, None]
    j = torch.arange(past + T, device=device)[None, :]
    if bidirectional:
        return (i - j).abs() <= window if window else torch.ones(T, past + T, dtype=torch.bool, device=device)
    allowed = j <= i
    if window:
        allowed &= (i - j) < window
    if chunk:
        allowed &= (i // chunk) == (j // chunk)
    return allowed


class Segments:
    """A block of many prompts (moetool profile): `parts` [(start, end, mask [L, L])], one per
    prompt. Attention runs per prompt with that prompt's own mask: no cross-prompt attention.

    With `key` = (window, chunk), the masks being `attention_mask(L, window, chunk)`, prompts of
    similar length are batched: padded to the longest of their bucket (at most PAD_WASTE more
    query rows than real ones) and run as one [B, H, Lmax, D] attention with the mask of Lmax.
    The mask is causal, so a real query never sees a padded key; padded query rows are dropped."""

    PAD_WASTE = 1.25  # a bucket's padded tokens are at most this times its real tokens
    MAX_SCORES = 1 << 25  # and its B x H x Lmax x Lmax attention scores at most this many (or one prompt's)

    def __init__(self, parts: list, key: Optional[tuple] = None):
        self.parts = parts
        self.key = key
        self._buckets = {}

    def buckets(self, heads: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """[(row index [B, Lmax] into the block (padding repeats the prompt's first row), real [B, Lmax], Lmax)]."""
        if heads not in self._buckets:
            order = sorted(range(len(self.parts)), key=lambda p: self.parts[p][1] - self.parts[p][0], reverse=True)
            groups, cur, real = [], [], 0
            for p in order:
                L = self.parts[p][1] - self.parts[p][0]
                Lmax = L if not cur else self.parts[cur[0]][1] - self.parts[cur[0]][0]
                if cur and ((len(cur) + 1) * Lmax > self.PAD_WASTE * (real + L)
                            or (len(cur) + 1) * heads * Lmax * Lmax > max(self.MAX_SCORES, heads * Lmax * Lmax)):
                    groups.append(cur)
                    cur, real = [], 0
                cur.append(p)
                real += L
            groups.append(cur)
            self._buckets[heads] = []
            for g in groups:
                Lmax = self.parts[g[0]][1] - self.parts[g[0]][0]
                pos = torch.arange(Lmax)
                starts = torch.tensor([self.parts[p][0] for p in g])[:, None]
                lens = torch.tensor([self.parts[p][1] - self.parts[p][0] for p in g])[:, None]
                real = pos[None, :] < lens
                self._buckets[heads].append((torch.where(real, starts + pos, starts), real, Lmax))
        return self._buckets[heads]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """sdpa of every prompt, bucket by bucket: q [T, H, Dq], k [T, Hkv, Dq], v [T, Hkv, Dv] -> [T, H, Dv]."""
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
        for rows, real, Lmax in self.buckets(q.shape[1]):
            rows, real = rows.to(q.device), real.to(q.device)
            qb, kb, vb = (t[rows].transpose(1, 2) for t in (q, k, v))  # [B, H, Lmax, D]
            mask = attention_mask(Lmax, self.key[0], self.key[1], q.device)
            o = F_.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale,
                                                enable_gqa=kb.shape[1] != qb.shape[1])
            out[rows[real]] = o.transpose(1, 2)[real]
        return out


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float,
         sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [T, H, Dq], k [T, Hkv, Dq], v [T, Hkv, Dv] -> [T, H, Dv]. Sinks (gpt-oss): one extra
    logit per head that takes softmax mass and contributes nothing."""
    if isinstance(mask, Segments) and mask.key is not None and sinks is None and q.shape[1] % k.shape[1] == 0:
        return mask.attend(q, k, v, scale)
    if isinstance(mask, Segments):
        return torch.cat([sdpa(q[a:b], k[a:b], v[a:b], m, scale, sinks) for a, b, m in mask.parts])
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, T, D]
    if sinks is None:
        out = F_.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        scores = (q @ k.transpose(1, 2)) * scale  # [H, T, T]
        scores = scores.masked_fill(~mask, float("-inf"))
        sink = sinks.to(scores.dtype).view(H, 1, 1).expand(H, scores.shape[1], 1)
        logits = torch.cat((scores, sink), dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1)[..., :-1]
        out = probs.to(v.dtype) @ v
    return out.transpose(0, 1)


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F_.linear(x, w, b)


# --- routers: one function per variant, in the paper's order ------------------------------------

def route(logits: torch.Tensor, moe: MoESpec, family: str, bias: Optional[torch.Tensor]):
    """Router logits [T, E] (fp32) -> (experts [T, K] best first, weights [T, K], scores [T, E])."""
    r, k = moe.router, moe.top_k
    if family in ("deepseek_v3", "glm4_moe") or (r.scoring == "sigmoid" and r.order == "score_then_topk"):
        return _route_sigmoid_group(logits, moe, bias)
    if family in ("deepseek_v2", "unlimited_ocr_text"):  # Unlimited-OCR: DeepSeek-V2's router
        return _route_softmax_group(logits, moe)
    if r.topk_method == "group_top2_softmax":
        return _route_softmax_top2_group(logits, moe)
    if r.scoring == "sparsemixer":
        return _route_sparsemixer(logits, r.jitter_noise, k)
    if r.order == "topk_then_score":
        if bias is not None and r.correction_bias:  # Kolibri-1: the bias shifts the choice of logits only
            idx = torch.topk(logits + bias, k, dim=-1).indices
            top = logits.gather(1, idx)
        else:
            top, idx = torch.topk(logits, k, dim=-1)  # [T, K]
        w = torch.sigmoid(top) if r.scoring == "sigmoid" else torch.softmax(top, dim=-1)
        if r.scoring == "sigmoid" and r.norm_topk_prob:  # Cohere 2 MoE (Llama 4 does not renormalise)
            w = w / w.sum(dim=-1, keepdim=True)
        if r.routed_scaling_factor != 1.0:  # OpenAI's privacy filter: 1 / k
            w = w * r.routed_scaling_factor
        return idx, w, logits
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    if bias is not None and r.correction_bias:  # Ernie 4.5: the bias shifts the choice, not the weights
        idx = torch.topk(probs + bias, k, dim=-1).indices
        top = probs.gather(1, idx)
    else:
        top, idx = torch.topk(probs, k, dim=-1)  # [T, K]
    if r.norm_topk_prob and r.norm_p == 1.0:
        top = top / top.sum(dim=-1, keepdim=True)
    elif r.norm_topk_prob:  # DBRX: divide by the p-norm of the top-k weights
        top = top / torch.norm(top, p=r.norm_p, dim=-1, keepdim=True)
    return idx, top, probs


def _route_softmax_group(logits: torch.Tensor, moe: MoESpec):
    """DeepSeek-V2: softmax over E; greedy, or group-limited greedy (group score = its max expert
    score, keep topk_group of n_group); renormalise when norm_topk_prob (k > 1), else scale."""
    r, k, E = moe.router, moe.top_k, moe.num_experts
    scores = torch.softmax(logits, dim=-1)  # [T, E]
    choice = scores
    if r.topk_method == "group_limited_greedy":
        g = r.n_group
        group = scores.view(-1, g, E // g).max(dim=-1).values  # [T, G]
        keep = torch.zeros_like(group).scatter_(1, torch.topk(group, r.topk_group, dim=-1).indices, 1.0)
        choice = scores.masked_fill(~keep.bool().repeat_interleave(E // g, dim=1), 0.0)
    w, idx = torch.topk(choice, k, dim=-1)
    if k > 1 and r.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        w = w * r.routed_scaling_factor
    return idx, w, scores


def _route_softmax_top2_group(logits: torch.Tensor, moe: MoESpec):
    """Mistral 4: softmax over E; group score = sum of its top-2 scores, keep topk_group of n_group
    (the others' scores set to 0); top-k; renormalise if norm_topk_prob; times routed_scaling_factor."""
    r, k, E = moe.router, moe.top_k, moe.num_experts
    scores = torch.softmax(logits, dim=-1)  # [T, E]
    g = r.n_group
    group = scores.view(-1, g, E // g).topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    keep = torch.zeros_like(group).scatter_(1, torch.topk(group, r.topk_group, dim=-1).indices, 1.0)
    choice = scores.masked_fill(~keep.bool().repeat_interleave(E // g, dim=1), 0.0)
    idx = torch.topk(choice, k, dim=-1).indices
    w = scores.gather(1, idx)
    if r.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, w * r.routed_scaling_factor, choice


def _route_sigmoid_group(logits: torch.Tensor, moe: MoESpec, bias: Optional[torch.Tensor]):
    """DeepSeek-V3 / Kimi-K2 / GLM-4.5: sigmoid scores; the correction bias is added for selection
    only; group score = sum of the top-2 biased scores in the group; masked groups get -inf; the
    gate weights are the unbiased scores of the chosen experts, renormalised if norm_topk_prob,
    then times routed_scaling_factor."""
    r, k, E = moe.router, moe.top_k, moe.num_experts
    scores = torch.sigmoid(logits)  # [T, E]
    choice = scores + bias if bias is not None else scores
    g = r.n_group
    if g > 1:
        group = choice.view(-1, g, E // g).topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        keep = torch.zeros_like(group).scatter_(1, torch.topk(group, r.topk_group, dim=-1).indices, 1.0)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(E // g, dim=1), float("-inf"))
    idx = torch.topk(choice, k, dim=-1).indices  # [T, K]
    w = scores.gather(1, idx)
    if r.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + r.norm_eps)
    return idx, w * r.routed_scaling_factor, choice.masked_fill(torch.isinf(choice), float("nan"))


def _route_sparsemixer(logits: torch.Tensor, eps: float, k: int):
    """Phi-MoE's sparsemixer at inference (top-2). First expert: the best logit; its weight is the
    softmax over the experts whose logit is within a relative margin 2*eps of it. Second expert:
    the same with the first masked out."""
    if k != 2:
        raise MoetoolError(f"Phi-MoE's sparsemixer router is defined for top-2, config has top-{k}")

    def pick(candidates: torch.Tensor):
        top, best = candidates.max(dim=-1, keepdim=True)  # [T, 1]
        factor = logits.abs().clamp(min=top)
        far = ((top - logits) / factor) > (2 * eps)
        return best, torch.softmax(candidates.masked_fill(far, float("-inf")), dim=-1).gather(-1, best)

    first, w1 = pick(logits)
    second, w2 = pick(torch.scatter(logits, -1, first, float("-inf")))
    return torch.cat((first, second), dim=-1), torch.cat((w1, w2), dim=-1), logits


# --- experts ------------------------------------------------------------------------------------

# Families whose fused experts are stored for x @ W ([E, D, 2F] and [E, F, D]).
TRANSPOSED_EXPERTS = ("gpt_oss", "llama4", "openai_privacy_filter", "aria_text", "aria")

class Experts:
    """Loads one routed expert's weights in Linear orientation: gate [F, D], up [F, D], down [D, F]
    (+ biases), from per-expert tensors or any fused layout, reading only that expert's bytes."""

    def __init__(self, store: WeightStore, names: Names, layer: int, family: str, F: int, dtype, device):
        self.store, self.family, self.F, self.dtype, self.device = store, family, F, dtype, device
        find = lambda *s: names.find(layer, *s, required=False)
        self.per_expert = {}
        for proj, keys in (("gate", ("w1", "gate_proj")), ("up", ("w3", "up_proj")), ("down", ("w2", "down_proj"))):
            for moe in ("block_sparse_moe", "mlp", "feed_forward", "mixer", "ffn"):
                for key in keys:
                    n = f"{names.layers}{layer}.{moe}.experts.0.{key}.weight"
                    if n in store:
                        self.per_expert[proj] = n.replace(".experts.0.", ".experts.{e}.")
        self.gate_up = find("mlp.experts.gate_up_proj", "experts.gate_up_proj", "feed_forward.experts.gate_up_proj",
                            "block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.input_linear.weight",
                            "mlp.input_linear.weight", "mlp.experts.fc1.weight",  # Aria: fc1 [E, D, 2F], fc2 [E, F, D]
                            "mlp.experts.w13_weight")  # Inkling 2 as published: [E, 2F, D], gate and up interleaved
        self.down = find("mlp.experts.down_proj", "experts.down_proj", "feed_forward.experts.down_proj",
                         "block_sparse_moe.experts.down_proj", "block_sparse_moe.output_linear.weight",
                         "mlp.output_linear.weight", "mlp.experts.fc2.weight", "mlp.experts.w2_weight")
        self.dbrx = {p: find(f"ffn.experts.mlp.{p}") for p in ("w1", "v1", "w2")}
        # Step-3.7 as published: one stacked tensor per projection, [E, F, D] / [E, F, D] / [E, D, F]
        self.stacked = {p: find(f"moe.{p}_proj.weight") for p in ("gate", "up", "down")}
        self.up_only = find("mixer.experts.up_proj")  # Nemotron-H: ungated [E, F, D] (with down_proj)
        if self.up_only:
            self.down = find("mixer.experts.down_proj")
        self.gate_up_bias = find("mlp.experts.gate_up_proj_bias")
        self.down_bias = find("mlp.experts.down_proj_bias")
        if not (len(self.per_expert) == 3 or (self.gate_up and self.down) or all(self.dbrx.values())
                or (self.up_only and self.down) or set(self.per_expert) == {"up", "down"} or all(self.stacked.values())):
            raise BadCheckpoint(f"layer {layer}: cannot find the routed experts' weights")

    def load(self, e: int):
        g = lambda name, **kw: self.store.get(name, self.dtype, device=self.device, **kw)
        gb = ub = db = None
        if len(self.per_expert) == 3:
            gate, up, down = (g(self.per_expert[p].format(e=e)) for p in ("gate", "up", "down"))
        elif all(self.stacked.values()):
            gate, up, down = (g(self.stacked[p], index=e) for p in ("gate", "up", "down"))
        elif self.up_only or set(self.per_expert) == {"up", "down"}:  # ungated: down(act(up x))
            gate = None
            up, down = ((g(self.up_only, index=e), g(self.down, index=e)) if self.up_only else
                        (g(self.per_expert["up"].format(e=e)), g(self.per_expert["down"].format(e=e))))
        elif all(self.dbrx.values()):  # DBRX: [E*F, D]; w2 holds down transposed
            gate, up = g(self.dbrx["w1"], index=e, rows=self.F), g(self.dbrx["v1"], index=e, rows=self.F)
            down = g(self.dbrx["w2"], index=e, rows=self.F).t()
        else:
            gu, dn = g(self.gate_up, index=e), g(self.down, index=e)
            transposed = self.family in TRANSPOSED_EXPERTS and self.gate_up in self.store.tensors
            if transposed:  # stored for x @ W: [D, 2F] and [F, D]
                gu, dn = gu.t(), dn.t()
            else:  # either orientation, as transformers' Transpose(check_dims) loads Qwen3-VL-MoE's experts
                gu = gu.t() if gu.shape[0] != 2 * self.F and gu.shape[-1] == 2 * self.F else gu
                dn = dn.t() if dn.shape[-1] != self.F and dn.shape[0] == self.F else dn
            if self.family == "gpt_oss" or self.gate_up.endswith(".w13_weight"):  # gate and up interleaved along the 2F outputs
                gate, up = gu[0::2], gu[1::2]
                if self.gate_up_bias:
                    b = g(self.gate_up_bias, index=e)
                    gb, ub = b[0::2], b[1::2]
                    db = g(self.down_bias, index=e)
            else:
                gate, up = gu[: self.F], gu[self.F:]
                if self.gate_up_bias:  # concatenated [gate | up] biases (OpenAI's privacy filter)
                    gb, ub = g(self.gate_up_bias, index=e).split(self.F)
                    db = g(self.down_bias, index=e)
            down = dn
        return gate, up, down, gb, ub, db


# A dense MLP's / shared expert's projections under their stored names: transformers', then the original
# checkpoints' as save_pretrained writes them back (HY-V4: linear_gate; DeepSeek-V4: w1 / w3 / w2).
MLP_NAMES = {"gate": ("gate_proj", "linear_gate", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2"),
             "gate_up": ("gate_up_proj",)}

GATE_ACTIVATIONS = {"sigmoid": torch.sigmoid, "softplus": F_.softplus}  # attention output gates


def depth_scaled_add(x: torch.Tensor, f: torch.Tensor, n: int) -> torch.Tensor:
    """Beam's n-th residual add (n from 2): the residual times sqrt((n-1)/n) plus the branch over sqrt(n)."""
    return f * (1.0 / math.sqrt(n)) + x * math.sqrt((n - 1) / n)


# Per-position query scale [T] of NoPE layers (ForwardConfig.query_scale_nope), positions from 0.
QUERY_SCALES = {"beam": lambda pos: torch.exp(0.1 * torch.log1p((pos + 1) / 2048))}  # scalable softmax


def query_scale(kind: str, pos: torch.Tensor) -> torch.Tensor:
    return QUERY_SCALES[kind](pos)


# transformers' ACT2FN names (activations.py) for the gate of a gated FFN.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F_.silu, "swish": F_.silu,
    "gelu": lambda x: F_.gelu(x), "gelu_pytorch_tanh": lambda x: F_.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F_.relu, "relu2": lambda x: torch.square(F_.relu(x)), "relu6": F_.relu6,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "mish": F_.mish,
}


def glu(g: torch.Tensor, u: torch.Tensor, act: str = "silu", limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """The expert's intermediate activation from its gate and up projections: act(gate) * up
    (ungated experts, Nemotron-H: act(up))."""
    if g is None:
        return ACTIVATIONS[act](u)
    if act.startswith("clamped_"):  # HY-V4, DeepSeek-V4: act(gate clamped above) * (up clamped to +-limit);
        # Step-3.7's "silu_clamped" clamps after the silu instead
        return ACTIVATIONS[act[len("clamped_"):]](g.clamp(max=limit)) * u.clamp(min=-limit, max=limit)
    if act == "softcapped_swiglu":  # Inkling 2: cap*tanh(g/cap) * sigmoid(g) * cap'*tanh(u/cap'), cap = limit, cap' = alpha
        gf, uf = g.float(), u.float()
        return (torch.tanh(gf / limit) * limit * torch.sigmoid(gf) * (torch.tanh(uf / alpha) * alpha)).to(g.dtype)
    if act == "gpt_oss":  # clamped SwiGLU with (up + 1)
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(g * alpha))
    if act == "silu_clamped":  # Step-3.7: silu(gate) clamped above (after the silu), up clamped both ways
        return F_.silu(g).clamp(max=limit) * u.clamp(min=-limit, max=limit)
    return ACTIVATIONS[act](g) * u


def swiglu(x, gate, up, down, gb=None, ub=None, db=None, act: str = "silu", limit: float = 7.0, alpha: float = 1.702):
    if gate is not None and act in ("silu", "swish"):  # silu(gate) * up in place on the fresh gate output: same values
        h = F_.silu(linear(x, gate, gb), inplace=True).mul_(linear(x, up, ub))
    else:
        h = glu(None if gate is None else linear(x, gate, gb), linear(x, up, ub), act, limit, alpha)  # [n, F]
    return linear(h, down, db)  # [n, D]


# --- the decoder --------------------------------------------------------------------------------

class Decoder:
    def __init__(self, spec: ModelSpec, fc: ForwardConfig, store: WeightStore, *, dtype=torch.float32,
                 device="cpu", router_dtype=torch.float32, progress: Optional[Callable[[int, int], None]] = None,
                 ffn_hook: Optional[Callable] = None):
        self.spec, self.fc, self.store = spec, fc, store
        self.names = Names(store, fc.name_aliases)
        self.dtype, self.device, self.router_dtype = dtype, torch.device(device), router_dtype
        self.progress = progress
        # ffn_hook(decoder, layer, h [T, D], routing: (experts [T, K], weights [T, K]) or None for a
        # dense FFN) sees every FFN's input; quantize-report scores experts there, layer by layer.
        self.ffn_hook = ffn_hook
        # route_hook(layer, experts [T, K], weights [T, K]) -> (experts, weights): what-if routing
        # (moetool whatif); None in every normal forward.
        self.route_hook: Optional[Callable] = None
        # A KV cache (forward/cache.py) while `run` continues a sequence: per layer, the keys and
        # values after RoPE (and the mixers' recurrent state); `past` tokens are already in it.
        self.cache = None
        self.past = 0
        # The length of the whole sequence being generated: DeepSeek-V3.2's indexer breaks top-k ties
        # over rows of this length in every forward of a generation (forward/indexer.py); None: T.
        self.index_width: Optional[int] = None
        # GLM-5: the keys the last "full" indexer layer kept [T, S]; its "shared" layers reuse them
        self._index_keep: Optional[torch.Tensor] = None
        self.token_ids: Optional[torch.Tensor] = None  # the ids `embed` read (DeepSeek-V4's hash routers)

    def w(self, name: Optional[str]) -> Optional[torch.Tensor]:
        return self.store.get_optional(name, self.dtype, device=self.device)

    def embed(self, ids: list[int]) -> torch.Tensor:
        if self.fc.gemma4 is not None:  # Gemma 4: embedding scale, per-layer inputs (forward/gemma4.py)
            from .gemma4 import embed

            return embed(self, ids)
        return self.embed_rows(ids)

    def embed_rows(self, ids: list[int]) -> torch.Tensor:
        name = self.names.embed
        t = self.store.tensors[name]
        if any(not 0 <= i < t.shape[0] for i in ids):
            raise MoetoolError(f"token id out of range for the embedding ({t.shape[0]} rows)")
        if t.dtype in ("F32", "BF16", "F16"):
            rows = {i: self.store.get(name, self.dtype, index=i, device=self.device) for i in sorted(set(ids))}
            x = torch.stack([rows[i] for i in ids])  # [T, D]: only the prompt's rows are read
        else:
            x = self.store.get(name, self.dtype, device=self.device)[torch.tensor(ids)]
        if self.fc.embed_norm:  # Inkling: an RMSNorm inside the embedding
            x = norm(x, self.w(self.names.find_root(*self.fc.embed_norm)), None, self.fc)
        x = x * self.fc.embedding_multiplier if self.fc.embedding_multiplier != 1.0 else x
        self.token_ids = torch.tensor(ids)  # DeepSeek-V4's hash routers choose experts by token id
        return hyper.streams(x, self.fc.hyper) if self.fc.hyper else x  # hyper-connections: [T, N, D]

    def run(self, ids: list[int], record: bool = True, last_layer: Optional[int] = None,
            cache=None) -> ForwardResult:
        """Run `ids` through the layers. With a `cache` (forward/cache.py's KVCache) the tokens
        continue the sequence the cache holds (positions cache.past ...), and each layer's new keys,
        values and recurrent state are added to it."""
        T = len(ids)
        self.cache, self.past = cache, (cache.past if cache is not None else 0)
        try:
            out = self._run(ids, T, record, last_layer)
        finally:
            self.cache, self.past = None, 0
        if cache is not None:
            cache.past += T
        return out

    def _run(self, ids: list[int], T: int, record: bool, last_layer: Optional[int]) -> ForwardResult:
        fc = self.fc
        self.token_ids = ids  # Qwen4-Exp's per-layer n-gram embedding reads them
        x = self.embed(ids)  # [T, D]
        cos, sin = rope_tables(fc, T, self.device, self.past)
        routes: list[LayerRoute] = []
        self.attention_routes: Optional[list] = [] if record else None  # moa.py records there
        masks: dict = {}
        n = fc.layers if last_layer is None else min(fc.layers, last_layer + 1)
        for i in range(n):
            try:
                x = self.layer(i, x, cos, sin, masks, routes, record)
            except RuntimeError as e:  # a tensor whose shape disagrees with config.json
                msg = str(e).splitlines()[0] if str(e) else ""
                if "alloc" in msg or not any(k in msg for k in ("shape", "size", "mat1", "dimension")):
                    raise
                raise BadCheckpoint(f"layer {i}: a tensor's shape disagrees with config.json ({msg[:160]})") from None
            self.store.release()
            if self.progress:
                self.progress(i + 1, n)
        if n < fc.layers:  # stopped early: no logits
            return ForwardResult(logits=None, routes=routes, bytes_read=self.store.bytes_read,
                                 attention_routes=self.attention_routes or [])
        x = self._final(x).cpu()  # the result lives on the host, whatever the device (routes too)
        return ForwardResult(logits=x, routes=routes, bytes_read=self.store.bytes_read,
                             attention_routes=self.attention_routes or [])

    def layer(self, i: int, x, cos, sin, masks, routes, record):
        fc, n = self.fc, self.names
        find = lambda *s, required=True: n.find(i, *s, required=required)
        if fc.single_block:  # Nemotron-H: one sublayer per layer
            return self.block(i, x, cos, sin, masks, routes, record)
        if fc.hyper:  # HY-V4, DeepSeek-V4: x holds several residual streams [T, N, D] (forward/hyper.py)
            return hyper.layer(self, i, x, cos, sin, masks, routes, record)
        if fc.qwen4_exp:  # Qwen4-Exp: residual streams, PLE (forward/qwen4_exp.py)
            from . import qwen4_exp

            return qwen4_exp.layer(self, i, x, cos, sin, masks, routes, record)
        if fc.family == "longcat_flash":  # two attention + MLP sublayers and a shortcut MoE (forward/longcat.py)
            from .longcat import longcat_layer

            return longcat_layer(self, i, x, cos, sin, masks, routes, record)
        if fc.family == "zaya":  # CCA attention, a router MLP with a state across layers (forward/zaya.py)
            from .zaya import zaya_layer

            return zaya_layer(self, i, x, cos, sin, masks, routes, record)
        if fc.gemma4 is not None:  # per-layer inputs, KV sharing, MoE beside the dense MLP (forward/gemma4.py)
            from .gemma4 import layer

            return layer(self, i, x, masks, routes, record)
        if fc.inkling is not None:  # relative logits, short convolutions, block attention residuals (forward/inkling.py)
            from . import inkling

            return inkling.layer(self, i, x, masks, routes, record)
        if fc.muse_spark is not None:  # residual gates, projected experts (forward/muse_spark.py)
            from . import muse_spark

            return muse_spark.layer(self, i, x, cos, sin, masks, routes, record)
        # Norms around the attention and the FFN (fc.layer_norms): before / after each, None if absent.
        pre_a, post_a, pre_f, post_f = fc.layer_norms

        def nrm(name, t: torch.Tensor) -> torch.Tensor:
            if name is None:
                return t
            names = (name,) if isinstance(name, str) else name  # alternatives: transformers' and the original name
            if fc.gated_norms:  # A.X-K2: a gated RMSNorm where <name>.norm.weight is stored
                gated = find(*(n + ".norm.weight" for n in names), required=False)
                if gated:
                    y = norm(t, self.w(gated), None, fc)
                    # fc1 [rank, D] and fc2 [D, rank]; W_down and W_up in the released checkpoints
                    fc1 = find(*(n + s for n in names for s in (".mlp.fc1.weight", ".W_down.weight")))
                    fc2 = find(*(n + s for n in names for s in (".mlp.fc2.weight", ".W_up.weight")))
                    g = linear(F_.silu(linear(y, self.w(fc1))), self.w(fc2))
                    return (y * torch.sigmoid(g.float())).to(y.dtype)
            return norm(t, self.w(find(*(n + ".weight" for n in names))),
                        self.w(find(*(n + ".bias" for n in names), required=False)), fc)

        h = nrm(pre_a, x)
        a = nrm(post_a, self.attention(i, h, cos, sin, masks))
        if fc.parallel_block:  # Cohere: attention and FFN both read norm(x); one residual for both
            x = x + a
        else:
            if fc.normed_residual:  # MiniMax: the residual is the normalised input, both branches scaled
                alpha, beta = fc.normed_residual[self.spec.layers[i].mixer]
                x = h * alpha + a * beta
            elif fc.depth_scaled_residual:  # Beam: residual add number 2(i+1) of the network
                x = depth_scaled_add(x, a, 2 * (i + 1))
            else:
                x = x + a * fc.residual_multiplier if fc.residual_multiplier != 1.0 else x + a
            h = nrm(pre_f, x)
        if self.spec.layers[i].moe:
            f = self.moe(i, h, routes, record)
        else:
            if self.ffn_hook:
                self.ffn_hook(self, i, h, None)
            if find("shared_mlp.input_linear.weight", required=False):  # Granite-4.0 without experts
                f = self.shared_mlp(i, h)
            elif find("feed_forward.w1.weight", required=False):  # LFM2: w1 / w3 / w2
                f = swiglu(h, *(self.w(find(f"feed_forward.{q}.weight")) for q in ("w1", "w3", "w2")), act=fc.expert_act)
            else:  # mlp / feed_forward; Kimi Linear's dense layers as saved: block_sparse_moe
                base = find("mlp.gate_proj.weight", "feed_forward.gate_proj.weight",
                            "block_sparse_moe.gate_proj.weight", "mlp.gate_up_proj.weight").rsplit(".", 2)[0] + "."
                f = self.gated_mlp(base, h, fc.limit_of(i, 1))
        f = nrm(post_f, f)
        if fc.normed_residual:
            alpha, beta = fc.normed_residual["ffn"]
            return h * alpha + f * beta
        if fc.depth_scaled_residual:
            return depth_scaled_add(x, f, 2 * (i + 1) + 1)
        return x + f * fc.residual_multiplier if fc.residual_multiplier != 1.0 else x + f

    def block(self, i: int, x, cos, sin, masks, routes, record):
        """A layer with one sublayer (Nemotron-H): x + sublayer(norm(x)), the sublayer being the
        layer's mixer (Mamba-2, attention), or for mixer "none" its MoE or dense MLP."""
        fc, find = self.fc, (lambda *s, required=True: self.names.find(i, *s, required=required))
        h = norm(x, self.w(find("norm.weight")), None, fc)
        layer = self.spec.layers[i]
        if layer.mixer != "none":
            return x + self.attention(i, h, cos, sin, masks)
        if layer.moe:
            return x + self.moe(i, h, routes, record)
        if self.ffn_hook:
            self.ffn_hook(self, i, h, None)
        up, down = find("mixer.up_proj.weight"), find("mixer.down_proj.weight")
        bias = lambda name: self.w(find(name[: -len("weight")] + "bias", required=False))
        return x + swiglu(h, None, self.w(up), self.w(down), None, bias(up), bias(down), fc.expert_act)

    def attention(self, i: int, h, cos, sin, masks) -> torch.Tensor:
        fc, find = self.fc, (lambda *s, required=True: self.names.find(i, *s, required=required))
        T = h.shape[0]
        H, Hkv, Dh, Dv = fc.dims_of(i)
        if self.spec.layers[i].mixer in mixers.KINDS:  # Mamba, Gated DeltaNet, ...: forward/mixers/
            block = next((m for m in masks.values() if isinstance(m, Segments)), None)
            if block is not None:  # a block of prompts (profile): each prompt's recurrence starts afresh
                return torch.cat([mixers.run(self, i, h[a:b]) for a, b, _ in block.parts])
            return mixers.run(self, i, h, self.cache.layer(i) if self.cache is not None else None)
        if fc.sparse_variant:  # Mistral-Large-4 (forward/sparse_variants.py)
            return sparse_variants.attention(self, i, h, cos, sin, masks)
        if fc.mla:
            return self.mla(i, h, cos, sin, masks)
        if fc.deepseek_v4:  # shared-KV attention with HCA / CSA compressors (forward/deepseek_v4.py)
            from .deepseek_v4 import attention as deepseek_v4_attention

            return deepseek_v4_attention(self, i, h, masks)
        if fc.family == "jetmoe":  # mixture of attention heads (forward/moa.py)
            return moa_attention(self, i, h, cos, sin, masks, apply_rope, attention_mask, sdpa)
        if fc.family == "dbrx":
            qkv = linear(h, self.w(find("norm_attn_norm.attn.Wqkv.weight")))
            if fc.clip_qkv:
                qkv = qkv.clamp(-fc.clip_qkv, fc.clip_qkv)
            q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
            o_name, o_bias = find("norm_attn_norm.attn.out_proj.weight"), None
        else:
            p = fc.attn_prefix
            q = linear(h, self.w(find(p + "q_proj.weight")), self.w(find(p + "q_proj.bias", required=False)))
            if fc.attn_output_gate:  # per head: [query (Dh), gate (Dh)]
                q, gate = q.view(T, H, 2 * Dh).chunk(2, dim=-1)
                q, gate = q.reshape(T, H * Dh), gate.reshape(T, H * Dh)
            k = linear(h, self.w(find(p + "k_proj.weight")), self.w(find(p + "k_proj.bias", required=False)))
            v = linear(h, self.w(find(p + "v_proj.weight")), self.w(find(p + "v_proj.bias", required=False)))
            if fc.qk_norm == "full":  # OLMoE: RMSNorm over the whole projection
                q = rms_norm(q, self.w(find(p + "q_norm.weight")), fc.eps)
                k = rms_norm(k, self.w(find(p + "k_norm.weight")), fc.eps)
            if fc.clip_qkv:
                q, k, v = (t.clamp(-fc.clip_qkv, fc.clip_qkv) for t in (q, k, v))
            o_name, o_bias = find(p + "o_proj.weight", p + "out_proj.weight"), find(p + "o_proj.bias", required=False)
        if q.shape[-1] != H * Dh or k.shape[-1] != Hkv * Dh or v.shape[-1] != Hkv * Dv:
            raise BadCheckpoint(f"layer {i}: the q/k/v projections give {q.shape[-1]}/{k.shape[-1]}/{v.shape[-1]} "
                                f"features, config.json implies {H * Dh}/{Hkv * Dh}/{Hkv * Dv} "
                                "(num_attention_heads, num_key_value_heads, head_dim)")
        q, k, v = q.view(T, H, Dh), k.view(T, Hkv, Dh), v.view(T, Hkv, Dv)
        if fc.value_scale != 1.0:  # MiMo-V2-Flash
            v = v * fc.value_scale
        if fc.qk_norm == "head":  # Qwen3 / GLM: RMSNorm per head
            q = norm(q, self.w(find("self_attn.q_norm.weight", "self_attn.q_layernorm.weight")), None, fc)
            k = norm(k, self.w(find("self_attn.k_norm.weight", "self_attn.k_layernorm.weight")), None, fc)
        if fc.use_rope[i]:
            rope, cos, sin = self.layer_rope(i, T, cos, sin)
            r = rope.dim
            if r == q.shape[-1] and r == k.shape[-1]:  # full rotary: nothing to concatenate
                q, k = apply_rope(q, cos, sin, rope.layout), apply_rope(k, cos, sin, rope.layout)
            else:
                q = torch.cat((apply_rope(q[..., :r], cos, sin, rope.layout), q[..., r:]), dim=-1)
                k = torch.cat((apply_rope(k[..., :r], cos, sin, rope.layout), k[..., r:]), dim=-1)
            if fc.qk_norm == "l2":  # Llama 4: weightless RMS norm after RoPE, RoPE layers only
                q, k = rms_norm(q, None, fc.eps), rms_norm(k, None, fc.eps)
        elif fc.temperature_tuning:  # Llama 4 NoPE layers: position-dependent query scale
            floor, scale = fc.temperature_tuning
            pos = torch.arange(self.past, self.past + T, dtype=torch.float32, device=q.device)
            if getattr(self, "positions", None) is not None:  # a block of prompts: per-prompt positions
                pos = self.positions.to(device=q.device, dtype=torch.float32)
            q = (q * (torch.log1p(torch.floor((pos + 1.0) / floor)) * scale + 1.0)[:, None, None]).to(q.dtype)
        if fc.qk_norm == "head_after_rope":  # HunYuan: RMSNorm per head after RoPE
            q = rms_norm(q, self.w(find("self_attn.query_layernorm.weight")), fc.eps)
            k = rms_norm(k, self.w(find("self_attn.key_layernorm.weight")), fc.eps)
        window = fc.windows[i]
        chunk = fc.chunk if (fc.chunk and fc.use_rope[i]) else None
        key = (window, chunk)
        if key not in masks:
            masks[key] = attention_mask(T, window, chunk, q.device, fc.bidirectional, past=self.past)
        if self.cache is not None:  # keys and values of the earlier tokens, after RoPE
            k, v = self.cache.extend(i, k=k, v=v)
        # attention sinks [H] (gpt-oss, Flint, GraniteMoE-SWA, MiMo-V2-Flash's sliding layers), under either name
        sinks = self.w(find("self_attn.sinks", "self_attn.softmax_offset", "self_attn.attention_sink_bias",
                            required=False))
        if fc.query_scale_nope and not fc.use_rope[i]:  # Beam: NoPE layers scale queries by position
            q = q * query_scale(fc.query_scale_nope, self._positions(T, q.device))[:, None, None].to(q.dtype)
        mask = masks[key]
        if fc.qwen4_exp and fc.qwen4_exp["qsa"]:  # Qwen4-Exp: the tokens its QSA indexer keeps
            from .qwen4_exp import qsa_keep

            mask = qsa_keep(self, i, h, cos, sin, mask)
        if fc.block_sparse and i in fc.block_sparse["layers"]:  # MiniMax-M3: the key blocks its indexer keeps
            mask = block_sparse_keep(lambda *s: self.w(find(*s)), i, h, cos, sin, mask, fc.block_sparse, H, fc.eps)
        out = sdpa(q, k, v, mask, fc.attn_scale, sinks).reshape(T, H * Dv)
        if fc.attn_output_gate:
            out = out * torch.sigmoid(gate)
        if fc.out_gate:
            out = self.output_gate(i, h, out, H)
        return linear(out, self.w(o_name), self.w(o_bias))

    def output_gate(self, i: int, h: torch.Tensor, out: torch.Tensor, H: int) -> torch.Tensor:
        """out [T, H * Dv] times act(gate projection of the layer input): one gate per channel
        ([H * Dv, D] weight) or per head ([H, D]), plus a per-head bias where stored (Beam).
        AFMoE / Beam: sigmoid; Laguna: softplus (forward/config.py `out_gate`)."""
        g, T = self.fc.out_gate, h.shape[0]
        gate = linear(h, self.w(self.names.find(i, *g["proj"]))).view(T, H, -1)  # [T, H, Dv] or [T, H, 1]
        bias = self.names.find(i, g["bias"], required=False) if g.get("bias") else None
        if bias:
            gate = gate + self.w(bias).view(1, H, 1)
        gate = GATE_ACTIVATIONS[g["act"]](gate.float()).to(out.dtype)
        return (out.view(T, H, -1) * gate).reshape(T, -1)

    def _positions(self, T: int, device) -> torch.Tensor:
        pos = getattr(self, "positions", None)  # a block of prompts (profile): per-prompt positions
        past = getattr(self, "past", 0)  # generation with a KV cache: these tokens continue at `past`
        return (torch.arange(past, past + T) if pos is None else pos).to(device=device, dtype=torch.float32)

    def layer_rope(self, i: int, T: int, cos, sin):
        """Layer i's RoPE and its cos / sin: the model's (the tables given), or the layer type's own
        (fc.layer_rope: RoPE parameters per layer type), tabled at the same positions."""
        rope = self.fc.rope_of(i)
        if rope is self.fc.rope:
            return rope, cos, sin
        inv, factor = rope.inv_freq_and_factor(T)
        freqs = torch.outer(self._positions(T, "cpu"), inv)
        return rope, (freqs.cos() * factor).to(self.device), (freqs.sin() * factor).to(self.device)

    def mla(self, i: int, h, cos, sin, masks, prefix: str = "self_attn.") -> torch.Tensor:
        """Multi-head latent attention (DeepSeek-V2/V3), in its naive (decompressed) form; `prefix`: where
        its weights are (LongCat-Flash: self_attn.0. and self_attn.1.)."""
        fc, m = self.fc, self.fc.mla
        find = lambda *s, required=True: self.names.find(i, *s, required=required)
        T, H = h.shape[0], fc.heads
        nope, r, v_dim, kvr = m["nope"], m["rope"], m["v"], m["kv_lora"]
        if m["q_lora"]:
            qa = linear(h, self.w(find(prefix + "q_a_proj.weight")), self.w(find(prefix + "q_a_proj.bias", required=False)))
            q_resid = rms_norm(qa, self.w(find(prefix + "q_a_layernorm.weight")), m.get("eps", 1e-6))  # [T, Rq]
            if m.get("q_gate"):  # A.X-K2: query and output gate [T, H, qk + v] from [normed | raw] latent
                qg = linear(torch.cat((q_resid, qa), dim=-1),  # q_b_proj: the released checkpoints' name
                            self.w(find(prefix + "q_gate_proj.weight", prefix + "q_b_proj.weight")))
                q, gate = qg.view(T, H, nope + r + v_dim).split([nope + r, v_dim], dim=-1)
                q = q.contiguous()
            else:
                q = linear(q_resid, self.w(find(prefix + "q_b_proj.weight")))
        else:
            q = linear(h, self.w(find(prefix + "q_proj.weight")))
        q = q.view(T, H, nope + r)  # [T, H, nope + rope]
        if m.get("q_scale"):  # LongCat-Flash: LoRA scaling sqrt(D / rank) of the query and the KV latent
            q = q * m["q_scale"]
        kv = linear(h, self.w(find(prefix + "kv_a_proj_with_mqa.weight")),
                    self.w(find(prefix + "kv_a_proj_with_mqa.bias", required=False)))  # [T, Rkv + rope]
        latent, k_rot = kv.split([kvr, r], dim=-1)
        latent = rms_norm(latent, self.w(find(prefix + "kv_a_layernorm.weight")), m.get("eps", 1e-6))
        if m.get("kv_scale"):
            latent = latent * m["kv_scale"]
        kvb = linear(latent, self.w(find(prefix + "kv_b_proj.weight"))).view(T, H, nope + v_dim)
        k_nope, v = kvb.split([nope, v_dim], dim=-1)
        q_rot, k_rot = q[..., nope:], k_rot.view(T, 1, r)
        if fc.use_rope[i]:  # Kimi Linear's MLA is NoPE
            q_rot, k_rot = apply_rope(q_rot, cos, sin, fc.rope.layout), apply_rope(k_rot, cos, sin, fc.rope.layout)
        k_rot = k_rot.expand(T, H, r)
        q = torch.cat((q[..., :nope], q_rot), dim=-1)
        k = torch.cat((k_nope, k_rot), dim=-1)
        if fc.q_position_scale:  # Mistral 4 (llama_4_scaling_beta)
            beta, orig = fc.q_position_scale
            pos = torch.arange(self.past, self.past + T, dtype=torch.float32, device=q.device)
            q = q * (1 + beta * torch.log(1 + torch.floor(pos / orig)))[:, None, None].to(q.dtype)
        if (None, None) not in masks:
            masks[(None, None)] = attention_mask(T, None, None, q.device, past=self.past)
        mask = masks[(None, None)]
        if self.cache is not None:  # the decompressed per-head keys and values of the earlier tokens
            k, v = self.cache.extend(i, k=k, v=v)
        if fc.indexer:  # DeepSeek-V3.2: attend only to the keys the sparse-attention indexer keeps (GLM-5's
            # "shared" layers: the keys the last full layer kept); per prompt in a profile block
            mask = sparse_variants.index_keep(self, i, h, cos, sin, mask, q_resid=q_resid)
        sinks = self.w(find(prefix + "sinks", prefix + "learnable_sink_param")) if m.get("sinks") else None  # HY-V4
        out = sdpa(q, k, v, mask, fc.attn_scale, sinks).reshape(T, H * v_dim)
        if m.get("q_gate"):
            out = (out * torch.sigmoid(gate.reshape(T, H * v_dim).float())).to(out.dtype)
        if m.get("out_gate"):  # HY-V4: a sigmoid gate per channel from the layer input, gate_proj [H * v, D]
            out = out * torch.sigmoid(linear(h, self.w(find(prefix + "gate_proj.weight", prefix + "linear_gate.weight"))))
        elif fc.out_gate:  # Ling 3.0: a head-wise sigmoid gate from its own projection
            out = self.output_gate(i, h, out, H)
        return linear(out, self.w(find(prefix + "o_proj.weight")), self.w(find(prefix + "o_proj.bias", required=False)))

    def moe(self, i: int, h, routes: list, record: bool) -> torch.Tensor:
        fc, moe, find = self.fc, self.spec.moe, (lambda *s, required=True: self.names.find(i, *s, required=required))
        rw = find("block_sparse_moe.gate.weight", "mlp.gate.weight", "mlp.router.gate.weight", "mlp.router.weight",
                  "feed_forward.router.weight",
                  "block_sparse_moe.router.layer.weight", "ffn.router.layer.weight", "mlp.gate.wg.weight",
                  "mlp.router.layer.weight", "block_sparse_moe.router.weight", "feed_forward.gate.weight",
                  "mixer.gate.weight", "moe.gate.weight", "ffn.gate.weight")
        rb = find("mlp.router.bias", required=False)
        router_w = self.store.get(rw, self.router_dtype, device=self.device)
        if rw.endswith(".mlp.gate.weight") and find("mlp.gate.weight_1", required=False):
            router_w = router_w.t()  # ERNIE-4.5-VL as published: text (weight) and vision (weight_1) routers [D, E]
        router_b = self.store.get_optional(rb, self.router_dtype, device=self.device)
        check_shape(rw, router_w, (moe.num_experts, h.shape[1]), "[num_experts, hidden_size]")
        logits = linear(h.to(self.router_dtype), router_w, router_b).float()  # [T, E] in fp32
        if fc.router_softcap > 0:  # Laguna: tanh soft-capping of the router logits
            logits = torch.tanh(logits / fc.router_softcap) * fc.router_softcap
        if not torch.isfinite(logits).all():
            raise BadCheckpoint(non_finite_router(i, h, rw, router_w, router_b))
        corr = self.store.get_optional(find("mlp.gate.e_score_correction_bias", "mlp.moe_statics.e_score_correction_bias",
                                            "block_sparse_moe.e_score_correction_bias", "mlp.e_score_correction_bias",
                                            "feed_forward.expert_bias", "mixer.gate.e_score_correction_bias",
                                            "block_sparse_moe.gate.e_score_correction_bias",
                                            "moe.router.expert_bias", "mlp.experts.e_score_correction_bias",
                                            "mlp.expert_bias", "moe.router_bias", "ffn.gate.bias",
                                            required=False),
                                       torch.float32, device=self.device)
        if corr is None and moe.router.correction_bias:
            raise BadCheckpoint(f"layer {i}: the router uses a correction bias (e_score_correction_bias) "
                                "but the checkpoint has none")
        if corr is not None and corr.dim() == 2 and corr.shape[0] == 2:  # ERNIE-4.5-VL as published: [text; vision]
            corr = corr[0]
        corr = corr.reshape(-1) if corr is not None else None  # Ernie 4.5 stores [1, E]
        if fc.family == "deepseek_v4":  # its top-k router, and hash routers by token id (forward/deepseek_v4.py)
            from . import deepseek_v4

            table = find("ffn.gate.tid2eid", "mlp.gate.tid2eid", required=False)
            idx, weights, scores = (deepseek_v4.hash_route(self, table, logits, moe) if table else
                                    deepseek_v4.route(logits, moe, corr))
        else:
            idx, weights, scores = route(logits, moe, fc.family, corr)  # [T, K], [T, K], [T, E]
        if self.route_hook is not None:
            idx, weights = self.route_hook(i, idx, weights)
        if record:
            routes.append(LayerRoute(i, idx.cpu(), weights.float().cpu(), logits.cpu(), scores.float().cpu()))
        if self.ffn_hook:
            self.ffn_hook(self, i, h, (idx, weights))
        experts = Experts(self.store, self.names, i, fc.family, moe.expert_ffn, self.dtype, self.device)
        latent = find("mixer.fc1_latent_proj.weight", required=False)  # Nemotron-H: experts in a smaller space
        h_in, h = h, (linear(h, self.w(latent), self.w(find("mixer.fc1_latent_proj.bias", required=False)))
                      if latent else h)
        out = torch.zeros_like(h)
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # group (token, slot) pairs by expert
        counts = torch.bincount(flat, minlength=moe.num_experts).tolist()
        tokens = (order // moe.top_k)
        w_flat = weights.reshape(-1)[order]
        start = 0
        for e, c in enumerate(counts):
            if not c:
                continue
            tok, w_e = tokens[start:start + c], w_flat[start:start + c]
            start += c
            gate, up, down, gb, ub, db = experts.load(e)
            if fc.family == "llama4":  # the gate scales the expert's input, not its output
                y = swiglu(h[tok] * w_e[:, None].to(h.dtype), gate, up, down, act=fc.expert_act)
            else:
                y = swiglu(h.index_select(0, tok), gate, up, down, gb, ub, db, fc.routed_act or fc.expert_act,
                           fc.limit_of(i, 0), fc.swiglu_alpha)
                if getattr(self, "expert_hook", None):  # profile: ||expert output|| per routed (token, slot) t*K+s (REAP)
                    self.expert_hook(i, e, order[start - c:start], y)
                y.mul_(w_e[:, None].to(y.dtype))  # y is the fresh down-projection output
            out.index_add_(0, tok, y)
            del gate, up, down
            self.store.release()  # this expert's pages leave resident memory before the next one
        if fc.routed_scale != 1.0:  # Laguna, Beam: the routed sum is scaled after the experts
            out = out * fc.routed_scale
        if latent:
            out = linear(out, self.w(find("mixer.fc2_latent_proj.weight")),
                         self.w(find("mixer.fc2_latent_proj.bias", required=False)))
        h = h_in
        ungated = find("mixer.shared_experts.up_proj.weight", required=False)  # Nemotron-H: up, act, down
        if ungated:
            base = ungated[: -len("up_proj.weight")]
            bias = lambda n: self.w(base + n) if base + n in self.store else None
            out = out + swiglu(h, None, self.w(ungated), self.w(base + "down_proj.weight"), None,
                               bias("up_proj.bias"), bias("down_proj.bias"), fc.expert_act)
        shared = find("mlp.shared_expert.gate_proj.weight", "mlp.shared_experts.gate_proj.weight",
                      "feed_forward.shared_expert.gate_proj.weight", "mlp.shared_mlp.gate_proj.weight",
                      "block_sparse_moe.shared_experts.gate_proj.weight",
                      "mlp.shared_experts.gate_up_proj.weight",  # MiniMax-M3: gate and up fused
                      "share_expert.gate_proj.weight",  # Step-3.7
                      "mlp.shared_experts.linear_gate.weight", "ffn.shared_experts.w1.weight",  # HY-V4, DeepSeek-V4 as saved
                      required=False)
        if shared:
            base = shared.rsplit(".", 2)[0] + "."
            s = self.gated_mlp(base, h, fc.limit_of(i, 1))
            sg = find("mlp.shared_expert_gate.weight", required=False)
            if sg:  # Qwen2-MoE: sigmoid-gated shared expert
                s = torch.sigmoid(linear(h, self.w(sg))) * s
            out = out + s if fc.shared_combine == "sum" else (out + s) / 2
        ob = find("mlp.bias", required=False)
        if ob:  # JetMoE: a bias after the routed experts
            out = out + self.w(ob)
        if find("shared_mlp.input_linear.weight", required=False):  # GraniteMoeShared / Granite-4.0
            out = out + self.shared_mlp(i, h)
        if fc.moe_out_norm:  # A.X-K1
            out = norm(out, self.w(find(*(n + ".weight" for n in fc.moe_out_norm))), None, fc)
        return out

    def shared_mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Granite's fused shared MLP: input_linear [2F, D] (gate rows, then up rows), output_linear [D, F]."""
        gate, up = self.w(self.names.find(i, "shared_mlp.input_linear.weight")).chunk(2, dim=0)
        return swiglu(h, gate, up, self.w(self.names.find(i, "shared_mlp.output_linear.weight")), act=self.fc.expert_act)

    def gated_mlp(self, base: str, h: torch.Tensor, limit: Optional[float] = None) -> torch.Tensor:
        """A dense MLP or shared expert `base`{gate,up,down}_proj (biases where stored), or with gate
        and up fused as `base`gate_up_proj [2F, D] (MiniMax-M3); `limit`: its clamp (default swiglu_limit)."""
        fc = self.fc
        limit = fc.swiglu_limit if limit is None else limit
        stored = lambda p: next((base + n + ".weight" for n in MLP_NAMES[p] if base + n + ".weight" in self.store),
                                base + p + "_proj.weight")
        w = lambda p: self.w(stored(p))
        b = lambda p: self.w(base + p + "_proj.bias") if (base + p + "_proj.bias") in self.store else None
        if base + "gate_up_proj.weight" in self.store:
            gate, up = w("gate_up").chunk(2, dim=0)
            return swiglu(h, gate, up, w("down"), None, None, b("down"), fc.expert_act, limit, fc.swiglu_alpha)
        return swiglu(h, w("gate"), w("up"), w("down"), b("gate"), b("up"), b("down"), fc.expert_act, limit,
                      fc.swiglu_alpha)

    def _final(self, x) -> torch.Tensor:
        fc, n = self.fc, self.names
        if fc.hyper:  # the streams [T, N, D] collapsed by the head's mixer
            x = hyper.head(self, x)
        if fc.inkling is not None and fc.inkling.block:  # Inkling 2: the head reads a block attention residual
            from . import inkling

            x = inkling.final_input(self, x)
        if fc.qwen4_exp:  # Qwen4-Exp: the streams' mixer, no final norm
            from .qwen4_exp import final

            x = final(self, x)
        else:
            fw = self.w(n.final_norm + "weight")
            fb = self.w(n.final_norm + "bias") if (n.final_norm + "bias") in self.store else None
            x = norm(x, fw, fb, fc)
        if n.head in self.store:
            head = n.head
        elif self.spec.tie_word_embeddings:  # tied: the embedding is the head
            head = n.embed
        else:
            raise BadCheckpoint(f"checkpoint has no LM head {n.head!r} and tie_word_embeddings is false")
        hb = n.head[: -len("weight")] + "bias"
        logits = self._head(x, head, self.w(hb) if hb in self.store else None)  # [T, V] float32
        if fc.final_softcap > 0:  # Beam: tanh soft-capping of the logits
            logits = torch.tanh(logits / fc.final_softcap) * fc.final_softcap
        if fc.logit_rows and fc.logit_rows < logits.shape[-1]:  # Inkling: a head padded past the real vocabulary
            logits = logits[:, : fc.logit_rows]
        return logits / fc.logits_scaling if fc.logits_scaling != 1.0 else logits

    def _head(self, x, name: str, bias) -> torch.Tensor:
        """x @ head.T in float32. A large head (vocab x hidden over HEAD_BLOCK_BYTES once converted)
        is converted and multiplied in blocks of rows, never whole; logits that cannot fit in the
        available memory are refused in one line."""
        t = self.store.tensors.get(name)
        V = t.shape[0] if t is not None and len(t.shape) == 2 else None
        esize = torch.finfo(self.dtype).bits // 8
        if V is None or t.dtype not in ("F32", "BF16", "F16") or V * t.shape[1] * esize <= HEAD_BLOCK_BYTES:
            return linear(x, self.w(name), bias).float()
        from .weights import available_memory

        need = x.shape[0] * V * 4
        if need > available_memory():
            raise MoetoolError(f"the logits of {x.shape[0]} tokens over a vocabulary of {V:,} need {need / 2**30:.1f} "
                               f"GiB, more than the memory available ({available_memory() / 2**30:.1f} GiB)")
        stored = self.store.raw(name)  # a zero-copy view of the mapped file
        rows = max(1, HEAD_BLOCK_BYTES // (t.shape[1] * esize))
        out = torch.empty(x.shape[0], V, dtype=torch.float32, device=x.device)
        for a in range(0, V, rows):
            w = stored[a:a + rows].to(device=self.device, dtype=self.dtype)
            out[:, a:a + rows] = linear(x, w, None if bias is None else bias[a:a + rows]).float()
            del w
            self.store.release()
        return out
