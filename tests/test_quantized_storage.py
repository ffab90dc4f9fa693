"""Quantized checkpoints as they are stored: gpt-oss's MXFP4 experts (`*_blocks` + `*_scales`)
are dequantised on load exactly as transformers' own converter does and run through the forward
like the dequantised model in transformers; MXFP4 and GPTQ header-only checkpoints count logical
parameters, not stored elements."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import moetool
from fakes import DEVICE, build_transformers_model, randomize_biases, transformers_routes, write_header_only
from moetool.quant.schemes import E2M1_GRID, mxfp4

REPO = Path(__file__).parents[1]


def pack_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., R, D] -> OCP MXFP4 blocks [..., R, D/32, 16] (low nibble first) and E8M0 scales [..., R, D/32]."""
    x = w.float().reshape(*w.shape[:-1], -1, 32)
    amax = x.abs().amax(-1, keepdim=True)
    exp = (torch.bitwise_right_shift(amax.view(torch.int32), 23) - 127 - 2).float()  # E8M0: the exponent bits
    q = mxfp4(w.float().reshape(-1, w.shape[-1])).reshape(x.shape) / torch.exp2(exp)  # on the E2M1 grid
    idx = (q.abs()[..., None] == E2M1_GRID).float().argmax(-1) + 8 * (q < 0)
    idx = idx.to(torch.uint8)
    blocks = idx[..., 0::2] | (idx[..., 1::2] << 4)
    return blocks, (exp.squeeze(-1) + 127).to(torch.uint8)


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory):
    from safetensors.torch import save_file

    from conftest import ALL_TINY

    model = build_transformers_model(dict(ALL_TINY["gpt_oss"], intermediate_size=64), seed=2).eval()
    randomize_biases(model, 2)
    d = tmp_path_factory.mktemp("gptoss-mxfp4")
    model.save_pretrained(d)
    from safetensors.torch import load_file

    tensors = load_file(str(d / "model.safetensors"))
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        for proj in ("gate_up_proj", "down_proj"):
            lin = tensors.pop(p + proj).transpose(1, 2).contiguous()  # stored x @ W; MXFP4 stores [E, out, in]
            blocks, scales = pack_mxfp4(lin)
            tensors[p + proj + "_blocks"], tensors[p + proj + "_scales"] = blocks, scales
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d, model


def test_mxfp4_dequant_matches_transformers(gpt_oss_mxfp4):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moetool.forward.weights import WeightStore
    from moetool.source import resolve

    d, _ = gpt_oss_mxfp4
    store = WeightStore(resolve(str(d)).tensors)
    for proj in ("gate_up_proj", "down_proj"):
        name = f"model.layers.1.mlp.experts.{proj}"
        ref = convert_moe_packed_tensors(store.raw(name + "_blocks"), store.raw(name + "_scales"), dtype=torch.float32)
        for e in range(4):
            assert torch.equal(store.get(name, torch.float32, index=e), ref[e].t())


def test_mxfp4_forward_matches_dequantised_transformers(gpt_oss_mxfp4):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moetool.forward import run_forward
    from moetool.forward.weights import WeightStore
    from moetool.source import resolve

    d, model = gpt_oss_mxfp4
    store = WeightStore(resolve(str(d)).tensors)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                name = f"model.layers.{i}.mlp.experts.{proj}"
                deq = convert_moe_packed_tensors(store.raw(name + "_blocks"), store.raw(name + "_scales"),
                                                 dtype=torch.float32)
                getattr(layer.mlp.experts, proj).copy_(deq)
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_routes = transformers_routes(model, ids)
    out = run_forward(resolve(str(d)), ids[0].tolist(), device=DEVICE)
    assert (out.logits - ref_logits).abs().max().item() < 1e-4
    for r in out.routes:
        assert torch.equal(r.experts.sort(-1).values, ref_routes[r.layer][0].sort(-1).values)


