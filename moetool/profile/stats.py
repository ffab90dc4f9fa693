"""Mergeable routing statistics: the sums every routing metric is derived from. numpy only.

`ProfileStats` holds, per MoE layer, a `LayerSums`: counts (exact integers) and float64 sums of
the router decisions of any number of sequences. Nothing in it grows with the number of tokens
(the per-token-id table grows with the vocabulary seen, at most V x E; the near-tie sketch is
bounded). Two `ProfileStats` of the same model and options `merge` exactly: counts add, so shards
of a corpus merged equal the whole corpus bit for bit for the counts (float sums up to rounding).

`moetool.metrics.metrics_from_sums` turns one layer's sums into the metrics `trace` reports; the
trace itself builds its metrics from these sums too (one code path).

Stored as `stats.safetensors` (arrays; never pickle) plus `profile.json` (the summary, the
layer list, the domains), each written atomically.

Example:
    >>> import numpy as np
    >>> s = ProfileStats.empty(num_experts=4, top_k=2, layers=[0, 1])
    >>> s.add(0, np.array([[0, 1], [0, 2]]), np.array([[0.6, 0.4], [0.7, 0.3]]), token_ids=[5, 6])
    >>> s.layers[0].load.tolist()
    [2, 1, 1, 0]
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import MoetoolError

STATS_FILE = "stats.safetensors"
SUMMARY_FILE = "profile.json"
STATS_VERSION = 1
TIE_KEEP = 4096  # the near-tie sketch keeps this many smallest margins per layer (exact near-tie counts)
# log10 histogram of margins (the fallback when more near ties than TIE_KEEP fall below the threshold)
HIST_LO, HIST_HI, HIST_PER_DECADE = -12, 4, 100
HIST_EDGES = 10.0 ** np.linspace(HIST_LO, HIST_HI, (HIST_HI - HIST_LO) * HIST_PER_DECADE + 1)

INT_ARRAYS = ("load", "first_load", "coact", "transitions", "first_transitions", "reap_count", "margin_hist")
FLOAT_ARRAYS = ("weight_sum", "prob_sum", "reap_sum")
INT_SCALARS = ("tokens", "pairs", "reuse_first", "reuse_any", "prob_tokens", "margin_tokens", "sel_n")
FLOAT_SCALARS = ("entropy_sum", "topk_mass_sum", "sel_mean", "sel_m2", "tie_cap")


def _canon_domain(d: Optional[str]) -> str:
    return "" if d is None else str(d)


@dataclass
class LayerSums:
    """Sums over every routed token of one MoE layer. E experts, K per token.

    load[e]              (token, slot) assignments to e                     (sum = tokens x K)
    first_load[e]        tokens whose first choice is e
    weight_sum[e]        sum of e's gate weights (the gate-weighted frequency)
    coact[i, j]          tokens choosing both i and j (symmetric, zero diagonal)
    transitions[i, j]    tokens with i among the previous MoE layer's choices and j among this one's
    first_transitions    the same for first choices only (NMI); both None on the first MoE layer
    pairs / reuse_*      consecutive-token pairs within a sequence; how many share the first choice /
                         any chosen expert
    prob_sum[e], prob_tokens, entropy_sum, topk_mass_sum: the router distribution's sums
    sel_n, sel_mean, sel_m2: count, mean, M2 (Chan et al.) of the finite selection scores
    margins (sorted, at most TIE_KEEP), tie_cap, margin_hist, margin_tokens: k / k+1 margins
    reap_sum[e], reap_count[e]: sum of gate weight x ||expert output|| over e's routed tokens
    domain_load[domain][e], vocab (sorted keys token_id * E + first choice) and vocab_counts
    """

    E: int
    K: int
    tokens: int = 0
    load: np.ndarray = None
    first_load: np.ndarray = None
    weight_sum: np.ndarray = None
    coact: np.ndarray = None
    transitions: Optional[np.ndarray] = None
    first_transitions: Optional[np.ndarray] = None
    pairs: int = 0
    reuse_first: int = 0
    reuse_any: int = 0
    prob_sum: np.ndarray = None
    prob_tokens: int = 0
    entropy_sum: float = 0.0
    topk_mass_sum: float = 0.0
    sel_n: int = 0
    sel_mean: float = 0.0
    sel_m2: float = 0.0
    margins: np.ndarray = None
    tie_cap: float = math.inf  # every finite margin below tie_cap is in `margins`
    margin_hist: np.ndarray = None
    margin_tokens: int = 0
    reap_sum: np.ndarray = None
    reap_count: np.ndarray = None
    domain_load: dict = field(default_factory=dict)
    vocab_keys: np.ndarray = None
    vocab_counts: np.ndarray = None
    tie_keep: int = TIE_KEEP

    def __post_init__(self):
        E = self.E
        z = lambda *s, dt=np.int64: np.zeros(s, dtype=dt)
        for name, arr in (("load", z(E)), ("first_load", z(E)), ("weight_sum", z(E, dt=np.float64)),
                          ("coact", z(E, E)), ("prob_sum", z(E, dt=np.float64)), ("reap_sum", z(E, dt=np.float64)),
                          ("reap_count", z(E)), ("margins", z(0, dt=np.float64)),
                          ("margin_hist", z(len(HIST_EDGES) + 1)), ("vocab_keys", z(0)), ("vocab_counts", z(0))):
            if getattr(self, name) is None:
                setattr(self, name, arr)

    # --- adding ------------------------------------------------------------------------------

    def add(self, experts: np.ndarray, weights: Optional[np.ndarray], token_ids=None, domains=None,
            segments: Optional[Sequence[int]] = None, probs=None, selection=None, prev_experts=None,
            expert_output_norms=None) -> None:
        experts = np.asarray(experts, dtype=np.int64)
        T, K = experts.shape
        E = self.E
        if K != self.K:
            raise MoetoolError(f"expected top-{self.K} experts per token, got {K}")
        if T == 0:
            return
        if experts.min() < 0 or experts.max() >= E:
            raise MoetoolError(f"expert index outside 0..{E - 1}")
        segments = [T] if segments is None else [int(s) for s in segments]
        if sum(segments) != T:
            raise MoetoolError(f"segments sum to {sum(segments)}, not the {T} tokens")
        self.tokens += T
        flat = experts.reshape(-1)
        self.load += np.bincount(flat, minlength=E)
        self.first_load += np.bincount(experts[:, 0], minlength=E)
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            self.weight_sum += np.bincount(flat, weights=w.reshape(-1), minlength=E)
            if expert_output_norms is not None:
                n = np.asarray(expert_output_norms, dtype=np.float64).reshape(-1)
                self.reap_sum += np.bincount(flat, weights=w.reshape(-1) * n, minlength=E)
                self.reap_count += np.bincount(flat, minlength=E)
        if K > 1:  # co-activation: every ordered pair of distinct slots of a token (bincount: fast)
            a, b = np.nonzero(~np.eye(K, dtype=bool))
            self.coact += _pair_counts(experts[:, a], experts[:, b], E)
        # consecutive-token pairs never cross a sequence boundary
        starts = np.zeros(T, dtype=bool)
        starts[np.cumsum([0] + segments[:-1])] = True
        inner = ~starts[1:]  # pair (t-1, t) for t = 1..T-1 within a sequence
        self.pairs += int(inner.sum())
        if T > 1:
            self.reuse_first += int(((experts[1:, 0] == experts[:-1, 0]) & inner).sum())
            overlap = (experts[1:, :, None] == experts[:-1, None, :]).any(axis=(1, 2))
            self.reuse_any += int((overlap & inner).sum())
        if prev_experts is not None:
            prev = np.asarray(prev_experts, dtype=np.int64)
            if self.transitions is None:
                self.transitions = np.zeros((E, E), dtype=np.int64)
                self.first_transitions = np.zeros((E, E), dtype=np.int64)
            self.first_transitions += _pair_counts(prev[:, :1], experts[:, :1], E)
            self.transitions += _pair_counts(np.repeat(prev, K, axis=1), np.tile(experts, (1, prev.shape[1])), E)
        if probs is not None:
            p = np.asarray(probs, dtype=np.float64)
            self.prob_tokens += T
            self.prob_sum += p.sum(axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
            self.entropy_sum += float((-plogp.sum(axis=1)).sum())
            self.topk_mass_sum += float(np.take_along_axis(p, experts, axis=1).sum())
        if selection is not None and np.asarray(selection).shape[1] > K:
            self._add_margins(np.asarray(selection, dtype=np.float64))
        if domains is not None:
            per_token = self._domain_per_token(domains, segments)
            for d in dict.fromkeys(per_token):
                rows = np.array([x == d for x in per_token])
                self.domain_load.setdefault(d, np.zeros(E, dtype=np.int64))
                self.domain_load[d] += np.bincount(experts[rows].reshape(-1), minlength=E)
        if token_ids is not None:
            ids = np.asarray(token_ids, dtype=np.int64)
            if ids.shape != (T,):
                raise MoetoolError(f"token_ids has shape {ids.shape}, expected ({T},)")
            keys, counts = np.unique(ids * E + experts[:, 0], return_counts=True)
            self.vocab_keys, self.vocab_counts = _merge_sparse(self.vocab_keys, self.vocab_counts, keys, counts)

    @staticmethod
    def _domain_per_token(domains, segments) -> list[str]:
        if isinstance(domains, str):
            return [domains] * sum(segments)
        domains = list(domains)
        if len(domains) != len(segments):
            raise MoetoolError(f"{len(domains)} domains for {len(segments)} sequences")
        return [_canon_domain(d) for d, n in zip(domains, segments) for _ in range(n)]

    def _add_margins(self, sel: np.ndarray) -> None:
        from ..metrics import token_margins

        finite = sel[np.isfinite(sel)]
        if finite.size:  # Chan et al.'s parallel update of (n, mean, M2)
            n_b, mean_b = finite.size, float(finite.mean())
            m2_b = float(((finite - mean_b) ** 2).sum())
            self._merge_moments(n_b, mean_b, m2_b)
        m = token_margins(sel, self.K)
        self.margin_tokens += len(m)
        fin = m[np.isfinite(m)]
        self.margin_hist += np.bincount(np.searchsorted(HIST_EDGES, fin, side="right"),
                                        minlength=len(HIST_EDGES) + 1)
        self._keep_margins(np.concatenate([self.margins, fin[fin < self.tie_cap]]))

    def _merge_moments(self, n_b: int, mean_b: float, m2_b: float) -> None:
        n_a = self.sel_n
        n = n_a + n_b
        delta = mean_b - self.sel_mean
        self.sel_mean = self.sel_mean + delta * n_b / n
        self.sel_m2 = self.sel_m2 + m2_b + delta * delta * n_a * n_b / n
        self.sel_n = n

    def _keep_margins(self, m: np.ndarray) -> None:
        m = np.sort(m)
        if len(m) > self.tie_keep:  # keep the smallest; everything below the new cap is still kept
            self.tie_cap = float(m[self.tie_keep])
            m = m[m < self.tie_cap]
        self.margins = m

    # --- merging -----------------------------------------------------------------------------

    def merge(self, o: "LayerSums") -> None:
        if (o.E, o.K) != (self.E, self.K):
            raise MoetoolError(f"cannot merge layers with E={o.E}, k={o.K} into E={self.E}, k={self.K}")
        for name in ("tokens", "pairs", "reuse_first", "reuse_any", "prob_tokens", "margin_tokens",
                     "entropy_sum", "topk_mass_sum"):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        for name in ("load", "first_load", "weight_sum", "coact", "prob_sum", "reap_sum", "reap_count", "margin_hist"):
            getattr(self, name).__iadd__(getattr(o, name))
        if o.transitions is not None:
            if self.transitions is None:
                self.transitions, self.first_transitions = o.transitions.copy(), o.first_transitions.copy()
            else:
                self.transitions += o.transitions
                self.first_transitions += o.first_transitions
        if o.sel_n:
            self._merge_moments(o.sel_n, o.sel_mean, o.sel_m2)
        cap = min(self.tie_cap, o.tie_cap)
        self.tie_cap = cap
        self._keep_margins(np.concatenate([self.margins[self.margins < cap], o.margins[o.margins < cap]]))
        for d, v in o.domain_load.items():
            self.domain_load.setdefault(d, np.zeros(self.E, dtype=np.int64))
            self.domain_load[d] += v
        self.vocab_keys, self.vocab_counts = _merge_sparse(self.vocab_keys, self.vocab_counts, o.vocab_keys,
                                                           o.vocab_counts)

    # --- derived quantities --------------------------------------------------------------------

    def selection_std(self) -> float:
        return math.sqrt(self.sel_m2 / self.sel_n) if self.sel_n > 1 else 0.0

    def near_ties(self, threshold: float) -> tuple[int, bool]:
        """Tokens whose margin is below `threshold`, and whether the count is exact (the sketch
        holds every margin below its cap) rather than read from the log-spaced histogram."""
        if threshold <= self.tie_cap:
            return int(np.searchsorted(self.margins, threshold, side="left")), True
        return int(self.margin_hist[: np.searchsorted(HIST_EDGES, threshold, side="right")].sum()), False

    def vocab_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids, first-choice experts, counts), sorted by token id then expert."""
        return self.vocab_keys // self.E, self.vocab_keys % self.E, self.vocab_counts

    def reap(self) -> np.ndarray:
        """REAP saliency per expert: mean over its routed tokens of gate weight x ||output||
        (NaN for an expert that received no token)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.reap_count > 0, self.reap_sum / np.maximum(self.reap_count, 1), np.nan)

    # --- (de)serialisation ----------------------------------------------------------------------

    def arrays(self, prefix: str, domains: list[str]) -> dict[str, np.ndarray]:
        out = {f"{prefix}.{n}": np.ascontiguousarray(getattr(self, n)) for n in INT_ARRAYS + FLOAT_ARRAYS
               if getattr(self, n) is not None}
        out[f"{prefix}.margins"] = self.margins
        out[f"{prefix}.vocab_keys"] = self.vocab_keys
        out[f"{prefix}.vocab_counts"] = self.vocab_counts
        out[f"{prefix}.int_scalars"] = np.array([getattr(self, n) for n in INT_SCALARS], dtype=np.int64)
        out[f"{prefix}.float_scalars"] = np.array([getattr(self, n) for n in FLOAT_SCALARS], dtype=np.float64)
        if domains:
            out[f"{prefix}.domain_load"] = np.stack([self.domain_load.get(d, np.zeros(self.E, dtype=np.int64))
                                                     for d in domains])
        return out

    @classmethod
    def from_arrays(cls, t: dict[str, np.ndarray], prefix: str, E: int, K: int, domains: list[str],
                    tie_keep: int) -> "LayerSums":
        s = cls(E, K, tie_keep=tie_keep)
        get = lambda n: t.get(f"{prefix}.{n}")
        for n in INT_ARRAYS + FLOAT_ARRAYS + ("margins", "vocab_keys", "vocab_counts"):
            v = get(n)
            if v is not None:
                setattr(s, n, v.copy())
        for n, v in zip(INT_SCALARS, get("int_scalars").tolist()):
            setattr(s, n, int(v))
        for n, v in zip(FLOAT_SCALARS, get("float_scalars").tolist()):
            setattr(s, n, float(v))
        if domains:
            s.domain_load = {d: row.copy() for d, row in zip(domains, get("domain_load"))}
        s._check(prefix)
        return s

    def _check(self, prefix: str) -> None:
        E = self.E
        shapes = {"load": (E,), "first_load": (E,), "weight_sum": (E,), "coact": (E, E), "prob_sum": (E,),
                  "reap_sum": (E,), "reap_count": (E,), "margin_hist": (len(HIST_EDGES) + 1,)}
        for n, shape in shapes.items():
            if getattr(self, n).shape != shape:
                raise MoetoolError(f"{prefix}.{n} has shape {getattr(self, n).shape}, expected {shape}")
        if int(self.load.sum()) != self.tokens * self.K:
            raise MoetoolError(f"{prefix}: load sums to {int(self.load.sum())}, not tokens x k = {self.tokens * self.K}")


def _pair_counts(rows: np.ndarray, cols: np.ndarray, E: int) -> np.ndarray:
    """[E, E] counts of the (rows[t, s], cols[t, s]) pairs."""
    return np.bincount((rows * E + cols).reshape(-1), minlength=E * E).reshape(E, E)


def _merge_sparse(ka: np.ndarray, ca: np.ndarray, kb: np.ndarray, cb: np.ndarray):
    """Two sorted sparse count vectors added exactly."""
    if not len(kb):
        return ka, ca
    if not len(ka):
        return kb.copy(), cb.copy()
    keys = np.concatenate([ka, kb])
    counts = np.concatenate([ca, cb])
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    uniq, start = np.unique(keys, return_index=True)
    return uniq, np.add.reduceat(counts, start)


def config_fingerprint(config: dict) -> str:
    """sha256 of config.json in canonical form: profiles of different models never merge."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# Options that change router decisions: profiles merge only when they agree.
