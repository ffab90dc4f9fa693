"""The only module that prints. Data goes to stdout (rich tables, or JSON / CSV written raw);
progress, notes and errors go to stderr.

JSON is `json.dumps(..., allow_nan=False)` straight to stdout (never through rich's wrapping
printer), NaN / inf turned into null first; integers stay integers.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterable, Optional

if TYPE_CHECKING:
    from rich.console import Console

# rich is imported where a table or a styled line is drawn, not at import: JSON / CSV output and
# notes to a pipe do without it (about 40 ms of every `moetool count --json`).


@lru_cache(maxsize=None)
def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def stdout_console() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 120)


def _styled_stderr() -> bool:
    """Whether rich would style stderr (a terminal, or colour forced); otherwise lines go out plain."""
    if os.environ.get("FORCE_COLOR") or os.environ.get("TTY_COMPATIBLE") == "1":
        return True
    return sys.stderr.isatty()


def info(msg: str) -> None:
    """A note for the person at the terminal, on stderr."""
    if _styled_stderr():
        stderr_console().print(f"[dim]{_escape(msg)}[/dim]")
    else:
        _plain_stderr(msg)


def warn(msg: str) -> None:
    if _styled_stderr():
        stderr_console().print(f"[yellow]warning:[/yellow] {_escape(msg)}")
    else:
        _plain_stderr(f"warning: {msg}")


def _plain_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def error_line(msg: str) -> None:
    """One line, no markup interpretation, straight to stderr."""
    sys.stderr.write(f"moetool: error: {msg.splitlines()[0] if msg else 'unknown error'}\n")
    sys.stderr.flush()


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def clean(obj: Any) -> Any:
    """NaN / inf -> None, tuples -> lists, recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def to_json(obj: Any) -> str:
    return json.dumps(clean(obj), allow_nan=False, indent=2, ensure_ascii=False) + "\n"


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def to_jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(clean(r), allow_nan=False, ensure_ascii=False) + "\n" for r in rows)


def to_csv(rows: Iterable[dict[str, Any]]) -> str:
    rows = list(rows)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in clean(r).items()})
    return buf.getvalue()


# --- human formatting -------------------------------------------------------------------------

