"""`moetool profile --ray`: shards on Ray actors (local mode) merge to the single-process profile."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import DEVICE

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_local_mode_equals_single_process(tiny_checkpoint, tmp_path):
    import shutil

    from conftest import write_tokenizer
    from test_profile import DOMAINS, PROMPTS

    from moetool.profile.corpus import Prompt
    from moetool.profile.distributed import profile_on_ray
    from moetool.profile.engine import profile

    src, _ = tiny_checkpoint("qwen3_moe")
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    write_tokenizer(d)
    prompts = [Prompt(i, t, g) for i, (t, g) in enumerate(zip(PROMPTS, DOMAINS))]
    single = profile(prompts, model=str(d), device=DEVICE, block_tokens=1000)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        sharded = profile_on_ray(prompts, address="local", workers=2, model=str(d), device=DEVICE,
                                 block_tokens=1000, out=str(tmp_path / "out"))
    finally:
        ray.shutdown()
    assert sharded.tokens == single.tokens and sharded.meta["prompts"] == single.meta["prompts"]
    assert sharded.meta["domains"] == single.meta["domains"]
    for l, s in single.layers.items():
        r = sharded.layers[l]
        for name in ("load", "first_load", "coact", "transitions", "first_transitions", "vocab_keys", "vocab_counts"):
            assert np.array_equal(getattr(r, name), getattr(s, name)), name
        assert (r.pairs, r.reuse_first, r.reuse_any) == (s.pairs, s.reuse_first, s.reuse_any)
        assert np.allclose(r.weight_sum, s.weight_sum, rtol=1e-6)
    assert (tmp_path / "out" / "profile.json").is_file()
