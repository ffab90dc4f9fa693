"""GGUF files on the Hugging Face Hub, read by HTTP range requests: the header (metadata and
tensor infos) only, never the tensor data.

MODEL forms: `org/name/path/file.gguf` (any part of a split set names the set) or `org/name:TAG`
(llama.cpp's `-hf` form: the repo's .gguf file(s) whose name holds TAG, e.g. `:Q4_K_M`).

The first request asks for 64 KB; while the header runs on, the next asks for what is missing, up
to where the current string array (tokenizer vocabularies) or the tensor infos are estimated to
end from the average size of their entries so far (64 KB more elsewhere). A server that ignores
ranges is read as a stream and dropped as soon as the header is in. Headers are cached per commit under the hub cache (`moetool-gguf/`), with the
revision -> commit ref and the repo's file list, so a later run works offline.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from ..errors import BadCheckpoint, MoetoolError
from .checkpoint import SPLIT, attach, config_of, model_from_headers
from .reader import GGUFHeader, NeedMore, parse_gguf

FIRST_RANGE = 64 * 1024
HUB_GGUF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<tag>[\w.-]+)|/(?P<file>(?:[\w.-]+/)*[\w.-]+\.gguf))$")


def match(model: str) -> Optional[re.Match]:
    """The MODEL argument as a hub GGUF reference, or None."""
    return HUB_GGUF.match(model)


def resolve_hub_gguf(model: str, *, revision: Optional[str] = None, tensor_table: bool = True,
                     read_headers: bool = True):
    from ..hub import hub_errors
    from ..source import Checkpoint

    m = HUB_GGUF.match(model)
    repo, tag, file = m.group("repo"), m.group("tag"), m.group("file")
    where = model + (f"@{revision}" if revision else "")
    with hub_errors(where):
        commit, files = _listing(repo, revision, where)
        chosen = _choose(files, tag, file, where)
        headers = [_header(repo, f, commit, where) for f in chosen]
    gm = model_from_headers(headers, where)
    ckpt = Checkpoint(model, "gguf", config_of(gm, where), f"{repo}/{chosen[0]}")
    if read_headers:
        attach(ckpt, gm, tensor_table)
    return ckpt


def _cache_root(repo: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / "moetool-gguf" / repo.replace("/", "--")


def _write(path: Path, data: bytes) -> None:
    try:  # best effort: a read-only cache only costs a refetch next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        pass


def _listing(repo: str, revision: Optional[str], where: str) -> tuple[str, list[str]]:
    """-> (commit, the repo's .gguf files), from the hub or, offline, from the cache."""
    from huggingface_hub import HfApi, constants

    rev = revision or "main"
    ref = _cache_root(repo) / "refs" / rev.replace("/", "--")
    if constants.HF_HUB_OFFLINE:
        if not ref.is_file():
            raise MoetoolError(f"{where}: GGUF listing not cached and HF_HUB_OFFLINE is set; run once online")
        obj = json.loads(ref.read_text())
        return obj["commit"], obj["files"]
    info = HfApi().model_info(repo, revision=rev)
    files = sorted(s.rfilename for s in (info.siblings or []) if s.rfilename.endswith(".gguf"))
    commit = info.sha or rev
    _write(ref, json.dumps({"commit": commit, "files": files}).encode())
    return commit, files


def _choose(files: list[str], tag: Optional[str], file: Optional[str], where: str) -> list[str]:
    """The file(s) of the model: the named file (with its split siblings) or the ones matching TAG."""
    if file is not None:
        if file not in files:
            raise MoetoolError(f"{where}: the repo has no file {file!r}" + (f" (GGUF files: {', '.join(files[:6])})"
                                                                              if files else " and no .gguf files"))
        sm = SPLIT.match(file)
        if sm is None:
            return [file]
        n = int(sm.group("n"))
        parts = [f"{sm.group('stem')}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
        missing = [p for p in parts if p not in files]
        if missing:
            raise MoetoolError(f"{where}: split GGUF part {missing[0]!r} is not in the repo")
        return parts
    models = [f for f in files if "mmproj" not in f.lower() and tag.lower() in f.lower()
              and (SPLIT.match(f) is None or SPLIT.match(f).group("i") == "00001")]
    if not models:
        raise MoetoolError(f"{where}: no .gguf file in the repo matches {tag!r}"
                           + (f" (GGUF files: {', '.join(files[:6])})" if files else ""))
    if len(models) > 1:
        raise MoetoolError(f"{where}: {len(models)} .gguf files match {tag!r} ({', '.join(models[:4])}); "
                           "name one: org/name/FILE.gguf")
    return _choose(files, None, models[0], where)


def _header(repo: str, file: str, commit: str, where: str) -> GGUFHeader:
    """One file's validated header: a fully downloaded file in the hub cache, our header cache, or
    range requests."""
    from huggingface_hub import constants, try_to_load_from_cache

    from .reader import read_gguf

    name = f"{repo}/{file}"
    cached = try_to_load_from_cache(repo, file, revision=commit)
    if isinstance(cached, str) and os.path.isfile(cached):
        return read_gguf(cached)
    cache = _cache_root(repo) / commit / (file.replace("/", "--") + ".header")
    if cache.is_file():
        blob = cache.read_bytes()
        return parse_gguf(blob[8:], int.from_bytes(blob[:8], "little"), name)
    if constants.HF_HUB_OFFLINE:
        raise MoetoolError(f"{name}: GGUF header not cached and HF_HUB_OFFLINE is set; run once online")
    buf, size = _ranged(repo, file, commit, name)
    header = parse_gguf(buf, size, name)
    _write(cache, size.to_bytes(8, "little") + buf[: header.data_start])
    return header


def _ranged(repo: str, file: str, commit: str, where: str) -> tuple[bytes, int]:
    """The header bytes by growing range requests -> (bytes from offset 0, file size)."""
    from huggingface_hub import hf_hub_url

    from ..hub import range_fetcher

    fetch = range_fetcher(hf_hub_url(repo, file, revision=commit), where)
    buf, size, status = fetch(0, FIRST_RANGE - 1)
    if status == 404:
        raise MoetoolError(f"{where}: not found on the hub")
    if size is None:
        raise BadCheckpoint(f"{where}: the hub did not say how large the file is (no Content-Range)")
    while True:
        try:
            parse_gguf(buf, size, where)
            return buf, size
        except NeedMore as m:
            want = min(size, m.estimate)
            more, _, _ = fetch(len(buf), want - 1)
            if not more:
                raise BadCheckpoint(f"{where}: the hub sent no bytes for range {len(buf)}-{want - 1}") from None
            buf += more
