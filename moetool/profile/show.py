"""Reading a profile: the per-layer table, hottest and coldest experts, and plots that stay
readable at 256+ experts and many layers (continuous colour maps, no per-expert colours, capped
figure size, co-activation shown for at most 12 evenly spaced layers).
"""

from __future__ import annotations

import io
import numpy as np

from ..errors import MoetoolError

MAX_COACT_PANELS = 12


def render_profile(summary: dict, stats=None, top: int = 3) -> None:
    from ..render import _escape, render_metrics, stdout_console

    out = stdout_console()
    E, K, T = summary["num_experts"], summary["top_k"], summary["tokens"]
    out.print(f"[bold]{_escape(summary['model'])}[/bold]  model_type={summary['model_type']}  {T:,} tokens in "
              f"{summary['prompts']:,} prompts, {len(summary['layers'])} MoE layers, {E} experts, top-{K}")
    render_metrics(summary["layers"], summary["summary"], E, K, title="Routing metrics per MoE layer (whole corpus)")
    s = summary["sample"]
    notes = []
    if T < s["min_tokens_load_5pct"]:
        notes.append(f"per-expert loads need ~{s['min_tokens_load_5pct']:,} tokens for a 5% relative error")
    if s["min_tokens_pairs_5pct"] and T < s["min_tokens_pairs_5pct"]:
        notes.append(f"co-activation pair counts need ~{s['min_tokens_pairs_5pct']:,}")
    if notes:
        out.print(f"[yellow]note[/yellow]: {T:,} tokens is a small sample: " + "; ".join(notes) + " (docs/profile.md)")
    from rich.table import Table

    table = Table(title=f"Hottest and coldest experts (share of the layer's assignments; uniform = {1 / E:.4f})",
                  title_justify="left", box=None, pad_edge=False, header_style="bold")
    for c in ("layer", "hottest", "coldest"):
        table.add_column(c, justify="right" if c == "layer" else "left")
    for l in summary["layers"]:
        load = np.array(l["load"], dtype=float)
        share = load / max(load.sum(), 1)
        order = np.argsort(-share, kind="stable")
        fmt = lambda idx: "  ".join(f"{int(e)}:{share[e]:.3f}" for e in idx)
        table.add_row(str(l["layer"]), fmt(order[:top]), fmt(order[::-1][:top]))
    out.print(table)
    if summary.get("domains") and stats is not None:
        out.print(f"domains: {', '.join(d or '(none)' for d in summary['domains'])}")


def plot_profile(stats, path: str) -> None:
    """One figure: layer x expert load share, domain x expert share (pooled over layers), and the
    co-activation lift of up to 12 evenly spaced layers (log2 colour scale, diverging at 1)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    from ..render import atomic_write_bytes

    if not path.endswith((".png", ".svg")):
        raise MoetoolError("--plot must name a .png or .svg file")
    layers = list(stats.layers)
    E = stats.num_experts
    load = np.array([stats.layers[l].load for l in layers], dtype=float)
    share = load / np.maximum(load.sum(axis=1, keepdims=True), 1)
    domains = stats.meta["domains"]
    picks = [layers[i] for i in np.unique(np.linspace(0, len(layers) - 1, min(MAX_COACT_PANELS, len(layers))).round()
                                          .astype(int))] if stats.top_k > 1 else []
    ncol = min(4, max(len(picks), 1))
    nrow_c = -(-len(picks) // ncol) if picks else 0
    fig = Figure(figsize=(14, 4 + 2.5 * bool(domains) + 3.2 * nrow_c), dpi=110, layout="constrained")
    rows = [3.0] + ([2.0] if domains else []) + ([3.0 * nrow_c] if picks else [])
    sub = fig.subfigures(len(rows), 1, height_ratios=rows) if len(rows) > 1 else [fig]
    title = stats.meta["model"] or stats.meta["model_type"]
    ax = sub[0].subplots()
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_title(f"{title}: share of each MoE layer's assignments per expert "
                 f"(uniform = {1 / E:.4f}; {stats.tokens:,} tokens, top-{stats.top_k})", fontsize=9)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    step = max(1, len(layers) // 24)
    ax.set_yticks(range(0, len(layers), step), [str(l) for l in layers[::step]], fontsize=7)
    sub[0].colorbar(im, ax=ax, label="share")
    k = 1
    if domains:
        dl = np.array([[sum(stats.layers[l].domain_load[d][e] for l in layers) for e in range(E)] for d in domains],
                      dtype=float)
        dshare = dl / np.maximum(dl.sum(axis=1, keepdims=True), 1) * E  # 1 = the domain's uniform share
        dx = sub[1].subplots()
        im = dx.imshow(dshare, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(1.0, 0.0, max(2.0, dshare.max())),
                       interpolation="nearest")
        dx.set_title("domain x expert: share of the domain's assignments over uniform (all MoE layers pooled)",
                     fontsize=9)
        dx.set_yticks(range(len(domains)), [d or "(none)" for d in domains], fontsize=7)
        dx.set_xlabel("expert")
        sub[1].colorbar(im, ax=dx, label="share x E")
        k = 2
    if picks:
        panels = list(np.atleast_1d(sub[k].subplots(nrow_c, ncol)).ravel())
        lifts = []
        for l in picks:
            s = stats.layers[l]
            with np.errstate(divide="ignore", invalid="ignore"):
                lift = s.coact * max(s.tokens, 1) / np.outer(s.load, s.load)
            lifts.append(np.log2(np.where(lift > 0, lift, np.nan)))  # never co-chosen: blank
        finite = [np.nanmax(np.abs(x)) for x in lifts if np.isfinite(x).any()]
        lim = max([1.0] + [float(v) for v in finite])  # one colour scale for every panel
        for a, l, lg in zip(panels, picks, lifts):
            im = a.imshow(lg, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            a.set_title(f"layer {l}: co-activation log2 lift", fontsize=8)
            a.tick_params(labelsize=6)
        for a in panels[len(picks):]:
            a.set_axis_off()
        sub[k].colorbar(im, ax=panels, label="log2(count / independent)", shrink=0.6)
    buf = io.BytesIO()
    if path.endswith(".svg"):
        FigureCanvasSVG(fig).print_svg(buf)
    else:
        FigureCanvasAgg(fig).print_png(buf)
    atomic_write_bytes(path, buf.getvalue())
