"""transformers as the reference for the census: default configs, tiny ("shrunk") variants, the
class the auto mappings pick, and its parameter count on the meta device (no memory, fast)."""

from __future__ import annotations

import copy

from census_families import moe_model_types

# Small sizes for a tiny random model; a key is set only where the default config has it.
SMALL = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=256,
             num_local_experts=8, num_experts=8, n_routed_experts=8, moe_num_experts=8, num_experts_per_tok=2,
             kv_lora_rank=8, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_group=2,
             topk_group=1, num_hidden_layers=3, first_k_dense_replace=1, n_shared_experts=1,
             # T5 / DBRX / NLLB naming
             d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=3, num_decoder_layers=2, n_layers=2, n_heads=4,
             max_seq_len=256, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=48, decoder_ffn_dim=48,
             encoder_attention_heads=4, decoder_attention_heads=4, ffn_hidden_size=48, kv_n_heads=2, moe_top_k=2)
SMALL_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, depth=1, num_attention_heads=2,
                    num_heads=2, embed_dim=16, out_hidden_size=32, image_size=28, patch_size=14,
                    num_position_embeddings=16)

GEMMA4_SMALL = dict(per_layer_config={"02": {"head_dim": 16}}, enable_moe_block=True, top_k_experts=2, num_experts=8,
                    moe_intermediate_size=16, vocab_size_per_layer_input=128, hidden_size_per_layer_input=8,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"])

DOTS3_SWA = dict(num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8)

# Qwen4-Exp: an indexed-attention layer ("full_attention", as the released config names it) between two
# linear ones, a small QSA indexer, PLE on both linear layers (small n-gram tables: primes after 49)
QWEN4_SMALL = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                   hc_lowrank=8, layer_types=["linear_attention", "full_attention", "linear_attention"],
                   indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=4,
                   ple_layer_ids=[1, 3], ple_embed_dim=16, heads_per_ngram=2, ngram_vocab_size_base=50,
                   make_ngram_vocab_size_divisible_by=8, split_ngram_parts=2, eos_token_id=1)

