"""Plots of plans (matplotlib's object API, no pyplot)."""

from __future__ import annotations


def plot_hit_curve(plan: dict, path: str) -> None:
    """Hit rate against the GPU budget for routed experts, fitted and held-out; the plan's budget marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..render import atomic_write_bytes

    xs = [r["budget_bytes"] / 1e9 for r in plan["curve"]]
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(xs, [r["hit_rate"] for r in plan["curve"]], label="fitted profile", color="#1f77b4")
    if plan["curve"] and plan["curve"][0]["hit_rate_holdout"] is not None:
        ax.plot(xs, [r["hit_rate_holdout"] for r in plan["curve"]], label="held-out profile", color="#d62728",
                linestyle="--")
    ax.axvline(plan["budget_bytes"] / 1e9, color="grey", linewidth=0.8, linestyle=":", label="budget")
    ax.set_xlabel(f"GPU memory for routed experts (GB, {plan['format']})")
    ax.set_ylabel("hit rate (share of routed assignments)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Expert pinning: {plan.get('model') or ''}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="svg" if path.endswith(".svg") else "png")
    atomic_write_bytes(path, buf.getvalue())
