"""The census of MoE architectures in the installed transformers (issue 11).

`moe_model_types()` finds every model_type whose transformers module has routed experts (its
modeling / configuration code builds experts: `use_experts_implementation`, an `*Experts` class, a
`*Moe*` block, or an experts-count config field) and that transformers can build as a language
model (it appears in a causal-LM, image-text-to-text, multimodal-LM, seq2seq or
token-classification auto mapping). Sub-configs without such a class (vision / audio towers,
`*_text` configs only used nested) are covered by their parent model_type.

Each census model_type is either supported by moetool (an adapter in `moetool.arch.ADAPTERS`:
its counts are checked against transformers in tests/test_census.py) or listed in
`OUT_OF_SCOPE` with the reason. A new MoE family in transformers fails the census until handled.

Also imported by scripts/gen_arch_table.py (the docs/architectures.md table).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

# Routed experts in a module's modeling / configuration source.
MOE_SOURCE = re.compile(r"use_experts_implementation|num_experts|n_routed_experts|num_local_experts|moe_num_experts"
                        r"|class \w*Experts?\b|class \w*(Sparse)?Moe\w*\(")

# Auto mappings that make a model_type something `count` / `trace` users run, in the order that
# picks the class counted (multimodal first: the whole model with its towers).
LM_MAPPINGS = ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
               "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
               "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES")

# Modules whose source matches MOE_SOURCE but that build no routed experts, or no language model.
NOT_MOE_MODULES = {
    "vitpose_backbone": "vision-only pose backbone: its 'experts' are per-dataset output heads, no language model",
    "bamba": "dense Mamba2 hybrid: the code fixes num_experts = 1 (no routed experts)",
}

# model_type -> why moetool does not count it (checked: each is a census model_type).
# Families with no specific adapter yet (issue 11 stays open for them). `count` refuses their bare
# config.json in one line and counts a checkpoint exactly from its headers (arch/generic.py); the
# census verifies that generic count against transformers where a small model can be built.
_NO_ADAPTER = "no specific adapter yet: config-only count refused; checkpoints counted from their headers"
GENERIC_VERIFIED: tuple = ()  # families whose generic header count is verified (none left: all have adapters)
KNOWN_GAPS: dict[str, str] = {
    **{mt: _NO_ADAPTER + " (generic header count equals transformers', tested)" for mt in GENERIC_VERIFIED},
    # none in transformers 5.23: every census family has an adapter (a new family without one goes here,
    # with the reason, until it has)
}

OUT_OF_SCOPE: dict[str, str] = {
    "doge": "dense by default (is_moe=False); its 'cross-domain MoE' is a product-key lookup of embedding rows "
            "(num_experts single-vector experts), not routed FFN experts",
}


@lru_cache(maxsize=1)
def moe_model_types() -> dict[str, str]:
    """model_type -> transformers class name that `count` must equal (the first LM mapping that has it)."""
    import transformers
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    out: dict[str, str] = {}
    for mt in CONFIG_MAPPING_NAMES:
        module = model_type_to_module_name(mt)
        if module in NOT_MOE_MODULES or not _module_has_experts(os.path.join(root, module)):
            continue
        for mapping in LM_MAPPINGS:
            cls = getattr(modeling_auto, mapping).get(mt)
            if cls:
                out[mt] = cls
                break
    return dict(sorted(out.items()))


@lru_cache(maxsize=None)
def _module_has_experts(directory: str) -> bool:
    if not os.path.isdir(directory):
        return False
    text = ""
    for f in sorted(os.listdir(directory)):
        if f.startswith(("modeling_", "configuration_")) and f.endswith(".py"):
            with open(os.path.join(directory, f), encoding="utf-8") as fh:
                text += fh.read()
    return bool(MOE_SOURCE.search(text))


def moe_modules() -> set[str]:
    """Modules with routed experts in their source (census model_types and their sub-configs)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    return {model_type_to_module_name(mt) for mt in CONFIG_MAPPING_NAMES
            if _module_has_experts(os.path.join(root, model_type_to_module_name(mt)))}


def status(model_type: str) -> str:
    """"supported" | "out_of_scope" | "known_gap" (listed, with its reason) | "unhandled"."""
    from moetool.arch import ADAPTERS

    if model_type in ADAPTERS:
        return "supported"
    if model_type in OUT_OF_SCOPE:
        return "out_of_scope"
    if model_type in KNOWN_GAPS:
        return "known_gap"
    return "unhandled"
