"""`trace --generate` with a KV cache (forward/cache.py) against the full-recompute path and against
transformers' own `generate` (greedy, with its cache).

Every family of moetool.forward.FORWARD_FAMILIES that the forward tests build a tiny checkpoint for
(tests/fakes.py FORWARD_FAMILY_CONFIGS, test_forward_families.FAMILIES, test_hybrid_trace.HYBRID_CONFIGS;
biases, correction biases and mixer parameters randomised as there): the cached generation of a few
tokens gives the same token ids as the recompute path, the same expert set for every token of every
MoE layer, gate weights within 1e-5 and logits within 1e-4. The prompt is long enough that sliding
windows (4), Llama 4's attention chunks (16) and DeepSeek-V3.2's indexer top-k (8) all cut in.
For mixtral, qwen3_moe, deepseek_v3, qwen3_next, jamba and mistral_large4 the generated ids also equal transformers'
`model.generate(..., do_sample=False, use_cache=True)` on the same save_pretrained checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from fakes import DEVICE, FORWARD_FAMILY_CONFIGS, build_transformers_model, randomize_biases
from moetool.forward import FORWARD_FAMILIES
from moetool.arch import spec_from_config
from moetool.forward.cache import generate, no_cache_reason
from moetool.forward.config import forward_config
from moetool.source import resolve
from test_forward_families import FAMILIES
from test_forward_families import _build as build_family
from test_hybrid_trace import HYBRID_CONFIGS, randomize_mixer_params
from test_hybrid_trace import _build as build_hybrid

PROMPT, NEW = 14, 6  # 20 tokens in all: past the windows of 4 and Llama 4's chunk of 16

import test_trace_multimodal as multimodal  # noqa: E402
import test_trace_text_families as text_families  # noqa: E402
import test_trace_gap_families as gap_families  # noqa: E402
import test_trace_step3p7 as step3p7  # noqa: E402
import test_trace_zaya as zaya  # noqa: E402
import test_trace_hyper as hyper_families  # noqa: E402
import test_trace_inkling as inkling  # noqa: E402
import test_trace_dsa_variants as dsa_variants  # noqa: E402
import test_trace_bailing as bailing  # noqa: E402
import test_trace_qwen4_exp as qwen4_exp  # noqa: E402

# name -> (config, transformers builder, extra randomisation as the family's own trace test does it)
CONFIGS = {**{n: (c, build_transformers_model, None) for n, c in FORWARD_FAMILY_CONFIGS},
           **{n: (c, build_family, None) for n, c in FAMILIES.items()},
           **{n: (c, build_hybrid, randomize_mixer_params) for n, c in HYBRID_CONFIGS.items()},
           **{n: (c, text_families._build, text_families.randomize) for n, c in text_families.FAMILIES.items()
              if c["model_type"] != "openai_privacy_filter"},  # a token classifier: --generate is refused
           **{n: (c() if callable(c) else c, multimodal._build, multimodal._randomize)
              for n, c in multimodal.CONFIGS.items()},
           **{n: (c, text_families._build, text_families.randomize) for n, c in gap_families.FAMILIES.items()},
           **{n: (step3p7.full_config(n), step3p7._build, step3p7.randomize) for n in step3p7.CONFIGS},
           **{n: (c, zaya._build, zaya.randomize) for n, c in zaya.CONFIGS.items()},
           **{n: (c, text_families._build, hyper_families.randomize) for n, c in hyper_families.FAMILIES.items()},
           **{n: (inkling.config_of(n), multimodal._build, inkling.randomize) for n in inkling.FAMILIES},
           **{n: (c(), dsa_variants._build, dsa_variants.randomize) for n, c in dsa_variants.FAMILIES.items()},
           **{n: (c, bailing._build, bailing._randomize) for n, c in bailing.FAMILIES.items()},
           **{n: (c, qwen4_exp._build, qwen4_exp._randomize) for n, c in qwen4_exp.FAMILIES.items()}}
import test_trace_gemma4 as gemma4  # noqa: E402

CONFIGS.update({n: (c() if callable(c) else c, gemma4._build, gemma4._randomize) for n, c in gemma4.CONFIGS.items()})
import test_trace_mm_gap as mm_gap  # noqa: E402

CONFIGS.update({n: (c(), multimodal._build, multimodal._randomize) for n, c in mm_gap.CONFIGS.items()})
import test_trace_muse_spark as muse_spark  # noqa: E402

CONFIGS.update({n: (c(), multimodal._build, multimodal._randomize) for n, c in muse_spark.CONFIGS.items()})
import test_trace_ocr2 as ocr2  # noqa: E402

CONFIGS.update({n: (c(), multimodal._build, multimodal._randomize) for n, c in ocr2.CONFIGS.items()})
import test_trace_glm5_next as glm5_next  # noqa: E402

CONFIGS.update({n: (c(), multimodal._build, glm5_next.randomize) for n, c in glm5_next.CONFIGS.items()})
import test_trace_omni as omni  # noqa: E402

CONFIGS.update({n: (c(), multimodal._build, multimodal._randomize) for n, c in omni.CONFIGS.items()})
# Families whose generation is not the decoder's: encoder-decoder models decode in forward/encdec.py, and a
# token classifier (the OpenAI privacy filter) has no next token. DiffusionGemma generates by block diffusion
# (a sampler over denoising steps and canvases, not token by token): trace refuses --generate for it
# (tests/test_trace_diffusion_gemma.py).
NOT_GENERATED = {"switch_transformers", "nllb_moe", "openai_privacy_filter", "diffusion_gemma"}
TRANSFORMERS_GENERATE = ["mixtral", "qwen3_moe", "deepseek_v3", "qwen3_next", "jamba", "step3p7", "zaya",
                         "gemma4_text", "gemma4",
                         "inkling_text", "inkling2_text", "mistral_large4", "nemo_speechlm", "unlimited_ocr", "ernie4_5_vl_moe",
                         "muse_spark",
                         # hyper-connection families (the other DeepSeek-V4 config is left out: at step 5 its
                         # indexer ties, which transformers' cached generate ranks at the current length and
                         # its own full forward at the final one; ours ranks as the full forward, forward/cache.py)
                         "hy_v4", "deepseek_v4-yarn", "deepseek_ocr2",
                         # glm5_next (the other config) ties pools likewise at step 2: transformers' own forward of
                         # 16 and of 20 tokens differ at token 15 there (tests/test_trace_glm5_next.py)
                         "glm5_next-plain"]



def _family(config: dict) -> set[str]:
    import transformers

    config = transformers.AutoConfig.for_model(**config).to_dict()  # the defaults a saved config.json has
    spec = spec_from_config(config, None)
    return {spec.family, forward_config(spec, config).family}  # a multimodal family runs as its text family


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread (two spin-wait on a busy 2-core machine: 10-100x the CPU time)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def generate_checkpoint(tmp_path_factory):
    """generate_checkpoint(name) -> (directory, prompt ids, transformers model), built once."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            config, build, randomize = CONFIGS[name]
            model = build(config, 0).eval()
            randomize_biases(model, 0)
            if randomize is not None:
                randomize(model, 0)
            d = tmp_path_factory.mktemp(f"gen-{name}")
            model.save_pretrained(d)
            vocab = model.config.get_text_config().vocab_size
            ids = torch.randint(0, vocab, (PROMPT,), generator=torch.Generator().manual_seed(7)).tolist()
            cache[name] = (d, ids, model)
        return cache[name]

    return get


