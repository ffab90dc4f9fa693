"""The layer-major profile engine: a block of many prompts goes through one decoder layer at a time.

Each block packs as many prompts as fit the token budget (from `--max-memory`); the block's tokens
are concatenated [T, D] and run through `Decoder.layer` (the reference decoder `trace` uses, same
router code): the layer's weights are read once per block, each routed expert runs once on all its
tokens of the block. Causality is exact per prompt: attention runs per prompt with its own causal
mask (`model.Segments`), RoPE tables are each prompt's own (positions 0..L-1). After each MoE layer
the router decisions go into `ProfileStats` and are dropped, so memory does not grow with the corpus.

Resumable: after each block the statistics so far and the number of prompts done are written
(atomically) to OUT/partial/ (stats.safetensors, then profile.json with the resume point); `resume=True` continues from there. The blocks are packed from the
corpus order alone, so a resumed run adds the same blocks in the same order as an uninterrupted one.

Example:
    >>> from moetool.profile.engine import profile                                 # doctest: +SKIP
    >>> stats = profile(["def f(x):", "The cat"], model="path/to/ckpt", out="prof")  # doctest: +SKIP
    >>> stats.layers[0].load                                                        # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import MoetoolError
from .corpus import Prompt
from .stats import ProfileStats, config_fingerprint

PARTIAL = "partial"
DEFAULT_MAX_MEMORY = 2 << 30


def block_tokens_for(spec, fc, max_memory: int, dtype_bytes: int = 4) -> int:
    """How many tokens one block may hold within `max_memory`: the activations per token of one
    layer (residual, norms, q/k/v/out, the K expert intermediates, router logits and the float64
    statistics inputs). At least 16 tokens."""
    D, E, K = spec.hidden_size, spec.moe.num_experts, spec.moe.top_k
    H, Hkv, Dh = fc.heads, fc.kv_heads, fc.head_dim
    F = spec.moe.expert_ffn or D
    per_token = dtype_bytes * (6 * D + 2 * H * Dh + 2 * Hkv * Dh + 3 * K * F) + 8 * 4 * E + 64
    return max(16, int(max_memory // per_token))


class Progress:
    """Progress on stderr: tokens, tokens/s, ETA (by prompts), the current layer of the block."""

    def __init__(self, total_prompts: int, layers: int, enabled: bool = True, stream=None):
        self.total, self.layers, self.enabled = total_prompts, layers, enabled
        self.stream = stream or sys.stderr
        self.tty = self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()
        self.tokens = self.prompts = self.start_prompts = 0
        self.last = 0.0

    def layer(self, block: int, i: int, block_tokens: int) -> None:
        if self.tty and time.monotonic() - self.last > 0.2:
            self._write(f"block {block}: layer {i + 1}/{self.layers} ({block_tokens} tokens)", end="\r")

    def block(self, block: int, prompts_done: int, tokens_done: int) -> None:
        self.prompts, self.tokens = prompts_done, tokens_done
        self._write(f"block {block} done", end="\r" if self.tty else "\n")

    def _write(self, what: str, end: str) -> None:
        if not self.enabled:
            return
        self.last = time.monotonic()
        dt = max(self.last - self.t0, 1e-9)
        rate = self.tokens / dt
        done = self.prompts - self.start_prompts
        eta = (self.total - self.prompts) * dt / done if done else float("nan")
        eta_s = "?" if not math.isfinite(eta) else f"{eta:.0f}s"
        self.stream.write(f"\x1b[2K{what}  {self.prompts}/{self.total} prompts, {self.tokens:,} tokens, "
                          f"{rate:,.0f} tokens/s, ETA {eta_s}{end}" if self.tty else
                          f"{what}  {self.prompts}/{self.total} prompts, {self.tokens:,} tokens, "
                          f"{rate:,.0f} tokens/s, ETA {eta_s}{end}")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def pack_blocks(lengths: Sequence[int], block_tokens: int, start: int = 0):
    """Greedy packing in corpus order: yields (first, end) prompt ranges of at most block_tokens
    tokens (a longer prompt gets a block of its own)."""
    i, n = start, len(lengths)
    while i < n:
        j, total = i, 0
        while j < n and (j == i or total + lengths[j] <= block_tokens):
            total += lengths[j]
            j += 1
        yield i, j
        i = j


class PerTokenWriter:
    """--per-token OUT.parquet: one row per (prompt, layer, token, slot), written as row groups."""

    SCHEMA = [("prompt_index", "int64"), ("layer", "int32"), ("token_index", "int32"), ("token_id", "int64"),
              ("slot", "int8"), ("expert", "int32"), ("weight", "float32")]

    def __init__(self, path: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.tmp = path, path + ".partial"
        self.pa = pa
        self.schema = pa.schema([(n, getattr(pa, t)()) for n, t in self.SCHEMA])
        self.writer = pq.ParquetWriter(self.tmp, self.schema)

    def write(self, layer: int, prompt_index: np.ndarray, token_index: np.ndarray, token_ids: np.ndarray,
              experts: np.ndarray, weights: np.ndarray) -> None:
        T, K = experts.shape
        rep = lambda a: np.repeat(a, K)
        cols = [rep(prompt_index), np.full(T * K, layer, dtype=np.int32), rep(token_index).astype(np.int32),
                rep(token_ids), np.tile(np.arange(K, dtype=np.int8), T), experts.reshape(-1).astype(np.int32),
                weights.reshape(-1).astype(np.float32)]
        self.writer.write_table(self.pa.Table.from_arrays(cols, schema=self.schema))

    def close(self, ok: bool) -> None:
        self.writer.close()
        if ok:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)


def profile(prompts: Sequence[Prompt | str], *, model=None, out: Optional[str] = None, revision: Optional[str] = None,
            max_memory: Optional[int] = None, block_tokens: Optional[int] = None, dtype: str = "float32",
            router_dtype: str = "float32", device: str = "cpu", resume: bool = False,
            per_token: Optional[str] = None, progress: bool | Progress = False,
            on_block: Optional[Callable[[int], None]] = None, ffn_hook: Optional[Callable] = None) -> ProfileStats:
    """Profile `prompts` on `model`; returns the statistics. With `out`, completed blocks are kept
    in OUT/partial/ (for `resume`) and the final profile is written to OUT (atomically).
    `ffn_hook(decoder, layer, h [T, D], routing)` sees every FFN input of every block (the
    Decoder's hook: quantize-report scores experts on their routed tokens of the same pass)."""
    import torch

    from ..arch import spec_from_config
    from ..forward import DTYPES, pick_device
    from ..forward.config import forward_config
    from ..forward.model import Decoder, Segments, attention_mask, rope_tables
    from ..forward import weight_store
    from ..tracing import _resolve_for_forward, load_tokenizer, router_distribution
    from ..source import Checkpoint

    prompts = [p if isinstance(p, Prompt) else Prompt(i, p) for i, p in enumerate(prompts)]
    if not prompts:
        raise MoetoolError("no prompts to profile")
    if dtype not in DTYPES or router_dtype not in DTYPES:
        raise MoetoolError(f"--dtype must be one of {', '.join(DTYPES)}")
    ckpt = model if isinstance(model, Checkpoint) else _resolve_for_forward(model, revision)
    if ckpt.tensors is None:
        raise MoetoolError(f"{ckpt.source}: no safetensors weights to run (moetool never loads pickle checkpoints)")
    spec = spec_from_config(ckpt.config, ckpt.config_path)
    fc = forward_config(spec, ckpt.config)
    tok = load_tokenizer(ckpt)
    if tok is None:
        raise MoetoolError(f"{ckpt.source}: no tokenizer.json; profile needs one to tokenise the corpus")
    moe_layers = [i for i, l in enumerate(spec.layers) if l.moe]
    if not moe_layers:
        raise MoetoolError(f"{ckpt.source}: the model has no MoE layer")
    dev = pick_device(device)
    if block_tokens is None:
        block_tokens = block_tokens_for(spec, fc, max_memory or DEFAULT_MAX_MEMORY, torch.finfo(DTYPES[dtype]).bits // 8)
    # token counts of every prompt first (bad prompts fail before any work); the ids themselves are
    # made again per block, so memory holds one block's ids, not the corpus'
    lengths = np.zeros(len(prompts), dtype=np.int64)
    for c in range(0, len(prompts), 4096):
        for j, enc in enumerate(tok.encode_batch([p.text for p in prompts[c:c + 4096]]), c):
            L = lengths[j] = len(enc.ids)
            if not L:
                raise MoetoolError(f"prompt {prompts[j].index} encodes to no tokens")
            if fc.max_positions and L > fc.max_positions:
                raise MoetoolError(f"prompt {prompts[j].index} has {L} tokens, more than the model's context "
                                   f"(max_position_embeddings={fc.max_positions})")
    done_at = np.concatenate([[0], np.cumsum(lengths)])
    fingerprint = config_fingerprint(ckpt.config)
    stats = ProfileStats.empty(spec.moe.num_experts + spec.moe.zero_experts, spec.moe.top_k, moe_layers, model=ckpt.source,
                               model_type=spec.model_type, fingerprint=fingerprint, dtype=dtype,
                               router_dtype=router_dtype)
    start = 0
    partial = os.path.join(out, PARTIAL) if out else None
    corpus_id = _corpus_id(prompts)
    if resume:
        if partial is None:
            raise MoetoolError("--resume needs -o OUT (the directory of the interrupted run)")
        if per_token:
            raise MoetoolError("--resume cannot continue a --per-token export; run again without --resume")
        summary_path = os.path.join(partial, "profile.json")
        if os.path.isfile(summary_path):
            # the resume point lives in the partial profile.json, written after (and naming the sha256
            # of) the stats it describes: a crash between the two writes is detected on load, never
            # counted twice
            stats = ProfileStats.load(partial)
            state = json.loads(open(summary_path, encoding="utf-8").read()).get("resume") or {}
            if state.get("corpus") != corpus_id or state.get("block_tokens") != block_tokens:
                raise MoetoolError(f"{out}: the interrupted run used another corpus or block size; "
                                   "run without --resume to start over")
            if stats.meta.get("fingerprint") != fingerprint:
                raise MoetoolError(f"{out}: the interrupted run profiled another model")
            start = int(state["prompts_done"])
    elif partial and os.path.isdir(partial):
        shutil.rmtree(partial)
    store = weight_store(ckpt)
    prog = progress if isinstance(progress, Progress) else Progress(len(prompts), fc.layers, enabled=bool(progress))
    prog.prompts = prog.start_prompts = start
    prog.tokens = int(done_at[start])
    writer = PerTokenWriter(per_token) if per_token else None
    ok = False
    try:
        with torch.inference_mode():
            dec = Decoder(spec, fc, store, dtype=DTYPES[dtype], device=dev, router_dtype=DTYPES[router_dtype])
            dec.ffn_hook = ffn_hook
            for b, (i0, i1) in enumerate(pack_blocks(lengths, block_tokens, start)):
                block = prompts[i0:i1]
                ids = [enc.ids for enc in tok.encode_batch([p.text for p in block])]
                _run_block(dec, spec, fc, stats, block, ids, writer, prog, b,
                           Segments, attention_mask, rope_tables, router_distribution, torch)
                tokens_done = int(done_at[i1])
                if partial:
                    summary = {"schema_version": 1, "command": "profile", "partial": True}  # no metrics yet
                    summary["resume"] = {"prompts_done": i1, "tokens_done": tokens_done, "corpus": corpus_id,
                                         "block_tokens": block_tokens}
                    stats.save(partial, summary)
                prog.block(b, i1, tokens_done)
                if on_block:
                    on_block(b)
        ok = True
    finally:
        store.release()
        prog.close()
        if writer:
            writer.close(ok)
    if out:
        stats.save(out)
        shutil.rmtree(partial, ignore_errors=True)
    return stats


def _run_block(dec, spec, fc, stats, block, ids, writer, prog, b, Segments, attention_mask, rope_tables,
               router_distribution, torch):
    lengths = [len(x) for x in ids]
    flat = [t for x in ids for t in x]
    T = len(flat)
    starts = np.cumsum([0] + lengths[:-1])
    dev = dec.device
    # per-prompt RoPE tables (positions 0..L-1 of each prompt) and masks, cached by length
    tables: dict[int, tuple] = {}
    for L in set(lengths):
        tables[L] = rope_tables(fc, L, dev)
    cos = torch.cat([tables[L][0] for L in lengths])
    sin = torch.cat([tables[L][1] for L in lengths])
    keys = {(fc.windows[i], fc.chunk if (fc.chunk and fc.use_rope[i]) else None) for i in range(fc.layers)}
    keys.add((None, None))
    # causal masks: prompts of similar length share one padded attention (Segments.attend); an encoder's
    # bidirectional mask would let real queries see the padding, so it keeps one attention per prompt
    masks = {key: Segments([(int(a), int(a) + L, attention_mask(L, key[0], key[1], dev, fc.bidirectional))
                            for a, L in zip(starts, lengths)], None if fc.bidirectional else key) for key in keys}
    dec.positions = torch.cat([torch.arange(L) for L in lengths])
    norms: dict[int, torch.Tensor] = {}
    routes: list = []

    def expert_hook(layer, e, pairs, y):  # pairs: the (token, slot) pairs t*K+s that expert e ran on
        norms[layer].view(-1)[pairs.cpu()] = torch.linalg.vector_norm(y.float(), dim=-1).cpu()

    dec.expert_hook = expert_hook
    token_ids = np.array(flat, dtype=np.int64)
    domains = [p.domain for p in block]
    has_domain = any(d is not None for d in domains)
    prompt_index = np.repeat(np.array([p.index for p in block], dtype=np.int64), lengths)
    token_index = np.concatenate([np.arange(L) for L in lengths])
    prev = None
    x = dec.embed(flat)
    for i in range(fc.layers):
        prog.layer(b, i, T)
        if spec.layers[i].moe:
            norms[i] = torch.zeros(T, spec.moe.top_k)
        x = dec.layer(i, x, cos, sin, masks, routes, True)
        dec.store.release()
        if routes:
            r = routes.pop()
            experts, weights = r.experts.numpy().astype(np.int64), r.weights.numpy().astype(np.float64)
            stats.add(i, experts, weights, token_ids=token_ids, domain=domains if has_domain else None,
                      expert_output_norms=norms.pop(i).numpy(), segments=lengths,
                      probs=router_distribution(r.logits, spec), selection=r.scores.numpy(), prev_experts=prev)
            if writer:
                writer.write(i, prompt_index, token_index, token_ids, experts, weights)
            prev = experts
    dec.expert_hook = None
    dec.positions = None


def _corpus_id(prompts: Sequence[Prompt]) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.text, p.domain]).encode())
        h.update(b"\n")
    return h.hexdigest()
