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


DEFAULT_TIMEOUT = 10.0  # seconds to connect, and between bytes read; MOETOOL_HUB_TIMEOUT overrides


def hub_timeout() -> float:
    """Connect / read timeout of every hub request, from MOETOOL_HUB_TIMEOUT (seconds)."""
    env = os.environ.get("MOETOOL_HUB_TIMEOUT", "").strip()
    if not env:
        return DEFAULT_TIMEOUT
    try:
        t = float(env)
    except ValueError:
        t = -1.0
    if not 0 < t < 1e6:
        raise MoetoolError(f"MOETOOL_HUB_TIMEOUT={env!r}: expected a positive number of seconds")
    return t


def _use_timeout(t: float) -> None:
    """huggingface-hub reads its download timeout at call time; its HEAD timeout is passed per call.
    Its retry and resume log lines are silenced: a failure is reported once, by hub_errors."""
    from huggingface_hub import constants
    from huggingface_hub.utils import logging as hf_logging

    constants.HF_HUB_DOWNLOAD_TIMEOUT = t
    constants.HF_HUB_ETAG_TIMEOUT = t
    hf_logging.set_verbosity_error()


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def transport_message(e: BaseException) -> Optional[str]:
    """What went wrong on the wire, in one line, for an exception (or its causes) raised by a hub
    request; None when it is not a transport failure. Classes are matched by name: the HTTP
    library is httpx (or its fork httpx2), whichever huggingface-hub uses."""
    from huggingface_hub import constants

    host = constants.ENDPOINT
    for x in _chain(e):
        name, text = type(x).__name__, str(x)
        if name == "OfflineModeIsEnabled":  # not a failure of the wire: HF_HUB_OFFLINE is set
            return None
        status = getattr(getattr(x, "response", None), "status_code", None)
        if name.endswith("Timeout") or isinstance(x, TimeoutError):
            return (f"the hub ({host}) did not answer within {hub_timeout():g} s "
                    "(set MOETOOL_HUB_TIMEOUT=SECONDS to wait longer)")
        if name == "TooManyRedirects":
            return f"the hub ({host}) redirected in a loop (too many redirects)"
        if name in ("RemoteProtocolError", "ReadError", "IncompleteRead") or "incomplete" in text.lower() \
                or "without sending complete message body" in text:
            return f"the connection to the hub ({host}) broke before the whole response arrived (truncated)"
        if name == "ConnectError" or isinstance(x, ConnectionError):
            low = text.lower()
            if any(k in low for k in ("name or service not known", "nodename nor servname", "name resolution",
                                      "getaddrinfo", "no address associated")):
                return f"cannot resolve the hub's host name ({host}): DNS failure or no network"
            if "refused" in low:
                return f"connection refused by {host}: nothing listens there (check HF_ENDPOINT or the network)"
            return f"cannot connect to the hub ({host}): {text.splitlines()[0][:120] if text else name}"
        if status == 429:
            return "the hub is rate-limiting requests (HTTP 429); wait and retry, or set HF_TOKEN"
        if isinstance(status, int) and status >= 500:
            return f"the hub answered HTTP {status} (a server error); retry later"
    return None


@contextmanager
def hub_errors(where: str):
    """Turn huggingface-hub and network failures into one-line MoetoolErrors, each with its own
    true cause (an unreachable hub is never "the repo has no config.json")."""
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
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as e:
        # (LocalEntryNotFoundError subclasses EntryNotFoundError: it must come first.)
        cause = transport_message(e)
        if cause:
            raise MoetoolError(f"{where}: {cause}") from None
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise MoetoolError(f"{where}: not in the local hub cache, and HF_HUB_OFFLINE is set (no downloads); "
                               "run once online or unset HF_HUB_OFFLINE") from None
        raise MoetoolError(f"{where}: not in the local hub cache and the hub cannot be reached") from None
    except hf_errors.EntryNotFoundError:
        raise MoetoolError(f"{where}: the repo has no config.json (a GGUF repo? name the quantization: "
                           f"{where.split('@')[0]}:Q4_K_M, or the file: org/name/FILE.gguf)") from None
    except Exception as e:
        cause = transport_message(e)
        if cause:
            raise MoetoolError(f"{where}: {cause}") from None
        if isinstance(e, hf_errors.HfHubHTTPError):
            raise MoetoolError(f"{where}: hub request failed: {str(e).splitlines()[0][:160]}") from None
        if isinstance(e, OSError):
            raise MoetoolError(f"{where}: cannot reach the hub: {e.__class__.__name__}: {str(e)[:120]}") from None
        raise


