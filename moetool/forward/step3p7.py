"""StepFun Step-3.7 (transformers' step3p7, text part `step3p5`): what its forward adds to the
Llama-like decoder (forward/model.py), read from `text_config`.

- Gemma-style (1 + w) RMSNorms everywhere (layer norms, per-head QK-norms, final norm).
- Attention scaled by `query_pre_attn_scalar ** -0.5` (default head_dim); a sigmoid output gate
  `g_proj` per head ([H, D]; `gating` true / "per-head": a gate per channel is refused, transformers
  5.23 cannot run it); sliding layers
  (`layer_types`) with their own head count (the count Style's dims); RoPE per layer type, partial
  where `partial_rotary_factor` says so.
- Clamped SwiGLU per layer: silu(gate).clamp(max=L) * up.clamp(-L, L), L from `swiglu_limits[i]`
  for the routed experts and `swiglu_limits_shared[i]` for the shared expert and the dense MLP of
  layer i; 0 / null / no list: no clamp.
- Sigmoid router with a correction bias for the choice, renormalised; the routed sum times
  `moe_router_scaling_factor` after the experts, then the always-on shared expert added.

The published checkpoints store the experts as three stacked tensors `moe.{gate,up,down}_proj.weight`
([E, F, D], [E, F, D], [E, D, F]), the router as `moe.gate.weight` + `moe.router_bias`, the shared
expert as `share_expert.*` (forward/model.py's Experts and name lists read them).

Legacy hub configs (Step-3.7-Flash as published) are read as transformers' Step3p7TextConfig reads
them: `rope_theta` / `partial_rotary_factors` as per-layer lists (each layer type takes its first
layer's entry), `rope_scaling` on the full-attention layers, lists padded with the MTP layers cut to
num_hidden_layers.
"""

from __future__ import annotations

import math

from ..errors import BadConfig, UnsupportedArchitecture
from ..spec import Cfg, ModelSpec
from .config import ForwardConfig, _json_float


def normalise(cfg: Cfg) -> Cfg:
    """The text config with legacy RoPE keys as transformers' Step3p7TextConfig turns them into
    `rope_parameters` per layer type: `rope_theta` / `partial_rotary_factors` per-layer lists (each
    layer type takes its first layer's entry), `rope_scaling` merged into the full-attention entry."""
    if _per_type(cfg.raw("rope_parameters")):
        return cfg
    n = cfg.int("num_hidden_layers")
    types = cfg.str_list("layer_types", ["full_attention"] * n)[:n]
    if len(types) < n:
        raise BadConfig(f"{cfg.where}: layer_types has {len(types)} entries for {n} layers")
    thetas, factors = cfg.raw("rope_theta", 10000.0), cfg.raw("partial_rotary_factors")
    for key, v in (("rope_theta", thetas), ("partial_rotary_factors", factors)):
        if isinstance(v, list) and len(v) < n:
            raise BadConfig(f"{cfg.where}: {key} has {len(v)} entries for {n} layers")
    scaling = cfg.raw("rope_scaling") or {}
    if not isinstance(scaling, dict) or (factors is not None and not isinstance(factors, list)):
        raise BadConfig(f"{cfg.where}: rope_scaling must be an object and partial_rotary_factors a list")
    params = {}
    for t in dict.fromkeys(types):
        i = types.index(t)
        p = {"rope_type": "default", "rope_theta": _json_float(thetas[i] if isinstance(thetas, list) else thetas,
                                                               cfg, "rope_theta")}
        if factors:
            p["partial_rotary_factor"] = _json_float(factors[i], cfg, "partial_rotary_factors")
        params[t] = {**p, **scaling} if t == "full_attention" else p
    d = {k: v for k, v in cfg.d.items() if k not in ("rope_theta", "rope_scaling", "partial_rotary_factors")}
    return Cfg({**d, "rope_parameters": params}, cfg.where)


def configure(fc: ForwardConfig, spec: ModelSpec, cfg: Cfg, rope: dict) -> None:
    if cfg.bool("use_bidirectional_attention", False):
        raise UnsupportedArchitecture("step3p7 with use_bidirectional_attention is not supported by the reference "
                                      "forward (causal attention only)")
    if cfg.raw("gating", True) not in (True, "per-head"):
        raise UnsupportedArchitecture(f"step3p7 with gating={cfg.raw('gating')!r} (an output gate per channel) is not "
                                      "supported: transformers 5.23 cannot run it either, so there is no reference")
    fc.norm_offset = 1.0
    fc.attn_scale = cfg.float("query_pre_attn_scalar", fc.head_dim) ** -0.5
    fc.expert_act, fc.swiglu_limit = "silu_clamped", math.inf  # swiglu_limit: where no layer is named
    fc.layer_limits = [(_limit(cfg, "swiglu_limits", i), _limit(cfg, "swiglu_limits_shared", i))
                       for i in range(spec.num_layers)]


def _limit(cfg: Cfg, key: str, i: int) -> float:
    """Layer i's clamp bound from a per-layer list; 0 / null / no list: none (inf)."""
    values = cfg.raw(key)
    if values is None:
        return math.inf
    if not isinstance(values, list) or len(values) <= i:
        raise BadConfig(f"{cfg.where}: {key} must be a list with one entry per layer")
    v = 0.0 if values[i] is None else _json_float(values[i], cfg, key)
    if v < 0:
        raise BadConfig(f"{cfg.where}: {key} entries must be non-negative, got {v!r}")
    return v or math.inf


def _per_type(params) -> bool:
    return isinstance(params, dict) and bool(params) and all(isinstance(v, dict) or v is None for v in params.values())
