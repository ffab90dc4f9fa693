"""`moetool.quantize_report`: per-expert quantization sensitivity on the tokens actually routed to
each expert, and a mixed-precision plan under a budget (docs/quantization.md).

How it runs: the calibration text goes through the reference forward, streamed layer by layer. A
hook sees each FFN's input; for a MoE layer it keeps a bounded reservoir of the hidden states
routed to each expert with their gate weights, then scores the layer's experts one at a time
(weights read from the memory-mapped checkpoint, fused tensors sliced per expert, released after
each expert) and drops the reservoirs before the next layer. Memory: one layer's reservoirs plus
one expert, whatever the number of experts.

Per (layer, expert, projection, scheme):
- weight space: rel_error = ||W - Q(W)||_F / ||W||_F, sqnr_db = 10 log10(||W||^2 / ||W - Q(W)||^2);
  per (layer, expert, projection): kurtosis (Pearson, 3 for a Gaussian) and outlier ratio max|W| / std(W);
- activation space: output_rel_error = sqrt(sum_t g_t^2 ||x_t Q(W)^T - x_t W^T||^2 / sum_t g_t^2 ||x_t W^T||^2)
  over the calibration tokens t routed to the expert, g_t their gate weights; x_t is the hidden
  state for gate / up and the expert's own intermediate activation for down.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..errors import MoetoolError
from . import schemes as S

SCHEMA_VERSION = 1
MIN_TOKENS = 16  # experts with fewer calibration tokens are flagged: their output error is noise


@dataclass
class ExpertRow:
    layer: int
    expert: Optional[int | str]  # int: routed expert; "shared"; None: dense MLP
    projection: str
    scheme: str
    rel_error: float
    sqnr_db: float
    output_rel_error: Optional[float]
    tokens: int
    gate_weight_sum: float
    kurtosis: float
    outlier_ratio: float
    numel: int
    bits: float
    low_calibration: bool


@dataclass
class QuantReport:
    model: str
    model_type: str
    schemes: dict[str, float]
    rows: list[ExpertRow]
    calibration_tokens: int
    plan: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"schema_version": SCHEMA_VERSION, "command": "quantize-report", "model": self.model,
                "model_type": self.model_type, "calibration_tokens": self.calibration_tokens,
                "schemes": self.schemes, "experts": [asdict(r) for r in self.rows], "plan": self.plan}

    def to_dataframe(self):
        import pandas as pd
        from dataclasses import asdict

        return pd.DataFrame([asdict(r) for r in self.rows])

    def worst(self, scheme: str, n: int = 10) -> list[ExpertRow]:
        """The most sensitive routed-expert projections under `scheme` (activation error when measured)."""
        rows = [r for r in self.rows if r.scheme == scheme and isinstance(r.expert, int)]
        return sorted(rows, key=lambda r: -(r.output_rel_error if r.output_rel_error is not None else r.rel_error))[:n]


def _weight_stats(w: torch.Tensor) -> tuple[float, float]:
    x = w.double().reshape(-1)
    mu, sd = x.mean(), x.std(unbiased=False)
    kurt = float(((x - mu) ** 4).mean() / sd ** 4) if sd > 0 else float("nan")
    return kurt, float(x.abs().max() / sd) if sd > 0 else float("nan")


class _Scorer:
    """Collects rows; called from the forward's FFN hook (or directly without calibration)."""

    def __init__(self, schemes: list[str], seed: int = 0):
        self.schemes = schemes
        self.rows: list[ExpertRow] = []
        self.rng = random.Random(seed)
        self.done = 0

    def score(self, layer: int, expert, mats: dict[str, torch.Tensor], X: Optional[torch.Tensor],
              g: Optional[torch.Tensor], tokens: int, gate_sum: float, act: Callable) -> None:
        """mats: gate [F, D], up [F, D], down [D, F] (float32); X [n, D] routed inputs, g [n] gate weights."""
        inputs = {}
        if X is not None and len(X):
            gate_out, up_out = X @ mats["gate"].T, X @ mats["up"].T
            inputs = {"gate": (X, gate_out), "up": (X, up_out)}
            h = act(gate_out, up_out)
            inputs["down"] = (h, h @ mats["down"].T)
            w2 = (g.double() ** 2) if g is not None else torch.ones(len(X), dtype=torch.float64)
        for proj, W in mats.items():
            kurt, outlier = _weight_stats(W)
            norm = W.double().norm()
            for scheme in self.schemes:
                Q = S.fake_quantize(W, scheme)
                err = (Q - W).double().norm()
                rel = float(err / norm) if norm > 0 else 0.0
                sqnr = float(10 * math.log10(norm ** 2 / err ** 2)) if err > 0 else float("inf")
                out_rel = None
                if proj in inputs:
                    x, y = inputs[proj]
                    e = (x @ (Q - W).T).double()
                    num = (w2 * e.pow(2).sum(1)).sum()
                    den = (w2 * y.double().pow(2).sum(1)).sum()
                    out_rel = float(torch.sqrt(num / den)) if den > 0 else None
                out, inp = W.shape
                self.rows.append(ExpertRow(layer, expert, proj, scheme, rel, sqnr, out_rel, tokens, gate_sum, kurt,
                                           outlier, W.numel(), S.bits(scheme, out, inp),
                                           isinstance(expert, int) and tokens < MIN_TOKENS))


