"""MiniMax-M3's text model (`minimax_m3_vl_text`, the language model of `minimax_m3_vl`): what its
config says beyond the Llama-like `Style` in llama_like.py, read as transformers'
MiniMaxM3VLTextConfig reads it, legacy keys included (released configs may carry
`sparse_attention_config` and `moe_layer_freq` instead of `layer_types` / `mlp_layer_types`):

- which layers are MoE (`mlp_layer_types` "sparse"; else `moe_layer_freq`; else all);
- which layers have block-sparse attention (`layer_types` "minimax_m3_sparse"; else
  `sparse_attention_config.sparse_attention_freq`), and their lightning indexer's sizes, whose
  parameters (q [Hi*Di, D], k [Di, D], two [Di] norms) are counted here and run by
  moetool/forward/block_sparse.py.
"""

from __future__ import annotations

from ..errors import BadConfig
from ..spec import Cfg, Inventory

# indexer setting -> (config key, legacy sparse_attention_config key, transformers' default)
INDEXER_KEYS = {"heads": ("index_n_heads", "sparse_num_index_heads", 4),
                "dim": ("index_head_dim", "sparse_index_dim", 128),
                "block": ("index_block_size", "sparse_block_size", 128),
                "topk": ("index_topk_blocks", "sparse_topk_blocks", 16),
                "local": ("index_local_blocks", "sparse_local_block", 1)}


def _per_layer_flags(cfg: Cfg, key: str, n: int) -> list:
    flags = cfg.raw(key)
    if not isinstance(flags, list) or len(flags) < n:
        raise BadConfig(f"{cfg.where}: {key} must be a list with an entry per layer ({n}), got {flags!r}")
    return flags[:n]


def moe_schedule(cfg: Cfg, n: int) -> list[bool]:
    if cfg.has("mlp_layer_types"):
        return [t == "sparse" for t in _per_layer_flags(cfg, "mlp_layer_types", n)]
    if cfg.has("moe_layer_freq"):
        return [bool(f) for f in _per_layer_flags(cfg, "moe_layer_freq", n)]
    return [True] * n


def _legacy(cfg: Cfg) -> Cfg:
    return Cfg(cfg.raw("sparse_attention_config") or {}, f"{cfg.where}[sparse_attention_config]")


def sparse_layers(cfg: Cfg, n: int) -> list[int]:
    """The layers with block-sparse attention."""
    if cfg.has("layer_types"):
        return [i for i, t in enumerate(_per_layer_flags(cfg, "layer_types", n)) if t == "minimax_m3_sparse"]
    legacy = _legacy(cfg)
    if legacy.has("sparse_attention_freq"):
        return [i for i, f in enumerate(_per_layer_flags(legacy, "sparse_attention_freq", n)) if f]
    return []


def indexer(cfg: Cfg) -> dict:
    """heads, dim, block, topk, local of the lightning indexer (a legacy key wins, as in transformers)."""
    legacy = _legacy(cfg)
    out = {k: legacy.int(old, min_value=0) if legacy.has(old) else cfg.int(key, default, min_value=0)
           for k, (key, old, default) in INDEXER_KEYS.items()}
    if min(out["heads"], out["dim"], out["block"], out["topk"]) < 1:
        raise BadConfig(f"{cfg.where}: index_n_heads, index_head_dim, index_block_size and index_topk_blocks "
                        "must be positive")
    return out


def indexer_params(inv: Inventory, cfg: Cfg, i: int, d: int) -> None:
    """Layer i's lightning indexer, if the layer is block-sparse."""
    if i not in sparse_layers(cfg, cfg.int("num_hidden_layers", min_value=1)):
        return
    ix = indexer(cfg)
    inv.linear(f"layers.{i}.attn.indexer.q", "attention", ix["heads"] * ix["dim"], d, i)
    inv.linear(f"layers.{i}.attn.indexer.k", "attention", ix["dim"], d, i)
    inv.norm(f"layers.{i}.attn.indexer.q_norm", ix["dim"], i)
    inv.norm(f"layers.{i}.attn.indexer.k_norm", ix["dim"], i)
