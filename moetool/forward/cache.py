"""Greedy generation for `trace --generate N`: incremental decoding with a KV cache, or the full
recompute it must equal.

With the cache, the prompt runs once through the decoder (the prefill) and every generated token
then runs alone through every layer, still streamed layer by layer from the WeightStore. Per layer
the cache keeps what the next token needs from the earlier ones:

- softmax attention: keys and values after RoPE and the QK norms ([S, Hkv, Dh]); sliding windows,
  chunked attention (Llama 4) and sinks (gpt-oss) stay masks over absolute positions, so every key
  is kept and the mask decides;
- MLA (DeepSeek-V2/V3, Kimi Linear ...): the decompressed per-head keys and values; DeepSeek-V3.2's
  indexer keys too (its top-k is chosen again over all cached keys for each new query);
- JetMoE's mixture of attention: the shared keys and values after RoPE;
- DeepSeek-V4 (forward/deepseek_v4.py): the shared key/value of every token, and its compressors' and
  indexer's projections of every token (each step compresses the closed windows again);
- the token mixers of forward/mixers/ (Mamba, Mamba-2, Gated DeltaNet, KDA, short convolution,
  lightning attention): their recurrent state (`state=` dict: convolution tail and SSM / linear
  attention state).

The recompute path runs the whole sequence again for every new token and traces the final
sequence once more; it is kept for the tests and for a model whose RoPE frequencies depend on the
sequence length across the generated span (LongRoPE past its original context switches factors,
which changes the keys of every earlier token, so no cache can hold them).

DeepSeek-V3.2's indexer scores often tie exactly (0 after its ReLU), and which tied keys torch.topk
keeps depends on the length of the row it ranks. In every forward of a generation, cached or not,
the rows are ranked at the length of the whole final sequence (`Decoder.index_width`), as in the
traced forward of that sequence: both paths then keep the same keys and the generated tokens are
the argmax of the reported logits. (transformers' cached `generate` ranks rows at the current
length and may keep other tied keys; DeepSeek-V4's indexer over its compressed entries likewise.)

Shapes: T new tokens, S cached + new tokens, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import MoetoolError
from ..source import Checkpoint
from .model import Decoder, ForwardResult, LayerRoute


class KVCache:
    """Per decoder layer, a dict of what the next token needs (see the module docstring);
    `past` tokens are in it."""

    def __init__(self) -> None:
        self.past = 0
        self.layers: dict[int, dict] = {}

    def layer(self, i: int) -> dict:
        return self.layers.setdefault(i, {})

    def extend(self, i: int, **new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append the new tokens' tensors (time first) to layer i's; return the whole sequence's."""
        state, out = self.layer(i), []
        for name, t in new.items():
            prev = state.get(name)
            state[name] = t if prev is None else torch.cat((prev, t), dim=0)
            out.append(state[name])
        return tuple(out)


@dataclass
class Generation:
    ids: list[int]  # the prompt, then the generated tokens
    result: ForwardResult  # logits [T, V] (None when `last_layer` stopped the recompute), routes of all T tokens
    cached: bool
    note: str  # which path ran, for the trace's notes


def no_cache_reason(fc, prompt: int, total: int) -> Optional[str]:
    """Why a KV cache cannot reproduce the recompute path for a sequence growing from `prompt` to
    `total` tokens, or None: RoPE whose frequencies change with the sequence length in between;
    attention this cache does not hold (a block-sparse key indexer, a bidirectional encoder)."""
    for what, why in (("block_sparse", "the block-sparse attention indexer is not cached"),
                      ("bidirectional", "an encoder attends both ways")):
        if getattr(fc, what, None):
            return why
    if getattr(fc, "qwen4_exp", None):  # forward/qwen4_exp.py (not fc.hyper: HY-V4, DeepSeek-V4, GLM-5.3 are cached)
        return "Qwen4-Exp's QSA indexer keys and n-gram context are not cached"
    if fc.family == "longcat_flash":  # forward/longcat.py: two MLA sublayers per layer, one cache slot each layer
        return "LongCat-Flash's two attention sublayers per layer are not cached"
    a, fa = fc.rope.inv_freq_and_factor(prompt)
    b, fb = fc.rope.inv_freq_and_factor(total)
    if fa != fb or not torch.equal(a, b):
        return (f"the {fc.rope.kind} RoPE frequencies change between {prompt} and {total} tokens, "
                "which changes every earlier token's keys")
    return None


def generate(ckpt: Checkpoint, ids: list[int], n: int, *, dtype: str = "float32", device: str = "cpu",
             router_dtype: str = "float32", progress: Optional[Callable[[int, int], None]] = None,
             last_layer: Optional[int] = None, use_cache: bool = True) -> Generation:
    """Greedy-generate `n` tokens after `ids` and trace the whole sequence: logits and router
    decisions of every token (prompt and generated). `progress(done, total)` is called after each
    generated token, then for the layers of the last forward."""
    from . import DTYPES, checked_config, run_forward, weight_store

    spec, fc = checked_config(ckpt, len(ids) + n, dtype, router_dtype)
    window = int(getattr(fc, "reference_window", 0) or 0)
    if window and n > window:  # Unlimited-OCR: every prompt token stays, generated ones slide (not modelled)
        raise MoetoolError(f"model_type {spec.model_type!r} evicts generated tokens past its reference sliding "
                           f"window ({window} tokens): --generate supports at most {window} new tokens")
    ids = list(ids)
    reason = None if use_cache else "asked for"
    if reason is None:
        reason = no_cache_reason(fc, len(ids), len(ids) + n)
    if reason is not None:  # one full forward per new token, then the traced forward
        for s in range(n):
            step = run_forward(ckpt, ids, dtype=dtype, device=device, router_dtype=router_dtype, record=False,
                               index_width=len(ids) + n - s)
            ids.append(int(step.logits[-1].argmax()))
            if progress:
                progress(s + 1, n)
        out = run_forward(ckpt, ids, dtype=dtype, device=device, router_dtype=router_dtype, progress=progress,
                          last_layer=last_layer)  # index_width: the sequence's own length
        return Generation(ids, out, False, f"generated {n} tokens by recomputing the whole sequence for each "
                                           f"(no KV cache: {reason})")
    store = weight_store(ckpt)
    cache = KVCache()
    with torch.inference_mode():
        dec = Decoder(spec, fc, store, dtype=DTYPES[dtype], device=device, router_dtype=DTYPES[router_dtype])
        dec.index_width = len(ids) + n
        parts = [dec.run(ids, True, None, cache)]  # the prefill
        for s in range(n):
            ids.append(int(parts[-1].logits[-1].argmax()))
            if progress:
                progress(s + 1, n)
            if s == n - 1:
                dec.progress = progress  # the last forward reports its layers, as the recompute's traced one
            parts.append(dec.run(ids[-1:], True, None, cache))
    store.release()
    routes = [LayerRoute(r.layer, *(torch.cat([getattr(p.routes[j], f) for p in parts])
                                    for f in ("experts", "weights", "logits", "scores")))
              for j, r in enumerate(parts[0].routes)]
    logits = torch.cat([p.logits for p in parts])
    result = ForwardResult(logits=logits, routes=routes, bytes_read=store.bytes_read)
    return Generation(ids, result, True, f"generated {n} tokens with a KV cache (the prompt once, then one token "
                                         "per step through every layer)")
