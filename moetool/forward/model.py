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
from .mixers.common import act as activation
from .config import ForwardConfig
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


@dataclass
class ForwardResult:
    logits: torch.Tensor  # [T, V] float32
    routes: list[LayerRoute] = field(default_factory=list)
    bytes_read: int = 0


# --- names --------------------------------------------------------------------------------------

class Names:
    """Finds the checkpoint's tensor names for each role (families and wrappers differ)."""

    FINAL_NORM_ALIASES = ("final_layernorm.", "embedding_norm.", "norm_f.")  # Jamba, LFM2, Nemotron-H
    EMBED = ("model.embed_tokens.weight", "transformer.wte.weight", "language_model.model.embed_tokens.weight",
             "model.language_model.embed_tokens.weight", "model.embeddings.weight", "backbone.embeddings.weight")

    def __init__(self, store: WeightStore):
        self.store = store
        embed = next((n for n in self.EMBED if n in store.tensors), None)
        if embed is None:
            raise BadCheckpoint("checkpoint has no token embedding (looked for model.embed_tokens.weight, "
                                "transformer.wte.weight)")
        self.embed = embed
        if embed.startswith("transformer."):
            self.layers, self.final_norm = "transformer.blocks.", "transformer.norm_f."
            self.head = "lm_head.weight"
        else:
            root = embed.rsplit(".", 2)[0] + "."  # "model." of model.embed_tokens.weight
            self.layers, self.final_norm = root + "layers.", root + "norm."
            for alt in self.FINAL_NORM_ALIASES:  # families whose final norm has another name
                if root + "norm.weight" not in store and root + alt + "weight" in store:
                    self.final_norm = root + alt
            wrapper = embed.split("model.")[0] if embed.startswith("language_model.") else ""
            self.head = wrapper + "lm_head.weight"

    def find(self, layer: int, *suffixes: str, required: bool = True) -> Optional[str]:
        for s in suffixes:
            name = f"{self.layers}{layer}.{s}"
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
    return x if weight is None else weight * x


def norm(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], fc: ForwardConfig) -> torch.Tensor:
    if fc.norm == "layernorm":
        return F_.layer_norm(x, (x.shape[-1],), w, b, fc.eps)
    if fc.norm_offset and w is not None:  # (1 + w) RMSNorm, in float32 (Qwen3-Next)
        return (rms_norm(x.float(), None, fc.eps) * (fc.norm_offset + w.float())).to(x.dtype)
    return rms_norm(x, w, fc.eps)