def test_gpt_oss_20b_mxfp4_header_only(tmp_path):
    """The published gpt-oss-20b layout: experts as MXFP4 blocks + scales, the rest bf16."""
    cfg = json.loads((REPO / "sample_configs" / "gpt-oss-20b.json").read_text())
    D, F, E, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"], cfg["vocab_size"]
    H, KV, Dh = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    t = {"model.embed_tokens.weight": ("BF16", [V, D]), "model.norm.weight": ("BF16", [D]),
         "lm_head.weight": ("BF16", [V, D])}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for n, shape in (("q_proj", [H * Dh, D]), ("k_proj", [KV * Dh, D]), ("v_proj", [KV * Dh, D]),
                         ("o_proj", [D, H * Dh])):
            t[f"{p}.self_attn.{n}.weight"] = ("BF16", shape)
            t[f"{p}.self_attn.{n}.bias"] = ("BF16", [shape[0]])
        t[f"{p}.self_attn.sinks"] = ("BF16", [H])
        t[f"{p}.input_layernorm.weight"] = ("BF16", [D])
        t[f"{p}.post_attention_layernorm.weight"] = ("BF16", [D])
        t[f"{p}.mlp.router.weight"] = ("BF16", [E, D])
        t[f"{p}.mlp.router.bias"] = ("BF16", [E])
        t[f"{p}.mlp.experts.gate_up_proj_blocks"] = ("U8", [E, 2 * F, D // 32, 16])
        t[f"{p}.mlp.experts.gate_up_proj_scales"] = ("U8", [E, 2 * F, D // 32])
        t[f"{p}.mlp.experts.gate_up_proj_bias"] = ("BF16", [E, 2 * F])
        t[f"{p}.mlp.experts.down_proj_blocks"] = ("U8", [E, D, F // 32, 16])
        t[f"{p}.mlp.experts.down_proj_scales"] = ("U8", [E, D, F // 32])
        t[f"{p}.mlp.experts.down_proj_bias"] = ("BF16", [E, D])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_header_only(tmp_path / "model.safetensors", t)
    r = moetool.count(str(tmp_path))
    assert r.counted_from == "headers" and r.cross_check["match"], r.cross_check
    assert r.total_params == 20_914_757_184 and r.active_params_excl_embedding == 3_608_307_264
    assert r.bytes_stored == pytest.approx(13.76e9, rel=0.01)  # "13.76 GB on disk"
    assert {s["kind"] for s in r.cross_check["stored_not_counted"]} == {"quant_meta"}


def test_gptq_header_only(tmp_path):
    """GPTQ 4-bit: qweight int32 [in/8, out], qzeros, fp16 scales, g_idx; embeddings and head fp16."""
    cfg = json.loads((REPO / "sample_configs" / "mixtral-8x7b.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    D, F = cfg["hidden_size"], cfg["intermediate_size"]
    t = {"model.embed_tokens.weight": ("F16", [32000, D]), "model.norm.weight": ("F16", [D]),
         "lm_head.weight": ("F16", [32000, D])}

    def gptq(name, out, inp):
        t[f"{name}.qweight"] = ("I32", [inp // 8, out])
        t[f"{name}.qzeros"] = ("I32", [inp // 128, out // 8])
        t[f"{name}.scales"] = ("F16", [inp // 128, out])
        t[f"{name}.g_idx"] = ("I32", [inp])

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for n, out in (("q_proj", D), ("k_proj", 1024), ("v_proj", 1024), ("o_proj", D)):
            gptq(f"{p}.self_attn.{n}", out, D)
        t[f"{p}.input_layernorm.weight"] = ("F16", [D])
        t[f"{p}.post_attention_layernorm.weight"] = ("F16", [D])
        t[f"{p}.block_sparse_moe.gate.weight"] = ("F16", [8, D])
        for e in range(8):
            gptq(f"{p}.block_sparse_moe.experts.{e}.w1", F, D)
            gptq(f"{p}.block_sparse_moe.experts.{e}.w3", F, D)
            gptq(f"{p}.block_sparse_moe.experts.{e}.w2", D, F)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_header_only(tmp_path / "model.safetensors", t)
    r = moetool.count(str(tmp_path))
    assert r.total_params == 46_702_792_704 and r.cross_check["match"], r.cross_check
    assert r.quantization == "gptq (4)"
    assert r.bytes_stored < 0.3 * 2 * r.total_params  # about 4.2 bits per weight, not 16
