"""Reading routed experts' matrices for quantize-report straight from safetensors files into the
block buffers: `os.preadv` into the buffer's own memory (or a small staging tensor of the stored
dtype when the buffer is float32 or on another device), no memory map.

Why: the store's zero-copy views fault every 4 KiB page of the map in on first touch, and the
report drops the pages after each expert (streaming), so copying an expert out of the map cost
page faults on top of the copy (22% of a compiled int8 report's time). A read copies out of the
page cache without them, as the raw read of benchmarks/quant_bench.py does.

Only per-expert tensors (`...experts.{e}.gate_proj.weight` and the like) in a plain float dtype
are read this way; anything else (fused layouts, fp8 / MXFP4 dequantisation, GGUF) goes through
the store as before. The bytes are the same bytes: the buffers hold what `copy_` from the store's
view gave, bit for bit (tests/test_quant_reader.py).
"""

from __future__ import annotations

import ctypes
import os
import torch

from ..errors import BadCheckpoint
from ..forward.weights import TORCH_DTYPES, WeightStore

FLOAT_DTYPES = {torch.float32, torch.bfloat16, torch.float16}


class ExpertReader:
    """Reads an expert's gate / up / down (names from a layer's `forward.model.Experts` loader) into
    one slot of the block buffers. Files stay open until `close`."""

    def __init__(self, store):
        self.store = store
        self.plain = type(store) is WeightStore  # noqa: E721 (not the GGUF store, a subclass)
        self._files: dict[str, tuple[int, int]] = {}  # path -> (fd, data start)
        self._stage: dict[tuple, torch.Tensor] = {}

    def close(self) -> None:
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()
        self._stage.clear()

    def _file(self, path: str) -> tuple[int, int]:
        entry = self._files.get(path)
        if entry is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise BadCheckpoint(f"{path}: cannot open ({e.strerror})") from None
            head = os.pread(fd, 8, 0)
            if len(head) < 8:
                os.close(fd)
                raise BadCheckpoint(f"{path}: truncated safetensors header")
            entry = self._files[path] = (fd, 8 + int.from_bytes(head, "little"))
        return entry

    def read(self, loader, e: int, bufs: dict[str, torch.Tensor], i: int) -> bool:
        """Fill bufs[p][i] for p in gate, up, down with expert e's matrices; False (nothing read) when
        this checkpoint's experts are not plain per-expert float tensors of the buffers' shapes."""
        names = getattr(loader, "per_expert", {})
        if not self.plain or len(names) != 3:
            return False
        infos = []
        for p in ("gate", "up", "down"):
            t = self.store.tensors.get(names[p].format(e=e))
            dst = bufs[p][i]
            dtype = TORCH_DTYPES.get(t.dtype) if t is not None else None
            if (dtype not in FLOAT_DTYPES or tuple(t.shape) != tuple(dst.shape) or not t.file.endswith(".safetensors")
                    or t.nbytes != dst.numel() * dtype.itemsize or not dst.is_contiguous()):
                return False
            infos.append((t, dtype, dst))
        for t, dtype, dst in infos:
            fd, start = self._file(t.file)
            target = dst if dst.dtype == dtype and dst.device.type == "cpu" else self._staging(dst.shape, dtype, dst.device)
            view = (ctypes.c_char * t.nbytes).from_address(target.data_ptr())
            got = os.preadv(fd, [view], start + t.begin)
            if got != t.nbytes:
                raise BadCheckpoint(f"{t.file}: truncated: tensor {t.name!r} ends past the end of the file")
            if target is not dst:
                dst.copy_(target)
            self.store.bytes_read += t.nbytes
        return True

    def _staging(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (tuple(shape), dtype)
        t = self._stage.get(key)
        if t is None:
            pin = device.type == "cuda" and torch.cuda.is_available()
            t = self._stage[key] = torch.empty(tuple(shape), dtype=dtype, pin_memory=pin)
        return t

