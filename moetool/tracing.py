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

    def to_dict(self, header: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "command": "trace"} if header else {}
        d.update({
            "model": self.model, "model_type": self.model_type, "num_experts": self.num_experts, "top_k": self.top_k,
            "dtype": self.dtype, "capacity_factor": self.capacity_factor,
            "tokens": [vars(t) for t in self.tokens],
            "layers": [self._layer_dict(l) for l in self.layers],
            "summary": self.summary,
        })
        return d

    def _layer_dict(self, l: "LayerTrace") -> dict[str, Any]:
        d = {"layer": l.layer, "experts": l.experts, "weights": l.weights, "metrics": l.metrics}
        if self.include_router_logits:
            from .metrics import token_margins

            sel = self.selection_scores[l.layer].numpy()
            d["router_logits"] = self.router_logits[l.layer].tolist()
            d["selection_scores"] = [[None if v != v else v for v in row] for row in sel.tolist()]
            if sel.shape[1] > self.top_k:
                d["margin"] = [None if m == float("inf") else float(m) for m in token_margins(sel, self.top_k)]
        return d

    def rows(self, prompt_index: int = 0):
        """The long table: one row per (prompt, layer, token, slot)."""
        for l in self.layers:
            for t, (es, ws) in enumerate(zip(l.experts, l.weights)):
                for slot, (e, w) in enumerate(zip(es, ws)):
                    yield {"prompt_index": prompt_index, "layer": l.layer, "token_index": t,
                           "token": self.tokens[t].text, "slot": slot, "expert": e, "weight": w}

    def to_dataframe(self):
        """The long table: one row per (prompt, layer, token, slot)."""
        import pandas as pd

        return pd.DataFrame(list(self.rows()), columns=["prompt_index", "layer", "token_index", "token", "slot",
                                                        "expert", "weight"])


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


def trace(prompt: Optional[str] = None, *, model: Optional[str | Checkpoint] = None, tokens: Optional[list[int]] = None,
          revision: Optional[str] = None, dtype: str = "float32", router_dtype: str = "float32",
          device: str = "auto", progress: Optional[Callable[[int, int], None]] = None, generate: int = 0,
          capacity_factor: Optional[float] = None, layers: Optional[set[int]] = None,
          router_logits: bool = False) -> TraceReport:
    """Trace `prompt` (or explicit token ids) through `model`; returns a TraceReport with router
    decisions and the routing metrics of every MoE layer. `generate` greedy tokens are appended
    first (and marked `generated`); `layers` narrows the report to those decoder layers."""
    from .forward import pick_device, run_forward

    ckpt = model if isinstance(model, Checkpoint) else _resolve_for_forward(model, revision)
    spec = spec_from_config(ckpt.config, ckpt.config_path)
    if capacity_factor is not None and not (capacity_factor > 0 and capacity_factor < float("inf")):
        raise MoetoolError(f"--capacity-factor must be a positive finite number, got {capacity_factor}")
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
    dev = pick_device(device)
    n_prompt = len(ids)
    for _ in range(max(0, generate)):  # greedy continuation: one full forward per new token
        step = run_forward(ckpt, ids, dtype=dtype, device=dev, router_dtype=router_dtype, record=False)
        ids.append(int(step.logits[-1].argmax()))
    out = run_forward(ckpt, ids, dtype=dtype, device=dev, router_dtype=router_dtype, progress=progress)
    texts = [tok.decode([i], skip_special_tokens=False) if tok else str(i) for i in ids]
    routes = [r for r in out.routes if layers is None or r.layer in layers]
    if layers is not None and not routes:
        raise MoetoolError(f"--layers selects no MoE layer; MoE layers: {', '.join(str(r.layer) for r in out.routes)}")
    traced = [LayerTrace(r.layer, r.experts.tolist(), [[float(w) for w in row] for row in r.weights.tolist()])
              for r in routes]
    report = TraceReport(
        model=ckpt.source, model_type=spec.model_type, num_experts=spec.moe.num_experts, top_k=spec.moe.top_k,
        tokens=[Token(i, t, s, i >= n_prompt) for i, (t, s) in enumerate(zip(ids, texts))], layers=traced,
        dtype=dtype, device=dev, text=prompt, capacity_factor=capacity_factor, logits=out.logits,
        router_logits={r.layer: r.logits for r in routes}, selection_scores={r.layer: r.scores for r in routes},
        include_router_logits=router_logits,
    )
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
    return torch.softmax(logits.double(), dim=-1).numpy()


