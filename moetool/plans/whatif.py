"""What if each token used fewer (or more) experts? Two forwards of moetool's reference decoder on
the same tokens: the model as configured, and the variant; compared on the final next-token
distributions and on the routing of every MoE layer.

Variants:
- `k`: every token takes its top-k' experts (the router's own selection rule with k' instead of k;
  routers that renormalise renormalise over the k').
- `min_p`: a token keeps the experts whose gate weight is at least `min_p` x its largest gate weight
  (dynamic top-k); with `renormalize` the kept weights are scaled back to the original sum.

Reported: mean and max KL(p_original || p_variant) per token, top-1 agreement, and per MoE layer
the mean experts per token, the compute saved, how often the first choice is unchanged and the
mean Jaccard overlap of each token's expert set with the original's (upstream layers change the
hidden states, so a variant's choices are not a mere truncation of the original's).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..errors import MoetoolError


def whatif(model: Optional[str], ids: list[int], *, k: Optional[int] = None, min_p: Optional[float] = None,
           renormalize: bool = False, device: str = "auto", revision: Optional[str] = None) -> dict:
    import torch

    from ..arch import spec_from_config
    from ..forward import pick_device, weight_store
    from ..forward.config import forward_config
    from ..forward.model import Decoder
    from ..tracing import _resolve_for_forward

    if (k is None) == (min_p is None):
        raise MoetoolError("give one of --k or --min-p")
    ckpt = _resolve_for_forward(model, revision)
    if ckpt.tensors is None:
        raise MoetoolError(f"{ckpt.source}: no safetensors weights to run")
    spec = spec_from_config(ckpt.config, ckpt.config_path)
    if spec.moe is None:
        raise MoetoolError(f"{ckpt.source}: {spec.model_type} has no routed experts")
    fc = forward_config(spec, ckpt.config)
    if not ids:
        raise MoetoolError("no tokens to run")
    if fc.max_positions and len(ids) > fc.max_positions:
        raise MoetoolError(f"{len(ids)} tokens, more than the model's context ({fc.max_positions})")
    K = spec.moe.top_k
    variant_spec = spec
    if k is not None:
        if not 1 <= k <= spec.moe.num_experts:
            raise MoetoolError(f"--k must be between 1 and the number of experts ({spec.moe.num_experts})")
        variant_spec = dataclasses.replace(spec, moe=dataclasses.replace(spec.moe, top_k=k))
    elif not 0 < min_p <= 1:
        raise MoetoolError("--min-p is a share of the token's largest gate weight: give a number in (0, 1]")
    dev = pick_device(device)
    store = weight_store(ckpt)
    used: dict[int, torch.Tensor] = {}

    def minp_hook(layer, idx, w):
        top = w.max(dim=-1, keepdim=True).values
        keep = w >= min_p * top
        w2 = torch.where(keep, w, torch.zeros_like(w))
        if renormalize:
            w2 = w2 * (w.sum(-1, keepdim=True) / w2.sum(-1, keepdim=True))
        used[layer] = keep.cpu()
        return idx, w2

    with torch.inference_mode():
        base = Decoder(spec, fc, store, device=dev).run(ids)
        dec = Decoder(variant_spec, fc, store, device=dev)
        if min_p is not None:
            dec.route_hook = minp_hook
        alt = dec.run(ids)
    store.release()
    lp = torch.log_softmax(base.logits.double(), -1)
    lq = torch.log_softmax(alt.logits.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    layers = []
    for rb, ra in zip(base.routes, alt.routes):
        eb, ea = rb.experts.tolist(), ra.experts.tolist()
        if min_p is not None:
            mask = used[ra.layer].tolist()
            ea = [[e for e, m in zip(row, ms) if m] for row, ms in zip(ea, mask)]
        per_tok = [len(r) for r in ea]
        jac = [len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in zip(ea, eb)]
        first = [a[0] == b[0] for a, b in zip(ea, eb)]
        mean_k = sum(per_tok) / len(per_tok)
        layers.append({"layer": rb.layer, "experts_per_token": mean_k, "compute_saved": 1 - mean_k / K,
                       "first_choice_unchanged": sum(first) / len(first), "jaccard_mean": sum(jac) / len(jac)})
    variant = {"k": k} if k is not None else {"min_p": min_p, "renormalize": renormalize}
    return {
        "schema_version": 1, "command": "whatif topk", "model": ckpt.source, "model_type": spec.model_type,
        "top_k": K, "variant": variant, "tokens": len(ids),
        "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
        "top1_agreement": float((base.logits.argmax(-1) == alt.logits.argmax(-1)).double().mean()),
        "experts_per_token": sum(l["experts_per_token"] for l in layers) / len(layers),
        "compute_saved": sum(l["compute_saved"] for l in layers) / len(layers),
        "layers": layers,
    }
