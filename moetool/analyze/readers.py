"""Readers for routing recorded by serving and training engines, into one `Recording`.

Each reader knows one engine's layout (docs/analyze.md gives the source of each):

| format         | what it is                                                             | holds           |
|----------------|------------------------------------------------------------------------|-----------------|
| `vllm`         | vLLM returned routed experts: int [tokens, layers, k] as .npy or JSON  | every choice    |
| `sglang`       | SGLang `meta_info.routed_experts`: base64 int32 [tokens, layers, k]    | every choice    |
| `sglang-pt`    | SGLang expert-distribution recorder dump (per_token mode, `.pt`)       | every choice    |
| `router-jsonl` | router trace JSONL: {layer, batch_id/request_id, topk_experts[, topk_weights]} per line | every choice |
| `trtllm`       | TensorRT-LLM expert statistics: meta_info.json + rank{r}.safetensors   | loads only      |
| `imatrix`      | llama.cpp imatrix.gguf: per-expert `.counts` of the `*_exps` tensors   | loads only      |
| `csv`          | long table, one row per (sequence, token, layer, slot): moetool's own  | every choice    |
|                | `trace --format csv`, and tracers that write the same columns          |                 |

A reader returns raw layer ids; `resolve_layers` maps them onto the model's MoE layers (the
model gives E, k and the layer map). Formats are detected from content, not only the name.
Nothing is unpickled (`.pt` goes through `safepickle`), JSON numbers are bounded, and a wrong or
truncated file is one `BadRecording` line.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import MoetoolError

FORMATS = ("vllm", "sglang", "sglang-pt", "router-jsonl", "trtllm", "imatrix", "csv")
MAX_TEXT_BYTES = 2 << 30  # JSON / CSV recordings read into memory: refuse past 2 GiB


class BadRecording(MoetoolError):
    """The routing recording is malformed, truncated, or does not fit the model."""


@dataclass
class Sequence:
    """One request / prompt: `experts` [T, L, k] (best first where the engine keeps the order)."""

    experts: np.ndarray
    weights: Optional[np.ndarray] = None
    token_ids: Optional[list[int]] = None


@dataclass
class Recording:
    """What a reader found. Either `sequences` (every routing choice) or `loads` [L, E] (counts
    of (token, slot) assignments per expert only). `layer_ids` name the L recorded layers;
    `layer_kind` says how: "moe" (positions among the MoE layers), "model" (decoder layer
    indices, dense layers possibly included), or "either" (resolved against the model)."""

    format: str
    layer_ids: list[int]
    layer_kind: str
    sequences: list[Sequence] = field(default_factory=list)
    loads: Optional[np.ndarray] = None
    notes: list[str] = field(default_factory=list)
    k: Optional[int] = None  # slots per token as recorded (sglang-pt pads to 8 with -1)
    # SGLang: (int32 ids, tokens or None, output ids) per response, reshaped once the model's layer
    # count is known (analyze._expand_flat)
    flat: Optional[list] = None


# --- detection ------------------------------------------------------------------------------------

def detect(path: str) -> str:
    """The format of `path`, from its content (and, for directories, the files in it)."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "meta_info.json")) and any(
                n.startswith("rank") and n.endswith(".safetensors") for n in os.listdir(path)):
            return "trtllm"
        raise BadRecording(f"{path}: a directory, but not a TensorRT-LLM expert-statistics dump "
                           "(meta_info.json + rank*.safetensors)")
    head = _head(path, 8)
    if head[:4] == b"GGUF":
        return "imatrix"
    if head[:4] == b"PK\x03\x04":
        return "sglang-pt"
    if head[:6] == b"\x93NUMPY":
        return "vllm"
    if os.path.basename(path) == "meta_info.json":
        return "trtllm"
    text = _read_text(path)
    stripped = text.lstrip()
    if not stripped:
        raise BadRecording(f"{path}: empty file")
    if stripped[0] in "[{":
        first_line = stripped.split("\n", 1)[0]
        try:
            json.loads(stripped)
            whole = True
        except RecursionError:
            raise BadRecording(f"{path}: JSON nested too deeply") from None
        except ValueError:
            whole = False
        if not whole:
            first = _json(first_line, f"{path} line 1")
            if isinstance(first, dict) and "topk_experts" in first:
                return "router-jsonl"
            if isinstance(first, dict) and "meta_info" in first:
                return "sglang"
            if isinstance(first, dict) and "routed_experts" in first:
                return "vllm"
            raise BadRecording(f"{path}: JSON Lines, but not a known routing recording (line 1 has none of "
                               "topk_experts, meta_info.routed_experts, routed_experts)")
        obj = json.loads(stripped)
        item = obj[0] if isinstance(obj, list) and obj else obj
        if isinstance(item, dict) and "meta_info" in item:
            return "sglang"
        if isinstance(item, dict) and "topk_experts" in item:
            return "router-jsonl"
        return "vllm"
    first = stripped.split("\n", 1)[0].lower()
    if "layer" in first and "expert" in first and "," in first:
        return "csv"
    raise BadRecording(f"{path}: cannot tell which engine wrote this file; name it with --format "
                       f"({', '.join(FORMATS)})")


