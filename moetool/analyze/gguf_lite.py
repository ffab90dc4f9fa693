"""Just enough GGUF to read an imatrix: metadata and the F32 tensors whose names end in a suffix.

GGUF v2/v3 layout (ggml docs/gguf.md): magic `GGUF`, u32 version, u64 tensor count, u64 metadata
count, metadata key/values, tensor infos (name, n_dims, dims, ggml type, offset), padding to
`general.alignment` (32), tensor data. Every count and length is bounded by the file size.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from ..errors import MoetoolError

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGML_F32 = 0


class _Cursor:
    def __init__(self, buf: bytes, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise MoetoolError(f"{self.path}: truncated GGUF header (needs {n} bytes at offset {self.pos})")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise MoetoolError(f"{self.path}: GGUF string is not UTF-8") from None

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9 and depth < 2:
            itype, n = self.unpack("<I"), self.unpack("<Q")
            if n > len(self.buf):
                raise MoetoolError(f"{self.path}: GGUF array of {n} items is longer than the file")
            return [self.value(itype, depth + 1) for _ in range(n)]
        raise MoetoolError(f"{self.path}: unknown GGUF value type {vtype}")


def read_gguf_f32_tensors(path: str, suffix: str = "") -> tuple[dict, dict[str, np.ndarray]]:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        raise MoetoolError(f"{path}: cannot read ({e.strerror or e})") from None
    c = _Cursor(buf, path)
    if c.take(4) != b"GGUF":
        raise MoetoolError(f"{path}: not a GGUF file")
    version = c.unpack("<I")
    if version not in (2, 3):
        raise MoetoolError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
    if n_tensors > size or n_kv > size:
        raise MoetoolError(f"{path}: GGUF counts larger than the file ({n_tensors} tensors, {n_kv} keys)")
    meta = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        nd = c.unpack("<I")
        if nd > 8:
            raise MoetoolError(f"{path}: tensor {name!r} has {nd} dimensions")
        dims = [c.unpack("<Q") for _ in range(nd)]
        infos.append((name, dims, c.unpack("<I"), c.unpack("<Q")))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0:
        raise MoetoolError(f"{path}: bad general.alignment {align!r}")
    start = -(-c.pos // align) * align
    out = {}
    for name, dims, ttype, off in infos:
        if not name.endswith(suffix):
            continue
        if ttype != GGML_F32:
            raise MoetoolError(f"{path}: tensor {name!r} is ggml type {ttype}, expected F32")
        n = int(np.prod(dims)) if dims else 1
        a, b = start + off, start + off + 4 * n
        if b > len(buf):
            raise MoetoolError(f"{path}: tensor {name!r} reaches past the end of the file (truncated?)")
        out[name] = np.frombuffer(buf[a:b], dtype="<f4").reshape(list(reversed(dims)) or [1])
    return meta, out
