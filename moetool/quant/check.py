"""End-to-end check of a plan: fake-quantize the routed experts with the plan and with the best
uniform scheme of the same size, run the reference forward on held-out text, and report the mean
KL divergence KL(p_full || p_quantized) of the next-token distributions."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..errors import MoetoolError
from . import schemes as S

MAX_CHECK_BYTES = 2 * 1024 ** 3


def default_calibration_text() -> str:
    """Text every Python has: the first half of the documentation topics and json/decoder.py."""
    return _topics(0) + "\n" + _stdlib("json/decoder.py")


def default_eval_text() -> str:
    """Different text for the KL check: the second half of the topics and textwrap.py."""
    return _topics(1) + "\n" + _stdlib("textwrap.py")


def _topics(half: int) -> str:
    import pydoc_data.topics as t

    keys = sorted(t.topics)
    part = keys[: len(keys) // 2] if half == 0 else keys[len(keys) // 2:]
    return "\n\n".join(t.topics[k] for k in part)


def _stdlib(rel: str) -> str:
    import sysconfig

    try:
        return (Path(sysconfig.get_paths()["stdlib"]) / rel).read_text(encoding="utf-8")
    except OSError:
        return ""


def kl_check(model: Optional[str], plan: dict, eval_text: Optional[str] = None, tokens: int = 512) -> dict:
    from safetensors.torch import save_file

    from ..arch import spec_from_config
    from ..forward import run_forward, weight_store
    from ..forward.model import Experts, Names
    from ..source import resolve
    from ..tracing import _resolve_for_forward, load_tokenizer

    ckpt = _resolve_for_forward(model, None)
    if ckpt.bytes_stored and ckpt.bytes_stored > MAX_CHECK_BYTES:
        raise MoetoolError("--check-kl writes fake-quantized copies of the checkpoint: only for models under 2 GB")
    spec = spec_from_config(ckpt.config, ckpt.config_path)
    tok = load_tokenizer(ckpt)
    if tok is None:
        raise MoetoolError("--check-kl needs the checkpoint's tokenizer.json")
    from ..forward.config import forward_config

    context = forward_config(spec, ckpt.config).max_positions  # the held-out text fits the model's context
    ids = tok.encode(eval_text or default_eval_text()).ids[:min(tokens, context or tokens)]
    store = weight_store(ckpt)  # the mapping the forward below uses too
    names = Names(store)
    full = run_forward(ckpt, ids, device="cpu", record=False).logits
    results = {"tokens": len(ids)}
    variants = {"plan": {(a["layer"], a["expert"]): a["scheme"] for a in plan["per_expert"]["assignments"]}}
    if plan.get("uniform"):
        variants["uniform"] = {k: plan["uniform"]["scheme"] for k in variants["plan"]}
    for label, assign in variants.items():
        tensors = {n: store.get(n, torch.float32) for n in ckpt.tensors}
        for (layer, e), scheme in assign.items():
            loader = Experts(store, names, layer, spec.family, spec.moe.expert_ffn, torch.float32, "cpu")
            if len(loader.per_expert) != 3:
                raise MoetoolError("--check-kl supports checkpoints with one tensor per expert projection")
            for proj in ("gate", "up", "down"):
                name = loader.per_expert[proj].format(e=e)
                tensors[name] = S.fake_quantize(tensors[name], scheme)
        with tempfile.TemporaryDirectory() as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(tmp) / "model.safetensors"))
            (Path(tmp) / "config.json").write_text(Path(ckpt.config_path).read_text())
            q = run_forward(resolve(tmp), ids, device="cpu", record=False).logits
        lp, lq = torch.log_softmax(full.double(), -1), torch.log_softmax(q.double(), -1)
        results[f"kl_{label}"] = float((lp.exp() * (lp - lq)).sum(-1).mean())
        results[f"scheme_{label}"] = plan["uniform"]["scheme"] if label == "uniform" else "mixed"
    return results
