"""GGUF checkpoints (llama.cpp, ollama, LM Studio): a pure-Python header reader (`reader`), the
mapping to transformers' names and config (`arch`), local and split files as a `Checkpoint`
(`checkpoint`), hub files by HTTP range reads (`hub`); for the forward pass, torch ports of the
ggml block formats (`dequant`), a weight store that dequantises only what is read (`store`) and
the tokenizer rebuilt from `tokenizer.ggml.*` (`tokenizer`). docs/gguf.md has the details.

Importing this package imports neither numpy nor torch (`count` stays fast and torch-free).
"""
