"""`moetool.trace`: run the reference forward on a prompt and record every router decision.

Example:
    >>> import moetool
    >>> t = moetool.trace("def add(a, b): return a + b", model="path/to/checkpoint")   # doctest: +SKIP
    >>> t.layers[0].experts[0]        # token 0's experts in layer 0, best first           # doctest: +SKIP
    [3, 7]
    >>> t.to_dataframe().head()       # one row per (prompt, layer, token, slot)           # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .arch import spec_from_config
from .errors import MoetoolError
from .source import Checkpoint, resolve

SCHEMA_VERSION = 1
# the long table (jsonl / csv / parquet / to_dataframe): one row per (prompt, layer, token, slot)
ROW_COLUMNS = ["prompt_index", "layer", "token_index", "token_id", "token", "generated", "slot", "expert", "weight"]


@dataclass
class Token:
    index: int
    id: int
    text: str
    generated: bool = False


@dataclass
class LayerTrace:
    """One MoE layer: `experts[t]` / `weights[t]` are token t's chosen experts (best first) and
    their final gate weights. `layer` is the decoder layer index in the checkpoint's names."""

    layer: int
    experts: list[list[int]]
    weights: list[list[float]]
    metrics: dict = field(default_factory=dict)
    stack: Optional[str] = None  # encoder-decoder models: "encoder" (over `tokens`) or "decoder" (`decoder_tokens`)
    dropped: Optional[list] = None  # encoder-decoder models: [token, slot] pairs over capacity (gate 0, not run)
    kind: str = "ffn"  # "attention": JetMoE's mixture-of-attention router of that layer
    stack_layer: Optional[int] = None  # encoder-decoder models: the layer's index within its stack

    @property
    def key(self):
        """The layer's key in `router_logits` / `selection_scores`: the layer number for an FFN
        router, ("attention", layer) for JetMoE's attention router."""
        return self.layer if self.kind == "ffn" else (self.kind, self.layer)

    def __repr__(self) -> str:
        from .render import short_repr

        return short_repr("LayerTrace", [("layer", self.layer), ("tokens", len(self.experts)),
                                         ("top_k", len(self.experts[0]) if self.experts else 0)])


