"""Read and validate safetensors headers without touching tensor data.

A safetensors file is: 8 bytes (little-endian u64 N), N bytes of JSON, then the data buffer.
The JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the data buffer) plus an optional ``"__metadata__"`` dict of strings.

Nothing here is trusted before it is checked: the header length against the file size, every
dtype, shape and offset, the byte size implied by the shape against the offsets, and overlaps.
Any violation raises `BadCheckpoint` with one line naming the file and the fault.

Example:
    >>> from moetool.header import read_header
    >>> h = read_header("model.safetensors")          # doctest: +SKIP
    >>> h.tensors["lm_head.weight"].shape              # doctest: +SKIP
    (32000, 4096)
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple, Optional

from .errors import BadCheckpoint

# Bits per element of every dtype the safetensors format defines (0.6+ adds the sub-byte floats).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

# Headers of real checkpoints are a few MB at most (DeepSeek-V3 shards: ~100 KB). Refuse more
# than this before reading it, so a corrupt length never turns into a huge allocation.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class TensorInfo(NamedTuple):
    """One tensor as a header describes it. `nbytes` is end - begin in the data buffer.
    (A NamedTuple: DeepSeek-V3 has ~92k of them, built in the hot loop.)"""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    file: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: tensors by name, the free-form metadata, sizes."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_bytes: int
    file_bytes: int


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of a local .safetensors file (reads N + 8 bytes only)."""
    path = os.fspath(path)
    raw, size = _read_raw(path)
    return parse_header(raw, size, path)


