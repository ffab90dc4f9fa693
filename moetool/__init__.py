"""moetool: analyse Mixture-of-Experts checkpoints.

Library first: every command is one call that returns a report with `to_dict()` and
`to_dataframe()` (and a short repr; an HTML summary in notebooks).

- `moetool.count(model)`: total vs active parameters, memory, KV cache, FLOPs
  (`moetool.counting.count`, returns a `CountReport`; torch-free).
- `moetool.trace(prompt, model=...)`, `moetool.trace_many(prompts, model=...)`: the reference
  forward and every router decision (`moetool.tracing`, `TraceReport` / `CorpusReport`).
- `moetool.quantize_report(model)`: per-expert quantization sensitivity and a plan
  (`moetool.quant.report`, `QuantReport`).
- `moetool.MoetoolError`: what every bad input raises (one-line message).

Example:
    >>> import moetool
    >>> moetool.count("mixtral-8x7b").total_params
    46702792704
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import MoetoolError

__version__ = "0.1.0"

if TYPE_CHECKING:  # the real functions, imported on first use (see __getattr__)
    from .counting import count
    from .quant.report import quantize_report
    from .tracing import trace, trace_many

# name -> module: loaded on first access, so `import moetool` (and `moetool --help`) stays light;
# `moetool.count` is then the real function, with its signature and docstring.
_LAZY = {"count": "counting", "trace": "tracing", "trace_many": "tracing", "quantize_report": "quant.report"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moetool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["count", "trace", "trace_many", "quantize_report", "MoetoolError", "__version__"]