# model_type -> extra overrides of the shrunk config (applied last; nested dicts merge).
SHRINK_EXTRA: dict[str, dict] = {
    "granitemoehybrid": dict(mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1),  # heads divide 2 x 32
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"], num_dense_layers=1),
    "kimi_linear": dict(linear_head_dim=8, linear_num_heads=4, num_experts_per_token=2),
    "qwen3_omni_moe_thinker": dict(
        vision_config=dict(depth=2, deepstack_visual_indexes=[1]),
        audio_config=dict(d_model=16, encoder_ffn_dim=32, encoder_layers=1, encoder_attention_heads=2,
                          downsample_hidden_size=8, num_mel_bins=16, output_dim=32)),
    # Qwen3-Omni: every nested part shrunk (the generic shrink reaches only top-level sub-configs); the talker has
    # more layers than the thinker (its layer numbers past the thinker's must not read as MTP layers)
    "qwen3_omni_moe": dict(
        thinker_config=dict(
            text_config=dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, vocab_size=128, num_hidden_layers=3, num_experts=8,
                             num_experts_per_tok=2, max_position_embeddings=256),
            vision_config=dict(hidden_size=16, intermediate_size=32, depth=2, num_heads=2, out_hidden_size=32, patch_size=14,
                               num_position_embeddings=16, deepstack_visual_indexes=[1]),
            audio_config=dict(d_model=16, encoder_ffn_dim=32, encoder_layers=1, encoder_attention_heads=2,
                              downsample_hidden_size=8, num_mel_bins=16, output_dim=32)),
        talker_config=dict(
            thinker_hidden_size=32,
            text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=64, num_local_experts=8, num_experts_per_tok=2,
                             moe_intermediate_size=16, shared_expert_intermediate_size=24, max_position_embeddings=256),
            code_predictor_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, vocab_size=64, num_code_groups=4, layer_types=["full_attention"],
                                       max_position_embeddings=256)),
        code2wav_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=4, codebook_size=16, num_quantizers=4, decoder_dim=32,
                             upsample_rates=[2, 2], upsampling_ratios=[2], max_position_embeddings=256)),
    "minimax_m3_vl": dict(projector_hidden_size=24, merged_hidden_size=128),
    # DeepSeek's config sets head_dim = qk_rope_head_dim (the rotary width)
    "deepseek_v2": dict(head_dim=4, num_key_value_heads=4), "deepseek_v3": dict(head_dim=4, num_key_value_heads=4),
    "longcat_flash": dict(num_layers=2, qk_head_dim=12, head_dim=4, ffn_hidden_size=48, expert_ffn_hidden_size=16, zero_expert_num=4, moe_topk=2),
    "nllb-moe": dict(encoder_sparse_step=2, decoder_sparse_step=1, num_experts=4),
    "qwen3_vl_moe": dict(vision_config=dict(depth=2, deepstack_visual_indexes=[1])),
    "openai_privacy_filter": dict(pad_token_id=0),
    # at least one MoE layer (the default schedule's dense prefix is 3 layers) and a small indexer
    "glm_moe_dsa": dict(mlp_layer_types=["dense", "sparse", "sparse"], indexer_types=["full", "shared", "full"],
                        index_n_heads=4, index_head_dim=16),
    "axk2": dict(index_n_heads=4, index_head_dim=16),
    "hy_v4": dict(index_n_heads=4, index_head_dim=16, indexer_types=["full", "shared", "full"]),
    "zaya": dict(num_experts_per_tok=1),  # ZayaConfig refuses any other top-k
    # Glm5NextConfig: MLA with KV heads == attention heads, NoPE on the DSA layers; one of each layer kind
    "glm5_next": dict(text_config=dict(num_key_value_heads=4, index_n_heads=4, index_head_dim=16, qk_rope_head_dim=0,
                                       layer_types=["linear_attention", "indexed_attention", "linear_attention"],
                                       mlp_layer_types=["dense", "sparse", "sparse"], linear_num_heads=4,
                                       linear_head_dim=8, pad_token_id=0)),
    "bailing_hybrid": dict(num_experts_per_token=2, layer_types=["linear_attention", "full_attention", "linear_attention"],
                           mlp_layer_types=["dense", "sparse", "sparse"], num_expert_group=2, linear_num_heads=4,
                           linear_head_dim=8),
    # Gemma 4: per_layer_config names layers of the 30-layer default (the shrunk model has 3): one
    # full-attention layer of a wider head, as the default's every 6th; the MoE block switched on
    # (the default has it off); per-layer input embeddings shrunk
    **{mt: dict(text_config=GEMMA4_SMALL) for mt in ("gemma4", "diffusion_gemma")},
    "gemma4_text": GEMMA4_SMALL,
    # [text experts, vision experts]; the 3-D RoPE sections (h, w, t) must fill head_dim / 2 = 4 frequencies
    "ernie4_5_vl_moe": dict(text_config=dict(moe_intermediate_size=[16, 8], rope_parameters=dict(mrope_section=[1, 1, 2]))),
    "inkling2": dict(vision_config=dict(text_hidden_size=32)),
    # NeMo SpeechLM (Nemotron-3.5 Transcribe): a Nemotron-H text model of one Mamba-2, MoE and attention layer each;
    # the ASR encoder (fewer KV heads than heads), the diarization model and the word-timestamp encoder are nested
    "nemo_speechlm": dict(
        text_config=dict(layers_block_type=["linear_attention", "moe", "full_attention"], mamba_num_heads=8,
                         mamba_head_dim=8, n_groups=1, ssm_state_size=8, moe_shared_expert_intermediate_size=24),
        audio_config=dict(
            asr_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, num_mel_bins=8, subsampling_factor=2),
            diarization_config=dict(
                audio_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, num_mel_bins=8, subsampling_factor=2),
                head_config=dict(hidden_size=8, num_speakers=4, audio_hidden_size=16, subsampling_factor=2),
                streaming_config=dict(num_speakers=4, subsampling_factor=2))),
        word_timestamp_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=24, blank_token_id=23, upsampling_factor=2)),
    # Unlimited-OCR: its two vision encoders are nested configs (SAM: one windowed and one global layer)
    "unlimited_ocr": dict(vision_config=dict(
        sam_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                        patch_size=16, window_size=2, global_attn_indexes=[1], mlp_dim=32, downsample_channels=[8, 16]),
        encoder_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            image_size=28, patch_size=14))),
    # DeepSeek-OCR-2: its two vision encoders are nested configs (SAM: one windowed and one global layer; its
    # output channels are the Qwen2-style encoder's width)
    "deepseek_ocr2": dict(vision_config=dict(
        sam_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                        patch_size=16, window_size=2, global_attn_indexes=[1], mlp_dim=32, downsample_channels=[8, 16]),
        encoder_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, vocab_size=128, layer_types=["full_attention"]))),
    # Muse Spark: the experts' projected space, the vision adapter (its input: 4 merged patches of width 16),
    # a small position table; a dense layer; two audio stages (the stage lists were cut to one by the shrink)
    "muse_spark": dict(out_hidden_size=64, projector_hidden_size=24,
                       text_config=dict(moe_hidden_size=24, mlp_layer_types=["dense", "sparse", "sparse"]),
                       vision_config=dict(pos_emb_height=4, pos_emb_width=4),
                       audio_config=dict(num_hidden_layers=2, hidden_sizes=[8, 16], depths=[1, 2], patch_sizes=[4, 2],
                                         out_hidden_size=32)),
    # Inkling: sliding layers of the tiny sizes; a vision encoder of 3 projections on 4 x 4 x 2 patches (patch 14
    # with 24 layers plans 75,264-channel layers); 4 mel bins of 16 levels
    "inkling_mm_model": dict(text_config=dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
                                              sliding_window_size=16, d_rel=4, rel_extent=16),
                             vision_config=dict(n_layers=3, patch_size=4, temporal_patch_size=2),
                             audio_config=dict(n_mel_bins=4, mel_vocab_size=16)),
    # one sliding layer of other head count, and MoE layers (the default's first 3 layers are dense)
    "step3p7": dict(text_config=dict(mlp_layer_types=["dense", "sparse", "sparse"], share_expert_dim=24,
                                     layer_types=["sliding_attention", "full_attention", "full_attention"],
                                     sliding_window=16, per_layer_config={"0": {"num_attention_heads": 2}})),
    # MLA: KV heads == attention heads (the configs refuse others)
    # dots3: sliding layers (here layer 2) are MLA of their own sizes in per_layer_config
    "dots3_note_text": dict(num_key_value_heads=4, head_dim=12, index_n_heads=4, index_head_dim=16, per_layer_config={"02": DOTS3_SWA}),
    # dots3_note: the towers' adapters sized to the shrunk widths (the configs require adapter_in_dim == vision
    # hidden_size, adapter_input_size == audio hidden_size, both outputs == the text hidden size); one sparse
    # vision layer of 4 experts; the text pad id inside the shrunk vocabulary
    "dots3_note": dict(vision_config=dict(num_hidden_layers=2, mlp_layer_types=["dense", "sparse"],
                                          per_layer_config={"1": {"num_local_experts": 4, "num_experts_per_tok": 2}},
                                          moe_intermediate_size=8, adapter_in_dim=16, adapter_out_dim=32),
                       audio_config=dict(num_key_value_heads=2, head_dim=8, downsample_hidden_size=8, feature_size=16,
                                         adapter_input_size=16, adapter_out_dim=32),
                       text_config=dict(num_key_value_heads=4, head_dim=12, index_n_heads=4, index_head_dim=16, pad_token_id=None,
                                        per_layer_config={"02": DOTS3_SWA})),
    "qwen4_exp_text": QWEN4_SMALL, "qwen4_exp": dict(text_config=QWEN4_SMALL),
    "llama4": dict(text_config=dict(intermediate_size_mlp=64, attention_chunk_size=16),
                   vision_config=dict(intermediate_size=64, projector_input_dim=32, projector_output_dim=32,
                                      vision_output_dim=32)),
}

