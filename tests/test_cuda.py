"""The CUDA path, where a GPU is present (skipped elsewhere: CI has none).

The forward, trace, profile and quantize-report tests run moetool on a GPU with
`MOETOOL_TEST_DEVICE=cuda pytest ...` (transformers, their reference, stays on the CPU). This file adds
what only a GPU can check:
- each quantization scheme run on CUDA against the independent references run on CUDA (bitsandbytes'
  NF4 kernel, torchao's MXFP4 / NVFP4, torch's per-channel int8), and bit for bit against the same
  kernels on the CPU (which tests/test_quant_schemes.py checks against the references there);
- the report's batched statistics and errors on CUDA equal the CPU's to float32 rounding;
- the CLI with `--device cuda`: trace, profile and quantize-report give the CPU's answers.
"""

from __future__ import annotations

import json

import pytest
import torch

from moetool.quant import schemes
from test_bad_input import run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _weights():
    g = torch.Generator().manual_seed(11)
    w = torch.randn(4, 96, 512, generator=g) * 0.02
    w[0, 5, 17], w[1, 70, 300], w[2, 3] = 0.9, -0.7, 0.0  # outliers, a zero row
    w[3] *= 1e-3  # small scales
    yield w
    yield (torch.randn(3, 33, 200, generator=g) * 0.05).bfloat16().float()  # padding in every blocked scheme


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("scheme", schemes.SCHEMES)
def test_scheme_on_cuda_is_the_cpu_kernel_bit_for_bit(scheme):
    for w in _weights():
        cpu = schemes.fake_quantize(w, scheme)
        gpu = schemes.fake_quantize(w.cuda(), scheme)
        assert gpu.device.type == "cuda"
        assert torch.equal(_bits(gpu.cpu()), _bits(cpu)), f"{scheme}: {(gpu.cpu() != cpu).sum().item()} values differ"


@pytest.mark.parametrize("scheme", schemes.SCHEMES)
def test_report_statistics_on_cuda(scheme):
    from moetool.quant.report import _errors, _stats

    for w in _weights():
        for a, b in zip(_stats(w), _stats(w.cuda())):
            assert torch.allclose(b.cpu().double(), a.double(), rtol=2e-5, atol=1e-30)
        d_cpu, d_gpu = torch.empty_like(w), torch.empty_like(w.cuda())
        e_cpu = _errors(w, scheme, d_cpu, None)
        e_gpu = _errors(w.cuda(), scheme, d_gpu, None)
        assert torch.allclose(e_gpu.cpu().double(), e_cpu.double(), rtol=2e-5, atol=1e-30)
        assert torch.equal(_bits(d_gpu.cpu()), _bits(d_cpu))


def test_nf4_on_cuda_matches_bitsandbytes_cuda():
    bnb = pytest.importorskip("bitsandbytes.functional")
    for w in _weights():
        for m in w.cuda():
            code, state = bnb.quantize_4bit(m.contiguous(), blocksize=64, quant_type="nf4")
            ref = bnb.dequantize_4bit(code, state).float()
            ours = schemes.fake_quantize(m[None], "nf4")[0]
            assert torch.allclose(ours, ref, atol=1e-6 * float(m.abs().max()) + 1e-12, rtol=0)


def test_mxfp4_on_cuda_matches_torchao_cuda():
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    for w in _weights():
        for m in w.cuda():
            if m.shape[-1] % 32:
                continue  # torchao's MX formats need whole blocks
            scale, data = mx.to_mx(m.contiguous(), torch.float4_e2m1fn_x2, 32)
            ref = mx.to_dtype(data, scale, torch.float4_e2m1fn_x2, 32, torch.float32).float()
            assert torch.equal(schemes.fake_quantize(m[None], "mxfp4")[0], ref)


def test_nvfp4_on_cuda_matches_torchao_cuda():
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    for w in _weights():
        for m in w.cuda():
            if m.shape[-1] % 16:
                continue  # torchao's NVFP4 needs whole blocks
            t = nv.NVFP4Tensor.to_nvfp4(m.contiguous(), per_tensor_scale=nv.per_tensor_amax_to_scale(m.abs().max()))
            ref = t.dequantize(torch.float32).float()
            ours = schemes.fake_quantize(m[None], "nvfp4")[0]
            assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-9 * float(m.abs().max()))


def test_int8_on_cuda_matches_torch_quantize_per_channel():
    w = next(_weights())  # float32 values: the bf16 ones have exact half steps, which torch rounds its own way
    for m in w:
        s = (m.abs().amax(dim=1) / 127).double().clamp_min(1e-30)
        ref = torch.quantize_per_channel(m, s, torch.zeros(len(s), dtype=torch.long), 0, torch.qint8).dequantize()
        ours = schemes.fake_quantize(m[None].cuda(), "int8")[0].cpu()
        assert torch.allclose(ours, ref, atol=1e-6 * float(m.abs().max()) + 1e-12, rtol=1e-6)


def _json(*args):
    r = run_cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_cli_trace_on_cuda_routes_like_cpu():
    args = ("trace", "def add(a, b): return a + b")
    cpu, gpu = _json(*args, "--device", "cpu"), _json(*args, "--device", "cuda")
    assert [l["experts"] for l in cpu["layers"]] == [l["experts"] for l in gpu["layers"]]
    for a, b in zip(cpu["layers"], gpu["layers"]):
        for wa, wb in zip(a["weights"], b["weights"]):
            assert wa == pytest.approx(wb, abs=1e-5)


def test_cli_profile_and_quantize_report_on_cuda(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog.\n")
    cpu, gpu = (_json("profile", str(corpus), "-o", str(tmp_path / d), "--device", d) for d in ("cpu", "cuda"))
    assert cpu["tokens"] == gpu["tokens"] and cpu["stats_sha256"] and gpu["stats_sha256"]
    assert [l["load"] for l in cpu["layers"]] == [l["load"] for l in gpu["layers"]]
    q = [_json("quantize-report", "--schemes", "int8,nf4,mxfp4", "--layers", "1", "--calibration-tokens", "64",
               "--device", d) for d in ("cpu", "cuda")]
    assert len(q[0]["experts"]) == len(q[1]["experts"]) > 0
    for a, b in zip(q[0]["experts"], q[1]["experts"]):
        assert [a[k] for k in ("layer", "expert", "projection", "scheme", "tokens")] == \
               [b[k] for k in ("layer", "expert", "projection", "scheme", "tokens")]
        assert a["rel_error"] == pytest.approx(b["rel_error"], rel=1e-4)
        assert a["output_rel_error"] == pytest.approx(b["output_rel_error"], rel=1e-3)
