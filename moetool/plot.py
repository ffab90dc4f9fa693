"""Plots of a trace, drawn with matplotlib's object API (Figure + Agg canvas; no pyplot state).

`plot_trace(report, path)`: a layer x expert load heatmap (share of the layer's assignments) and a
token x layer map of each token's first-choice expert. `.png` or `.svg` by the file name.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def plot_trace(report: Any, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    from .errors import MoetoolError
    from .render import atomic_write_bytes

    if not path.endswith((".png", ".svg")):
        raise MoetoolError("--plot must name a .png or .svg file")
    layers = report.layers
    E, T = report.num_experts, len(report.tokens)
    load = np.array([l.metrics["load"] for l in layers], dtype=float)  # [L, E]
    share = load / np.maximum(load.sum(axis=1, keepdims=True), 1)
    first = np.array([[row[0] for row in l.experts] for l in layers]).T  # [T, L]

    fig = Figure(figsize=(max(8.0, 0.35 * E + 4), max(6.0, 0.22 * T + 0.35 * len(layers) + 2.5)), dpi=150,
                 layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[max(len(layers), 3), max(T, 4) * 0.6])
    ax = top.subplots()
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_title(f"{report.model_type}: each layer's share of assignments per expert\n"
                 f"(uniform = {1 / E:.3f}; {T} tokens, top-{report.top_k})", fontsize=9)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(layers)), [str(l.layer) for l in layers], fontsize=7)
    ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=6 if E > 32 else 7)
    top.colorbar(im, ax=ax, label="share")
    if E * len(layers) <= 256:
        for (i, j), v in np.ndenumerate(share):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if v > share.max() * 0.6 else "white")

    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    bx = bottom.subplots()
    base = colormaps["tab20"] if E <= 20 else colormaps["nipy_spectral"].resampled(E)
    cmap = ListedColormap([base(i) for i in range(E)])  # one colour per expert
    im2 = bx.imshow(first, aspect="auto", cmap=cmap, interpolation="nearest", vmin=-0.5, vmax=E - 0.5)
    if T * len(layers) <= 800:
        for (i, j), e in np.ndenumerate(first):
            bx.text(j, i, str(e), ha="center", va="center", fontsize=6)
    bx.set_title("first-choice expert of each token in each MoE layer", fontsize=9)
    bx.set_xlabel("MoE layer")
    bx.set_xticks(range(len(layers)), [str(l.layer) for l in layers], fontsize=7)
    labels = [repr(t.text)[1:-1][:12] + (" *" if t.generated else "") for t in report.tokens]
    bx.set_yticks(range(T), labels, fontsize=6 if T > 40 else 7)
    bottom.colorbar(im2, ax=bx, label="expert", ticks=range(0, E, max(1, E // 16)))
    if any(t.generated for t in report.tokens):
        bx.set_ylabel("token (* generated)")

    import io

    buf = io.BytesIO()
    canvas = FigureCanvasSVG(fig) if path.endswith(".svg") else FigureCanvasAgg(fig)
    if path.endswith(".svg"):
        canvas.print_svg(buf)
    else:
        canvas.print_png(buf)
    atomic_write_bytes(path, buf.getvalue())


def plot_quant(report: Any, path: str) -> None:
    """Layer x expert heatmap of the output error (mean over projections) for each 4-bit scheme."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    from .render import atomic_write_bytes

    routed = [r for r in report.rows if isinstance(r.expert, int)]
    layers = sorted({r.layer for r in routed})
    experts = sorted({r.expert for r in routed})
    shown = [s for s in report.schemes if report.schemes[s] < 6] or list(report.schemes)
    fig = Figure(figsize=(max(6.0, 0.3 * len(experts) + 3), 1.2 + 0.9 * len(shown) * max(1, len(layers)) ** 0.5 * 1.4),
                 dpi=150, layout="constrained")
    axes = fig.subplots(len(shown), 1, squeeze=False)[:, 0]
    for ax, s in zip(axes, shown):
        grid = np.full((len(layers), len(experts)), np.nan)
        acc: dict = {}
        for r in routed:
            if r.scheme == s:
                v = r.output_rel_error if r.output_rel_error is not None else r.rel_error
                acc.setdefault((r.layer, r.expert), []).append(v)
        for (l, e), vs in acc.items():
            grid[layers.index(l), experts.index(e)] = float(np.mean(vs))
        im = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(f"{s} ({report.schemes[s]:.2f} bits/weight): relative output error, mean over gate/up/down",
                     fontsize=8)
        ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
        ax.set_xticks(range(len(experts)), [str(e) for e in experts], fontsize=6)
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    axes[-1].set_xlabel("expert")
    import io

    buf = io.BytesIO()
    (FigureCanvasSVG(fig).print_svg if path.endswith(".svg") else FigureCanvasAgg(fig).print_png)(buf)
    atomic_write_bytes(path, buf.getvalue())
