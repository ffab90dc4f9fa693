"""Encoder-decoder MoE families (Switch Transformers, NLLB-MoE) and JetMoE's attention router:
our streamed forward against transformers 5.x on tiny random `save_pretrained` checkpoints (two
seeds; router / attention / FFN biases randomised where the family has them). Logits within 1e-4
in float32 (SwitchTransformersForConditionalGeneration / NllbMoeForConditionalGeneration with
input_ids and decoder_input_ids), the same expert set for every token of every MoE layer of both
stacks, read from transformers' router modules with hooks (dropped tokens included), gate weights
within 1e-5.

NLLB-MoE: transformers 5.23's NllbMoeExperts.forward one-hot encodes the router's 0/1 mask again,
so it runs experts 0 and 1 for every token whatever the router chose (`test_transformers_nllb_
experts_ignore_the_router` shows it). The router's decisions (NllbMoeTop2Router) are right; the
logits reference here runs the experts the router chose, as transformers 4.x and fairseq do
(`_router_dispatch`), with everything else transformers' own code.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import moetool
from fakes import DEVICE, randomize_biases
from moetool.forward.encdec import run_encdec
from moetool.source import resolve

SWITCH = dict(model_type="switch_transformers", vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=3,
              num_decoder_layers=4, num_heads=4, num_experts=4, num_sparse_encoder_layers=3,
              num_sparse_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=20,
              expert_capacity=64)
NLLB = dict(model_type="nllb-moe", vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=48,
            decoder_ffn_dim=40, encoder_attention_heads=4, decoder_attention_heads=2, num_experts=4,
            encoder_sparse_step=1, decoder_sparse_step=2, max_position_embeddings=64, router_bias=True)
CONFIGS = {
    "switch": SWITCH,
    # expert_capacity 3 of 16 tokens over 4 experts: transformers drops tokens at inference too
    "switch-capacity": {**SWITCH, "expert_capacity": 3, "router_bias": True, "tie_word_embeddings": False,
                        "dense_act_fn": "gelu_new", "num_layers": 2, "num_sparse_encoder_layers": 1},
    "nllb": NLLB,
    "nllb-options": {**NLLB, "batch_prioritized_routing": True, "normalize_router_prob_before_dropping": True,
                     "moe_eval_capacity_token_fraction": 0.5, "moe_token_dropout": 0.1, "scale_embedding": False,
                     "tie_word_embeddings": False, "activation_function": "gelu", "num_experts": 3},
}
CASES = [(name, seed) for name in CONFIGS for seed in (0, 1)]
S, T = 16, 6  # encoder tokens, decoder tokens


def _router_dispatch(self, hidden_states, router_mask, router_probs):
    """NllbMoeExperts.forward as intended: each expert runs on the tokens whose gate for it is
    non-zero (the router's top-1 and top-2 after capacity), weighted by that gate."""
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        tok = torch.where(router_probs[:, e] > 0)[0]
        if len(tok):
            y = self[f"expert_{e}"](hidden_states[tok]) * router_probs[tok, e, None]
            if self.moe_token_dropout > 0:
                y = y * (1 - self.moe_token_dropout)
            out.index_add_(0, tok, y.to(hidden_states.dtype))
    return out


def _build(name: str, seed: int, dispatch: bool = True):
    import transformers

    config = dict(CONFIGS[name])
    cfg = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    if config["model_type"] == "switch_transformers":
        model = transformers.SwitchTransformersForConditionalGeneration(cfg)
    else:
        model = transformers.NllbMoeForConditionalGeneration(cfg)
        if dispatch:
            for m in model.modules():
                if type(m).__name__ == "NllbMoeExperts":
                    m.forward = _router_dispatch.__get__(m)
    model.eval()
    randomize_biases(model, seed)
    g = torch.Generator().manual_seed(seed + 3000)
    with torch.no_grad():  # norm weights start at 1: perturb them; a larger router spreads the choices
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
            if "router.classifier.weight" in n:
                p.mul_(4.0)
    return model


def _reference(model, enc, dec):
    """transformers' logits [T, V] and router decisions {(stack, j): (sets, weights)} from hooks."""
    seen = {}

    def hook(name):
        def f(mod, args, out):
            mask, probs = out[0], out[1]
            if mask.dim() == 3:  # Switch: [B, T, E] one-hot after capacity; probs [B, T, 1] (top-1 prob)
                mask, probs = mask[0], probs[0, :, 0]
                sets = [set(torch.nonzero(r).flatten().tolist()) for r in mask]
                weights = [{e: float(probs[t]) for e in s} for t, s in enumerate(sets)]
            else:  # NLLB: combine weights [T, E], non-zero for the experts that run
                sets = [set(torch.nonzero(r).flatten().tolist()) for r in probs]
                weights = [{e: float(probs[t, e]) for e in s} for t, s in enumerate(sets)]
            parts = name.split(".")
            stack = "encoder" if "encoder" in parts else "decoder"
            j = int(parts[parts.index("block" if "block" in parts else "layers") + 1])
            seen[stack, j] = (sets, weights)
        return f

    for n, m in model.named_modules():
        if type(m).__name__ in ("SwitchTransformersTop1Router", "NllbMoeTop2Router"):
            m.register_forward_hook(hook(n))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([dec]))
    return out.logits[0].float(), seen


