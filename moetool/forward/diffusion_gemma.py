"""DiffusionGemma (diffusion_gemma: transformers' DiffusionGemmaForBlockDiffusion): one denoising step.

The model is two stacks over ONE Gemma 4 text model (forward/gemma4.py: the MoE block beside the
dense MLP in every layer, no per-layer inputs, no KV sharing, V = K on full-attention layers):

- the encoder (`model.encoder.language_model.*`) runs the prompt causally (sliding windows on the
  sliding layers) and fills a KV cache: per layer the keys and values after the QK/V norms and RoPE;
- the decoder (`model.decoder.*`) runs a canvas of tokens at positions P .. P+C-1 (P prompt tokens),
  bidirectionally: every canvas token attends to every canvas token and to the cached prompt keys,
  read-only. Its sliding layers see only the last `sliding_window - 1` prompt keys (what transformers'
  DynamicSlidingWindowLayer keeps after the prefill) and the whole canvas (no window inside it). The
  canvas embedding passes the self-conditioning block first: post_norm(x + down(act(gate(n)) * up(n))),
  n = pre_norm(soft embeddings of the previous step's logits); on the first step there are none and the
  soft embeddings are zeros (transformers' DiffusionGemmaDecoderModel without self_conditioning_logits).
  The decoder's final norm and the LM head (tied to the decoder's embedding unless the top-level
  tie_word_embeddings is false) give the canvas logits, soft-capped by final_logit_softcapping (30 by
  default: DiffusionGemmaTextConfig's class value, absent from a saved config.json).

Weights: the decoder's layers, final norm and embedding are the encoder's (transformers ties every
`weight`, `scale`, `per_expert_scale`, `gate_up_proj` and `down_proj` under the layers); a saved
checkpoint keeps one name of each tied pair. `runtime_names` lists a tied tensor under both names, as
transformers ties them on load; attention biases and `layer_scalar` are not tied (each stack its own).
The layers stream as everywhere: the encoder's layer by layer, then the decoder re-reads them layer by
layer (one layer's weights in memory at a time); the KV cache holds the prompt's keys and values.

`trace` of this family (tracing.py) is the encoder over the prompt, then ONE decoder step over the
first canvas, as transformers' `generate` runs its first denoising step: the canvas given by the user
(`--decoder-tokens` / `--decoder-text`), else `canvas_length` tokens drawn uniformly from the vocabulary
(generate's EntropyBoundSampler.initialize_canvas) with a fixed seed (CANVAS_SEED), so that a trace is
reproducible. Routes are recorded per stack ("encoder": layers 0..L-1 over the prompt; "decoder":
layers L..2L-1 over the canvas, `stack_layer` 0..L-1); logits are the canvas's. The sampler's later
steps (entropy-bounded acceptance, renoising, self-conditioning on the previous logits, further
canvases) are not run: `--generate` is refused. `use_bidirectional_attention: "all"` is refused
(transformers 5.23's DiffusionGemma fails on it, eager and sdpa alike: no reference to match).

`profile` and `quantize-report` run the Decoder of forward/model.py over the encoder's names: they
see the encoder's routing of the prompts (what the prompt's KV cache costs), not the denoiser's.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import BadCheckpoint, MoetoolError, UnsupportedArchitecture
from ..spec import Cfg
from .model import ForwardResult, LayerRoute, norm, rms_norm, swiglu

ENCODER = "model.encoder.language_model."
DECODER = "model.decoder."
CANVAS_SEED = 0  # the default canvas: torch.randint over the vocabulary from this seed
SOFTCAP = 30.0  # DiffusionGemmaTextConfig.final_logit_softcapping
# transformers' DiffusionGemmaModel._tied_weights_keys, under the text model's root
_TIED = re.compile(r"(layers\.(?:[^.]+\.)*(weight|scale|per_expert_scale|gate_up_proj|down_proj)|norm\.weight|"
                   r"embed_tokens\.weight)")


def text_config(config: Cfg) -> Cfg:
    """The text model's fields (`text_config`) with what DiffusionGemma fixes, as forward/gemma4.py
    reads a Gemma 4 text config: the MoE block in every layer, no per-layer inputs, no KV sharing,
    V = K on full layers, no double-wide MLP; final_logit_softcapping 30 where config.json omits it."""
    text = dict(config.sub("text_config").d)
    if text.get("use_bidirectional_attention") == "all":
        raise UnsupportedArchitecture("config.json: DiffusionGemma with use_bidirectional_attention \"all\" is not "
                                      "supported by the reference forward (transformers 5.23's own forward fails on it: "
                                      "its attention receives is_causal twice)")
    text.update(enable_moe_block=True, hidden_size_per_layer_input=0, num_kv_shared_layers=0, attention_k_eq_v=True,
                use_double_wide_mlp=False)
    if text.get("final_logit_softcapping") is None:
        text["final_logit_softcapping"] = SOFTCAP
    for t, p in (text.get("rope_parameters") or {}).items():
        # DiffusionGemma's default RoPE takes partial_rotary_factor, whose shorter tables transformers' own
        # apply_rotary_pos_emb cannot apply to the whole head
        if isinstance(p, dict) and (p.get("rope_type") or "default") == "default" and \
                float(p.get("partial_rotary_factor", 1.0)) != 1.0:
            raise UnsupportedArchitecture(f"config.json: DiffusionGemma's default RoPE with partial_rotary_factor "
                                          f"(rope_parameters[{t!r}]) is not supported by the reference forward")
    return Cfg(text, f"{config.where}[text_config]")


def runtime_names(config: dict, tensors: dict) -> dict:
    """The checkpoint's tensor table with every tied tensor under both stacks' names (transformers ties
    them on load; a saved checkpoint keeps one of each pair). Other families: the table as it is."""
    if config.get("model_type") != "diffusion_gemma" or config.get("tie_word_embeddings") is False:
        return tensors
    out = dict(tensors)
    for name, info in tensors.items():
        for have, other in ((DECODER, ENCODER), (ENCODER, DECODER)):
            if name.startswith(have) and _TIED.fullmatch(name[len(have):]) and other + name[len(have):] not in out:
                out[other + name[len(have):]] = info
    return out


@dataclass
class DiffusionResult(ForwardResult):
    """logits [C, V] of the canvas; routes of both stacks (stack "encoder" / "decoder")."""

    canvas: list[int] = field(default_factory=list)


def default_canvas(config: dict, vocab: int) -> list[int]:
    """`canvas_length` tokens uniform over the vocabulary (generate's first canvas), seeded."""
    n = Cfg(config).int("canvas_length", 256, min_value=1)
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(CANVAS_SEED)).tolist()


