"""The profile engine's batched attention (model.Segments.attend): prompts of similar length padded
into one [B, H, Lmax, D] attention per bucket equal one attention per prompt (the trace's path),
for causal, sliding-window and chunked masks, grouped-query heads, and buckets split by padding
waste and by the score budget."""

import pytest
import torch

from moetool.forward.model import Segments, attention_mask, sdpa


def per_prompt(q, k, v, lengths, key, scale):
    out, a = [], 0
    for L in lengths:
        out.append(sdpa(q[a:a + L], k[a:a + L], v[a:a + L], attention_mask(L, key[0], key[1], "cpu"), scale))
        a += L
    return torch.cat(out)


@pytest.mark.parametrize("key", [(None, None), (5, None), (None, 8)])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_bucketed_attention_equals_one_attention_per_prompt(key, heads):
    g = torch.Generator().manual_seed(0)
    lengths = [1, 3, 17, 16, 40, 2, 39, 7, 7, 25, 1, 64]
    H, Hkv = heads
    T = sum(lengths)
    q, k = torch.randn(T, H, 16, generator=g), torch.randn(T, Hkv, 16, generator=g)
    v = torch.randn(T, Hkv, 12, generator=g)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    seg = Segments([(a, a + L, attention_mask(L, key[0], key[1], "cpu")) for a, L in zip(starts, lengths)], key)
    ref = per_prompt(q, k, v, lengths, key, 0.25)
    got = sdpa(q, k, v, seg, 0.25)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    buckets = seg.buckets(H)
    assert 1 < len(buckets) < len(lengths)  # some prompts share a bucket, padding waste splits others
    assert sum(int(r.sum()) for _, r, _ in buckets) == T
    for rows, real, Lmax in buckets:
        assert real.shape[1] == Lmax and real.numel() <= Segments.PAD_WASTE * int(real.sum())
    # without the key (masks of another kind) the per-prompt path runs
    plain = Segments(seg.parts)
    assert torch.equal(sdpa(q, k, v, plain, 0.25), ref)


def test_score_budget_splits_buckets(monkeypatch):
    monkeypatch.setattr(Segments, "MAX_SCORES", 4 * 10 * 10)  # one prompt of 10 with 4 heads per bucket
    lengths = [10] * 5
    seg = Segments([(10 * i, 10 * i + 10, attention_mask(10, None, None, "cpu")) for i in range(5)], (None, None))
    assert [int(r.shape[0]) for r, _, _ in seg.buckets(4)] == [1] * 5
    assert [int(r.shape[0]) for r, _, _ in seg.buckets(1)] == [4, 1]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(50, 4, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(sdpa(q, k, v, seg, 0.3), per_prompt(q, k, v, lengths, (None, None), 0.3))
