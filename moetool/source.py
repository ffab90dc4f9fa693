"""Resolve a MODEL argument to a `Checkpoint`: its config.json and, when there are safetensors
weights, the validated headers of every shard (never the weights themselves).

MODEL may be, in this order of precedence:
1. a local directory holding config.json and safetensors (one file, or shards with
   `model.safetensors.index.json`), or only config.json;
2. a path to a config.json file;
3. a path to a .safetensors file (config.json beside it);
4. the name of a sample config (`moetool count mixtral-8x7b`; see `sample_configs/`);
5. a Hugging Face repo id `org/name`: config.json through huggingface-hub (its cache, HF_TOKEN and
   HF_HUB_OFFLINE are honoured) and the safetensors headers through HTTP range requests.
A `.gguf` file (or any part of a split set) works like 3. without config.json, and on the hub as
`org/name:TAG` or `org/name/FILE.gguf` (moetool.gguf).

Pickle checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) are never opened: moetool never unpickles.

Example:
    >>> ckpt = resolve("mixtral-8x7b")
    >>> ckpt.config["model_type"], ckpt.tensors is None
    ('mixtral', True)
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import BadCheckpoint, BadConfig, MoetoolError
from .header import Header, TensorInfo, TensorStats, _IndexMismatch, read_header, scan_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONVERT_HINT = ("convert it to safetensors first, e.g. in Python: "
                "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)")


@dataclass
class Checkpoint:
    """A resolved MODEL. `tensors` is None when there are no safetensors weights to read."""

    source: str  # what the user passed
    kind: str  # "directory" | "config" | "safetensors" | "sample" | "hub" | "bundled"
    config: dict
    config_path: str
    root: Optional[str] = None  # local directory with the weights, when there are local weights
    tensors: Optional[dict[str, TensorInfo]] = None
    notes: list[str] = field(default_factory=list)
    _stats: Optional[TensorStats] = None
    gguf: Optional[object] = None  # a moetool.gguf.checkpoint.GGUFModel when the weights are GGUF

    @property
    def has_weights(self) -> bool:
        """Whether safetensors headers were read (as a full table or as a summary)."""
        return self.tensors is not None or self._stats is not None

    @property
    def stats(self) -> Optional[TensorStats]:
        """The headers summarised by name template (what `count` needs); None without weights."""
        if self._stats is None and self.tensors is not None:
            from .names import layer_span

            self._stats = TensorStats.of_tensors(self.tensors.values(), layer_span)
        return self._stats

    @property
    def bytes_stored(self) -> Optional[int]:
        """Bytes of tensor data in the safetensors files (headers excluded)."""
        return None if not self.has_weights else self.stats.bytes_stored


DEFAULT_NAME = "moetool-default"


def default_model_dir() -> Path:
    """The bundled default MoE checkpoint (trained by scripts/train_default_model.py)."""
    return Path(__file__).resolve().parent / "data" / "default"


def resolve(model: Optional[str], *, revision: Optional[str] = None, read_headers: bool = True,
            tensor_table: bool = True) -> Checkpoint:
    """Turn a MODEL argument into a Checkpoint (None: the bundled default model). Raises
    MoetoolError (one line) on bad input.

    Headers are always validated in full. `tensor_table=False` keeps only their summary
    (`Checkpoint.stats`, all that counting needs) instead of one entry per tensor: several times
    faster on checkpoints of many tensors, and shards are then scanned in parallel processes."""
    if model is None or model == DEFAULT_NAME:
        d = default_model_dir()
        if not (d / "config.json").is_file():
            raise MoetoolError(f"the bundled default model is missing from {d}; reinstall moetool")
        ckpt = _from_dir(DEFAULT_NAME, d, read_headers, tensor_table)
        ckpt.kind = "bundled"
        return ckpt
    if not model:
        raise MoetoolError("no MODEL given")
    path = Path(model).expanduser()
    if path.is_dir():
        return _from_dir(model, path, read_headers, tensor_table)
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".safetensors"):
            config_path = path.parent / "config.json"
            if not config_path.is_file():
                raise BadCheckpoint(f"{path}: no config.json beside it; moetool needs the model's config.json")
            ckpt = Checkpoint(model, "safetensors", _load_config(config_path), str(config_path), root=str(path.parent))
            if read_headers:
                _read(ckpt, [path], None, tensor_table)
            return ckpt
        if name.endswith(".gguf"):
            from .gguf.checkpoint import resolve_gguf

            return resolve_gguf(model, path, tensor_table, read_headers)
        if name.endswith(PICKLE_SUFFIXES):
            raise BadCheckpoint(f"{path}: pickle checkpoint; moetool never unpickles (it can run code): {CONVERT_HINT}")
        if name.endswith(".json"):
            return Checkpoint(model, "config", _load_config(path), str(path))
        raise BadCheckpoint(f"{path}: not a config.json, .safetensors, .gguf file or checkpoint directory")
    sample = sample_config_path(model)
    if sample is not None:
        return Checkpoint(model, "sample", _load_config(sample), str(sample))
    if not model.startswith((".", "/", "~")) and (":" in model or model.endswith(".gguf")):
        from .gguf import hub as gguf_hub  # org/name:TAG or org/name/FILE.gguf

        if gguf_hub.match(model):
            return gguf_hub.resolve_hub_gguf(model, revision=revision, tensor_table=tensor_table,
                                             read_headers=read_headers)
    if _REPO_ID.match(model) and not model.startswith((".", "/", "~")):
        from .hub import resolve_hub  # huggingface-hub is imported only for hub ids

        return resolve_hub(model, revision=revision, read_headers=read_headers)
    raise MoetoolError(
        f"{model}: no such file or directory, sample config or Hugging Face repo id; "
        f"samples: {', '.join(sample_names())}"
    )


def _from_dir(model: str, path: Path, read_headers: bool, tensor_table: bool = True) -> Checkpoint:
    config_path = path / "config.json"
    if not config_path.is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; for GGUF pass the file, e.g. {path / ggufs[0]}" if ggufs else ""
        raise BadCheckpoint(f"{path}: no config.json in this directory{hint}")
    ckpt = Checkpoint(model, "directory", _load_config(config_path), str(config_path), root=str(path))
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = load_index(index)
        shards = sorted(set(weight_map.values()))
        for s in shards:
            if not (path / s).is_file():
                raise BadCheckpoint(f"{index}: names shard {s!r}, which is missing from {path}")
        if read_headers:
            _read(ckpt, [path / s for s in shards], weight_map, tensor_table)
        return ckpt
    files = sorted(p for p in path.iterdir() if p.name.endswith(".safetensors") and p.is_file())
    if files:
        if read_headers:
            _read(ckpt, files, None, tensor_table)
        return ckpt
    pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles and not read_headers:  # --config-only: the pickles are never opened, config.json is enough
        ckpt.notes.append(f"only pickle weights here ({pickles[0]}), never opened: counts are from config.json alone")
        return ckpt
    if pickles:
        raise BadCheckpoint(
            f"{path}: holds only pickle weights ({pickles[0]}); moetool never unpickles: {CONVERT_HINT}; "
            f"or pass {config_path} to count from the config alone"
        )
    ckpt.notes.append("no safetensors weights found: counts are from config.json alone")
    return ckpt


def load_index(index: Path) -> dict[str, str]:
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: >4300-digit integers
        raise BadCheckpoint(f"{index}: not a valid safetensors index ({str(e).splitlines()[0][:100]})") from None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    # (JSON object keys are always strings; `map(type, ...)` checks the values at C speed.)
    if not isinstance(wm, dict) or not set(map(type, wm.values())) <= {str}:
        raise BadCheckpoint(f"{index}: 'weight_map' must map tensor names to shard file names")
    for shard in set(wm.values()):
        if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise BadCheckpoint(f"{index}: shard name {shard!r} is not a plain file name")
    return wm


def _read(ckpt: Checkpoint, files: list[Path], weight_map: Optional[dict[str, str]], tensor_table: bool) -> None:
    """Validate every shard's header; keep the full tensor table, or only its summary."""
    if tensor_table:
        _attach(ckpt, [read_header(f) for f in _progress(files, "reading headers")], weight_map)
        return
    try:
        ckpt._stats = scan_shards([str(f) for f in files], weight_map, ckpt.notes)
        unindexed = ckpt._stats.unindexed
        if len(set(unindexed)) != len(unindexed):
            raise _IndexMismatch("a tensor the index does not name is in two shards")
        if unindexed:
            ckpt.notes.append(_unindexed_note(unindexed))
    except _IndexMismatch:
        # A tensor in the wrong shard, missing or repeated: the full tables name it.
        _attach(ckpt, [read_header(f) for f in files], weight_map)
        raise AssertionError("the shard scan and the full tables disagree on the index")  # pragma: no cover


