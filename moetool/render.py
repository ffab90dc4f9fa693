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
import re
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


# Piped output is never wrapped or cut: the width a pipe gets unless COLUMNS says otherwise.
PIPE_WIDTH = 10_000
_capture: Optional[io.StringIO] = None  # set by `capture()`: the table view goes to a file (-o)


def stdout_console() -> Console:
    """The console of the data view: the terminal's width (COLUMNS honoured); a pipe or a file
    (`-o`) gets full-width lines unless COLUMNS is set."""
    from rich.console import Console

    if sys.stdout is None:
        _stdout_closed()
    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if columns.isdigit() and int(columns) > 0 else None
    if _capture is not None:
        return Console(file=_capture, highlight=False, soft_wrap=False, width=width or PIPE_WIDTH,
                       color_system=None)
    if width is None and not sys.stdout.isatty():
        width = PIPE_WIDTH
    return Console(file=_Stdout(), highlight=False, soft_wrap=False, width=width)


class StdoutClosed(Exception):
    """The reader of stdout went away (`moetool ... | head -1`): not an error, the CLI exits 0.
    (Not an OSError: typer turns a broken-pipe OSError into exit code 1.)"""


class _Stdout:
    """sys.stdout for rich, with write failures turned into StdoutClosed or one line (exit 2)."""

    def __getattr__(self, name):
        return getattr(sys.stdout, name)

    def write(self, text: str) -> int:
        return _guard_stdout(lambda: sys.stdout.write(text))

    def flush(self) -> None:
        _guard_stdout(sys.stdout.flush)


def _guard_stdout(op):
    try:
        return op()
    except BrokenPipeError:
        raise StdoutClosed() from None
    except OSError as e:
        from .errors import MoetoolError
        from .files import _reason

        raise MoetoolError(f"cannot write to stdout: {_reason(e)}") from None


