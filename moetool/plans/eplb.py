"""Expert-parallel placement with DeepSeek's EPLB algorithm (balanced packing with redundant experts).

The algorithm is the one published in deepseek-ai/EPLB (`eplb.py`, MIT), re-implemented here in
numpy: given each layer's expert loads, decide how many replicas each logical expert gets
(`num_physical` slots in all; the heaviest per-replica load is replicated first) and which GPU each
replica lives on, so that every GPU holds the same number of slots and the heaviest GPU carries
as little as possible.

- Hierarchical policy (when the expert groups divide evenly over the nodes): pack expert groups
  onto nodes (balanced packing), replicate experts within each node, pack the node's replicas onto
  its GPUs. Keeps a group's experts on one node (DeepSeek-V3's group-limited routing then sends each
  token to few nodes).
- Global policy (otherwise): replicate over the whole cluster, pack replicas onto all GPUs.

Balancedness (what SGLang logs as "balancedness"): mean GPU load / max GPU load per layer, where a
logical expert's load is split evenly over its replicas. 1.0 is perfect.

Example:
    >>> import numpy as np
    >>> p = rebalance(np.array([[90, 10, 10, 10]]), num_physical=6, num_groups=1, num_nodes=1, num_gpus=2)
    >>> p.physical_to_logical.tolist(), p.replica_count.tolist()
    ([[0, 0, 3, 0, 1, 2]], [[3, 1, 1, 1]])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MoetoolError


@dataclass
class Placement:
    """physical_to_logical [L, P]: the logical expert in each physical slot (slot s lives on GPU
    s // (P / gpus)); logical_to_physical [L, E, max_replicas] (-1 padded); replica_count [L, E]."""

    physical_to_logical: np.ndarray
    logical_to_physical: np.ndarray
    replica_count: np.ndarray
    num_gpus: int

    @property
    def slots_per_gpu(self) -> int:
        return self.physical_to_logical.shape[1] // self.num_gpus


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Put n weighted items into `num_packs` packs of exactly n / num_packs items each, heaviest
    item first into the lightest pack that still has room. weight [L, n] -> (pack [L, n], rank in
    pack [L, n])."""
    L, n = weight.shape
    if n % num_packs:
        raise MoetoolError(f"{n} items do not split evenly into {num_packs} packs")
    per_pack = n // num_packs
    pack = np.zeros((L, n), dtype=np.int64)
    rank = np.zeros((L, n), dtype=np.int64)
    if per_pack == 1:
        pack[:] = np.arange(n)
        return pack, rank
    for i in range(L):
        loads = np.zeros(num_packs)
        counts = np.zeros(num_packs, dtype=np.int64)
        for item in np.argsort(-weight[i], kind="stable"):
            open_packs = np.flatnonzero(counts < per_pack)
            p = open_packs[np.argmin(loads[open_packs])]
            pack[i, item], rank[i, item] = p, counts[p]
            loads[p] += weight[i, item]
            counts[p] += 1
    return pack, rank


def replicate(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give `num_physical - n` extra replicas, each to the expert with the heaviest load per
    replica at that moment. -> (physical_to_logical [L, P], replica rank [L, P], count [L, n])."""
    L, n = weight.shape
    if num_physical < n:
        raise MoetoolError(f"{num_physical} physical slots cannot hold {n} experts")
    p2l = np.tile(np.arange(num_physical), (L, 1))
    rank = np.zeros((L, num_physical), dtype=np.int64)
    count = np.ones((L, n), dtype=np.int64)
    rows = np.arange(L)
    for s in range(n, num_physical):
        best = np.argmax(weight / count, axis=1)
        p2l[:, s] = best
        rank[:, s] = count[rows, best]
        count[rows, best] += 1
    return p2l, rank, count


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _hierarchical(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int):
    L, E = weight.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_physical // num_gpus
    # 1. expert groups onto nodes
    group_load = weight.reshape(L, num_groups, group_size).sum(-1)
    gpack, grank = balanced_packing(group_load, num_nodes)
    log2mlog = (((gpack * groups_per_node + grank) * group_size)[:, :, None] + np.arange(group_size)).reshape(L, E)
    mlog2log = _inverse(log2mlog)
    # 2. replicas within each node
    mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(L * num_nodes, E // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate(mlog_load, num_physical // num_nodes)
    # 3. the node's replicas onto its GPUs
    phy_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, axis=1)
    pack, rank = balanced_packing(phy_load, num_gpus // num_nodes)
    phy2pphy = pack * slots_per_gpu + rank
    pphy2phy = _inverse(phy2pphy)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    offsets = np.arange(0, E, E // num_nodes)[None, :, None]
    pphy2mlog = (pphy2mlog.reshape(L, num_nodes, -1) + offsets).reshape(L, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(L, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, -1), log2mlog, axis=1)
    return pphy2log, pphyrank, logcnt


def rebalance(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int) -> Placement:
    """EPLB placement of E logical experts per layer over `num_physical` slots on `num_gpus` GPUs."""
    weight = np.asarray(weight, dtype=np.float64)
    L, E = weight.shape
    if num_gpus < 1 or num_physical % num_gpus:
        raise MoetoolError(f"{num_physical} physical expert slots do not split evenly over {num_gpus} GPUs "
                           "(--ranks must divide experts + --redundant)")
    if num_physical < E:
        raise MoetoolError(f"{num_physical} slots are fewer than the {E} experts")
    if num_nodes < 1 or num_gpus % num_nodes:
        raise MoetoolError(f"{num_gpus} GPUs do not split evenly over {num_nodes} nodes")
    if num_groups >= 1 and E % num_groups == 0 and num_groups % num_nodes == 0 and num_physical % num_nodes == 0:
        p2l, rank, cnt = _hierarchical(weight, num_physical, num_groups, num_nodes, num_gpus)
    else:
        p2l, rank, cnt = _hierarchical(weight, num_physical, 1, 1, num_gpus)
    max_rep = int(cnt.max())
    l2p = np.full((L, E, max_rep), -1, dtype=np.int64)
    for i in range(L):
        for s, (e, r) in enumerate(zip(p2l[i], rank[i])):
            l2p[i, e, r] = s
    return Placement(p2l.astype(np.int64), l2p, cnt.astype(np.int64), num_gpus)


def gpu_loads(weight: np.ndarray, placement: Placement) -> np.ndarray:
    """[L, gpus]: each GPU's load when each logical expert's load is split evenly over its replicas."""
    w = np.asarray(weight, dtype=np.float64)
    L = w.shape[0]
    per_replica = w / placement.replica_count
    slot_load = np.take_along_axis(per_replica, placement.physical_to_logical, axis=1)
    return slot_load.reshape(L, placement.num_gpus, -1).sum(-1)


def contiguous(num_layers: int, num_experts: int, num_gpus: int) -> Placement:
    """The default placement without EPLB: expert e on GPU e // (E / gpus), no replicas."""
    if num_experts % num_gpus:
        raise MoetoolError(f"{num_experts} experts do not split evenly over {num_gpus} GPUs")
    p2l = np.tile(np.arange(num_experts), (num_layers, 1))
    return Placement(p2l, p2l[:, :, None].copy(), np.ones((num_layers, num_experts), dtype=np.int64), num_gpus)


def balancedness(loads: np.ndarray) -> np.ndarray:
    """mean / max GPU load per layer (1.0: perfectly balanced); layers with no load count as 1."""
    mx = loads.max(axis=1)
    return np.where(mx > 0, loads.mean(axis=1) / np.where(mx > 0, mx, 1), 1.0)
