"""Nemotron-H / Nemotron-3 (nemotron_h, e.g. nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B): every layer is
ONE pre-norm block with a single sublayer, `layers_block_type` (or `hybrid_override_pattern`:
M Mamba-2, * attention, E MoE, - MLP): Mamba-2, attention (no RoPE), a MoE, or a dense MLP.
MLPs and experts are ungated (up, relu2, down); MoE: DeepSeek-V3 routing (sigmoid, correction
bias for selection, groups, routed_scaling_factor), a shared expert, and optional latent
projections (experts run in `moe_latent_size` dimensions). Stored under `backbone.` by NVIDIA,
`model.` by transformers."""

from __future__ import annotations

from ..errors import BadConfig
from ..spec import Cfg, Inventory, LayerSpec, ModelSpec, MoESpec, RouterSpec
from . import common
from .granitemoehybrid import mamba2_params

PATTERN = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
ALIASES = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention", "attention": "attention",
           "moe": "moe", "mlp": "mlp"}


def block_types(cfg: Cfg) -> list[str]:
    """mamba / attention / moe / mlp per layer."""
    if cfg.has("layers_block_type") or cfg.has("layer_types"):
        key = "layers_block_type" if cfg.has("layers_block_type") else "layer_types"
        raw = cfg.str_list(key)
        if any(t not in ALIASES for t in raw):
            raise BadConfig(f"{cfg.where}: {key} entries must be among {', '.join(sorted(ALIASES))}")
        types = [ALIASES[t] for t in raw]
    else:
        pattern = cfg.str("hybrid_override_pattern", "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-")
        if any(ch not in PATTERN for ch in pattern):
            raise BadConfig(f"{cfg.where}: hybrid_override_pattern may hold only M, *, E and -, got {pattern!r}")
        types = [PATTERN[ch] for ch in pattern]
    if not types or len(types) > Cfg.LIMITS["num_hidden_layers"]:
        raise BadConfig(f"{cfg.where}: the layer pattern must name between 1 and 10000 layers")
    return types


def mamba2_dims(cfg: Cfg) -> dict:
    return dict(heads=cfg.int("mamba_num_heads", 128, min_value=1), head_dim=cfg.int("mamba_head_dim", 64, min_value=1),
                groups=cfg.first_int(["n_groups", "mamba_n_groups"], 8, min_value=1),
                d_state=cfg.int("ssm_state_size", 128, min_value=1),
                d_conv=cfg.first_int(["conv_kernel", "mamba_d_conv"], 4, min_value=1))


def adapt(cfg: Cfg, model_type: str = "nemotron_h") -> ModelSpec:
    d = cfg.int("hidden_size", min_value=1)
    vocab = cfg.int("vocab_size", min_value=1)
    types = block_types(cfg)
    n_layers = len(types)
    heads, kv_heads, hd = common.attention_dims(cfg, d)
    tie = common.tie_embeddings(cfg)
    mlp_bias = cfg.bool("mlp_bias", False)  # attention has no biases whatever attention_bias says
    moe = None
    if "moe" in types:
        moe = MoESpec(num_experts=cfg.first_int(["n_routed_experts", "num_local_experts"], 8, min_value=1),
                      top_k=cfg.int("num_experts_per_tok", 2, min_value=1),
                      expert_ffn=cfg.int("moe_intermediate_size", 7688, min_value=1), num_shared_experts=1,
                      shared_ffn=cfg.int("moe_shared_expert_intermediate_size", 7688, min_value=1),
                      activation=cfg.str("mlp_hidden_act", "relu2"),
                      router=RouterSpec(scoring="sigmoid", norm_topk_prob=cfg.bool("norm_topk_prob", True),
                                        routed_scaling_factor=cfg.float("routed_scaling_factor", 1.0),
                                        topk_method="noaux_tc", n_group=cfg.int("n_group", 1, min_value=1),
                                        topk_group=cfg.int("topk_group", 1, min_value=1), correction_bias=True))
    latent = cfg.int("moe_latent_size", 0)
    m = mamba2_dims(cfg)
    inv = Inventory()
    layers = []
    for i, kind in enumerate(types):
        p = f"layers.{i}.mixer"
        inv.norm(f"layers.{i}.norm", d, i)
        if kind == "mamba":
            state = mamba2_params(inv, p, i, d, m, _conv_bias(cfg), cfg.bool("use_bias", False))
            layers.append(LayerSpec(index=i, mixer="mamba2", moe=False, state_elems=state))
        elif kind == "attention":
            inv.gqa(i, d, heads, kv_heads, hd)
            layers.append(common.gqa_layer(i, heads, kv_heads, hd, False))
        elif kind == "moe":
            E, F, Fs = moe.num_experts, moe.expert_ffn, moe.shared_ffn
            din = latent or d
            inv.linear(f"{p}.router", "router", E, d, i)
            inv.linear(f"{p}.experts.up", "routed_experts", F, din, i, copies=E)
            inv.linear(f"{p}.experts.down", "routed_experts", din, F, i, copies=E)
            inv.linear(f"{p}.shared_experts.up", "shared_experts", Fs, d, i, mlp_bias)
            inv.linear(f"{p}.shared_experts.down", "shared_experts", d, Fs, i, mlp_bias)
            if latent:  # every token goes through them: counted with the dense MLP parameters
                inv.linear(f"{p}.fc1_latent_proj", "dense_mlp", latent, d, i, mlp_bias)
                inv.linear(f"{p}.fc2_latent_proj", "dense_mlp", d, latent, i, mlp_bias)
            layers.append(LayerSpec(index=i, mixer="none", moe=True))
        else:
            f = cfg.int("intermediate_size", 21504, min_value=1)
            inv.linear(f"{p}.up", "dense_mlp", f, d, i, mlp_bias)
            inv.linear(f"{p}.down", "dense_mlp", d, f, i, mlp_bias)
            layers.append(LayerSpec(index=i, mixer="none", moe=False))
    common.embed_and_head(inv, cfg, vocab, d, tie)
    return ModelSpec(model_type=model_type, family="nemotron_h", hidden_size=d, vocab_size=vocab, num_layers=n_layers,
                     layers=tuple(layers), params=tuple(inv.params), moe=moe, tie_word_embeddings=tie,
                     max_position_embeddings=cfg.raw("max_position_embeddings"),
                     torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype"), quantization=common.quantization(cfg))


def _conv_bias(cfg: Cfg) -> bool:
    return cfg.bool("use_conv_bias", cfg.bool("mamba_conv_bias", True))


def register(table: dict) -> None:
    table["nemotron_h"] = adapt