def compute_metrics(report: TraceReport, spec) -> None:
    from .metrics import layer_metrics, summarise

    prev = None
    for l in report.layers:
        import numpy as np

        experts = np.array(l.experts, dtype=np.int64)
        l.metrics = layer_metrics(experts, report.num_experts, router_distribution(report.router_logits[l.layer], spec),
                                  report.selection_scores[l.layer].numpy(), prev, report.capacity_factor)
        prev = experts[:, 0]
    report.summary = summarise([(l.layer, l.metrics) for l in report.layers])


@dataclass
class CorpusReport:
    """Many prompts: each traced on its own, plus corpus-level metrics (all tokens pooled) and
    sequence-level metrics (each prompt's metric, averaged)."""

    prompts: list[TraceReport]
    layers: list[dict]
    summary: dict
    sequence_level: dict

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

        return pd.DataFrame(list(self.rows()), columns=["prompt_index", "layer", "token_index", "token", "slot",
                                                        "expert", "weight"])


def trace_many(prompts: list[str], *, model: Optional[str | Checkpoint] = None, revision: Optional[str] = None,
               progress: Optional[Callable[[int, int], None]] = None, **kwargs) -> CorpusReport:
    """Trace each prompt; aggregate over all of them."""
    import numpy as np

    from .metrics import layer_metrics, summarise

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
    pooled, prev = [], None
    for j, l in enumerate(reports[0].layers):
        experts = np.concatenate([np.array(r.layers[j].experts, dtype=np.int64) for r in reports])
        probs = np.concatenate([router_distribution(r.router_logits[l.layer], spec) for r in reports])
        sel = np.concatenate([r.selection_scores[l.layer].numpy() for r in reports])
        m = layer_metrics(experts, spec.moe.num_experts, probs, sel, prev, cf)
        # consecutive-token reuse never crosses a prompt boundary: pool it pair-weighted
        for key in ("reuse_first_choice", "reuse_any_overlap"):
            pairs = [(len(r.tokens) - 1, r.layers[j].metrics[key]) for r in reports if r.layers[j].metrics[key] is not None]
            n = sum(c for c, _ in pairs)
            m[key] = sum(c * v for c, v in pairs) / n if n else None
        pooled.append({"layer": l.layer, "metrics": m})
        prev = experts[:, 0]
    summary = summarise([(p["layer"], p["metrics"]) for p in pooled])
    seq = {name: (float(np.mean(vals)) if vals else None)
           for name in summary
           for vals in [[r.summary[name]["mean"] for r in reports if r.summary[name]["mean"] is not None]]}
    return CorpusReport(reports, pooled, summary, seq)


def read_prompts(path: str) -> list[str]:
    """One prompt per line (.txt), or JSON lines with a "text" field (.jsonl)."""
    import json

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MoetoolError(f"{path}: cannot read prompts ({e.__class__.__name__})") from None
    if path.endswith(".jsonl"):
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise MoetoolError(f"{path}:{n}: not valid JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise MoetoolError(f'{path}:{n}: expected an object with a "text" string')
            prompts.append(obj["text"])
    else:
        prompts = [l for l in lines if l.strip()]
    if not prompts:
        raise MoetoolError(f"{path}: no prompts")
    return prompts


def parse_layers(spec: Optional[str]) -> Optional[set[int]]:
    """'0,3,5-7' -> {0, 3, 5, 6, 7}."""
    if spec is None:
        return None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise MoetoolError(f"--layers must look like 0,3,5-7, got {spec!r}") from None
    if not out:
        raise MoetoolError("--layers is empty")
    return out


EXAMPLE_PROMPT = ("def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
                  "The for statement is used to iterate over the elements of a sequence.")


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
