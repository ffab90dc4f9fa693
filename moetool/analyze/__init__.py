"""`moetool analyze`: routing recorded elsewhere (vLLM, SGLang, TensorRT-LLM, llama.cpp, router
trace JSONL, long-table CSV) turned into moetool's routing metrics, gates and profiles.

The model (`--model`: a checkpoint, a config.json or a sample name; no weights are read) gives E,
k and which decoder layers are MoE; the recording gives the choices. Metrics are the ones `trace`
computes from its own choices (moetool/metrics.py); what an engine does not record (router logits:
entropy, top-k mass, near ties, the balance loss) is null, and formats that hold only per-expert
counts (TensorRT-LLM, imatrix, SGLang stat mode) give the load metrics only.

Example:
    >>> from moetool.analyze import analyze
    >>> r = analyze(["routed_experts.npy"], model="qwen3-30b-a3b")   # doctest: +SKIP
    >>> r.layers[0]["metrics"]["max_mean_ratio"]                      # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .readers import FORMATS, BadRecording, Recording, Sequence, read

SCHEMA_VERSION = 1

__all__ = ["analyze", "AnalyzeReport", "FORMATS", "BadRecording", "read"]


@dataclass
class AnalyzeReport:
    model: str
    model_type: str
    num_experts: int
    top_k: int
    format: str
    files: list[str]
    tokens: int
    sequences: int
    layers: list[dict]
    summary: dict
    notes: list[str] = field(default_factory=list)
    recording: Optional[Recording] = field(default=None, repr=False)
    stats: Any = field(default=None, repr=False)  # ProfileStats of a per-token recording (None: counts only)
    layer_map: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "command": "analyze", "model": self.model,
                "model_type": self.model_type, "num_experts": self.num_experts, "top_k": self.top_k,
                "format": self.format, "files": self.files, "tokens": self.tokens, "sequences": self.sequences,
                "layers": self.layers, "summary": self.summary, "notes": self.notes}

    def __repr__(self) -> str:
        return (f"AnalyzeReport(format={self.format!r}, model={self.model!r}, tokens={self.tokens}, "
                f"sequences={self.sequences}, layers={len(self.layers)})")


def analyze(paths: list[str], *, model: Optional[str], fmt: str = "auto", revision: Optional[str] = None) -> AnalyzeReport:
    """Read one or more recordings of the same model and format, measure their routing."""
    from ..arch import spec_from_config
    from ..errors import MoetoolError
    from ..source import resolve

    if not paths:
        raise MoetoolError("analyze needs at least one recording")
    ckpt = resolve(model, revision=revision, read_headers=False)
    spec = spec_from_config(ckpt.config, ckpt.config_path)
    if spec.moe is None:
        raise MoetoolError(f"{ckpt.source}: {spec.model_type} has no routed experts")
    E, k = spec.moe.num_experts, spec.moe.top_k
    recs = [read(p, fmt) for p in paths]
    kinds = {r.format for r in recs}
    if len(kinds) != 1:
        raise BadRecording(f"the recordings are of different formats ({', '.join(sorted(kinds))}); analyze one format at a time")
    fmt_name = kinds.pop()
    layer_map = None
    sequences: list[Sequence] = []
    loads = None
    notes: list[str] = []
    for p, r in zip(paths, recs):
        _expand_flat(r, spec, p)
        lm = resolve_layers(r, spec, p)
        if layer_map is not None and lm != layer_map:
            raise BadRecording(f"{p}: records layers {lm}, the other recordings {layer_map}")
        layer_map = lm
        _check(r, E, k, p)
        sequences += [Sequence(s.experts[:, :, :k], None if s.weights is None else s.weights[:, :, :k], s.token_ids)
                      for s in r.sequences]
        if r.loads is not None:
            loads = r.loads if loads is None else loads + r.loads
        for n in r.notes:
            if n not in notes:
                notes.append(n)
    if sequences and loads is not None:
        raise BadRecording("cannot mix per-token recordings with count-only ones")
    stats = None
    if sequences:
        from ..profile.stats import config_fingerprint

        stats = profile_of(sequences, layer_map, E, k, model=ckpt.source, model_type=spec.model_type,
                           fingerprint=config_fingerprint(ckpt.config))
        layers, tokens = _layers_from_stats(stats, layer_map)
    else:
        layers, tokens = _layers_from_loads(loads, layer_map, E, k)
    from ..metrics import summarise

    summary = summarise([(l["layer"], l["metrics"]) for l in layers])
    if tokens and tokens * k < 10 * E:
        notes.append(f"only {tokens} token(s) x top-{k} over {E} experts: per-expert statistics are mostly noise "
                     f"(dead experts are expected by chance)")
    return AnalyzeReport(model=ckpt.source, model_type=spec.model_type, num_experts=E, top_k=k, format=fmt_name,
                         files=list(paths), tokens=tokens, sequences=len(sequences), layers=layers, summary=summary,
                         notes=notes, recording=recs[0] if len(recs) == 1 else None, layer_map=layer_map, stats=stats)


# --- layers ----------------------------------------------------------------------------------------

def resolve_layers(r: Recording, spec, where: str) -> list[int]:
    """Decoder-layer index of each recorded layer column. "moe": positions among the MoE layers;
    "model": decoder layers (dense ones dropped, as engines leave them empty); "moe_or_model":
    as many columns as MoE layers, or as decoder layers; "either": ids that are MoE layer indices
    are taken as such, else ids 0..n-1 are taken as positions among the MoE layers."""
    moe = spec.moe_layers
    ids = list(r.layer_ids)
    n = len(ids)
    if r.layer_kind == "moe_or_model":
        if n == len(moe):
            return list(moe)
        if n == spec.num_layers:
            _keep_columns(r, [i for i in range(n) if i in set(moe)])
            return list(moe)
        raise BadRecording(f"{where}: {n} recorded layers, but the model has {len(moe)} MoE layers of "
                           f"{spec.num_layers}")
    if r.layer_kind == "model":
        extra = [i for i in ids if i >= spec.num_layers]
        if extra:
            raise BadRecording(f"{where}: layer {extra[0]} recorded, but the model has {spec.num_layers} layers")
        keep = [j for j, i in enumerate(ids) if i in set(moe)]
        if not keep:
            raise BadRecording(f"{where}: none of the recorded layers is a MoE layer of the model")
        _keep_columns(r, keep)
        return [ids[j] for j in keep]
    if set(ids) <= set(moe):
        return ids
    if ids == list(range(n)) and n <= len(moe):
        return [moe[i] for i in ids]
    raise BadRecording(f"{where}: recorded layers {ids[:8]} are neither MoE layers of the model ({moe[:8]}...) "
                       "nor positions among them")


def _keep_columns(r: Recording, keep: list[int]) -> None:
    for s in r.sequences:
        s.experts = s.experts[:, keep]
        if s.weights is not None:
            s.weights = s.weights[:, keep]
    if r.loads is not None:
        r.loads = r.loads[keep]
    r.layer_ids = [r.layer_ids[j] for j in keep]


def _expand_flat(r: Recording, spec, where: str) -> None:
    """SGLang: base64 arrays of T x L x k int32; L is the MoE layer count or every decoder layer."""
    if r.flat is None:
        return
    k = spec.moe.top_k
    for ids, tokens, out_ids in r.flat:
        cands = [L for L in (len(spec.moe_layers), spec.num_layers) if len(ids) % (L * k) == 0]
        if tokens is not None:
            cands = [L for L in cands if len(ids) // (L * k) in (tokens, tokens - 1)] or cands
        cands = sorted(set(cands))
        if not cands:
            raise BadRecording(f"{where}: {len(ids)} expert ids is not tokens x layers x top-{k} for this model "
                               f"({len(spec.moe_layers)} MoE layers, {spec.num_layers} layers)")
        if len(cands) > 1:
            raise BadRecording(f"{where}: {len(ids)} expert ids fit both {cands[0]} and {cands[1]} layers; "
                               "keep meta_info.prompt_tokens / completion_tokens in the file")
        L = cands[0]
        r.sequences.append(Sequence(ids.reshape(-1, L, k)))
    r.layer_ids = list(range(r.sequences[0].experts.shape[1]))
    r.layer_kind = "moe_or_model"
    r.k = k
    r.flat = None


def _check(r: Recording, E: int, k: int, where: str) -> None:
    if r.sequences:
        K = r.sequences[0].experts.shape[2]
        if K < k:
            raise BadRecording(f"{where}: {K} experts recorded per token, the model routes to top-{k}")
        for i, s in enumerate(r.sequences):
            chosen = s.experts[:, :, :k]
            if chosen.size and (chosen.min() < 0 or chosen.max() >= E):
                bad = int(chosen.max()) if chosen.max() >= E else int(chosen.min())
                raise BadRecording(f"{where}: sequence {i} routes to expert {bad}, outside 0..{E - 1} of this model")
            if K > k and (s.experts[:, :, k:] != -1).any():
                raise BadRecording(f"{where}: {K} experts recorded per token, the model routes to top-{k}")
    if r.loads is not None:
        if r.loads.shape[1] != E:
            raise BadRecording(f"{where}: counts for {r.loads.shape[1]} experts, the model has {E}")
        if r.k not in (None, k):
            raise BadRecording(f"{where}: recorded with top-{r.k}, the model routes to top-{k}")
        if (r.loads.sum(axis=1) % k).any():
            raise BadRecording(f"{where}: a layer's total count is not a multiple of top-{k}")


def profile_of(sequences: list[Sequence], layer_map: list[int], E: int, k: int, *, model: str = "",
               model_type: str = "", fingerprint: str = ""):
    """The recording as mergeable statistics (moetool.profile.stats): the same sums `profile` and
    `trace` keep, so the metrics come from one code path and the result merges with profiles."""
    from ..profile.stats import ProfileStats

    stats = ProfileStats.empty(E, k, layer_map, model=model, model_type=model_type, fingerprint=fingerprint)
    for s in sequences:
        prev = None
        for j, layer in enumerate(layer_map):
            e = s.experts[:, j, :]
            w = None if s.weights is None or np.isnan(s.weights[:, j, :]).any() else s.weights[:, j, :]
            stats.add(layer, e, w, token_ids=s.token_ids if s.token_ids and len(s.token_ids) == len(e) else None,
                      prev_experts=prev)
            prev = e
    return stats


def _layers_from_stats(stats, layer_map: list[int]):
    layers = []
    for layer in layer_map:
        m = stats.layer_metrics(layer)
        m.setdefault("drop_rate", None)
        layers.append({"layer": layer, "load": m["load"], "metrics": m})
    return layers, stats.tokens


def _layers_from_loads(loads: np.ndarray, layer_map: list[int], E: int, k: int):
    from ..metrics import balance, cold_experts

    layers = []
    tokens = int(loads[0].sum() // k) if len(loads) else 0
    for j, layer in enumerate(layer_map):
        load = loads[j]
        T = int(load.sum() // k)
        m: dict[str, Any] = {"tokens": T, "load": load.tolist()}
        m.update(balance(load))
        dead = [i for i, l in enumerate(load.tolist()) if l == 0]
        cold = cold_experts(load, T, k) if T else []
        m.update({"dead_experts": dead, "dead_count": len(dead), "cold_experts": cold, "cold_count": len(cold)})
        for key in ("switch_balance_loss", "router_entropy_mean", "topk_mass_mean", "near_tie_rate",
                    "reuse_first_choice", "reuse_any_overlap", "transition_nmi", "drop_rate"):
            m[key] = None
        m["coactivation_top_pairs"] = None
        layers.append({"layer": layer, "load": m["load"], "metrics": m})
    return layers, tokens
