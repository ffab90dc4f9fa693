"""Gates: thresholds that turn a report into a pass / fail for CI (exit code 1 on failure).

Every report's JSON carries `gate: {enabled, passed, violations: [...]}` so scripts need not parse
exit codes; each violation names the metric, the value, the limit and (for per-layer metrics)
the layer. Thresholds are parsed strictly: finite numbers only, `nan` and `inf` refused.

Example:
    >>> parse_count("46.7B"), parse_fraction("0.5%")
    (46700000000.0, 0.005)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .errors import MoetoolError

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


@dataclass
class Gate:
    enabled: bool = False
    passed: bool = True
    violations: list[dict[str, Any]] = field(default_factory=list)

    def check(self, metric: str, value: Optional[float], limit: float, op: str, layer: Optional[int] = None,
              detail: str = "") -> None:
        """Record a violation when `value op limit` does not hold (op: "<=" or ">=")."""
        self.enabled = True
        if value is None:
            return
        ok = value <= limit if op == "<=" else value >= limit
        if not ok:
            self.passed = False
            v = {"metric": metric, "value": value, "limit": limit, "op": op}
            if layer is not None:
                v["layer"] = layer
            if detail:
                v["detail"] = detail
            self.violations.append(v)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(x: float, what: str) -> float:
    if not math.isfinite(x):
        raise MoetoolError(f"{what} must be a finite number, got {x}")
    return x


def parse_count(s: str, what: str = "count") -> float:
    """'46.7B', '12.9e9', '3.3M', '1234' -> float."""
    t = s.strip().replace(",", "").replace("_", "")
    mult = 1.0
    if t and t[-1].upper() in _SUFFIX:
        mult, t = _SUFFIX[t[-1].upper()], t[:-1]
    try:
        v = float(t) * mult
    except ValueError:
        raise MoetoolError(f"{what}: cannot read {s!r} as a count (e.g. 46.7B, 12.9e9, 3300000)") from None
    if _finite(v, what) < 0:
        raise MoetoolError(f"{what} must not be negative, got {s!r}")
    return v


def parse_fraction(s: str, what: str = "tolerance") -> float:
    """'0.5%' -> 0.005, '0.02' -> 0.02."""
    t = s.strip()
    pct = t.endswith("%")
    try:
        v = float(t[:-1] if pct else t) / (100 if pct else 1)
    except ValueError:
        raise MoetoolError(f"{what}: cannot read {s!r} (e.g. 0.5% or 0.005)") from None
    if _finite(v, what) < 0:
        raise MoetoolError(f"{what} must not be negative, got {s!r}")
    return v


def parse_bytes(s: str, what: str, minimum: int = 1) -> int:
    """'2GB' (10^9), '512MiB' (2^20), '1.5TB', '1e9', '1000000' -> bytes, at least `minimum`."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(s))
    if not m:
        raise MoetoolError(f"{what}: cannot read {s!r} as a size (e.g. 24GB, 24GiB, 512MB)")
    base = 1024 if m.group(3) else 1000
    n = float(m.group(1)) * base ** " KMGT".index((m.group(2) or " ").upper())
    if not math.isfinite(n) or n < minimum:
        raise MoetoolError(f"{what} must be at least {minimum} bytes, got {s!r}")
    return int(n)


def check_threshold(value: Optional[float], what: str) -> Optional[float]:
    if value is None:
        return None
    return _finite(float(value), what)


def count_gate(report, expect_total: Optional[str], expect_active: Optional[str], tolerance: str,
               expect_active_excl: Optional[str] = None) -> Gate:
    """`--expect-total`, `--expect-active` (active per token including the input embedding, as
    model cards publish it: Mixtral 8x7B 12.9B) and `--expect-active-excl-embedding`, within a
    relative `--tolerance`."""
    gate = Gate()
    tol = parse_fraction(tolerance, "--tolerance")
    for flag, wanted, actual, metric in (("--expect-total", expect_total, report.total_params, "total_params"),
                                         ("--expect-active", expect_active, report.active_params, "active_params"),
                                         ("--expect-active-excl-embedding", expect_active_excl,
                                          report.active_params_excl_embedding, "active_params_excl_embedding")):
        if wanted is None:
            continue
        target = parse_count(wanted, flag)
        gate.enabled = True
        drift = abs(actual - target) / target if target else float(actual != 0)
        if drift > tol:
            gate.passed = False
            gate.violations.append({"metric": metric, "value": actual, "expected": target, "tolerance": tol,
                                    "relative_error": drift})
    return gate


def trace_gate(summary: dict, layers: list[tuple[int, dict]], *, max_imbalance=None, max_maxvio=None,
               max_dead_experts=None, min_entropy=None) -> Gate:
    """Per-layer limits on a trace (or on a corpus' pooled layers): every violating layer is listed."""
    gate = Gate()
    limits = [("max_mean_ratio", check_threshold(max_imbalance, "--max-imbalance"), "<="),
              ("maxvio", check_threshold(max_maxvio, "--max-maxvio"), "<="),
              # dead experts count only where the sample can tell a dead expert from chance
              ("dead_significant_count", check_threshold(max_dead_experts, "--max-dead-experts"), "<="),
              ("load_entropy_norm", check_threshold(min_entropy, "--min-entropy"), ">=")]
    for metric, limit, op in limits:
        if limit is None:
            continue
        gate.enabled = True
        for layer, m in layers:
            value = m.get(metric, m.get("dead_count")) if metric == "dead_significant_count" else m.get(metric)
            gate.check(metric, value, limit, op, layer)
    return gate


def baseline_gate(gate: Gate, current: dict, baseline_path: Optional[str], max_drift: Optional[str]) -> Gate:
    """`--baseline OLD.json --max-drift 2%`: every comparable number (counts for `count`, the
    summary means for `trace`) may move by at most that relative amount."""
    if baseline_path is None:
        if max_drift is not None:
            raise MoetoolError("--max-drift needs --baseline OLD.json")
        return gate
    drift = parse_fraction(max_drift or "0%", "--max-drift")
    from .files import read_text_bounded

    text = read_text_bounded(baseline_path, "baseline")
    try:
        old = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, integers over 4300 digits
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:100]
        raise MoetoolError(f"{baseline_path}: cannot read the baseline (not valid JSON: {reason})") from None
    if not isinstance(old, dict) or old.get("command") != current.get("command"):
        raise MoetoolError(f"{baseline_path}: not a saved `moetool {current.get('command')} --json` report")
    gate.enabled = True
    for name, new_v, old_v in _comparable(current, old):
        if old_v is None or new_v is None:
            continue
        rel = abs(new_v - old_v) / abs(old_v) if old_v else float(new_v != old_v)
        if rel > drift:
            gate.passed = False
            gate.violations.append({"metric": name, "value": new_v, "baseline": old_v, "max_drift": drift,
                                    "relative_drift": rel})
    return gate


def _comparable(new: dict, old: dict):
    if new.get("command") == "count":
        for k in ("total_params", "active_params", "active_params_excl_embedding", "mtp_params"):
            yield k, new.get(k), old.get(k)
        return
    ns = (new.get("aggregate") or new).get("summary", {})
    os_ = (old.get("aggregate") or old).get("summary", {})
    for k, v in ns.items():
        if isinstance(v, dict) and isinstance(os_.get(k), dict):
            yield f"summary.{k}.mean", v.get("mean"), os_[k].get("mean")
