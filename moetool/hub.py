"""Hugging Face Hub checkpoints, without downloading weights.

config.json and the safetensors index come through `hf_hub_download` (so the hub cache, HF_TOKEN,
HF_ENDPOINT and HF_HUB_OFFLINE behave as everywhere else). Each shard's header is read with an
HTTP range request (`Range: bytes=0-N`) streamed so that a server ignoring the range never sends
more than the header; headers are cached under the hub cache, per commit, so a later offline run
works. A shard that is already fully in the cache is read from disk.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from contextlib import contextmanager

from .errors import BadCheckpoint, MoetoolError
from .header import MAX_HEADER_BYTES, Header, header_length, parse_header
from .source import INDEX_NAME, Checkpoint, _attach, _load_config, _progress, load_index

FIRST_RANGE = 100_000  # one request covers the header of ~97% of safetensors files


@contextmanager
def hub_errors(where: str):
    """Turn huggingface-hub and network failures into one-line MoetoolErrors."""
    from huggingface_hub import errors as hf_errors

    try:
        yield
    except MoetoolError:
        raise
    except hf_errors.GatedRepoError:
        raise MoetoolError(f"{where}: gated repo; accept its terms on the hub and set HF_TOKEN") from None
    except hf_errors.RepositoryNotFoundError:
        raise MoetoolError(f"{where}: repository not found on the hub (or private: set HF_TOKEN)") from None
    except hf_errors.RevisionNotFoundError:
        raise MoetoolError(f"{where}: revision not found") from None
    except hf_errors.EntryNotFoundError:
        raise MoetoolError(f"{where}: the repo has no config.json (a GGUF repo? name the quantization: "
                           f"{where.split('@')[0]}:Q4_K_M, or the file: org/name/FILE.gguf)") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        raise MoetoolError(f"{where}: not in the local hub cache and the hub cannot be reached "
                           "(HF_HUB_OFFLINE is set, or no network)") from None
    except hf_errors.HfHubHTTPError as e:
        raise MoetoolError(f"{where}: hub request failed: {str(e).splitlines()[0][:160]}") from None
    except OSError as e:  # connection refused, DNS failure, timeouts
        raise MoetoolError(f"{where}: cannot reach the hub: {e.__class__.__name__}: {str(e)[:120]}") from None


def resolve_hub(repo_id: str, *, revision: Optional[str] = None, read_headers: bool = True) -> Checkpoint:
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    with hub_errors(where):
        config_path = hf_hub_download(repo_id, "config.json", revision=revision)
        ckpt = Checkpoint(repo_id, "hub", _load_config(Path(config_path)), config_path)
        commit = Path(config_path).parent.name  # snapshots/<commit>/config.json
        if not read_headers:
            return ckpt
        try:
            index_path = hf_hub_download(repo_id, INDEX_NAME, revision=revision)
            weight_map = load_index(Path(index_path))
            shards = sorted(set(weight_map.values()))
        except hf_errors.EntryNotFoundError:
            weight_map, shards = None, ["model.safetensors"]
        headers = []
        for shard in _progress(shards, "reading headers"):
            h = _shard_header(repo_id, shard, revision, commit)
            if h is None:
                if weight_map is None:
                    ckpt.notes.append(f"{where}: no model.safetensors on the hub: counts are from config.json alone")
                    return ckpt
                raise BadCheckpoint(f"{where}: {INDEX_NAME} names shard {shard!r}, which the repo does not have")
            headers.append(h)
        _attach(ckpt, headers, weight_map)
        return ckpt


def _cache_path(repo_id: str, commit: str, shard: str) -> Path:
    from huggingface_hub import constants

    safe = repo_id.replace("/", "--")
    return Path(constants.HF_HUB_CACHE) / "moetool-headers" / safe / commit / f"{shard}.header"


def _shard_header(repo_id: str, shard: str, revision: Optional[str], commit: str) -> Optional[Header]:
    """The validated header of one shard: from a fully cached file, our header cache, or a ranged GET.
    None when the hub says the file does not exist."""
    from huggingface_hub import constants, try_to_load_from_cache

    from .header import read_header

    where = f"{repo_id}/{shard}"
    cached = try_to_load_from_cache(repo_id, shard, revision=revision)
    if isinstance(cached, str) and os.path.isfile(cached):
        return read_header(cached)
    cache = _cache_path(repo_id, commit, shard)
    if cache.is_file():
        blob = cache.read_bytes()
        size = int.from_bytes(blob[:8], "little")
        return _parse(blob[8:16], blob[16:], size, where)
    if constants.HF_HUB_OFFLINE:
        raise MoetoolError(f"{where}: header not cached and HF_HUB_OFFLINE is set; run once online, "
                           "or pass the config.json to count from the config alone")
    fetched = _ranged_header(repo_id, shard, revision or commit, where)
    if fetched is None:
        return None
    prefix, rest, size = fetched
    header = _parse(prefix, rest, size, where)
    try:  # best effort: a read-only cache only costs a refetch next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_bytes(size.to_bytes(8, "little") + prefix + rest[: header.header_bytes])
        os.replace(tmp, cache)
    except OSError:
        pass
    return header


def _parse(prefix: bytes, rest: bytes, size: int, where: str) -> Header:
    n = header_length(prefix, size, where)
    if len(rest) < n:
        raise BadCheckpoint(f"{where}: truncated header: expected {n} bytes, got {len(rest)}")
    return parse_header(rest[:n], size, where)


def _ranged_header(repo_id: str, shard: str, revision: str, where: str):
    """-> (8-byte prefix, header bytes, file size) or None if the file is not there."""
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(repo_id, shard, revision=revision)
    headers = build_hf_headers()
    session = get_session()

    def fetch(start: int, end: int) -> tuple[bytes, Optional[int], int]:
        want = end - start + 1
        with session.stream("GET", url, headers={**headers, "Range": f"bytes={start}-{end}"}) as r:
            if r.status_code == 404:
                return b"", None, 404
            if r.status_code not in (200, 206):
                raise MoetoolError(f"{where}: hub answered HTTP {r.status_code} to a header request")
            size = _total_size(r)
            body = bytearray()
            skip = start if r.status_code == 200 else 0  # server ignored the range: skip, then stop early
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) >= skip + want:
                    break
            return bytes(body[skip: skip + want]), size, r.status_code

    first, size, status = fetch(0, FIRST_RANGE - 1)
    if status == 404:
        return None
    n = header_length(first[:8], size, where)
    if n > MAX_HEADER_BYTES:
        raise BadCheckpoint(f"{where}: header length {n} is implausibly large")
    rest = first[8:]
    if len(rest) < n:
        more, _, _ = fetch(len(first), 8 + n - 1)
        rest += more
    if size is None:
        raise BadCheckpoint(f"{where}: the hub did not say how large the file is (no Content-Range)")
    return first[:8], rest, size


def _total_size(r) -> Optional[int]:
    cr = r.headers.get("content-range")
    if cr:
        m = re.match(r"bytes \d+-\d+/(\d+)", cr)
        if m:
            return int(m.group(1))
    if r.status_code == 200 and r.headers.get("content-length"):
        return int(r.headers["content-length"])
    return None


def download_checkpoint(repo_id: str, revision: Optional[str] = None) -> str:
    """Download config, tokenizer and safetensors weights (never pickles) into the hub cache, with
    huggingface-hub's progress bars on stderr; returns the local snapshot directory."""
    from huggingface_hub import snapshot_download

    with hub_errors(f"{repo_id}" + (f"@{revision}" if revision else "")):
        return snapshot_download(repo_id, revision=revision,
                                 allow_patterns=["config.json", "tokenizer.json", "*.safetensors",
                                                 "model.safetensors.index.json"])
