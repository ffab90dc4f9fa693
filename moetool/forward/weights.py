"""Read tensors straight from safetensors files, one at a time.

Files are memory-mapped (private, read-only in practice) and each tensor is a zero-copy view of
exactly its bytes (offsets from the validated header): only the pages of tensors actually used
are touched, so reading expert e of a fused [E, ...] tensor never touches the others. After each
layer `release()` drops every mapped page from the process (`madvise(MADV_DONTNEED)`): resident
memory stays about one layer plus activations, which is what lets a checkpoint larger than RAM
stream through. The kernel's page cache keeps recently read pages for a later run.

Fused expert tensors ([E, ...] or DBRX's [E*F, D]) are sliced per expert by byte range: reading
expert e never touches the others. fp8 weights with `weight_scale_inv` (128x128 blocks) and MXFP4
`*_blocks` / `*_scales` are dequantised on load; the fp8 block size is the checkpoint's
`quantization_config.weight_block_size` (transformers' default 128x128), never inferred.
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from typing import Optional

import torch

from ..errors import BadCheckpoint, BadConfig
from ..header import DTYPE_BITS, TensorInfo

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# OCP MX FP4 (E2M1) code points, low nibble first (as gpt-oss and transformers store them).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class WeightStore:
    """Tensors of a checkpoint by stored name. `get` reads and converts one tensor.

    Example:
        >>> store = WeightStore(ckpt.tensors)                    # doctest: +SKIP
        >>> w = store.get("model.layers.0.self_attn.q_proj.weight", torch.float32)  # doctest: +SKIP
    """

    def __init__(self, tensors: dict[str, TensorInfo], streaming: Optional[bool] = None,
                 fp8_block: tuple[int, int] = (128, 128)):
        self.tensors = tensors
        self.fp8_block = fp8_block
        self._maps: dict[str, tuple[mmap.mmap, int]] = {}  # file -> (map, data start)
        # (name, index, rows) -> the zero-copy view `raw` made: generation asks for the same tensors
        # every token, and building a view costs more than a small matmul. Views hold no pages.
        self._views: dict[tuple, torch.Tensor] = {}
        self.bytes_read = 0
        # Streaming (drop pages after each expert and layer) when the checkpoint is large next to the
        # memory available; otherwise pages stay mapped and repeated forwards reuse them.
        self.streaming = needs_streaming(tensors) if streaming is None else streaming

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or f"{name}_blocks" in self.tensors

    def close(self) -> None:
        self._views.clear()
        for mm, _ in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a tensor still views it; the map closes when that tensor goes
                pass
        self._maps.clear()

    def _map(self, path: str) -> tuple[mmap.mmap, int]:
        entry = self._maps.get(path)
        if entry is None:
            try:
                with open(path, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except OSError as e:
                raise BadCheckpoint(f"{path}: cannot open ({e.strerror})") from None
            entry = self._maps[path] = (mm, 8 + n)
        return entry

    def _view(self, t: TensorInfo, start: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        mm, data_start = self._map(t.file)
        offset = data_start + t.begin + start
        if offset + nbytes > len(mm):
            raise BadCheckpoint(f"{t.file}: truncated: tensor {t.name!r} ends past the end of the file")
        self.bytes_read += nbytes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype)

    def raw(self, name: str, index: Optional[int] = None, rows: Optional[int] = None) -> torch.Tensor:
        """The stored tensor (no conversion). `index` selects one slice of the leading dimension;
        with `rows` it selects rows [index*rows, (index+1)*rows) of a 2-D tensor (DBRX's [E*F, D])."""
        view = self._views.get((name, index, rows))
        if view is not None:
            self.bytes_read += view.numel() * view.element_size()
            return view
        t = self.tensors.get(name)
        if t is None:
            raise BadCheckpoint(f"checkpoint is missing tensor {name!r}")
        shape = list(t.shape)
        bits = DTYPE_BITS[t.dtype]
        if t.dtype not in TORCH_DTYPES:
            raise BadCheckpoint(f"tensor {name!r}: dtype {t.dtype} cannot be loaded")
        start, nbytes = 0, t.nbytes
        if index is not None:
            lead = rows if rows is not None else 1
            per_row = math.prod(shape[1:]) * bits // 8
            count = shape[0] // lead if rows is not None else shape[0]
            if not 0 <= index < count:
                raise BadCheckpoint(f"tensor {name!r}: slice {index} out of range ({count})")
            start, nbytes = index * lead * per_row, lead * per_row
            shape = ([lead] + shape[1:]) if rows is not None else shape[1:]
        if nbytes == 0:
            return torch.empty(shape, dtype=TORCH_DTYPES[t.dtype])
        view = self._views[(name, index, rows)] = self._view(t, start, nbytes, TORCH_DTYPES[t.dtype]).reshape(shape)
        return view

    def get(self, name: str, dtype: torch.dtype, index: Optional[int] = None, rows: Optional[int] = None,
            device: Optional[torch.device] = None) -> torch.Tensor:
        """Read, dequantise if needed, convert to `dtype` (and move to `device`)."""
        if name not in self.tensors and f"{name}_blocks" in self.tensors:
            w = self._mxfp4(name, index)
        else:
            w = self.raw(name, index, rows)
            if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                w = self._fp8(name, w, index)
        w = w.to(device=device or "cpu", dtype=dtype)
        return w

    def get_optional(self, name: Optional[str], dtype: torch.dtype, **kw) -> Optional[torch.Tensor]:
        return None if name is None or name not in self else self.get(name, dtype, **kw)

    def _fp8(self, name: str, w: torch.Tensor, index: Optional[int]) -> torch.Tensor:
        """fp8 with `weight_scale_inv`: one fp32 scale per block of `fp8_block` [rows, cols] (the
        last block of a dimension may be partial: DeepSeek-V3's 576-row kv_a_proj_with_mqa has
        4 full 128-row blocks and one of 64), or one per tensor. As transformers' fp8 dequantisation."""
        scale_name = name[: -len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"
        w = w.to(torch.float32)
        if scale_name not in self.tensors:
            return w
        s = self.raw(scale_name, index).to(torch.float32)
        if s.numel() == 1:  # per-tensor scale
            return w * s.reshape(())
        out, inp = w.shape[-2:]
        bo, bi = self.fp8_block
        grid = (math.ceil(out / bo), math.ceil(inp / bi))
        if w.dim() < 2 or tuple(s.shape[-2:]) != grid:
            raise BadCheckpoint(f"tensor {scale_name!r}: shape {list(s.shape)} does not match {name!r} "
                                f"{list(w.shape)} in blocks of {bo}x{bi} (quantization_config.weight_block_size)")
        s = s.repeat_interleave(bo, dim=-2)[..., :out, :].repeat_interleave(bi, dim=-1)[..., :inp]
        return w * s

    def _mxfp4(self, name: str, index: Optional[int]) -> torch.Tensor:
        """MXFP4 (gpt-oss): `*_blocks` [..., G, 16] uint8 with two E2M1 values a byte (low nibble
        first) and `*_scales` [..., G] uint8 E8M0 exponents (bias 127) -> [..., G * 32] float32."""
        blocks = self.raw(f"{name}_blocks", index)
        scales = self.raw(f"{name}_scales", index).to(torch.int32) - 127
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
        lo, hi = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]
        vals = torch.stack((lo, hi), dim=-1).reshape(*blocks.shape[:-1], blocks.shape[-1] * 2)  # [..., G, 32]
        vals = torch.ldexp(vals, scales.unsqueeze(-1))
        return vals.reshape(*vals.shape[:-2], -1)

    def release(self, force: bool = False) -> None:
        """Drop every mapped page from this process's resident memory (re-read on next access),
        when streaming (or forced)."""
        if not (self.streaming or force):
            return
        for mm, _ in self._maps.values():
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):
                pass


def fp8_block_size(config: dict) -> tuple[int, int]:
    """`quantization_config.weight_block_size` [rows, cols]; transformers' default is 128x128."""
    q = config.get("quantization_config") if isinstance(config, dict) else None
    block = q.get("weight_block_size") if isinstance(q, dict) else None
    if block is None:
        return (128, 128)
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise BadConfig(f"config.json: quantization_config.weight_block_size must be two positive integers, got {block!r}")
    return (block[0], block[1])


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); total physical memory elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def needs_streaming(tensors: dict[str, TensorInfo]) -> bool:
    total = sum(t.end - t.begin for t in tensors.values())
    return total > available_memory() // 4
