"""The native CPU kernel of quantize-report (moetool/quant/native.c): Q(W) - W bit for bit what the
schemes of schemes.py give (which tests/test_quant_schemes.py checks against bitsandbytes, torchao,
torch and GPTQ), on bf16 / fp16 / fp32 blocks with ties, zeros, subnormals, outliers and extreme
magnitudes; errors and statistics against float64 computed here; the report's numbers with and
without it; and a missing compiler said once, with the torch kernels' numbers."""

from __future__ import annotations

import math
import os

import pytest
import torch

from moetool.quant import native as N
from moetool.quant import schemes as S

pytestmark = pytest.mark.skipif(N.library() is None, reason="no C compiler to build the native kernel")


def _bits(t):
    return t.contiguous().view(torch.int32)


def _blocks():
    g = torch.Generator().manual_seed(11)
    yield "typical", (torch.randn(3, 160, 256, generator=g) * 0.02)
    t = torch.randn(2, 130, 320, generator=g) * 0.05  # 130 rows: a partial fp8 block band; 320 = 2.5 groups of 128
    t[0, 3, 7], t[1, 9, 100] = 4.0, -3.0  # outliers
    t[0, 5] = 0.0  # a zero row
    t[1, 20, :64] = 0.0  # zero blocks
    t[1, 21, :32] = -0.0
    yield "outliers and zeros", t
    # exact ties: a row of max 127 has int8 scale 1, so x.5 rounds to even; fp8 scale 1 at max 448
    ties = torch.arange(-127, 128, 0.5)[:496].reshape(1, 1, 496)[..., :480]
    ties = torch.cat([ties, ties * (448 / 127)], 1)
    yield "ties", ties
    k = torch.arange(-8, 8, dtype=torch.float32)
    p2 = torch.randn(1, 16, 64, generator=g) * 0.1
    p2[0, :, 5] = torch.exp2(k) * (1 - 2.0 ** -24)  # block maxima just below powers of two (mxfp4's E8M0)
    p2[0, :, 40] = -torch.exp2(k) * (1 - 2.0 ** -23)
    yield "maxima below powers of two", p2
    yield "tiny (subnormal fp8 range)", torch.randn(2, 32, 128, generator=g) * 1e-6
    yield "huge", torch.randn(2, 32, 128, generator=g) * 1e30
    yield "denormal float32", torch.randn(1, 16, 128, generator=g) * 1e-39
    # int4 groups whose upper clamp binds: max / s and -min / s both x.5 (7.5 + 7.5 rounds to 8 + 8 > 15)
    c = (torch.randn(1, 16, 256, generator=g) * 3).clamp(-7.5, 7.5)
    c[..., 0], c[..., 1], c[..., 128], c[..., 129] = -7.5, 7.5, -6.5, 8.5
    c[:, 8:] *= 3.0
    yield "int4 clamp", c


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scheme", S.SCHEMES)
def test_diff_is_bit_identical_to_the_schemes(scheme, dtype):
    for name, w in _blocks():
        w = w.to(dtype)
        if not torch.isfinite(w).all() or not N.supports(w, scheme):
            continue
        x = w.float()
        ref = S.FUNCTIONS[scheme](x) - x
        diff = torch.empty(w.shape)
        _, _, errs = N.score(w, [scheme], moments=False, diff=diff)
        bad = _bits(diff) != _bits(ref)
        assert not bad.any(), f"{name}: {int(bad.sum())} values differ, e.g. at {bad.nonzero()[0].tolist()}"
        # float32 squares, as the kernel's: they overflow / underflow for extreme matrices, which the report
        # scales (next test)
        want = ref.square().sum(-1)
        assert torch.isclose(errs[scheme], want, rtol=2e-6, atol=0, equal_nan=True).all(), name


