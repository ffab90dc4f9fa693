"""Storage formats: the exact bytes a weight matrix takes in each format, scales included.

Conventions (see docs/count.md): formats apply to linear-layer weights (attention, experts,
dense and shared MLPs, SSM projections, vision linears). Embeddings, the LM head, routers, norms,
biases and other 1-D / conv parameters stay in bf16, as GPTQ, AWQ, bitsandbytes and gpt-oss's
MXFP4 checkpoints keep them. A weight is [out, in]; blocks and groups run along `in`.

| name      | data            | scales                                                        |
|-----------|-----------------|---------------------------------------------------------------|
| bf16      | 2 bytes         | none                                                          |
| fp8       | 1 byte (E4M3)   | fp32 per 128x128 block (DeepSeek-V3's `weight_scale_inv`)      |
| fp8_channel | 1 byte (E4M3) | fp32 per output channel                                       |
| int8      | 1 byte          | fp16 per output channel                                       |
| int4_g128 | 4 bits          | fp16 scale + 4-bit zero point per 128 inputs (GPTQ layout)    |
| nf4       | 4 bits          | fp32 absmax per 64 elements (bitsandbytes, no double quant)   |
| mxfp4     | 4 bits (E2M1)   | one E8M0 byte per 32 inputs (OCP MX; gpt-oss experts)         |
| nvfp4     | 4 bits (E2M1)   | one E4M3 byte per 16 inputs + one fp32 per tensor             |
"""

from __future__ import annotations

from typing import Callable, Optional

from .spec import Param

KEEP_BF16_GROUPS = {"embedding", "lm_head", "router", "norms"}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


# bytes of one [out, in] matrix
_MATRIX: dict[str, Callable[[int, int], int]] = {
    "bf16": lambda o, i: 2 * o * i,
    "fp8": lambda o, i: o * i + 4 * _ceil(o, 128) * _ceil(i, 128),
    "fp8_channel": lambda o, i: o * i + 4 * o,
    "int8": lambda o, i: o * i + 2 * o,
    "int4_g128": lambda o, i: _ceil(o * i, 2) + o * _ceil(i, 128) * 2 + _ceil(o * _ceil(i, 128), 2),
    "nf4": lambda o, i: _ceil(o * i, 2) + 4 * _ceil(o * i, 64),
    "mxfp4": lambda o, i: _ceil(o * i, 2) + o * _ceil(i, 32),
    "nvfp4": lambda o, i: _ceil(o * i, 2) + o * _ceil(i, 16) + 4,
}
FORMATS = tuple(_MATRIX)


def param_bytes(p: Param, fmt: str) -> int:
    """Bytes of a parameter (all its copies) stored in `fmt`."""
    if fmt not in _MATRIX:
        raise ValueError(f"unknown storage format {fmt!r}; known: {', '.join(FORMATS)}")
    if not p.matmul or p.group in KEEP_BF16_GROUPS or len(p.shape) != 2:
        return 2 * p.numel
    out, inp = p.shape
    return _MATRIX[fmt](out, inp) * p.copies


def matrix_bytes(fmt: str, out: int, inp: int) -> int:
    return _MATRIX[fmt](out, inp)


def bits_per_weight(fmt: str, out: int = 4096, inp: int = 4096) -> float:
    """Effective bits per weight of a matrix in `fmt`, scales included."""
    return 8 * _MATRIX[fmt](out, inp) / (out * inp)


DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "fp8": 1, "float8": 1,
               "int8": 1}


def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(sorted(DTYPE_BYTES))}") from None


# --- the storage a config.json declares (`quantization_config`) -------------------------------

# module-name fragments of `modules_to_not_convert` (and its aliases) -> the group they keep unquantized
_MODULE_GROUPS = (("embed", "embedding"), ("lm_head", "lm_head"), ("shared_expert", "shared_experts"),
                  ("router", "router"), ("mlp.gate", "router"), ("block_sparse_moe.gate", "router"),
                  ("self_attn", "attention"), ("attention", "attention"), (".attn", "attention"),
                  ("mamba", "ssm"), ("linear_attn", "ssm"), ("vision", "vision"), ("experts", "routed_experts"))


def declared_format(q: dict) -> Optional[tuple[str, str]]:
    """A config's `quantization_config` -> (format in FORMATS, label) when it maps exactly onto
    one of the formats above; None otherwise (the storage is then not modelled)."""
    method = str(q.get("quant_method", "")).lower()
    if method == "fp8" and list(q.get("weight_block_size") or []) == [128, 128]:
        return "fp8", "fp8, 128x128 blocks"
    if method == "mxfp4":
        return "mxfp4", "MXFP4"
    if method in ("gptq", "awq") and q.get("bits") == 4 and q.get("group_size") == 128:
        return "int4_g128", f"{method.upper()} 4-bit, groups of 128"
    if method == "bitsandbytes":
        if q.get("load_in_4bit") and q.get("bnb_4bit_quant_type") == "nf4" and not q.get("bnb_4bit_use_double_quant"):
            return "nf4", "bitsandbytes NF4"
    return None


def unconverted_groups(q: dict) -> tuple[set[str], list[str]]:
    """The groups `modules_to_not_convert` (or `llm_int8_skip_modules`, `ignore`) keep in bf16,
    and the patterns that name none of them."""
    patterns = [p for key in ("modules_to_not_convert", "llm_int8_skip_modules", "ignore")
                for p in (q.get(key) or []) if isinstance(p, str)]
    groups, unknown = set(), []
    for pat in patterns:
        hit = next((g for frag, g in _MODULE_GROUPS if frag in pat), None)
        if hit:
            groups.add(hit)
        else:
            unknown.append(pat)
    return groups, unknown