@dataclass
class TraceReport:
    model: str
    model_type: str
    num_experts: int
    top_k: int
    tokens: list[Token]
    layers: list[LayerTrace]
    dtype: str = "float32"
    device: str = "cpu"
    text: Optional[str] = None
    summary: dict = field(default_factory=dict)
    capacity_factor: Optional[float] = None
    logits: Any = field(default=None, repr=False)  # torch.Tensor [T, V] float32, not serialised
    router_logits: Any = field(default=None, repr=False)  # {layer: tensor [T, E]}
    selection_scores: Any = field(default=None, repr=False)
    include_router_logits: bool = False
    decoder_tokens: Optional[list[Token]] = None  # encoder-decoder models: the decoder's input (start token first)
    notes: list = field(default_factory=list)  # how the report was made (a KV cache or not) and what it did not run (towers)

    def tokens_for(self, l: "LayerTrace") -> list[Token]:
        """The tokens a layer routed: the decoder's for a decoder layer, else the prompt's."""
        return self.decoder_tokens if l.stack == "decoder" else self.tokens

    def _summary(self) -> list[tuple[str, Any]]:
        s = self.summary.get("max_mean_ratio", {})
        return [("model", self.model), ("model_type", self.model_type), ("tokens", len(self.tokens)),
                ("moe_layers", len(self.layers)), ("num_experts", self.num_experts), ("top_k", self.top_k),
                ("max_mean_ratio", round(s["mean"], 3) if s.get("mean") is not None else None)]

    def __repr__(self) -> str:
        from .render import short_repr

        return short_repr("TraceReport", self._summary())

    def _repr_html_(self) -> str:
        from .render import short_html

        return short_html("TraceReport", self._summary())

    def to_dict(self, header: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "command": "trace"} if header else {}
        d.update({
            "model": self.model, "model_type": self.model_type, "num_experts": self.num_experts, "top_k": self.top_k,
            "dtype": self.dtype, "capacity_factor": self.capacity_factor,
            "tokens": [vars(t) for t in self.tokens],
            "layers": [self._layer_dict(l) for l in self.layers],
            "summary": self.summary,
        })
        if self.decoder_tokens is not None:
            d["decoder_tokens"] = [vars(t) for t in self.decoder_tokens]
        if self.notes:
            d["notes"] = self.notes
        return d

    def _layer_dict(self, l: "LayerTrace") -> dict[str, Any]:
        d = {"layer": l.layer, "experts": l.experts, "weights": l.weights, "metrics": l.metrics}
        if l.stack is not None:
            d.update(stack=l.stack, stack_layer=l.stack_layer, dropped=l.dropped or [])
        if l.kind != "ffn":
            d["kind"] = l.kind
        if self.include_router_logits:
            from .metrics import token_margins

            sel = self.selection_scores[l.key].numpy()
            d["router_logits"] = self.router_logits[l.key].tolist()
            d["selection_scores"] = [[None if v != v else v for v in row] for row in sel.tolist()]
            if sel.shape[1] > self.top_k:
                d["margin"] = [None if m == float("inf") else float(m) for m in token_margins(sel, self.top_k)]
        return d

    def rows(self, prompt_index: int = 0):
        """The long table: one row per (prompt, layer, token, slot)."""
        for l in self.layers:
            if l.kind != "ffn":  # the long table is the FFN routing; JetMoE's attention router is in the JSON
                continue
            tokens = self.tokens_for(l)
            for t, (es, ws) in enumerate(zip(l.experts, l.weights)):
                for slot, (e, w) in enumerate(zip(es, ws)):
                    tok = tokens[t]
                    yield {"prompt_index": prompt_index, "layer": l.layer, "token_index": t, "token_id": tok.id,
                           "token": tok.text, "generated": tok.generated, "slot": slot, "expert": e, "weight": w}

    def to_dataframe(self):
        """The long table: one row per (prompt, layer, token, slot)."""
        import pandas as pd

        return pd.DataFrame(list(self.rows()), columns=ROW_COLUMNS)


def load_tokenizer(ckpt: Checkpoint):
    """The checkpoint's tokenizer.json through the `tokenizers` library (never remote code)."""
    root = Path(ckpt.root or Path(ckpt.config_path).parent)
    path = root / "tokenizer.json"
    if not path.is_file():
        if ckpt.gguf is not None:  # the GGUF's own tokenizer.ggml.* arrays
            from .gguf.tokenizer import gguf_tokenizer

            return gguf_tokenizer(ckpt.gguf.metadata, ckpt.source)
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions for bad files
        raise MoetoolError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0][:120]})") from None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (the printable stand-in of each byte), inverted: char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_text(tok, token_id: int) -> str:
    """The token's text; a token that is only part of a UTF-8 character (byte-level BPE pieces,
    SentencePiece byte fallback) shows its bytes as `<0xC3>` instead of U+FFFD."""
    text = tok.decode([token_id], skip_special_tokens=False)
    if "\ufffd" not in text:
        return text
    piece = tok.id_to_token(token_id) or ""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return piece
    inv = _byte_decoder()
    if not piece or not all(c in inv for c in piece):
        return text
    raw = bytes(inv[c] for c in piece)
    out, i = [], 0
    while i < len(raw):  # decode the valid runs; show each stray byte as <0xNN>
        for j in range(min(len(raw), i + 4), i, -1):
            try:
                out.append(raw[i:j].decode("utf-8"))
                i = j
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append(f"<0x{raw[i]:02X}>")
            i += 1
    return "".join(out)


