"""trace of Qwen3-Omni whole (qwen3_omni_moe: Qwen3OmniMoeForConditionalGeneration, thinker + talker +
code2wav) on text-only input, against transformers 5.23: the whole model has no forward of its own (only
`generate`, which runs the thinker and then the talker for speech); text goes through its thinker, so the
reference is `model.thinker(input_ids)` on the same weights. moetool runs the thinker's language model
(forward/config.py MULTIMODAL_FORWARD / NESTED_TEXT, names under thinker.*); the towers, the talker and
code2wav are not run.

Tiny random save_pretrained checkpoints (the census' shrunk Qwen3-Omni with test_trace_multimodal's
thinker text model: attention biases, a dense layer, no top-k renormalisation, three experts a token,
interleaved MRoPE sections), two seeds; biases and norm weights randomised (test_trace_multimodal's
_randomize); float32 logits within 1e-4, the same expert set for every token in every MoE layer, gate
weights within 1e-5, routing varying by token in every MoE layer (fakes.assert_matches_transformers).
Also: transformers' in-memory names, greedy generation against `model.thinker.generate`, the count of the
same checkpoint, the CLI note and `moetool profile`.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

import moetool
from census_reference import _merge, shrunk_config
from fakes import save_both_layouts, DEVICE, assert_matches_transformers
from moetool.forward import run_forward
from moetool.source import resolve
from test_forward_families import reference_routes
from test_trace_multimodal import _OMNI_TEXT, _build, _randomize

T = 40


def omni_config(**text) -> dict:
    cfg = shrunk_config("qwen3_omni_moe")
    th = cfg["thinker_config"]
    th["text_config"] = _merge(th["text_config"], copy.deepcopy({**_OMNI_TEXT, **text}))
    th["initializer_range"] = 0.1  # the thinker's modules are initialised from the thinker config
    # Qwen3OmniMoeThinkerConfig does not define vision_start_token_id, which the thinker's generate reads (its
    # get_rope_index; AttributeError in transformers 5.23): the talker config's default, no vision token here
    th["vision_start_token_id"] = 151652
    return {**cfg, "initializer_range": 0.1}


CONFIGS = {
    "qwen3_omni_moe": omni_config,
    # top-k renormalised, two experts a token, every layer MoE, no attention bias, a tied head
    "qwen3_omni_moe-norm": lambda: _merge(omni_config(norm_topk_prob=True, num_experts_per_tok=2, mlp_only_layers=[],
                                                      attention_bias=False),
                                          dict(thinker_config=dict(tie_word_embeddings=True))),
}
SEEDS = (0, 1)
CASES = [(n, s) for n in CONFIGS for s in SEEDS]


@pytest.fixture(scope="session")
def omni_checkpoint(tmp_path_factory):
    """omni_checkpoint(name, seed) -> (published dir, runtime dir, ids, logits, routes, count, model)."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            model = _build(CONFIGS[name](), seed)
            _randomize(model, seed)
            d, runtime = save_both_layouts(model, tmp_path_factory, f"{name}-{seed}")
            ids = torch.randint(0, model.config.thinker_config.text_config.vocab_size, (1, T),
                                generator=torch.Generator().manual_seed(seed))
            logits, routes = reference_routes(model.thinker, ids)  # text goes through the thinker
            cache[name, seed] = (d, runtime, ids[0].tolist(), logits, routes,
                                 sum(p.numel() for p in model.parameters()), model)
        return cache[name, seed]

    return get


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, omni_checkpoint):
    d, _, ids, logits, routes, _, _ = omni_checkpoint(name, seed)
    out = run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE, streaming=True)
    assert_matches_transformers(out, logits, routes, nonzero=True, varied="every")


def test_trace_of_runtime_layout(omni_checkpoint):
    """The same weights under transformers' in-memory names (thinker.model.language_model.*)."""
    _, runtime, ids, logits, routes, _, _ = omni_checkpoint("qwen3_omni_moe", 0)
    out = run_forward(resolve(str(runtime)), ids, dtype="float32", device=DEVICE)
    assert_matches_transformers(out, logits, routes, nonzero=True, varied="every")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_count_of_the_traced_checkpoint(name, omni_checkpoint):
    d, _, _, _, _, tf_count, _ = omni_checkpoint(name, 0)
    assert moetool.count(str(d)).total_params == moetool.count(str(d), use_headers=False).total_params == tf_count


def test_greedy_generation_equals_the_thinkers(omni_checkpoint):
    from moetool.forward.cache import generate

    d, _, ids, _, _, _, model = omni_checkpoint("qwen3_omni_moe", 1)
    prompt = ids[:14]
    thinker = model.thinker
    thinker.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = thinker.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, use_cache=True,
                               attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
    ours = generate(resolve(str(d)), prompt, 6, device=DEVICE)
    assert ours.cached and ours.ids == ref[0].tolist()


def test_trace_cli_says_what_is_not_run(omni_checkpoint):
    import json
    import subprocess
    import sys

    d, _, ids, _, routes, _, _ = omni_checkpoint("qwen3_omni_moe", 0)
    args = [sys.executable, "-m", "moetool", "trace", "--model", str(d), "--tokens", ",".join(map(str, ids[:8]))]
    r = subprocess.run(args + ["--format", "json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [layer["layer"] for layer in out["layers"]] == sorted(routes)
    assert "text-only input: the audio and vision towers are not run; the trace is of the language model" in out["notes"]


def test_profile_runs(omni_checkpoint, tmp_path):
    """moetool profile (the same Decoder, prompts in blocks) routes each prompt as its own trace does."""
    import pyarrow.parquet as pq

    from conftest import write_tokenizer
    from moetool.profile.engine import profile
    from moetool.tracing import trace

    d = tmp_path / "omni"
    shutil.copytree(omni_checkpoint("qwen3_omni_moe", 1)[0], d)
    write_tokenizer(d)
    prompts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b): return a + b"]
    profile(prompts, model=str(d), block_tokens=200, device=DEVICE, per_token=str(tmp_path / "t.parquet"))
    rows = pq.read_table(tmp_path / "t.parquet").to_pandas()
    for i, text in enumerate(prompts):
        t = trace(text, model=str(d), device=DEVICE)
        assert t.layers
        for l in t.layers:
            got = rows[(rows.prompt_index == i) & (rows.layer == l.layer)].sort_values(["token_index", "slot"])
            assert got.expert.to_numpy().reshape(len(t.tokens), -1).tolist() == l.experts
