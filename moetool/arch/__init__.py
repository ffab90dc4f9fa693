"""Registry of architecture adapters, keyed by config.json `model_type` (aliases included).

Example:
    >>> from moetool.arch import spec_from_config
    >>> spec = spec_from_config(json.load(open("config.json")))   # doctest: +SKIP
    >>> spec.moe.num_experts, spec.moe.top_k                        # doctest: +SKIP
    (8, 2)
"""

from __future__ import annotations

from typing import Callable

from ..errors import BadConfig, UnsupportedArchitecture
from ..spec import Cfg, ModelSpec
from . import (bailing_hybrid, dbrx, deepseek_v4, diffusion_gemma, dots3, gemma4, mistral_large4, deepseek, granitemoehybrid, inkling, jamba, jetmoe, kimi_linear, lfm2_moe, llama4, llama_like, longcat_flash,
               minimax, mm_gap, multimodal, nemotron_h, nllb_moe, qwen3_next, qwen3_omni, switch, text_moe, zaya, qwen4_exp)

ADAPTERS: dict[str, Callable[[Cfg], ModelSpec]] = {}
for _module in (llama_like, deepseek, dbrx, llama4, jamba, qwen3_next, switch, text_moe, jetmoe, multimodal, nllb_moe,
                longcat_flash, granitemoehybrid, lfm2_moe, nemotron_h, minimax, kimi_linear, bailing_hybrid,
                gemma4, inkling, dots3, mistral_large4, deepseek_v4, diffusion_gemma, zaya, qwen4_exp, mm_gap, qwen3_omni):
    _module.register(ADAPTERS)

# Architectures whose checkpoints carry another name in the wild.
ALIASES = {"kimi_k2": "deepseek_v3", "mixtral_moe": "mixtral", "phi_moe": "phimoe", "gptoss": "gpt_oss"}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def spec_from_config(config: dict, where: str = "config.json") -> ModelSpec:
    """Build the normalised `ModelSpec` from a config.json dict. Never executes `auto_map` code."""
    cfg = Cfg(config, where)
    model_type = cfg.raw("model_type")
    if model_type is None:
        raise BadConfig(f"{where}: missing 'model_type'; is this a Hugging Face transformers config.json?")
    if not isinstance(model_type, str):
        raise BadConfig(f"{where}: field 'model_type' must be a string, got {model_type!r}")
    adapter = ADAPTERS.get(model_type) or ADAPTERS.get(ALIASES.get(model_type, ""))
    if adapter is None:
        raise UnsupportedArchitecture(
            f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    try:
        return adapter(cfg)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        # Adapter arithmetic on a value of the wrong kind: still bad input, never a traceback.
        raise BadConfig(f"{where}: cannot read a {model_type} config: {e}") from None
