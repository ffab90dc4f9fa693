"""Text MoE families added for issue 11 that are built like Llama (GQA attention, RMSNorm, SwiGLU
experts) and differ from the `llama_like` families only in data: one `Style` each, next to the
transformers model it follows. Their forward-pass details (RoPE layout, router variant) are in
`moetool/forward/config.py` (`FAMILY_FORWARD`).
"""

from __future__ import annotations

from ..errors import BadConfig
from ..spec import Cfg, RouterSpec
from . import common, llama_like
from .llama_like import Style


def _ernie_schedule(c: Cfg, n: int) -> list[bool]:
    """MoE where (i + 1) % moe_layer_interval == 0 and start <= i <= end (end -1: the last layer)."""
    step = c.int("moe_layer_interval", 1, min_value=1)
    start, end = c.int("moe_layer_start_index", 1), c.raw("moe_layer_end_index", -1)
    end = n - 1 if end == -1 else int(end)
    return [(i + 1) % step == 0 and start <= i <= end for i in range(n)]


def _deepseek_v3_router(c: Cfg, norm_default: bool = False) -> RouterSpec:
    """DeepSeek-V3's router (families that reuse DeepseekV3TopkRouter / Glm4MoeTopkRouter)."""
    return RouterSpec(scoring="sigmoid", norm_topk_prob=c.bool("norm_topk_prob", norm_default),
                      routed_scaling_factor=c.float("routed_scaling_factor", 1.0), topk_method="noaux_tc",
                      n_group=c.int("n_group", 1, min_value=1), topk_group=c.int("topk_group", 1, min_value=1),
                      correction_bias=True)


def _mlp_layer_types(first_k_default: int):
    """MoE per `mlp_layer_types` ("dense" / "sparse"); without it, dense below first_k_dense_replace."""
    def schedule(c: Cfg, n: int) -> list[bool]:
        if c.has("mlp_layer_types"):
            types = c.str_list("mlp_layer_types")
            if len(types) < n:
                raise BadConfig(f"{c.where}: mlp_layer_types has {len(types)} entries for {n} layers")
            return [t == "sparse" for t in types[:n]]
        k = c.int("first_k_dense_replace", first_k_default)
        return [i >= k for i in range(n)]
    return schedule


