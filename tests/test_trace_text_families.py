"""trace of the text MoE families that `count` handled exactly but `trace` refused (issue 11, item 3),
against transformers 5.23: tiny random checkpoints written by `save_pretrained`, two seeds each, every
bias, correction bias, sink and norm weight randomised (so a misplaced norm or a dropped bias shows).

Logits within 1e-4 of transformers' (float32) and, in every MoE layer, the same expert set and gate
weights (1e-5) for every token, read by a pre-hook on transformers' experts modules
(tests/test_forward_families.py's `reference_routes`), independently of its router classes.
"""

from __future__ import annotations

import pytest
import torch

from fakes import DEVICE, assert_matches_transformers, build_transformers_model, randomize_biases
from moetool.forward import run_forward
from moetool.source import resolve
from test_bad_input import run_cli
from test_forward_families import reference_routes

_C = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_hidden_layers=4,
          max_position_embeddings=256, initializer_range=0.2)
_SWA4 = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

FAMILIES: dict[str, dict] = {
    # Kolibri-1: Exaone-4 attention (QK-norm, RoPE on sliding layers only), four norms a layer,
    # router: top-k of (logits + correction bias), sigmoid of the chosen logits; shared expert.
    "kolibri1": dict(model_type="kolibri1", moe_intermediate_size=16, shared_expert_intermediate_size=24,
                     num_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=4, layer_types=_SWA4, **_C),
    "kolibri1-norm": dict(model_type="kolibri1", moe_intermediate_size=16, shared_expert_intermediate_size=16,
                          num_experts=6, num_experts_per_tok=3, head_dim=16, sliding_window=5, norm_topk_prob=True,
                          layer_types=["sliding_attention"] * 3 + ["full_attention"], **_C),
    # Mellum: Qwen3-MoE attention with sliding layers and RoPE parameters per layer type.
    "mellum": dict(model_type="mellum", intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                   num_experts_per_tok=2, head_dim=8, sliding_window=4, layer_types=_SWA4,
                   mlp_layer_types=["dense", "sparse", "sparse", "sparse"], attention_bias=True,
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 500000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}, **_C),
    # HY-V3: Apertus attention (QK-norm per head), sigmoid router + correction bias, renormalised and
    # scaled by router_scaling_factor; shared experts; dense layer 0 (mlp_layer_types).
    "hy_v3": dict(model_type="hy_v3", intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                  num_experts_per_tok=2, num_shared_experts=2, router_scaling_factor=2.5, head_dim=8,
                  attention_bias=True, tie_word_embeddings=False, **_C),
    # Flint: sinks on every layer, RoPE only on sliding layers, sigmoid top-k without bias, ungated
    # shared expert; dense layers by mlp_only_layers.
    "flint": dict(model_type="flint", intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                  num_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=4, layer_types=_SWA4,
                  mlp_only_layers=[0], attention_bias=True, **_C),
    "flint-nonorm": dict(model_type="flint", intermediate_size=48, moe_intermediate_size=16,
                         shared_expert_intermediate_size=16, num_experts=6, num_experts_per_tok=3, head_dim=16,
                         sliding_window=6, norm_topk_prob=False, mlp_only_layers=[],
                         layer_types=["full_attention"] + ["sliding_attention"] * 3, **_C),
    # GraniteMoE-SWA: GraniteMoE's multipliers and router, sinks (as a softmax-denominator logit),
    # RoPE theta per layer (0: NoPE), shared MLP.
    "granitemoe_swa": dict(model_type="granitemoe_swa", intermediate_size=24, shared_intermediate_size=40,
                           num_local_experts=8, num_experts_per_tok=2, attention_bias=True, embedding_multiplier=2.0,
                           attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=4.0, sliding_window=4,
                           layer_types=_SWA4, layer_rope_theta=[10000.0, 0, 500.0, 10000.0], **_C),
    # AFMoE: sigmoid output gate [H*Dh, D], RoPE only on sliding layers, four norms, sigmoid router +
    # expert_bias, renormalised, times route_scale; shared experts; muP embedding scale.
    "afmoe": dict(model_type="afmoe", intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                  num_experts_per_tok=2, num_shared_experts=1, num_dense_layers=1, route_scale=2.0, head_dim=8,
                  sliding_window=4, global_attn_every_n_layers=2, attention_bias=True, **_C),
    "afmoe-mup": dict(model_type="afmoe", intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                      num_experts_per_tok=3, num_shared_experts=2, num_dense_layers=2, route_scale=1.0, head_dim=16,
                      sliding_window=5, global_attn_every_n_layers=4, mup_enabled=True, **_C),
    # Laguna: per-layer head counts, softplus output gate per head (or per channel), partial RoPE per
    # layer type, router logits soft-capped, sigmoid + correction bias, routed sum scaled after the experts.
    "laguna": dict(model_type="laguna", intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                   num_experts_per_tok=2, shared_expert_intermediate_size=24, head_dim=8, sliding_window=4,
                   num_attention_heads_per_layer=[4, 2, 6, 4], layer_types=_SWA4, moe_routed_scaling_factor=1.5,
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 500000.0,
                                                       "partial_rotary_factor": 0.5},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 1.0}}, **_C),
    "laguna-channel": dict(model_type="laguna", intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                           num_experts_per_tok=3, shared_expert_intermediate_size=16, head_dim=8, sliding_window=5,
                           gating="per-element", moe_router_logit_softcapping=1.5, attention_bias=True,
                           layer_types=_SWA4, mlp_layer_types=["sparse", "dense", "sparse", "sparse"],
                           rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
                           **_C),
    # MiMo-V2-Flash: sliding layers with twice the KV heads and sinks, narrower V heads scaled by
    # attention_value_scale, partial RoPE per layer type, DeepSeek-V3's router (groups, scaling).
    "mimo_v2_flash": dict(model_type="mimo_v2_flash", intermediate_size=48, moe_intermediate_size=16,
                          n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                          routed_scaling_factor=2.0, head_dim=24, v_head_dim=8, sliding_window=4, layer_types=_SWA4,
                          attention_bias=True, attention_value_scale=0.5, **_C),
    # Beam: RoPE on sliding layers only (rope_parameters null for full attention), NoPE queries scaled
    # by position, sigmoid output gate with a per-head bias, four norms, depth-scaled residual adds,
    # DeepSeek-V3 group router with the routed sum scaled after the experts, final logit soft-capping.
    "beam": dict(model_type="beam", intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                 num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, head_dim=8,
                 sliding_window=4, layer_types=_SWA4, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
                 attention_bias=True, final_logit_softcapping=3.0, **_C),
    # OpenAI privacy filter: gpt-oss layers as a bidirectional encoder (|i - j| <= sliding_window), sinks,
    # q and k each scaled by head_dim ** -0.25, experts [D, 2F] with [gate | up] concatenated and biases,
    # router softmax(top-k logits) / k with the routed sum times k; token-classification head `score`.
    "openai_privacy_filter": dict(model_type="openai_privacy_filter", intermediate_size=16, num_local_experts=8,
                                  num_experts_per_tok=2, head_dim=8, sliding_window=3, num_labels=5, pad_token_id=0,
                                  eos_token_id=0, swiglu_limit=2.0, **_C),
    # A.X-K1: DeepSeek-V3 (MLA with Q-LoRA, group sigmoid router + correction bias, shared expert) with
    # an RMSNorm on the MoE block's output; dense / sparse by mlp_layer_types.
    "axk1": dict(model_type="axk1", intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                 mlp_layer_types=["dense", "sparse", "dense", "sparse"], q_lora_rank=16, kv_lora_rank=8,
                 qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, **{**_C, "num_key_value_heads": 4}),
    # LongCat-Flash: two MLA (LoRA-scaled) + MLP sublayers per layer and a shortcut MoE; the router picks
    # k of E routed + Z zero (identity) experts: softmax, correction bias for the choice, scaled weights.
    "longcat_flash": dict(model_type="longcat_flash", hidden_size=32, num_attention_heads=4, vocab_size=128,
                          num_layers=2, max_position_embeddings=256, ffn_hidden_size=48, expert_ffn_hidden_size=16,
                          n_routed_experts=6, zero_expert_num=3, moe_topk=3, routed_scaling_factor=1.5,
                          q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                          head_dim=4),
}
SEEDS = (0, 1)
T = 40