def scan_shards(paths: list[str], weight_map: Optional[dict[str, str]],
                notes: Optional[list[str]] = None) -> TensorStats:
    """`scan_header` over every shard, in parallel processes where that pays (Linux, 16 or more
    shards with an index, more than one CPU, no other thread in the process; MOETOOL_JOBS=N sets
    the number, 1 = in process). Without an index a repeated name must be seen across all shards,
    so they are scanned in this process."""
    from .names import layer_span

    jobs = _jobs(len(paths))
    if weight_map is None:
        names: set[str] = set()
        total = TensorStats()
        for p in _progress(paths, "reading headers"):
            total.merge(scan_header(p, layer_span, names=names))
        return total
    scan = _IndexedScan(weight_map, Counter(weight_map.values()), layer_span)
    if jobs <= 1:
        return scan(paths, progress=True)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    per = -(-len(paths) // (jobs * 4))
    chunks = [paths[i:i + per] for i in range(0, len(paths), per)]
    total = TensorStats()
    # Forked workers inherit `scan` (the index included) through the initializer's arguments: fork
    # passes them in memory, nothing is pickled but the chunks of paths and the small summaries.
    # A worker that dies (the out-of-memory killer) breaks the pool, which the executor reports
    # (a multiprocessing.Pool would wait for its result forever): then scan in this process.
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"), initializer=_set_worker_scan,
                               initargs=(scan,))
    try:
        # SIGINT and SIGTERM are blocked while the workers are forked (map submits every chunk at
        # once), so neither reaches a child before its initializer has set its handlers (Python
        # would print "Exception in initializer" or "... in _after_fork"); the parent gets them as
        # soon as the mask is restored.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            results = pool.map(_worker_scan, chunks)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for part in _progress(results, "reading headers", total=len(chunks)):
            total.merge(part)
    except BrokenProcessPool:
        if notes is not None:
            notes.append("a header-scan worker process died (out of memory?); the headers were scanned in one "
                         "process instead")
        return scan(paths, progress=True)
    except BaseException:  # a bad shard, Ctrl-C: stop the other workers now rather than wait for them
        import threading
        from concurrent.futures import InvalidStateError

        hook = threading.excepthook
        # CPython 3.11's executor can fail to mark already-cancelled futures broken while its
        # workers are stopped (InvalidStateError in its manager thread): teardown noise, not news.
        threading.excepthook = lambda a: None if issubclass(a.exc_type, (InvalidStateError, BrokenProcessPool)) \
            else hook(a)
        try:
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
        finally:
            threading.excepthook = hook
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return total