def trace(prompt: Optional[str] = None, *, model: Optional[str | Checkpoint] = None, tokens: Optional[list[int]] = None,
          revision: Optional[str] = None, dtype: str = "float32", router_dtype: str = "float32",
          device: str = "auto", progress: Optional[Callable[[int, int], None]] = None, generate: int = 0,
          capacity_factor: Optional[float] = None, layers: Optional[set[int]] = None,
          router_logits: bool = False, decoder_tokens: Optional[list[int]] = None,
          decoder_text: Optional[str] = None, kv_cache: bool = True) -> TraceReport:
    """Trace `prompt` (or explicit token ids) through `model`; returns a TraceReport with router
    decisions and the routing metrics of every MoE layer. `generate` greedy tokens are appended
    first (and marked `generated`), with a KV cache unless `kv_cache` is False (forward/cache.py:
    then the whole sequence runs again for each new token; same tokens and routing); `layers`
    narrows the report to those decoder layers.
    Encoder-decoder models (Switch, NLLB-MoE): the prompt is the encoder's input; the decoder reads
    its start token, then `decoder_tokens` (ids) or `decoder_text` (tokenised without special
    tokens), then `generate` greedy tokens; layers of both stacks are reported."""
    from .forward import pick_device, run_forward
    from .forward.encdec import ENCDEC_FAMILIES

    ckpt = model if isinstance(model, Checkpoint) else _resolve_for_forward(model, revision)
    spec = spec_from_config(ckpt.config, ckpt.config_path)
    if (decoder_tokens is not None or decoder_text is not None) and spec.family not in ENCDEC_FAMILIES + ("diffusion_gemma",):
        raise MoetoolError(f"--decoder-tokens / --decoder-text: model_type {spec.model_type!r} has no encoder "
                           "and decoder (they are for Switch Transformers, NLLB-MoE and DiffusionGemma's canvas)")
    if capacity_factor is not None and not (capacity_factor > 0 and capacity_factor < float("inf")):
        raise MoetoolError(f"--capacity-factor must be a positive finite number, got {capacity_factor}")
    if layers is not None and max(layers) >= spec.num_layers and spec.family != "diffusion_gemma":  # 2L layers there
        raise MoetoolError(f"--layers {max(layers)}: the model has {spec.num_layers} layers (0..{spec.num_layers - 1})")
    tok = load_tokenizer(ckpt)
    if tokens is None:
        if prompt is None:
            raise MoetoolError("nothing to trace: give a prompt or --tokens")
        if tok is None:
            raise MoetoolError(f"{ckpt.source}: no tokenizer.json; pass token ids with --tokens 1,2,3")
        ids = tok.encode(prompt).ids
    else:
        ids = list(tokens)
        vocab = spec.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise MoetoolError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    if not ids:
        raise MoetoolError("the prompt encodes to no tokens")
    if spec.family in ENCDEC_FAMILIES:
        return _trace_encdec(ckpt, spec, tok, prompt, ids, decoder_tokens, decoder_text, dtype=dtype,
                             device=pick_device(device), progress=progress, generate=generate,
                             capacity_factor=capacity_factor, layers=layers, router_logits=router_logits)
    if spec.family == "diffusion_gemma":  # the encoder, then one denoising step over a canvas
        return _trace_diffusion(ckpt, spec, tok, prompt, ids, decoder_tokens, decoder_text, dtype=dtype,
                                router_dtype=router_dtype, device=pick_device(device), progress=progress,
                                generate=generate, layers=layers, router_logits=router_logits,
                                capacity_factor=capacity_factor)
    from .forward.config import forward_config

    context = forward_config(spec, ckpt.config).max_positions
    if context and len(ids) + max(0, generate) > context:  # checked before the first forward
        grow = f" and --generate {generate} makes {len(ids) + generate}" if generate else ""
        raise MoetoolError(f"the prompt has {len(ids)} tokens{grow}, more than the model's context "
                           f"({context} tokens, max_position_embeddings)")
    if generate and any(p.name == "score.weight" for p in spec.params):  # a token classifier has no next token
        raise MoetoolError(f"model_type {spec.model_type!r} is a token classifier (its head scores labels, not "
                           "tokens): --generate does not apply")
    dev = pick_device(device)
    n_prompt = len(ids)
    last_layer = max(layers) if layers else None
    notes = []
    if generate > 0:  # greedy continuation (forward/cache.py), then the whole sequence's routing
        from .forward.cache import generate as greedy

        gen = greedy(ckpt, ids, generate, dtype=dtype, device=dev, router_dtype=router_dtype, progress=progress,
                     last_layer=last_layer, use_cache=kv_cache)
        ids, out = gen.ids, gen.result
        notes.append(gen.note)
    else:
        out = run_forward(ckpt, ids, dtype=dtype, device=dev, router_dtype=router_dtype, progress=progress,
                          last_layer=last_layer)
    texts = [token_text(tok, i) if tok else str(i) for i in ids]
    routes = [r for r in out.routes if layers is None or r.layer in layers]
    if layers is not None and not routes:
        raise MoetoolError(f"--layers selects no MoE layer; MoE layers: {', '.join(str(r.layer) for r in out.routes)}")
    # JetMoE: the attention experts' router of each layer, as its own entry (kind "attention")
    routes += [r for r in out.attention_routes if layers is None or r.layer in layers]
    traced = [_layer_trace(r) for r in routes]
    report = TraceReport(
        model=ckpt.source, model_type=spec.model_type, top_k=spec.moe.top_k,
        num_experts=spec.moe.num_experts + spec.moe.zero_experts,  # LongCat-Flash: zero experts are ids E..E+Z-1
        tokens=[Token(i, t, s, i >= n_prompt) for i, (t, s) in enumerate(zip(ids, texts))], layers=traced,
        dtype=dtype, device=dev, text=prompt, capacity_factor=capacity_factor, logits=out.logits,
        router_logits={l.key: r.logits for l, r in zip(traced, routes)},
        selection_scores={l.key: r.scores for l, r in zip(traced, routes)},
        include_router_logits=router_logits, notes=notes,
    )
    towers = sorted({p.group for p in spec.params} & {"vision", "audio"})
    if towers:  # an image-text (or audio) model traced on text: its language model only
        report.notes.append(f"text-only input: the {' and '.join(towers)} tower{'s are' if len(towers) > 1 else ' is'} "
                            "not run; the trace is of the language model")
    compute_metrics(report, spec)
    return report


