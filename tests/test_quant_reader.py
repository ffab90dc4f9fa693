"""moetool/quant/reader.py: experts read with pread straight into the block buffers hold exactly the
bytes the store's memory-mapped views copy in (bf16 and float32 checkpoints, buffers of the stored
dtype and float32), and a weight-only report is the same row for row with and without it."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch


def _write(root, dtype, experts=4, D=64, F=32, L=2):
    from safetensors.torch import save_file

    cfg = dict(model_type="qwen3_moe", hidden_size=D, intermediate_size=2 * D, moe_intermediate_size=F,
               num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               num_experts=experts, num_experts_per_tok=2, vocab_size=100, max_position_embeddings=64)
    g = torch.Generator().manual_seed(1)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(dtype)
    t = {"model.embed_tokens.weight": r(100, D), "model.norm.weight": torch.ones(D, dtype=dtype), "lm_head.weight": r(100, D)}
    for i in range(L):
        p = f"model.layers.{i}"
        for n, shape in (("q_proj", (64, D)), ("k_proj", (32, D)), ("v_proj", (32, D)), ("o_proj", (D, 64))):
            t[f"{p}.self_attn.{n}.weight"] = r(*shape)
        for n in ("self_attn.q_norm", "self_attn.k_norm"):
            t[f"{p}.{n}.weight"] = torch.ones(16, dtype=dtype)
        for n in ("input_layernorm", "post_attention_layernorm"):
            t[f"{p}.{n}.weight"] = torch.ones(D, dtype=dtype)
        t[f"{p}.mlp.gate.weight"] = r(experts, D)
        for e in range(experts):
            for n, shape in (("gate_proj", (F, D)), ("up_proj", (F, D)), ("down_proj", (D, F))):
                t[f"{p}.mlp.experts.{e}.{n}.weight"] = r(*shape)
    root.mkdir(parents=True, exist_ok=True)
    save_file(t, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(cfg))
    return root


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("reader")
    return {dt: _write(d / str(dt).split(".")[-1], dt) for dt in (torch.bfloat16, torch.float32)}


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("buffer", [torch.bfloat16, torch.float32])
def test_reader_fills_the_buffers_as_the_store_copy(ckpts, stored, buffer):
    from moetool.arch import spec_from_config
    from moetool.forward import new_store
    from moetool.forward.config import forward_config
    from moetool.forward.model import Experts, Names
    from moetool.quant.reader import ExpertReader
    from moetool.tracing import _resolve_for_forward

    ckpt = _resolve_for_forward(str(ckpts[stored]), None)
    spec = spec_from_config(ckpt.config, ckpt.config_path)
    fc = forward_config(spec, ckpt.config)
    store = new_store(ckpt, streaming=True)
    reader = ExpertReader(store)
    try:
        for layer in (0, 1):
            loader = Experts(store, Names(store), layer, fc.family, spec.moe.expert_ffn, None, "cpu")
            shapes = dict(zip(("gate", "up", "down"), (t.shape for t in loader.load(0)[:3])))
            got = {p: torch.full((4, *s), float("nan"), dtype=buffer) for p, s in shapes.items()}
            want = {p: torch.empty((4, *s), dtype=buffer) for p, s in shapes.items()}
            for e in (3, 0, 2, 1):  # slots in another order than the file's
                assert reader.read(loader, e, got, 3 - e)
                for p, t in zip(("gate", "up", "down"), loader.load(e)[:3]):
                    want[p][3 - e].copy_(t)
            for p in shapes:
                assert torch.equal(got[p].view(torch.int16 if buffer == torch.bfloat16 else torch.int32),
                                   want[p].view(torch.int16 if buffer == torch.bfloat16 else torch.int32)), (layer, p)
            # a buffer of another shape: not read (the caller goes through the store)
            assert not reader.read(loader, 0, {p: b[:, :1] for p, b in got.items()}, 0)
    finally:
        reader.close()
        store.close()


def test_weight_only_report_identical_without_the_reader(ckpts, monkeypatch):
    from moetool.quant import reader as R
    from moetool.quant.report import quantize_report

    kw = dict(schemes=["int8", "nf4", "nvfp4"], weight_only=True)
    calls = []
    real = R.ExpertReader.read
    monkeypatch.setattr(R.ExpertReader, "read", lambda self, *a: calls.append(1) or real(self, *a))
    fast = quantize_report(str(ckpts[torch.bfloat16]), **kw)
    assert len(calls) == 2 * 4  # every expert of both layers read directly
    monkeypatch.setattr(R.ExpertReader, "read", lambda self, *a: False)
    slow = quantize_report(str(ckpts[torch.bfloat16]), **kw)
    assert [asdict(r) for r in fast.rows] == [asdict(r) for r in slow.rows]
