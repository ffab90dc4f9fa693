"""DiffusionGemma (diffusion_gemma; google/diffusiongemma-*: DiffusionGemmaForBlockDiffusion), counted
from config.json.

An autoregressive encoder (Gemma 4's text model with its vision tower) fills a KV cache that a
bidirectional diffusion decoder reads. The decoder's layers, final norm and embedding are the encoder's
own parameters (transformers ties every `weight`, `scale`, `per_expert_scale` and expert tensor of
the layers), so the text model is counted once as Gemma 4's (arch/gemma4.py) with what DiffusionGemma
fixes: the MoE block in every layer, no per-layer inputs, no KV sharing, no double-wide MLP, and full
layers without v_proj (V = K; the full-layer override of num_key_value_heads is not gated). Only the
decoder has:
- the self-conditioning block: pre_norm [D], gate / up [I, D], down [D, I] (its post_norm has no weight);
- the attention biases of its layers (with `attention_bias`: biases are not among the tied tensors).
With the top-level `tie_word_embeddings` false, no tensor is tied: the decoder's embedding, layers
and norm are counted again, and the LM head. The vision tower is always built (a null vision_config
is Gemma4VisionConfig's defaults).
"""

from __future__ import annotations

from dataclasses import replace

from ..spec import Cfg, Inventory, ModelSpec
from . import common, gemma4


def adapt(cfg: Cfg) -> ModelSpec:
    tie = cfg.bool("tie_word_embeddings", True)
    text = dict(cfg.sub("text_config").d)
    text.update(tie_word_embeddings=tie, enable_moe_block=True, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
                attention_k_eq_v=True, use_double_wide_mlp=False)
    tcfg = Cfg(text, f"{cfg.where}[text_config]")
    spec = gemma4.adapt(tcfg, "diffusion_gemma")
    d = spec.hidden_size
    inv = Inventory()
    inv.norm("decoder.self_conditioning.pre_norm", d)
    inv.swiglu("decoder.self_conditioning", "dense_mlp", d, tcfg.int("intermediate_size", min_value=1))
    if not tie:  # every text tensor again in the decoder (the LM head is the adapter's own already)
        inv.params += [replace(p, name=f"decoder.{p.name}") for p in spec.params if p.group != "lm_head"]
    elif tcfg.bool("attention_bias", False):
        inv.params += [replace(p, name=f"decoder.{p.name}") for p in spec.params
                       if p.group == "attention" and p.name.endswith(".bias")]
    gemma4.vision_tower(inv, Cfg(cfg.raw("vision_config") or {}, f"{cfg.where}[vision_config]"), d)
    return replace(spec, params=spec.params + tuple(inv.params),
                   torch_dtype=cfg.raw("torch_dtype") or cfg.raw("dtype") or spec.torch_dtype,
                   quantization=common.quantization(cfg) or spec.quantization)


def register(table: dict) -> None:
    table["diffusion_gemma"] = adapt