def _layer_trace(r) -> LayerTrace:
    """A LayerTrace from the forward's LayerRoute."""
    return LayerTrace(r.layer, r.experts.tolist(), [[float(w) for w in row] for row in r.weights.tolist()],
                      stack=r.stack, dropped=list(r.dropped) if r.stack is not None else None, kind=r.kind)


def _decoder_ids(ckpt: Checkpoint, tok, decoder_tokens, decoder_text, what: str) -> Optional[list[int]]:
    """The decoder's input from --decoder-tokens or --decoder-text (tokenised without special tokens); None
    when neither is given."""
    if decoder_tokens is not None and decoder_text is not None:
        raise MoetoolError("give --decoder-tokens or --decoder-text, not both")
    if decoder_text is not None:
        if tok is None:
            raise MoetoolError(f"{ckpt.source}: no tokenizer.json; pass {what} with --decoder-tokens 1,2,3")
        return tok.encode(decoder_text, add_special_tokens=False).ids
    return None if decoder_tokens is None else list(decoder_tokens)


def _trace_encdec(ckpt: Checkpoint, spec, tok, prompt, ids: list[int], decoder_tokens, decoder_text, *, dtype, device,
                  progress, generate: int, capacity_factor, layers, router_logits) -> TraceReport:
    """`trace` of an encoder-decoder model (moetool/forward/encdec.py): the encoder reads the
    prompt, the decoder its start token + the given tokens + `generate` greedy ones."""
    from .forward.encdec import encdec_config, run_encdec

    start = encdec_config(spec, ckpt.config).decoder_start
    given = _decoder_ids(ckpt, tok, decoder_tokens, decoder_text, "decoder token ids") or []
    bad = [i for i in given if not 0 <= i < spec.vocab_size]
    if bad:
        raise MoetoolError(f"decoder token id {bad[0]} is outside the vocabulary (0..{spec.vocab_size - 1})")
    dec = [start] + given
    n_given = len(dec)
    for n in range(max(0, generate)):  # greedy decoding: one full forward per new decoder token
        step = run_encdec(ckpt, ids, dec, dtype=dtype, device=device, record=False)
        dec.append(int(step.logits[-1].argmax()))
        if progress:
            progress(n + 1, generate)
    out = run_encdec(ckpt, ids, dec, dtype=dtype, device=device, progress=progress)
    routes = [r for r in out.routes if layers is None or r.layer in layers]
    if layers is not None and not routes:
        raise MoetoolError(f"--layers selects no MoE layer; MoE layers: {', '.join(str(r.layer) for r in out.routes)}")
    text = lambda i: token_text(tok, i) if tok else str(i)
    traced = [_layer_trace(r) for r in routes]
    for l in traced:
        l.stack_layer = l.layer - (spec.encoder_layers if l.stack == "decoder" else 0)
    report = TraceReport(
        model=ckpt.source, model_type=spec.model_type, num_experts=spec.moe.num_experts, top_k=spec.moe.top_k,
        tokens=[Token(i, t, text(t)) for i, t in enumerate(ids)], layers=traced, dtype=dtype, device=device,
        text=prompt, capacity_factor=capacity_factor, logits=out.logits,
        router_logits={r.layer: r.logits for r in routes}, selection_scores={r.layer: r.scores for r in routes},
        include_router_logits=router_logits,
        decoder_tokens=[Token(i, t, text(t), i >= n_given) for i, t in enumerate(dec)],
    )
    compute_metrics(report, spec)
    return report


