"""moetool: analyse Mixture-of-Experts checkpoints.

Library first: every command is one call that returns a report with `to_dict()` and
`to_dataframe()`.

Example:
    >>> import moetool
    >>> moetool.count("mixtral-8x7b").total_params
    46702792704
"""

from __future__ import annotations

__version__ = "0.1.0"


def count(model, **kwargs):
    """Total vs active parameters, memory, KV cache and FLOPs of MODEL; see `moetool.count.count`."""
    from .counting import count as _count

    return _count(model, **kwargs)


def trace(prompt=None, **kwargs):
    """Run the reference forward on `prompt` and record router decisions; see `moetool.tracing.trace`."""
    from .tracing import trace as _trace

    return _trace(prompt, **kwargs)


def quantize_report(model=None, **kwargs):
    """Per-expert quantization sensitivity and a plan; see `moetool.quant.report.quantize_report`."""
    from .quant.report import quantize_report as _quantize_report

    return _quantize_report(model, **kwargs)


__all__ = ["count", "trace", "quantize_report", "__version__"]
