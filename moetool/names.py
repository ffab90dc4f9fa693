"""Map checkpoint tensor names to canonical keys: (group, layer, expert, projection).

One table for every family: checkpoints of all supported architectures use a handful of naming
schemes (Llama-style `model.layers.N.mlp.experts.E.gate_proj`, Mixtral's `block_sparse_moe ...
w1/w2/w3`, fused `experts.gate_up_proj`, DBRX's `transformer.blocks.N.ffn.experts.mlp.w1`, T5's
`encoder.block.N.layer.1.mlp.experts.expert_E.wi`). Rules are tried in order; the first match wins.

Quantized storage is recognised here too, so counts are of logical parameters:
- fp8 (DeepSeek-V3, compressed-tensors): `*.weight_scale_inv`, `*.weight_scale`, `*.input_scale`
  are scale tensors, the F8 weight counts element for element;
- MXFP4 (gpt-oss): `*_blocks` (uint8, 2 values a byte) count x2, `*_scales` are scales;
- GPTQ / AWQ: `*.qweight` (int32, 32/bits values each) count x(32/bits); `qzeros`, `scales`,
  `g_idx` are quantization metadata;
- bitsandbytes 4-bit: a uint8 `weight` with `weight.absmax` / `weight.quant_state.*` counts x2.

Example:
    >>> classify("model.layers.3.block_sparse_moe.experts.7.w1.weight").key
    ('routed_experts', 3, 7, 'gate')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from .header import name_template

# Tensors that hold quantization metadata, not parameters.
_QUANT_META = re.compile(
    r"(\.weight_scale_inv|\.weight_scale|\.input_scale|\.output_scale|\.k_scale|\.v_scale|_scales|\.scales|\.qzeros"
    r"|\.g_idx|\.weight_zero_point|\.weight_g_idx|\.weight_shape|\.absmax|\.quant_map|\.nested_absmax"
    r"|\.nested_quant_map|\.quant_state\.[\w.]+|\.SCB|\.weight_format)$"
)
_BUFFERS = re.compile(r"((?<!moe_statics\.)e_score_correction_bias|\.expert_bias|\.slope_rate|\.query_decay|\.key_decay|"
                      r"\.diagonal_decay|\.layer_scalar|\.moe\.router_bias|\.inv_freq|\.original_inv_freq|\.masked_bias|\.attn\.bias"
                      # Mistral-Large-4's LeRoPE scales; DeepSeek-V4's hash-routing table (token -> expert ids);
                      # the correction bias stored as `gate.bias` (DeepSeek-V4 `ffn.gate.bias`, Inkling 2
                      # `llm.layers.N.mlp.gate.bias`: transformers renames both to e_score_correction_bias)
                      r"|(^|\.)lerope\.alpha|\.gate\.tid\d+eid|\.ffn\.gate\.bias|(^|\.)llm\.layers\.\d+\.mlp\.gate\.bias"
                      r"|\.mlp\.gate\.balancing_biases"  # ZAYA's selection biases (the skip expert's -1)
                      # Gemma 4's towers: clipping bounds of its clippable linears, the vision tower's standardisation
                      r"|\.(input|output)_(min|max)|(^|\.)vision_tower\.std_(bias|scale)"
                      # dots3's vision experts' correction bias as published (transformers: e_score_correction_bias)
                      r"|(^|\.)vision_encoder\.blocks\.\d+\.mlp\.router_bias"
                      # Qwen4-Exp's n-gram hashing constants (multipliers, table sizes and offsets, from config.json)
                      r"|\.ple_embedding\.(layer_multipliers|ngram_heads_vocab_sizes|ngram_heads_offsets))$")
_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks|block|h)\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(?:expert_)?(\d+)\.")
_VISION = re.compile(r"(^|\.)(vision_model|vision_tower|visual|multi_modal_projector|vision_encoder|image_newline|mm_projector|vit_large_projector"
                     r"|patch_merger|vision_language_adapter|pre_mm_projector_norm"  # Mistral-Large-4's original names
                     r"|patch_merge_mlp"
                     r"|resampler_model"  # ERNIE-4.5-VL's projector
                     r"|vision_adapter|vision_projection|embed_vision)\."  # Muse Spark's projector
                     r"|(^|\.)(image_newline|view_separator)$"  # learned vectors between image views (Unlimited-OCR)
                     # DeepSeek-OCR's original names (Unlimited-OCR checkpoints): SAM encoder, projector, separator;
                     # DeepSeek-OCR-2's Qwen2-style encoder and its query tables
                     r"|^(model\.)?(sam_model|projector|qwen\d_model)\.|^(model\.)?view_seperator$")  # (templates: digits are 0)
_AUDIO = re.compile(r"(^|\.)(audio_tower|audio_encoder|audio_model|audio_projector|word_timestamp_encoder|word_timestamp_head|embed_audio)\."
                    r"|^(perception|ctc_timestamp)\."  # NeMo SpeechLM's original names (its LM is under llm.)
                    r"|^model\.audio\."  # Inkling: model.audio.*
                    r"|^(talker|code\dwav)\.")  # Qwen3-Omni's speech output (arch/qwen3_omni.py): counted as audio (templates: digits are 0)
_EMBED = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings)\.weight$|^(model\.)?shared\.weight$"
                    r"|(^|\.)llm\.embed\.weight$")  # Inkling 2's original names
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)\.(weight|bias)$|^output\.weight$|^(score|classifier)\.(weight|bias)$"
                   r"|^head\.weight$|(^|\.)llm\.unembed\.weight$")  # DeepSeek-V4's and Inkling 2's original names
# Norm-like parameters outside a norm's own name: A.X-K2's gated RMSNorm (its low-rank gate MLP, mlp.fc1 / fc2
# in transformers, W_down / W_up on disk)
_NORM_EXTRA = re.compile(r"norm\.(mlp\.fc\d|W_down|W_up)\.weight$"
                         # hyper-connections (HY-V4, DeepSeek-V4, Qwen4-Exp): mixers of the residual streams
                         r"|(^|\.)(attn_hc|ffn_hc|hc_head|hc_pre|\w*hyper_connection\w*)\."
                         r"|\.hc_(attn|ffn)_(base|fn|scale)$"  # DeepSeek-V4's original names
                         # Inkling 2's attention residuals: learned queries mixing the earlier layers' outputs
                         r"|(^|\.)attn_res\."
                         # ZAYA's affine scalings of the embeddings and of both sides of each residual add
                         r"|(^|\.)input_hidden_states_(scale|bias)$|_residual_scale\.(hidden_states|residual)_(scale|bias)$"
                         # Muse Spark: residual gates [D], and the experts' shared output norm (run once per token)
                         r"|_residual_gate\.gate$|\.experts\.post_expert_norm\.weight$")
# Gemma 4's router: a projection plus a scale per channel and per expert
_ROUTER_EXTRA = re.compile(r"\.router\.(proj\.weight|scale|per_expert_scale)$"
                           r"|\.moe\.gate\.weight$"  # Step-3.7's stored router
                           r"|\.mlp\.gate\.global_scale$"  # Inkling: the router's learned output scale
                           r"|^layers\.\d+\.gate\.weight$"  # Mistral-Large-4's original (consolidated) names
                           # ZAYA's router: a down projection, the previous layer's state scale, an MLP
                           r"|\.mlp\.gate\.(down_proj\.(weight|bias)|router_states_scale|router_mlp\.\w+\.(weight|bias))$"
                           r"|\.mlp\.gate\.weight_\d$")  # ERNIE-4.5-VL's original names: the vision experts' router
# Gemma 3n / 4 per-layer input embeddings; Qwen4-Exp's Per-Layer Embedding: hashed n-gram tables (stored
# in row shards), their projections and conv
_PER_LAYER_EMBED = re.compile(r"(^|\.)embed_tokens_per_layer\.weight$|\.ple_embedding\.ngram_embedding(\.shard_\d+)?\.weight$")
_PER_LAYER_MLP = re.compile(r"(^|\.)(per_layer_input_gate|per_layer_projection|per_layer_model_projection)\.weight$"
                            r"|(^|\.)self_conditioning\.(gate|up|down)_proj\.weight$"  # DiffusionGemma's decoder
                            r"|\.ple\.(key_proj|value_proj|conv\dd)\.weight$")  # conv1d (digits are 0 in templates)
_SHARED = re.compile(r"\.(shared_experts?|shared_mlp|share_expert)(\.|_gate\.)")
_ROUTED = re.compile(r"\.experts\.|\.moe\.(gate_proj|up_proj|down_proj)\.weight$|\.(block_sparse_moe|mlp)\.(input_linear|output_linear)\.")
_ROUTER = re.compile(r"\.(gate|router)(\.layer|\.classifier|\.wg)?\.(weight|bias)$|\.router\.(weight|bias)$")
_NORM = re.compile(r"(^|\.)(\w*norm\w*|ln_\w+|ln\d*|norm_\d|\w*layernorm\w*|layer_norm)(\.\d+)?\.(weight|bias)$", re.I)
_SSM = re.compile(r"\.(mamba|mixer)\.")
# Nemotron-H keeps every layer's one sublayer under `.mixer.`: attention, router, dense MLP, MoE latents.
_MIXER_ROLES = ((re.compile(r"\.mixer\.[qkvo]_proj\."), "attention"), (re.compile(r"\.mixer\.gate\.weight$"), "router"),
                (re.compile(r"\.mixer\.(up_proj|down_proj|fc\d_latent_proj)\."), "dense_mlp"))
_BACKBONE_EMBED = re.compile(r"^(model|backbone)\.embeddings\.weight$")
_ATTN = re.compile(r"\.(self_attn|self_attention|attn|attention|cross_attention|encoder_attn|selfattention|encdecattention|"
                   r"linear_attn|norm_attn_norm|conv|attn_sconv)\.", re.I)  # attn_sconv: Inkling's conv on the attention output
_MLP = re.compile(r"\.(mlp|mlps|feed_forward|ffn|densereludense|block_sparse_moe|mlp_sconv)\.", re.I)  # mlp_sconv: Inkling
_PROJ = [
    (re.compile(r"\.(gate_up_proj|input_linear)"), "gate_up"),
    (re.compile(r"\.(w1|gate_proj)[._]|\.(w1|gate_proj)$"), "gate"),
    (re.compile(r"\.(w3|v1|up_proj|wi)[._]|\.(w3|v1|up_proj|wi)$"), "up"),
    (re.compile(r"\.(w2|down_proj|wo|output_linear)[._]|\.(w2|down_proj|wo|output_linear)$"), "down"),
]


@dataclass(frozen=True)
class TensorRole:
    """What a stored tensor is. `kind`: "param" (counts), "quant_meta" (scales, zeros),
    "buffer" (persistent non-parameters), "tied_copy" (a second copy of a tied matrix).
    `multiplier`: logical parameters per stored element (2 for MXFP4 blocks, 8 for int4 in int32)."""

    group: str
    layer: Optional[int] = None
    expert: Optional[int] = None
    projection: Optional[str] = None
    kind: str = "param"
    multiplier: int = 1

    @property
    def key(self) -> tuple:
        return (self.group, self.layer, self.expert, self.projection)


def classify(name: str, *, dtype: str = "", num_layers: Optional[int] = None, encoder_layers: int = 0,
             tied: bool = False, quant_bits: int = 4, bnb_4bit: bool = False) -> TensorRole:
    """Classify one stored tensor name. `num_layers` (decoder layers built by transformers) sends
    layers past it to the MTP group; `encoder_layers` offsets decoder blocks of encoder-decoders."""
    group, layer, expert, _, kind, multiplier = classify_tuple(
        name, dtype, num_layers, encoder_layers, tied, quant_bits, bnb_4bit)
    projection = _projection(name) if group in ("routed_experts", "shared_experts", "dense_mlp", "mtp") else None
    return TensorRole(group, layer, expert, projection, kind, multiplier)


def classify_tuple(name: str, dtype: str, num_layers: Optional[int], encoder_layers: int, tied: bool,
                   quant_bits: int, bnb_4bit: bool) -> tuple:
    """`classify` as a plain tuple (group, layer, expert, projection, kind, multiplier) for hot
    loops (DeepSeek-V3 has 92k tensors); `projection` is not resolved here (None).

    Names differ across layers and experts only in their digits, and no group rule depends on a
    digit's value, so the rules run once per template (every digit turned into 0) and the layer
    and expert numbers are sliced back out of the name at the template's positions."""
    template = name_template(name)
    layer_span, expert_span = _spans(template)
    layer = None
    if layer_span is not None:
        layer = int(name[layer_span[0]:layer_span[1]])
        if encoder_layers and name.startswith(("decoder.", "model.decoder.")):
            layer += encoder_layers
    mtp = layer is not None and num_layers is not None and layer >= num_layers
    group, kind, multiplier = _role(template, dtype, mtp, tied, quant_bits, bnb_4bit)
    if kind == "tied_copy" and group == "embedding" and not encoder_layers and not mtp:
        kind = "param"  # a decoder-only model's `decoder.embed_tokens` (DiffusionGemma) is its one embedding
    if group in ("vision", "audio"):
        layer = None
    expert = None
    if expert_span is not None and group in ("routed_experts", "mtp"):
        expert = int(name[expert_span[0]:expert_span[1]])
    return group, layer, expert, None, kind, multiplier