def _trace_diffusion(ckpt: Checkpoint, spec, tok, prompt, ids: list[int], decoder_tokens, decoder_text, *, dtype,
                     router_dtype, device, progress, generate: int, layers, router_logits,
                     capacity_factor=None) -> TraceReport:
    """`trace` of DiffusionGemma (moetool/forward/diffusion_gemma.py): the encoder reads the prompt,
    then one denoising step of the decoder reads the canvas (the given tokens, else the seeded
    random canvas of `canvas_length` tokens); layers of both stacks are reported, logits are the canvas's."""
    from .forward import diffusion_gemma

    if generate:
        raise MoetoolError("--generate: DiffusionGemma generates by block diffusion (a sampler over denoising steps "
                           "and canvases), not token by token; trace runs the encoder and one denoising step")
    canvas = _decoder_ids(ckpt, tok, decoder_tokens, decoder_text, "the canvas's token ids")
    if canvas is None:
        canvas = diffusion_gemma.default_canvas(ckpt.config, spec.vocab_size)
    elif not canvas:
        raise MoetoolError("--decoder-text encodes to no tokens" if decoder_text is not None
                           else "--decoder-tokens: the canvas has no tokens")
    n = spec.num_layers
    if layers is not None and max(layers) >= 2 * n:
        raise MoetoolError(f"--layers {max(layers)}: the model has {n} encoder layers (0..{n - 1}) and {n} decoder "
                           f"layers ({n}..{2 * n - 1})")
    out = diffusion_gemma.run(ckpt, ids, canvas, dtype=dtype, device=device, router_dtype=router_dtype,
                              progress=progress)
    routes = [r for r in out.routes if layers is None or r.layer in layers]
    text = lambda i: token_text(tok, i) if tok else str(i)
    traced = [_layer_trace(r) for r in routes]
    for l in traced:
        l.stack_layer = l.layer - (n if l.stack == "decoder" else 0)
    given = "given" if decoder_tokens is not None or decoder_text is not None else \
        f"{len(canvas)} tokens drawn uniformly from the vocabulary (seed {diffusion_gemma.CANVAS_SEED}), as generate's first canvas"
    report = TraceReport(
        model=ckpt.source, model_type=spec.model_type, num_experts=spec.moe.num_experts, top_k=spec.moe.top_k,
        tokens=[Token(i, t, text(t)) for i, t in enumerate(ids)], layers=traced, dtype=dtype, device=device,
        text=prompt, logits=out.logits, capacity_factor=capacity_factor,
        router_logits={r.layer: r.logits for r in routes}, selection_scores={r.layer: r.scores for r in routes},
        include_router_logits=router_logits,
        decoder_tokens=[Token(i, t, text(t)) for i, t in enumerate(canvas)],
        notes=[f"DiffusionGemma: the encoder over the prompt (layers 0..{n - 1}), then the first denoising step of the "
               f"decoder (layers {n}..{2 * n - 1}, the encoder's weights) over the canvas ({given}), with no "
               "self-conditioning signal; logits are the canvas's"],
    )
    if spec.params and any(p.group == "vision" for p in spec.params):
        report.notes.append("text-only input: the vision tower is not run")
    compute_metrics(report, spec)
    return report