def quantize_report(model: Optional[str] = None, *, schemes: Optional[list[str]] = None,
                    layers: Optional[set[int]] = None, experts: Optional[set[int]] = None,
                    calibration: Optional[str] = None, calibration_tokens: int = 512, reservoir: int = 256,
                    weight_only: bool = False, budget_bits: Optional[float] = None, budget_gb: Optional[float] = None,
                    device: str = "cpu", progress: Optional[Callable[[int, int], None]] = None) -> QuantReport:
    """Score every expert (and shared expert / dense MLP) projection under every scheme; plan."""
    from ..arch import spec_from_config
    from ..forward import pick_device, run_forward
    from ..forward.config import forward_config
    from ..forward.model import Decoder, Experts, Names, glu
    from ..forward.weights import WeightStore
    from ..tracing import _resolve_for_forward, load_tokenizer

    schemes = schemes or list(S.SCHEMES)
    ckpt = _resolve_for_forward(model, None)
    spec = spec_from_config(ckpt.config, ckpt.config_path)
    fc = forward_config(spec, ckpt.config)
    if spec.moe is None:
        raise MoetoolError(f"{ckpt.source}: not a MoE model")
    moe_layers = [l.index for l in spec.layers if l.moe and (layers is None or l.index in layers)]
    if not moe_layers:
        raise MoetoolError(f"--layers selects no MoE layer; MoE layers: {', '.join(map(str, spec.moe_layers))}")
    if experts is not None and any(not 0 <= e < spec.moe.num_experts for e in experts):
        raise MoetoolError(f"--experts must be between 0 and {spec.moe.num_experts - 1}")
    act = lambda g, u: glu(g, u, fc.expert_act, fc.swiglu_limit, fc.swiglu_alpha)
    scorer = _Scorer(schemes)
    total_experts = len(moe_layers) * (len(experts) if experts is not None else spec.moe.num_experts)

    def score_layer(dec: Decoder, layer: int, h: Optional[torch.Tensor], routing) -> None:
        if layers is not None and layer not in layers:
            return
        store, names = dec.store, dec.names
        if routing is None:  # a dense FFN: every token, weight 1
            if h is None:
                return
            find = lambda p: names.find(layer, f"mlp.{p}_proj.weight", f"feed_forward.{p}_proj.weight")
            mats = {p: store.get(find(p), torch.float32) for p in ("gate", "up", "down")}
            X = _sample(h.float(), None, reservoir, scorer.rng)
            scorer.score(layer, None, mats, X[0], X[1], len(h), float(len(h)), act)
            return
        loader = Experts(store, names, layer, fc.family, spec.moe.expert_ffn, torch.float32, "cpu")
        idx, w = (routing[0].cpu(), routing[1].float().cpu()) if routing[0] is not None else (None, None)
        for e in range(spec.moe.num_experts):
            if experts is not None and e not in experts:
                continue
            X = g = None
            tokens, gsum = 0, 0.0
            if idx is not None:
                tok, slot = torch.where(idx == e)
                tokens, gsum = len(tok), float(w[tok, slot].sum())
                if fc.family == "llama4":  # the gate scales the input; the expert itself sees x * gate
                    X, g = _sample(h[tok].float() * w[tok, slot, None], None, reservoir, scorer.rng)
                else:
                    X, g = _sample(h[tok].float(), w[tok, slot], reservoir, scorer.rng)
            gate, up, down, *_ = loader.load(e)
            if gate is None:
                raise MoetoolError(f"quantize-report does not score ungated experts ({spec.model_type}) yet")
            scorer.score(layer, e, {"gate": gate.float(), "up": up.float(), "down": down.float()}, X, g, tokens,
                         gsum, act)
            del gate, up, down
            store.release()
            scorer.done += 1
            if progress:
                progress(scorer.done, total_experts)
        shared = names.find(layer, "mlp.shared_expert.gate_proj.weight", "mlp.shared_experts.gate_proj.weight",
                            "feed_forward.shared_expert.gate_proj.weight", required=False)
        if shared and experts is None:
            base = shared[: -len("gate_proj.weight")]
            mats = {p: store.get(base + f"{p}_proj.weight", torch.float32) for p in ("gate", "up", "down")}
            X = _sample(h.float(), None, reservoir, scorer.rng) if h is not None else (None, None)
            scorer.score(layer, "shared", mats, X[0], X[1], len(h) if h is not None else 0,
                         float(len(h)) if h is not None else 0.0, act)

    n_tokens = 0
    if weight_only:
        store = WeightStore(ckpt.tensors, streaming=True)  # one expert resident at a time
        dec = Decoder(spec, fc, store)
        for layer in moe_layers:
            score_layer(dec, layer, None, (None, None))
        store.close()
    else:
        tok = load_tokenizer(ckpt)
        if tok is None:
            raise MoetoolError(f"{ckpt.source}: no tokenizer.json for calibration text; use --weight-only")
        from .check import default_calibration_text

        text = _calibration_text(calibration) if calibration else default_calibration_text()
        ids = tok.encode(text).ids[:calibration_tokens]
        if fc.max_positions:
            ids = ids[: fc.max_positions]
        n_tokens = len(ids)
        run_forward(ckpt, ids, device=pick_device(device), record=False, streaming=True,
                    ffn_hook=lambda dec, layer, h, routing: score_layer(dec, layer, h, routing))
    bits_avg = {}
    for s in schemes:
        rows = [r for r in scorer.rows if r.scheme == s]
        n = sum(r.numel for r in rows)
        bits_avg[s] = sum(r.bits * r.numel for r in rows) / n if n else S.bits(s, 4096, 4096)
    report = QuantReport(ckpt.source, spec.model_type, bits_avg, scorer.rows, n_tokens)
    if budget_bits is not None or budget_gb is not None:
        from .plan import make_plan

        report.plan = make_plan(report.rows, schemes, budget_bits=budget_bits, budget_gb=budget_gb)
    return report


def _sample(X: torch.Tensor, g: Optional[torch.Tensor], k: int, rng: random.Random):
    """A bounded uniform sample of routed tokens (reservoir of at most k rows)."""
    if len(X) <= k:
        return X, g
    keep = sorted(rng.sample(range(len(X)), k))
    return X[keep], (None if g is None else g[keep])


def _calibration_text(path: str) -> str:
    try:
        return open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise MoetoolError(f"{path}: cannot read calibration text ({e.__class__.__name__})") from None