_QWEN4_QSA = dict(indexer_n_heads=16, indexer_kv_heads=1, indexer_head_dim=256, indexer_budget=2048,
                  indexer_compress_ratio=4)

# Default configs transformers cannot build or route as they stand (applied to default and shrunk).
DEFAULT_FIXUPS: dict[str, dict] = {
    "deepseek_v2": dict(num_experts_per_tok=6),  # default None: no top-k; DeepSeek-V2's published value
    "dbrx": dict(attn_config=dict(rope_theta=500000.0)),  # to_dict() drops it; DbrxAttention needs it
    # default configs transformers cannot build: the published values of the family's model
    "dots1": dict(n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1408, n_shared_experts=2,
                  first_k_dense_replace=1),  # rednote-hilab/dots.llm1.base; the default has no experts
    "hunyuan_v1_moe": dict(head_dim=128),  # default None (4096 / 32 heads); the attention needs it
    "lfm2_moe": dict(layer_types=(["conv", "conv", "full_attention"] * 11)[:32]),  # default None; 32 layers
    # DiffusionGemmaTextConfig leaves num_experts / top_k_experts / moe_intermediate_size None but always builds
    # the MoE block: values of the census' choosing (not checked against a published config)
    # Qwen3-Omni: Qwen3OmniMoeTalkerTextSparseMoeBlock reads config.shared_expert_intermediate_size and
    # Qwen3OmniMoeTalkerForConditionalGeneration config.spatial_merge_size, which the talker configs do not
    # define (transformers 5.23: AttributeError): values of the census' choosing, not checked against a published
    # config (768: twice the talker's moe_intermediate_size 384; spatial_merge_size has no parameters)
    "qwen3_omni_moe": dict(talker_config=dict(text_config=dict(shared_expert_intermediate_size=768), spatial_merge_size=2)),
    "diffusion_gemma": dict(text_config=dict(num_experts=128, top_k_experts=8, moe_intermediate_size=704)),
    # Qwen4-Exp's default config leaves the QSA indexer fields None, and its indexed-attention layers
    # cannot be built without them; no released config gives them: values of our choosing (the count
    # depends on heads x head dim only), as Qwen4ExpTextConfig.validate_architecture accepts them
    **{mt: (dict(text_config=_QWEN4_QSA) if mt == "qwen4_exp" else _QWEN4_QSA) for mt in ("qwen4_exp", "qwen4_exp_text")},
    # DeepseekOcr2TextConfig leaves mlp_layer_types None (the decoder layer indexes it) and num_experts_per_tok None
    # (no top-k): values of the census' choosing, DeepSeek-OCR's layout (dense first layer, top-6), not checked
    # against a published DeepSeek-OCR-2 config
    "deepseek_ocr2": dict(text_config=dict(mlp_layer_types=["dense"] + ["sparse"] * 31, num_experts_per_tok=6)),
}