def layer_span(template: str) -> Optional[tuple[int, int]]:
    """Character span of the layer number in names of this template (see `classify_tuple`)."""
    return _spans(template)[0]


@lru_cache(maxsize=8192)
def _spans(template: str) -> tuple[Optional[tuple[int, int]], Optional[tuple[int, int]]]:
    """Character spans of the layer and expert numbers in names of this template."""
    m = _LAYER.search(template)
    e = _EXPERT.search(template)
    return (m.span(1) if m else None), (e.span(1) if e else None)


@lru_cache(maxsize=8192)
def _role(template: str, dtype: str, mtp: bool, tied: bool, quant_bits: int, bnb_4bit: bool):
    """-> (group, kind, multiplier) of a name template."""
    name = template
    if name.endswith(_QUANT_META_SUFFIXES) or _QUANT_META.search(name):
        return "quant_meta", "quant_meta", 0
    if _BUFFERS.search(name):
        return "buffer", "buffer", 0
    multiplier = 1
    if name.endswith("_blocks") and dtype == "U8":  # MXFP4: two E2M1 values per byte
        multiplier = 2
    elif name.endswith((".qweight", ".weight_packed")) and dtype in ("I32", "U32"):
        multiplier = 32 // quant_bits
    elif bnb_4bit and dtype == "U8" and name.endswith(".weight"):
        multiplier = 2
    group, kind = _group(name, mtp, tied)
    return group, kind, multiplier


