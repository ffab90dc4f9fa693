"""The scoring kernels of moetool/quant/kernels.py: the compiled (inductor) kernels give the eager
kernels' fake-quantized values bit for bit and their errors / moments to float32 rounding; without
a compiler the report falls back to eager with one line on stderr and the same numbers."""

from __future__ import annotations

import pytest
import torch

from moetool.quant import kernels as K
from moetool.quant import schemes
from moetool.quant.report import _errors, _stats
from fakes import DEVICE


def _blocks():
    g = torch.Generator().manual_seed(4)
    yield (torch.randn(3, 64, 256, generator=g) * 0.02).bfloat16()  # stored dtype, converted inside
    t = torch.randn(2, 33, 200, generator=g)  # padding in every blocked scheme
    t[0, 3, 7], t[1, :, :64] = 9.0, 0.0
    yield t


def _bits(t):
    return t.contiguous().view(torch.int32)


def test_no_compiler_falls_back_to_eager(monkeypatch, capsys):
    """torch.compile failing (no C++ compiler, say) is said once on stderr; the numbers are the eager ones."""
    def broken(fn, **kw):
        def call(*a):
            raise RuntimeError("Compiler: cc is not found\nmore lines")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(K, "_COMPILED", {})
    monkeypatch.setattr(K, "_FAILED", [])
    w = next(_blocks()).float()
    eager = [_stats(w), _errors(w, "nf4", None, None)]
    got = [_stats(w, compiled=True), _errors(w, "nf4", None, None, compiled=True)]
    assert all(torch.equal(a, b) for a, b in zip(eager[0], got[0])) and torch.equal(eager[1], got[1])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cc is not found" in err and "eager" in err
    assert not K.compile_wanted(10**12, torch.device("cpu"))  # and no second try


def test_compile_policy(monkeypatch):
    monkeypatch.setattr(K, "_FAILED", [])
    cpu = torch.device("cpu")
    monkeypatch.delenv("MOETOOL_QUANT_COMPILE", raising=False)
    assert not K.compile_wanted(10**6, cpu) and K.compile_wanted(K.COMPILE_MIN_WEIGHTS, cpu)
    assert not K.compile_wanted(10**12, torch.device("meta"))  # CPU only: the GPU runs the eager kernels
    monkeypatch.setenv("MOETOOL_QUANT_COMPILE", "1")
    assert K.compile_wanted(1, cpu)
    monkeypatch.setenv("MOETOOL_QUANT_COMPILE", "0")
    assert not K.compile_wanted(10**12, cpu)


def test_row_moments_on_meta():
    w = torch.empty(3, 130, 200, device="meta", dtype=torch.bfloat16)
    assert all(t.device.type == "meta" and t.shape == (3, 130) for t in K.row_moments(w))
    assert all(t.device.type == "meta" for t in K.combine_moments(K.row_moments(w), 200))


# int8 runs in the default suite; the other schemes compile for minutes each on 2 cores: `pytest -m compile`
@pytest.mark.slow
@pytest.mark.parametrize("scheme", [s if s == "int8" else pytest.param(s, marks=pytest.mark.compile)
                                    for s in schemes.SCHEMES])
def test_compiled_kernels_are_bit_identical(scheme):
    """Compiled (inductor C++) against eager: Q(W) - W bit for bit, the sign of zero included, on
    bf16 and float32 blocks with padding; errors and moments to float32 rounding."""
    pytest.importorskip("torch._inductor")
    for j, w in enumerate(_blocks()):
        x = w.float()
        # the report's two graphs: no scale (the usual), and a power-of-two scale per matrix
        sc = None if j == 0 else torch.exp2(torch.arange(w.shape[0], dtype=torch.float32) - 3).view(-1, 1, 1)
        r = K.run_compiled("errors_diff", w, sc, scheme)
        assert r is not None, K._FAILED
        err, diff = r
        ref = schemes.fake_quantize(x, scheme) - x
        assert torch.equal(_bits(diff), _bits(ref)), (scheme, tuple(w.shape))
        want = _errors(x, scheme, None, None) * (1.0 if sc is None else sc.view(-1).double() ** 2)
        assert torch.allclose(err.double().sum(-1), want, rtol=1e-5, atol=0)
        for a, b in zip(_stats(w, compiled=True), _stats(x)):
            assert torch.allclose(a, b, rtol=1e-5, atol=0, equal_nan=True)


@pytest.mark.compile
def test_compiled_report_equals_eager(tmp_path, monkeypatch):
    """A whole calibrated report with the compiled kernels (bf16 block buffers, Q(W) - W for the
    activation error from the fused kernel) against the eager one: every number to float32 rounding."""
    import math

    from conftest import ALL_TINY, write_tokenizer
    from fakes import build_transformers_model

    from moetool.quant.report import quantize_report

    model = build_transformers_model(dict(ALL_TINY["mixtral-tied"], intermediate_size=64, hidden_size=128,
                                          num_attention_heads=4, head_dim=32), seed=5).eval()
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    write_tokenizer(tmp_path)
    kw = dict(schemes=["int8", "nf4", "nvfp4"], device=DEVICE, calibration_tokens=96)
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("MOETOOL_QUANT_COMPILE", flag)
        runs[flag] = quantize_report(str(tmp_path), **kw)
    assert not K._FAILED
    for a, b in zip(runs["1"].rows, runs["0"].rows):
        assert (a.layer, a.expert, a.projection, a.scheme, a.tokens) == (b.layer, b.expert, b.projection, b.scheme, b.tokens)
        for f in ("rel_error", "output_rel_error", "kurtosis", "outlier_ratio"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None and y is None) or math.isclose(x, y, rel_tol=1e-5), (a, f, x, y)


def test_nf4_by_comparisons_equals_the_lookup():
    """nf4_select (15 comparisons, what the compiled kernel traces) gives the table-lookup nf4's
    values bit for bit: exact ties at every decision threshold and 1 ulp either side, zero and
    constant blocks, subnormals, rows of a multiple of 64 (blocks within rows) and not (blocks
    across rows, padded)."""
    from test_quant_schemes import _ties, adversarial

    for w in adversarial() + [_ties("nf4").unsqueeze(0)]:
        assert torch.equal(_bits(schemes.nf4_select(w)), _bits(schemes.nf4(w))), tuple(w.shape)
        x = w.reshape(w.shape[0], -1, 64) if w.shape[-1] % 64 == 0 else None
        if x is not None:  # the kernel's per-block form
            assert torch.equal(_bits(schemes.nf4_blocks(x).reshape(w.shape)), _bits(schemes.nf4(w)))


def test_e2m1_by_comparisons_equals_the_bit_version():
    """The compiled mxfp4 / nvfp4 kernels round to E2M1 with e2m1_select (the magic number by |x| < 2 /
    < 4); it gives e2m1's values bit for bit, -0.0 and ties included: every finite bfloat16 value, the
    ties between code points and random floats."""
    every_bf16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 0.0, 1e-40])
    x = torch.cat([every_bf16[torch.isfinite(every_bf16)], ties, -ties,
                   torch.randn(1 << 20, generator=torch.Generator().manual_seed(5)) * 3])
    assert torch.equal(_bits(schemes.e2m1_select(x)), _bits(schemes.e2m1(x)))
    w = next(_blocks()).float()
    for scheme in ("mxfp4", "nvfp4"):
        assert torch.equal(_bits(K.KERNELS[scheme](w)), _bits(schemes.fake_quantize(w, scheme)))