def header_length(prefix: bytes, file_bytes: int | None, path: str) -> int:
    """Decode and bound the 8-byte length prefix. `file_bytes` None means unknown (remote)."""
    if len(prefix) < 8:
        raise BadCheckpoint(f"{path}: not a safetensors file: {len(prefix)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n == 0:
        raise BadCheckpoint(f"{path}: malformed safetensors header: header length is 0")
    if file_bytes is not None and n > file_bytes - 8:
        raise BadCheckpoint(
            f"{path}: malformed safetensors header: header length {n} is larger than the file ({file_bytes} bytes); "
            "the file is truncated or not safetensors"
        )
    if n > MAX_HEADER_BYTES:
        raise BadCheckpoint(f"{path}: malformed safetensors header: header length {n} exceeds {MAX_HEADER_BYTES} bytes")
    return n


def parse_header(raw: bytes, file_bytes: int | None, path: str) -> Header:
    """Validate the JSON header bytes. With `file_bytes` known, offsets are checked against it."""
    obj, metadata = _decode(raw, path)
    data_bytes = None if file_bytes is None else file_bytes - 8 - len(raw)
    new, info_cls = _new_info, TensorInfo
    tensors = {name: new(info_cls, (name, dtype, tuple(shape), begin, end, path))
               for name, dtype, shape, begin, end, _ in _valid_entries(obj, data_bytes, path)}
    _check_overlaps(sorted((t.begin, t.end, t.name) for t in tensors.values()), path, data_bytes)
    return Header(path=path, tensors=tensors, metadata=dict(metadata), header_bytes=len(raw),
                  file_bytes=file_bytes if file_bytes is not None else -1)


def _decode(raw: bytes, path: str) -> tuple[dict, dict]:
    """JSON header bytes -> (tensor entries, __metadata__), both still to be validated entry by entry.
    Like the safetensors library: a repeated key (two tensors of one name, a field given twice) and
    numbers that do not fit 64 bits are errors; `__metadata__` is absent, null or strings to strings."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, >4300 digits
        raise BadCheckpoint(f"{path}: malformed safetensors header: not valid JSON ({_short(e)})") from None
    if not isinstance(obj, dict):
        raise BadCheckpoint(f"{path}: malformed safetensors header: expected a JSON object, got {type(obj).__name__}")
    n = len(obj) - ("__metadata__" in obj)
    if raw.count(b'"data_offsets"') != n or raw.count(b'"dtype"') != n or raw.count(b'"shape"') != n:
        _check_duplicate_keys(raw, path)  # rare: the cheap count cannot rule out a repeated key
    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise BadCheckpoint(f"{path}: malformed safetensors header: __metadata__ must map strings to strings")
    return obj, metadata


def _check_duplicate_keys(raw: bytes, path: str) -> None:
    def pairs(items: list) -> dict:
        seen: set = set()
        for k, _ in items:
            if k in seen:
                what = "tensor name" if depth(items) else "key"
                raise BadCheckpoint(f"{path}: malformed safetensors header: {what} {k!r} appears twice")
            seen.add(k)
        return dict(items)

    def depth(items: list) -> bool:  # the top level holds the entries (objects with a dtype)
        return any(isinstance(v, dict) and "dtype" in v for _, v in items)

    json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)


def _valid_entries(obj: dict, data_bytes: int | None, path: str):
    """Yield (name, dtype, shape list, begin, end, numel) of every entry, in order, raising at the
    first invalid one. The common, valid case runs in one tight block (92k times for DeepSeek-V3);
    anything unusual goes to `_check_entry`, which raises the precise error."""
    limit = data_bytes if data_bytes is not None else float("inf")
    bits_of = DTYPE_BITS.get
    for name, entry in obj.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            bits = bits_of(dtype)
            if bits and type(shape) is list and len(shape) <= 16 and type(begin) is int and type(end) is int \
                    and 0 <= begin <= end <= limit:
                numel = 1
                for d in shape:
                    if type(d) is not int or not 0 <= d <= _U64:
                        break
                    numel *= d
                    if numel > _U64:
                        break
                else:
                    if numel * bits == 8 * (end - begin) and numel * bits <= _U64:
                        yield name, dtype, shape, begin, end, numel
                        continue
        except (TypeError, KeyError, ValueError, IndexError):
            pass
        t = _check_entry(name, entry, data_bytes, path)  # raises: the fast block accepts all it would
        yield name, t.dtype, list(t.shape), t.begin, t.end, t.numel  # pragma: no cover


_U64 = 2 ** 64 - 1  # the safetensors library's sizes are 64-bit: larger shapes overflow it


def _check_overlaps(spans: list, path: str, data_bytes: int | None = None) -> None:
    """`spans`: sorted (begin, end, name) of every tensor. As in the safetensors library, the
    tensors must tile the data buffer: no two share bytes, no gap between them, and (when the
    file's size is known) nothing after the last one."""
    at, last = 0, None
    for b, e, n in spans:
        if b < at:
            raise BadCheckpoint(f"{path}: malformed safetensors header: tensors {last!r} and {n!r} overlap")
        if b > at:
            after = f"after tensor {last!r}" if last is not None else "at the start of the data"
            raise BadCheckpoint(f"{path}: malformed safetensors header: bytes {at}-{b} {after} belong to no tensor "
                                f"(before {n!r}); the safetensors library refuses such a file")
        at, last = e, n
    if data_bytes is not None and at != data_bytes:
        raise BadCheckpoint(f"{path}: malformed safetensors header: {data_bytes - at} bytes after the last tensor "
                            "belong to no tensor (trailing data); the safetensors library refuses such a file")


def _check_entry(name: str, entry: object, data_bytes: int | None, path: str) -> TensorInfo:
    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]  # type: ignore[index]
    except (TypeError, KeyError, IndexError):
        raise BadCheckpoint(f"{path}: malformed safetensors header: tensor {name!r}: entry must be an object with "
                            "dtype, shape and data_offsets") from None
    bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        raise BadCheckpoint(f"{path}: malformed safetensors header: tensor {name!r}: unknown dtype {dtype!r}")
    numel = 1
    if type(shape) is not list or len(shape) > 16:
        numel = -1
    else:
        for d in shape:
            if type(d) is not int or d < 0:
                numel = -1
                break
            numel = numel * d if d <= _U64 else _U64 + 1
            if numel > _U64:
                break
    if numel < 0:
        raise BadCheckpoint(f"{path}: malformed safetensors header: tensor {name!r}: shape must be a list of "
                            f"non-negative integers, got {shape!r}")
    if numel > _U64 or numel * bits > _U64:
        raise BadCheckpoint(f"{path}: malformed safetensors header: tensor {name!r}: shape {shape} is too large "
                            "(its size overflows 64 bits)")
    if numel * bits % 8:
        raise BadCheckpoint(f"{path}: malformed safetensors header: tensor {name!r}: {numel} elements of {dtype} "
                            "do not fill whole bytes")
    if type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int or type(offsets[1]) is not int \
            or not 0 <= offsets[0] <= offsets[1]:
        raise BadCheckpoint(f"{path}: malformed safetensors header: tensor {name!r}: data_offsets must be "
                            f"[begin, end] with 0 <= begin <= end, got {offsets!r}")
    begin, end = offsets
    if data_bytes is not None and end > data_bytes:
        raise BadCheckpoint(f"{path}: malformed safetensors header: tensor {name!r}: data_offsets end {end} is past "
                            f"the end of the data ({data_bytes} bytes); the file is truncated")
    expected = (numel * bits + 7) // 8
    if expected != end - begin:
        raise BadCheckpoint(f"{path}: malformed safetensors header: tensor {name!r}: shape {shape} of {dtype} needs "
                            f"{expected} bytes but data_offsets span {end - begin}")
    return _new_info(TensorInfo, (name, dtype, tuple(shape), begin, end, path))


_new_info = tuple.__new__  # skips NamedTuple's keyword handling in the hot loop


# --- summaries: validate without building a tensor table --------------------------------------

_ZERO_DIGITS = bytes.maketrans(b"123456789", b"000000000")


def name_template(name: str) -> str:
    """`name` with every ASCII digit turned into 0: names of one tensor across layers and experts
    share it. (Through bytes: str.translate with a table is ~8x slower, and this runs per tensor.)"""
    try:
        return name.encode().translate(_ZERO_DIGITS).decode()
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800") round-trips this way
        return name.encode("utf-8", "surrogatepass").translate(_ZERO_DIGITS).decode("utf-8", "surrogatepass")


@dataclass
class TensorStats:
    """Validated safetensors headers summarised by name template, for counting without a tensor
    table (DeepSeek-V3's 92k tensors fold into ~2k rows).

    `rows` maps (template, dtype, layer digits) to [tensors, elements, bytes, example name], where
    the template is the name with its digits zeroed (`name_template`) and the layer digits are the
    name's characters at `layer_span(template)` (None when it has no layer). Every name of a row
    classifies like its example: name rules never depend on a digit's value, only on the layer's.
    """

    rows: dict[tuple[str, str, Optional[str]], list] = field(default_factory=dict)
    unindexed: list[str] = field(default_factory=list)  # stored tensors the shard index does not name

    @classmethod
    def of_tensors(cls, tensors: Iterable[TensorInfo], layer_span: Callable[[str], Optional[tuple[int, int]]]):
        """Summarise an already parsed tensor table (the same rows `scan_header` builds)."""
        out = cls()
        rows = out.rows
        for t in tensors:
            template = name_template(t.name)
            span = layer_span(template)
            key = (template, t.dtype, None if span is None else t.name[span[0]:span[1]])
            row = rows.get(key)
            if row is None:
                row = rows[key] = [0, 0, 0, t.name]
            row[0] += 1
            row[1] += math.prod(t.shape)
            row[2] += t.end - t.begin
        return out

    def merge(self, other: "TensorStats") -> None:
        rows = self.rows
        for key, (n, elements, nbytes, example) in other.rows.items():
            row = rows.get(key)
            if row is None:
                rows[key] = [n, elements, nbytes, example]
            else:
                row[0] += n
                row[1] += elements
                row[2] += nbytes
        self.unindexed += other.unindexed

    @property
    def num_tensors(self) -> int:
        return sum(r[0] for r in self.rows.values())

    @property
    def bytes_stored(self) -> int:
        return sum(r[2] for r in self.rows.values())

    def bytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, dtype, _), row in self.rows.items():
            out[dtype] = out.get(dtype, 0) + row[2]
        return dict(sorted(out.items()))


