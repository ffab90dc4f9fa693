"""Qwen4-Exp (qwen4_exp_text; the image-text qwen4_exp is this text model plus Qwen3.5's vision
tower, arch/multimodal.py): Qwen3.5-MoE's layers on `hc_count` residual streams.

- Hyper-connections: the residual is hc_count streams of D. Before the mixer and before the MoE
  block a gated residual (`attn_hyper_connection`, `mlp_hyper_connection`) mixes the streams into
  the block's input: a grouped RMSNorm hc_norm [hc*D], a low-rank mixer input_mix_weight_down
  [hc_lowrank, hc*D] / input_mix_weight_up [hc*D, hc_lowrank], and block_inject_weight [hc, hc*D]
  (how strongly the block's output enters each stream). After the last layer
  `hyper_connection_mixer` (no inject weight) mixes them into one; there is no final norm and no
  per-layer input / post-attention norm.
- Mixers by `layer_types`: "linear_attention" (Qwen3.5's Gated DeltaNet: in_proj_qkv, in_proj_z,
  in_proj_b, in_proj_a, conv1d, dt_bias, A_log, gated norm, out_proj) or "indexed_attention"
  ("full_attention" in the released config): gated attention (q_proj twice as wide, q_norm, k_norm)
  with a QSA token indexer index_qk_proj [(indexer_n_heads + indexer_kv_heads) * indexer_head_dim, D]
  and its q_layernorm / k_layernorm [indexer_head_dim]. transformers builds the indexer on every
  indexed layer and cannot build one without the indexer_* fields (None in the default config).
- Every layer MoE: softmax router, `num_experts` experts, one sigmoid-gated shared expert.
- Per-Layer Embedding (PLE) on the 1-based `ple_layer_ids` (linear layers): a hashed n-gram
  embedding (orders 2..ngram_size, heads_per_ngram heads each, every head its own prime-sized
  table: the (j+1)-th prime after ngram_vocab_size_base - 1 for global head j = PLE index x heads +
  head; the tables concatenated, padded to a multiple of make_ngram_vocab_size_divisible_by rows of
  ple_embed_dim / heads), key_proj [hc*D, P], value_proj [D, P], norm_key / norm_query / norm_conv
  [hc*D] and a dilated depthwise conv1d [hc*D, 1, ple_conv_kernel_size]. Checkpoints store the table
  in `split_ngram_parts` row shards (ngram_embedding.shard_N.weight). Groups: the table is
  "embedding" (a lookup, as Gemma's per-layer embeddings), the projections and conv "dense_mlp".
"""

from __future__ import annotations

from ..errors import BadConfig
from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common

QSA_FIELDS = ("indexer_n_heads", "indexer_kv_heads", "indexer_head_dim", "indexer_budget", "indexer_compress_ratio")


def layer_types(cfg: Cfg, n_layers: int) -> list[str]:
    """Per layer "linear_attention" or "indexed_attention", as Qwen4ExpTextConfig derives them."""
    interval = cfg.int("full_attention_interval", 4, min_value=1)
    types = cfg.str_list("layer_types", ["linear_attention" if (i + 1) % interval else "indexed_attention"
                                         for i in range(n_layers)])
    types = ["indexed_attention" if t == "full_attention" else t for t in types]
    if len(types) < n_layers or set(types[:n_layers]) - {"linear_attention", "indexed_attention"}:
        raise BadConfig(f"{cfg.where}: layer_types needs one of linear_attention / indexed_attention (full_attention) "
                        f"per layer ({n_layers})")
    return types[:n_layers]


def ple_layers(cfg: Cfg, n_layers: int, types: list[str]) -> list[int]:
    """0-based indices of the PLE layers, sorted (ple_layer_ids are 1-based)."""
    ids = sorted(set(cfg.int_list("ple_layer_ids", []) if cfg.raw("ple_layer_ids") is not None else []))
    bad = [i for i in ids if not 1 <= i <= n_layers or types[i - 1] != "linear_attention"]
    if bad:
        raise BadConfig(f"{cfg.where}: ple_layer_ids must name linear_attention layers (1-based, of {n_layers}), "
                        f"got {bad}")
    return [i - 1 for i in ids]


