"""trace of the multimodal families of arch/mm_gap.py, text-only input, against transformers 5.23's
class for the whole model (the one the census picks: Nemotron3_5TranscribeForConditionalGeneration,
...) on tiny random `save_pretrained` checkpoints, two seeds each, biases, correction biases and norm
weights randomised (tests/test_trace_multimodal.py's _build / _randomize), initializer_range 0.1.

Logits within 1e-4 (float32); in every MoE layer the same expert set for every token and gate weights
within 1e-5, read from the `top_k_index` / `top_k_weights` transformers' experts modules receive;
routing varies by token in every MoE layer. The towers (audio, vision) are not run: moetool runs the
language model as its text family (forward/config.py MULTIMODAL_FORWARD), as transformers does for
input_ids without audio / image features.

- nemo_speechlm: Nemotron-H (Mamba-2, attention, MoE with a shared expert), published as llm.model.*,
  llm.lm_head and Mamba-2's A_log / D / dt_bias under mixer._fp32_params.; transformers' in-memory
  names (model.language_model.embeddings / norm_f) too.
- unlimited_ocr: GQA attention with DeepSeek-V2's softmax router (greedy and group-limited greedy,
  weights times routed_scaling_factor), shared experts, dense layers per mlp_layer_types; attention and
  MLP biases. Its "reference sliding window" keeps every prefill token, so a prompt attends in full.
- ernie4_5_vl_moe: ERNIE-4.5-MoE's text model with text and vision experts: text tokens go to the text
  experts only (transformers runs text_moe when no token is an image / video token). Published as one
  expert list of 2E (text first), routers [D, E] (gate.weight, gate.weight_1) and the correction biases
  as one [2, E]; transformers' in-memory names (text_moe / vision_moe, fused experts) too. Its 3-D RoPE
  gives the three sections one position for text, which is ERNIE's interleaved RoPE (two section layouts).
"""

from __future__ import annotations

import shutil

import pytest
import torch

import moetool
from fakes import save_both_layouts, assert_profile_routes_like_traces, DEVICE, assert_matches_transformers
from moetool.forward import run_forward
from moetool.source import resolve
from test_forward_families import reference_routes
from test_trace_multimodal import _build, _multimodal, _randomize

T = 40
_NEMO_TEXT = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128,
                  layers_block_type=["mamba", "moe", "attention", "moe"], mamba_num_heads=4, mamba_head_dim=16,
                  n_groups=2, ssm_state_size=8, intermediate_size=48, moe_intermediate_size=24,
                  moe_shared_expert_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                  topk_group=1, routed_scaling_factor=2.0, initializer_range=0.1)
_OCR_TEXT = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_hidden_layers=3,
                 intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2,
                 num_experts_per_tok=2, mlp_layer_types=["dense", "sparse", "sparse"], routed_scaling_factor=1.7,
                 attention_bias=True, mlp_bias=True, max_position_embeddings=256, initializer_range=0.1)
_ERNIE_TEXT = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_hidden_layers=3,
                   intermediate_size=48, moe_intermediate_size=[16, 8], moe_num_experts=8, moe_k=2,
                   moe_num_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"], use_bias=True,
                   rope_parameters=dict(rope_type="default", rope_theta=500000.0, mrope_section=[1, 1, 2]),
                   max_position_embeddings=256, initializer_range=0.2)

CONFIGS = {
    "nemo_speechlm": lambda: _multimodal("nemo_speechlm", _NEMO_TEXT),
    # experts in a latent space, biases, no top-k renormalisation, three experts a token
    "nemo_speechlm-latent": lambda: _multimodal("nemo_speechlm", dict(
        _NEMO_TEXT, layers_block_type=["moe", "mamba", "moe", "attention"], n_routed_experts=8, num_experts_per_tok=3,
        moe_latent_size=16, mlp_bias=True, use_bias=True, norm_topk_prob=False, time_step_min=0.05, n_groups=1, n_group=1)),
    "unlimited_ocr": lambda: _multimodal("unlimited_ocr", _OCR_TEXT),
    # group-limited greedy (2 of 4 groups), three experts a token, every layer sparse, no biases
    "unlimited_ocr-group": lambda: _multimodal("unlimited_ocr", dict(
        _OCR_TEXT, topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3,
        mlp_layer_types=["sparse", "sparse", "sparse"], attention_bias=False, mlp_bias=False, n_shared_experts=1,
        rope_parameters=dict(rope_type="default", rope_theta=5000.0))),
    "ernie4_5_vl_moe": lambda: _multimodal("ernie4_5_vl_moe", _ERNIE_TEXT),
    # wider heads (8 RoPE frequencies in sections 2 / 2 / 4), three of 8 experts, no biases, no shared experts,
    # vision experts as wide as the text ones, an untied head
    "ernie4_5_vl_moe-wide": lambda: _multimodal("ernie4_5_vl_moe", dict(
        _ERNIE_TEXT, num_attention_heads=2, num_key_value_heads=1, moe_k=3, moe_num_shared_experts=0, use_bias=False,
        moe_intermediate_size=[16, 16], mlp_layer_types=["sparse", "dense", "sparse"],
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 2, 4])),
        tie_word_embeddings=False),
}
SEEDS = (0, 1)
CASES = [(n, s) for n in CONFIGS for s in SEEDS]


