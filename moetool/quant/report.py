"""`moetool.quantize_report`: per-expert quantization sensitivity on the tokens actually routed to
each expert, and a mixed-precision plan under a budget (docs/quantization.md).

How it runs: the calibration text goes through the reference forward, streamed layer by layer. A
hook sees each FFN's input; for a MoE layer it keeps a bounded reservoir of the hidden states
routed to each expert with their gate weights, then scores the layer's experts one at a time
(weights read from the memory-mapped checkpoint, fused tensors sliced per expert, released after
each expert) and drops the reservoirs before the next layer. Memory: one layer's reservoirs plus
one expert, whatever the number of experts. With `corpus=` (many prompts) the text goes through
`moetool profile`'s layer-major engine instead, the same hook scoring each block's routed tokens
and adding the activation-space sums over the blocks. The kernels: quant/kernels.py.

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
from concurrent.futures import wait
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import MoetoolError
from . import kernels as K
from . import native
from . import schemes as S
from .reader import ExpertReader

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

    def _summary(self) -> list[tuple[str, Any]]:
        return [("model", self.model), ("model_type", self.model_type), ("schemes", ", ".join(self.schemes)),
                ("rows", len(self.rows)), ("calibration_tokens", self.calibration_tokens),
                ("plan", "yes" if self.plan else "no")]

    def __repr__(self) -> str:
        from ..render import short_repr

        return short_repr("QuantReport", self._summary())

    def _repr_html_(self) -> str:
        from ..render import short_html

        return short_html("QuantReport", self._summary())

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


BLOCK_ELEMENTS = 1 << 24  # expert weights (all projections) scored together: 64 MB of float32, whatever E
# On a CPU with the native kernel, a quarter of that (8 MB of bf16): reading into a buffer that stays in the
# caches runs at the raw read's speed (preadv into a 4-8 MB buffer: 9.4-10 GB/s, into 16 MB: 7.5-8.3, into
# 32-48 MB: 6-6.7 on the development machine), and the kernel then reads the block from the cache.
NATIVE_BLOCK_ELEMENTS = 1 << 22


def _stats(w: torch.Tensor, chunk: Optional[int] = None, compiled: bool = False) -> tuple[torch.Tensor, ...]:
    """Per matrix of W [B, out, in] (any float dtype): ||W||^2, kurtosis (Pearson), max|W| / std(W)
    and max|W| (float64 [B]). Each row's float32 moments about its own mean (kernels.row_moments:
    z = (W - m) 2^k exactly scaled, sums of z..z^4; rows band by band, or one compiled kernel for
    the block), combined per matrix in float64. Agrees with the float64 computation to float32
    rounding (tests/test_quantize_report.py)."""
    B, out, inp = w.shape
    parts = K.run_compiled("moments", w) if compiled else None
    if parts is not None:
        stats = K.run_compiled("combine", parts, inp)  # float64 on [B, out]: one kernel, not ~40 ops
        if stats is not None:
            return stats
    rows = w.reshape(B * out, inp)
    step = max(1, (chunk or S.band_elements(w.device)) // inp)
    bands = [K.row_moments(rows[r:r + step]) for r in range(0, B * out, step)]
    parts = tuple(torch.cat(p).view(B, out) for p in zip(*bands))
    return K.combine_moments(parts, inp)


def _errors(w: torch.Tensor, scheme: str, diff: Optional[torch.Tensor], scale: Optional[torch.Tensor],
            compiled: bool = False) -> torch.Tensor:
    """||Q(W) - W||^2 per matrix of W [B, out, in] (float64 [B]); Q(W) - W into `diff` if given.
    `scale` [B] (powers of two, for matrices with max |W| far from 1): the errors are squared as
    (Q(W) - W) scale, so float32 squares neither overflow nor underflow. Row sums in float32 (one
    fused kernel when `compiled`, else band by band), added in float64."""
    if compiled and scheme in K.COMPILED_SCHEMES:
        sc = scale.view(-1, 1, 1) if scale is not None else None  # None: a graph without the multiply
        r = K.run_compiled("errors" if diff is None else "errors_diff", w, sc, scheme)
        if r is not None:
            if diff is not None:
                r, d = r
                diff.copy_(d)
            err = r.double().sum(-1)
            return err if scale is None else err / scale.double() ** 2
    if w.dtype != torch.float32:
        w = w.float()
    err = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    for mats, rows, x, q in S.chunks(w, scheme):
        q.sub_(x)
        if diff is not None:
            diff[mats, rows] = q
        if scale is not None:
            q.mul_(scale[mats].view(-1, 1, 1))
        err[mats] += q.square_().reshape(q.shape[0], -1).sum(1)
    return err if scale is None else err / scale.double() ** 2


class _Scorer:
    """Collects rows; called from the forward's FFN hook (or directly without calibration).

    An expert scored again (the next block of a calibration corpus, `corpus=`) keeps its rows:
    its weight-space numbers are those of the first time, and the activation-space sums, token
    counts and gate weights of every block add up (sum_t over all its routed tokens)."""

    def __init__(self, schemes: list[str], seed: int = 0):
        self.schemes = schemes
        self.rows: list[ExpertRow] = []
        self.rng = random.Random(seed)
        self.done = 0
        self.calibrated = True
        self.native = False  # the native kernel (native.c) where it takes the block and scheme
        self.compiled = False  # else the fused compiled kernels (kernels.py) instead of the eager bands
        # (layer, expert) -> {(projection, scheme): [row, numerator, denominator]}
        self.seen: dict[tuple, dict[tuple[str, str], list]] = {}

    def score(self, layer: int, expert, mats: dict[str, torch.Tensor], X: Optional[torch.Tensor],
              g: Optional[torch.Tensor], tokens: int, gate_sum: float, act: Callable) -> None:
        """One expert: mats gate [F, D], up [F, D], down [D, F] (float32); X [n, D] routed inputs, g [n] gate weights."""
        self.score_block(layer, [expert], {p: W.unsqueeze(0) for p, W in mats.items()}, [(X, g, tokens, gate_sum)], act)

    def score_block(self, layer: int, experts: list, mats: dict[str, torch.Tensor], data: list, act: Callable) -> None:
        """A block of experts at once: mats[p] = [B, out, in] (float32, or the stored dtype for the
        compiled kernels; B = len(experts)); data[i] = (X [n, D] routed inputs or None, g [n] gate
        weights or None, tokens, gate weight sum). Weight statistics and every scheme's error for
        the whole block in batched calls; the activation-space error per expert (its own routed
        tokens) from the block's Q(W) - W."""
        B = len(experts)
        inputs: list[dict] = [{} for _ in range(B)]
        w2: list = [None] * B
        for i, (X, g, _, _) in enumerate(data):
            if X is not None and len(X):
                gate_out, up_out = X @ mats["gate"][i].float().T, X @ mats["up"][i].float().T  # float32 (no-op)
                h = act(gate_out, up_out)
                inputs[i] = {"gate": (X, gate_out), "up": (X, up_out), "down": (h, h @ mats["down"][i].float().T)}
                w2[i] = (g.double() ** 2) if g is not None else torch.ones(len(X), dtype=torch.float64, device=X.device)
        calibrated = [i for i in range(B) if inputs[i]]
        new = [i for i, e in enumerate(experts) if (layer, e) not in self.seen]
        results = {}  # proj -> (stats, {scheme: (err^2 [B], {i: (num, den)})})
        for proj, W in mats.items():
            diff = torch.empty(W.shape, dtype=torch.float32, device=W.device) if calibrated else None
            if not new and diff is None:
                continue
            # the native kernel (CPU): moments and, without diffs, every scheme it takes in one pass
            nat = [s for s in self.schemes if self.native and native.supports(W, s)]
            fused = {}  # scheme -> each matrix's error, summed over its rows in float64
            if nat:
                first = nat if diff is None else []
                _, stats, _, err_sums = native.score(W, first, moments=True, sums=True)
                rows = stats.tolist() + err_sums.tolist()  # one list per block; a block's Python in floats
                fused = dict(zip(first, rows[4:]))
            else:
                rows = torch.stack(_stats(W, compiled=self.compiled)).tolist()
            norm2, kurt, outlier, amax = rows[:4]
            scale = None  # errors squared as they are unless some weights are extreme
            if any(a < 2.0 ** -30 or a > 2.0 ** 30 for a in amax):
                absmax = torch.tensor(amax, dtype=torch.float64, device=W.device)
                k = torch.where(absmax > 0, -torch.floor(torch.log2(absmax)) - 1, torch.zeros_like(absmax))
                scale = torch.exp2(k.clamp(-126, 126)).to(torch.float32)
                fused = {}  # squared again with the scale
            per_scheme = {}
            for scheme in self.schemes:
                if scheme in nat:
                    if scheme not in fused:
                        err2 = native.score(W, [scheme], moments=False, scale=scale, diff=diff, sums=True)[3][0]
                        fused[scheme] = (err2 if scale is None else err2 / scale.double() ** 2).tolist()
                    err2 = fused[scheme]
                else:
                    err2 = _errors(W, scheme, diff, scale, self.compiled).tolist()
                sums = {}
                for i in calibrated:
                    x, y = inputs[i][proj]
                    e = (x @ diff[i].T).double()  # diff: float32, whatever W's dtype
                    sums[i] = (float((w2[i] * e.pow(2).sum(1)).sum()), float((w2[i] * y.double().pow(2).sum(1)).sum()))
                per_scheme[scheme] = (err2, sums)
            results[proj] = (norm2, kurt, outlier, per_scheme)
        for i, expert in enumerate(experts):
            tokens, gate_sum = data[i][2], data[i][3]
            entry = self.seen.get((layer, expert))
            if entry is None:
                entry = self.seen[layer, expert] = {}
                for proj, W in mats.items():
                    norm2, kurt, outlier, per_scheme = results[proj]
                    norm, out, inp = math.sqrt(norm2[i]), W.shape[1], W.shape[2]
                    for scheme in self.schemes:
                        err = math.sqrt(per_scheme[scheme][0][i])
                        rel = err / norm if norm > 0 else 0.0
                        sqnr = 10 * math.log10(norm2[i] / err ** 2) if err > 0 else float("inf")
                        row = ExpertRow(layer, expert, proj, scheme, rel, sqnr, None, 0, 0.0, kurt[i], outlier[i],
                                        out * inp, S.bits(scheme, out, inp), False)
                        self.rows.append(row)
                        entry[proj, scheme] = [row, 0.0, 0.0]
            for (proj, scheme), acc in entry.items():
                row = acc[0]
                row.tokens += tokens
                row.gate_weight_sum += gate_sum
                row.low_calibration = self.calibrated and isinstance(expert, int) and row.tokens < MIN_TOKENS
                if i in calibrated:
                    num, den = results[proj][3][scheme][1][i]
                    acc[1] += num
                    acc[2] += den
                    row.output_rel_error = math.sqrt(acc[1] / acc[2]) if acc[2] > 0 else None