def _stdout_closed() -> None:
    from .errors import MoetoolError

    raise MoetoolError("cannot write to stdout: it is closed; redirect it or use -o FILE")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def safe(s: str) -> str:
    """`s` with control characters escaped (\\n, \\x1b ...): a path holding terminal escape codes or
    a newline is shown, never obeyed or cut."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], s)


class capture:
    """`with capture() as buf:` the table view is rendered into `buf` (a StringIO) instead of
    stdout, plain text at full width: what `-o FILE` writes for the table format."""

    def __enter__(self) -> io.StringIO:
        global _capture
        self.prev, _capture = _capture, io.StringIO()
        return _capture

    def __exit__(self, *exc) -> bool:
        global _capture
        _capture = self.prev
        return False


def _plain_len(cell: str) -> int:
    from rich.text import Text

    return max((Text.from_markup(line).cell_len for line in cell.split("\n")), default=0)


def print_table(columns: list[tuple[str, str]], rows: list[list[str]], *, keys: int = 1, title: Optional[str] = None,
                caption: Optional[str] = None, header: bool = True, styles: Optional[dict[int, str]] = None,
                split: bool = True) -> None:
    """Print a table that never cuts a cell: when the columns do not fit the console width, the
    table is split into several, each repeating the first `keys` columns (`split=False`: the cells
    wrap instead); a column wider than the console on its own wraps (folds) instead of being
    truncated. `columns` are (header, justify)."""
    from rich.table import Table

    out = stdout_console()
    styles = styles or {}
    widths = [max([_plain_len(h) if header else 0] + [_plain_len(r[i]) for r in rows]) for i, (h, _) in enumerate(columns)]
    key_w = sum(widths[:keys]) + 2 * keys
    groups: list[list[int]] = []
    used = key_w
    for i in range(keys, len(columns)):
        if groups and (used + widths[i] <= out.width or not split):
            groups[-1].append(i)
            used += widths[i] + 2
        else:
            groups.append([i])
            used = key_w + widths[i] + 2
    if not groups:
        groups = [[]]
    for n, group in enumerate(groups):
        t = Table(box=None, pad_edge=False, header_style="bold", show_header=header, title_justify="left",
                  caption_justify="left", title=(title if n == 0 else None),
                  caption=(caption if n == len(groups) - 1 else None))
        idx = list(range(keys)) + group
        for i in idx:
            h, justify = columns[i]
            t.add_column(h, justify=justify, overflow="fold", style=styles.get(i))
        for r in rows:
            t.add_row(*(r[i] for i in idx))
        out.print(t)


def _styled_stderr() -> bool:
    """Whether rich would style stderr (a terminal, or colour forced); otherwise lines go out plain."""
    if os.environ.get("FORCE_COLOR") or os.environ.get("TTY_COMPATIBLE") == "1":
        return True
    return sys.stderr.isatty()


def info(msg: str) -> None:
    """A note for the person at the terminal, on stderr."""
    msg = safe(msg)
    if _styled_stderr():
        stderr_console().print(f"[dim]{_escape(msg)}[/dim]")
    else:
        _plain_stderr(msg)


def warn(msg: str) -> None:
    msg = safe(msg)
    if _styled_stderr():
        stderr_console().print(f"[yellow]warning:[/yellow] {_escape(msg)}")
    else:
        _plain_stderr(f"warning: {msg}")


def gate_failed(msg: str) -> None:
    """A failed gate on stderr: "gate failed: ...", never styled as a warning."""
    if _styled_stderr():
        stderr_console().print(f"[bold red]gate failed:[/bold red] {_escape(msg)}")
    else:
        _plain_stderr(f"gate failed: {msg}")


def _plain_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def error_line(msg: str) -> None:
    """One line, no markup interpretation, straight to stderr."""
    sys.stderr.write(f"moetool: error: {safe(msg) if msg else 'unknown error'}\n")
    sys.stderr.flush()


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(safe(s))


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
    write_stdout_bytes(text.encode())


def write_stdout_bytes(data: bytes) -> None:
    """Data to stdout. A closed pipe raises StdoutClosed (the CLI exits 0); any other write
    failure (stdout on a full disk or /dev/full) is one line, exit 2."""
    if sys.stdout is None:
        _stdout_closed()

    def write() -> None:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    _guard_stdout(write)


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


# --- reprs of result objects (short, whatever the size of the report) ---------------------------

def short_repr(name: str, items: list[tuple[str, Any]]) -> str:
    """`Name(key=value, ...)` of a few summary values: what a report shows at the REPL."""
    return f"{name}(" + ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in items) + ")"


def short_html(name: str, items: list[tuple[str, Any]]) -> str:
    """The same summary as a small HTML table, for notebooks (`_repr_html_`)."""
    import html

    rows = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in items)
    return f"<table><caption style='text-align:left'><b>{html.escape(name)}</b></caption>{rows}</table>"


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
    out = stdout_console()
    src = "safetensors headers (exact)" if r.counted_from == "headers" else "config.json (analytic)"
    if (r.quantization or "").startswith("gguf"):
        src = "GGUF header (exact)" if r.counted_from == "headers" else "GGUF metadata (analytic)"
    out.print(f"[bold]{_escape(r.model)}[/bold]  model_type={r.model_type}  counted from {src}")
    rows = [["total parameters", f"{r.total_params:,}", human_count(r.total_params)],
            ["active per token, incl. input embedding", f"{r.active_params:,}", human_count(r.active_params)],
            ["active per token, excl. input embedding", f"{r.active_params_excl_embedding:,}",
             human_count(r.active_params_excl_embedding)]]
    if r.mtp_params:
        rows.append(["MTP layers (stored, not in total)", f"{r.mtp_params:,}", human_count(r.mtp_params)])
    if r.num_experts:
        shared = f", {r.num_shared_experts} shared" if r.num_shared_experts else ""
        rows.append(["MoE", f"{r.num_experts} routed {plural(r.num_experts, 'expert', counted=False)}{shared}, "
                     f"top-{r.top_k}", f"{r.num_moe_layers} of {r.num_layers} layers"])
        rows.append(["one routed expert", f"{r.expert_params:,}", human_count(r.expert_params)])
    if r.tie_word_embeddings:
        rows.append(["embeddings", "tied: the one matrix is the LM head", ""])
    print_table([("", "left"), ("", "right"), ("", "right")], rows, header=False, styles={0: "bold", 2: "cyan"},
                split=False)

    rows = [[GROUP_LABELS.get(g, g), f"{v:,}", f"{100 * v / r.total_params:.2f}%"] for g, v in r.breakdown.items() if v]
    rows.append(["[bold]total[/bold]", f"[bold]{r.total_params:,}[/bold]", "100.00%"])
    print_table([("group", "left"), ("parameters", "right"), ("share", "right")], rows,
                title="Breakdown (sums to total)")

    rows = []
    if r.bytes_stored is not None:
        rows.append(["as stored", human_bytes(r.bytes_stored), ""])
    if getattr(r, "bytes_declared", None) is not None:
        rows.append([f"as declared ({r.declared_storage})", human_bytes(r.bytes_declared), ""])
    rows += [[f, human_bytes(v), human_bytes(r.offload_bytes[f])] for f, v in r.weights_bytes.items()]
    print_table([("format", "left"), ("all weights", "right"), ("non-expert + top-k experts", "right")], rows,
                title="Memory of the weights",
                caption="formats apply to linear weights; embeddings, head, routers and norms stay bf16")
    kv = r.kv_cache
    state = f" (of which fixed state {human_bytes(kv['state_bytes'])})" if kv["state_bytes"] else ""
    out.print(f"[bold]KV cache[/bold] at context {kv['context']:,}, batch {kv['batch']:,}, {kv['dtype']}: "
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
            out.print(f"  stored but not counted: {plural(s['tensors'], 'tensor')}, {s['elements']:,} elements, "
                      f"{human_bytes(s['bytes'])}: {_escape(s['cause'])}")
    if per_layer:
        # "mixer params": attention, or the Mamba / linear-attention mixer of hybrid models (Jamba, Qwen3-Next)
        cols = [("layer", "right"), ("mixer", "left"), ("ffn", "left"), ("mixer params", "right"), ("router", "right"),
                ("routed experts", "right"), ("shared", "right"), ("dense MLP", "right"), ("norms", "right"),
                ("total", "right"), ("active", "right")]
        rows = [[str(l.layer), l.mixer, "MoE" if l.moe else "dense", f"{l.attention:,}", f"{l.router:,}",
                 f"{l.routed_experts:,}", f"{l.shared_experts:,}", f"{l.dense_mlp:,}", f"{l.norms:,}",
                 f"{l.total:,}", f"{l.active:,}"] for l in r.per_layer]
        print_table(cols, rows, title="Per layer")
    for n in r.notes:
        info(n)


def plural(n: int, word: str, counted: bool = True) -> str:
    """'1 expert', '2 experts' (`counted=False`: the word alone, agreeing with n)."""
    w = word if n == 1 else word + "s"
    return f"{n:,} {w}" if counted else w


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
    """Write `data` to `path` (files.write_output: atomic for regular files, in place for devices
    and FIFOs, one-line errors)."""
    from .files import write_output

    write_output(path, data)


# --- trace ------------------------------------------------------------------------------------

def render_trace(t, per_token: bool = True) -> None:
    """Per-token view: one row per token, one column per MoE layer, experts best first (the table
    splits into several, each repeating the token columns, when the layers do not fit the width);
    then the routing metrics."""
    out = stdout_console()
    out.print(f"[bold]{_escape(t.model)}[/bold]  model_type={t.model_type}  {plural(len(t.tokens), 'token')}, "
              f"{plural(len(t.layers), 'MoE layer')}, {plural(t.num_experts, 'expert')}, top-{t.top_k}  "
              f"({t.dtype}, {t.device})")
    for n in getattr(t, "notes", ()):
        out.print(f"[yellow]note[/yellow]: {_escape(n)}")
    if per_token:
        generated = any(tok.generated for tok in t.tokens)
        cols = [("#", "right"), ("token", "left")] + [(f"L{l.layer}", "left") for l in t.layers]
        rows = []
        for i, tok in enumerate(t.tokens):
            cells = []
            for l in t.layers:
                es, ws = l.experts[i], l.weights[i]
                rest = " ".join(str(e) for e in es[1:])
                cells.append(f"[bold]{es[0]}[/bold] {rest}".rstrip() + f" [dim]{ws[0]:.2f}[/dim]")
            label = _escape(repr(tok.text)[1:-1])
            rows.append([str(i) + ("*" if tok.generated else ""), label, *cells])
        print_table(cols, rows, keys=2, styles={0: "dim"})
        bold = " (first choice bold)" if out.is_terminal and out.color_system else ""
        out.print("[dim]each cell: the token's experts best first" + bold + ", then the first choice's gate weight"
                  + ("; * after the index marks generated tokens" if generated else "") + "[/dim]")
    render_metrics(t.layers, t.summary, t.num_experts, t.top_k, title="Routing metrics per MoE layer")


def _f(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render_metrics(layers, summary: dict, num_experts: int, top_k: int, title: str) -> None:
    """The per-layer table of the main routing metrics and a summary line (docs/metrics.md)."""
    out = stdout_console()
    cols = ["layer", "max/mean", "MaxVio", "CV", "Gini", "H(load)", "dead", "cold", "bal.loss", "H(router)",
            "top-k mass", "near-tie", "reuse1", "NMI", "drop"]
    rows = []
    for l in layers:
        m = l.metrics if hasattr(l, "metrics") else l["metrics"]
        layer = l.layer if hasattr(l, "layer") else l["layer"]
        rows.append([str(layer), _f(m["max_mean_ratio"]), _f(m["maxvio"]), _f(m["cv"]), _f(m["gini"]),
                     _f(m["load_entropy_norm"]), str(m["dead_count"]), str(m["cold_count"]),
                     _f(m["switch_balance_loss"]), _f(m["router_entropy_mean"]), _f(m["topk_mass_mean"]),
                     _f(m["near_tie_rate"]), _f(m["reuse_first_choice"]), _f(m["transition_nmi"]), _f(m["drop_rate"])])
    print_table([(c, "right") for c in cols], rows, title=title)
    s = summary
    chance = 1 / num_experts
    dead = int(s['dead_count']['max'] or 0)
    out.print(f"[bold]summary[/bold]: max/mean {_f(s['max_mean_ratio']['mean'])} (worst {_f(s['max_mean_ratio']['max'])} "
              f"at layer {s['max_mean_ratio']['worst_layer']}), load entropy {_f(s['load_entropy_norm']['mean'])} "
              f"(lowest {_f(s['load_entropy_norm']['min'])} at layer {s['load_entropy_norm']['worst_layer']}), "
              f"{plural(dead, 'dead expert')} at most, first-choice reuse "
              f"{_f(s['reuse_first_choice']['mean'])} vs chance {chance:.2f}")
    small = [m for m in (l.metrics if hasattr(l, "metrics") else l["metrics"] for l in layers)
             if m.get("dead_judgeable") is False]
    if small:
        from .metrics import sample_adequacy

        need = sample_adequacy(small[0]["tokens"], num_experts, top_k)["min_tokens_dead"]
        out.print(f"[yellow]note[/yellow]: {plural(small[0]['tokens'], 'token')} are too few to tell a dead expert from chance "
                  f"(top-{top_k} of {num_experts}: {small[0]['dead_expected_by_chance']:.1f} experts expected unused "
                  f"by chance; need >= {need} tokens); --max-dead-experts ignores such layers")


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
    out = stdout_console()
    out.print(f"[bold]diff[/bold] {_escape(d.a)} -> {_escape(d.b)}: {plural(d.tokens, 'token')}, {plural(len(d.layers), 'MoE layer')}")
    rows = []
    for l in d.layers:
        ties = "-" if l["changes_on_near_ties"] is None else f"{len(l['changes_on_near_ties'])} of {len(l['changed_tokens'])}"
        rows.append([str(l["layer"]), f"{l['first_choice_changed']:.3f}", f"{l['expert_set_changed']:.3f}",
                     f"{l['load_tv']:.3f}", ties])
    print_table([(c, "right") for c in ("layer", "first choice changed", "expert set changed", "load TV",
                                        "changes on near ties")], rows)
    s = d.summary
    out.print(f"[bold]summary[/bold]: first choice changed {s['first_choice_changed']['mean']:.3f} on average "
              f"(worst {s['first_choice_changed']['max']:.3f} at layer {s['first_choice_changed']['worst_layer']}); "
              + ("near ties unknown: trace both with --logits" if s["changes_on_near_ties"] is None
                 else f"{s['changes_on_near_ties']} of {s['changed_assignments']} changes sit on near ties"))


def render_quant(r) -> None:
    out = stdout_console()
    out.print(f"[bold]{_escape(r.model)}[/bold]  model_type={r.model_type}  "
              + (f"calibration tokens {r.calibration_tokens:,}" if r.calibration_tokens
                 else "weight space only (no calibration forward)"))
    cols = [(c, "right" if c != "scheme" else "left") for c in
            ("scheme", "bits/weight", "rel. error (mean)", "SQNR dB (mean)", "output error (mean)", "output error (worst)")]
    table = []
    for s, b in r.schemes.items():
        rows = [x for x in r.rows if x.scheme == s and isinstance(x.expert, int)]
        outs = [x.output_rel_error for x in rows if x.output_rel_error is not None]
        table.append([s, f"{b:.3f}", f"{sum(x.rel_error for x in rows) / len(rows):.4f}",
                      f"{sum(x.sqnr_db for x in rows) / len(rows):.1f}",
                      f"{sum(outs) / len(outs):.4f}" if outs else "-", f"{max(outs):.4f}" if outs else "-"])
    print_table(cols, table, title="Schemes: bits per weight (scales included) and error over routed experts")
    for s in r.schemes:
        w = r.worst(s, 5)
        cells = ", ".join(f"L{x.layer} E{x.expert} {x.projection} "
                          f"{(x.output_rel_error if x.output_rel_error is not None else x.rel_error):.4f}"
                          + (" (few tokens)" if x.low_calibration else "") for x in w)
        out.print(f"[bold]most sensitive under {s}[/bold]: {cells}")
    low = sorted({(x.layer, x.expert) for x in r.rows if x.low_calibration})
    if low:
        out.print(f"[yellow]{plural(len(low), 'expert')} saw fewer than 16 calibration tokens[/yellow]: their output errors are "
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
