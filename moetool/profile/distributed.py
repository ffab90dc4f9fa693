"""`moetool profile --ray ADDRESS`: shards of the corpus on Ray actors, one model per actor, merged.

The corpus is cut into `workers` contiguous shards (in corpus order); each actor loads the
checkpoint once, profiles its shard with the same engine, and returns its statistics as
safetensors bytes plus the meta (never a pickled object of ours); the driver merges them in
shard order. Counts equal the single-process profile exactly; float sums agree up to rounding.
`address`: "local" starts a local Ray (2 CPUs per default), anything else is passed to
`ray.init(address=...)` (e.g. "auto" on a cluster node, "ray://head:10001" from outside).
Actors ask for a GPU when the cluster has them (`num_gpus=1` per actor).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from ..errors import MoetoolError
from .corpus import Prompt
from .stats import ProfileStats


def _shards(prompts: Sequence[Prompt], n: int) -> list[list[Prompt]]:
    n = max(1, min(n, len(prompts)))
    size = -(-len(prompts) // n)
    return [list(prompts[i:i + size]) for i in range(0, len(prompts), size)]


def profile_on_ray(prompts: Sequence[Prompt], *, address: str = "local", workers: int = 2, out: Optional[str] = None,
                   model: Optional[str] = None, revision: Optional[str] = None, **opts) -> ProfileStats:
    try:
        import ray
    except ImportError:
        raise MoetoolError("--ray needs Ray: pip install 'moetool[ray]'") from None
    from ..tracing import _resolve_for_forward

    ckpt = _resolve_for_forward(model, revision)  # resolve (download) once on the driver
    path = ckpt.root or os.path.dirname(ckpt.config_path)
    started = False
    if not ray.is_initialized():
        env = {"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}}
        if address == "local":
            ray.init(num_cpus=max(2, workers), include_dashboard=False, runtime_env=env, log_to_driver=False)
        else:
            try:
                ray.init(address=address, runtime_env=env, log_to_driver=False)
            except Exception as e:  # ray raises ConnectionError, RuntimeError, ValueError ...
                raise MoetoolError(f"--ray {address}: cannot connect ({str(e).splitlines()[0][:120]})") from None
        started = True
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        Worker = ray.remote(num_cpus=1, num_gpus=gpus)(_ShardWorker)
        shards = _shards(prompts, workers)
        actors = [Worker.remote(path) for _ in shards]
        device = opts.pop("device", "auto")
        futures = [a.run.remote([(p.index, p.text, p.domain) for p in s], dict(opts, device=device))
                   for a, s in zip(actors, shards)]
        results = ray.get(futures)
    finally:
        if started:
            ray.shutdown()
    merged = None
    for meta, data in results:
        s = _from_bytes(meta, data)
        merged = s if merged is None else merged.merge(s)
    merged.meta["model"] = ckpt.source
    if out:
        merged.save(out)
    return merged


class _ShardWorker:
    def __init__(self, path: str):
        from ..source import resolve

        self.ckpt = resolve(path)

    def run(self, shard, opts):
        from safetensors.numpy import save

        from .engine import profile

        stats = profile([Prompt(i, t, d) for i, t, d in shard], model=self.ckpt, **opts)
        return stats.meta, save(stats.tensors())


def _from_bytes(meta: dict, data: bytes) -> ProfileStats:
    from safetensors.numpy import load

    from .stats import LayerSums

    t = load(data)
    E, K = meta["num_experts"], meta["top_k"]
    return ProfileStats(meta, {l: LayerSums.from_arrays(t, f"layer{l}", E, K, meta["domains"], meta["tie_keep"])
                               for l in meta["moe_layers"]})