@pytest.fixture(scope="session")
def gap_checkpoint(tmp_path_factory):
    """gap_checkpoint(name, seed) -> (published dir, runtime dir, ids, logits, routes, count)."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            model = _build(CONFIGS[name](), seed)
            _randomize(model, seed)
            d, runtime = save_both_layouts(model, tmp_path_factory, f"{name}-{seed}")
            ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, T),
                                generator=torch.Generator().manual_seed(seed))
            logits, routes = reference_routes(model, ids)
            cache[name, seed] = (d, runtime, ids[0].tolist(), logits, routes, sum(p.numel() for p in model.parameters()))
        return cache[name, seed]

    return get


def _assert_same(out, logits, routes) -> None:
    assert_matches_transformers(out, logits, routes, nonzero=True, varied="every")


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, gap_checkpoint):
    d, _, ids, logits, routes, _ = gap_checkpoint(name, seed)
    _assert_same(run_forward(resolve(str(d)), ids, dtype="float32", device=DEVICE, streaming=True), logits, routes)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trace_of_runtime_layout(name, gap_checkpoint):
    """The same weights under transformers' in-memory names."""
    _, runtime, ids, logits, routes, _ = gap_checkpoint(name, 0)
    _assert_same(run_forward(resolve(str(runtime)), ids, dtype="float32", device=DEVICE), logits, routes)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_count_still_matches_transformers(name, gap_checkpoint):
    d, _, _, _, _, tf_count = gap_checkpoint(name, 0)
    assert moetool.count(str(d)).total_params == moetool.count(str(d), use_headers=False).total_params == tf_count


@pytest.mark.parametrize("name,towers", [("nemo_speechlm", "audio tower is"), ("unlimited_ocr", "vision tower is"),
                                         ("ernie4_5_vl_moe", "vision tower is")])
def test_trace_cli_says_the_towers_are_not_run(name, towers, gap_checkpoint):
    import json
    import subprocess
    import sys

    d, _, ids, _, routes, _ = gap_checkpoint(name, 0)
    args = [sys.executable, "-m", "moetool", "trace", "--model", str(d), "--tokens", ",".join(map(str, ids[:8]))]
    r = subprocess.run(args + ["--format", "json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [layer["layer"] for layer in out["layers"]] == sorted(routes)
    assert f"text-only input: the {towers} not run; the trace is of the language model" in out["notes"]


@pytest.mark.parametrize("name", ["nemo_speechlm", "unlimited_ocr", "ernie4_5_vl_moe"])
def test_profile_runs(name, gap_checkpoint, tmp_path):
    """moetool profile (the same Decoder, prompts in blocks) routes each prompt as its own trace does."""

    from conftest import write_tokenizer

    d = tmp_path / name
    shutil.copytree(gap_checkpoint(name, 1)[0], d)
    write_tokenizer(d)
    prompts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b): return a + b"]
    assert_profile_routes_like_traces(d, tmp_path, prompts)


def test_unlimited_ocr_generation_within_its_reference_window(gap_checkpoint, tmp_path):
    """Unlimited-OCR keeps every prompt token and slides a window of sliding_window over the generated
    ones: within the window moetool's generation equals transformers' generate (its R-SWA cache);
    past it moetool refuses in one line (exit 2), as it does not model the eviction."""
    import json
    import subprocess
    import sys

    import transformers

    from moetool.forward.cache import generate

    config = CONFIGS["unlimited_ocr"]()
    config["text_config"]["sliding_window"] = 4
    model = _build(config, 0)
    _randomize(model, 0)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["sliding_window"] == 4
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True,
                             attention_mask=torch.ones_like(ids), pad_token_id=0)
    ours = generate(resolve(str(tmp_path)), ids[0].tolist(), 4, device=DEVICE)
    assert ours.cached and ours.ids == ref[0].tolist()
    r = subprocess.run([sys.executable, "-m", "moetool", "trace", "--model", str(tmp_path), "--tokens",
                        ",".join(map(str, ids[0].tolist())), "--generate", "5"], capture_output=True, text=True)
    assert r.returncode == 2 and "at most 4 new tokens" in r.stderr and "Traceback" not in r.stderr
    assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path).text_config.sliding_window, int)