def _probe(repo_id: str, filename: str, revision: Optional[str]) -> None:
    """One HEAD request, no retries, before huggingface-hub's own (which retries five times with
    back-off and a log line each, ~25 s, when the hub is down): a transport failure is reported at
    once. Skipped offline and when the file is already cached (the cache is then used as is)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str):
        return
    get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), timeout=hub_timeout())


def resolve_hub(repo_id: str, *, revision: Optional[str] = None, read_headers: bool = True) -> Checkpoint:
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    timeout = hub_timeout()
    _use_timeout(timeout)
    with hub_errors(where):
        _probe(repo_id, "config.json", revision)
        config_path = hf_hub_download(repo_id, "config.json", revision=revision, etag_timeout=timeout)
        ckpt = Checkpoint(repo_id, "hub", _load_config(Path(config_path)), config_path)
        commit = Path(config_path).parent.name  # snapshots/<commit>/config.json
        if not re.fullmatch(r"[0-9a-f]{40}", commit):  # it names cache folders and revisions below
            raise MoetoolError(f"{where}: the hub sent a malformed commit id ({commit[:60]!r} in X-Repo-Commit); "
                               "a broken server or proxy")
        if not read_headers:
            return ckpt
        try:
            index_path = hf_hub_download(repo_id, INDEX_NAME, revision=revision, etag_timeout=timeout)
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
        try:
            blob = cache.read_bytes()
            size = int.from_bytes(blob[:8], "little")
            return _parse(blob[8:16], blob[16:], size, where)
        except (OSError, BadCheckpoint):
            # A corrupt cache entry (a crash mid-write, a disk error, an edit) must not break the repo
            # for good: drop it and fetch the header again.
            try:
                cache.unlink()
            except OSError:
                pass
            if constants.HF_HUB_OFFLINE:
                raise MoetoolError(f"{where}: the cached header is corrupt ({cache}) and HF_HUB_OFFLINE is set; "
                                   "run once online to fetch it again") from None
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


def range_fetcher(url: str, where: str):
    """fetch(start, end) -> (the bytes start..end, the file's size or None, HTTP status), one GET
    with a Range header and the hub timeout; a server that ignores the range is read only as far
    as needed. A 404 gives (b"", None, 404); other failures one line. Used for safetensors and GGUF
    headers alike."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers()
    session = get_session()

    def fetch(start: int, end: int) -> tuple[bytes, Optional[int], int]:
        want = end - start + 1
        with session.stream("GET", url, headers={**headers, "Range": f"bytes={start}-{end}"},
                            timeout=hub_timeout()) as r:
            if r.status_code == 404:
                return b"", None, 404
            if r.status_code not in (200, 206):
                raise MoetoolError(f"{where}: hub answered HTTP {r.status_code} to a header request")
            size = _total_size(r, where)
            body = bytearray()
            skip = start if r.status_code == 200 else 0  # server ignored the range: skip, then stop early
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) >= skip + want:
                    break
            return bytes(body[skip: skip + want]), size, r.status_code

    return fetch


def _ranged_header(repo_id: str, shard: str, revision: str, where: str):
    """-> (8-byte prefix, header bytes, file size) or None if the file is not there."""
    from huggingface_hub import hf_hub_url

    fetch = range_fetcher(hf_hub_url(repo_id, shard, revision=revision), where)
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


MAX_FILE_BYTES = 1 << 50  # 1 PiB: no safetensors shard is larger; a bigger "size" is a broken server


def _total_size(r, where: str) -> Optional[int]:
    cr = r.headers.get("content-range")
    size = None
    if cr:
        m = re.fullmatch(r"\s*bytes (\d+)-(\d+)/(\d+)\s*", cr)
        if not m or int(m.group(1)) > int(m.group(2)):
            raise MoetoolError(f"{where}: the hub sent a malformed Content-Range header: {cr[:80]!r}")
        size = int(m.group(3))
        if int(m.group(2)) >= size:
            raise MoetoolError(f"{where}: the hub sent an inconsistent Content-Range header: {cr[:80]!r}")
    elif r.status_code == 200 and r.headers.get("content-length", "").strip().isdigit():
        size = int(r.headers["content-length"])
    if size is not None and size > MAX_FILE_BYTES:
        raise MoetoolError(f"{where}: the hub claims the file is {size} bytes, which no safetensors file is "
                           "(a broken server or proxy)")
    return size


def download_checkpoint(repo_id: str, revision: Optional[str] = None) -> str:
    """Download what `trace` runs into the hub cache: config.json, tokenizer.json and the
    safetensors shards the index names (or model.safetensors without an index): never second
    copies such as `original/` or `consolidated.safetensors`, never pickles. Says how much it
    will download, on stderr, before it starts. Returns the local snapshot directory."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub import errors as hf_errors

    from .render import human_bytes, info

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    _use_timeout(hub_timeout())
    with hub_errors(where):
        _probe(repo_id, "config.json", revision)
        config_path = hf_hub_download(repo_id, "config.json", revision=revision)
        root = os.path.dirname(config_path)
        try:
            index_path = hf_hub_download(repo_id, INDEX_NAME, revision=revision)
            shards = sorted(set(load_index(Path(index_path)).values()))
        except hf_errors.LocalEntryNotFoundError:
            raise  # offline and not cached: not "the repo has no index"
        except hf_errors.EntryNotFoundError:
            shards = ["model.safetensors"]
        missing = [f for f in shards if not isinstance(try_to_load_from_cache(repo_id, f, revision=revision), str)]
        if missing:
            sizes = []
            for f in missing:
                try:
                    sizes.append(get_hf_file_metadata(hf_hub_url(repo_id, f, revision=revision)).size or 0)
                except hf_errors.LocalEntryNotFoundError:
                    raise
                except hf_errors.EntryNotFoundError:
                    raise BadCheckpoint(f"{where}: no {f} on the hub (trace needs safetensors weights)") from None
            cached = len(shards) - len(missing)
            info(f"{where}: downloading {len(missing)} safetensors file{'s' if len(missing) != 1 else ''} "
                 f"({human_bytes(sum(sizes))}) into the hub cache" + (f"; {cached} already there" if cached else ""))
        for f in shards:
            try:
                hf_hub_download(repo_id, f, revision=revision)
            except hf_errors.LocalEntryNotFoundError:
                raise
            except hf_errors.EntryNotFoundError:
                raise BadCheckpoint(f"{where}: no {f} on the hub (trace needs safetensors weights)") from None
        try:
            hf_hub_download(repo_id, "tokenizer.json", revision=revision)
        except hf_errors.LocalEntryNotFoundError:
            pass  # offline without it cached: trace then asks for --tokens
        except hf_errors.EntryNotFoundError:
            pass  # trace then asks for --tokens
    return root
