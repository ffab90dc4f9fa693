"""Qwen3-Omni (model_type `qwen3_omni_moe`, Qwen/Qwen3-Omni-30B-A3B), counted whole as transformers'
Qwen3OmniMoeForConditionalGeneration builds it:

- `thinker` (thinker_config): the Qwen3-MoE text model with its vision and audio-input towers, counted by
  the `qwen3_omni_moe_thinker` family of arch/multimodal.py (names prefixed "thinker.");
- `talker` (talker_config, only with `enable_audio_output`, default true): a second MoE decoder that turns
  the thinker's hidden states into speech codec tokens (every layer a routed MoE of its own E and k, plus
  a sigmoid-gated shared expert), two projections from the thinker's width, its codec embedding and head,
  and the multi-token `code_predictor` (a dense Qwen3-style decoder with one embedding and one head per
  further code group);
- `code2wav` (code2wav_config, same switch): the codec decoder (a sliding-window transformer with layer
  scales, ConvNeXt upsamplers, SnakeBeta / causal-conv decoder blocks) to the waveform.

Convention (documented in the notes of every count): the talker and code2wav only run to produce speech,
so they are counted in the "audio" group with the audio-input encoder; `active_params`, FLOPs, E, k and
the routed_experts group are those of the thinker's language model for one text token (the talker's own
128 routed experts are in "audio", and its E / k are stated in a note). Header counts agree: the
tensor-name rules (moetool/names.py) put `talker.*` and `code2wav.*` in "audio".
"""

from __future__ import annotations

from dataclasses import replace

from ..spec import Cfg, Inventory, ModelSpec
from . import multimodal

_G = "audio"


def _lin(inv: Inventory, name: str, out: int, inp: int, bias: bool = False) -> None:
    inv.add(f"{name}.weight", _G, (out, inp), matmul=True)
    if bias:
        inv.add(f"{name}.bias", _G, (out,))


def _vec(inv: Inventory, name: str, dim: int) -> None:
    inv.add(name, _G, (dim,))


def _conv1d(inv: Inventory, name: str, out: int, inp: int, kernel: int) -> None:
    inv.add(f"{name}.weight", _G, (out, inp, kernel))
    inv.add(f"{name}.bias", _G, (out,))


