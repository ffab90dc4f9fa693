"""Plots of a trace, drawn with matplotlib's object API (Figure + Agg canvas; no pyplot state).

`plot_trace(report, path)`: the model's name as title; a layer x expert load heatmap (share of
the layer's assignments, one sequential colour scale, readable at 256 experts); then, for one
prompt, a token x layer map of each token's first choice (a categorical colour per expert only
up to 12 experts; past that the colour is the first choice's gate weight and the expert is
written in the cell while cells stay legible), or, for a corpus (`trace --file`, all prompts
pooled), each layer's expert shares sorted from the busiest expert down. The image is capped at
16 x 12 inches (1920 x 1440 px at 120 dpi), whatever the number of experts or tokens.
`.png` or `.svg` by the file name.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_W, MAX_H, DPI = 16.0, 12.0, 120  # inches, inches, dots per inch: the size cap
CATEGORICAL_MAX = 12  # experts that still get one distinguishable colour each


def plot_trace(report: Any, path: str) -> None:
    """Plot a TraceReport (one prompt) or a CorpusReport (many prompts, pooled)."""
    from matplotlib.figure import Figure

    from .errors import MoetoolError
    from .render import atomic_write_bytes

    if not path.endswith((".png", ".svg")):
        raise MoetoolError("--plot must name a .png or .svg file")
    corpus = hasattr(report, "prompts")
    first = report.prompts[0] if corpus else report
    E, k = first.num_experts, first.top_k
    if corpus:
        layer_ids = [l["layer"] for l in report.layers]
        load = np.array([l["metrics"]["load"] for l in report.layers], dtype=float)  # [L, E]
        T = sum(len(p.tokens) for p in report.prompts)
        what = f"{len(report.prompts)} prompts pooled, {T:,} tokens"
    else:
        ffn = [l for l in report.layers if l.kind == "ffn"]  # JetMoE's attention routers are not drawn
        layer_ids = [l.layer for l in ffn]
        load = np.array([l.metrics["load"] for l in ffn], dtype=float)
        T = len(report.tokens)
        what = f"{T:,} token{'s' if T != 1 else ''}"
    L = len(layer_ids)
    share = load / np.maximum(load.sum(axis=1, keepdims=True), 1)

    width = min(MAX_W, max(8.0, 0.25 * E + 3))
    top_h = min(5.0, max(2.2, 0.3 * L + 1.2))
    bottom_h = 4.0 if corpus else min(MAX_H - top_h - 0.8, max(3.0, 0.2 * T + 1.0))
    fig = Figure(figsize=(width, top_h + bottom_h + 0.8), dpi=DPI, layout="constrained")
    fig.suptitle(f"{first.model} ({first.model_type}): {what}, top-{k} of {E} experts", fontsize=11)
    top, bottom = fig.subfigures(2, 1, height_ratios=[top_h, bottom_h])

    ax = top.subplots()
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
    ax.set_title(f"each MoE layer's share of assignments per expert (uniform = {1 / E:.3g})", fontsize=9)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(*_ticks(layer_ids, 24), fontsize=7)
    ax.set_xticks(*_ticks(list(range(E)), 32), fontsize=7)
    top.colorbar(im, ax=ax, label="share")
    if E * L <= 256:
        for (i, j), v in np.ndenumerate(share):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if v > share.max() * 0.6 else "white")

    bx = bottom.subplots()
    if corpus:
        ranked = -np.sort(-share, axis=1)  # [L, E], busiest expert first
        for i, layer in enumerate(layer_ids):
            bx.plot(np.arange(1, E + 1), ranked[i], lw=1, alpha=0.8, color=_seq(i, L), label=f"layer {layer}")
        bx.axhline(1 / E, color="black", lw=0.8, ls="--", label="uniform")
        bx.set_xlabel("experts, busiest first")
        bx.set_ylabel("share of assignments")
        bx.set_title("load per layer, experts sorted by load (flat = balanced)", fontsize=9)
        if L <= 12:
            bx.legend(fontsize=7, ncols=2)
    else:
        _first_choice_map(bottom, bx, report, layer_ids, E)

    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    buf = io.BytesIO()
    if path.endswith(".svg"):
        FigureCanvasSVG(fig).print_svg(buf)
    else:
        FigureCanvasAgg(fig).print_png(buf)
    atomic_write_bytes(path, buf.getvalue())


def _first_choice_map(sub, bx, report, layer_ids, E: int) -> None:
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    # the prompt's tokens: an encoder-decoder's encoder layers (its decoder layers route other tokens)
    layers = [l for l in report.layers if l.kind == "ffn" and l.stack != "decoder"]
    layer_ids = [l.layer for l in layers]
    T, L = len(report.tokens), len(layer_ids)
    first = np.array([[row[0] for row in l.experts] for l in layers]).T  # [T, L]
    weight = np.array([[row[0] for row in l.weights] for l in layers]).T
    legible = T * L <= 1200 and T <= 80
    if E <= CATEGORICAL_MAX:
        base = colormaps["tab20" if E > 10 else "tab10"]
        im = bx.imshow(first, aspect="auto", cmap=ListedColormap([base(i) for i in range(E)]),
                       interpolation="nearest", vmin=-0.5, vmax=E - 0.5)
        sub.colorbar(im, ax=bx, label="first-choice expert", ticks=range(E))
        bx.set_title("first-choice expert of each token in each MoE layer", fontsize=9)
        values = first
    else:  # too many experts to tell colours apart: colour the gate weight, write the expert
        im = bx.imshow(weight, aspect="auto", cmap="magma", interpolation="nearest", vmin=0,
                       vmax=max(float(weight.max()), 1e-6))
        sub.colorbar(im, ax=bx, label="first choice's gate weight")
        bx.set_title("first choice of each token in each MoE layer: colour = its gate weight"
                     + ("; number = the expert" if legible else ""), fontsize=9)
        values = first
    if legible:
        for (i, j), e in np.ndenumerate(values):
            bx.text(j, i, str(e), ha="center", va="center", fontsize=6,
                    color="white" if E > CATEGORICAL_MAX and weight[i, j] < 0.5 * weight.max() else "black")
    bx.set_xlabel("MoE layer")
    bx.set_xticks(*_ticks(layer_ids, 24), fontsize=7)
    labels = [repr(t.text)[1:-1][:12] + (" *" if t.generated else "") for t in report.tokens]
    pos, _ = _ticks(list(range(T)), 60)
    bx.set_yticks(pos, [labels[p] for p in pos], fontsize=6 if T > 40 else 7)
    bx.set_ylabel("token" + (" (* generated)" if any(t.generated for t in report.tokens) else ""))


def _ticks(values: list, most: int) -> tuple[list[int], list[str]]:
    """Positions and labels of at most `most` evenly spaced ticks."""
    step = max(1, -(-len(values) // most))
    pos = list(range(0, len(values), step))
    return pos, [str(values[p]) for p in pos]


def _seq(i: int, n: int):
    from matplotlib import colormaps

    return colormaps["viridis"](i / max(1, n - 1))


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
