"""Total versus active parameters, memory per storage format, KV cache and FLOPs per token.

Two ways, cross-checked: analytic from config.json (the adapter's parameter inventory, which
mirrors what transformers builds) and exact from the safetensors headers (each stored tensor
classified by `moetool.names`, quantized storage counted as logical parameters). When both exist
the headers are authoritative and every difference is reported with its cause.

Conventions (docs/count.md):
- total_params: the model as transformers builds it: tied matrices once, MTP / next-n layers not
  included (they are mtp_params), a vision tower included as its own group, buffers excluded.
- active_params: per token: everything except routed experts, plus top-k routed experts of each
  MoE layer; the input embedding included; vision and audio towers excluded (they run per image /
  audio clip, not per text token).
- active_params_excl_embedding: the same without the input embedding matrix and the other lookup
  tables (per-layer input embeddings). With tied embeddings the one matrix is the LM head, so it stays.

Example:
    >>> import moetool
    >>> r = moetool.count("mixtral-8x7b")
    >>> r.total_params, r.active_params_excl_embedding
    (46702792704, 12748853248)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from . import formats
from .arch import generic, spec_from_config
from .errors import UnsupportedArchitecture
from .names import classify_tuple
from .source import Checkpoint, resolve
from .spec import GROUPS, ModelSpec

SCHEMA_VERSION = 1
DEFAULT_CONTEXT = 4096


@dataclass
class Difference:
    group: str
    analytic: int
    headers: int
    cause: str


@dataclass
class LayerCount:
    layer: int
    mixer: str
    moe: bool
    attention: int
    router: int
    routed_experts: int
    shared_experts: int
    dense_mlp: int
    norms: int
    total: int
    active: int


@dataclass
class CountReport:
    model: str
    model_type: str
    family: str
    counted_from: str  # "headers" or "config"
    total_params: int
    active_params: int
    active_params_excl_embedding: int
    mtp_params: int
    num_experts: Optional[int]
    top_k: Optional[int]
    num_moe_layers: int
    num_layers: int
    expert_params: int
    num_shared_experts: int
    tie_word_embeddings: bool
    breakdown: dict[str, int]
    bytes_stored: Optional[int]
    bytes_stored_by_dtype: Optional[dict[str, int]]
    quantization: Optional[str]
    weights_bytes: dict[str, int]
    offload_bytes: dict[str, int]
    kv_cache: dict[str, Any]
    flops_per_token: dict[str, Any]
    cross_check: dict[str, Any]
    per_layer: list[LayerCount]
    notes: list[str] = field(default_factory=list)
    # config-only counts of a quantized checkpoint: the bytes its `quantization_config` declares
    # (every stored parameter, MTP layers included, as `bytes_stored` would count them)
    bytes_declared: Optional[int] = None
    declared_storage: Optional[str] = None

    def _summary(self) -> list[tuple[str, Any]]:
        return [("model", self.model), ("model_type", self.model_type), ("total_params", self.total_params),
                ("active_params", self.active_params), ("num_experts", self.num_experts), ("top_k", self.top_k),
                ("counted_from", self.counted_from)]

    def __repr__(self) -> str:
        from .render import short_repr

        return short_repr("CountReport", self._summary())

    def _repr_html_(self) -> str:
        from .render import short_html

        return short_html("CountReport", self._summary())

    def to_dict(self) -> dict[str, Any]:
        d = {"schema_version": SCHEMA_VERSION, "command": "count"}
        d.update(asdict(self))
        return d

    def to_dataframe(self):
        """Per-layer table as a pandas DataFrame (one row per layer)."""
        import pandas as pd

        return pd.DataFrame([asdict(l) for l in self.per_layer])


def count(model: str | Checkpoint, *, revision: Optional[str] = None, context: int = DEFAULT_CONTEXT, batch: int = 1,
          kv_dtype: str = "bf16", use_headers: bool = True) -> CountReport:
    """Count a checkpoint. `model` is any MODEL form (see `moetool.source.resolve`) or a Checkpoint."""
    ckpt = model if isinstance(model, Checkpoint) else resolve(model, revision=revision, read_headers=use_headers,
                                                                tensor_table=False)
    try:
        spec = spec_from_config(ckpt.config, ckpt.config_path)
    except UnsupportedArchitecture:
        if not ckpt.has_weights:
            raise  # config only: nothing exact to say about a family moetool does not know
        spec, ckpt = _generic_spec(model, ckpt, revision)
    analytic = _analytic_groups(spec)
    notes = list(ckpt.notes)
    if spec.max_position_embeddings and context > spec.max_position_embeddings:
        notes.append(f"warning: --context {context:,} is past the model's maximum of {spec.max_position_embeddings:,} "
                     "tokens (max_position_embeddings): the KV cache and FLOPs are for a context it was not built for")
    if spec.family == "generic":  # the spec is the headers: nothing independent to cross-check
        groups, per_layer_routed = analytic, _routed_per_layer(spec)
        cross = {"available": False, "match": None, "analytic_total": None, "headers_total": _total(analytic),
                 "differences": [], "stored_not_counted": []}
        counted_from = "headers"
    elif ckpt.has_weights:
        stored = _header_groups(spec, ckpt)
        groups, per_layer_routed = stored.groups, stored.routed_per_layer
        cross = _cross_check(spec, analytic, stored)
        # what the analytic side was computed from: a GGUF has no config.json, only its metadata
        cross["config_from"] = "the GGUF metadata" if ckpt.gguf is not None else "config.json"
        counted_from = "headers"
    else:
        groups, per_layer_routed = analytic, _routed_per_layer(spec)
        cross = {"available": False, "match": None, "analytic_total": _total(analytic), "headers_total": None,
                 "differences": [], "stored_not_counted": []}
        counted_from = "config"

    total = _total(groups)
    by_dtype = _bytes_by_dtype(ckpt)
    moe = spec.moe
    routed_active = sum((v - spec.modality_experts) * moe.top_k // moe.num_experts
                        for v in per_layer_routed.values()) if moe else 0
    active = total - groups["routed_experts"] - groups["vision"] - groups.get("audio", 0) + routed_active
    # Without the lookup tables: the input embedding (kept when tied: the one matrix is the LM head) and
    # any other table of the embedding group (Gemma 4's per-layer input embeddings, Qwen4-Exp's n-gram
    # tables), which are lookups whether or not the input embedding is tied.
    tied_head = min(groups["embedding"], spec.vocab_size * spec.hidden_size) if spec.tie_word_embeddings else 0
    active_excl = active - (groups["embedding"] - tied_head)
    breakdown = {g: groups[g] for g in GROUPS if g != "mtp"}
    if groups.get("other"):
        breakdown["other"] = groups["other"]  # stored tensors no rule places: counted, and flagged
    assert sum(breakdown.values()) == total, "breakdown must sum to total_params"

    report = CountReport(
        model=ckpt.source, model_type=spec.model_type, family=spec.family, counted_from=counted_from,
        total_params=total, active_params=active, active_params_excl_embedding=active_excl,
        mtp_params=groups["mtp"], num_experts=moe.num_experts if moe else None, top_k=moe.top_k if moe else None,
        num_moe_layers=len(spec.moe_layers), num_layers=spec.num_layers, expert_params=spec.expert_params(),
        num_shared_experts=moe.num_shared_experts if moe else 0, tie_word_embeddings=spec.tie_word_embeddings,
        breakdown=breakdown, bytes_stored=None if by_dtype is None else sum(by_dtype.values()), bytes_stored_by_dtype=by_dtype,
        quantization=_quant_method(spec), weights_bytes=_weights_bytes(spec), offload_bytes=_offload_bytes(spec),
        kv_cache=_kv_cache(spec, context, batch, kv_dtype), flops_per_token=_flops(spec, context),
        cross_check=cross, per_layer=_per_layer(spec), notes=notes + list(spec.notes),
    )
    if report.kv_cache["convention"] == "mla_latent":
        report.notes.append("MLA: kv_cache bytes hold the compressed latent (kv_lora_rank + qk_rope_head_dim per token "
                            "and layer, as transformers 5, vLLM and SGLang cache it), the *_per_head fields K and V "
                            "decompressed per head; flops attention is the per-head form (as transformers computes "
                            "it), attention_latent the weight-absorbed form over the latent cache")
    if report.bytes_stored is None and spec.quantization:
        _declare_storage(report, spec)
    weights, source = ((report.bytes_stored, "stored") if report.bytes_stored is not None else
                       (report.bytes_declared, report.declared_storage) if report.bytes_declared is not None else
                       (report.weights_bytes["bf16"], "bf16"))
    report.kv_cache["serve_bytes"] = weights + report.kv_cache["bytes"]
    report.kv_cache["serve_weights_from"] = source
    return report


def _declare_storage(report: CountReport, spec: ModelSpec) -> None:
    """Config-only count of a quantized checkpoint: the storage its `quantization_config`
    declares (modules_to_not_convert kept in bf16), or a note when moetool cannot model it."""
    q = spec.quantization or {}
    found = formats.declared_format(q)
    if found is None:
        report.notes.append(f"quantization_config ({_quant_method(spec)}) is not modelled: memory and serving "
                            "total are for bf16; count the safetensors headers for the stored size")
        return
    fmt, label = found
    keep, unknown = formats.unconverted_groups(q)
    report.bytes_declared = sum(formats.param_bytes(p, "bf16" if p.group in keep else fmt) for p in spec.params)
    report.declared_storage = label
    if unknown:
        report.notes.append(f"modules_to_not_convert entries moetool cannot place, assumed quantized: "
                            f"{', '.join(unknown[:3])}")


def _generic_spec(model, ckpt: Checkpoint, revision: Optional[str]) -> tuple[ModelSpec, Checkpoint]:
    """A family without an adapter but with headers: the spec is built from the stored tensors
    (their shapes are needed for the memory per format, so the full tensor table is read)."""
    if ckpt.tensors is None and not isinstance(model, Checkpoint):
        ckpt = resolve(model, revision=revision, read_headers=True, tensor_table=True)
    if ckpt.tensors is None:
        raise UnsupportedArchitecture(f"{ckpt.config_path}: unsupported model_type {ckpt.config.get('model_type')!r} "
                                      "and no tensor table to count from")
    return generic.spec_from_tensors(ckpt.config, ckpt.tensors.values(), ckpt.config_path), ckpt


# --- analytic ---------------------------------------------------------------------------------

def _analytic_groups(spec: ModelSpec) -> dict[str, int]:
    groups = dict.fromkeys(GROUPS, 0)
    for p in spec.params:
        groups[p.group] = groups.get(p.group, 0) + p.numel  # "other": a generic spec's unplaced tensors
    return groups


def _routed_per_layer(spec: ModelSpec) -> dict[int, int]:
    out: dict[int, int] = defaultdict(int)
    for p in spec.params:
        if p.group == "routed_experts":
            out[p.layer] += p.numel
    return dict(out)


def _total(groups: dict[str, int]) -> int:
    return sum(v for g, v in groups.items() if g != "mtp")


# --- from headers -----------------------------------------------------------------------------

@dataclass
class _Stored:
    groups: dict[str, int]
    routed_per_layer: dict[int, int]
    not_counted: dict[str, list]  # kind -> [tensors, elements, bytes, example name]
    unknown: list[tuple[int, str]]  # (tensors, example name) per name template nothing places


def _header_groups(spec: ModelSpec, ckpt: Checkpoint) -> _Stored:
    """Classify the stored tensors: one name per row of `ckpt.stats` (a name template, dtype and
    layer), since every name of a row classifies alike."""
    q = spec.quantization or {}
    bits = q.get("bits") if isinstance(q.get("bits"), int) and q.get("bits") in (2, 3, 4, 8) else 4
    rows = ckpt.stats.rows
    bnb4 = bool(q.get("load_in_4bit")) or any(".quant_state.bitsandbytes__" in t for t, _, _ in rows)
    groups = dict.fromkeys(GROUPS, 0)
    groups["other"] = 0
    routed: dict[int, int] = defaultdict(int)
    not_counted: dict[str, list] = {}  # kind -> [tensors, elements, bytes, example]
    unknown: list[tuple[int, str]] = []
    for (_, dtype, _), (n, elements, nbytes, name) in rows.items():
        group, layer, _, _, kind, mult = classify_tuple(name, dtype, spec.num_layers, spec.encoder_layers,
                                                        spec.tie_word_embeddings, bits, bnb4)
        if kind == "buffer" and spec.param_buffers and name.endswith(spec.param_buffers):
            group, kind, mult = "router", "param", 1
        if kind == "param":
            groups[group] += elements * mult
            if group == "routed_experts":
                routed[layer] += elements * mult
            elif group == "other":
                unknown.append((n, name))
            continue
        agg = not_counted.get(kind)
        if agg is None:
            agg = not_counted[kind] = [0, 0, 0, name]
        agg[0] += n
        agg[1] += elements
        agg[2] += nbytes
    if not groups["other"]:
        del groups["other"]
    return _Stored(groups, dict(routed), not_counted, unknown)


_KIND_CAUSE = {
    "quant_meta": "quantization scales / zero points: stored alongside the quantized weights, not parameters",
    "buffer": "persistent buffers (e.g. e_score_correction_bias, rotary inv_freq): stored, not parameters",
    "tied_copy": "second stored copy of a tied matrix (tied LM head, or the MTP layer's embedding / head copies): counted once",
}


def _cross_check(spec: ModelSpec, analytic: dict[str, int], stored: _Stored) -> dict[str, Any]:
    diffs = []
    for g in list(GROUPS) + (["other"] if "other" in stored.groups else []):
        a, h = analytic.get(g, 0), stored.groups.get(g, 0)
        if a == h:
            continue
        if g == "mtp":
            cause = (f"MTP / next-n layers: config says {spec.mtp_layers}; the headers hold {h:,} parameters in them"
                     if spec.mtp_layers else "layers past num_hidden_layers stored in the checkpoint (MTP?)")
        elif g == "other":
            cause = (f"tensors moetool cannot place ({sum(n for n, _ in stored.unknown)}; "
                     f"e.g. {stored.unknown[0][1]!r})")
        elif g == "lm_head" and h == 0 and a > 0:
            cause = "no LM head stored: the checkpoint ties it to the embedding though config.json says tie_word_embeddings=false"
        else:
            cause = "config.json and the stored tensors disagree (missing or extra tensors, or other shapes)"
        diffs.append(asdict(Difference(g, a, h, cause)))
    not_counted = [
        {"kind": kind, "tensors": n, "elements": elements, "bytes": nbytes, "cause": _KIND_CAUSE[kind],
         "example": example}
        for kind, (n, elements, nbytes, example) in sorted(stored.not_counted.items())
    ]
    a_total, h_total = _total(analytic), _total(stored.groups)
    # `match`: config and headers agree on everything in total_params (an MTP difference is
    # reported but does not count: transformers' save_pretrained drops MTP layers, for one).
    return {"available": True, "match": not [d for d in diffs if d["group"] != "mtp"], "analytic_total": a_total, "headers_total": h_total,
            "differences": diffs, "stored_not_counted": not_counted}


def _bytes_by_dtype(ckpt: Checkpoint) -> Optional[dict[str, int]]:
    return ckpt.stats.bytes_by_dtype() if ckpt.has_weights else None


def _quant_method(spec: ModelSpec) -> Optional[str]:
    q = spec.quantization
    if not q:
        return None
    method = q.get("quant_method")
    extra = q.get("fmt") or q.get("bits")
    return f"{method}" + (f" ({extra})" if extra else "") if method else "unknown"


# --- memory, KV cache, FLOPs ------------------------------------------------------------------

def _weights_bytes(spec: ModelSpec) -> dict[str, int]:
    """Bytes of the model weights (total_params, MTP excluded) in each storage format."""
    return {f: sum(formats.param_bytes(p, f) for p in spec.params if p.group != "mtp") for f in formats.FORMATS}


def _offload_bytes(spec: ModelSpec) -> dict[str, int]:
    """What a runtime that offloads experts keeps on the accelerator: every non-expert weight plus
    k routed experts of each MoE layer (vision included when present)."""
    out = {}
    moe = spec.moe
    for f in formats.FORMATS:
        total = 0
        for p in spec.params:
            if p.group == "mtp":
                continue
            b = formats.param_bytes(p, f)
            total += b * moe.top_k // moe.num_experts if p.group == "routed_experts" and moe else b
        out[f] = total
    return out


def _kv_cache(spec: ModelSpec, context: int, batch: int, kv_dtype: str) -> dict[str, Any]:
    """KV cache for `batch` sequences of `context` tokens. GQA: K and V of every KV head; MLA:
    the compressed latent + RoPE key; sliding-window / chunked layers keep at most their window;
    Mamba and linear-attention layers keep a fixed state instead (same dtype)."""
    size = formats.dtype_bytes(kv_dtype)
    per_token_full = per_token_head = 0
    kv_elems = kv_elems_head = 0
    state_elems = 0
    for l in spec.layers:
        kept = context if l.window is None else min(context, l.window)
        per_head = l.kv_per_token if l.kv_per_token_per_head is None else l.kv_per_token_per_head
        kv_elems += l.kv_per_token * kept
        kv_elems_head += per_head * kept
        per_token_full += l.kv_per_token
        per_token_head += per_head
        state_elems += l.state_elems
    mla = any(l.mixer == "mla" for l in spec.layers)
    return {
        "context": context, "batch": batch, "dtype": kv_dtype,
        "bytes_per_token": per_token_full * size,
        "bytes": (kv_elems + state_elems) * size * batch,
        "state_bytes": state_elems * size * batch,
        "windowed_layers": sum(1 for l in spec.layers if l.window is not None),
        # MLA: `bytes*` hold the compressed latent (as transformers 5, vLLM, SGLang and DeepSeek
        # cache it); the `*_per_head` fields hold K and V decompressed per head.
        "convention": "mla_latent" if mla else "per_head",
        "bytes_per_token_per_head": per_token_head * size,
        "bytes_per_head": (kv_elems_head + state_elems) * size * batch,
    }


def _flops(spec: ModelSpec, context: int) -> dict[str, Any]:
    """FLOPs to generate one token with `context` tokens in the cache: 2 per active matmul weight
    (LM head included, embedding lookup and vision excluded) plus QK^T and AV over the cached
    positions (window-limited). Mamba / linear-attention state updates are not included."""
    moe = spec.moe
    matmul = 0
    for p in spec.params:
        if not p.matmul or p.group in ("embedding", "vision", "audio", "mtp"):
            continue
        n = p.numel
        if p.group == "routed_experts" and moe:
            n = n * moe.top_k // moe.num_experts
        matmul += 2 * n
    if spec.tie_word_embeddings:  # the tied matrix serves as the head: V x D multiply-adds
        matmul += 2 * spec.vocab_size * spec.hidden_size
    if moe and spec.modality_experts:  # experts a text token never runs (ERNIE-4.5-VL's vision experts)
        matmul -= 2 * (spec.modality_experts * moe.top_k // moe.num_experts) * len(spec.moe_layers)
    kept = [context if l.window is None else min(context, l.window) for l in spec.layers]
    attention = sum(l.attn_flops_per_ctx * n for l, n in zip(spec.layers, kept))
    latent = sum((l.attn_flops_per_ctx if l.attn_flops_per_ctx_latent is None else l.attn_flops_per_ctx_latent) * n
                 for l, n in zip(spec.layers, kept))
    # `attention` attends over per-head K and V (MLA decompressed, as transformers computes it);
    # `attention_latent` is the MLA weight-absorbed form that matches the latent KV cache. The
    # per-token matmuls are the same in both (the absorbed projections are counted as stored).
    return {"context": context, "matmul": matmul, "attention": attention, "total": matmul + attention,
            "attention_convention": "per_head", "attention_latent": latent, "total_latent": matmul + latent}


def _per_layer(spec: ModelSpec) -> list[LayerCount]:
    by: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for p in spec.params:
        if p.layer is not None and p.group != "mtp":
            by[p.layer][p.group] += p.numel
    moe = spec.moe
    rows = []
    for l in spec.layers:
        g = by[l.index]
        total = sum(g.values())
        routed = g["routed_experts"]
        active = total - routed + ((routed - spec.modality_experts * l.moe) * moe.top_k // moe.num_experts if moe else 0)
        rows.append(LayerCount(layer=l.index, mixer=l.mixer, moe=l.moe, attention=g["attention"] + g["ssm"],
                               router=g["router"], routed_experts=routed, shared_experts=g["shared_experts"],
                               dense_mlp=g["dense_mlp"], norms=g["norms"], total=total, active=active))
    return rows
