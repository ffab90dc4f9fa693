"""Measure the bundled default model for docs/default-model.md: the loss curve (PNG) from its
training log, and whether its experts specialise.

Specialisation: trace held-out Python code and held-out English prose (the same 90 / 10 split as
training, so never seen in training) with `moetool.trace`, pool each kind's expert loads per
layer, and report the total-variation distance TV = 1/2 sum_i |p_i - q_i| between the code and the
prose load distributions. As a noise floor, the same distance between two disjoint halves of the
same kind (alternate windows). Also each kind's top expert per layer.

Run: python scripts/default_model_report.py [--samples 24] [--tokens 192]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def loss_plot(log: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=150, layout="constrained")
    ax = fig.subplots()
    steps = [s["step"] for s in log["steps"]]
    ax.plot(steps, [s["loss"] for s in log["steps"]], lw=1, color="0.6", label="train (batch)")
    ev = log["eval"]
    ax.plot([e["step"] for e in ev], [e["code"] for e in ev], "o-", label="held-out code")
    ax.plot([e["step"] for e in ev], [e["prose"] for e in ev], "s-", label="held-out prose")
    ax.axhline(log["unigram"]["code"], ls="--", color="C0", lw=1, label="unigram baseline, code")
    ax.axhline(log["unigram"]["prose"], ls="--", color="C1", lw=1, label="unigram baseline, prose")
    ax.set_xlabel("step (16 x 256 tokens)")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("moetool's default MoE: training and held-out loss")
    ax.legend(fontsize=8)
    FigureCanvasAgg(fig).print_png(str(path))


def pooled_load(traces, layers: list[int], E: int) -> np.ndarray:
    load = np.zeros((len(layers), E))
    for t in traces:
        for j, l in enumerate(t.layers):
            load[j] += l.metrics["load"]
    return load / load.sum(axis=1, keepdims=True)


def tv(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(p - q).sum(axis=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=192)
    args = ap.parse_args()
    import moetool
    import train_default_model as train

    model_dir = REPO / "moetool" / "data" / "default"
    log = json.loads((model_dir / "training_log.json").read_text())
    loss_plot(log, REPO / "docs" / "default-model-loss.png")

    prose, code = train.documents()
    rng = random.Random(train.SEED)
    _, prose_held = train.split(prose, rng)
    _, code_held = train.split(code, rng)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def samples(docs: list[str], n: int) -> list[list[int]]:
        """n windows spread evenly over the whole held-out stream (every held-out file / paragraph
        group contributes), alternately assigned to the two halves used for the noise floor."""
        ids = [i for d in docs for i in tok.encode(d).ids + [2]]
        stride = max(args.tokens, (len(ids) - args.tokens) // n)
        return [ids[s:s + args.tokens] for s in range(0, len(ids) - args.tokens + 1, stride)][:n]

    code_s, prose_s = samples(code_held, args.samples), samples(prose_held, args.samples)
    trace = lambda ids: moetool.trace(model=None, tokens=ids, device="cpu")
    code_t, prose_t = [trace(s) for s in code_s], [trace(s) for s in prose_s]
    layers = [l.layer for l in code_t[0].layers]
    E = code_t[0].num_experts
    pc, pp = pooled_load(code_t, layers, E), pooled_load(prose_t, layers, E)
    floor_code = tv(pooled_load(code_t[0::2], layers, E), pooled_load(code_t[1::2], layers, E))
    floor_prose = tv(pooled_load(prose_t[0::2], layers, E), pooled_load(prose_t[1::2], layers, E))
    d = tv(pc, pp)
    print(f"held-out samples: {len(code_s)} code and {len(prose_s)} prose windows of {args.tokens} tokens")
    print("| layer | TV(code, prose) | noise floor: TV(code half, code half) | TV(prose half, prose half) "
          "| top expert, code (share) | top expert, prose (share) |")
    print("|---|---|---|---|---|---|")
    for j, layer in enumerate(layers):
        print(f"| {layer} | {d[j]:.3f} | {floor_code[j]:.3f} | {floor_prose[j]:.3f} | {pc[j].argmax()} ({pc[j].max():.2f}) "
              f"| {pp[j].argmax()} ({pp[j].max():.2f}) |")
    diff_top = sum(int(pc[j].argmax() != pp[j].argmax()) for j in range(len(layers)))
    print(f"different top expert in {diff_top} of {len(layers)} layers; mean TV {d.mean():.3f} vs noise floors "
          f"{floor_code.mean():.3f} (code) and {floor_prose.mean():.3f} (prose)")
    summary = {k: log[k] for k in ("params", "train_tokens", "seconds", "unigram")}
    summary["final_eval"] = log["eval"][-1]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