def head_primes(cfg: Cfg, n: int) -> list[int]:
    """The n-gram table sizes of the first n heads over all PLE layers (global head j: the (j+1)-th prime
    after ngram_vocab_size_base - 1)."""
    return _primes_after(cfg.int("ngram_vocab_size_base", 20_000_000, min_value=1) - 1, n)


def ngram_rows(cfg: Cfg, ple_index: int) -> int:
    """Rows of the n-gram table of the `ple_index`-th PLE layer (transformers' Qwen4ExpTextNGramEmbedding)."""
    heads = (cfg.int("ngram_size", 3, min_value=2) - 1) * cfg.int("heads_per_ngram", 8, min_value=1)
    primes = _primes_after(cfg.int("ngram_vocab_size_base", 20_000_000, min_value=1) - 1, (ple_index + 1) * heads)
    total = sum(primes[ple_index * heads:])
    div = cfg.int("make_ngram_vocab_size_divisible_by", 128, min_value=1)
    return -(-total // div) * div


def _primes_after(start: int, n: int) -> list[int]:
    """The first n primes greater than `start`."""
    out, p = [], start
    while len(out) < n:
        p += 1
        if _is_prime(p):
            out.append(p)
    return out


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (exact for every n below 3.3e24)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for q in small:
        if n % q == 0:
            return n == q
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _gated_residual(inv: Inventory, name: str, d: int, hc: int, rank: int, layer, inject: bool = True) -> None:
    inv.norm(f"{name}.hc_norm", hc * d, layer)
    inv.linear(f"{name}.input_mix_weight_down", "norms", rank, hc * d, layer)
    inv.linear(f"{name}.input_mix_weight_up", "norms", hc * d, rank, layer)
    if inject:
        inv.linear(f"{name}.block_inject_weight", "norms", hc, hc * d, layer)


def adapt(cfg: Cfg, model_type: str = "qwen4_exp_text") -> ModelSpec:
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n_layers = cfg.int("num_hidden_layers", min_value=1)
    heads = cfg.int("num_attention_heads", min_value=1)
    kv_heads = cfg.int("num_key_value_heads", 2, min_value=1)
    hd = cfg.int("head_dim", 256, min_value=1)
    bias = cfg.bool("attention_bias", False)
    tie = common.tie_embeddings(cfg)
    hc, rank = cfg.int("hc_count", 4, min_value=2), cfg.int("hc_lowrank", 320, min_value=1)
    nk, nv = cfg.int("linear_num_key_heads", 16, min_value=1), cfg.int("linear_num_value_heads", 32, min_value=1)
    dk, dv = cfg.int("linear_key_head_dim", 128, min_value=1), cfg.int("linear_value_head_dim", 128, min_value=1)
    kernel = cfg.int("linear_conv_kernel_dim", 4, min_value=1)
    E = cfg.int("num_experts", 512, min_value=1)
    moe = MoESpec(num_experts=E, top_k=cfg.int("num_experts_per_tok", 10, min_value=1),
                  expert_ffn=cfg.int("moe_intermediate_size", 512, min_value=1), num_shared_experts=1,
                  shared_ffn=cfg.int("shared_expert_intermediate_size", 512, min_value=1),
                  activation=cfg.str("hidden_act", "silu"),
                  router=RouterSpec(norm_topk_prob=cfg.bool("norm_topk_prob", True)))
    types = layer_types(cfg, n_layers)
    ple = ple_layers(cfg, n_layers, types)
    if "indexed_attention" in types:
        missing = [k for k in QSA_FIELDS if cfg.raw(k) is None]
        if missing:
            raise BadConfig(f"{cfg.where}: indexed_attention layers need the QSA indexer fields; missing "
                            f"{', '.join(missing)} (transformers cannot build the model without them either)")
    ix_heads = cfg.int("indexer_n_heads", 1, min_value=1) if "indexed_attention" in types else 0
    ix_kv, ix_dim = cfg.int("indexer_kv_heads", 1, min_value=1), cfg.int("indexer_head_dim", 1, min_value=1)
    P = cfg.int("ple_embed_dim", d, min_value=1)
    ngram_heads = (cfg.int("ngram_size", 3, min_value=2) - 1) * cfg.int("heads_per_ngram", 8, min_value=1)
    if ple and P % ngram_heads:
        raise BadConfig(f"{cfg.where}: ple_embed_dim ({P}) must be a multiple of the n-gram heads "
                        f"((ngram_size - 1) * heads_per_ngram = {ngram_heads})")
    ple_kernel = cfg.int("ple_conv_kernel_size", 4, min_value=1)

    inv = Inventory()
    layers = []
    for i in range(n_layers):
        if types[i] == "indexed_attention":
            inv.gqa(i, d, heads, kv_heads, hd, qkv_bias=bias, o_bias=bias, q_out=2 * heads * hd)
            inv.norm(f"layers.{i}.attn.q_norm", hd, i)
            inv.norm(f"layers.{i}.attn.k_norm", hd, i)
            inv.linear(f"layers.{i}.attn.indexer.index_qk_proj", "attention", (ix_heads + ix_kv) * ix_dim, d, i)
            inv.norm(f"layers.{i}.attn.indexer.q_layernorm", ix_dim, i)
            inv.norm(f"layers.{i}.attn.indexer.k_layernorm", ix_dim, i)
            layer = common.gqa_layer(i, heads, kv_heads, hd, True)
            # the indexer's raw keys are cached beside K and V (indexer_kv_heads x indexer_head_dim per token)
            layer = LayerSpec(index=i, mixer="attention", moe=True, kv_per_token=layer.kv_per_token + ix_kv * ix_dim,
                              attn_flops_per_ctx=layer.attn_flops_per_ctx)
        else:
            p = f"layers.{i}.linear_attn"
            conv_dim = 2 * nk * dk + nv * dv
            inv.linear(f"{p}.in_proj_qkv", "attention", conv_dim, d, i)
            inv.linear(f"{p}.in_proj_z", "attention", nv * dv, d, i)
            inv.linear(f"{p}.in_proj_b", "attention", nv, d, i)
            inv.linear(f"{p}.in_proj_a", "attention", nv, d, i)
            inv.add(f"{p}.conv1d.weight", "attention", (conv_dim, 1, kernel), i)
            inv.add(f"{p}.dt_bias", "attention", (nv,), i)
            inv.add(f"{p}.A_log", "attention", (nv,), i)
            inv.norm(f"{p}.norm", dv, i)
            inv.linear(f"{p}.out_proj", "attention", d, nv * dv, i)
            state = conv_dim * kernel + nv * dk * dv
            if i in ple:  # the PLE's dilated conv keeps (kernel - 1) * ngram_size inputs of hc*D
                state += (ple_kernel - 1) * cfg.int("ngram_size", 3) * hc * d
            layer = LayerSpec(index=i, mixer="gated_deltanet", moe=True, state_elems=state)
        if i in ple:
            q = f"layers.{i}.ple"
            inv.add(f"{q}.ngram_embedding.weight", "embedding", (ngram_rows(cfg, ple.index(i)), P // ngram_heads), i)
            inv.linear(f"{q}.key_proj", "dense_mlp", hc * d, P, i)
            inv.linear(f"{q}.value_proj", "dense_mlp", d, P, i)
            for n in ("norm_key", "norm_query", "norm_conv"):
                inv.norm(f"{q}.{n}", hc * d, i)
            inv.add(f"{q}.conv1d.weight", "dense_mlp", (hc * d, 1, ple_kernel), i)
        _gated_residual(inv, f"layers.{i}.attn_hyper_connection", d, hc, rank, i)
        _gated_residual(inv, f"layers.{i}.mlp_hyper_connection", d, hc, rank, i)
        inv.linear(f"layers.{i}.router", "router", E, d, i)
        inv.swiglu(f"layers.{i}.experts", "routed_experts", d, moe.expert_ffn, i, copies=E)
        inv.swiglu(f"layers.{i}.shared_expert", "shared_experts", d, moe.shared_ffn, i)
        inv.linear(f"layers.{i}.shared_expert_gate", "shared_experts", 1, d, i)
        layers.append(layer)
    _gated_residual(inv, "hyper_connection_mixer", d, hc, rank, None, inject=False)
    inv.add("embed.weight", "embedding", (vocab, d))  # no final norm: the streams' mixer ends the model
    if not tie:
        inv.linear("lm_head", "lm_head", vocab, d)
    return ModelSpec(model_type=model_type, family="qwen4_exp_text", hidden_size=d, vocab_size=vocab,
                     num_layers=n_layers, layers=tuple(layers), params=tuple(inv.params), moe=moe,
                     tie_word_embeddings=tie, max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def register(table: dict) -> None:
    table["qwen4_exp_text"] = adapt
