"""Tensors of a GGUF checkpoint by transformers name, for the reference forward pass: the same
interface as `moetool.forward.weights.WeightStore` (`get(name, dtype, index=...)`, `in`,
`tensors`, `release`, `bytes_read`), reading memory-mapped bytes and dequantising only what is
read (`index` selects one expert of a stacked [E, ...] tensor: only its blocks are touched).

What the decoder asks for and the GGUF holds differ in layout only:
- routed experts are stacked per projection (`ffn_gate_exps` [E, F, D]); the store offers them as
  per-expert tensors `...mlp.experts.{e}.gate_proj.weight` (gpt-oss: as transformers' fused
  `gate_up_proj` with gate and up interleaved, and its biases, so the decoder's gpt-oss path runs);
- llama.cpp's converter permutes the rows of q and k for `llama` (interleaved RoPE): undone here;
- Qwen2-MoE's shared-expert gate may be stored 1-D: returned as [1, D];
- DeepSeek MLA split by newer converters into `attn_k_b` (transposed) and `attn_v_b` is joined back
  into transformers' `kv_b_proj`.
"""

from __future__ import annotations

import mmap
import os
import re
import warnings
from typing import Optional

import torch

from ..errors import BadCheckpoint, MoetoolError
from ..header import TensorInfo
from .dequant import dequantize
from .reader import GGML_TYPES, TYPE_IDS

_PER_EXPERT = re.compile(r"^(?P<base>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


class GGUFWeightStore:
    """GGUF tensors under transformers names (see the module docstring)."""

    def __init__(self, ckpt, streaming: Optional[bool] = None):
        from ..forward.weights import needs_streaming

        self.tensors: dict[str, TensorInfo] = ckpt.tensors
        self.model = ckpt.gguf
        cfg = ckpt.config
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads", self.heads)
        self.gpt_oss = cfg.get("model_type") == "gpt_oss"
        for f in {t.file for t in self.tensors.values()}:
            if not os.path.isfile(f):
                raise MoetoolError(f"{f}: the GGUF file is not on this machine (a hub GGUF is read header-only); "
                                   "download it and pass its local path to trace")
        self._maps: dict[str, mmap.mmap] = {}
        self.bytes_read = 0
        self.streaming = needs_streaming(self.tensors) if streaming is None else streaming
        # virtual names -> (stored name, expert index, op)
        self.virtual: dict[str, tuple] = {}
        for name, t in self.tensors.items():
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if name.endswith(f".mlp.experts.{proj}") and len(t.shape) == 3:
                    base = name[: -len(proj) - 1]
                    if self.gpt_oss:
                        if proj == "gate_proj":
                            self.virtual[f"{base}.gate_up_proj"] = ("fused", base)
                    else:
                        for e in range(t.shape[0]):
                            self.virtual[f"{base}.{e}.{proj}.weight"] = ("expert", name, e)
            if name.endswith(".self_attn.k_b_proj.weight"):  # MLA split for absorption (newer converters)
                base = name[: -len("k_b_proj.weight")]
                if base + "kv_b_proj.weight" not in self.tensors and base + "v_b_proj.weight" in self.tensors:
                    self.virtual[base + "kv_b_proj.weight"] = ("kv_b", base)
            if self.gpt_oss and name.endswith(".mlp.experts.gate_proj_bias"):
                self.virtual[name[: -len("gate_proj_bias")] + "gate_up_proj_bias"] = ("fused_bias", name[: -len("gate_proj_bias")])

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or name in self.virtual

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass
        self._maps.clear()

    def _map(self, path: str) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is None:
            try:
                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except OSError as e:
                raise BadCheckpoint(f"{path}: cannot open ({e.strerror})") from None
            self._maps[path] = mm
        return mm

    def _read(self, name: str, index: Optional[int] = None) -> torch.Tensor:
        """One stored tensor (or slice `index` of its leading dimension) as float32 / its float dtype."""
        t = self.tensors.get(name)
        if t is None:
            raise BadCheckpoint(f"checkpoint is missing tensor {name!r}")
        shape = list(t.shape)
        start, nbytes = t.begin, t.end - t.begin
        if index is not None:
            if not 0 <= index < shape[0]:
                raise BadCheckpoint(f"tensor {name!r}: slice {index} out of range ({shape[0]})")
            per = nbytes // shape[0]
            start, nbytes, shape = start + index * per, per, shape[1:]
        mm = self._map(t.file)
        if start + nbytes > len(mm):
            raise BadCheckpoint(f"{t.file}: truncated: tensor {name!r} ends past the end of the file")
        self.bytes_read += nbytes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=start)
        _, block, size = GGML_TYPES[TYPE_IDS[t.dtype]]
        if block == 1 and start % size:  # plain types: an unaligned view would fail
            raw = raw.clone()
        return dequantize(raw, t.dtype, tuple(shape))

    def get(self, name: str, dtype: torch.dtype, index: Optional[int] = None, rows: Optional[int] = None,
            device: Optional[torch.device] = None) -> torch.Tensor:
        if rows is not None:
            raise BadCheckpoint(f"tensor {name!r}: row slices are not supported for GGUF")
        v = self.virtual.get(name)
        if v is None:
            w = self._read(name, index)
            if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")) and self.model.permuted_qk:
                w = unpermute(w, self.heads if ".q_proj" in name else self.kv_heads)
            elif name.endswith("shared_expert_gate.weight") and w.dim() == 1:
                w = w.unsqueeze(0)
        elif v[0] == "expert":
            w = self._read(v[1], v[2])
        elif v[0] == "fused":  # gpt-oss: [2F, D] with gate rows at even and up rows at odd positions
            g, u = self._read(v[1] + ".gate_proj", index), self._read(v[1] + ".up_proj", index)
            w = torch.stack((g, u), dim=-2).reshape(*g.shape[:-2], 2 * g.shape[-2], g.shape[-1])
        elif v[0] == "kv_b":  # k_b [H, R, nope] (transposed) and v_b [H, v, R] -> kv_b_proj [H * (nope + v), R]
            k_b, v_b = self._read(v[1] + "k_b_proj.weight"), self._read(v[1] + "v_b_proj.weight")
            w = torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(-1, k_b.shape[1])
        else:  # fused_bias
            g, u = self._read(v[1] + "gate_proj_bias", index), self._read(v[1] + "up_proj_bias", index)
            w = torch.stack((g, u), dim=-1).reshape(*g.shape[:-1], 2 * g.shape[-1])
        return w.to(device=device or "cpu", dtype=dtype)

    def get_optional(self, name: Optional[str], dtype: torch.dtype, **kw) -> Optional[torch.Tensor]:
        return None if name is None or name not in self else self.get(name, dtype, **kw)

    def release(self, force: bool = False) -> None:
        if not (self.streaming or force):
            return
        for mm in self._maps.values():
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):
                pass


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's `permute` of q/k rows (llama): per head, rows (pair, i) back to
    (half, i)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
