"""Quantization: schemes (fake-quantize, then dequantize), per-expert sensitivity, and a
mixed-precision plan under a budget. See docs/quantization.md."""
