"""A `tokenizers.Tokenizer` from a GGUF's `tokenizer.ggml.*` arrays, for when no tokenizer.json is
given: byte-level BPE (`tokenizer.ggml.model = "gpt2"`) with the pre-tokenizer regex of
`tokenizer.ggml.pre` for the kinds listed in `_PRE` (GPT-2, Llama 3, Qwen 2/3; from llama.cpp's
llama-vocab.cpp; others are refused in one line rather than guessed); control tokens (type 3) are special tokens, never split;
`tokenizer.ggml.add_bos_token` prepends the BOS id. SentencePiece vocabularies (`llama`) are not
rebuilt: pass the model's tokenizer.json beside the GGUF, or token ids with --tokens.
"""

from __future__ import annotations

from typing import Any

from ..errors import MoetoolError

_GPT2 = None  # ByteLevel's own regex
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE = {"default": _GPT2, "gpt-2": _GPT2, "gpt2": _GPT2, "llama-bpe": _LLAMA3, "llama3": _LLAMA3,
        "smaug-bpe": _LLAMA3, "qwen2": _QWEN2}


def gguf_tokenizer(md: dict[str, Any], where: str):
    """The tokenizer described by the metadata, or None when the GGUF holds none."""
    kind = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        return None
    if kind != "gpt2":
        raise MoetoolError(f"{where}: the GGUF's {kind!r} tokenizer cannot be rebuilt by moetool (byte-level BPE "
                           "'gpt2' only); put the model's tokenizer.json beside the file, or pass --tokens 1,2,3")
    pre = md.get("tokenizer.ggml.pre", "default")
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    merges = md.get("tokenizer.ggml.merges") or []
    try:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, pairs, ignore_merges=pre != "default"))
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise MoetoolError(f"{where}: GGUF tokenizer arrays are inconsistent ({str(e).splitlines()[0][:100]})") from None
    if pre not in _PRE:
        raise MoetoolError(f"{where}: GGUF pre-tokenizer {pre!r} is not known to moetool (known: {', '.join(sorted(_PRE))}); "
                           "put the model's tokenizer.json beside the file, or pass --tokens 1,2,3")
    regex = _PRE[pre]
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    types = md.get("tokenizer.ggml.token_type") or []
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, ty in enumerate(types)
               if ty == 3 and i < len(tokens)]
    if special:
        tok.add_special_tokens(special)
    bos = md.get("tokenizer.ggml.bos_token_id")
    if md.get("tokenizer.ggml.add_bos_token") and isinstance(bos, int) and 0 <= bos < len(tokens):
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], bos)])
    return tok