@dataclass
class _IndexedScan:
    """Scans shards against the index: each must hold exactly the tensors the index puts in it."""

    weight_map: dict[str, str]
    expected: Counter  # tensors per shard
    layer_span: object

    def __call__(self, paths: list[str], progress: bool = False) -> TensorStats:
        total = TensorStats()
        for p in _progress(paths, "reading headers") if progress else paths:
            shard = os.path.basename(p)
            total.merge(scan_header(p, self.layer_span, self.weight_map.get, shard, self.expected.get(shard, 0)))
        return total


_WORKER_SCAN: Optional[_IndexedScan] = None  # set in each forked worker


def _set_worker_scan(scan: _IndexedScan) -> None:
    import signal

    global _WORKER_SCAN
    _WORKER_SCAN = scan
    # Ctrl-C reaches the whole process group: only the parent reports it (one line). SIGTERM (the
    # pool's shutdown) ends a worker quietly, not through the CLI's SIGTERM handler.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # blocked by the parent while forking


def _worker_scan(paths: list[str]) -> TensorStats:
    return _WORKER_SCAN(paths)


def _jobs(n_files: int) -> int:
    env = os.environ.get("MOETOOL_JOBS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise MoetoolError(f"MOETOOL_JOBS={env!r}: expected a positive integer")
        return min(int(env), n_files, _cpu_count())  # more processes than CPUs only cost memory
    if n_files < 16 or sys.platform != "linux":
        return 1
    try:  # forking a process that runs other threads (even native ones) can deadlock the children
        if len(os.listdir("/proc/self/task")) > 1:
            return 1
    except OSError:
        return 1
    return max(1, min(_cpu_count(), 8, n_files // 8))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _attach(ckpt: Checkpoint, headers: list[Header], weight_map: Optional[dict[str, str]]) -> None:
    """Merge shard headers into one tensor table; check it against the index when there is one."""
    tensors: dict[str, TensorInfo] = {}
    for h in headers:
        for name, t in h.tensors.items():
            if name in tensors:
                raise BadCheckpoint(f"{h.path}: tensor {name!r} is also in {tensors[name].file}")
            tensors[name] = t
    if weight_map is not None:
        unindexed = [name for name in tensors if name not in weight_map]
        if unindexed:
            ckpt.notes.append(_unindexed_note(unindexed))
        path_of = {os.path.basename(h.path): h.path for h in headers}
        for name, shard in weight_map.items():
            t = tensors.get(name)
            if t is None:
                raise BadCheckpoint(f"index names tensor {name!r} in {shard}, but that shard's header does not hold it")
            if t.file != path_of.get(shard):
                raise BadCheckpoint(f"index puts tensor {name!r} in {shard}, but it is in {os.path.basename(t.file)}")
    ckpt.tensors = tensors


def _unindexed_note(names: list[str]) -> str:
    return (f"{len(names)} stored tensor(s) are not named in {INDEX_NAME} (e.g. {names[0]!r}): counted from "
            "the headers, but a loader that follows the index may skip them")


def _load_config(path: Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadConfig(f"{path}: cannot read ({e.__class__.__name__})") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, integers over 4300 digits
        raise BadConfig(f"{path}: not valid JSON ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(obj, dict):
        raise BadConfig(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def sample_dir() -> Optional[Path]:
    """`sample_configs/`: inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for d in (here / "sample_configs", here.parent / "sample_configs"):
        if d.is_dir():
            return d
    return None


def sample_names() -> list[str]:
    d = sample_dir()
    return sorted(p.stem for p in d.glob("*.json")) if d else []


def sample_config_path(name: str) -> Optional[Path]:
    d = sample_dir()
    if d is None or not re.fullmatch(r"[\w.-]+", name):
        return None
    p = d / (name[:-5] if name.endswith(".json") else name)
    p = p.with_name(p.name + ".json")
    return p if p.is_file() else None


def _progress(items, label: str, total: Optional[int] = None):
    """A progress bar on stderr for long header scans (many shards), silent otherwise."""
    if total is None:
        items = list(items)
        total = len(items)
    if total < 8 or not sys.stderr.isatty():
        return items
    from rich.progress import track

    from .render import stderr_console

    return track(items, description=label, total=total, console=stderr_console(), transient=True)