def scan_header(path: str, layer_span: Callable[[str], Optional[tuple[int, int]]],
                owner: Optional[Callable[[str], Optional[str]]] = None, shard: Optional[str] = None,
                expected: Optional[int] = None, names: Optional[set] = None) -> TensorStats:
    """Read and validate one file's header as `read_header` does (the same checks, in the same
    order, so the same one-line errors), but fold it into a `TensorStats` instead of building one
    object per tensor (the count path: DeepSeek-V3 has 92k tensors).

    With an index, `owner(name)` must be `shard` or None (not in the index: listed in `unindexed`)
    for every tensor, and `expected` tensors must be named; without one, names are added to `names`
    and a repeat is an error (`_IndexMismatch`: the caller re-reads the full tables to name it).
    """
    raw, size = _read_raw(path)
    obj, _ = _decode(raw, path)
    stats = TensorStats()
    rows, spans_of, zero = stats.rows, {}, _ZERO_DIGITS
    spans = []
    for name, dtype, shape, begin, end, numel in _valid_entries(obj, size - 8 - len(raw), path):
        spans.append((begin, end))
        try:
            template = name.encode().translate(zero).decode()  # = name_template(name), inlined
        except UnicodeEncodeError:
            template = name_template(name)
        span = spans_of.get(template, spans_of)
        if span is spans_of:
            span = spans_of[template] = layer_span(template)
        key = (template, dtype, None if span is None else name[span[0]:span[1]])
        row = rows.get(key)
        if row is None:
            rows[key] = [1, numel, end - begin, name]
        else:
            row[0] += 1
            row[1] += numel
            row[2] += end - begin
    spans.sort()
    data_bytes = size - 8 - len(raw)
    if (spans[-1][1] if spans else 0) != data_bytes or (spans and spans[0][0] != 0) \
            or not all(b1 == e0 for (_, e0), (b1, _) in zip(spans, spans[1:])):
        parse_header(raw, size, path)  # names the overlapping tensors, the gap or the trailing bytes
    if owner is not None:
        owners = set(map(owner, obj))
        if None in owners:  # in the shard, not in the index: counted, and reported by the caller
            stats.unindexed = [k for k in obj if owner(k) is None]
        if owners - {shard, None} or len(obj) - len(stats.unindexed) != expected:
            raise _IndexMismatch(path)
    elif names is not None:
        before = len(names)
        names.update(obj)
        if len(names) != before + len(obj):
            raise _IndexMismatch(path)
    return stats


def _read_raw(path: str) -> tuple[bytes, int]:
    """(header bytes, file size), the length prefix checked."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = header_length(f.read(8), size, path)
            raw = f.read(n)
    except FileNotFoundError:
        raise BadCheckpoint(f"{path}: file not found") from None
    except IsADirectoryError:
        raise BadCheckpoint(f"{path}: is a directory, expected a .safetensors file") from None
    except PermissionError:
        raise BadCheckpoint(f"{path}: permission denied") from None
    if len(raw) != n:
        raise BadCheckpoint(f"{path}: truncated header: expected {n} bytes, file ends after {len(raw)}")
    return raw, size


class _IndexMismatch(Exception):
    """A shard's tensors disagree with the index (or repeat another shard's): the caller re-reads
    the full tables to name the tensor in its error message."""


def _short(e: Exception) -> str:
    s = str(e).splitlines()[0] if str(e) else type(e).__name__
    return s[:120]
