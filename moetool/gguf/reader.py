"""Read and validate a GGUF header (metadata and tensor infos) in pure Python: no numpy, no torch.

A GGUF file is: magic `GGUF`, version (u32, 2 or 3), tensor count (u64), metadata count (u64),
the metadata key/value pairs, one info per tensor (name, dims innermost first, ggml type, offset
into the data section), padding to `general.alignment` (default 32), then the tensor data.

`parse_gguf(buf, file_bytes, where)` decodes a prefix of the file. When the prefix ends before the
tensor infos do, it raises `NeedMore(n)` (read at least n bytes and call again): local files and
hub range reads both grow their prefix until the header fits. Every count, length, dimension,
type and offset is checked before it is used (against the file size when known); any fault
raises `BadCheckpoint` with one line naming the file.

Example:
    >>> g = read_gguf("model-Q4_K_M.gguf")                        # doctest: +SKIP
    >>> g.metadata["general.architecture"], g.tensors[0].type_name  # doctest: +SKIP
    ('qwen3moe', 'Q4_K')
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from ..errors import BadCheckpoint

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_HEADER_BYTES = 1 << 30  # metadata + tensor infos; real files: a few MB (tokenizer arrays)

# ggml type id -> (name, elements per block, bytes per block)  (ggml.h / gguf-py GGML_QUANT_SIZES)
QK_K = 256
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", QK_K, 2 + 2 + QK_K // 16 + QK_K // 4), 11: ("Q3_K", QK_K, 2 + QK_K // 4 + QK_K // 8 + 12),
    12: ("Q4_K", QK_K, 2 + 2 + QK_K // 2 + 12), 13: ("Q5_K", QK_K, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    14: ("Q6_K", QK_K, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16), 15: ("Q8_K", QK_K, 4 + QK_K + QK_K // 8),
    16: ("IQ2_XXS", QK_K, 2 + QK_K // 4), 17: ("IQ2_XS", QK_K, 2 + QK_K // 4 + QK_K // 32),
    18: ("IQ3_XXS", QK_K, 2 + QK_K // 4 + QK_K // 8), 19: ("IQ1_S", QK_K, 2 + QK_K // 8 + QK_K // 16),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    22: ("IQ2_S", QK_K, 2 + QK_K // 4 + QK_K // 16), 23: ("IQ4_XS", QK_K, 2 + 2 + QK_K // 2 + QK_K // 64),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32), 30: ("BF16", 1, 2),
    34: ("TQ1_0", QK_K, 2 + 4 * 13), 35: ("TQ2_0", QK_K, 2 + 64), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}

# metadata value types: id -> struct format (scalars); 8 string, 9 array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class NeedMore(Exception):
    """The prefix ends inside the header: read at least `n` bytes and parse again. `estimate`:
    where the header probably ends (from the entries of the array or the tensor infos read so
    far), or 64 KB past `n` when nothing better is known."""

    def __init__(self, n: int, estimate: int = 0):
        super().__init__(n)
        self.n, self.estimate = n, max(n, estimate or n + 65536)


class GGUFTensor(NamedTuple):
    """One tensor info. `shape` is in PyTorch / numpy order (outermost first: ggml's dims reversed);
    `offset` is relative to the data section; `nbytes` follows from the type's block size."""

    name: str
    type_id: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFHeader:
    """A validated GGUF header. `data_start`: absolute offset of the data section in the file."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    data_start: int
    file_bytes: Optional[int]
    value_types: dict[str, int] = field(default_factory=dict)  # key -> GGUF value type (arrays: 9)

    @property
    def header_bytes(self) -> int:
        return self.data_start

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")


def tensor_nbytes(type_id: int, shape: tuple[int, ...], where: str = "", name: str = "") -> int:
    """Bytes of a tensor of this ggml type and (outermost first) shape; the innermost dimension
    must be a whole number of blocks."""
    _, block, size = GGML_TYPES[type_id]
    inner = shape[-1] if shape else 1
    if inner % block:
        raise BadCheckpoint(f"{where}: malformed GGUF: tensor {name!r}: innermost dimension {inner} is not a "
                            f"multiple of the {GGML_TYPES[type_id][0]} block size {block}")
    return math.prod(shape) // block * size


def read_gguf(path: str | os.PathLike) -> GGUFHeader:
    """Read and validate the header of a local .gguf file (reads only the header, growing the read)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            want = min(size, 1 << 20)
            buf = f.read(want)
            while True:
                try:
                    return parse_gguf(buf, size, path)
                except NeedMore as m:
                    want = min(size, max(m.estimate, 2 * len(buf)))
                    if want <= len(buf):  # cannot happen: parse_gguf checks sizes against the file
                        raise BadCheckpoint(f"{path}: malformed GGUF: header runs past the end of the file") from None
                    f.seek(len(buf))
                    buf += f.read(want - len(buf))
    except OSError as e:
        raise BadCheckpoint(f"{path}: cannot read ({e.strerror or e.__class__.__name__})") from None


class _Cursor:
    __slots__ = ("buf", "pos", "limit", "where")

    def __init__(self, buf: bytes, limit: Optional[int], where: str):
        self.buf, self.pos, self.limit, self.where = buf, 0, limit, where

    def need(self, n: int) -> None:
        end = self.pos + n
        if self.limit is not None and end > self.limit:
            raise BadCheckpoint(f"{self.where}: malformed GGUF: truncated (the header runs past the end of the "
                                f"file, {self.limit} bytes)")
        if end > MAX_HEADER_BYTES:
            raise BadCheckpoint(f"{self.where}: malformed GGUF: header larger than {MAX_HEADER_BYTES} bytes")
        if end > len(self.buf):
            raise NeedMore(end)

    def u32(self) -> int:
        self.need(4)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        self.need(8)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64()
        self.need(n)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadCheckpoint(f"{self.where}: malformed GGUF: {what} is not valid UTF-8") from None


def parse_gguf(buf: bytes, file_bytes: Optional[int], where: str) -> GGUFHeader:
    """Decode and validate a GGUF header from a prefix of the file (`file_bytes`: its full size,
    None if unknown). Raises NeedMore when the prefix is too short, BadCheckpoint on any fault."""
    c = _Cursor(buf, file_bytes, where)
    if len(buf) < 4 and (file_bytes is None or file_bytes >= 4):
        c.need(4)
    if buf[:4] != MAGIC:
        raise BadCheckpoint(f"{where}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    c.pos = 4
    version = c.u32()
    if version not in VERSIONS:
        hint = " (byte-swapped: a big-endian GGUF)" if version & 0xFFFF == 0 and version else ""
        raise BadCheckpoint(f"{where}: unsupported GGUF version {version}{hint}; moetool reads versions 2 and 3")
    n_tensors, n_kv = c.u64(), c.u64()
    room = (file_bytes if file_bytes is not None else MAX_HEADER_BYTES)
    # smallest metadata entry: key length (8) + type (4) + 1-byte value; tensor info: 8 + 4 + 8 + 4 + 8
    if n_kv * 13 > room or n_tensors * 32 > room:
        raise BadCheckpoint(f"{where}: malformed GGUF: {n_tensors} tensors / {n_kv} metadata entries cannot fit "
                            f"in {room} bytes")
    metadata: dict[str, Any] = {}
    types: dict[str, int] = {}
    for _ in range(n_kv):
        key = c.string("a metadata key")
        if key in metadata:
            raise BadCheckpoint(f"{where}: malformed GGUF: metadata key {key!r} appears twice")
        vtype = c.u32()
        metadata[key] = _value(c, vtype, key, top=True)
        types[key] = vtype
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise BadCheckpoint(f"{where}: malformed GGUF: general.alignment {alignment!r} is not a power of two")
    infos: list[GGUFTensor] = []
    infos_start = c.pos
    try:
        _tensor_infos(c, n_tensors, alignment, infos)
    except NeedMore as m:
        # Where the infos probably end: the rest at the average size of those read so far (a
        # remote reader fetches up to there, so it reads hardly any tensor data).
        avg = (c.pos - infos_start) / len(infos) if infos else 48
        raise NeedMore(m.n, int(c.pos + (n_tensors - len(infos)) * avg) + alignment) from None
    data_start = -(-c.pos // alignment) * alignment
    data_bytes = None if file_bytes is None else file_bytes - data_start
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in infos)
    prev_end, prev = 0, None
    for begin, end, name in spans:
        if begin < prev_end:
            raise BadCheckpoint(f"{where}: malformed GGUF: tensors {prev!r} and {name!r} overlap")
        prev_end, prev = end, name
    if data_bytes is not None and prev_end > data_bytes:
        last = spans[-1][2]
        raise BadCheckpoint(f"{where}: truncated GGUF: tensor {last!r} ends at byte {data_start + prev_end}, "
                            f"past the end of the file ({file_bytes} bytes)")
    return GGUFHeader(where, version, metadata, infos, data_start, file_bytes, types)


def _tensor_infos(c: _Cursor, n_tensors: int, alignment: int, infos: list[GGUFTensor]) -> None:
    """Decode the tensor infos into `infos`; `c.pos` moves only past whole infos."""
    where, buf = c.where, c.buf
    seen: set[str] = set()
    for _ in range(n_tensors):
        start = c.pos
        try:
            name = c.string("a tensor name")
            if name in seen:
                raise BadCheckpoint(f"{where}: malformed GGUF: tensor {name!r} appears twice")
            n_dims = c.u32()
            if not 1 <= n_dims <= MAX_DIMS:
                raise BadCheckpoint(f"{where}: malformed GGUF: tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
            c.need(8 * n_dims)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, c.pos)
            c.pos += 8 * n_dims
            if any(d == 0 or d >= 1 << 48 for d in dims) or math.prod(dims) >= 1 << 62:
                raise BadCheckpoint(f"{where}: malformed GGUF: tensor {name!r} has an absurd shape {list(dims)}")
            type_id = c.u32()
            if type_id not in GGML_TYPES:
                raise BadCheckpoint(f"{where}: malformed GGUF: tensor {name!r} has unknown ggml type {type_id}")
            offset = c.u64()
        except NeedMore:
            c.pos = start
            raise
        if offset % alignment:
            raise BadCheckpoint(f"{where}: malformed GGUF: tensor {name!r} offset {offset} is not aligned to {alignment}")
        seen.add(name)
        shape = tuple(reversed(dims))
        infos.append(GGUFTensor(name, type_id, shape, offset, tensor_nbytes(type_id, shape, where, name)))


def _value(c: _Cursor, vtype: int, key: str, top: bool = False) -> Any:
    fmt = _SCALARS.get(vtype)
    if fmt is not None:
        size = struct.calcsize(fmt)
        c.need(size)
        (v,) = struct.unpack_from(fmt, c.buf, c.pos)
        c.pos += size
        return v
    if vtype == _STRING:
        return c.string(f"metadata {key!r}")
    if vtype == _ARRAY and top:
        etype, n = c.u32(), c.u64()
        fmt = _SCALARS.get(etype)
        if fmt is not None:
            size = struct.calcsize(fmt)
            c.need(size * n)
            out = list(struct.unpack_from(f"<{n}{fmt[1]}", c.buf, c.pos))
            c.pos += size * n
            return out
        if etype == _STRING:
            c.need(8 * n)  # every string has at least its length
            out, start = [], c.pos
            try:
                for _ in range(n):
                    out.append(c.string(f"metadata {key!r}"))
            except NeedMore as m:  # estimate the array's end from its strings so far (plus 64 KB)
                avg = (c.pos - start) / len(out) if out else 16
                raise NeedMore(m.n, int(c.pos + (n - len(out)) * avg) + 65536) from None
            return out
        raise BadCheckpoint(f"{c.where}: malformed GGUF: metadata {key!r} is an array of unsupported type {etype}")
    raise BadCheckpoint(f"{c.where}: malformed GGUF: metadata {key!r} has unknown value type {vtype}")