_QUANT_META_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".input_scale", "_scales", ".scales", ".qzeros", ".g_idx")


def _group(name: str, mtp: bool, tied: bool) -> tuple[str, str]:
    """-> (group, kind). `mtp`: the name's layer is past the layers transformers builds."""
    if _VISION.search(name):
        return "vision", "param"
    if _AUDIO.search(name):
        return "audio", "param"
    if mtp or ".mtp" in name or "nextn" in name:
        # DeepSeek-V3 / GLM-4.5 MTP layers store copies of the embedding and the head.
        if _EMBED.search(name) or ".shared_head.head." in name:
            return "mtp", "tied_copy"
        return "mtp", "param"
    if _EMBED.search(name) or _BACKBONE_EMBED.match(name):
        if tied and re.match(r"^(model\.)?(encoder|decoder)\.embed_tokens\.weight$", name):
            # T5 / NLLB: copies of `shared.weight`; untied (transformers 5), each stack has its own
            return "embedding", "tied_copy"
        return "embedding", "param"
    if _HEAD.search(name):
        return ("lm_head", "tied_copy") if tied and name.endswith("weight") else ("lm_head", "param")
    if _ROUTER_EXTRA.search(name):
        return "router", "param"
    if _PER_LAYER_EMBED.search(name):
        return "embedding", "param"
    if _PER_LAYER_MLP.search(name):
        return "dense_mlp", "param"
    if _NORM_EXTRA.search(name):
        return "norms", "param"
    if _SHARED.search(name):
        return "shared_experts", "param"
    if ".self_attention.experts." in name and not name.endswith(("input_linear.weight", "output_linear.weight")):
        # JetMoE's mixture of attention heads: its router and output bias (its experts are routed experts)
        return ("router", "param") if ".router." in name else ("attention", "param")
    if ".moe_statics." in name:  # Ernie 4.5: the correction bias is a parameter of the router
        return "router", "param"
    if _ROUTED.search(name):
        return "routed_experts", "param"
    for pattern, group in _MIXER_ROLES:
        if pattern.search(name):
            return group, "param"
    if _ROUTER.search(name) and _MLP.search(name):
        return "router", "param"
    if _NORM.search(name):
        return "norms", "param"
    if _SSM.search(name):
        return "ssm", "param"
    if _ATTN.search(name):
        return "attention", "param"
    if _MLP.search(name):
        return "dense_mlp", "param"
    return "other", "param"


def _projection(name: str) -> Optional[str]:
    for pattern, proj in _PROJ:
        if pattern.search(name):
            return proj
    return None
