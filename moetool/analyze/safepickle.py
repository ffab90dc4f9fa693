"""Read a `torch.save` file without unpickling it.

A `.pt` file is a zip archive: `<root>/data.pkl` (a pickle that describes the objects) and
`<root>/data/<key>` (the raw bytes of each tensor storage). `pickle.load` / `torch.load` would
*execute* the pickle: import whatever module it names and call whatever it says. This module never
does. It walks the pickle's opcodes with `pickletools.genops` (a parser: nothing is imported or
called) and interprets a small allow-list itself:

- containers and scalars: dict, list, tuple, str, bytes, int, float, bool, None;
- `collections.OrderedDict` (built as a plain dict);
- tensors: `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` over a persistent
  `('storage', torch.<Type>Storage, key, location, numel)` record, read from `data/<key>` into a
  numpy array.

Anything else, any other global (`os.system`, `builtins.eval`, ...), any other opcode that could
call or import, is refused with `UnsafePickle` before any object is built from it. Example:

    >>> obj = load_torch_file("expert_distribution_recorder_1.pt")   # doctest: +SKIP
    >>> obj["records"][0]["topk_ids_of_layer"].shape                  # doctest: +SKIP
    (61, 512, 8)
"""

from __future__ import annotations

import pickletools
import zipfile
from typing import Any

import numpy as np

from ..errors import MoetoolError


class UnsafePickle(MoetoolError):
    """The pickle asks for something outside the allow-list; nothing was executed."""


# torch storage class name -> numpy dtype of its elements
_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_REBUILD_TENSOR = ("torch._utils", "_rebuild_tensor_v2")
_ORDERED_DICT = ("collections", "OrderedDict")
_MAX_PICKLE = 256 << 20  # a routing dump's object description, not its data: far below this


class _Mark:
    pass


_MARK = _Mark()


class _Global:
    """A name the pickle referenced; only ever compared against the allow-list, never imported."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"


class _StorageRef:
    def __init__(self, dtype, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel


def _allowed_global(module: str, name: str) -> _Global:
    if (module, name) in (_REBUILD_TENSOR, _ORDERED_DICT) or (module == "torch" and name in _STORAGES):
        return _Global(module, name)
    raise UnsafePickle(f"refused: the file asks for {module}.{name}, which moetool never imports or calls "
                       "(only tensors, dicts, lists and numbers are read)")


def load_torch_file(path: str) -> Any:
    """The object tree of a `torch.save` zip file, tensors as numpy arrays, without executing it."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise MoetoolError(f"{path}: not a torch.save zip archive ({e}); legacy (non-zip) torch files are refused "
                           "because reading them means unpickling") from None
    with zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise MoetoolError(f"{path}: zip archive without data.pkl: not a torch.save file")
        root = pkl[: -len("data.pkl")]
        info = zf.getinfo(pkl)
        if info.file_size > _MAX_PICKLE:
            raise MoetoolError(f"{path}: data.pkl is {info.file_size} bytes, implausibly large")
        try:
            data = zf.read(pkl)
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise MoetoolError(f"{path}: cannot read data.pkl ({e})") from None

        def storage_bytes(key: str) -> bytes:
            name = f"{root}data/{key}"
            if name not in names:
                raise MoetoolError(f"{path}: tensor storage {key!r} is missing from the archive")
            try:
                return zf.read(name)
            except (OSError, zipfile.BadZipFile, EOFError) as e:
                raise MoetoolError(f"{path}: cannot read tensor storage {key!r} ({e})") from None

        return _interpret(data, storage_bytes, path)