def router_distribution(logits, spec) -> Any:
    """The router's probability distribution over experts [T, E], for the balance-loss and
    entropy metrics: softmax of the logits, or for sigmoid-scored routers (DeepSeek-V3, GLM-4.5)
    the sigmoid scores normalised to sum to 1 (DeepSeek-V3's sequence-wise balance loss)."""
    import torch

    r = spec.moe.router
    if r.scoring == "sigmoid" and r.order == "score_then_topk":
        s = torch.sigmoid(logits.double())
        return (s / s.sum(dim=-1, keepdim=True)).numpy()
    if r.scoring == "sqrtsoftplus":  # DeepSeek-V4: its scores, normalised likewise
        s = torch.nn.functional.softplus(logits.double()).sqrt()
        return (s / s.sum(dim=-1, keepdim=True)).numpy()
    return torch.softmax(logits.double(), dim=-1).numpy()


def compute_metrics(report: TraceReport, spec) -> None:
    import numpy as np

    from .metrics import metrics_from_sums, summarise, with_capacity

    for kind in dict.fromkeys(l.kind for l in report.layers):  # FFN routers; JetMoE's attention router apart
        stats = corpus_stats([report], spec, kind=kind)
        for l in report.layers:
            if l.kind == kind:
                l.metrics = metrics_from_sums(stats.layers[l.layer])
                with_capacity(l.metrics, np.array(l.experts, dtype=np.int64), report.num_experts,
                              report.capacity_factor)
    report.summary = summarise([(l.layer, l.metrics) for l in report.layers if l.kind == "ffn"])


@dataclass
class CorpusReport:
    """Many prompts: each traced on its own, plus corpus-level metrics (all tokens pooled) and
    sequence-level metrics (each prompt's metric, averaged)."""

    prompts: list[TraceReport]
    layers: list[dict]
    summary: dict
    sequence_level: dict

    def _summary(self) -> list[tuple[str, Any]]:
        first, s = self.prompts[0], self.summary.get("max_mean_ratio", {})
        return [("model", first.model), ("prompts", len(self.prompts)),
                ("tokens", sum(len(p.tokens) for p in self.prompts)), ("moe_layers", len(self.layers)),
                ("num_experts", first.num_experts), ("top_k", first.top_k),
                ("max_mean_ratio", round(s["mean"], 3) if s.get("mean") is not None else None)]

    def __repr__(self) -> str:
        from .render import short_repr

        return short_repr("CorpusReport", self._summary())

    def _repr_html_(self) -> str:
        from .render import short_html

        return short_html("CorpusReport", self._summary())

    def to_dict(self) -> dict[str, Any]:
        first = self.prompts[0]
        return {
            "schema_version": SCHEMA_VERSION, "command": "trace", "model": first.model,
            "model_type": first.model_type, "num_experts": first.num_experts, "top_k": first.top_k,
            "capacity_factor": first.capacity_factor,
            "prompts": [dict(index=i, text=p.text, **p.to_dict(header=False)) for i, p in enumerate(self.prompts)],
            "aggregate": {"layers": self.layers, "summary": self.summary, "sequence_level": self.sequence_level},
        }

    def rows(self):
        for i, p in enumerate(self.prompts):
            yield from p.rows(i)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(list(self.rows()), columns=ROW_COLUMNS)