def rope_tables(fc: ForwardConfig, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rope_dim / 2] for positions 0..T-1 (cos/sin scaled by the attention factor)."""
    inv, factor = fc.rope.inv_freq_and_factor(T)
    pos = torch.arange(T, dtype=torch.float32)
    freqs = torch.outer(pos, inv)  # [T, r/2]
    return (freqs.cos() * factor).to(device), (freqs.sin() * factor).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """x [T, H, r] rotated by position. `half`: pairs (i, i + r/2); `interleave`: pairs (2i, 2i+1)."""
    dtype = x.dtype
    x = x.float()
    c, s = cos[:, None, :], sin[:, None, :]
    if layout == "half":
        x1, x2 = x.chunk(2, dim=-1)
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    return out.to(dtype)


def attention_mask(T: int, window: Optional[int], chunk: Optional[int], device) -> torch.Tensor:
    """[T, T] bool, True where query i may attend to key j: causal, within the window / chunk."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    allowed = j <= i
    if window:
        allowed &= (i - j) < window
    if chunk:
        allowed &= (i // chunk) == (j // chunk)
    return allowed


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
         sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [T, H, Dq], k [T, Hkv, Dq], v [T, Hkv, Dv] -> [T, H, Dv]. Sinks (gpt-oss): one extra
    logit per head that takes softmax mass and contributes nothing."""
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
    if family == "deepseek_v2":
        return _route_softmax_group(logits, moe)
    if r.scoring == "sparsemixer":
        return _route_sparsemixer(logits, r.jitter_noise, k)
    if r.order == "topk_then_score":
        top, idx = torch.topk(logits, k, dim=-1)  # [T, K]
        w = torch.sigmoid(top) if r.scoring == "sigmoid" else torch.softmax(top, dim=-1)
        return idx, w, logits
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    top, idx = torch.topk(probs, k, dim=-1)  # [T, K]
    if r.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
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

class Experts:
    """Loads one routed expert's weights in Linear orientation: gate [F, D], up [F, D], down [D, F]
    (+ biases), from per-expert tensors or any fused layout, reading only that expert's bytes."""

    def __init__(self, store: WeightStore, names: Names, layer: int, family: str, F: int, dtype, device):
        self.store, self.family, self.F, self.dtype, self.device = store, family, F, dtype, device
        find = lambda *s: names.find(layer, *s, required=False)
        self.per_expert = {}
        for proj, keys in (("gate", ("w1", "gate_proj")), ("up", ("w3", "up_proj")), ("down", ("w2", "down_proj"))):
            for moe in ("block_sparse_moe", "mlp", "feed_forward", "mixer"):
                for key in keys:
                    n = f"{names.layers}{layer}.{moe}.experts.0.{key}.weight"
                    if n in store:
                        self.per_expert[proj] = n.replace(".experts.0.", ".experts.{e}.")
        self.gate_up = find("mlp.experts.gate_up_proj", "feed_forward.experts.gate_up_proj",
                            "block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.input_linear.weight")
        self.down = find("mlp.experts.down_proj", "feed_forward.experts.down_proj",
                         "block_sparse_moe.experts.down_proj", "block_sparse_moe.output_linear.weight")
        self.dbrx = {p: find(f"ffn.experts.mlp.{p}") for p in ("w1", "v1", "w2")}
        self.up_only = find("mixer.experts.up_proj")  # Nemotron-H: ungated [E, F, D] (with down_proj)
        if self.up_only:
            self.down = find("mixer.experts.down_proj")
        self.gate_up_bias = find("mlp.experts.gate_up_proj_bias")
        self.down_bias = find("mlp.experts.down_proj_bias")
        if not (len(self.per_expert) == 3 or (self.gate_up and self.down) or all(self.dbrx.values())
                or (self.up_only and self.down) or set(self.per_expert) == {"up", "down"}):
            raise BadCheckpoint(f"layer {layer}: cannot find the routed experts' weights")

    def load(self, e: int):
        g = lambda name, **kw: self.store.get(name, self.dtype, device=self.device, **kw)
        gb = ub = db = None
        if len(self.per_expert) == 3:
            gate, up, down = (g(self.per_expert[p].format(e=e)) for p in ("gate", "up", "down"))
        elif self.up_only or set(self.per_expert) == {"up", "down"}:  # ungated: down(act(up x))
            gate = None
            up, down = ((g(self.up_only, index=e), g(self.down, index=e)) if self.up_only else
                        (g(self.per_expert["up"].format(e=e)), g(self.per_expert["down"].format(e=e))))
        elif all(self.dbrx.values()):  # DBRX: [E*F, D]; w2 holds down transposed
            gate, up = g(self.dbrx["w1"], index=e, rows=self.F), g(self.dbrx["v1"], index=e, rows=self.F)
            down = g(self.dbrx["w2"], index=e, rows=self.F).t()
        else:
            gu, dn = g(self.gate_up, index=e), g(self.down, index=e)
            transposed = self.family in ("gpt_oss", "llama4") and self.gate_up in self.store.tensors
            if transposed:  # stored for x @ W: [D, 2F] and [F, D]
                gu, dn = gu.t(), dn.t()
            if self.family == "gpt_oss":  # gate and up interleaved along the 2F outputs
                gate, up = gu[0::2], gu[1::2]
                if self.gate_up_bias:
                    b = g(self.gate_up_bias, index=e)
                    gb, ub = b[0::2], b[1::2]
                    db = g(self.down_bias, index=e)
            else:
                gate, up = gu[: self.F], gu[self.F:]
            down = dn
        return gate, up, down, gb, ub, db


def glu(g: torch.Tensor, u: torch.Tensor, act: str = "silu", limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """The expert's intermediate activation from its gate and up projections (ungated: act(up))."""
    if g is None:
        return activation(u, act)
    if act == "gpt_oss":  # clamped SwiGLU with (up + 1)
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(g * alpha))
    return F_.silu(g) * u


def swiglu(x, gate, up, down, gb=None, ub=None, db=None, act: str = "silu", limit: float = 7.0, alpha: float = 1.702):
    h = glu(None if gate is None else linear(x, gate, gb), linear(x, up, ub), act, limit, alpha)  # [n, F]
    return linear(h, down, db)  # [n, D]


# --- the decoder --------------------------------------------------------------------------------

class Decoder:
    def __init__(self, spec: ModelSpec, fc: ForwardConfig, store: WeightStore, *, dtype=torch.float32,
                 device="cpu", router_dtype=torch.float32, progress: Optional[Callable[[int, int], None]] = None,
                 ffn_hook: Optional[Callable] = None):
        self.spec, self.fc, self.store = spec, fc, store
        self.names = Names(store)
        self.dtype, self.device, self.router_dtype = dtype, torch.device(device), router_dtype
        self.progress = progress
        # ffn_hook(decoder, layer, h [T, D], routing: (experts [T, K], weights [T, K]) or None for a
        # dense FFN) sees every FFN's input; quantize-report scores experts there, layer by layer.
        self.ffn_hook = ffn_hook

    def w(self, name: Optional[str]) -> Optional[torch.Tensor]:
        return self.store.get_optional(name, self.dtype, device=self.device)

    def embed(self, ids: list[int]) -> torch.Tensor:
        name = self.names.embed
        t = self.store.tensors[name]
        if any(not 0 <= i < t.shape[0] for i in ids):
            raise MoetoolError(f"token id out of range for the embedding ({t.shape[0]} rows)")
        if t.dtype in ("F32", "BF16", "F16"):
            rows = {i: self.store.get(name, self.dtype, index=i, device=self.device) for i in sorted(set(ids))}
            x = torch.stack([rows[i] for i in ids])  # [T, D]: only the prompt's rows are read
        else:
            x = self.store.get(name, self.dtype, device=self.device)[torch.tensor(ids)]
        return x * self.fc.embedding_multiplier if self.fc.embedding_multiplier != 1.0 else x

    def run(self, ids: list[int], record: bool = True) -> ForwardResult:
        fc = self.fc
        T = len(ids)
        x = self.embed(ids)  # [T, D]
        cos, sin = rope_tables(fc, T, self.device)
        routes: list[LayerRoute] = []
        masks: dict = {}
        for i in range(fc.layers):
            x = self.layer(i, x, cos, sin, masks, routes, record)
            self.store.release()
            if self.progress:
                self.progress(i + 1, fc.layers)
        x = self._final(x)
        return ForwardResult(logits=x, routes=routes, bytes_read=self.store.bytes_read)

    def layer(self, i: int, x, cos, sin, masks, routes, record):
        fc, n = self.fc, self.names
        find = lambda *s, required=True: n.find(i, *s, required=required)
        if fc.single_block:
            return self.block(i, x, cos, sin, masks, routes, record)
        if fc.family == "dbrx":
            n1w, n1b = find("norm_attn_norm.norm_1.weight"), find("norm_attn_norm.norm_1.bias", required=False)
            n2w, n2b = find("norm_attn_norm.norm_2.weight"), find("norm_attn_norm.norm_2.bias", required=False)
        else:
            n1w, n1b = find("input_layernorm.weight", "operator_norm.weight"), find("input_layernorm.bias", required=False)
            n2w = find("post_attention_layernorm.weight", "pre_ff_layernorm.weight", "ffn_norm.weight")
            n2b = find("post_attention_layernorm.bias", required=False)
        h = norm(x, self.w(n1w), self.w(n1b), fc)
        a = self.attention(i, h, cos, sin, masks)
        if fc.normed_residual:  # MiniMax: the residual is the normalised input, both branches scaled
            alpha, beta = fc.normed_residual[self.spec.layers[i].mixer]
            x = h * alpha + a * beta
        else:
            x = x + a * fc.residual_multiplier if fc.residual_multiplier != 1.0 else x + a
        h = norm(x, self.w(n2w), self.w(n2b), fc)
        if self.spec.layers[i].moe:
            f = self.moe(i, h, routes, record)
        else:
            if self.ffn_hook:
                self.ffn_hook(self, i, h, None)
            if find("shared_mlp.input_linear.weight", required=False):  # Granite-4.0 without experts
                f = self.shared_mlp(i, h)
            else:
                f = swiglu(h, *(self.w(find(f"mlp.{p}_proj.weight", f"feed_forward.{p}_proj.weight", f"feed_forward.{q}.weight",
                                            f"block_sparse_moe.{p}_proj.weight"))  # the last: Kimi Linear as saved
                                for p, q in (("gate", "w1"), ("up", "w3"), ("down", "w2"))))
        if fc.normed_residual:
            alpha, beta = fc.normed_residual["ffn"]
            return h * alpha + f * beta
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
        H, Hkv, Dh = fc.heads, fc.kv_heads, fc.head_dim
        if self.spec.layers[i].mixer in mixers.KINDS:  # Mamba, Gated DeltaNet, ...: forward/mixers/
            return mixers.run(self, i, h)
        if fc.mla:
            return self.mla(i, h, cos, sin, masks)
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
        q, k, v = q.view(T, H, Dh), k.view(T, Hkv, Dh), v.view(T, Hkv, Dh)
        if fc.qk_norm == "head":  # Qwen3 / GLM: RMSNorm per head
            q = norm(q, self.w(find("self_attn.q_norm.weight", "self_attn.q_layernorm.weight")), None, fc)
            k = norm(k, self.w(find("self_attn.k_norm.weight", "self_attn.k_layernorm.weight")), None, fc)
        if fc.use_rope[i]:
            r = fc.rope.dim
            q = torch.cat((apply_rope(q[..., :r], cos, sin, fc.rope.layout), q[..., r:]), dim=-1)
            k = torch.cat((apply_rope(k[..., :r], cos, sin, fc.rope.layout), k[..., r:]), dim=-1)
            if fc.qk_norm == "l2":  # Llama 4: weightless RMS norm after RoPE, RoPE layers only
                q, k = rms_norm(q, None, fc.eps), rms_norm(k, None, fc.eps)
        elif fc.temperature_tuning:  # Llama 4 NoPE layers: position-dependent query scale
            floor, scale = fc.temperature_tuning
            pos = torch.arange(T, dtype=torch.float32, device=q.device)
            q = (q * (torch.log1p(torch.floor((pos + 1.0) / floor)) * scale + 1.0)[:, None, None]).to(q.dtype)
        window = fc.windows[i]
        chunk = fc.chunk if (fc.chunk and fc.use_rope[i]) else None
        key = (window, chunk)
        if key not in masks:
            masks[key] = attention_mask(T, window, chunk, q.device)
        sinks = self.w(find("self_attn.sinks", required=False)) if fc.family == "gpt_oss" else None
        out = sdpa(q, k, v, masks[key], fc.attn_scale, sinks).reshape(T, H * Dh)
        if fc.attn_output_gate:
            out = out * torch.sigmoid(gate)
        return linear(out, self.w(o_name), self.w(o_bias))

    def mla(self, i: int, h, cos, sin, masks) -> torch.Tensor:
        """Multi-head latent attention (DeepSeek-V2/V3), in its naive (decompressed) form."""
        fc, m = self.fc, self.fc.mla
        find = lambda *s, required=True: self.names.find(i, *s, required=required)
        T, H = h.shape[0], fc.heads
        nope, r, v_dim, kvr = m["nope"], m["rope"], m["v"], m["kv_lora"]
        if m["q_lora"]:
            qa = linear(h, self.w(find("self_attn.q_a_proj.weight")), self.w(find("self_attn.q_a_proj.bias", required=False)))
            q = linear(rms_norm(qa, self.w(find("self_attn.q_a_layernorm.weight")), 1e-6),
                       self.w(find("self_attn.q_b_proj.weight")))
        else:
            q = linear(h, self.w(find("self_attn.q_proj.weight")))
        q = q.view(T, H, nope + r)  # [T, H, nope + rope]
        kv = linear(h, self.w(find("self_attn.kv_a_proj_with_mqa.weight")),
                    self.w(find("self_attn.kv_a_proj_with_mqa.bias", required=False)))  # [T, Rkv + rope]
        latent, k_rot = kv.split([kvr, r], dim=-1)
        latent = rms_norm(latent, self.w(find("self_attn.kv_a_layernorm.weight")), 1e-6)
        kvb = linear(latent, self.w(find("self_attn.kv_b_proj.weight"))).view(T, H, nope + v_dim)
        k_nope, v = kvb.split([nope, v_dim], dim=-1)
        q_rot, k_rot = q[..., nope:], k_rot.view(T, 1, r)
        if fc.use_rope[i]:  # Kimi Linear's MLA is NoPE
            q_rot, k_rot = apply_rope(q_rot, cos, sin, fc.rope.layout), apply_rope(k_rot, cos, sin, fc.rope.layout)
        k_rot = k_rot.expand(T, H, r)
        q = torch.cat((q[..., :nope], q_rot), dim=-1)
        k = torch.cat((k_nope, k_rot), dim=-1)
        if (None, None) not in masks:
            masks[(None, None)] = attention_mask(T, None, None, q.device)
        out = sdpa(q, k, v, masks[(None, None)], fc.attn_scale).reshape(T, H * v_dim)
        return linear(out, self.w(find("self_attn.o_proj.weight")), self.w(find("self_attn.o_proj.bias", required=False)))

    def moe(self, i: int, h, routes: list, record: bool) -> torch.Tensor:
        fc, moe, find = self.fc, self.spec.moe, (lambda *s, required=True: self.names.find(i, *s, required=required))
        T = h.shape[0]
        rw = find("block_sparse_moe.gate.weight", "mlp.gate.weight", "mlp.router.weight", "feed_forward.router.weight",
                  "block_sparse_moe.router.layer.weight", "ffn.router.layer.weight", "block_sparse_moe.router.weight",
                  "feed_forward.gate.weight", "mixer.gate.weight")
        rb = find("mlp.router.bias", required=False)
        router_w = self.store.get(rw, self.router_dtype, device=self.device)
        router_b = self.store.get_optional(rb, self.router_dtype, device=self.device)
        logits = linear(h.to(self.router_dtype), router_w, router_b).float()  # [T, E] in fp32
        corr = self.store.get_optional(find("mlp.gate.e_score_correction_bias", "feed_forward.expert_bias",
                                            "mixer.gate.e_score_correction_bias",
                                            "block_sparse_moe.gate.e_score_correction_bias", required=False), torch.float32,
                                       device=self.device)
        idx, weights, scores = route(logits, moe, fc.family, corr)  # [T, K], [T, K], [T, E]
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
                y = swiglu(h[tok] * w_e[:, None].to(h.dtype), gate, up, down)
            else:
                y = swiglu(h[tok], gate, up, down, gb, ub, db, fc.expert_act, fc.swiglu_limit, fc.swiglu_alpha)
                y = y * w_e[:, None].to(y.dtype)
            out.index_add_(0, tok, y)
            del gate, up, down
            self.store.release()  # this expert's pages leave resident memory before the next one
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
                      "block_sparse_moe.shared_experts.gate_proj.weight",
                      "feed_forward.shared_expert.gate_proj.weight", required=False)
        if shared:
            base = shared[: -len("gate_proj.weight")]
            s = swiglu(h, self.w(base + "gate_proj.weight"), self.w(base + "up_proj.weight"), self.w(base + "down_proj.weight"))
            sg = find("mlp.shared_expert_gate.weight", required=False)
            if sg:  # Qwen2-MoE: sigmoid-gated shared expert
                s = torch.sigmoid(linear(h, self.w(sg))) * s
            out = out + s
        if find("shared_mlp.input_linear.weight", required=False):  # Granite-4.0: an ungated shared MLP
            out = out + self.shared_mlp(i, h)
        return out

    def shared_mlp(self, i: int, h) -> torch.Tensor:
        """Granite's fused SwiGLU: input_linear [2F, D] (gate rows, then up rows), output_linear [D, F]."""
        gate, up = linear(h, self.w(self.names.find(i, "shared_mlp.input_linear.weight"))).chunk(2, dim=-1)
        return linear(F_.silu(gate) * up, self.w(self.names.find(i, "shared_mlp.output_linear.weight")))

    def _final(self, x) -> torch.Tensor:
        fc, n = self.fc, self.names
        fw = self.w(n.final_norm + "weight")
        fb = self.w(n.final_norm + "bias") if (n.final_norm + "bias") in self.store else None
        x = norm(x, fw, fb, fc)
        head = n.head if n.head in self.store else n.embed  # tied: the embedding is the head
        hb = n.head[: -len("weight")] + "bias"
        logits = linear(x, self.w(head), self.w(hb) if hb in self.store else None).float()  # [T, V]
        return logits / fc.logits_scaling if fc.logits_scaling != 1.0 else logits
