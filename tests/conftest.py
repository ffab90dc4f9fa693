"""Shared fixtures: tiny checkpoints written by transformers, once per test session."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

from fakes import LLAMA4_MULTIMODAL, TINY_CONFIGS, build_transformers_model, transformers_param_count  # noqa: E402

ALL_TINY = dict(TINY_CONFIGS)
ALL_TINY["llama4-multimodal"] = LLAMA4_MULTIMODAL


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(name) -> (directory, transformers parameter count), built once."""
    cache: dict[str, tuple[Path, int]] = {}

    def get(name: str) -> tuple[Path, int]:
        if name not in cache:
            model = build_transformers_model(ALL_TINY[name])
            d = tmp_path_factory.mktemp(name)
            model.save_pretrained(d)
            cache[name] = (d, transformers_param_count(model))
        return cache[name]

    return get


def write_tokenizer(directory: Path, vocab_size: int = 128) -> None:
    """A small byte-level BPE tokenizer.json trained on a few sentences (tokenizers library)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # sorted: alphabet()'s order varies from process to process, and with it the tokenizer (and the tests)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[:100],
                                  show_progress=False)
    text = ["def add(a, b): return a + b", "The quick brown fox jumps over the lazy dog.", "import os, sys"] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(directory / "tokenizer.json"))


@pytest.fixture(autouse=True)
def _no_terminal_width(monkeypatch):
    """CLI output in tests is as when piped (full width): COLUMNS, set by some imports of the test
    process, is removed before each test; tests that need a width pass COLUMNS themselves."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)