MERGE_KEYS = ("fingerprint", "model_type", "num_experts", "top_k", "moe_layers", "dtype", "router_dtype",
              "tie_keep")


@dataclass
class ProfileStats:
    """The statistics of a workload: `meta` (model identity, options, counts) and one LayerSums
    per MoE layer (decoder layer index -> sums), in layer order."""

    meta: dict
    layers: dict[int, LayerSums]

    @classmethod
    def empty(cls, num_experts: int, top_k: int, layers: Sequence[int], *, model: str = "", model_type: str = "",
              fingerprint: str = "", dtype: str = "float32", router_dtype: str = "float32",
              tie_keep: int = TIE_KEEP) -> "ProfileStats":
        meta = {"model": model, "model_type": model_type, "fingerprint": fingerprint, "num_experts": num_experts,
                "top_k": top_k, "moe_layers": list(layers), "dtype": dtype, "router_dtype": router_dtype,
                "tie_keep": tie_keep, "tokens": 0, "prompts": 0, "domains": []}
        return cls(meta, {l: LayerSums(num_experts, top_k, tie_keep=tie_keep) for l in layers})

    @property
    def num_experts(self) -> int:
        return self.meta["num_experts"]

    @property
    def top_k(self) -> int:
        return self.meta["top_k"]

    @property
    def tokens(self) -> int:
        return self.meta["tokens"]

    def prev_layer(self, layer: int) -> Optional[int]:
        order = self.meta["moe_layers"]
        i = order.index(layer)
        return order[i - 1] if i else None

    def add(self, layer: int, experts, weights=None, token_ids=None, domain=None, expert_output_norms=None, *,
            segments=None, probs=None, selection=None, prev_experts=None) -> None:
        """Add one MoE layer's decisions for T tokens: experts [T, K] best first, weights [T, K].
        `segments`: sequence lengths (default: one sequence of T tokens), `domain`: one name or one
        per sequence; `prev_experts` [T, K]: the same tokens' choices in the previous MoE layer
        (transitions); `probs` [T, E] the router distribution, `selection` [T, E] the scores top-k
        ranks; `expert_output_norms` [T, K] ||expert output|| per slot (REAP)."""
        if layer not in self.layers:
            raise MoetoolError(f"layer {layer} is not a MoE layer of this profile")
        s = self.layers[layer]
        s.add(experts, weights, token_ids, domain, segments, probs, selection, prev_experts, expert_output_norms)
        if domain is not None:
            for d in ([domain] if isinstance(domain, str) else domain):
                if _canon_domain(d) not in self.meta["domains"]:
                    self.meta["domains"].append(_canon_domain(d))
        if layer == self.meta["moe_layers"][0]:
            self.meta["tokens"] += len(experts)
            self.meta["prompts"] += 1 if segments is None else len(segments)

    def merge(self, other: "ProfileStats") -> "ProfileStats":
        for k in MERGE_KEYS:
            if self.meta.get(k) != other.meta.get(k):
                raise MoetoolError(f"cannot merge profiles of different models or options: {k} is "
                                   f"{_short(self.meta.get(k))} vs {_short(other.meta.get(k))}")
        for l, s in self.layers.items():
            s.merge(other.layers[l])
        self.meta["tokens"] += other.meta["tokens"]
        self.meta["prompts"] += other.meta["prompts"]
        for d in other.meta["domains"]:
            if d not in self.meta["domains"]:
                self.meta["domains"].append(d)
        return self

    # --- metrics ----------------------------------------------------------------------------------

    def layer_metrics(self, layer: int) -> dict[str, Any]:
        from ..metrics import metrics_from_sums

        return metrics_from_sums(self.layers[layer])

    def summary(self) -> dict[str, Any]:
        """profile.json: schema_version, command, model, tokens, layers {layer, load, metrics}, summary."""
        from ..metrics import sample_adequacy, summarise

        layers = [{"layer": l, "load": s.load.tolist(), "metrics": self.layer_metrics(l)} for l, s in self.layers.items()]
        E, K = self.num_experts, self.top_k
        return {"schema_version": STATS_VERSION, "command": "profile", "model": self.meta["model"],
                "model_type": self.meta["model_type"], "num_experts": E, "top_k": K,
                "dtype": self.meta["dtype"], "router_dtype": self.meta["router_dtype"],
                "fingerprint": self.meta["fingerprint"], "tokens": self.tokens, "prompts": self.meta["prompts"],
                "domains": self.meta["domains"], "moe_layers": self.meta["moe_layers"],
                "tie_keep": self.meta["tie_keep"], "sample": sample_adequacy(self.tokens, E, K),
                "layers": layers, "summary": summarise([(d["layer"], d["metrics"]) for d in layers])}

    # --- files --------------------------------------------------------------------------------------

    def tensors(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for l, s in self.layers.items():
            out.update(s.arrays(f"layer{l}", self.meta["domains"]))
        return out

    def save(self, directory: str, summary: Optional[dict] = None) -> dict:
        """Write stats.safetensors then profile.json into `directory` (created), each atomically;
        profile.json names the stats file's sha256, so a half-replaced pair is detected."""
        from safetensors.numpy import save

        os.makedirs(directory, exist_ok=True)
        # one metadata key: safetensors writes a map in arbitrary order, and the bytes must not vary
        data = save(self.tensors(), metadata={"moetool_profile_stats": str(STATS_VERSION)})
        _atomic_write(os.path.join(directory, STATS_FILE), data)
        summary = summary or self.summary()
        summary["stats_sha256"] = hashlib.sha256(data).hexdigest()
        summary["meta"] = self.meta
        from ..render import clean

        _atomic_write(os.path.join(directory, SUMMARY_FILE),
                      (json.dumps(clean(summary), indent=1, allow_nan=False) + "\n").encode())
        return summary

    @classmethod
    def load(cls, directory: str) -> "ProfileStats":
        from safetensors.numpy import load

        sj, st = os.path.join(directory, SUMMARY_FILE), os.path.join(directory, STATS_FILE)
        if not os.path.isdir(directory) or not os.path.isfile(sj):
            raise MoetoolError(f"{directory}: not a profile (no {SUMMARY_FILE}; write one with `moetool profile -o`)")
        try:
            summary = json.loads(open(sj, encoding="utf-8").read())
            data = open(st, "rb").read()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MoetoolError(f"{directory}: cannot read the profile ({e.__class__.__name__})") from None
        if not isinstance(summary, dict) or summary.get("command") != "profile" or "meta" not in summary:
            raise MoetoolError(f"{sj}: not a `moetool profile` summary")
        if hashlib.sha256(data).hexdigest() != summary.get("stats_sha256"):
            raise MoetoolError(f"{st}: does not match {SUMMARY_FILE} (sha256 differs); the profile is incomplete")
        try:
            t = load(data)
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise MoetoolError(f"{st}: not a valid safetensors file ({str(e).splitlines()[0][:100]})") from None
        meta = summary["meta"]
        E, K, domains = meta["num_experts"], meta["top_k"], meta["domains"]
        layers = {l: LayerSums.from_arrays(t, f"layer{l}", E, K, domains, meta["tie_keep"]) for l in meta["moe_layers"]}
        return cls(meta, layers)


def _short(v: Any) -> str:
    s = str(v)
    return s[:16] + "..." if len(s) > 19 else s


def _atomic_write(path: str, data: bytes) -> None:
    from ..render import atomic_write_bytes

    atomic_write_bytes(path, data)
