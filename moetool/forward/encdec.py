"""The encoder-decoder MoE forward: Switch Transformers (T5 with top-1 experts) and NLLB-MoE
(M2M100 / BART with top-2 experts), streamed one layer at a time like the decoder-only forward.

`run_encdec(ckpt, encoder_ids, decoder_ids)`: the encoder reads `encoder_ids` (the prompt; no
mask: every token attends to every token), then the decoder reads `decoder_ids` (the decoder start
token, then any given / generated tokens) with causal self-attention and cross-attention to the
encoder's output. Logits are the decoder's, one row per decoder token.

Layers are numbered as `count` numbers them: encoder layers 0..N-1, decoder layers N..N+M-1;
each recorded route says its stack. What differs between the two families is data (`STYLES`:
tensor names, norms, positions, attention scale) plus one router function each:

- Switch (`route_top1`): softmax, argmax; tokens are served in sequence order and an expert
  takes at most `expert_capacity` of them, in training and at inference alike (transformers'
  SwitchTransformersTop1Router): a token past its expert's capacity is *dropped*: no expert runs
  for it, its FFN adds nothing (the residual passes). The gate is the top-1 probability.
  Router jitter is a training-only noise and the z-loss a training loss: neither is run.
- NLLB-MoE (`route_top2`): the top-1 of the softmax and the top-1 of the remaining logits
  (second_expert_policy "all"); capacity per expert ceil(moe_eval_capacity_token_fraction * T)
  at inference (else expert_capacity, else 2 * ceil(T / E)); first choices are served first, in
  sequence order (or by router confidence with batch_prioritized_routing), then second choices;
  the two gates are renormalised to sum to 1 after dropping (before, when
  normalize_router_prob_before_dropping); every expert output is scaled by
  1 - moe_token_dropout at inference.

A dropped (token, slot) keeps its expert in `experts` (the router's choice) with gate weight 0
and is listed in `LayerRoute.dropped`.

Shapes: S encoder tokens, T decoder tokens (or either, as "T" in a stack), D hidden, H heads,
Dh head dim, E experts, K experts per token, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F_

from ..errors import BadCheckpoint, BadConfig, MoetoolError, UnsupportedArchitecture
from ..spec import Cfg, ModelSpec
from .config import ENCDEC_FAMILIES  # noqa: F401 (the families this module runs)
from .model import ACTIVATIONS, LayerRoute, check_shape, linear, non_finite_router, rms_norm, sdpa



@dataclass(frozen=True)
class Style:
    """Where a family stores each tensor (names relative to the layer's prefix) and how it
    normalises; everything else about the two families is the same code."""

    embed: str  # the shared embedding (also the LM head when tied)
    stack_embed: dict  # stack -> its own embedding, stored when the embeddings are not tied
    head: str
    layer: dict  # stack -> "encoder.block.{j}."
    final_norm: dict  # stack -> name prefix of the stack's final norm
    self_attn: str
    self_norm: str
    cross_attn: str
    cross_norm: str
    ffn: dict  # stack -> prefix of the FFN (dense: {up,down}.weight; sparse: router / experts under it)
    ffn_norm: dict  # stack -> prefix of the norm before the FFN
    proj: tuple  # the q, k, v, output projections' names
    up: str
    down: str
    norm: str  # "rms" (T5: no mean, no bias) or "layernorm"


STYLES = {
    "switch_transformers": Style(
        embed="shared.weight", head="lm_head.weight",
        stack_embed={"encoder": "encoder.embed_tokens.weight", "decoder": "decoder.embed_tokens.weight"},
        layer={"encoder": "encoder.block.{j}.", "decoder": "decoder.block.{j}."},
        final_norm={"encoder": "encoder.final_layer_norm.", "decoder": "decoder.final_layer_norm."},
        self_attn="layer.0.SelfAttention.", self_norm="layer.0.layer_norm.",
        cross_attn="layer.1.EncDecAttention.", cross_norm="layer.1.layer_norm.",
        ffn={"encoder": "layer.1.mlp.", "decoder": "layer.2.mlp."},
        ffn_norm={"encoder": "layer.1.layer_norm.", "decoder": "layer.2.layer_norm."},
        proj=("q", "k", "v", "o"), up="wi", down="wo", norm="rms"),
    "nllb_moe": Style(
        embed="model.shared.weight", head="lm_head.weight",
        stack_embed={"encoder": "model.encoder.embed_tokens.weight", "decoder": "model.decoder.embed_tokens.weight"},
        layer={"encoder": "model.encoder.layers.{j}.", "decoder": "model.decoder.layers.{j}."},
        final_norm={"encoder": "model.encoder.layer_norm.", "decoder": "model.decoder.layer_norm."},
        self_attn="self_attn.", self_norm="self_attn_layer_norm.",
        cross_attn="cross_attention.", cross_norm="cross_attention_layer_norm.",
        ffn={"encoder": "ffn.", "decoder": "ffn."}, ffn_norm={"encoder": "ff_layer_norm.", "decoder": "ff_layer_norm."},
        proj=("q_proj", "k_proj", "v_proj", "out_proj"), up="fc1", down="fc2", norm="layernorm"),
}


@dataclass
class EncDecConfig:
    """What the forward needs from config.json (transformers' defaults where a field is absent)."""

    family: str
    heads: dict  # stack -> attention heads
    head_dim: dict  # stack -> head dim
    attn_scale: dict  # stack -> query-key scale (Switch: 1.0, T5 folds it into the weights)
    eps: float
    act: str
    decoder_start: int
    pad: Optional[int]
    embed_scale: float = 1.0  # NLLB scale_embedding: sqrt(d_model)
    logits_scale: float = 1.0  # Switch with tied embeddings: d_model ** -0.5 before the head
    buckets: int = 32  # Switch relative position buckets
    max_distance: int = 128
    max_positions: Optional[int] = None  # NLLB sinusoidal positions (transformers grows the table)
    capacity: Optional[int] = None  # Switch expert_capacity; NLLB expert_capacity (used when eval fraction <= 0)
    eval_capacity_fraction: float = 1.0
    normalize_before_dropping: bool = False
    batch_prioritized: bool = False
    token_dropout: float = 0.0
    tie: bool = True


def encdec_config(spec: ModelSpec, config: dict) -> EncDecConfig:
    cfg = Cfg(config)
    d, family = spec.hidden_size, spec.family
    tie = spec.tie_word_embeddings
    # T5 / Switch configs often leave decoder_start_token_id unset: the decoder starts with the pad token
    key = "decoder_start_token_id" if config.get("decoder_start_token_id") is not None else "pad_token_id"
    if config.get(key) is None:
        raise BadConfig("config.json: neither decoder_start_token_id nor pad_token_id is set; the decoder "
                        "has no start token")
    start = cfg.int(key)
    if start >= spec.vocab_size:
        raise BadConfig(f"config.json: decoder start token {start} is outside the vocabulary (0..{spec.vocab_size - 1})")
    if family == "switch_transformers":
        heads, dkv = cfg.int("num_heads", min_value=1), cfg.int("d_kv", min_value=1)
        if cfg.str("router_dtype", "float32") != "float32":
            raise UnsupportedArchitecture("switch_transformers: router_dtype other than float32 is not supported by trace")
        return EncDecConfig(family, {"encoder": heads, "decoder": heads}, {"encoder": dkv, "decoder": dkv},
                            {"encoder": 1.0, "decoder": 1.0}, cfg.float("layer_norm_epsilon", 1e-6),
                            cfg.str("dense_act_fn", "relu"), start, cfg.raw("pad_token_id"),
                            logits_scale=d ** -0.5 if tie else 1.0,
                            buckets=cfg.int("relative_attention_num_buckets", 32, min_value=1),
                            max_distance=cfg.int("relative_attention_max_distance", 128, min_value=1),
                            capacity=cfg.int("expert_capacity", 64), tie=tie)
    policy = cfg.str("second_expert_policy", "all")
    if policy != "all":  # "sampling" / "random" draw random numbers at inference too: nothing to reproduce
        raise UnsupportedArchitecture(f"nllb-moe: second_expert_policy {policy!r} routes at random even at inference; "
                                      "trace supports \"all\"")
    if cfg.str("router_dtype", "float32") != "float32":
        raise UnsupportedArchitecture("nllb-moe: router_dtype other than float32 is not supported by trace")
    heads = {s: cfg.int(f"{s}_attention_heads", 16, min_value=1) for s in ("encoder", "decoder")}
    for s, h in heads.items():
        if d % h:
            raise BadConfig(f"config.json: d_model {d} is not divisible by {s}_attention_heads {h}")
    hd = {s: d // h for s, h in heads.items()}
    cap = cfg.raw("expert_capacity", 64)
    return EncDecConfig(family, heads, hd, {s: hd[s] ** -0.5 for s in hd}, 1e-5, cfg.str("activation_function", "relu"),
                        start, cfg.raw("pad_token_id", 1),
                        embed_scale=math.sqrt(d) if cfg.bool("scale_embedding", True) else 1.0,
                        max_positions=cfg.int("max_position_embeddings", 1024, min_value=1),
                        capacity=None if cap is None else cfg.int("expert_capacity"),
                        eval_capacity_fraction=cfg.float("moe_eval_capacity_token_fraction", 1.0),
                        normalize_before_dropping=cfg.bool("normalize_router_prob_before_dropping", False),
                        batch_prioritized=cfg.bool("batch_prioritized_routing", False),
                        token_dropout=cfg.float("moe_token_dropout", 0.2), tie=tie)


# --- routers ------------------------------------------------------------------------------------

def route_top1(logits: torch.Tensor, capacity: int):
    """Switch: logits [T, E] -> experts [T, 1], gates [T, 1] (0 where dropped), kept [T, 1] bool."""
    probs = torch.softmax(logits, dim=-1)
    idx = probs.argmax(dim=-1)  # [T]
    onehot = F_.one_hot(idx, probs.shape[1])
    priority = (torch.cumsum(onehot, dim=0) * onehot).sum(dim=1)  # 1-based rank among its expert's tokens
    kept = priority <= capacity
    gate = probs.max(dim=-1).values
    return idx[:, None], (gate * kept)[:, None], kept[:, None]


def route_top2(logits: torch.Tensor, c: EncDecConfig):
    """NLLB-MoE, as transformers' NllbMoeTop2Router.route_tokens at inference: logits [T, E] ->
    experts [T, 2], gates [T, 2] (0 where dropped), kept [T, 2] bool."""
    T, E = logits.shape
    probs = torch.softmax(logits, dim=-1)
    top1 = probs.argmax(dim=-1)
    m1 = F_.one_hot(top1, E)
    top2 = logits.masked_fill(m1.bool(), float("-inf")).argmax(dim=-1)
    m2 = F_.one_hot(top2, E)

    def normalise(m1, m2):
        p1, p2 = (probs * m1).sum(dim=1), (probs * m2).sum(dim=1)
        denom = torch.clamp(p1 + p2, min=torch.finfo(probs.dtype).eps)
        return p1 / denom, p2 / denom

    if c.normalize_before_dropping:
        p1, p2 = normalise(m1, m2)
    if c.batch_prioritized:  # the most confident tokens are served first
        order = (-probs.max(dim=1)[0]).argsort(dim=0)
        back = order.argsort(dim=0)
        loc1 = ((torch.cumsum(m1[order], dim=0) - 1) * m1[order])[back]
        loc2 = ((torch.cumsum(m2[order], dim=0) - 1) * m2[order])[back]
    else:
        loc1, loc2 = torch.cumsum(m1, dim=0) - 1, torch.cumsum(m2, dim=0) - 1
    loc2 = loc2 + m1.sum(dim=0, keepdim=True)  # second choices queue behind every first choice
    if c.eval_capacity_fraction > 0:
        capacity = math.ceil(c.eval_capacity_fraction * T)
    else:
        capacity = c.capacity if c.capacity is not None else 2 * math.ceil(T / E)
    m1, m2 = m1 * torch.lt(loc1, capacity), m2 * torch.lt(loc2, capacity)
    if not c.normalize_before_dropping:
        p1, p2 = normalise(m1, m2)
    kept = torch.stack((m1.sum(dim=1) > 0, m2.sum(dim=1) > 0), dim=1)
    gates = torch.stack((p1, p2), dim=1) * kept
    return torch.stack((top1, top2), dim=1), gates, kept


# --- positions ----------------------------------------------------------------------------------

def relative_buckets(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's relative position buckets (memory position - query position), as transformers'
    SwitchTransformersAttention._relative_position_bucket."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).to(torch.long) * num_buckets
        rel = torch.abs(rel)
    else:
        rel = -torch.min(rel, torch.zeros_like(rel))
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, rel, large)


def sinusoidal_positions(ids: list[int], dim: int, pad: Optional[int]) -> torch.Tensor:
    """NLLB / M2M100: position of token t = pad + (non-pad tokens up to t), pad tokens at `pad`
    (a zero row); sin in the first half, cos in the second (tensor2tensor's layout)."""
    pad = 1 if pad is None else pad
    t = torch.tensor(ids)
    mask = t.ne(pad).int()
    pos = (torch.cumsum(mask, dim=0) * mask).long() + pad  # [T]
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -step)
    ang = pos.float()[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros(len(ids), 1)], dim=1)
    return emb.masked_fill((pos == pad)[:, None], 0.0)


# --- the model ----------------------------------------------------------------------------------

@dataclass
class EncDecResult:
    logits: torch.Tensor  # [T decoder tokens, V] float32
    routes: list[LayerRoute] = field(default_factory=list)  # encoder MoE layers, then decoder ones
    bytes_read: int = 0


class EncoderDecoder:
    def __init__(self, spec: ModelSpec, c: EncDecConfig, store, *, dtype=torch.float32, device="cpu",
                 progress: Optional[Callable[[int, int], None]] = None):
        self.spec, self.c, self.store, self.style = spec, c, store, STYLES[spec.family]
        self.dtype, self.device, self.progress = dtype, torch.device(device), progress
        if self.style.embed not in store:
            raise BadCheckpoint(f"checkpoint has no token embedding {self.style.embed!r}")

    def w(self, name: str, required: bool = True) -> Optional[torch.Tensor]:
        if name not in self.store:
            if required:
                raise BadCheckpoint(f"checkpoint is missing tensor {name!r}")
            return None
        return self.store.get(name, self.dtype, device=self.device)

    def norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        if self.style.norm == "rms":
            return rms_norm(x, self.w(prefix + "weight"), self.c.eps)
        return F_.layer_norm(x, (x.shape[-1],), self.w(prefix + "weight"), self.w(prefix + "bias", False), self.c.eps)

    def embed(self, stack: str, ids: list[int]) -> torch.Tensor:
        name = self.style.stack_embed[stack]
        name = name if name in self.store else self.style.embed
        t = self.store.tensors[name]
        if any(not 0 <= i < t.shape[0] for i in ids):
            raise MoetoolError(f"token id out of range for the embedding ({t.shape[0]} rows)")
        rows = {i: self.store.get(name, self.dtype, index=i, device=self.device) for i in sorted(set(ids))}
        x = torch.stack([rows[i] for i in ids])
        if self.c.embed_scale != 1.0:
            x = x * self.c.embed_scale
        if self.spec.family == "nllb_moe":
            x = x + sinusoidal_positions(ids, x.shape[1], self.c.pad).to(x.device, x.dtype)
        return x

    def attention(self, prefix: str, stack: str, h: torch.Tensor, src: torch.Tensor, bias) -> torch.Tensor:
        """Multi-head attention of h [T, D] over src [S, D]; `bias` an additive [H, T, S] float or
        a [T, S] bool mask, or None."""
        H, Dh = self.c.heads[stack], self.c.head_dim[stack]
        q_, k_, v_, o_ = (prefix + p for p in self.style.proj)
        q = linear(h, self.w(q_ + ".weight"), self.w(q_ + ".bias", False))
        k = linear(src, self.w(k_ + ".weight"), self.w(k_ + ".bias", False))
        v = linear(src, self.w(v_ + ".weight"), self.w(v_ + ".bias", False))
        if q.shape[-1] != H * Dh or k.shape[-1] != H * Dh:
            raise BadCheckpoint(f"{q_}: the projections give {q.shape[-1]} features, config.json implies {H * Dh}")
        T, S = h.shape[0], src.shape[0]
        out = sdpa(q.view(T, H, Dh), k.view(S, H, Dh), v.view(S, H, Dh), bias, self.c.attn_scale[stack])
        return linear(out.reshape(T, H * Dh), self.w(o_ + ".weight"), self.w(o_ + ".bias", False))

    def position_bias(self, stack: str, T: int) -> Optional[torch.Tensor]:
        """Self-attention bias/mask of a stack: Switch's relative bias from its first layer
        (shared by every layer; causal -inf added in the decoder); NLLB: none / causal."""
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        if self.spec.family != "switch_transformers":
            return causal if stack == "decoder" else None
        table = self.w(self.style.layer[stack].format(j=0) + self.style.self_attn + "relative_attention_bias.weight")
        check_shape("relative_attention_bias", table, (self.c.buckets, self.c.heads[stack]),
                    "[relative_attention_num_buckets, num_heads]")
        pos = torch.arange(T, dtype=torch.long, device=self.device)
        rel = pos[None, :] - pos[:, None]  # memory - query
        bias = table[relative_buckets(rel, stack == "encoder", self.c.buckets, self.c.max_distance)]  # [T, T, H]
        bias = bias.permute(2, 0, 1).contiguous()
        if stack == "decoder":
            bias = bias.masked_fill(~causal, float("-inf"))
        return bias

    def ffn(self, i: int, stack: str, prefix: str, h: torch.Tensor, sparse: bool, routes: list, record: bool):
        st, c = self.style, self.c
        act = ACTIVATIONS[c.act]
        if not sparse:
            return linear(act(linear(h, self.w(prefix + st.up + ".weight"), self.w(prefix + st.up + ".bias", False))),
                          self.w(prefix + st.down + ".weight"), self.w(prefix + st.down + ".bias", False))
        rw, rb = prefix + "router.classifier.weight", prefix + "router.classifier.bias"
        router_w = self.store.get(rw, torch.float32, device=self.device) if rw in self.store else None
        if router_w is None:
            raise BadCheckpoint(f"layer {i}: checkpoint is missing the router {rw!r}")
        router_b = self.store.get(rb, torch.float32, device=self.device) if rb in self.store else None
        check_shape(rw, router_w, (self.spec.moe.num_experts, h.shape[1]), "[num_experts, d_model]")
        logits = linear(h.float(), router_w, router_b)
        if not torch.isfinite(logits).all():
            raise BadCheckpoint(non_finite_router(i, h, rw, router_w, router_b))
        if self.spec.family == "switch_transformers":
            idx, gates, kept = route_top1(logits, c.capacity)
        else:
            idx, gates, kept = route_top2(logits, c)
        if record:
            dropped = [[t, s] for t, s in (~kept).nonzero().tolist()]
            routes.append(LayerRoute(i, idx.cpu(), gates.float().cpu(), logits.cpu(),
                                     torch.softmax(logits, dim=-1).cpu(), stack=stack, dropped=dropped))
        out = torch.zeros_like(h)
        for e in torch.unique(idx[kept]).tolist():
            tok, slot = torch.where((idx == e) & kept)
            base = f"{prefix}experts.expert_{e}."
            y = linear(act(linear(h[tok], self.w(base + st.up + ".weight"), self.w(base + st.up + ".bias", False))),
                       self.w(base + st.down + ".weight"), self.w(base + st.down + ".bias", False))
            y = y * gates[tok, slot][:, None].to(y.dtype)
            if c.token_dropout > 0:  # NLLB: the inference-time scale of expert-output dropout
                y = y * (1 - c.token_dropout)
            out.index_add_(0, tok, y)
            self.store.release()  # this expert's pages leave memory before the next one
        return out

    def stack(self, stack: str, ids: list[int], memory: Optional[torch.Tensor], routes: list, record: bool,
              done: int) -> torch.Tensor:
        """Run one stack layer by layer; `memory` is the encoder's output for the decoder."""
        st, spec = self.style, self.spec
        first = 0 if stack == "encoder" else spec.encoder_layers
        layers = [l for l in spec.layers if (l.index < spec.encoder_layers) == (stack == "encoder")]
        x = self.embed(stack, ids)
        bias = self.position_bias(stack, len(ids))
        for l in layers:
            p = st.layer[stack].format(j=l.index - first)
            h = self.norm(x, p + st.self_norm)
            x = x + self.attention(p + st.self_attn, stack, h, h, bias)
            if stack == "decoder":
                x = x + self.attention(p + st.cross_attn, stack, self.norm(x, p + st.cross_norm), memory, None)
            x = x + self.ffn(l.index, stack, p + st.ffn[stack], self.norm(x, p + st.ffn_norm[stack]), l.moe,
                             routes, record)
            self.store.release()
            if self.progress:
                self.progress(done + l.index - first + 1, len(spec.layers))
        return self.norm(x, st.final_norm[stack])

    def run(self, encoder_ids: list[int], decoder_ids: list[int], record: bool = True) -> EncDecResult:
        routes: list[LayerRoute] = []
        memory = self.stack("encoder", encoder_ids, None, routes, record, 0)
        x = self.stack("decoder", decoder_ids, memory, routes, record, self.spec.encoder_layers)
        x = x * self.c.logits_scale if self.c.logits_scale != 1.0 else x
        head = self.style.head if self.style.head in self.store else None
        if head is None and not self.c.tie:
            raise BadCheckpoint(f"checkpoint has no LM head {self.style.head!r} and tie_word_embeddings is false")
        logits = linear(x, self.w(head or self.style.embed)).float()
        return EncDecResult(logits.cpu(), routes, self.store.bytes_read)  # on the host, like routes


def run_encdec(ckpt, encoder_ids: list[int], decoder_ids: list[int], *, dtype: str = "float32", device: str = "cpu",
               record: bool = True, progress: Optional[Callable[[int, int], None]] = None,
               streaming: Optional[bool] = None) -> EncDecResult:
    """The encoder-decoder forward of `ckpt` (a Checkpoint of a family in ENCDEC_FAMILIES)."""
    from ..arch import spec_from_config
    from . import DTYPES, new_store, pick_device, weight_store

    if ckpt.tensors is None:
        raise MoetoolError(f"{ckpt.source}: no safetensors weights to run (moetool never loads pickle checkpoints)")
    spec = spec_from_config(ckpt.config, ckpt.config_path)
    c = encdec_config(spec, ckpt.config)
    if not encoder_ids or not decoder_ids:
        raise MoetoolError("no tokens to run")
    if dtype not in DTYPES:
        raise MoetoolError(f"--dtype must be one of {', '.join(DTYPES)}")
    store = weight_store(ckpt) if streaming is None else new_store(ckpt, streaming)
    with torch.inference_mode():
        out = EncoderDecoder(spec, c, store, dtype=DTYPES[dtype], device=pick_device(device),
                             progress=progress).run(encoder_ids, decoder_ids, record)
    store.release()
    return out
