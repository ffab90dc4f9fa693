"""The reference MoE forward pass (PyTorch): `run_forward(checkpoint, token_ids)`.

Example:
    >>> from moetool.forward import run_forward
    >>> out = run_forward(resolve("path/to/ckpt"), [1, 2, 3])   # doctest: +SKIP
    >>> out.routes[0].experts.shape                               # doctest: +SKIP
    torch.Size([3, 2])
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..arch import spec_from_config
from ..errors import MoetoolError
from ..source import Checkpoint
from . import diffusion_gemma, sparse_variants
from .config import FORWARD_FAMILIES, forward_config
from .model import Decoder, ForwardResult, LayerRoute
from .weights import WeightStore, fp8_block_size

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MoetoolError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MoetoolError(f"--device must be auto, cpu or cuda, got {device!r}")
    return device


def run_forward(ckpt: Checkpoint, token_ids: list[int], *, dtype: str = "float32", device: str = "auto",
                router_dtype: str = "float32", record: bool = True,
                progress: Optional[Callable[[int, int], None]] = None, ffn_hook: Optional[Callable] = None,
                streaming: Optional[bool] = None, last_layer: Optional[int] = None,
                index_width: Optional[int] = None) -> ForwardResult:
    """Run the prompt through the checkpoint, layer by layer; return logits and router decisions.
    `streaming` forces (True) or forbids (False) dropping pages after each expert and layer; by
    default a checkpoint larger than a quarter of the available memory streams. `last_layer`
    stops after that decoder layer (no logits then: `logits` is None). `index_width`: see
    forward/cache.py (DeepSeek-V3.2's indexer ties during generation)."""
    spec, fc = checked_config(ckpt, len(token_ids), dtype, router_dtype)
    store = weight_store(ckpt) if streaming is None else new_store(ckpt, streaming)
    with torch.inference_mode():
        dec = Decoder(spec, fc, store, dtype=DTYPES[dtype], device=pick_device(device),
                      router_dtype=DTYPES[router_dtype], progress=progress, ffn_hook=ffn_hook)
        dec.index_width = index_width
        out = dec.run(token_ids, record, last_layer)
    store.release()  # a streaming store drops its pages; a resident one keeps them for the next forward
    return out


def checked_config(ckpt: Checkpoint, n_tokens: int, dtype: str, router_dtype: str):
    """(spec, forward config) of a checkpoint about to run `n_tokens` tokens, after the checks
    every forward makes (weights present, context, dtypes)."""
    if ckpt.tensors is None:
        raise MoetoolError(f"{ckpt.source}: no safetensors weights to run (moetool never loads pickle checkpoints)")
    spec = spec_from_config(ckpt.config, ckpt.config_path)
    fc = forward_config(spec, ckpt.config)
    if not n_tokens:
        raise MoetoolError("no tokens to run")
    if fc.max_positions and n_tokens > fc.max_positions:
        raise MoetoolError(f"prompt has {n_tokens} tokens, more than the model's context "
                           f"(max_position_embeddings={fc.max_positions})")
    if dtype not in DTYPES or router_dtype not in DTYPES:
        raise MoetoolError(f"--dtype must be one of {', '.join(DTYPES)}")
    return spec, fc


def weight_store(ckpt: Checkpoint) -> WeightStore:
    """The checkpoint's WeightStore, kept on it so repeated forwards (generation, many prompts,
    calibration) reuse the mapped files."""
    store = getattr(ckpt, "_weight_store", None)
    if store is None:
        store = new_store(ckpt)
        ckpt._weight_store = store
    return store


def new_store(ckpt: Checkpoint, streaming: Optional[bool] = None):
    """A WeightStore for safetensors, a GGUFWeightStore (same interface) for GGUF."""
    if ckpt.gguf is not None:
        from ..gguf.store import GGUFWeightStore

        return GGUFWeightStore(ckpt, streaming=streaming)
    tensors = sparse_variants.runtime_names(ckpt.config, ckpt.tensors)  # Mistral-Large-4 as published
    tensors = diffusion_gemma.runtime_names(ckpt.config, tensors)  # DiffusionGemma: tied tensors under both names
    return WeightStore(tensors, streaming=streaming, fp8_block=fp8_block_size(ckpt.config))


__all__ = ["run_forward", "ForwardResult", "LayerRoute", "FORWARD_FAMILIES", "pick_device"]