def _attention(inv: Inventory, b: str, c: Cfg, d: int, qk_norm: bool) -> None:
    """Qwen3-style attention: q/k/v/o (biases with attention_bias), per-head q/k RMSNorms. head_dim as
    transformers' getattr(config, "head_dim", hidden // heads)."""
    h = c.int("num_attention_heads", min_value=1)
    kv = c.int("num_key_value_heads", h, min_value=1)
    hd = c.int("head_dim", d // h, min_value=1)
    bias = c.bool("attention_bias", False)
    _lin(inv, f"{b}.self_attn.q_proj", h * hd, d, bias), _lin(inv, f"{b}.self_attn.k_proj", kv * hd, d, bias)
    _lin(inv, f"{b}.self_attn.v_proj", kv * hd, d, bias), _lin(inv, f"{b}.self_attn.o_proj", d, h * hd, bias)
    if qk_norm:
        _vec(inv, f"{b}.self_attn.q_norm.weight", hd), _vec(inv, f"{b}.self_attn.k_norm.weight", hd)


def _swiglu(inv: Inventory, b: str, d: int, f: int) -> None:
    _lin(inv, f"{b}.gate_proj", f, d), _lin(inv, f"{b}.up_proj", f, d), _lin(inv, f"{b}.down_proj", d, f)


def talker(inv: Inventory, tc: Cfg) -> tuple[int, int]:
    """Qwen3OmniMoeTalkerForConditionalGeneration; -> the talker's (E, k)."""
    t = tc.sub("text_config")
    d, vocab = t.int("hidden_size", 1024, min_value=1), t.int("vocab_size", 3072, min_value=1)
    # the field is num_local_experts (num_experts its attribute_map alias; where both are stored, transformers
    # builds num_local_experts)
    E = t.first_int(["num_local_experts", "num_experts"], 128, min_value=1)
    k = t.int("num_experts_per_tok", 8, min_value=1)
    F, S = t.int("moe_intermediate_size", 384, min_value=1), t.int("shared_expert_intermediate_size", min_value=1)
    for i in range(t.int("num_hidden_layers", 20, min_value=0)):
        # every talker layer is MoE: Qwen3OmniMoeTalkerDecoderLayer replaces its mlp unconditionally
        # (mlp_only_layers and decoder_sparse_step do not apply)
        b = f"talker.model.layers.{i}"
        _attention(inv, b, t, d, qk_norm=True)
        inv.add(f"{b}.mlp.gate.weight", _G, (E, d), matmul=True)
        inv.add(f"{b}.mlp.experts.gate_up_proj", _G, (E, 2 * F, d), matmul=True)
        inv.add(f"{b}.mlp.experts.down_proj", _G, (E, d, F), matmul=True)
        _swiglu(inv, f"{b}.mlp.shared_expert", d, S)
        _lin(inv, f"{b}.mlp.shared_expert_gate", 1, d)
        _vec(inv, f"{b}.input_layernorm.weight", d), _vec(inv, f"{b}.post_attention_layernorm.weight", d)
    _vec(inv, "talker.model.norm.weight", d)
    inv.add("talker.model.codec_embedding.weight", _G, (vocab, d))
    th, inter = tc.int("thinker_hidden_size", 2048, min_value=1), t.int("intermediate_size", 2048, min_value=1)
    for proj in ("text_projection", "hidden_projection"):  # Qwen3OmniMoeTalkerResizeMLP
        _lin(inv, f"talker.{proj}.linear_fc1", inter, th, True), _lin(inv, f"talker.{proj}.linear_fc2", d, inter, True)
    if not tc.bool("tie_word_embeddings", False):
        _lin(inv, "talker.codec_head", vocab, d)
    code_predictor(inv, tc.sub("code_predictor_config"))
    return E, k


def code_predictor(inv: Inventory, c: Cfg) -> None:
    d, vocab = c.int("hidden_size", 1024, min_value=1), c.int("vocab_size", 2048, min_value=1)
    f = c.int("intermediate_size", 3072, min_value=1)
    p = "talker.code_predictor"
    for i in range(c.int("num_hidden_layers", 5, min_value=0)):
        b = f"{p}.model.layers.{i}"
        _attention(inv, b, Cfg({"head_dim": 128, **c.d}, c.where), d, qk_norm=True)  # head_dim default 128 there
        _swiglu(inv, f"{b}.mlp", d, f)
        _vec(inv, f"{b}.input_layernorm.weight", d), _vec(inv, f"{b}.post_attention_layernorm.weight", d)
    _vec(inv, f"{p}.model.norm.weight", d)
    for g in range(c.int("num_code_groups", 32, min_value=1) - 1):
        inv.add(f"{p}.model.codec_embedding.{g}.weight", _G, (vocab, d))
        _lin(inv, f"{p}.lm_head.{g}", vocab, d)


def code2wav(inv: Inventory, c: Cfg) -> None:
    """Qwen3OmniMoeCode2Wav."""
    d, f = c.int("hidden_size", 1024, min_value=1), c.int("intermediate_size", 3072, min_value=1)
    p = "code2wav"
    for i in range(c.int("num_hidden_layers", 8, min_value=0)):
        b = f"{p}.pre_transformer.layers.{i}"
        _attention(inv, b, c, d, qk_norm=False)
        _swiglu(inv, f"{b}.mlp", d, f)
        _vec(inv, f"{b}.input_layernorm.weight", d), _vec(inv, f"{b}.post_attention_layernorm.weight", d)
        _vec(inv, f"{b}.self_attn_layer_scale.scale", d), _vec(inv, f"{b}.mlp_layer_scale.scale", d)
    _vec(inv, f"{p}.pre_transformer.norm.weight", d)
    inv.add(f"{p}.code_embedding.weight", _G,
            (c.int("codebook_size", 2048, min_value=1) * c.int("num_quantizers", 16, min_value=1), d))
    for j, factor in enumerate(c.int_list("upsampling_ratios", [2, 2])):
        b = f"{p}.upsample.{j}"
        _conv1d(inv, f"{b}.0.conv", d, d, factor)  # ConvTranspose1d(d, d, factor): weight [in, out, k]
        _conv1d(inv, f"{b}.1.dwconv.conv", d, 1, 7)  # depthwise
        _vec(inv, f"{b}.1.norm.weight", d), _vec(inv, f"{b}.1.norm.bias", d)
        _lin(inv, f"{b}.1.pwconv1", 4 * d, d, True), _lin(inv, f"{b}.1.pwconv2", d, 4 * d, True)
        _vec(inv, f"{b}.1.gamma", d)
    dec, rates = c.int("decoder_dim", 1536, min_value=1), c.int_list("upsample_rates", [8, 5, 4, 3])
    _conv1d(inv, f"{p}.decoder.0.conv", dec, d, 7)
    for i, r in enumerate(rates):
        b, inp, out = f"{p}.decoder.{i + 1}.block", dec // 2 ** i, dec // 2 ** (i + 1)
        _vec(inv, f"{b}.0.alpha", inp), _vec(inv, f"{b}.0.beta", inp)
        inv.add(f"{b}.1.conv.weight", _G, (inp, out, 2 * r)), inv.add(f"{b}.1.conv.bias", _G, (out,))
        for u in range(3):  # residual units, dilations 1, 3, 9
            for act in ("act1", "act2"):
                _vec(inv, f"{b}.{u + 2}.{act}.alpha", out), _vec(inv, f"{b}.{u + 2}.{act}.beta", out)
            _conv1d(inv, f"{b}.{u + 2}.conv1.conv", out, out, 7), _conv1d(inv, f"{b}.{u + 2}.conv2.conv", out, out, 1)
    last = dec // 2 ** len(rates)
    n = len(rates) + 1
    _vec(inv, f"{p}.decoder.{n}.alpha", last), _vec(inv, f"{p}.decoder.{n}.beta", last)
    _conv1d(inv, f"{p}.decoder.{n + 1}.conv", 1, last, 7)


def adapt(cfg: Cfg) -> ModelSpec:
    spec = multimodal.adapt(cfg.sub("thinker_config"), "qwen3_omni_moe_thinker")
    params = tuple(replace(p, name=f"thinker.{p.name}") for p in spec.params)
    notes = list(spec.notes)
    if cfg.bool("enable_audio_output", True):
        inv = Inventory()
        E, k = talker(inv, cfg.sub("talker_config"))
        talker_n = sum(p.numel for p in inv.params)
        code2wav(inv, cfg.sub("code2wav_config"))
        params += tuple(inv.params)
        notes.append(f"Qwen3-Omni: the talker (speech MoE, {E} experts, top-{k}; {talker_n:,} parameters) and code2wav "
                     f"({sum(p.numel for p in inv.params) - talker_n:,}) run only for speech output: counted in the "
                     "'audio' group; active parameters, FLOPs, E and k are the thinker's, per text token")
    return replace(spec, model_type="qwen3_omni_moe", family="qwen3_omni_moe", params=params, notes=tuple(notes),
                   torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype") or spec.torch_dtype)


def register(table: dict) -> None:
    table["qwen3_omni_moe"] = adapt