def read(path: str, fmt: str = "auto") -> Recording:
    fmt = detect(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise BadRecording(f"--format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    reader = {"vllm": read_vllm, "sglang": read_sglang, "sglang-pt": read_sglang_pt,
              "router-jsonl": read_router_jsonl, "trtllm": read_trtllm, "imatrix": read_imatrix,
              "csv": read_csv}[fmt]
    return reader(path)


# --- helpers ---------------------------------------------------------------------------------------

def _head(path: str, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise BadRecording(f"{path}: cannot read ({e.strerror or e})") from None


def _read_text(path: str) -> str:
    from ..files import read_text_bounded

    return read_text_bounded(path, "routing recording", MAX_TEXT_BYTES)


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise BadRecording(f"{where}: JSON nested too deeply") from None
    except ValueError as e:
        raise BadRecording(f"{where}: invalid JSON ({str(e)[:120]})") from None


def _json_items(text: str, path: str) -> list:
    """A JSON document (a list of items, or one item) or JSON Lines (one item per line)."""
    try:
        obj = _json(text, path)
    except BadRecording:
        return [_json(line, f"{path} line {i}") for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    return obj if isinstance(obj, list) else [obj]


def _int_array(obj, where: str, ndim: int) -> np.ndarray:
    try:
        a = np.asarray(obj)
    except (ValueError, OverflowError) as e:
        raise BadRecording(f"{where}: not a rectangular array of integers ({e})") from None
    if a.ndim != ndim or a.dtype.kind not in "iu":
        raise BadRecording(f"{where}: expected a {ndim}-d integer array, got shape {a.shape} of {a.dtype}")
    return a.astype(np.int64)


# --- vLLM ------------------------------------------------------------------------------------------

def read_vllm(path: str) -> Recording:
    """vLLM `routed_experts` (engine flag `enable_return_routed_experts`): per request an int16
    array [tokens, moe_layers, k]. Accepted: a .npy of that array (or [requests, tokens, L, k]),
    a JSON array of it, a JSON object with `routed_experts`, a list of such objects, or JSON
    Lines of objects (one request per line)."""
    if _head(path, 6) == b"\x93NUMPY":
        try:
            a = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise BadRecording(f"{path}: unreadable .npy ({e}) (object arrays are refused: no pickle)") from None
        if a.dtype.kind not in "iu":
            raise BadRecording(f"{path}: routed experts must be integers, got {a.dtype}")
        if a.ndim == 3:
            seqs = [a]
        elif a.ndim == 4:
            seqs = list(a)
        else:
            raise BadRecording(f"{path}: expected [tokens, layers, k] (or [requests, tokens, layers, k]), got {a.shape}")
        sequences = [Sequence(np.asarray(s, dtype=np.int64)) for s in seqs]
    else:
        items = _json_items(_read_text(path), path)
        if items and not isinstance(items[0], dict):  # a bare [tokens, layers, k] array: one request
            items = [items]
        sequences = []
        for i, item in enumerate(items):
            where = f"{path} request {i}"
            arr = item.get("routed_experts") if isinstance(item, dict) else item
            if arr is None:
                raise BadRecording(f"{where}: no routed_experts")
            ids = item.get("prompt_token_ids") if isinstance(item, dict) else None
            sequences.append(Sequence(_int_array(arr, where, 3), token_ids=ids))
    if not sequences:
        raise BadRecording(f"{path}: no requests")
    L = {s.experts.shape[1] for s in sequences}
    if len(L) != 1:
        raise BadRecording(f"{path}: requests disagree on the number of layers ({sorted(L)})")
    n = L.pop()
    return Recording("vllm", list(range(n)), "moe_or_model", sequences, k=sequences[0].experts.shape[2])


# --- SGLang ----------------------------------------------------------------------------------------

def read_sglang(path: str) -> Recording:
    """SGLang responses with `meta_info.routed_experts` (server flag `--enable-return-routed-experts`,
    request field `return_routed_experts`): base64 of int32 [tokens, layers, k], little-endian.
    Accepted: one response object, a JSON list of them, or JSON Lines. `layers` is resolved with
    the model (the MoE layers, or every decoder layer), using the response's token counts when the
    array length alone is ambiguous."""
    items = _json_items(_read_text(path), path)
    raw = []
    for i, item in enumerate(items):
        where = f"{path} response {i}"
        meta = item.get("meta_info") if isinstance(item, dict) else None
        b64 = meta.get("routed_experts") if isinstance(meta, dict) else None
        if not isinstance(b64, str):
            raise BadRecording(f"{where}: no meta_info.routed_experts (base64 string)")
        try:
            buf = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRecording(f"{where}: routed_experts is not valid base64 ({e})") from None
        if len(buf) % 4:
            raise BadRecording(f"{where}: routed_experts has {len(buf)} bytes, not a whole number of int32")
        ids = np.frombuffer(buf, dtype="<i4").astype(np.int64)
        tokens = None
        if isinstance(meta.get("prompt_tokens"), int) and isinstance(meta.get("completion_tokens"), int):
            tokens = meta["prompt_tokens"] + meta["completion_tokens"]
        raw.append((ids, tokens, item.get("output_ids") if isinstance(item, dict) else None))
    if not raw:
        raise BadRecording(f"{path}: no responses")
    # the [tokens, layers, k] reshape needs the layer count: resolved later against the model
    return Recording("sglang", [], "flat", flat=raw)


def read_sglang_pt(path: str) -> Recording:
    """SGLang expert-distribution recorder dump (`--expert-distribution-recorder-mode per_token`,
    `/dump_expert_distribution_record`): `records[i].topk_ids_of_layer` int32 [layers, tokens, 8]
    of *physical* expert ids (-1 where unused), mapped to logical experts with
    `last_physical_to_logical_map` [layers, physical]. Read without unpickling (safepickle)."""
    from .safepickle import load_torch_file

    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise BadRecording(f"{path}: expected the recorder's dict")
    if "logical_count" in obj:  # stat mode: counts only
        lc = np.asarray(obj["logical_count"])
        if lc.ndim == 2:
            lc = lc[None]
        if lc.ndim != 3:
            raise BadRecording(f"{path}: logical_count must be [steps, layers, experts], got {lc.shape}")
        return Recording("sglang-pt", list(range(lc.shape[1])), "model", loads=lc.sum(axis=0).astype(np.int64),
                         notes=["SGLang stat-mode dump: per-expert counts only (no co-activation, reuse or transitions)"])
    records = obj.get("records")
    if not isinstance(records, list) or not records:
        raise BadRecording(f"{path}: no `records` (is this a per_token-mode recorder dump?)")
    p2l = obj.get("last_physical_to_logical_map")
    sequences = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("topk_ids_of_layer"), np.ndarray):
            raise BadRecording(f"{path}: record {i} has no topk_ids_of_layer tensor")
        t = r["topk_ids_of_layer"].astype(np.int64)  # [L, T, 8]
        if t.ndim != 3:
            raise BadRecording(f"{path}: record {i}: topk_ids_of_layer must be [layers, tokens, slots]")
        if isinstance(p2l, np.ndarray):
            if p2l.ndim != 2 or p2l.shape[0] != t.shape[0]:
                raise BadRecording(f"{path}: last_physical_to_logical_map {p2l.shape} does not fit {t.shape}")
            valid = t >= 0
            if (t[valid] >= p2l.shape[1]).any():
                raise BadRecording(f"{path}: record {i}: physical expert id past the map's {p2l.shape[1]}")
            logical = np.where(valid, np.take_along_axis(p2l.astype(np.int64), np.where(valid, t, 0).reshape(
                t.shape[0], -1), axis=1).reshape(t.shape), -1)
            t = logical
        ids = r.get("input_ids") if isinstance(r.get("input_ids"), list) else None
        sequences.append(Sequence(np.ascontiguousarray(t.transpose(1, 0, 2)), token_ids=ids))
    rec = Recording("sglang-pt", list(range(sequences[0].experts.shape[1])), "model", sequences,
                    notes=["SGLang records one forward pass each (a batch, possibly several requests): token "
                           "reuse and transitions are measured within a forward pass"])
    return rec


# --- router trace JSONL ----------------------------------------------------------------------------

def read_router_jsonl(path: str) -> Recording:
    """Router trace JSONL (Megatron-style routing dumps): one line per (batch, layer) with
    `layer`, `batch_id` (or `request_id`), `topk_experts` [tokens][k] and optional `topk_weights`."""
    text = _read_text(path)
    per_batch: dict = {}
    layers: set[int] = set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        d = _json(line, f"{path} line {n}")
        if not isinstance(d, dict) or "topk_experts" not in d or not isinstance(d.get("layer"), int):
            raise BadRecording(f"{path} line {n}: expected an object with integer `layer` and `topk_experts`")
        batch = d.get("request_id", d.get("batch_id", 0))
        if not isinstance(batch, (int, str)):
            raise BadRecording(f"{path} line {n}: batch_id / request_id must be an integer or a string")
        e = _int_array(d["topk_experts"], f"{path} line {n}: topk_experts", 2)
        w = None
        if d.get("topk_weights") is not None:
            try:
                w = np.asarray(d["topk_weights"], dtype=np.float64)
            except (ValueError, TypeError):
                raise BadRecording(f"{path} line {n}: topk_weights is not a numeric array") from None
            if w.shape != e.shape:
                raise BadRecording(f"{path} line {n}: topk_weights {w.shape} does not match topk_experts {e.shape}")
        slot = per_batch.setdefault(batch, {})
        if d["layer"] in slot:
            raise BadRecording(f"{path} line {n}: layer {d['layer']} of batch {batch!r} appears twice")
        slot[d["layer"]] = (e, w)
        layers.add(d["layer"])
    if not per_batch:
        raise BadRecording(f"{path}: no lines")
    order = sorted(layers)
    sequences = []
    for batch, by_layer in per_batch.items():
        missing = [l for l in order if l not in by_layer]
        if missing:
            raise BadRecording(f"{path}: batch {batch!r} has no line for layer(s) {missing[:5]}")
        T = {by_layer[l][0].shape for l in order}
        if len(T) != 1:
            raise BadRecording(f"{path}: batch {batch!r}: layers disagree on [tokens, k] ({sorted(T)})")
        experts = np.stack([by_layer[l][0] for l in order], axis=1)
        ws = [by_layer[l][1] for l in order]
        weights = np.stack(ws, axis=1) if all(w is not None for w in ws) else None
        sequences.append(Sequence(experts, weights))
    return Recording("router-jsonl", order, "either", sequences, k=sequences[0].experts.shape[2])


# --- TensorRT-LLM ----------------------------------------------------------------------------------

def read_trtllm(path: str) -> Recording:
    """TensorRT-LLM expert statistics (EXPERT_STATISTIC_ITER_RANGE / EXPERT_STATISTIC_PATH):
    `meta_info.json` {num_experts, num_experts_per_token} and `rank{r}.safetensors` holding one
    int tensor [E] per `"{iteration}_{layer}"`: the bincount of the selected experts. Summed over
    iterations and ranks (each rank counts its own tokens)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    d = path if os.path.isdir(path) else os.path.dirname(path) or "."
    meta = _json(_read_text(os.path.join(d, "meta_info.json")), os.path.join(d, "meta_info.json"))
    if not isinstance(meta, dict) or not isinstance(meta.get("num_experts"), int):
        raise BadRecording(f"{d}/meta_info.json: needs integer num_experts")
    E = meta["num_experts"]
    ranks = sorted(n for n in os.listdir(d) if n.startswith("rank") and n.endswith(".safetensors"))
    if not ranks:
        raise BadRecording(f"{d}: no rank*.safetensors")
    loads: dict[int, np.ndarray] = {}
    for name in ranks:
        p = os.path.join(d, name)
        try:
            tensors = load_file(p)
        except (SafetensorError, OSError, ValueError) as e:
            raise BadRecording(f"{p}: unreadable safetensors ({e})") from None
        for key, t in tensors.items():
            it, sep, layer = key.partition("_")
            if not sep or not it.isdigit() or not layer.isdigit():
                raise BadRecording(f"{p}: tensor {key!r} is not named iteration_layer")
            if t.shape != (E,) or t.dtype.kind not in "iu":
                raise BadRecording(f"{p}: {key} must be {E} integer counts, got {t.shape} {t.dtype}")
            loads[int(layer)] = loads.get(int(layer), 0) + t.astype(np.int64)
    order = sorted(loads)
    rec = Recording("trtllm", order, "either", loads=np.stack([loads[l] for l in order]),
                    notes=["TensorRT-LLM expert statistics hold per-expert counts only (no co-activation, reuse "
                           "or transitions)"])
    rec.k = meta.get("num_experts_per_token") if isinstance(meta.get("num_experts_per_token"), int) else None
    return rec


# --- llama.cpp imatrix ------------------------------------------------------------------------------

def read_imatrix(path: str) -> Recording:
    """llama.cpp `imatrix.gguf` (general.type = imatrix): for each expert tensor `blk.L.ffn_*_exps.weight`
    an F32 `.counts` [n_expert]: how many (token, slot) assignments reached each expert (the
    MUL_MAT_ID ids). One projection per layer is read (up, else gate, else down); all agree."""
    meta, tensors = _gguf_f32(path, ".counts")
    if meta.get("general.type") not in (None, "imatrix"):
        raise BadRecording(f"{path}: a GGUF file, but general.type is {meta.get('general.type')!r}, not imatrix")
    by_layer: dict[int, dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        parts = name.split(".")
        if len(parts) < 4 or parts[0] != "blk" or not parts[1].isdigit() or not parts[2].endswith("_exps"):
            continue
        by_layer.setdefault(int(parts[1]), {})[parts[2]] = arr
    if not by_layer:
        raise BadRecording(f"{path}: no per-expert counts (no blk.N.ffn_*_exps.weight.counts tensors): "
                           "is this an imatrix of a MoE model?")
    loads = []
    order = sorted(by_layer)
    for l in order:
        t = by_layer[l]
        pick = next(t[p] for p in ("ffn_up_exps", "ffn_gate_up_exps", "ffn_gate_exps", "ffn_down_exps") + tuple(t)
                    if p in t)
        c = pick.reshape(-1)
        if not np.all(np.isfinite(c)) or (c < 0).any() or not np.all(c == np.round(c)):
            raise BadRecording(f"{path}: blk.{l} counts are not non-negative whole numbers")
        loads.append(c.astype(np.int64))
    if len({len(c) for c in loads}) != 1:
        raise BadRecording(f"{path}: layers disagree on the number of experts")
    return Recording("imatrix", order, "model", loads=np.stack(loads),
                     notes=["imatrix holds per-expert counts only (no co-activation, reuse or transitions); "
                            "llama.cpp collects them from every MUL_MAT_ID batch"])


# --- long-table CSV -------------------------------------------------------------------------------

_SEQ_COLS = ("prompt_index", "request_id", "request", "sequence", "seq")
_TOK_COLS = ("token_index", "position", "pos", "token")


def read_csv(path: str) -> Recording:
    """Long table: one row per (sequence, token, layer, slot) with columns `layer`, `expert`,
    a token position (`token_index`, `position` or a numeric `token`), optional sequence
    (`prompt_index`, `request_id`, ...), `slot` and `weight`. moetool's `trace --format csv` is
    such a table; so is what per-token routing tracers for llama.cpp write."""
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    if "layer" not in cols or "expert" not in cols:
        raise BadRecording(f"{path}: CSV needs `layer` and `expert` columns, has {cols}")
    seq_col = next((c for c in _SEQ_COLS if c in cols), None)
    tok_col = next((c for c in _TOK_COLS if c in cols), None)
    if tok_col is None:
        raise BadRecording(f"{path}: CSV needs a token position column (token_index, position or token)")
    has_w = "weight" in cols
    rows: dict = {}
    layers: set[int] = set()
    for n, row in enumerate(reader, 2):
        try:
            seq = row[seq_col] if seq_col else "0"
            tok, layer, expert = int(row[tok_col]), int(row["layer"]), int(row["expert"])
            slot = int(row["slot"]) if "slot" in cols and row.get("slot") not in (None, "") else None
            w = float(row["weight"]) if has_w and row.get("weight") not in (None, "") else None
        except (TypeError, ValueError):
            raise BadRecording(f"{path} line {n}: layer, token position, slot and expert must be integers") from None
        if tok < 0 or layer < 0:
            raise BadRecording(f"{path} line {n}: negative token position or layer")
        cell = rows.setdefault(seq, {}).setdefault((tok, layer), [])
        cell.append((slot if slot is not None else len(cell), expert, w))
        layers.add(layer)
    if not rows:
        raise BadRecording(f"{path}: no rows")
    order = sorted(layers)
    sequences = []
    k = None
    for seq, cells in rows.items():
        toks = sorted({t for t, _ in cells})
        if toks != list(range(len(toks))):
            raise BadRecording(f"{path}: sequence {seq!r}: token positions are not 0..{len(toks) - 1}")
        ks = {len(v) for v in cells.values()}
        if len(ks) != 1 or (k is not None and ks != {k}):
            raise BadRecording(f"{path}: sequence {seq!r}: tokens have different numbers of slots ({sorted(ks)})")
        k = ks.pop()
        experts = np.full((len(toks), len(order), k), -1, dtype=np.int64)
        weights = np.full((len(toks), len(order), k), np.nan) if has_w else None
        li = {l: j for j, l in enumerate(order)}
        for (t, l), slots in cells.items():
            for s, e, w in slots:
                if not 0 <= s < k:
                    raise BadRecording(f"{path}: sequence {seq!r} token {t} layer {l}: slot {s} out of 0..{k - 1}")
                experts[t, li[l], s] = e
                if weights is not None and w is not None:
                    weights[t, li[l], s] = w
        if (experts < 0).any():
            raise BadRecording(f"{path}: sequence {seq!r}: some (token, layer) pairs are missing slots or layers")
        sequences.append(Sequence(experts, weights))
    return Recording("csv", order, "either", sequences, k=k)


def _gguf_f32(path: str, suffix: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Metadata and the F32 tensors named `*suffix` of a GGUF file (the validated header reader of
    moetool.gguf; the data of those tensors only)."""
    from ..gguf.reader import read_gguf

    h = read_gguf(path)
    out = {}
    with open(path, "rb") as f:
        for t in h.tensors:
            if not t.name.endswith(suffix):
                continue
            if t.type_id != 0:  # GGML_TYPE_F32
                raise BadRecording(f"{path}: tensor {t.name!r} is {t.type_name}, expected F32 counts")
            f.seek(h.data_start + t.offset)
            raw = f.read(t.nbytes)
            if len(raw) != t.nbytes:
                raise BadRecording(f"{path}: tensor {t.name!r} is truncated")
            out[t.name] = np.frombuffer(raw, dtype="<f4").reshape(tuple(reversed(t.shape)) or (1,))
    return h.metadata, out