def _interpret(data: bytes, storage_bytes, path: str) -> Any:
    stack: list = []
    memo: dict = {}
    storages: dict[str, np.ndarray] = {}

    def pop_mark() -> list:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1:]
                del stack[i:]
                return items
        raise MoetoolError(f"{path}: malformed pickle (no MARK)")

    def rebuild(args: tuple) -> np.ndarray:
        if len(args) < 4 or not isinstance(args[0], _StorageRef):
            raise UnsafePickle(f"{path}: unexpected arguments to a tensor rebuild")
        ref, offset, size, stride = args[0], args[1], tuple(args[2]), tuple(args[3])
        if ref.key not in storages:
            raw = storage_bytes(ref.key)
            itemsize = np.dtype(ref.dtype).itemsize
            if len(raw) < ref.numel * itemsize:
                raise MoetoolError(f"{path}: tensor storage {ref.key!r} is truncated")
            storages[ref.key] = np.frombuffer(raw, dtype=ref.dtype, count=ref.numel)
        flat = storages[ref.key]
        if not all(isinstance(x, int) and x >= 0 for x in (offset, *size, *stride)):
            raise MoetoolError(f"{path}: malformed tensor shape")
        if size:
            last = offset + sum((s - 1) * st for s, st in zip(size, stride)) if all(size) else offset
            if last >= len(flat) and all(size):
                raise MoetoolError(f"{path}: tensor reaches past its storage")
        itemsize = flat.itemsize
        return np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                               strides=tuple(s * itemsize for s in stride)).copy()

    try:
        ops = list(pickletools.genops(data))
    except Exception as e:  # the parser's own errors: malformed bytes, never executed
        raise MoetoolError(f"{path}: malformed pickle in data.pkl ({e})") from None
    for op, arg, _pos in ops:
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            if len(stack) != 1:
                raise MoetoolError(f"{path}: malformed pickle (stack of {len(stack)} at STOP)")
            return stack[0]
        if name == "MARK":
            stack.append(_MARK)
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("NONE",):
            stack.append(None)
        elif name == "NEWTRUE":
            stack.append(True)
        elif name == "NEWFALSE":
            stack.append(False)
        elif name in ("BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG", "BINFLOAT", "FLOAT",
                      "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BINSTRING",
                      "SHORT_BINSTRING", "STRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"):
            stack.append(arg)
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            if len(stack) < n:
                raise MoetoolError(f"{path}: malformed pickle")
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name == "LIST":
            stack.append(pop_mark())
        elif name == "DICT":
            items = pop_mark()
            stack.append(dict(zip(items[0::2], items[1::2])))
        elif name == "APPEND":
            v = stack.pop()
            _container(stack, list, path).append(v)
        elif name == "APPENDS":
            items = pop_mark()
            _container(stack, list, path).extend(items)
        elif name == "SETITEM":
            v, k = stack.pop(), stack.pop()
            _container(stack, dict, path)[_key(k, path)] = v
        elif name == "SETITEMS":
            items = pop_mark()
            d = _container(stack, dict, path)
            for k, v in zip(items[0::2], items[1::2]):
                d[_key(k, path)] = v
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            if arg not in memo:
                raise MoetoolError(f"{path}: malformed pickle (memo {arg} unset)")
            stack.append(memo[arg])
        elif name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            stack.append(_allowed_global(module, attr))
        elif name == "STACK_GLOBAL":
            attr, module = stack.pop(), stack.pop()
            if not isinstance(module, str) or not isinstance(attr, str):
                raise UnsafePickle(f"{path}: refused: a computed global name")
            stack.append(_allowed_global(module, attr))
        elif name == "BINPERSID":
            pid = stack.pop()
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Global)
                    and pid[1].module == "torch" and pid[1].name in _STORAGES and isinstance(pid[2], str)
                    and isinstance(pid[4], int) and pid[4] >= 0):
                raise UnsafePickle(f"{path}: refused: unknown persistent object {pid!r}")
            stack.append(_StorageRef(_STORAGES[pid[1].name], pid[2], pid[4]))
        elif name == "REDUCE":
            args, fn = stack.pop(), stack.pop()
            if not isinstance(fn, _Global) or not isinstance(args, tuple):
                raise UnsafePickle(f"{path}: refused: a call to {fn!r}")
            if (fn.module, fn.name) == _REBUILD_TENSOR:
                stack.append(rebuild(args))
            elif (fn.module, fn.name) == _ORDERED_DICT:
                stack.append(dict(args[0]) if args else {})
            else:
                raise UnsafePickle(f"{path}: refused: a call to {fn!r}")
        elif name == "BUILD":
            state = stack.pop()
            if not isinstance(stack[-1], dict) or not (state is None or (isinstance(state, dict) and not state)):
                raise UnsafePickle(f"{path}: refused: object state for {type(stack[-1]).__name__}")
        else:
            raise UnsafePickle(f"{path}: refused: pickle opcode {name} is outside what moetool reads")
    raise MoetoolError(f"{path}: malformed pickle (no STOP)")


def _container(stack: list, kind, path: str):
    if not stack or not isinstance(stack[-1], kind):
        raise MoetoolError(f"{path}: malformed pickle")
    return stack[-1]


def _key(k, path: str):
    if isinstance(k, (str, int, float, bool, tuple)) or k is None:
        return k
    raise MoetoolError(f"{path}: malformed pickle (unhashable dict key)")