def _build(config: dict, seed: int):
    """transformers' model of `config`: the causal LM, or the token classifier of the privacy filter."""
    if config["model_type"] == "openai_privacy_filter":
        import transformers

        torch.manual_seed(seed)
        return transformers.AutoModelForTokenClassification.from_config(transformers.AutoConfig.for_model(**config))
    return build_transformers_model(config, seed=seed)


def routes_and_logits(model, ids) -> tuple[torch.Tensor, dict]:
    """reference_routes; the privacy filter's experts take the choice as router_indices / routing_weights."""
    captured: dict[int, tuple] = {}
    hooks = []
    for name, module in model.named_modules():
        if name.endswith("mlp.experts") and type(module).__name__ == "OpenAIPrivacyFilterExperts":
            layer = int(name.split("layers.")[1].split(".")[0])

            def hook(mod, args, layer=layer):
                captured[layer] = (args[1].detach().clone(), args[2].detach().float().clone())

            hooks.append(module.register_forward_pre_hook(hook))
    if not hooks:
        return reference_routes(model, ids)
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    for h in hooks:
        h.remove()
    return logits, captured


def randomize(model, seed: int) -> None:
    """Biases, correction biases and sinks (fakes.randomize_biases), and every norm weight. AFMoE's
    selection bias (`expert_bias`) gets a correction bias's scale and a matrix an init left at zero
    (AFMoE's router) random values, so that routing depends on the token (with the configs'
    initializer_range 0.2, every MoE layer routes tokens to many different expert sets)."""
    randomize_biases(model, seed)
    g = torch.Generator().manual_seed(seed + 2000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight"):
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
            if name.endswith("expert_bias"):
                p.mul_(0.1)
            if p.dim() >= 2 and not p.any():  # a matrix left at zero by its init (AFMoE's router)
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def build_case(tmp_path_factory, config: dict, name: str, seed: int, randomize_fn=None) -> tuple:
    """transformers' model of `config` (seeded, randomised by `randomize_fn`, default `randomize`), saved:
    (directory, T token ids, reference logits, reference routes, the model). Also used by
    tests/test_trace_gap_families.py and tests/test_trace_hyper.py."""
    model = _build(config, seed).eval()
    (randomize_fn or randomize)(model, seed)
    d = tmp_path_factory.mktemp(f"{name}-{seed}")
    model.save_pretrained(d)
    ids = torch.randint(0, config["vocab_size"], (1, T), generator=torch.Generator().manual_seed(seed))
    logits, routes = routes_and_logits(model, ids)
    return d, ids[0].tolist(), logits, routes, model


@pytest.fixture(scope="session")
def text_family(tmp_path_factory):
    """text_family(name, seed) -> (directory, ids, reference logits, reference routes), built once."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            cache[name, seed] = build_case(tmp_path_factory, FAMILIES[name], name, seed)[:4]
        return cache[name, seed]

    return get


CASES = [(n, s) for n in FAMILIES for s in SEEDS]


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, text_family):
    d, ids, ref_logits, ref_routes = text_family(name, seed)
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE)
    assert_matches_transformers(out, ref_logits, ref_routes, varied="any")


def test_token_classifier_refuses_generate(text_family):
    """The privacy filter's head scores labels: there is no next token to generate (one line, exit 2)."""
    d, _, _, _ = text_family("openai_privacy_filter", 0)
    r = run_cli("trace", str(d), "--tokens", "1,2,3", "--generate", "2")
    assert r.returncode == 2, r.stderr
    assert "token classifier" in r.stderr and "Traceback" not in r.stderr