def test_every_forward_family_is_covered():
    covered = set().union(*(_family(c) for c, _, _ in CONFIGS.values()))
    assert set(FORWARD_FAMILIES) - covered - NOT_GENERATED == set()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_generation_equals_recompute(name, generate_checkpoint):
    d, ids, _ = generate_checkpoint(name)
    ckpt = resolve(str(d))
    cached = generate(ckpt, ids, NEW, device=DEVICE)
    full = generate(ckpt, ids, NEW, device=DEVICE, use_cache=False)
    fc = forward_config(spec_from_config(ckpt.config, ckpt.config_path), ckpt.config)
    reason = no_cache_reason(fc, PROMPT, PROMPT + NEW)  # attention the cache does not hold: recompute, said so
    assert cached.cached == (reason is None) and not full.cached
    assert ("KV cache" in cached.note if reason is None else reason in cached.note) and "recomputing" in full.note
    assert cached.ids == full.ids and len(cached.ids) == PROMPT + NEW
    a, b = cached.result, full.result
    diff = (a.logits - b.logits).abs().max().item()
    assert a.logits.shape == b.logits.shape and diff < 1e-4, f"logits differ by {diff}"
    assert [r.layer for r in a.routes] == [r.layer for r in b.routes] and a.routes
    for ra, rb in zip(a.routes, b.routes):
        assert ra.experts.shape == rb.experts.shape == (PROMPT + NEW, ra.experts.shape[1])
        for t in range(PROMPT + NEW):
            ours = dict(zip(ra.experts[t].tolist(), ra.weights[t].tolist()))
            theirs = dict(zip(rb.experts[t].tolist(), rb.weights[t].tolist()))
            assert set(ours) == set(theirs), f"layer {ra.layer} token {t}: {sorted(ours)} vs {sorted(theirs)}"
            for e, w in ours.items():
                assert abs(w - theirs[e]) < 1e-5, (ra.layer, t, e, w, theirs[e])


@pytest.mark.parametrize("name", TRANSFORMERS_GENERATE)
def test_generated_ids_equal_transformers_generate(name, generate_checkpoint):
    d, ids, model = generate_checkpoint(name)
    model.generation_config.eos_token_id = None  # never stop early: NEW tokens on both sides
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, use_cache=True,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0)
    ours = generate(resolve(str(d)), ids, NEW, device=DEVICE)
    assert ours.cached
    assert ours.ids == ref[0].tolist()


def test_longrope_past_its_original_context_recomputes(generate_checkpoint):
    """Phi-MoE's LongRoPE switches factors past original_max_position_embeddings (64): every
    earlier key changes, so generation across that length recomputes and says so."""
    d, _, _ = generate_checkpoint("phimoe-longrope")
    ids = list(range(1, 62))
    gen = generate(resolve(str(d)), ids, 4, device=DEVICE)
    assert not gen.cached and "longrope RoPE frequencies change between 61 and 65 tokens" in gen.note
    short = generate(resolve(str(d)), ids[:20], 4, device=DEVICE)
    assert short.cached


def test_trace_reports_which_path_ran(generate_checkpoint):
    import moetool

    d, ids, _ = generate_checkpoint("qwen3_moe")
    cached = moetool.trace(tokens=ids, model=str(d), generate=3, device=DEVICE)
    full = moetool.trace(tokens=ids, model=str(d), generate=3, device=DEVICE, kv_cache=False)
    assert cached.notes[0].startswith("generated 3 tokens with a KV cache")
    assert full.notes[0].startswith("generated 3 tokens by recomputing")
    assert cached.to_dict()["notes"] == cached.notes
    assert [t.id for t in cached.tokens] == [t.id for t in full.tokens]
    assert [l.experts for l in cached.layers] == [l.experts for l in full.layers]
    assert "notes" not in moetool.trace(tokens=ids, model=str(d), device=DEVICE).to_dict()
