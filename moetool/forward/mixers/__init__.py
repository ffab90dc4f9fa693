"""Token mixers other than softmax attention, one module per kind. Each is a plain function
`forward(weights, x [T, D], config, state=None) -> [T, D]` over one sequence: `weights` holds the
layer's mixer tensors by local name (e.g. "in_proj.weight"), `state` (a dict, optional) carries the
recurrent state between calls. The decoder calls `run()` for a layer whose `LayerSpec.mixer` is one
of `KINDS`; which configuration a family uses is data (`ForwardConfig.mixers`, built by `configs`).
Equations, state sizes and what each was verified against: docs/mixers.md."""

from __future__ import annotations

from typing import Optional

import torch

from ...errors import BadCheckpoint
from . import gated_deltanet, kda, lightning, mamba, mamba2, short_conv

KINDS = {"mamba": mamba, "mamba2": mamba2, "gated_deltanet": gated_deltanet, "short_conv": short_conv,
         "lightning_attention": lightning, "kda": kda}


def run(decoder, i: int, h: torch.Tensor, state: Optional[dict] = None) -> torch.Tensor:
    """Layer i's mixer on h [T, D] -> [T, D], reading only that layer's mixer tensors."""
    kind = decoder.spec.layers[i].mixer
    c = decoder.fc.mixers[kind]
    index = _layer_tensors(decoder)
    # the mixer's prefix, or an original checkpoint's name for it (ForwardConfig.name_aliases)
    prefix = next((f"{decoder.names.layers}{i}.{p}" for p in decoder.names.alternatives(c.prefix)
                   if f"{decoder.names.layers}{i}.{p}" in index), f"{decoder.names.layers}{i}.{c.prefix}")
    names = index.get(prefix)
    if not names:
        raise BadCheckpoint(f"checkpoint is missing the {kind} mixer of layer {i} (no tensor named {prefix}*)")
    # NeMo keeps Mamba-2's A_log, D and dt_bias under `_fp32_params.` (transformers drops that part)
    w = {n[len(prefix):].replace("_fp32_params.", ""): decoder.w(n) for n in names}
    if hasattr(c, "layer"):  # mixers whose maths depends on the layer index (lightning attention's decay)
        c = KINDS[kind].for_layer(c, i)
    try:
        return KINDS[kind].forward(w, h, c, state)
    except KeyError as e:
        raise BadCheckpoint(f"checkpoint is missing tensor {prefix}{e.args[0]} ({kind} mixer of layer {i})") from None
    except RuntimeError as e:  # shapes that contradict config.json
        raise BadCheckpoint(f"layer {i}: the {kind} mixer's tensors do not fit config.json: {str(e)[:200]}") from None


def _layer_tensors(decoder) -> dict[str, list[str]]:
    """Stored tensor names grouped by mixer prefix ("model.layers.3.mamba."), computed once."""
    index = getattr(decoder, "_mixer_index", None)
    if index is None:
        prefixes = {p for c in decoder.fc.mixers.values() for p in decoder.names.alternatives(c.prefix)}
        index = {}
        for name in decoder.store.tensors:
            if not name.startswith(decoder.names.layers):
                continue
            rest = name[len(decoder.names.layers):]
            layer, _, local = rest.partition(".")
            for p in prefixes:
                if local.startswith(p):
                    index.setdefault(f"{decoder.names.layers}{layer}.{p}", []).append(name)
        decoder._mixer_index = index
    return index
