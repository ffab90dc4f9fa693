"""trace of DiffusionGemma (diffusion_gemma: DiffusionGemmaForBlockDiffusion, forward/diffusion_gemma.py)
against transformers 5.23: tiny random checkpoints written by `save_pretrained`, two seeds each.

transformers' reference is the model's own forward with `input_ids` (the prompt: the encoder fills
the KV cache) and `decoder_input_ids` (the canvas: one denoising step, no self-conditioning logits),
which is the first decoder call of its `generate`. Logits of the canvas within 1e-4 (float32); in
every MoE layer of BOTH stacks (encoder layers 0..L-1 over the prompt, decoder layers L..2L-1 over the
canvas) the same expert set for every token and gate weights within 1e-5, read from the
`top_k_index` / `top_k_weights` that transformers' experts modules receive.

Randomised beyond the weights: every bias and norm weight, the routers' `scale` / `per_expert_scale`
and every layer's `layer_scalar` (the encoder's and the decoder's differ: they are not tied), with
initializer_range 0.2 so that routing varies by token. The configs reach: tied stacks with attention
biases (the decoder's own biases), untied stacks (two text models and an LM head), sliding windows
shorter than the prompt (the decoder's sliding layers see only the last window - 1 prompt keys),
full layers of another head size with V = K, proportional RoPE with and without a factor, the default
soft cap (30, absent from config.json) and an explicit one, the default seeded canvas of
`canvas_length` tokens and a given canvas of another length.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from census_reference import _merge, shrunk_config
from fakes import DEVICE, assert_matches_transformers
from moetool.forward.diffusion_gemma import default_canvas, run
from moetool.source import resolve
from moetool.tracing import trace
from test_bad_input import run_cli
from test_trace_gemma4 import _randomize

P = 12  # prompt tokens: longer than the sliding windows below
CONFIGS = {
    # tied (the saved checkpoint keeps the decoder's names), attention biases, sliding / sliding / full
    # (the census' shrunk layers: a full layer of head size 16 without v_proj), window 4, the default
    # soft cap and the default canvas (canvas_length 6, seeded)
    "tied-bias": dict(text_config=dict(attention_bias=True, sliding_window=4, initializer_range=0.2),
                      canvas_length=6, initializer_range=0.2),
    # untied, no biases, full / sliding / sliding / full, window 3, top-3 of 6, proportional RoPE with a
    # factor, an explicit soft cap, use_bidirectional_attention "vision" (causal on text); a given canvas
    # (the image token in the prompt is embedded as it is: no pixel values, no placeholder replacement)
    "untied": dict(tie_word_embeddings=False, canvas_length=16, initializer_range=0.2, image_token_id=3,
                   text_config=dict(num_hidden_layers=4, sliding_window=3, num_experts=6, top_k_experts=3,
                                    layer_types=["full_attention", "sliding_attention", "sliding_attention",
                                                 "full_attention"],
                                    per_layer_config={"0": {"head_dim": 16, "num_key_value_heads": 1},
                                                      "3": {"head_dim": 16, "num_key_value_heads": 1}},
                                    final_logit_softcapping=5.0, use_bidirectional_attention="vision",
                                    initializer_range=0.2,
                                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                                                     "full_attention": {"rope_type": "proportional", "factor": 2.0,
                                                                        "partial_rotary_factor": 0.5,
                                                                        "rope_theta": 1000.0}})),
}
CANVAS = {"untied": [5, 77, 3, 3, 120, 64, 9]}  # given canvases (else the default one)
SEEDS = (0, 1)
CASES = [(n, s) for n in CONFIGS for s in SEEDS]


def _config(name: str) -> dict:
    cfg = _merge(shrunk_config("diffusion_gemma"), copy.deepcopy(CONFIGS[name]))
    if "per_layer_config" in CONFIGS[name].get("text_config", {}):  # replaced, not merged into the census' one
        cfg["text_config"]["per_layer_config"] = copy.deepcopy(CONFIGS[name]["text_config"]["per_layer_config"])
    return cfg


def _build(config: dict, seed: int):
    import transformers

    torch.manual_seed(seed)
    return transformers.DiffusionGemmaForBlockDiffusion(transformers.AutoConfig.for_model(**config)).eval()


def reference(model, prompt: torch.Tensor, canvas: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """transformers' canvas logits [C, V] and {layer: (experts, weights)} as its experts modules receive
    them: encoder layer i as i, decoder layer i as L + i."""
    L = model.config.text_config.num_hidden_layers
    captured, hooks = {}, []
    for name, module in model.named_modules():
        if name.endswith(".experts") and ".layers." in name:
            layer = int(name.split(".layers.")[1].split(".")[0]) + (L if name.startswith("model.decoder.") else 0)

            def hook(mod, args, kwargs, layer=layer):
                captured[layer] = (args[1].detach().clone(), args[2].detach().float().clone())

            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        logits = model(input_ids=prompt, decoder_input_ids=canvas).logits[0].float()
    for h in hooks:
        h.remove()
    assert len(captured) == 2 * L
    return logits, captured


@pytest.fixture(scope="session")
def dgemma_case(tmp_path_factory):
    """dgemma_case(name, seed) -> (directory, prompt ids, canvas ids, reference logits, reference routes)."""
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            config = _config(name)
            model = _build(config, seed)
            _randomize(model, seed)
            d = tmp_path_factory.mktemp(f"dgemma-{name}-{seed}")
            model.save_pretrained(d)
            vocab = config["text_config"]["vocab_size"]
            prompt = torch.randint(0, vocab, (1, P), generator=torch.Generator().manual_seed(seed))
            if config["image_token_id"] < vocab:
                prompt[0, 2] = config["image_token_id"]
            canvas = CANVAS.get(name) or default_canvas(json.loads((d / "config.json").read_text()), vocab)
            logits, routes = reference(model, prompt, torch.tensor([canvas]))
            cache[name, seed] = (d, prompt[0].tolist(), canvas, logits, routes)
        return cache[name, seed]

    return get


def test_checkpoints_store_what_the_configs_say(dgemma_case):
    """The tied checkpoint keeps one name per tied tensor (the decoder's) and both stacks' biases and
    layer scalars; the untied one both stacks whole and an LM head."""
    from safetensors import safe_open

    names = lambda d: set(safe_open(str(d / "model.safetensors"), "pt").keys())
    tied, untied = names(dgemma_case("tied-bias", 0)[0]), names(dgemma_case("untied", 0)[0])
    assert "model.encoder.language_model.layers.0.router.proj.weight" not in tied
    assert {"model.encoder.language_model.layers.0.self_attn.q_proj.bias", "model.decoder.layers.0.self_attn.q_proj.bias",
            "model.encoder.language_model.layers.0.layer_scalar"} <= tied and "lm_head.weight" not in tied
    assert {"model.encoder.language_model.layers.0.router.proj.weight", "model.decoder.layers.0.router.proj.weight",
            "model.encoder.language_model.embed_tokens.weight", "lm_head.weight"} <= untied


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_trace_matches_transformers(name, seed, dgemma_case):
    d, prompt, canvas, ref_logits, ref_routes = dgemma_case(name, seed)
    out = run(resolve(str(d)), prompt, canvas, dtype="float32", device=DEVICE)
    assert out.logits.shape == (len(canvas), ref_logits.shape[-1])
    assert_matches_transformers(out, ref_logits, ref_routes, nonzero=True, varied="every")
    L = len(ref_routes) // 2
    assert [r.stack for r in out.routes] == ["encoder"] * L + ["decoder"] * L
    assert [r.experts.shape[0] for r in out.routes] == [len(prompt)] * L + [len(canvas)] * L


def test_trace_api_default_canvas(dgemma_case):
    """trace() without a canvas runs the seeded canvas_length-token canvas (the reference ran the same)
    and reports both stacks; the canvas is the decoder's tokens."""
    d, prompt, canvas, ref_logits, ref_routes = dgemma_case("tied-bias", 1)
    report = trace(model=str(d), tokens=prompt, device=DEVICE)
    assert [t.id for t in report.decoder_tokens] == canvas and len(canvas) == 6
    assert (report.logits - ref_logits).abs().max() < 1e-4
    for l in report.layers:
        ref = ref_routes[l.layer][0].reshape(len(l.experts), -1).tolist()
        assert [sorted(e) for e in l.experts] == [sorted(e) for e in ref]
        assert l.stack_layer == l.layer - (3 if l.stack == "decoder" else 0)
    assert any("denoising step" in n for n in report.notes)


def test_cli_trace_json(dgemma_case):
    d, prompt, canvas, ref_logits, ref_routes = dgemma_case("untied", 0)
    out = run_cli("trace", "--model", str(d), "--tokens", ",".join(map(str, prompt)),
                  "--decoder-tokens", ",".join(map(str, canvas)), "--json", "--device", DEVICE)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["command"] == "trace" and data["model_type"] == "diffusion_gemma"
    assert [t["id"] for t in data["tokens"]] == prompt and [t["id"] for t in data["decoder_tokens"]] == canvas
    assert [(l["layer"], l["stack"], l["stack_layer"]) for l in data["layers"]] == \
        [(i, "encoder", i) for i in range(4)] + [(4 + i, "decoder", i) for i in range(4)]
    for l in data["layers"]:
        ref_idx, ref_w = (x.reshape(len(l["experts"]), -1) for x in ref_routes[l["layer"]])
        assert [sorted(e) for e in l["experts"]] == [sorted(e) for e in ref_idx.tolist()]
        for t, (ours, theirs) in enumerate(zip(l["weights"], ref_w.tolist())):
            assert sorted(ours) == pytest.approx(sorted(theirs), abs=1e-5), (l["layer"], t)


def test_refusals(dgemma_case, tmp_path):
    """--generate (block diffusion is no next-token generation), use_bidirectional_attention "all"
    (transformers 5.23's own forward fails on it, eager and sdpa: TypeError, is_causal twice), a partial default
    RoPE and a canvas token outside the vocabulary: one line, exit 2."""
    d, prompt, *_ = dgemma_case("tied-bias", 0)
    out = run_cli("trace", "--model", str(d), "--tokens", "1,2,3", "--generate", "2")
    assert out.returncode == 2 and "block diffusion" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    bidir = tmp_path / "bidir"
    shutil.copytree(d, bidir)
    cfg = json.loads((bidir / "config.json").read_text())
    cfg["text_config"]["use_bidirectional_attention"] = "all"
    (bidir / "config.json").write_text(json.dumps(cfg))
    out = run_cli("trace", "--model", str(bidir), "--tokens", "1,2,3")
    assert out.returncode == 2 and "use_bidirectional_attention" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    # DiffusionGemma's default RoPE with a partial factor: shorter tables than the head, which transformers'
    # own forward cannot apply (RuntimeError there)
    cfg["text_config"]["use_bidirectional_attention"] = None
    cfg["text_config"]["rope_parameters"]["sliding_attention"] = {"rope_type": "default", "rope_theta": 50.0,
                                                                  "partial_rotary_factor": 0.5}
    (bidir / "config.json").write_text(json.dumps(cfg))
    out = run_cli("trace", "--model", str(bidir), "--tokens", "1,2,3")
    assert out.returncode == 2 and "partial_rotary_factor" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = run_cli("trace", "--model", str(d), "--tokens", "1,2,3", "--decoder-tokens", "5,999")
    assert out.returncode == 2 and "outside the vocabulary" in out.stderr


def test_profile_routes_the_encoder(dgemma_case, tmp_path):
    """`moetool profile` runs the encoder (the prompt's routing) over blocks of prompts: every prompt's
    tokens route as the encoder stack of its own trace; the CLI writes the profile."""
    import pyarrow.parquet as pq

    from conftest import write_tokenizer
    from moetool.profile.engine import profile

    d = tmp_path / "dg"
    shutil.copytree(dgemma_case("tied-bias", 0)[0], d)
    write_tokenizer(d)
    prompts = ["The quick brown fox jumps over the lazy dog. " * 2, "def add(a, b): return a + b", "import os, sys " * 3]
    profile(prompts, model=str(d), block_tokens=200, device=DEVICE, per_token=str(tmp_path / "t.parquet"))
    rows = pq.read_table(tmp_path / "t.parquet").to_pandas()
    assert sorted(set(rows.layer)) == [0, 1, 2]
    for i, text in enumerate(prompts):
        t = trace(text, model=str(d), device=DEVICE, decoder_tokens=[1, 2])
        assert len(t.tokens) > 4  # longer than the sliding window
        encoder = [l for l in t.layers if l.stack == "encoder"]
        assert len(encoder) == 3
        for l in encoder:
            got = rows[(rows.prompt_index == i) & (rows.layer == l.layer)].sort_values(["token_index", "slot"])
            assert got.expert.to_numpy().reshape(len(t.tokens), -1).tolist() == l.experts
    from moetool.tracing import load_tokenizer

    given = trace(prompts[1], model=str(d), device=DEVICE, decoder_text="def add")  # --decoder-text: the canvas
    assert [t.id for t in given.decoder_tokens] == load_tokenizer(resolve(str(d))).encode("def add",
                                                                                        add_special_tokens=False).ids
    (tmp_path / "corpus.txt").write_text("\n".join(prompts) + "\n")
    out = run_cli("profile", str(tmp_path / "corpus.txt"), "--model", str(d), "-o", str(tmp_path / "prof"))
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert summary["command"] == "profile" and [l["layer"] for l in summary["layers"]] == [0, 1, 2]


def test_cli_layers_of_both_stacks(dgemma_case):
    """--layers numbers the decoder's layers after the encoder's (L..2L-1); past them: one line, exit 2."""
    d, prompt, *_ = dgemma_case("untied", 1)
    out = run_cli("trace", "--model", str(d), "--tokens", ",".join(map(str, prompt)), "--layers", "1,5", "--json",
                  "--device", DEVICE)
    assert out.returncode == 0, out.stderr
    assert [(l["layer"], l["stack"], l["stack_layer"]) for l in json.loads(out.stdout)["layers"]] == \
        [(1, "encoder", 1), (5, "decoder", 1)]
    out = run_cli("trace", "--model", str(d), "--tokens", "1,2", "--layers", "8")
    assert out.returncode == 2 and "out of range" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_self_conditioning_block_equals_transformers(dgemma_case):
    """The self-conditioning block with a non-zero signal (later denoising steps; the first step's zeros
    make its weights irrelevant): moetool's self_conditioning equals DiffusionGemmaSelfConditioning."""
    from moetool.forward import DTYPES, checked_config, weight_store
    from moetool.forward.diffusion_gemma import _decoder_names, self_conditioning
    from moetool.forward.model import Decoder

    d = dgemma_case("tied-bias", 0)[0]
    model = _build(_config("tied-bias"), 0)
    _randomize(model, 0)
    ckpt = resolve(str(d))
    spec, fc = checked_config(ckpt, 1, "float32", "float32")
    dec = Decoder(spec, fc, weight_store(ckpt), dtype=DTYPES["float32"])
    dec.names = _decoder_names(dec.names)
    g = torch.Generator().manual_seed(3)
    x, soft = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g) * 4
    with torch.no_grad():
        ref = model.model.decoder.self_conditioning(x[None], soft[None])[0]
        ours = self_conditioning(dec, x, soft)
    assert (ours - self_conditioning(dec, x, torch.zeros_like(soft))).abs().max() > 0.1  # the signal matters
    assert (ours - ref).abs().max() < 1e-5
