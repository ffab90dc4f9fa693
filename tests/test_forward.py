"""Our reference forward against transformers' own implementation of each architecture: tiny
random checkpoints written by `save_pretrained`, several seeds and option combinations, biases set
non-zero, the same tokens in float32. Logits within 1e-4, identical expert choices for every token
and layer, gate weights within 1e-5."""

from __future__ import annotations

import pytest
import torch

from fakes import (DEVICE, FORWARD_FAMILY_CONFIGS, assert_matches_transformers, build_transformers_model, randomize_biases,
                   transformers_routes)
from moetool.forward import run_forward
from moetool.source import resolve

CASES = [(name, seed) for name, _ in FORWARD_FAMILY_CONFIGS for seed in (0, 1)]
CONFIGS = dict(FORWARD_FAMILY_CONFIGS)


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_forward_matches_transformers(name, seed, tmp_path):
    model = build_transformers_model(CONFIGS[name], seed=seed).eval()
    randomize_biases(model, seed)
    model.save_pretrained(tmp_path)
    T = 40
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, T), generator=torch.Generator().manual_seed(seed))
    ref_logits, ref_routes = transformers_routes(model, ids)

    out = run_forward(resolve(str(tmp_path)), ids[0].tolist(), dtype="float32", device=DEVICE)

    assert_matches_transformers(out, ref_logits, ref_routes)


def test_selection_order_is_best_first(tmp_path):
    model = build_transformers_model(CONFIGS["deepseek_v3"], seed=3).eval()
    randomize_biases(model, 3)
    model.save_pretrained(tmp_path)
    out = run_forward(resolve(str(tmp_path)), list(range(20)), device=DEVICE)
    for r in out.routes:
        chosen = torch.gather(r.scores, 1, r.experts)  # selection scores of the chosen experts
        assert torch.all(chosen[:, :-1] >= chosen[:, 1:])