def run(ckpt, prompt: list[int], canvas: list[int], *, dtype: str = "float32", device: str = "cpu",
        router_dtype: str = "float32", record: bool = True,
        progress: Optional[Callable[[int, int], None]] = None) -> DiffusionResult:
    """The encoder over `prompt`, then one decoder step over `canvas` (module docstring)."""
    from . import DTYPES, checked_config, pick_device, weight_store
    from .cache import KVCache
    from .model import Decoder

    if not canvas:
        raise MoetoolError("DiffusionGemma: the canvas has no tokens")
    spec, fc = checked_config(ckpt, len(prompt) + len(canvas), dtype, router_dtype)
    bad = [t for t in canvas if not 0 <= t < spec.vocab_size]
    if bad:
        raise MoetoolError(f"canvas token id {bad[0]} is outside the vocabulary (0..{spec.vocab_size - 1})")
    store = weight_store(ckpt)
    L = fc.layers
    with torch.inference_mode():
        dec = Decoder(spec, fc, store, dtype=DTYPES[dtype], device=pick_device(device),
                      router_dtype=DTYPES[router_dtype])
        if not dec.names.embed.startswith(ENCODER):
            raise BadCheckpoint(f"checkpoint has no {ENCODER}embed_tokens.weight nor {DECODER}embed_tokens.weight")
        step = lambda done: progress(done, 2 * L) if progress else None
        cache = KVCache()
        enc_routes = _stack(dec, prompt, cache, {}, record, lambda i: step(i + 1))
        cache.past = P = len(prompt)
        dec.names = _decoder_names(dec.names)
        for name in (dec.names.embed, dec.names.final_norm + "weight"):
            if name not in store:
                raise BadCheckpoint(f"checkpoint is missing a tensor: {name}")
        masks = {}
        for i in range(L):  # every canvas token sees the whole canvas and the cached prompt keys
            window = fc.windows[i]
            keep = P if window is None or window <= 1 else min(P, window - 1)  # DynamicSlidingWindowLayer's
            if (window, None) not in masks:
                visible = torch.arange(P + len(canvas), device=dec.device) >= P - keep
                masks[window, None] = visible[None, :].expand(len(canvas), -1)
        dec_routes = _stack(dec, canvas, cache, masks, record, lambda i: step(L + i + 1), conditioning=True)
        logits = dec._final(dec.x).cpu()
        del dec.x
    store.release()
    for r in enc_routes:
        r.stack = "encoder"
    for r in dec_routes:
        r.stack, r.layer = "decoder", L + r.layer
    return DiffusionResult(logits=logits, routes=enc_routes + dec_routes, bytes_read=store.bytes_read, canvas=canvas)


def _stack(dec, ids: list[int], cache, masks: dict, record: bool, done: Callable, conditioning: bool = False) -> list:
    """One stack's layers over `ids` (positions from cache.past), streamed; the hidden states stay on
    dec.x. The encoder's keys and values go into `cache`; the decoder's are appended after them (read
    with them, then dropped with the cache)."""
    dec.cache, dec.past = cache, cache.past
    routes: list[LayerRoute] = []
    try:
        x = dec.embed(ids)  # scaled embedding (forward/gemma4.py)
        if conditioning:
            x = self_conditioning(dec, x)
        for i in range(dec.fc.layers):
            x = dec.layer(i, x, None, None, masks, routes, record)
            dec.store.release()
            done(i)
    finally:
        dec.cache, dec.past = None, 0
    dec.x = x
    return routes


def self_conditioning(dec, x: torch.Tensor, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DiffusionGemmaSelfConditioning: post_norm(x + down(act(gate(n)) * up(n))), n = pre_norm(soft);
    `soft`: the soft embeddings of the previous step's logits, zeros on the first step."""
    base = DECODER + "self_conditioning."
    for p in ("pre_norm.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"):
        if base + p not in dec.store:
            raise BadCheckpoint(f"checkpoint is missing a tensor: {base}{p}")
    n = norm(torch.zeros_like(x) if soft is None else soft, dec.w(base + "pre_norm.weight"), None, dec.fc)
    sc = swiglu(n, *(dec.w(base + p + "_proj.weight") for p in ("gate", "up", "down")), act=dec.fc.expert_act)
    return rms_norm(x + sc, None, dec.fc.eps)


def _decoder_names(names):
    """The decoder stack's names: its embedding, layers and final norm; the LM head as the encoder's
    (lm_head.weight, else tied to the decoder's embedding)."""
    n = copy.copy(names)
    n.embed, n.layers, n.final_norm = DECODER + "embed_tokens.weight", DECODER + "layers.", DECODER + "norm."
    return n