@pytest.fixture(scope="session")
def encdec_checkpoint(tmp_path_factory):
    cache: dict = {}

    def get(name: str, seed: int):
        if (name, seed) not in cache:
            model = _build(name, seed)
            d = tmp_path_factory.mktemp(f"{name}-{seed}")
            model.save_pretrained(d)
            g = torch.Generator().manual_seed(seed)
            pad = model.config.pad_token_id
            enc = [t for t in torch.randint(3, 128, (S,), generator=g).tolist()]
            start = getattr(model.config, "decoder_start_token_id", None)
            start = pad if start is None else start
            dec = [start] + torch.randint(3, 128, (T - 1,), generator=g).tolist()
            logits, routes = _reference(model, enc, dec)
            cache[name, seed] = (d, enc, dec, logits, routes)
        return cache[name, seed]

    return get


@pytest.mark.parametrize("name,seed", CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_encdec_forward_matches_transformers(name, seed, encdec_checkpoint):
    d, enc, dec, ref_logits, ref_routes = encdec_checkpoint(name, seed)
    out = run_encdec(resolve(str(d)), enc, dec, device=DEVICE, streaming=True)
    assert ref_logits.abs().max() > 0.1
    assert (out.logits - ref_logits).abs().max().item() < 1e-4
    n_enc = CONFIGS[name].get("num_layers", CONFIGS[name].get("encoder_layers"))
    ours = {(r.stack, r.layer - (0 if r.stack == "encoder" else n_enc)): r for r in out.routes}
    assert sorted(ours) == sorted(ref_routes) and ref_routes
    for key, r in ours.items():
        sets, weights = ref_routes[key]
        dropped = {tuple(p) for p in r.dropped}
        for t in range(r.experts.shape[0]):
            kept = {int(e): float(w) for s, (e, w) in enumerate(zip(r.experts[t], r.weights[t])) if (t, s) not in dropped}
            assert set(kept) == sets[t], f"{key} token {t}: {sorted(kept)} vs {sorted(sets[t])}"
            for e, w in kept.items():
                assert abs(w - weights[t][e]) < 1e-5, (key, t, e, w, weights[t][e])
        for t, s in dropped:
            assert float(r.weights[t, s]) == 0.0


def test_capacity_drops_tokens_as_transformers_does(encdec_checkpoint):
    """Switch at inference keeps expert_capacity: tokens past it get no expert (transformers too)."""
    for seed in (0, 1):
        d, enc, dec, _, ref_routes = encdec_checkpoint("switch-capacity", seed)
        assert any(not s for sets, _ in ref_routes.values() for s in sets)  # transformers dropped some
        out = run_encdec(resolve(str(d)), enc, dec, device=DEVICE)
        assert sum(len(r.dropped) for r in out.routes) == sum(not s for sets, _ in ref_routes.values() for s in sets)


def test_nllb_second_choices_dropped(encdec_checkpoint):
    """NLLB's capacity at inference (fraction 0.5 of the tokens) drops second choices."""
    dropped = 0
    for seed in (0, 1):
        d, enc, dec, _, _ = encdec_checkpoint("nllb-options", seed)
        dropped += sum(len(r.dropped) for r in run_encdec(resolve(str(d)), enc, dec, device=DEVICE).routes)
    assert dropped > 0


def test_transformers_nllb_experts_ignore_the_router():
    """The upstream bug the NLLB reference works around: stock transformers runs expert_0 and
    expert_1 only, whatever the router picked. When this fails, transformers has fixed it: the
    reference can drop `_router_dispatch`."""
    model = _build("nllb", 0, dispatch=False)
    ran = set()
    for n, m in model.named_modules():
        if type(m).__name__ == "NllbMoeDenseActDense" and ".experts.expert_" in n:
            m.register_forward_hook(lambda mod, a, o, n=n: ran.add(int(n.rsplit("_", 1)[1])))
    _, routes = _reference(model, list(range(3, 3 + S)), [2] + list(range(10, 10 + T - 1)))
    chosen = {e for sets, _ in routes.values() for s in sets for e in s}
    assert ran == {0, 1} and chosen - {0, 1}


def test_trace_reports_both_stacks(encdec_checkpoint):
    d, enc, dec, ref_logits, _ = encdec_checkpoint("switch-capacity", 0)
    rep = moetool.trace(model=str(d), tokens=enc, decoder_tokens=dec[1:], device=DEVICE)
    assert [t.id for t in rep.tokens] == enc and [t.id for t in rep.decoder_tokens] == dec
    assert (rep.logits - ref_logits).abs().max().item() < 1e-4
    stacks = {l.stack for l in rep.layers}
    assert stacks == {"encoder", "decoder"}
    for l in rep.layers:
        assert len(l.experts) == (S if l.stack == "encoder" else T)
        assert l.metrics
    js = rep.to_dict()
    assert js["decoder_tokens"][0]["id"] == dec[0]
    assert {l["stack"] for l in js["layers"]} == {"encoder", "decoder"}
    assert sum(len(l["dropped"]) for l in js["layers"]) > 0


def test_trace_generates_decoder_tokens_greedily(encdec_checkpoint):
    d, enc, dec, _, _ = encdec_checkpoint("nllb", 1)
    rep = moetool.trace(model=str(d), tokens=enc, generate=3, device=DEVICE)
    model = _build("nllb", 1)
    ids = [dec[0]]
    for _ in range(3):
        with torch.no_grad():
            lg = model(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(lg.argmax()))
    assert [t.id for t in rep.decoder_tokens] == ids
    assert [t.generated for t in rep.decoder_tokens] == [False, True, True, True]


def test_trace_cli_decoder_tokens(encdec_checkpoint):
    d, enc, dec, _, _ = encdec_checkpoint("switch", 0)
    r = subprocess.run([sys.executable, "-m", "moetool", "trace", "--model", str(d), "--tokens",
                        ",".join(map(str, enc)), "--decoder-tokens", ",".join(map(str, dec[1:])), "--json",
                        "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    js = json.loads(r.stdout)
    assert [t["id"] for t in js["decoder_tokens"]] == dec
    assert [l["stack"] for l in js["layers"]] == ["encoder"] * 3 + ["decoder"] * 2
    # SWITCH: 3 encoder layers, all sparse; 4 decoder layers, sparse step 2: blocks 1 and 3
    assert [(l["layer"], l["stack_layer"]) for l in js["layers"]] == [(0, 0), (1, 1), (2, 2), (4, 1), (6, 3)]
    bad = subprocess.run([sys.executable, "-m", "moetool", "trace", "--model", str(d), "--tokens", "5",
                          "--decoder-tokens", "999999", "--device", "cpu"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# --- JetMoE: the mixture-of-attention router -------------------------------------------------------

JETMOE = dict(model_type="jetmoe", hidden_size=32, num_key_value_heads=2, kv_channels=8, vocab_size=128,
              num_hidden_layers=3, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
              tie_word_embeddings=False, max_position_embeddings=256)


def _jetmoe_reference(model, ids):
    """transformers' logits and {layer: (experts [T, K], gates [T, K])} of each layer's attention
    router (JetMoeTopKGating under self_attention.experts), read with hooks."""
    import re

    captured = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "JetMoeTopKGating" and name.endswith("self_attention.experts.router"):
            def hook(mod, args, out, layer=int(re.search(r"layers\.(\d+)\.", name).group(1))):
                _, tokens, gates, sizes, _ = out  # grouped by expert: token and gate of each slot
                experts = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
                order = torch.argsort(tokens, stable=True)
                T = int(tokens.max()) + 1
                captured[layer] = (experts[order].view(T, -1), gates[order].float().view(T, -1))
            module.register_forward_hook(hook)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return logits, captured


@pytest.fixture(scope="session")
def jetmoe_checkpoint(tmp_path_factory):
    cache = {}

    def get(seed: int):
        if seed not in cache:
            from fakes import build_transformers_model

            model = build_transformers_model(JETMOE, seed=seed).eval()
            randomize_biases(model, seed)
            d = tmp_path_factory.mktemp(f"jetmoe-{seed}")
            model.save_pretrained(d)
            ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(seed)).tolist()
            cache[seed] = (d, ids, *_jetmoe_reference(model, ids))
        return cache[seed]

    return get


@pytest.mark.parametrize("seed", (0, 1))
def test_jetmoe_attention_router_matches_transformers(seed, jetmoe_checkpoint):
    d, ids, ref_logits, ref = jetmoe_checkpoint(seed)
    rep = moetool.trace(model=str(d), tokens=ids, device=DEVICE)
    assert (rep.logits - ref_logits).abs().max().item() < 1e-4
    attn = [l for l in rep.layers if l.kind == "attention"]
    assert [l.layer for l in attn] == sorted(ref) == [0, 1, 2]
    assert [l.layer for l in rep.layers if l.kind == "ffn"] == [0, 1, 2]
    for l in attn:
        experts, gates = ref[l.layer]
        for t in range(len(ids)):
            ours = dict(zip(l.experts[t], l.weights[t]))
            theirs = dict(zip(experts[t].tolist(), gates[t].tolist()))
            assert set(ours) == set(theirs), (l.layer, t, ours, theirs)
            for e, w in ours.items():
                assert abs(w - theirs[e]) < 1e-5
        assert l.metrics["tokens"] == len(ids) and sum(l.metrics["load"]) == 2 * len(ids)
    js = rep.to_dict()
    kinds = [(l["layer"], l.get("kind", "ffn")) for l in js["layers"]]
    assert kinds == [(0, "ffn"), (1, "ffn"), (2, "ffn"), (0, "attention"), (1, "attention"), (2, "attention")]
    assert all(r["layer"] in (0, 1, 2) for r in rep.rows()) and len(list(rep.rows())) == 3 * len(ids) * 2
    # the summary is the FFN routers' (as before); the attention routers have their own metrics
    assert rep.summary["max_mean_ratio"]["worst_layer"] in (0, 1, 2)
    logits_js = moetool.trace(model=str(d), tokens=ids, device=DEVICE, router_logits=True).to_dict()
    assert all(len(l["router_logits"]) == len(ids) for l in logits_js["layers"])


def test_diff_keeps_routers_and_stacks_apart(encdec_checkpoint, jetmoe_checkpoint):
    """diff pairs JetMoE's attention router with the attention router (not the FFN router of the
    same layer) and compares an encoder-decoder's decoder layers over the decoder tokens."""
    from moetool.diff import diff_traces

    d, ids, _, _ = jetmoe_checkpoint(0)
    a = moetool.trace(model=str(d), tokens=ids, device=DEVICE).to_dict()
    b = json.loads(json.dumps(a))
    attn1 = next(l for l in b["layers"] if l.get("kind") == "attention" and l["layer"] == 1)
    attn1["experts"][0] = [e for e in range(4) if e not in attn1["experts"][0]][:2]
    rep = diff_traces(a, b)
    changed = {(l["layer"], l.get("kind", "ffn")): l["changed_tokens"] for l in rep.layers}
    assert len(changed) == 6 and changed[1, "attention"] == [0]
    assert all(not v for k, v in changed.items() if k != (1, "attention"))

    d, enc, dec, _, _ = encdec_checkpoint("nllb", 0)
    a = moetool.trace(model=str(d), tokens=enc, decoder_tokens=dec[1:], device=DEVICE).to_dict()
    rep = diff_traces(a, json.loads(json.dumps(a)))
    assert {l["stack"] for l in rep.layers} == {"encoder", "decoder"} and rep.summary["changed_assignments"] == 0
    other = moetool.trace(model=str(d), tokens=enc, decoder_tokens=dec[2:], device=DEVICE).to_dict()
    with pytest.raises(moetool.errors.MoetoolError, match="decoder tokens"):
        diff_traces(a, other)