def human_count(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def human_flops(n: int) -> str:
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("KFLOP", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} FLOP"


# --- count ------------------------------------------------------------------------------------

GROUP_LABELS = {
    "embedding": "input embedding", "attention": "attention", "ssm": "Mamba (SSM)", "router": "routers",
    "routed_experts": "routed experts", "shared_experts": "shared experts", "dense_mlp": "dense MLP",
    "norms": "norms", "lm_head": "LM head", "vision": "vision tower", "audio": "audio tower", "mtp": "MTP layers", "other": "unplaced tensors",
}


def render_count(r, per_layer: bool = False) -> None:
    """The terminal view of a CountReport."""
    from rich.table import Table

    out = stdout_console()
    src = "safetensors headers (exact)" if r.counted_from == "headers" else "config.json (analytic)"
    out.print(f"[bold]{_escape(r.model)}[/bold]  model_type={r.model_type}  counted from {src}")
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_column(justify="right", style="cyan")
    t.add_row("total parameters", f"{r.total_params:,}", human_count(r.total_params))
    t.add_row("active per token, incl. input embedding", f"{r.active_params:,}", human_count(r.active_params))
    t.add_row("active per token, excl. input embedding", f"{r.active_params_excl_embedding:,}",
              human_count(r.active_params_excl_embedding))
    if r.mtp_params:
        t.add_row("MTP layers (stored, not in total)", f"{r.mtp_params:,}", human_count(r.mtp_params))
    if r.num_experts:
        shared = f", {r.num_shared_experts} shared" if r.num_shared_experts else ""
        t.add_row("MoE", f"{r.num_experts} routed experts{shared}, top-{r.top_k}",
                  f"{r.num_moe_layers} of {r.num_layers} layers")
        t.add_row("one routed expert", f"{r.expert_params:,}", human_count(r.expert_params))
    if r.tie_word_embeddings:
        t.add_row("embeddings", "tied: the one matrix is the LM head", "")
    out.print(t)

    b = Table(title="Breakdown (sums to total)", title_justify="left", box=None, pad_edge=False)
    b.add_column("group")
    b.add_column("parameters", justify="right")
    b.add_column("share", justify="right")
    for g, v in r.breakdown.items():
        if v:
            b.add_row(GROUP_LABELS.get(g, g), f"{v:,}", f"{100 * v / r.total_params:.2f}%")
    b.add_row("[bold]total[/bold]", f"[bold]{r.total_params:,}[/bold]", "100.00%")
    out.print(b)

    m = Table(title="Memory of the weights", title_justify="left", box=None, pad_edge=False,
              caption="formats apply to linear weights; embeddings, head, routers and norms stay bf16",
              caption_justify="left")
    m.add_column("format")
    m.add_column("all weights", justify="right")
    m.add_column("non-expert + top-k experts", justify="right")
    if r.bytes_stored is not None:
        m.add_row("as stored", human_bytes(r.bytes_stored), "")
    for f, v in r.weights_bytes.items():
        m.add_row(f, human_bytes(v), human_bytes(r.offload_bytes[f]))
    out.print(m)
    kv = r.kv_cache
    state = f" (of which fixed state {human_bytes(kv['state_bytes'])})" if kv["state_bytes"] else ""
    out.print(f"[bold]KV cache[/bold] at context {kv['context']:,}, batch {kv['batch']}, {kv['dtype']}: "
              f"{human_bytes(kv['bytes'])}{state}; {human_bytes(kv['bytes_per_token'])} per token before windows; "
              f"serving total {human_bytes(kv['serve_bytes'])} (weights {kv['serve_weights_from']})")
    fl = r.flops_per_token
    out.print(f"[bold]FLOPs per token[/bold] at context {fl['context']:,}: {human_flops(fl['total'])} "
              f"(matmuls {human_flops(fl['matmul'])}, attention {human_flops(fl['attention'])})")
    cc = r.cross_check
    if cc["available"]:
        if cc["match"]:
            out.print(f"[green]cross-check:[/green] config.json and the headers agree on every group "
                      f"({cc['analytic_total']:,})")
        else:
            out.print("[yellow]cross-check:[/yellow] config.json and the headers differ:")
            for d in cc["differences"]:
                out.print(f"  {GROUP_LABELS.get(d['group'], d['group'])}: config {d['analytic']:,}, "
                          f"headers {d['headers']:,}: {_escape(d['cause'])}")
        for s in cc["stored_not_counted"]:
            out.print(f"  stored but not counted: {s['tensors']} tensors, {s['elements']:,} elements, "
                      f"{human_bytes(s['bytes'])}: {_escape(s['cause'])}")
    if per_layer:
        p = Table(title="Per layer", title_justify="left", box=None, pad_edge=False)
        for c in ("layer", "mixer", "ffn", "attention", "router", "routed experts", "shared", "dense MLP", "norms",
                  "total", "active"):
            p.add_column(c, justify="right" if c not in ("mixer", "ffn") else "left")
        for l in r.per_layer:
            p.add_row(str(l.layer), l.mixer, "MoE" if l.moe else "dense", f"{l.attention:,}", f"{l.router:,}",
                      f"{l.routed_experts:,}", f"{l.shared_experts:,}", f"{l.dense_mlp:,}", f"{l.norms:,}",
                      f"{l.total:,}", f"{l.active:,}")
        out.print(p)
    for n in r.notes:
        info(n)


def count_csv(r, per_layer: bool) -> str:
    if per_layer:
        from dataclasses import asdict

        return to_csv(asdict(l) for l in r.per_layer)
    rows = [
        {"metric": "total_params", "value": r.total_params},
        {"metric": "active_params", "value": r.active_params},
        {"metric": "active_params_excl_embedding", "value": r.active_params_excl_embedding},
        {"metric": "mtp_params", "value": r.mtp_params},
        {"metric": "num_experts", "value": r.num_experts},
        {"metric": "top_k", "value": r.top_k},
        {"metric": "num_moe_layers", "value": r.num_moe_layers},
        {"metric": "expert_params", "value": r.expert_params},
        {"metric": "bytes_stored", "value": r.bytes_stored},
    ]
    rows += [{"metric": f"breakdown.{g}", "value": v} for g, v in r.breakdown.items()]
    rows += [{"metric": f"weights_bytes.{f}", "value": v} for f, v in r.weights_bytes.items()]
    rows += [{"metric": f"offload_bytes.{f}", "value": v} for f, v in r.offload_bytes.items()]
    rows += [{"metric": "kv_cache_bytes", "value": r.kv_cache["bytes"]},
             {"metric": "flops_per_token", "value": r.flops_per_token["total"]}]
    return to_csv(rows)


def debug_enabled() -> bool:
    return os.environ.get("MOETOOL_DEBUG", "") not in ("", "0")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory and a rename: a failure
    leaves no partial file and never clobbers an existing one."""
    import tempfile

    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        from .errors import MoetoolError

        raise MoetoolError(f"{path}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".moetool-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --- trace ------------------------------------------------------------------------------------

def render_trace(t, layers_per_table: int = 12) -> None:
    """Per-token view: one row per token, one column per MoE layer, experts best first."""
    from rich.table import Table

    out = stdout_console()
    out.print(f"[bold]{_escape(t.model)}[/bold]  model_type={t.model_type}  {len(t.tokens)} tokens, "
              f"{len(t.layers)} MoE layers, {t.num_experts} experts, top-{t.top_k}  ({t.dtype}, {t.device})")
    for start in range(0, len(t.layers), layers_per_table):
        chunk = t.layers[start:start + layers_per_table]
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("#", justify="right", style="dim")
        table.add_column("token", no_wrap=True, max_width=18)
        for l in chunk:
            table.add_column(f"L{l.layer}", justify="left", no_wrap=True)
        for i, tok in enumerate(t.tokens):
            cells = []
            for l in chunk:
                es, ws = l.experts[i], l.weights[i]
                first = f"[bold]{es[0]}[/bold]"
                rest = " ".join(str(e) for e in es[1:])
                cells.append(f"{first} {rest}".rstrip() + f" [dim]{ws[0]:.2f}[/dim]")
            table.add_row(str(i), _escape(repr(tok.text)[1:-1]), *cells)
        out.print(table)
    out.print("[dim]each cell: the token's experts best first (first choice bold), then the first choice's gate weight"
              + ("; * marks generated tokens" if any(tok.generated for tok in t.tokens) else "") + "[/dim]")
    render_metrics(t.layers, t.summary, t.num_experts, t.top_k, title="Routing metrics per MoE layer")


def _f(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render_metrics(layers, summary: dict, num_experts: int, top_k: int, title: str) -> None:
    """The per-layer table of the main routing metrics and a summary line (docs/metrics.md)."""
    from rich.table import Table

    out = stdout_console()
    table = Table(title=title, title_justify="left", box=None, pad_edge=False, header_style="bold")
    cols = ["layer", "max/mean", "MaxVio", "CV", "Gini", "H(load)", "dead", "cold", "bal.loss", "H(router)",
            "top-k mass", "near-tie", "reuse1", "NMI", "drop"]
    for c in cols:
        table.add_column(c, justify="right")
    for l in layers:
        m = l.metrics if hasattr(l, "metrics") else l["metrics"]
        layer = l.layer if hasattr(l, "layer") else l["layer"]
        table.add_row(str(layer), _f(m["max_mean_ratio"]), _f(m["maxvio"]), _f(m["cv"]), _f(m["gini"]),
                      _f(m["load_entropy_norm"]), str(m["dead_count"]), str(m["cold_count"]),
                      _f(m["switch_balance_loss"]), _f(m["router_entropy_mean"]), _f(m["topk_mass_mean"]),
                      _f(m["near_tie_rate"]), _f(m["reuse_first_choice"]), _f(m["transition_nmi"]), _f(m["drop_rate"]))
    out.print(table)
    s = summary
    chance = 1 / num_experts
    out.print(f"[bold]summary[/bold]: max/mean {_f(s['max_mean_ratio']['mean'])} (worst {_f(s['max_mean_ratio']['max'])} "
              f"at layer {s['max_mean_ratio']['worst_layer']}), load entropy {_f(s['load_entropy_norm']['mean'])} "
              f"(lowest {_f(s['load_entropy_norm']['min'])} at layer {s['load_entropy_norm']['worst_layer']}), "
              f"dead experts {int(s['dead_count']['max'] or 0)} at most, first-choice reuse "
              f"{_f(s['reuse_first_choice']['mean'])} vs chance {chance:.2f}")


def render_corpus(c) -> None:
    render_metrics(c.layers, c.summary, c.prompts[0].num_experts, c.prompts[0].top_k,
                   title=f"Corpus-level routing metrics ({len(c.prompts)} prompts pooled)")
    seq = c.sequence_level
    stdout_console().print(f"[bold]sequence-level[/bold] (mean of per-prompt means): max/mean "
                           f"{_f(seq.get('max_mean_ratio'))}, MaxVio {_f(seq.get('maxvio'))}, load entropy "
                           f"{_f(seq.get('load_entropy_norm'))}; corpus-level: max/mean "
                           f"{_f(c.summary['max_mean_ratio']['mean'])}, MaxVio {_f(c.summary['maxvio']['mean'])}, "
                           f"load entropy {_f(c.summary['load_entropy_norm']['mean'])}")


def render_diff(d) -> None:
    from rich.table import Table

    out = stdout_console()
    out.print(f"[bold]diff[/bold] {_escape(d.a)} -> {_escape(d.b)}: {d.tokens} tokens, {len(d.layers)} MoE layers")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for c in ("layer", "first choice changed", "expert set changed", "load TV", "changes on near ties"):
        table.add_column(c, justify="right")
    for l in d.layers:
        ties = "-" if l["changes_on_near_ties"] is None else f"{len(l['changes_on_near_ties'])} of {len(l['changed_tokens'])}"
        table.add_row(str(l["layer"]), f"{l['first_choice_changed']:.3f}", f"{l['expert_set_changed']:.3f}",
                      f"{l['load_tv']:.3f}", ties)
    out.print(table)
    s = d.summary
    out.print(f"[bold]summary[/bold]: first choice changed {s['first_choice_changed']['mean']:.3f} on average "
              f"(worst {s['first_choice_changed']['max']:.3f} at layer {s['first_choice_changed']['worst_layer']}); "
              + ("near ties unknown: trace both with --logits" if s["changes_on_near_ties"] is None
                 else f"{s['changes_on_near_ties']} of {s['changed_assignments']} changes sit on near ties"))


def render_quant(r) -> None:
    from rich.table import Table

    out = stdout_console()
    out.print(f"[bold]{_escape(r.model)}[/bold]  model_type={r.model_type}  calibration tokens {r.calibration_tokens}")
    t = Table(title="Schemes: bits per weight (scales included) and error over routed experts", title_justify="left",
              box=None, pad_edge=False, header_style="bold")
    for c in ("scheme", "bits/weight", "rel. error (mean)", "SQNR dB (mean)", "output error (mean)", "output error (worst)"):
        t.add_column(c, justify="right" if c != "scheme" else "left")
    for s, b in r.schemes.items():
        rows = [x for x in r.rows if x.scheme == s and isinstance(x.expert, int)]
        outs = [x.output_rel_error for x in rows if x.output_rel_error is not None]
        t.add_row(s, f"{b:.3f}", f"{sum(x.rel_error for x in rows) / len(rows):.4f}",
                  f"{sum(x.sqnr_db for x in rows) / len(rows):.1f}",
                  f"{sum(outs) / len(outs):.4f}" if outs else "-", f"{max(outs):.4f}" if outs else "-")
    out.print(t)
    for s in r.schemes:
        w = r.worst(s, 5)
        cells = ", ".join(f"L{x.layer} E{x.expert} {x.projection} "
                          f"{(x.output_rel_error if x.output_rel_error is not None else x.rel_error):.4f}"
                          + (" (few tokens)" if x.low_calibration else "") for x in w)
        out.print(f"[bold]most sensitive under {s}[/bold]: {cells}")
    low = sorted({(x.layer, x.expert) for x in r.rows if x.low_calibration})
    if low:
        out.print(f"[yellow]{len(low)} experts saw fewer than 16 calibration tokens[/yellow]: their output errors are "
                  "noisy; add --calibration text or --calibration-tokens")
    p = r.plan
    if p:
        pe, pl, u = p["per_expert"], p["per_layer"], p["uniform"]
        out.print(f"[bold]plan[/bold] at {p['budget_bits_per_weight']:.3f} bits per weight: one scheme per expert "
                  f"{pe['bits_per_weight']:.3f} bits, error {pe['error']:.4g}; one per layer and projection "
                  f"{pl['bits_per_weight']:.3f} bits, error {pl['error']:.4g} (+{100 * pl['constraint_cost']:.1f}%)"
                  + (f"; best uniform {u['scheme']} {u['bits_per_weight']:.3f} bits, error {u['error']:.4g}" if u else ""))
        counts: dict = {}
        for a in pe["assignments"]:
            counts[a["scheme"]] = counts.get(a["scheme"], 0) + 1
        out.print("  per-expert schemes: " + ", ".join(f"{s} x{n}" for s, n in sorted(counts.items())))
        kl = p.get("kl_check")
        if kl:
            out.print(f"  KL(full || quantized) on {kl['tokens']} held-out tokens: plan {kl['kl_plan']:.5f}"
                      + (f", uniform {kl['scheme_uniform']} {kl['kl_uniform']:.5f}" if "kl_uniform" in kl else ""))
