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


@dataclass
class LayerTrace:
    """One MoE layer: `experts[t]` / `weights[t]` are token t's chosen experts (best first) and
    their final gate weights. `layer` is the decoder layer index in the checkpoint's names."""

    layer: int
    experts: list[list[int]]
    weights: list[list[float]]


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
    logits: Any = field(default=None, repr=False)  # torch.Tensor [T, V] float32, not serialised
    router_logits: Any = field(default=None, repr=False)  # {layer: tensor [T, E]}
    selection_scores: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION, "command": "trace", "model": self.model, "model_type": self.model_type,
            "num_experts": self.num_experts, "top_k": self.top_k, "dtype": self.dtype,
            "tokens": [vars(t) for t in self.tokens],
            "layers": [{"layer": l.layer, "experts": l.experts, "weights": l.weights} for l in self.layers],
        }

    def rows(self, prompt_index: int = 0):
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
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions for bad files
        raise MoetoolError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0][:120]})") from None


def trace(prompt: Optional[str] = None, *, model: str | Checkpoint, tokens: Optional[list[int]] = None,
          revision: Optional[str] = None, dtype: str = "float32", router_dtype: str = "float32",
          device: str = "auto", progress: Optional[Callable[[int, int], None]] = None) -> TraceReport:
    """Trace `prompt` (or explicit token ids) through `model`; returns a TraceReport."""
    from .forward import pick_device, run_forward

    ckpt = model if isinstance(model, Checkpoint) else _resolve_for_forward(model, revision)
    spec = spec_from_config(ckpt.config, ckpt.config_path)
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
    out = run_forward(ckpt, ids, dtype=dtype, device=dev, router_dtype=router_dtype, progress=progress)
    texts = [tok.decode([i], skip_special_tokens=False) if tok else str(i) for i in ids]
    layers = [LayerTrace(r.layer, r.experts.tolist(), [[float(w) for w in row] for row in r.weights.tolist()])
              for r in out.routes]
    return TraceReport(
        model=ckpt.source, model_type=spec.model_type, num_experts=spec.moe.num_experts, top_k=spec.moe.top_k,
        tokens=[Token(i, t, s) for i, (t, s) in enumerate(zip(ids, texts))], layers=layers, dtype=dtype, device=dev,
        logits=out.logits, router_logits={r.layer: r.logits for r in out.routes},
        selection_scores={r.layer: r.scores for r in out.routes},
    )


def _resolve_for_forward(model: str, revision: Optional[str]) -> Checkpoint:
    """Local forms as for `count`; a hub id is downloaded (weights included) into the hub cache."""
    if not os.path.exists(os.path.expanduser(model)):
        from .source import _REPO_ID, sample_config_path

        if sample_config_path(model) is not None:
            raise MoetoolError(f"{model} is a sample config without weights; trace needs a checkpoint with safetensors")
        if _REPO_ID.match(model):
            from .hub import download_checkpoint

            return resolve(download_checkpoint(model, revision))
    return resolve(model)


def save_logits(report: TraceReport, path: str) -> None:
    """Write the final float32 logits [tokens, vocab] as .npy, atomically."""
    import numpy as np

    from .render import atomic_write_bytes

    import io

    buf = io.BytesIO()
    np.save(buf, report.logits.float().cpu().numpy().astype(np.float32))
    atomic_write_bytes(path, buf.getvalue())
