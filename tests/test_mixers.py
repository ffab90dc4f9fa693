"""Each mixer module of moetool/forward/mixers/ against the transformers module it reimplements:
the same random weights (every parameter drawn afresh, not the init values), the same input,
float32, on transformers' torch (non-kernel) path. Also: running a sequence in two pieces with
the recurrent state equals running it at once."""

from __future__ import annotations

import pytest
import torch
import transformers

from moetool.forward.mixers import gated_deltanet, kda, lightning, mamba, mamba2, short_conv

T, D = 37, 32


def _randomize(module, seed: int, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def _weights(module) -> dict:
    return {n: p.detach() for n, p in module.named_parameters()}


def _x(seed: int) -> torch.Tensor:
    return torch.randn(1, T, D, generator=torch.Generator().manual_seed(seed + 100))


def _jamba_mixer(seed: int, **kw):
    from transformers.models.jamba.modeling_jamba import JambaMambaMixer
    cfg = transformers.JambaConfig(hidden_size=D, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=5,
                                   num_hidden_layers=2, **kw)
    m = _randomize(JambaMambaMixer(cfg, 0), seed)
    with torch.no_grad():
        m.A_log.copy_(torch.rand(m.A_log.shape, generator=torch.Generator().manual_seed(seed)) * 2)
    c = mamba.MambaConfig(inner=2 * D, d_state=8, d_conv=4, dt_rank=5, eps=cfg.rms_norm_eps)
    return m, c


def _qwen3_next_gdn(seed: int):
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet
    cfg = transformers.Qwen3NextConfig(hidden_size=D, linear_num_key_heads=2, linear_num_value_heads=4,
                                       linear_key_head_dim=8, linear_value_head_dim=6, linear_conv_kernel_dim=4,
                                       num_hidden_layers=2)
    c = gated_deltanet.GatedDeltaNetConfig(k_heads=2, v_heads=4, k_dim=8, v_dim=6, kernel=4, eps=cfg.rms_norm_eps)
    return _randomize(Qwen3NextGatedDeltaNet(cfg, 0), seed), c


def _qwen3_5_gdn(seed: int):
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeGatedDeltaNet
    cfg = transformers.Qwen3_5MoeTextConfig(hidden_size=D, linear_num_key_heads=2, linear_num_value_heads=2,
                                            linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=3,
                                            num_hidden_layers=2)
    c = gated_deltanet.GatedDeltaNetConfig(k_heads=2, v_heads=2, k_dim=8, v_dim=8, kernel=3, eps=cfg.rms_norm_eps)
    return _randomize(Qwen3_5MoeGatedDeltaNet(cfg, 0), seed), c


def _granite_mamba2(seed: int, groups: int = 2, **kw):
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMambaLayer
    cfg = transformers.GraniteMoeHybridConfig(hidden_size=D, mamba_n_heads=8, mamba_d_state=6, mamba_n_groups=groups,
                                              mamba_expand=2, mamba_d_conv=4, num_hidden_layers=1,
                                              layer_types=["mamba"], **kw)
    lo, hi = cfg.time_step_limit
    c = mamba2.Mamba2Config(heads=8, head_dim=8, groups=groups, d_state=6, d_conv=4, eps=cfg.rms_norm_eps,
                            dt_min=lo, dt_max=hi)
    return _randomize(GraniteMoeHybridMambaLayer(cfg, 0), seed), c


def _lfm2_conv(seed: int, bias: bool = False):
    from transformers.models.lfm2_moe.modeling_lfm2_moe import Lfm2MoeShortConv
    cfg = transformers.Lfm2MoeConfig(hidden_size=D, conv_L_cache=3, conv_bias=bias, num_hidden_layers=1,
                                     layer_types=["conv"])
    return _randomize(Lfm2MoeShortConv(cfg, 0), seed), short_conv.ShortConvConfig(kernel=3)


def _nemotron_mamba2(seed: int):
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer
    cfg = transformers.NemotronHConfig(hidden_size=D, mamba_num_heads=4, mamba_head_dim=12, ssm_state_size=8,
                                       n_groups=2, conv_kernel=4, time_step_min=0.01, use_bias=True,
                                       hybrid_override_pattern="M")
    c = mamba2.Mamba2Config(heads=4, head_dim=12, groups=2, d_state=8, d_conv=4, eps=cfg.layer_norm_epsilon,
                            dt_min=0.01)
    return _randomize(NemotronHMamba2Mixer(cfg, 0), seed), c


def _minimax_lightning(seed: int, layer: int = 2):
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention
    cfg = transformers.MiniMaxConfig(hidden_size=D, num_attention_heads=4, head_dim=8, num_hidden_layers=5, block_size=8)
    m = MiniMaxLightningAttention(cfg, layer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # parameters only: the decay buffers are the layer's schedule
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    c = lightning.for_layer(lightning.LightningConfig(heads=4, head_dim=8, num_layers=5), layer)
    return _Out0(m.eval()), c


class _Out0(torch.nn.Module):
    """MiniMax's module needs position embeddings and a mask argument and returns a pair."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x, None, None)[0]

    def named_parameters(self, *a, **kw):
        return self.m.named_parameters(*a, **kw)


def _kimi_kda(seed: int):
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention
    cfg = transformers.KimiLinearConfig(hidden_size=D, num_hidden_layers=1, layer_types=["linear_attention"],
                                        linear_attn_config=dict(num_heads=4, head_dim=8, short_conv_kernel_size=4),
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, vocab_size=64)
    c = kda.KDAConfig(heads=4, head_dim=8, kernel=4, eps=cfg.rms_norm_eps)
    return _randomize(KimiLinearDeltaAttention(cfg, 0), seed), c


CASES = {
    "mamba-jamba": (_jamba_mixer, mamba),
    "mamba-jamba-bias": (lambda s: _jamba_mixer(s, mamba_proj_bias=True), mamba),
    "gated_deltanet-qwen3_next": (_qwen3_next_gdn, gated_deltanet),
    "gated_deltanet-qwen3_5": (_qwen3_5_gdn, gated_deltanet),
    "mamba2-granite": (_granite_mamba2, mamba2),
    "mamba2-granite-limits": (lambda s: _granite_mamba2(s, groups=1, mamba_proj_bias=True, time_step_limit=(0.1, 0.8)),
                              mamba2),
    "mamba2-nemotron_h": (_nemotron_mamba2, mamba2),
    "short_conv-lfm2": (_lfm2_conv, short_conv),
    "kda-kimi_linear": (_kimi_kda, kda),
    "lightning-minimax-layer0": (lambda s: _minimax_lightning(s, 0), lightning),
    "lightning-minimax-layer3": (lambda s: _minimax_lightning(s, 3), lightning),
    "short_conv-lfm2-bias": (lambda s: _lfm2_conv(s, bias=True), short_conv),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_mixer_matches_transformers(case, seed):
    build, module = CASES[case]
    ref_module, c = build(seed)
    x = _x(seed)
    with torch.no_grad():
        ref = ref_module(x)[0]
        ours = module.forward(_weights(ref_module), x[0], c)
    assert ref.abs().max() > 0.05
    assert (ours - ref).abs().max().item() < 2e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_carries_across_calls(case):
    build, module = CASES[case]
    ref_module, c = build(3)
    x, w = _x(3)[0], _weights(ref_module)
    with torch.no_grad():
        whole = module.forward(w, x, c)
        state: dict = {}
        parts = [module.forward(w, x[a:b], c, state) for a, b in ((0, 20), (20, 21), (21, T))]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-5)
