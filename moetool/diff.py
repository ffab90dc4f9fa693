"""`moetool diff A.json B.json`: compare two traces of the same tokens (a base model and its
fine-tune, float32 and bfloat16, two checkpoints of a run).

Per MoE layer: the share of tokens whose first choice changed, whose expert set changed, the
total-variation distance between the two load distributions, and which changes sit on near ties
(when the traces were made with `--logits`, so that margins are known).

Example:
    >>> d = diff_traces(json.load(open("base.json")), json.load(open("tuned.json")))   # doctest: +SKIP
    >>> d.layers[0]["first_choice_changed"]                                            # doctest: +SKIP
    0.125
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .errors import MoetoolError
from .metrics import NEAR_TIE

SCHEMA_VERSION = 1


@dataclass
class DiffReport:
    a: str
    b: str
    tokens: int
    layers: list[dict[str, Any]]
    summary: dict[str, Any]
    gate: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "command": "diff", "a": self.a, "b": self.b, "tokens": self.tokens,
                "layers": self.layers, "summary": self.summary, "gate": self.gate}


def load_trace(path: str) -> dict:
    from .files import read_text_bounded

    text = read_text_bounded(path, "trace")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, integers over 4300 digits
        raise MoetoolError(f"{path}: cannot read a trace ({_json_reason(e)})") from None
    if not isinstance(obj, dict) or obj.get("command") != "trace":
        raise MoetoolError(f"{path}: not a `moetool trace --json` report")
    if "prompts" in obj:
        raise MoetoolError(f"{path}: a many-prompt trace; diff compares single-prompt traces")
    if not isinstance(obj.get("tokens"), list) or not isinstance(obj.get("layers"), list):
        raise MoetoolError(f"{path}: trace has no tokens / layers")
    E = obj.get("num_experts")
    if type(E) is not int or not 0 < E <= 1 << 20:
        raise MoetoolError(f"{path}: num_experts must be a positive integer")
    if not all(isinstance(t, dict) for t in obj["tokens"]):
        raise MoetoolError(f"{path}: every token must be an object")
    for l in obj["layers"]:
        ok = isinstance(l, dict) and type(l.get("layer")) is int and isinstance(l.get("experts"), list) and all(
            isinstance(row, list) and row and all(type(e) is int and 0 <= e < E for e in row) for row in l["experts"])
        if not ok:
            raise MoetoolError(f"{path}: layer {l.get('layer') if isinstance(l, dict) else '?'!s}: expected "
                               f"{{layer, experts}} with expert ids in 0..{E - 1}")
        for key in ("margin", "selection_scores"):
            if key in l and not isinstance(l[key], list):
                raise MoetoolError(f"{path}: layer {l['layer']}: {key} must be a list")
    return obj


def _json_reason(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "JSON nested too deeply"
    return f"not valid JSON: {str(e).splitlines()[0][:100]}"


def diff_traces(a: dict, b: dict, a_name: str = "A", b_name: str = "B") -> DiffReport:
    ids_a = [t.get("id") for t in a["tokens"]]
    ids_b = [t.get("id") for t in b["tokens"]]
    if ids_a != ids_b:
        raise MoetoolError("the two traces are of different tokens; trace the same prompt with the same tokenizer "
                           "(or the same --tokens)")
    dec_a = [t.get("id") for t in a.get("decoder_tokens") or [] if isinstance(t, dict)]
    if dec_a != [t.get("id") for t in b.get("decoder_tokens") or [] if isinstance(t, dict)]:
        raise MoetoolError("the two traces have different decoder tokens; trace with the same --decoder-tokens")
    E = a.get("num_experts")
    if E != b.get("num_experts"):
        raise MoetoolError(f"the two traces have different numbers of experts ({E} vs {b.get('num_experts')})")
    key = lambda l: (l["layer"], l.get("kind", "ffn"))  # JetMoE: an attention router and an FFN router per layer
    layers_b = {key(l): l for l in b["layers"]}
    common = [l for l in a["layers"] if key(l) in layers_b]
    if not common:
        raise MoetoolError("the two traces share no MoE layer")
    out = []
    for la in common:
        lb = layers_b[key(la)]
        T = len(dec_a) if la.get("stack") == "decoder" else len(ids_a)  # encoder-decoder: the decoder's tokens
        ea, eb = la["experts"], lb["experts"]
        if len(ea) != T or len(eb) != T:
            raise MoetoolError(f"layer {la['layer']}: expert lists do not cover every token")
        first = [ea[t][0] != eb[t][0] for t in range(T)]
        sets = [set(ea[t]) != set(eb[t]) for t in range(T)]
        load_a = np.bincount([e for row in ea for e in row], minlength=E) / max(1, sum(len(r) for r in ea))
        load_b = np.bincount([e for row in eb for e in row], minlength=E) / max(1, sum(len(r) for r in eb))
        changed = [t for t in range(T) if sets[t] or first[t]]
        on_ties = _near_tie_changes(la, lb, changed)
        out.append({
            "layer": la["layer"],
            **({"kind": la["kind"]} if "kind" in la else {}),
            **({"stack": la["stack"]} if "stack" in la else {}),
            "first_choice_changed": float(np.mean(first)),
            "expert_set_changed": float(np.mean(sets)),
            "load_tv": float(0.5 * np.abs(load_a - load_b).sum()),
            "changed_tokens": changed,
            "changes_on_near_ties": on_ties,
        })
    summary = {}
    for k in ("first_choice_changed", "expert_set_changed", "load_tv"):
        vals = [l[k] for l in out]
        worst = max(out, key=lambda l: l[k])
        summary[k] = {"mean": float(np.mean(vals)), "max": float(max(vals)), "worst_layer": worst["layer"]}
    known = [l["changes_on_near_ties"] for l in out if l["changes_on_near_ties"] is not None]
    summary["changes_on_near_ties"] = sum(len(x) for x in known) if known else None
    summary["changed_assignments"] = sum(len(l["changed_tokens"]) for l in out)
    return DiffReport(a_name, b_name, len(ids_a), out, summary)


def _near_tie_changes(la: dict, lb: dict, changed: list[int]) -> Optional[list[int]]:
    """Changed tokens whose k / k+1 selection margin was a near tie in either trace (needs the
    `margin` and `selection_scores` of `moetool trace --logits`)."""
    ties = set()
    have = False
    for l in (la, lb):
        margin, scores = l.get("margin"), l.get("selection_scores")
        if margin is None or scores is None:
            continue
        have = True
        flat = np.array([v for row in scores for v in row if v is not None], dtype=float)
        scale = float(flat.std()) if flat.size > 1 else 0.0
        for t in changed:
            if t < len(margin) and margin[t] is not None and scale > 0 and margin[t] < NEAR_TIE * scale:
                ties.add(t)
    return sorted(ties) if have else None
