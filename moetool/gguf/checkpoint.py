"""A GGUF file (or a split set `-0000i-of-0000n.gguf`) as a `Checkpoint`: config.json made from the
metadata (`arch.gguf_config`), one `TensorInfo` per tensor under its transformers name (dtype: the
ggml type name, shape: the logical shape, begin/end: absolute byte offsets in the file), so that
`count`, its cross-check and the forward pass treat it like safetensors.

Example:
    >>> ckpt = resolve_gguf("Qwen3-30B-A3B-Q4_K_M.gguf")          # doctest: +SKIP
    >>> ckpt.config["model_type"], ckpt.stats.bytes_by_dtype()    # doctest: +SKIP
    ('qwen3_moe', {'F32': ..., 'Q4_K': ..., 'Q6_K': ...})
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import BadCheckpoint
from ..header import TensorInfo
from .arch import PERMUTED_QK, cross_check, gguf_config, hf_name
from .reader import GGUFHeader, GGUFTensor, read_gguf

SPLIT = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


@dataclass
class GGUFModel:
    """The headers of a GGUF model's files and its tensors by transformers name."""

    headers: list[GGUFHeader]
    tensors: dict[str, tuple[GGUFTensor, GGUFHeader]]  # transformers name -> (tensor info, its file)
    architecture: str
    permuted_qk: bool  # q/k rows permuted by the converter (llama): the weight store undoes it

    @property
    def metadata(self) -> dict:
        return self.headers[0].metadata


def split_files(path: Path) -> list[Path]:
    """All files of a split GGUF given any one of them (the one file otherwise)."""
    m = SPLIT.match(path.name)
    if m is None:
        return [path]
    n = int(m.group("n"))
    if n < 1 or not 1 <= int(m.group("i")) <= n:
        raise BadCheckpoint(f"{path}: split GGUF name says part {m.group('i')} of {m.group('n')}")
    files = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    for f in files:
        if not f.is_file():
            raise BadCheckpoint(f"{path}: split GGUF part {f.name} is missing")
    return files


def model_from_headers(headers: list[GGUFHeader], where: str) -> GGUFModel:
    """Check a set of headers forms one model (split metadata, no tensor twice) and name its tensors."""
    first = headers[0]
    arch = first.architecture
    n = first.metadata.get("split.count")
    if n is not None and n != len(headers):
        raise BadCheckpoint(f"{where}: split.count = {n} but {len(headers)} file(s) were given")
    total = first.metadata.get("split.tensors.count")
    tensors: dict[str, tuple[GGUFTensor, GGUFHeader]] = {}
    seen: dict[str, str] = {}
    for i, h in enumerate(headers):
        if len(headers) > 1 and h.metadata.get("split.no", i) != i:
            raise BadCheckpoint(f"{h.path}: split.no = {h.metadata.get('split.no')!r}, expected {i}")
        for t in h.tensors:
            if t.name in seen:
                raise BadCheckpoint(f"{h.path}: tensor {t.name!r} is also in {seen[t.name]}")
            seen[t.name] = h.path
            name = hf_name(t.name, arch)
            if name in tensors:  # two GGUF names mapping to one transformers name: keep both visible
                name = t.name
            tensors[name] = (t, h)
    if total is not None and total != len(seen):
        raise BadCheckpoint(f"{where}: split.tensors.count = {total} but the files hold {len(seen)} tensors")
    return GGUFModel(headers, tensors, arch, arch in PERMUTED_QK)


def attach(ckpt, model: GGUFModel, tensor_table: bool = True) -> None:
    """Fill a Checkpoint from a GGUF model: config, tensor table (or its summary), notes."""
    from ..header import TensorStats
    from ..names import layer_span

    infos = {name: TensorInfo(name, t.type_name, t.shape, h.data_start + t.offset,
                              h.data_start + t.offset + t.nbytes, h.path)
             for name, (t, h) in model.tensors.items()}
    ckpt.gguf = model
    if tensor_table:
        ckpt.tensors = infos
    else:
        ckpt._stats = TensorStats.of_tensors(infos.values(), layer_span)
    shapes = {t.name: t.shape for h in model.headers for t in h.tensors}
    ckpt.notes.extend(cross_check(model.metadata, shapes, ckpt.source))
    ckpt.notes.append(storage_note(bytes_by_group(ckpt.config, infos.values())))


def bytes_by_group(config: dict, infos) -> dict[str, dict[str, int]]:
    """Exact stored bytes per parameter group (names.py's groups) and ggml type."""
    from ..names import classify_tuple

    layers = config.get("num_hidden_layers")
    tied = bool(config.get("tie_word_embeddings"))
    out: dict[str, dict[str, int]] = {}
    for t in infos:
        group = classify_tuple(t.name, t.dtype, layers, 0, tied, 4, False)[0]
        by_type = out.setdefault(group, {})
        by_type[t.dtype] = by_type.get(t.dtype, 0) + t.end - t.begin
    return out


def storage_note(groups: dict[str, dict[str, int]]) -> str:
    """One line: stored bytes per group, largest first, with the ggml types used."""
    parts = sorted(groups.items(), key=lambda kv: -sum(kv[1].values()))
    text = "; ".join(f"{g.replace('_', ' ')} {sum(b.values()) / 1e9:.3g} GB ({', '.join(sorted(b))})" for g, b in parts)
    return f"GGUF bytes by group: {text}"


def config_of(model: GGUFModel, where: str) -> dict:
    shapes = {t.name: t.shape for h in model.headers for t in h.tensors}
    return gguf_config(model.metadata, shapes, where)


def resolve_gguf(source: str, path: Path, tensor_table: bool = True, read_headers: bool = True):
    """A local .gguf file (any part of a split set) -> Checkpoint (kind "gguf"). The headers are
    always read (the config comes from them); `read_headers=False` keeps only the config."""
    from ..source import Checkpoint

    files = split_files(path)
    headers = [read_gguf(f) for f in files]
    model = model_from_headers(headers, str(path))
    ckpt = Checkpoint(source, "gguf", config_of(model, str(path)), str(files[0]), root=str(path.parent))
    if read_headers:
        attach(ckpt, model, tensor_table)
    else:
        ckpt.notes.append("GGUF tensors not used: counts are from the metadata alone")
    return ckpt


def tokenizer_path(ckpt) -> Optional[str]:
    """tokenizer.json beside a local GGUF, if any."""
    if ckpt.root and os.path.isfile(os.path.join(ckpt.root, "tokenizer.json")):
        return os.path.join(ckpt.root, "tokenizer.json")
    return None