def quantize_report(model: Optional[Any] = None, *, schemes: Optional[list[str]] = None,
                    layers: Optional[set[int]] = None, experts: Optional[set[int]] = None,
                    calibration: Optional[str] = None, calibration_tokens: int = 512, reservoir: int = 256,
                    weight_only: bool = False, budget_bits: Optional[float] = None, budget_gb: Optional[float] = None,
                    device: str = "cpu", progress: Optional[Callable[[int, int], None]] = None,
                    corpus: Optional[Sequence] = None, block_tokens: Optional[int] = None) -> QuantReport:
    """Score every expert (and shared expert / dense MLP) projection under every scheme; plan.

    `corpus` (prompts: strings or profile `Prompt`s) calibrates on many prompts through the
    layer-major engine of `moetool profile` (blocks of prompts, one weight pass per block): each
    block's routed tokens are scored in the same pass (a reservoir of at most `reservoir` tokens
    per expert and block), the activation-space sums added over the blocks; the weight-space
    numbers are computed once, in the first block. `calibration_tokens` does not cut a corpus."""
    from ..arch import spec_from_config
    from ..forward import pick_device, run_forward
    from ..forward.config import forward_config
    from ..forward.model import MLP_NAMES, Decoder, Experts, glu
    from ..forward import new_store
    from ..tracing import _resolve_for_forward, load_tokenizer

    schemes = schemes or list(S.SCHEMES)
    from ..source import Checkpoint

    ckpt = model if isinstance(model, Checkpoint) else _resolve_for_forward(model, None)
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
    # the routed experts' own activation where it differs (HY-V4's clamped SwiGLU, Aria's SiLU)
    routed_act = lambda g, u: glu(g, u, fc.routed_act or fc.expert_act, fc.swiglu_limit, fc.swiglu_alpha)
    scorer = _Scorer(schemes)
    scorer.calibrated = not weight_only  # weight space only: no token counts to warn about
    total_experts = len(moe_layers) * (len(experts) if experts is not None else spec.moe.num_experts)
    dev = torch.device(pick_device(device))  # where the schemes run (the forward's device)
    buffers: dict = {}  # the block buffers, allocated once and reused by every layer
    buffers2: dict = {}  # on a CPU, a second set: the next block is read while this one is scored
    # on a CPU with the native kernel, the pool of its threads also reads the next block (native.workers)
    inflight: list = []  # the read last started: done before the report returns
    readers: dict = {}  # per weight store: reads experts straight into the buffers (open files)

    carried: dict = {}  # weight space: the next layer's plan, its first block already read (see below)

    def plan_layer(dec: Decoder, layer: int, idx: Optional[torch.Tensor]) -> dict:
        """A MoE layer's routed experts to score: its loader, the blocks of expert ids, the buffer sets
        (one, or two on a CPU with the native kernel: a block is read while the previous one is scored)."""
        store, names = dec.store, dec.names
        # Stored dtype (views of the mapped file; fp8 / MXFP4 dequantised to float32), converted to
        # float32 while copied into the block buffers on the scoring device.
        loader = Experts(store, names, layer, fc.family, spec.moe.expert_ffn, None, "cpu")
        chosen = [e for e in range(spec.moe.num_experts) if experts is None or e in experts]
        if idx is not None and scorer.seen:  # a later block of a corpus: only the experts with new tokens
            routed = torch.bincount(idx.reshape(-1), minlength=spec.moe.num_experts).tolist()
            chosen = [e for e in chosen if routed[e] or (layer, e) not in scorer.seen]
        first = dict(zip(("gate", "up", "down"), loader.load(chosen[0] if chosen else 0)[:3]))  # shapes only (views)
        if first["gate"] is None:
            raise MoetoolError(f"quantize-report does not score ungated experts ({spec.model_type}) yet")
        per_expert = sum(t.numel() for t in first.values())
        if not buffers:  # first layer: the native kernel on a CPU; else compiled ones if the report pays for it
            scorer.native = dev.type == "cpu" and native.library() is not None
            scorer.compiled = not scorer.native and K.compile_wanted(total_experts * per_expert * len(schemes), dev)
        per_block = max(1, (NATIVE_BLOCK_ELEMENTS if scorer.native else BLOCK_ELEMENTS) // per_expert)  # fixed bytes, whatever E
        # native and compiled kernels read the stored dtype (the conversion is fused); eager ones float32
        dtypes = {t.dtype for t in first.values()}
        dtype = (dtypes.pop() if (scorer.native or scorer.compiled) and len(dtypes) == 1 and dtypes <= FLOAT_DTYPES
                 else torch.float32)
        bufs = _buffers(buffers, first, per_block, dev, dtype)
        del first
        blocks = [chosen[s:s + per_block] for s in range(0, len(chosen), per_block)]
        sets = [bufs]
        if dev.type == "cpu" and scorer.native and (len(blocks) > 1 or weight_only):  # (8 MB more; float32: 64)
            sets.append(_buffers(buffers2, {p: b[0] for p, b in bufs.items()}, per_block, dev, dtype))
        reader = readers.get(id(store))
        if reader is None:
            reader = readers[id(store)] = ExpertReader(store)
        return {"loader": loader, "blocks": blocks, "sets": sets, "reader": reader, "store": store,
                "start": 0, "filled": False}

    def fill(lp: dict, block: list, bset: dict) -> None:  # a block's experts into one set of buffers
        loader, reader, store = lp["loader"], lp["reader"], lp["store"]
        for i, e in enumerate(block):
            if not reader.read(loader, e, bset, i):  # else through the store's map (any layout or dtype)
                gate, up, down, *_ = loader.load(e)
                for p, t in (("gate", gate), ("up", up), ("down", down)):
                    bset[p][i].copy_(t)
                del gate, up, down
                store.release()

    def score_layer(dec: Decoder, layer: int, h: Optional[torch.Tensor], routing, next_layer: Optional[int] = None) -> None:
        if layers is not None and layer not in layers:
            return
        store, names = dec.store, dec.names
        if routing is None:  # a dense FFN: every token, weight 1
            if h is None:
                return
            find = lambda p: names.find(layer, *(f"{m}.{n}.weight" for m in ("mlp", "feed_forward") for n in MLP_NAMES[p]))
            mats = {p: store.get(find(p), torch.float32, device=dev) for p in ("gate", "up", "down")}
            X = _sample(h.float(), None, reservoir, scorer.rng)
            scorer.score(layer, None, mats, X[0], X[1], len(h), float(len(h)), act)
            return
        idx, w = (routing[0].cpu(), routing[1].float().cpu()) if routing[0] is not None else (None, None)
        lp = carried.pop(layer, None) or plan_layer(dec, layer, idx)
        blocks, sets, s0 = lp["blocks"], lp["sets"], lp["start"]
        at = lambda j: sets[(s0 + j) % len(sets)]  # block j's buffers
        # With the native kernel the next block is read (on the kernel's pool, native.workers: preadv and the
        # store release the GIL, as does the kernel) while this one is scored, into the other set of buffers:
        # the read's time hides behind the kernel's, and the reading thread then helps score. In weight
        # space the next layer's first block is read during this layer's last (its plan is made here,
        # before the read starts): the store is touched by one thread at a time.
        if blocks and not lp["filled"]:
            fill(lp, blocks[0], at(0))
        for j, block in enumerate(blocks):
            cur, pending = at(j), None
            if len(sets) > 1:
                mode = torch.is_inference_mode_enabled()  # thread-local: the buffers are inference tensors
                ahead = None
                if j + 1 < len(blocks):
                    ahead = (lp, blocks[j + 1], at(j + 1))
                elif next_layer is not None:
                    nxt = carried[next_layer] = plan_layer(dec, next_layer, None)
                    if nxt["blocks"] and len(nxt["sets"]) > 1 and nxt["sets"][0] is sets[0]:
                        nxt["start"], nxt["filled"] = (s0 + j + 1) % 2, True  # its block 0 into the set not in use
                        ahead = (nxt, nxt["blocks"][0], nxt["sets"][nxt["start"]])
                if ahead is not None:
                    def read_ahead(a=ahead, mode=mode):
                        with torch.inference_mode(mode):
                            fill(*a)
                    pending = native.workers().submit(read_ahead)
                    inflight[:] = [pending]  # (the one before was waited for)
            data = []
            for e in block:
                X = g = None
                tokens, gsum = 0, 0.0
                if idx is not None:
                    tok, slot = torch.where(idx == e)
                    tokens, gsum = len(tok), float(w[tok, slot].sum())
                    if fc.family == "llama4":  # the gate scales the input; the expert itself sees x * gate
                        X, g = _sample(h[tok].float() * w[tok, slot, None].to(h.device), None, reservoir, scorer.rng)
                    else:
                        X, g = _sample(h[tok].float(), w[tok, slot].to(h.device), reservoir, scorer.rng)
                data.append((X, g, tokens, gsum))
            fresh = sum((layer, e) not in scorer.seen for e in block)
            try:
                scorer.score_block(layer, block, {p: b[:len(block)] for p, b in cur.items()}, data, routed_act)
            except BaseException:
                if pending is not None:
                    wait([pending])  # not left writing into the buffers; this error is the one raised
                raise
            if pending is not None:
                pending.result()  # its errors (a truncated file) are raised here
            if j + 1 < len(blocks) and len(sets) == 1:
                fill(lp, blocks[j + 1], cur)
            scorer.done += fresh
            if progress:
                progress(scorer.done, total_experts)
        shared = names.find(layer, "mlp.shared_expert.gate_proj.weight", "mlp.shared_experts.gate_proj.weight",
                            "feed_forward.shared_expert.gate_proj.weight",
                            "mlp.shared_experts.linear_gate.weight", "ffn.shared_experts.w1.weight",  # HY-V4, DeepSeek-V4
                            required=False)
        if shared and experts is None:
            base = shared.rsplit(".", 2)[0] + "."
            stored = lambda p: next(base + n + ".weight" for n in MLP_NAMES[p] if base + n + ".weight" in store)
            mats = {p: store.get(stored(p), torch.float32, device=dev) for p in ("gate", "up", "down")}
            X = _sample(h.float(), None, reservoir, scorer.rng) if h is not None else (None, None)
            scorer.score(layer, "shared", mats, X[0], X[1], len(h) if h is not None else 0,
                         float(len(h)) if h is not None else 0.0, act)

    n_tokens = 0
    try:
        if weight_only:
            store = new_store(ckpt, streaming=True)  # one expert resident at a time (GGUF too)
            dec = Decoder(spec, fc, store)
            with torch.inference_mode():
                for i, layer in enumerate(moe_layers):
                    score_layer(dec, layer, None, (None, None), moe_layers[i + 1] if i + 1 < len(moe_layers) else None)
            store.close()
        elif corpus is not None:
            from ..profile.engine import profile

            if calibration is not None:
                raise MoetoolError("give calibration text or a corpus, not both")
            stats = profile(corpus, model=ckpt, device=device, block_tokens=block_tokens,
                            ffn_hook=lambda dec, layer, h, routing: score_layer(dec, layer, h, routing))
            n_tokens = stats.tokens
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
                        ffn_hook=lambda dec, layer, h, routing: score_layer(dec, layer, h, routing),
                        last_layer=max(moe_layers))  # nothing to score after the last requested layer
    finally:
        wait(inflight)  # (each is waited for where it is used; here too after an interrupt)
        for r in readers.values():
            r.close()
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


FLOAT_DTYPES = {torch.float32, torch.bfloat16, torch.float16}


def _buffers(cache: dict, first: dict[str, torch.Tensor], n: int, device: torch.device,
             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Buffers [n, out, in] per projection for a block of experts shaped like `first`."""
    key = (tuple((p, tuple(t.shape)) for p, t in first.items()), n, device, dtype)
    if key not in cache:
        cache.clear()
        cache[key] = {p: torch.empty((n, *t.shape), dtype=dtype, device=device) for p, t in first.items()}
    return cache[key]


def _sample(X: torch.Tensor, g: Optional[torch.Tensor], k: int, rng: random.Random):
    """A bounded uniform sample of routed tokens (reservoir of at most k rows)."""
    if len(X) <= k:
        return X, g
    keep = sorted(rng.sample(range(len(X)), k))
    return X[keep], (None if g is None else g[keep])


def _calibration_text(path: str) -> str:
    from ..files import read_text_bounded

    return read_text_bounded(path, "calibration text")
