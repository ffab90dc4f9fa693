"""Train moetool's bundled default MoE model, deterministically, on text every Python has.

Data: the English prose of the Python documentation topics (`pydoc_data.topics`, split into
paragraphs) and Python source code of the standard library (modules sorted by path, the first
3 MB), each split 90 / 10 into train / held-out (prose by paragraph, code by file). Tokenizer: byte-level BPE (the `tokenizers`
library), 2048 tokens. Model: the Mixtral architecture (RMSNorm, RoPE, GQA, softmax top-2 router
with renormalised gate weights, SwiGLU experts), 4 layers, 8 experts, hidden 128, tied
embeddings, trained with a Switch load-balancing loss. Saved in the standard Hugging Face layout
(config.json, model.safetensors in bf16, tokenizer.json) under moetool/data/default/, plus
training_log.json (losses) for docs/default-model.md.

Run: python scripts/train_default_model.py [--out moetool/data/default] [--steps 1200]
Needs torch, tokenizers, safetensors (all in `pip install -e '.[forward]'`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SEED = 20261122
VOCAB = 2048
CONFIG = dict(
    architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=VOCAB, hidden_size=128,
    intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=True, hidden_act="silu", router_aux_loss_coef=0.01,
    router_jitter_noise=0.0, sliding_window=None, attention_dropout=0.0, torch_dtype="bfloat16",
    bos_token_id=1, eos_token_id=2,
)
SEQ = 256
BATCH = 16
AUX = 0.01


# --- data ---------------------------------------------------------------------------------------

def documents() -> tuple[list[str], list[str]]:
    import pydoc_data.topics

    prose = [para for k in sorted(pydoc_data.topics.topics)
             for para in pydoc_data.topics.topics[k].split("\n\n") if len(para.strip()) > 40]
    lib = Path(sysconfig.get_paths()["stdlib"])
    code, size = [], 0
    for p in sorted(lib.rglob("*.py")):
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in p.relative_to(lib).parts):
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        code.append(text)
        size += len(text)
        if size > 3_000_000:
            break
    return prose, code


def split(docs: list[str], rng: random.Random) -> tuple[list[str], list[str]]:
    idx = list(range(len(docs)))
    rng.shuffle(idx)
    n_held = max(1, len(docs) // 10)
    held = set(idx[:n_held])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def encode(tok, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode(d).ids)
        ids.append(2)  # </s> between documents (paragraphs)
    return torch.tensor(ids, dtype=torch.long)


# --- model (the Mixtral architecture, with Hugging Face parameter names) ------------------------

class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope(x, cos, sin):  # x [B, H, T, Dh]; split-half pairs as transformers' Mixtral
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.kv, self.dh = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        d = c["hidden_size"]
        self.q_proj = nn.Linear(d, self.h * self.dh, bias=False)
        self.k_proj = nn.Linear(d, self.kv * self.dh, bias=False)
        self.v_proj = nn.Linear(d, self.kv * self.dh, bias=False)
        self.o_proj = nn.Linear(self.h * self.dh, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.dh).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv, self.dh).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv, self.dh).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k = k.repeat_interleave(self.h // self.kv, dim=1)
        v = v.repeat_interleave(self.h // self.kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Expert(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)  # gate
        self.w2 = nn.Linear(f, d, bias=False)  # down
        self.w3 = nn.Linear(d, f, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.E, self.k = c["num_local_experts"], c["num_experts_per_tok"]
        self.gate = nn.Linear(c["hidden_size"], self.E, bias=False)
        self.experts = nn.ModuleList(Expert(c["hidden_size"], c["intermediate_size"]) for _ in range(self.E))

    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        probs = torch.softmax(self.gate(flat).float(), dim=-1)  # [N, E]
        w, idx = torch.topk(probs, self.k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e in range(self.E):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                out.index_add_(0, tok, self.experts[e](flat[tok]) * w[tok, slot, None])
        # Switch load-balancing loss: E * sum_i f_i P_i (1 at perfect balance)
        f = torch.bincount(idx.reshape(-1), minlength=self.E).float() / idx.numel()
        aux = self.E * (f * probs.mean(dim=0)).sum()
        return out.view(B, T, D), aux


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.block_sparse_moe = MoE(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        y, aux = self.block_sparse_moe(self.post_attention_layernorm(x))
        return x + y, aux


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, c["head_dim"], 2).float() / c["head_dim"]))
        self.register_buffer("inv_freq", inv, persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids):
        T = ids.shape[1]
        freqs = torch.outer(torch.arange(T, dtype=torch.float32), self.inv_freq)
        cos, sin = freqs.cos(), freqs.sin()  # [T, Dh/2]
        x = self.embed_tokens(ids)
        aux = 0.0
        for layer in self.layers:
            x, a = layer(x, cos, sin)
            aux = aux + a
        return F.linear(self.norm(x), self.embed_tokens.weight), aux / len(self.layers)  # tied head


# --- training -----------------------------------------------------------------------------------

def batches(data: torch.Tensor, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=gen)
        x = torch.stack([data[s:s + SEQ] for s in starts])
        y = torch.stack([data[s + 1:s + SEQ + 1] for s in starts])
        yield x, y


@torch.no_grad()
def evaluate(model, data: torch.Tensor) -> float:
    model.eval()
    losses = []
    for s in range(0, min(len(data) - SEQ - 1, 64 * SEQ), SEQ):
        x, y = data[s:s + SEQ][None], data[s + 1:s + SEQ + 1][None]
        logits, _ = model(x)
        losses.append(F.cross_entropy(logits.view(-1, VOCAB), y.reshape(-1)).item())
    model.train()
    return sum(losses) / len(losses)


def unigram_loss(train: torch.Tensor, held: torch.Tensor) -> float:
    counts = torch.bincount(train, minlength=VOCAB).double() + 1.0  # add-one smoothing
    logp = torch.log(counts / counts.sum())
    return float(-logp[held].mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "moetool" / "data" / "default"))
    ap.add_argument("--steps", type=int, default=1500)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    random.seed(SEED)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()

    prose, code = documents()
    rng = random.Random(SEED)
    prose_train, prose_held = split(prose, rng)
    code_train, code_held = split(code, rng)
    tok = train_tokenizer(prose_train + code_train)
    tok.save(str(out / "tokenizer.json"))
    train = torch.cat([encode(tok, prose_train), encode(tok, code_train)])
    held = {"prose": encode(tok, prose_held), "code": encode(tok, code_held)}
    print(f"tokens: train {len(train):,} (prose {sum(len(tok.encode(d).ids) for d in prose_train):,}), "
          f"held-out prose {len(held['prose']):,}, code {len(held['code']):,}; {time.time() - t0:.0f} s", flush=True)

    model = Model(CONFIG)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(SEED)
    log = {"config": CONFIG, "params": n_params, "seed": SEED, "seq": SEQ, "batch": BATCH, "aux_coef": AUX,
           "train_tokens": len(train), "steps": [], "eval": []}
    it = batches(train, gen)
    for step in range(1, args.steps + 1):
        x, y = next(it)
        logits, aux = model(x)
        loss = F.cross_entropy(logits.view(-1, VOCAB), y.reshape(-1))
        (loss + AUX * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 20 == 0:
            log["steps"].append({"step": step, "loss": loss.item(), "balance_loss": float(aux.detach())})
        if step % 200 == 0 or step == args.steps:
            ev = {k: evaluate(model, v) for k, v in held.items()}
            log["eval"].append({"step": step, **ev})
            print(f"step {step}: train loss {loss.item():.3f}, held-out prose {ev['prose']:.3f}, code {ev['code']:.3f}, "
                  f"balance {float(aux.detach()):.3f}; {time.time() - t0:.0f} s", flush=True)
    log["unigram"] = {k: unigram_loss(train, v) for k, v in held.items()}
    log["seconds"] = time.time() - t0
    print(f"unigram baseline: prose {log['unigram']['prose']:.3f}, code {log['unigram']['code']:.3f}")

    from safetensors.torch import save_file

    tensors = {}
    for name, p in model.state_dict().items():
        if name == "inv_freq":
            continue
        tensors[f"model.{name}"] = p.detach().to(torch.bfloat16).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"saved {out} ({n_params:,} parameters) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