def trace_many(prompts: list[str], *, model: Optional[str | Checkpoint] = None, revision: Optional[str] = None,
               progress: Optional[Callable[[int, int], None]] = None, dtype: str = "float32",
               router_dtype: str = "float32", device: str = "auto", generate: int = 0,
               capacity_factor: Optional[float] = None, layers: Optional[set[int]] = None,
               router_logits: bool = False, kv_cache: bool = True) -> CorpusReport:
    """Trace each prompt (options as for `trace`); aggregate over all of them: corpus-level
    metrics (all tokens pooled) and sequence-level ones (each prompt's, averaged).
    `progress(done, total)` is called after each prompt."""
    kwargs = dict(dtype=dtype, router_dtype=router_dtype, device=device, generate=generate,
                  capacity_factor=capacity_factor, layers=layers, router_logits=router_logits, kv_cache=kv_cache)
    import numpy as np

    from .metrics import metrics_from_sums, summarise, with_capacity

    if not prompts:
        raise MoetoolError("no prompts to trace")
    ckpt = model if isinstance(model, Checkpoint) else _resolve_for_forward(model, revision)
    spec = spec_from_config(ckpt.config, ckpt.config_path)
    reports = []
    for i, text in enumerate(prompts):
        reports.append(trace(text, model=ckpt, **kwargs))
        if progress:
            progress(i + 1, len(prompts))
    cf = reports[0].capacity_factor
    stats = corpus_stats(reports, spec)
    pooled = []
    for j, l in enumerate(reports[0].layers):
        if l.kind != "ffn":  # JetMoE's attention router: per prompt only
            continue
        m = metrics_from_sums(stats.layers[l.layer])
        if cf is not None:  # capacity is served in token order over the concatenated corpus
            experts = np.concatenate([np.array(r.layers[j].experts, dtype=np.int64) for r in reports])
            with_capacity(m, experts, spec.moe.num_experts + spec.moe.zero_experts, cf)
        pooled.append({"layer": l.layer, "metrics": m})
    summary = summarise([(p["layer"], p["metrics"]) for p in pooled])
    seq = {name: (float(np.mean(vals)) if vals else None)
           for name in summary
           for vals in [[r.summary[name]["mean"] for r in reports if r.summary[name]["mean"] is not None]]}
    return CorpusReport(reports, pooled, summary, seq)


def corpus_stats(reports: list[TraceReport], spec, stats=None, kind: str = "ffn"):
    """The routing sums (moetool.profile.stats.ProfileStats) of traced prompts: every metric of a
    trace comes from these sums. Transitions pair each reported MoE layer with the previous one of
    the same stack. `kind`: which routers ("ffn", or JetMoE's "attention")."""
    import numpy as np

    from .profile.stats import ProfileStats

    first = reports[0]
    if stats is None:
        stats = ProfileStats.empty(first.num_experts, first.top_k, [l.layer for l in first.layers if l.kind == kind],
                                   model=first.model, model_type=first.model_type, dtype=first.dtype,
                                   tie_keep=max(1, sum(len(r.tokens) for r in reports)))
    for r in reports:
        prev, stack = None, None
        for l in r.layers:
            if l.kind != kind:
                continue
            if l.stack != stack:  # the decoder's tokens are not the encoder's: no transitions across
                prev, stack = None, l.stack
            experts = np.array(l.experts, dtype=np.int64)
            stats.add(l.layer, experts, np.array(l.weights, dtype=np.float64), token_ids=[t.id for t in r.tokens_for(l)],
                      probs=router_distribution(r.router_logits[l.key], spec),
                      selection=r.selection_scores[l.key].numpy(), prev_experts=prev)
            prev = experts
    return stats


