"""Kimi Linear (moonshotai/Kimi-Linear-48B-A3B-Instruct, kimi_linear): Kimi Delta Attention (KDA)
layers and MLA layers without positional encoding (NoPE), both under `self_attn.`; DeepSeek-V3
style MoE (sigmoid, correction bias, groups, routed_scaling_factor, shared experts) after
`first_k_dense_replace` dense layers. Layer types from `layer_types`, or from
linear_attn_config's 1-based `kda_layers` / `full_attn_layers`."""

from __future__ import annotations

from ..errors import BadConfig
from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common
from .deepseek import _MLA


def layer_types(cfg: Cfg, n_layers: int) -> list[str]:
    if cfg.has("layer_types"):
        types = cfg.str_list("layer_types")[:n_layers]
    else:
        la = cfg.sub("linear_attn_config")
        if la.has("kda_layers") and la.has("full_attn_layers"):
            types = [""] * n_layers
            for key, kind in (("full_attn_layers", "full_attention"), ("kda_layers", "linear_attention")):
                for layer in la.int_list(key):
                    if not 1 <= layer <= n_layers:
                        raise BadConfig(f"{cfg.where}: linear_attn_config.{key} names layer {layer} (1-based) of {n_layers}")
                    types[layer - 1] = kind
        else:
            types = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(n_layers)]
    if len(types) < n_layers or any(t not in ("full_attention", "linear_attention") for t in types):
        raise BadConfig(f"{cfg.where}: every layer must be full_attention or linear_attention")
    return types


def kda_dims(cfg: Cfg) -> dict:
    la = cfg.sub("linear_attn_config")
    return dict(heads=la.int("num_heads", cfg.int("linear_num_heads", 32)), head_dim=la.int("head_dim", cfg.int("linear_head_dim", 128)),
                kernel=la.int("short_conv_kernel_size", cfg.int("linear_conv_kernel_dim", 4)))


def adapt(cfg: Cfg, model_type: str = "kimi_linear") -> ModelSpec:
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    n_layers = cfg.int("num_hidden_layers", min_value=1)
    heads = cfg.int("num_attention_heads", min_value=1)
    tie = common.tie_embeddings(cfg)
    E = cfg.first_int(["num_experts", "num_local_experts", "n_routed_experts"], 256, min_value=1)
    F = cfg.int("moe_intermediate_size", 1024, min_value=1)
    shared = cfg.first_int(["num_shared_experts", "n_shared_experts"], 1)
    moe = MoESpec(num_experts=E, top_k=cfg.first_int(["num_experts_per_token", "num_experts_per_tok"], 8, min_value=1),
                  expert_ffn=F, num_shared_experts=shared, shared_ffn=F * shared,
                  activation=cfg.str("hidden_act", "silu"),
                  router=RouterSpec(scoring="sigmoid", norm_topk_prob=cfg.bool("moe_renormalize", cfg.bool("norm_topk_prob", True)),
                                    routed_scaling_factor=cfg.float("routed_scaling_factor", 2.446),
                                    topk_method="noaux_tc",
                                    n_group=cfg.first_int(["num_expert_group", "n_group"], 1, min_value=1),
                                    topk_group=cfg.int("topk_group", 1, min_value=1), correction_bias=True))
    if cfg.has("mlp_layer_types"):
        mlp = cfg.str_list("mlp_layer_types")
        if len(mlp) < n_layers or any(t not in ("dense", "sparse") for t in mlp[:n_layers]):
            raise BadConfig(f"{cfg.where}: mlp_layer_types must be dense or sparse for each layer")
        is_moe = [t == "sparse" for t in mlp[:n_layers]]
    else:
        is_moe = [i >= cfg.int("first_k_dense_replace", 1) for i in range(n_layers)]
    k = kda_dims(cfg)
    H, hd, K = k["heads"], k["head_dim"], k["kernel"]
    mla = _MLA(cfg, d, heads)
    inv = Inventory()
    layers = []
    for i, kind in enumerate(layer_types(cfg, n_layers)):
        if kind == "full_attention":
            m = mla.build(inv, i, "attention")
            layers.append(LayerSpec(index=i, mixer="mla", moe=is_moe[i], kv_per_token=m.kv_per_token,
                                    attn_flops_per_ctx=m.attn_flops_per_ctx))
        else:
            p = f"layers.{i}.attn"
            for n in ("q", "k", "v"):
                inv.linear(f"{p}.{n}_proj", "attention", H * hd, d, i)
            inv.add(f"{p}.conv1d.weight", "attention", (3 * H * hd, 1, K), i)
            inv.linear(f"{p}.forget_gate.f_a_proj", "attention", hd, d, i)
            inv.linear(f"{p}.forget_gate.f_b_proj", "attention", H * hd, hd, i)
            inv.add(f"{p}.forget_gate.dt_bias", "attention", (H * hd,), i)
            inv.add(f"{p}.forget_gate.A_log", "attention", (1, 1, H, 1), i)
            inv.linear(f"{p}.b_proj", "attention", H, d, i)
            inv.linear(f"{p}.g_a_proj", "attention", hd, d, i)
            inv.linear(f"{p}.g_b_proj", "attention", H * hd, hd, i)
            inv.norm(f"{p}.o_norm", hd, i)
            inv.linear(f"{p}.o_proj", "attention", d, H * hd, i)
            layers.append(LayerSpec(index=i, mixer="kda", moe=is_moe[i],
                                    state_elems=(K - 1) * 3 * H * hd + H * hd * hd))
        inv.norm(f"layers.{i}.input_norm", d, i)
        inv.norm(f"layers.{i}.post_attention_norm", d, i)
        if is_moe[i]:
            inv.linear(f"layers.{i}.router", "router", E, d, i)
            inv.swiglu(f"layers.{i}.experts", "routed_experts", d, F, i, copies=E)
            inv.swiglu(f"layers.{i}.shared_experts", "shared_experts", d, F * shared, i)
        else:
            inv.swiglu(f"layers.{i}.mlp", "dense_mlp", d, cfg.int("intermediate_size", min_value=1), i)
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family="kimi_linear", hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_position_embeddings") or cfg.raw("model_max_length"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def register(table: dict) -> None:
    table["kimi_linear"] = adapt