STYLES: dict[str, Style] = {
    # baidu/ERNIE-4.5-21B-A3B-PT: `use_bias` on attention, dense / shared MLPs and the LM head;
    # softmax router whose top-k adds a counted correction bias (`moe_statics`), weights renormalised.
    "ernie4_5_moe": Style("ernie4_5_moe", experts_keys=("moe_num_experts",), expert_ffn_key="moe_intermediate_size",
                          top_k_keys=("moe_k",), bias=lambda c: "all" if c.bool("use_bias", False) else "none",
                          moe_schedule=_ernie_schedule,
                          shared_ffn=lambda c: c.int("moe_intermediate_size") * c.int("moe_num_shared_experts", 2),
                          mlp_bias=lambda c: c.bool("use_bias", False), head_bias=lambda c: c.bool("use_bias", False),
                          correction_bias_param=True, windows="none",
                          router=lambda c: RouterSpec(norm_topk_prob=True, correction_bias=True)),
    # tencent/Hunyuan-A13B-Instruct: QK-norm per head after RoPE (query_layernorm / key_layernorm);
    # every layer MoE with an always-on shared MLP of intermediate_size; router `gate.wg`, softmax top-k, renormalised.
    "hunyuan_v1_moe": Style("hunyuan_v1_moe", experts_keys=("num_experts", "num_local_experts"), top_k_keys=("moe_topk",),
                            bias=lambda c: "all" if c.bool("attention_bias", False) else "none", qk_norm="head_after_rope",
                            shared_ffn=lambda c: c.int("intermediate_size"), windows="none",
                            router=lambda c: RouterSpec(norm_topk_prob=True)),
    # allenai/FlexOlmo-7x7B-1T: OLMoE's experts and router with Olmo 2's layer: norms after attention
    # and after the FFN (none before), QK-norm over the full projections.
    "flex_olmo": Style("flex_olmo", experts_keys=("num_experts", "num_local_experts"), qk_norm="full", windows="none",
                       bias=lambda c: "all" if c.bool("attention_bias", False) else "none",
                       router=lambda c: RouterSpec(norm_topk_prob=c.bool("norm_topk_prob", False))),
    # MiniMaxAI/MiniMax-M2: Mixtral's layout with Olmo 2's full-width QK-norm, partial RoPE
    # (rotary_dim), and a sigmoid router with a correction bias for the choice, weights renormalised.
    "minimax_m2": Style("minimax_m2", qk_norm="full", windows="none",
                        router=lambda c: RouterSpec(scoring="sigmoid", norm_topk_prob=True, correction_bias=True)),
    # rednote-hilab/dots.llm1.base: Qwen3's attention (QK-norm per head) with DeepSeek-V3's MoE:
    # sigmoid router + correction bias, groups, routed_scaling_factor, shared experts, first k layers dense.
    "dots1": Style("dots1", experts_keys=("n_routed_experts", "num_local_experts"), expert_ffn_key="moe_intermediate_size",
                   bias=lambda c: "all" if c.bool("attention_bias", False) else "none", qk_norm="head", windows="from_max",
                   moe_schedule=lambda c, n: common.first_k_dense_schedule(c, n, True),
                   shared_ffn=lambda c: c.int("moe_intermediate_size") * c.int("n_shared_experts", 0),
                   router=_deepseek_v3_router),
    # ibm-granite/granite-4.0-tiny-preview's MoE: GraniteMoE plus an ungated shared MLP of
    # shared_intermediate_size (0: none), stored fused as shared_mlp.input_linear [2F, D].
    "granitemoeshared": Style("granitemoeshared", windows="none",
                              bias=lambda c: "all" if c.bool("attention_bias", False) else "none",
                              shared_ffn=lambda c: c.int("shared_intermediate_size", 0),
                              router=lambda c: RouterSpec(order="topk_then_score")),
    # upstage/Solar-Open-100B: Llama attention (q/k/v biases, no o bias) on every layer with GLM-4.5's
    # MoE (DeepSeek-V3 router, norm_topk_prob default true, shared experts).
    "solar_open": Style("solar_open", experts_keys=("n_routed_experts", "num_local_experts"),
                        expert_ffn_key="moe_intermediate_size", windows="none",
                        bias=lambda c: "qkv" if c.bool("attention_bias", False) else "none",
                        shared_ffn=lambda c: c.int("moe_intermediate_size") * c.int("n_shared_experts", 1),
                        router=lambda c: _deepseek_v3_router(c, norm_default=True)),
    # LGAI-EXAONE/K-EXAONE-236B-A23B: EXAONE 4 attention (QK-norm per head; RoPE only on the sliding
    # layers, global layers NoPE) with DeepSeek-V3's MoE; schedule from mlp_layer_types.
    "exaone_moe": Style("exaone_moe", experts_keys=("num_experts", "num_local_experts"), expert_ffn_key="moe_intermediate_size",
                        qk_norm="head", windows="pattern", moe_schedule=_mlp_layer_types(1),
                        shared_ffn=lambda c: c.int("moe_intermediate_size") * c.int("num_shared_experts", 1),
                        router=lambda c: _deepseek_v3_router(c, norm_default=True)),
    # CohereLabs/command-a-...-moe (cohere2_moe): parallel attention + FFN blocks, weight-only
    # LayerNorm (or RMSNorm), RoPE only on sliding layers (and the dense prefix), router top-k of the
    # logits then softmax (or sigmoid), shared experts summed or averaged with the routed output.
    "cohere2_moe": Style("cohere2_moe", experts_keys=("num_experts", "num_local_experts"), windows="pattern",
                         bias=lambda c: "all" if c.bool("attention_bias", False) else "none",
                         moe_schedule=_mlp_layer_types(0), dense_ffn_key="prefix_dense_intermediate_size",
                         shared_ffn=lambda c: c.int("intermediate_size") * c.int("num_shared_experts", 0),
                         tie_default=True, parallel_block=True,
                         router=lambda c: RouterSpec(order="topk_then_score", scoring=c.str("expert_selection_fn", "softmax"),
                                                     norm_topk_prob=c.bool("norm_topk_prob", True))),
}


def register(table: dict) -> None:
    for mt, style in STYLES.items():
        table[mt] = lambda cfg, mt=mt, style=style: llama_like.adapt(cfg, mt, style)