def default_config(model_type: str) -> dict:
    import transformers

    return _merge(transformers.AutoConfig.for_model(model_type).to_dict(), copy.deepcopy(DEFAULT_FIXUPS.get(model_type, {})))


def _shrink_dict(d: dict, small: dict) -> dict:
    out = dict(d)
    n_old = d.get("num_hidden_layers")
    for k, v in small.items():
        if out.get(k) is not None:
            out[k] = v
    n_new = out.get("num_hidden_layers")
    for k, v in d.items():  # per-layer lists follow the new layer count
        if isinstance(v, list) and n_old and len(v) == n_old and n_new:
            out[k] = v[:n_new]
    if isinstance(d.get("per_layer_config"), dict) and n_new:  # per-layer overrides of the layers kept
        out["per_layer_config"] = {k: v for k, v in d["per_layer_config"].items() if int(k) < n_new}
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def shrunk_config(model_type: str) -> dict:
    cfg = _shrink_dict(default_config(model_type), SMALL)
    for key in ("text_config", "language_config", "attn_config", "ffn_config"):
        if isinstance(cfg.get(key), dict):
            cfg[key] = _shrink_dict(cfg[key], SMALL)
    for key in ("vision_config", "audio_config"):
        if isinstance(cfg.get(key), dict):
            cfg[key] = _shrink_dict(cfg[key], SMALL_VISION)
    cfg = _merge(cfg, copy.deepcopy(SHRINK_EXTRA.get(model_type, {})))
    for key in ("pad_token_id",):  # an id past the shrunk vocabulary: nn.Embedding refuses its padding_idx
        if isinstance(cfg.get(key), int) and cfg[key] >= cfg.get("vocab_size", 1 << 62):
            cfg[key] = None
    n = param_count(build(model_type, cfg))
    assert n < 3_000_000, f"shrunk {model_type} config still has {n:,} parameters: extend SMALL / SHRINK_EXTRA"
    return cfg


def build(model_type: str, config: dict, device: str = "meta", seed: int = 0):
    """The class the auto mappings pick for `model_type`, built from `config` on `device`."""
    import torch
    import transformers

    cls = getattr(transformers, moe_model_types()[model_type])
    cfg = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    with torch.device(device):
        return cls(cfg)


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