@pytest.mark.parametrize("scheme", S.SCHEMES)
def test_errors_with_a_scale_and_all_schemes_at_once(scheme):
    """The power-of-two scale the report uses for extreme matrices; and one call for every scheme gives
    the same errors as one call per scheme."""
    w = (torch.randn(2, 64, 256, generator=torch.Generator().manual_seed(1)) * 1e-20).bfloat16()
    x = w.float()
    scale = torch.tensor([2.0 ** 70, 2.0 ** 66])
    _, _, errs = N.score(w, [scheme], moments=False, scale=scale)
    ref = ((S.FUNCTIONS[scheme](x) - x) * scale.view(-1, 1, 1)).double().square().sum(-1)
    assert torch.isclose(errs[scheme].double(), ref, rtol=2e-6, atol=0).all()
    _, _, every = N.score(w, list(S.SCHEMES), moments=False, scale=scale)
    assert torch.equal(every[scheme], errs[scheme])
    # and the per-matrix float64 sums the report reads (with the moments, or alone; one scheme or all)
    for moments, schemes in ((False, [scheme]), (True, list(S.SCHEMES))):
        out = N.score(w, schemes, moments=moments, scale=scale, sums=True)
        want = ref.sum(-1)
        assert torch.allclose(out[3][schemes.index(scheme)], want, rtol=2e-6, atol=0)
        assert torch.allclose(out[3][schemes.index(scheme)], errs[scheme].double().sum(-1), rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_statistics_against_float64(dtype):
    """||W||^2, kurtosis, max|W| / std and max|W| per matrix against float64 over the whole matrix; the
    rows' max / min exactly."""
    from moetool.quant import kernels as K

    for name, w in _blocks():
        w = w.to(dtype)
        if not N.supports(w, "int8"):
            continue
        parts, stats, _ = N.score(w, [], moments=True)
        assert torch.equal(parts[1], w.float().amax(-1)) and torch.equal(parts[2], w.float().amin(-1))
        x = w.double().flatten(1)
        mu = x.mean(1, keepdim=True)
        c2, c4 = ((x - mu) ** 2).sum(1), ((x - mu) ** 4).sum(1)
        absmax = x.abs().amax(1)
        want = (x.square().sum(1), x.shape[1] * c4 / c2 ** 2, absmax / (c2 / x.shape[1]).sqrt(), absmax)
        for label, got, ref in zip(("norm2", "kurtosis", "outlier", "absmax"), stats, want):
            finite = torch.isfinite(ref)
            assert torch.equal(torch.isfinite(got), finite), (name, label)
            assert torch.allclose(got[finite], ref[finite], rtol=2e-5, atol=0), (name, label)
        combined = K.combine_moments(parts, w.shape[-1])  # the torch combine of the same rows
        for got, ref in zip(stats, combined):
            assert torch.allclose(got, ref, rtol=1e-12, atol=0, equal_nan=True), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_groups_from_the_first_pass_leave_the_rows_moments_unchanged(dtype):
    """With int4_g128 the first pass takes each group's max and min and the row's from them: every row's
    moments are the bits of a call without it (NaN rows, +-inf, signed zeros, partial groups included), and
    its errors those of int4 alone."""
    g = torch.Generator().manual_seed(5)
    odd = torch.randn(1, 12, 320, generator=g)  # 320: two whole groups and half of one
    odd[0, 0, 5] = float("nan")
    odd[0, 1, 300] = float("nan")  # in the partial group
    odd[0, 7, 127] = float("nan")  # in the last vector of a group (a group's max is NaN, the row's chain moves on)
    odd[0, 8, 319] = float("nan")  # in the row's last vector
    odd[0, 2, 3], odd[0, 2, 200] = float("inf"), float("-inf")  # sum NaN, no NaN in the row
    odd[0, 3, 130] = float("inf")
    odd[0, 4] = -odd[0, 4].abs()
    odd[0, 4, 77] = -0.0  # max -0.0 ... and +0.0
    odd[0, 5] = -odd[0, 5].abs()
    odd[0, 5, 1], odd[0, 5, 250] = 0.0, -0.0
    odd[0, 6] = 0.0
    for name, w in [*_blocks(), ("non-finite and signed zeros", odd)]:
        w = w.to(dtype)
        if not N.supports(w, "int4_g128"):
            continue
        plain, _, _ = N.score(w, [], moments=True)
        parts, _, errs = N.score(w, ["int4_g128", "int8"], moments=True)
        assert torch.equal(_bits(parts), _bits(plain)), name
        alone = N.score(w, ["int4_g128"], moments=False)[2]["int4_g128"]
        assert torch.equal(_bits(errs["int4_g128"]), _bits(alone)), name


@pytest.mark.parametrize("shape", [(5, 48, 128), (3, 300, 256)])
def test_threads_split_the_block_and_agree(shape):
    """Threads take chunks of rows from a shared counter: 32-row chunks (48 rows: 32 + 16), fp8_block's
    whole 128-row bands (300 rows: 128 + 128 + 44), nvfp4's tensor scale from the chunks' maxima; the
    same numbers as one thread, each scheme alone or all at once."""
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 0.02).bfloat16()
    w[1, -1, 3] = 0.5  # nvfp4's tensor scale from the matrix's last chunk
    for schemes in [list(S.SCHEMES), ["int8"], ["fp8_block"], ["nvfp4"]]:
        one = N.score(w, schemes, moments=True, threads=1)
        for threads in (2, 3):
            other = N.score(w, schemes, moments=True, threads=threads)
            assert all(torch.equal(a, b) for a, b in zip(one[0], other[0]))
            assert all(torch.equal(a, b) for a, b in zip(one[1], other[1]))
            assert all(torch.equal(one[2][s], other[2][s]) for s in schemes)
    # and against the torch kernels, where nvfp4's scale comes from another chunk than the row's
    diff = torch.empty(shape)
    N.score(w, ["nvfp4"], moments=False, diff=diff, threads=3)
    assert torch.equal(_bits(diff), _bits(S.nvfp4(w.float()) - w.float()))


