"""Plots of plans (matplotlib's object API, no pyplot)."""

from __future__ import annotations


def plot_hit_curve(plan: dict, path: str) -> None:
    """Hit rate and step-hit rate (pair-hit rate for k > 2) of the plan's objective against the GPU
    budget for routed experts, fitted and held-out; the plan's budget marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..render import atomic_write_bytes

    xs = [r["budget_bytes"] / 1e9 for r in plan["curve"]]
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    step_key = "step_hit_rate" if plan["curve"] and plan["curve"][0]["step_hit_rate"] is not None else "pair_hit_rate"
    step_name = "step-hit rate" if step_key == "step_hit_rate" else "pair-hit rate"
    for key, name, color in (("hit_rate", "hit rate", "#1f77b4"), (step_key, step_name, "#2ca02c")):
        if not plan["curve"] or plan["curve"][0][key] is None:
            continue
        ax.plot(xs, [r[key] for r in plan["curve"]], label=f"{name}, fitted", color=color)
        if plan["curve"][0][key + "_holdout"] is not None:
            ax.plot(xs, [r[key + "_holdout"] for r in plan["curve"]], label=f"{name}, held-out", color=color,
                    linestyle="--")
    ax.axvline(plan["budget_bytes"] / 1e9, color="grey", linewidth=0.8, linestyle=":", label="budget")
    ax.set_xlabel(f"GPU memory for routed experts (GB, {plan['format']})")
    ax.set_ylabel("share resident")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Expert pinning ({plan['objective']} objective): {plan.get('model') or ''}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="svg" if path.endswith(".svg") else "png")
    atomic_write_bytes(path, buf.getvalue())