def read_prompts(path: str) -> list[str]:
    """One prompt per line (.txt), or JSON lines with a "text" field (.jsonl)."""
    import json

    if path == "-":
        import sys

        from .files import MAX_TEXT_BYTES as MAX_PROMPT_BYTES

        data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
        if len(data) > MAX_PROMPT_BYTES:
            raise MoetoolError(f"stdin: prompts are larger than {MAX_PROMPT_BYTES // (1024 * 1024)} MiB; refusing to read them")
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise MoetoolError("stdin: cannot read prompts (not UTF-8 text)") from None
    else:
        from .files import read_text_bounded

        lines = read_text_bounded(path, "prompts").splitlines()
    if path.endswith(".jsonl"):
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):  # also integers over 4300 digits, deep nesting
                raise MoetoolError(f"{path}:{n}: not valid JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise MoetoolError(f'{path}:{n}: expected an object with a "text" string')
            prompts.append(obj["text"])
    else:
        prompts = [l for l in lines if l.strip()]
    if not prompts:
        raise MoetoolError(f"{path}: no prompts")
    return prompts


MAX_INDEX = 1 << 16  # no model has this many layers or experts; bounds what a range can allocate


def parse_layers(spec: Optional[str], flag: str = "--layers") -> Optional[set[int]]:
    """'0,3,5-7' -> {0, 3, 5, 6, 7}. Indices of MAX_INDEX or more are refused before anything is
    allocated (`0-99999999999` would otherwise build a set of 10^11 integers)."""
    if spec is None:
        return None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if a > b:
                    raise MoetoolError(f"{flag}: range {part} is empty (start after end)")
            elif part:
                a = b = int(part)
            else:
                continue
            if a < 0 or b >= MAX_INDEX:
                raise MoetoolError(f"{flag}: {part} is outside 0..{MAX_INDEX - 1}")
            out.update(range(a, b + 1))
    except ValueError:
        raise MoetoolError(f"{flag} must look like 0,3,5-7, got {spec!r}") from None
    if not out:
        raise MoetoolError(f"{flag} is empty")
    return out


EXAMPLE_PROMPT = ("def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
                  "The for statement is used to iterate over the elements of a sequence.")


def open_checkpoint(model: Optional[str | Checkpoint], revision: Optional[str] = None) -> Checkpoint:
    """The checkpoint `trace` runs: a local path, a hub id (downloaded: weights included), or the
    bundled model for None. Open it once and pass it as `model=` to trace many times."""
    return model if isinstance(model, Checkpoint) else _resolve_for_forward(model, revision)


# Below this hidden size the matmuls are too small for threads to pay: torch's default (one per
# core) burns 2-7x the CPU time for no gain (docs/trace.md: measured on the bundled model).
SMALL_HIDDEN = 1024


def set_threads(threads: Optional[int], ckpt: Optional[Checkpoint] = None) -> int:
    """Set torch's intra-op threads: `threads` when given, else 1 for a model whose hidden size is
    under SMALL_HIDDEN, else torch's default. Returns the number in use."""
    import torch

    if threads is None and ckpt is not None:
        spec = spec_from_config(ckpt.config, ckpt.config_path)
        threads = 1 if spec.hidden_size < SMALL_HIDDEN else None
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _resolve_for_forward(model: Optional[str], revision: Optional[str]) -> Checkpoint:
    """Local forms as for `count`; a hub id is downloaded (weights included) into the hub cache;
    None is the bundled default model."""
    if model is None:
        return resolve(None)
    if not os.path.exists(os.path.expanduser(model)):
        from .source import _REPO_ID, sample_config_path

        if sample_config_path(model) is not None:
            raise MoetoolError(f"{model} is a sample config without weights; trace needs a checkpoint with safetensors")
        if _REPO_ID.match(model):
            from .hub import download_checkpoint

            ckpt = resolve(download_checkpoint(model, revision))
            ckpt.source, ckpt.kind = model, "hub"  # reports name the repo, not the cache path
            return ckpt
    return resolve(model)


def save_logits(report: TraceReport, path: str) -> None:
    """Write the final float32 logits [tokens, vocab] as .npy, atomically."""
    import numpy as np

    from .render import atomic_write_bytes

    import io

    buf = io.BytesIO()
    np.save(buf, report.logits.float().cpu().numpy().astype(np.float32))
    atomic_write_bytes(path, buf.getvalue())