def test_what_it_takes():
    cpu = torch.empty(2, 8, 128)
    assert N.supports(cpu, "int8") and N.supports(cpu.bfloat16(), "nf4")
    assert not N.supports(torch.empty(2, 8, 120), "int8")  # rows a multiple of 16
    assert not N.supports(torch.empty(2, 8, 96), "nf4") and N.supports(torch.empty(2, 8, 96), "mxfp4")  # nf4: whole blocks
    assert not N.supports(torch.empty(2, 8, 128, device="meta"), "int8")
    assert not N.supports(torch.empty(2, 128, 8).transpose(1, 2), "int8")  # not contiguous
    assert not N.supports(cpu.double(), "int8")


@pytest.fixture(scope="module")
def tiny_qwen3_bf16(tmp_path_factory):
    """A tiny Qwen3-MoE in bf16 whose expert rows the native kernel takes for every scheme (64 and 128 long)."""
    from conftest import ALL_TINY, write_tokenizer
    from fakes import build_transformers_model

    model = build_transformers_model(dict(ALL_TINY["qwen3_moe"], hidden_size=128, moe_intermediate_size=64,
                                          intermediate_size=128), seed=5)
    d = tmp_path_factory.mktemp("qwen3_bf16")
    model.to(torch.bfloat16).save_pretrained(d)
    write_tokenizer(d)  # calibration text
    return str(d)


def _report(path, **kw):
    from moetool.quant.report import quantize_report

    return {(r.layer, r.expert, r.projection, r.scheme): r for r in quantize_report(path, **kw).rows}


def test_report_equals_the_torch_kernels(tiny_qwen3_bf16, monkeypatch):
    """The whole weight-space report with and without the native kernel: the same rows, errors and
    statistics to float32 rounding."""
    native = _report(tiny_qwen3_bf16, weight_only=True)
    monkeypatch.setenv("MOETOOL_QUANT_NATIVE", "0")
    torch_rows = _report(tiny_qwen3_bf16, weight_only=True)
    assert native.keys() == torch_rows.keys() and len(native) > 100
    for key, a in native.items():
        b = torch_rows[key]
        for f in ("rel_error", "sqnr_db", "kurtosis", "outlier_ratio"):
            x, y = getattr(a, f), getattr(b, f)
            assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-9) or (math.isnan(x) and math.isnan(y)), (key, f, x, y)


def test_a_missing_compiler_is_said_once_and_the_torch_kernels_run(tiny_qwen3_bf16, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(N, "_lib", None)
    monkeypatch.setattr(N, "_state", {})
    monkeypatch.setenv("MOETOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    rows = _report(tiny_qwen3_bf16, weight_only=True, schemes=["int8"])
    assert N.library() is None
    err = capsys.readouterr().err
    assert err.count("native kernel unavailable") == 1 and "no C compiler" in err and err.count("\n") == 1
    monkeypatch.setenv("MOETOOL_QUANT_NATIVE", "0")
    assert rows.keys() == _report(tiny_qwen3_bf16, weight_only=True, schemes=["int8"]).keys()


def test_a_failing_build_leaves_nothing_behind(monkeypatch, tmp_path, capsys):
    """A compiler that fails (here: a source it cannot compile) leaves no library or temporary file in
    the cache; a good build is reused from the cache by the next process (same key)."""
    monkeypatch.setattr(N, "_lib", None)
    monkeypatch.setattr(N, "_state", {})
    monkeypatch.setenv("MOETOOL_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.c"
    bad.write_text("int f( {\n")
    monkeypatch.setattr(N, "SOURCE", bad)
    assert N.library() is None
    assert "failed" in capsys.readouterr().err
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    monkeypatch.setattr(N, "SOURCE", N.Path(N.__file__).with_name("native.c"))
    monkeypatch.setattr(N, "_state", {})
    assert N.library() is not None
    built = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert [p.name for p in built] == ["libmoetool_quant.so"]
    mtime = os.stat(built[0]).st_mtime_ns
    monkeypatch.setattr(N, "_lib", None)
    monkeypatch.setattr(N, "_state", {})
    assert N.library() is not None and os.stat(built[0]).st_mtime_ns == mtime  # from the cache


def test_blocks_read_ahead_in_a_thread_give_the_same_report(tiny_qwen3_bf16, monkeypatch):
    """One expert per block: each block after the first is read by the read-ahead thread into the
    other set of buffers while the kernel scores the one before (in weight space the next layer's first
    block too, during this layer's last). Weight space and calibrated (activation space too, whose
    reservoir draws depend on the order) against the torch kernels."""
    import threading

    from moetool.quant import report as R
    from moetool.quant.reader import ExpertReader

    readers = []
    real = ExpertReader.read

    def read(self, loader, e, bufs, i):
        readers.append(threading.current_thread().name)
        return real(self, loader, e, bufs, i)

    monkeypatch.setattr(ExpertReader, "read", read)
    monkeypatch.setattr(R, "NATIVE_BLOCK_ELEMENTS", 1 << 15)  # an expert is 3 x 64 x 128 = 24576 weights
    for kw in (dict(weight_only=True), dict(weight_only=True, layers={1, 2}, experts={1, 2, 5}),
               dict(calibration_tokens=48)):
        readers.clear()
        native = _report(tiny_qwen3_bf16, **kw)
        ahead = sum(name.startswith("moetool-work") for name in readers)
        first = 1 if kw.get("weight_only") else len({r[0] for r in native})  # the first layer's / each layer's first
        assert ahead and ahead == len(readers) - first, readers
        monkeypatch.setenv("MOETOOL_QUANT_NATIVE", "0")
        torch_rows = _report(tiny_qwen3_bf16, **kw)
        monkeypatch.delenv("MOETOOL_QUANT_NATIVE")
        assert native.keys() == torch_rows.keys()
        for key, a in native.items():
            b = torch_rows[key]
            assert a.tokens == b.tokens
            for f in ("rel_error", "sqnr_db", "kurtosis", "outlier_ratio", "output_rel_error"):
                x, y = getattr(a, f), getattr(b, f)
                assert x == y is None or math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-9), (key, f, x, y)


@pytest.mark.parametrize("nth", [3, 9])  # expert 2 of layer 0 (the next block); expert 0 of layer 1 (the next layer's)
def test_a_failing_read_ahead_raises_its_own_error(tiny_qwen3_bf16, monkeypatch, nth):
    """A read in the read-ahead thread fails (the 3rd: the next block of a layer; the 9th: the next
    layer's first block, read during this layer's last): that error, nothing more."""
    from moetool.errors import BadCheckpoint
    from moetool.quant import report as R
    from moetool.quant.reader import ExpertReader

    real = ExpertReader.read
    seen = []

    def read(self, loader, e, bufs, i):
        seen.append(e)
        if len(seen) == nth:
            raise BadCheckpoint(f"read {nth} (expert {e}): truncated")
        return real(self, loader, e, bufs, i)

    monkeypatch.setattr(ExpertReader, "read", read)
    monkeypatch.setattr(R, "NATIVE_BLOCK_ELEMENTS", 1 << 15)
    with pytest.raises(BadCheckpoint, match=f"read {nth} \\(expert {(nth - 1) % 8}\\): truncated"):
        _report(tiny_qwen3_bf16, weight_only=True)
    assert seen[-1] == (nth - 1) % 8
