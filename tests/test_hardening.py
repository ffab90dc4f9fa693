"""Issue 15, hardening: faults and hostile input end in one line and a documented exit code,
outputs are written correctly whatever the target, nothing half-written is left behind."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fakes import DEVICE

REPO = Path(__file__).parents[1]


def run_cli(*args: str, env=None, stdin=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetool", *args], capture_output=True, text=True, env=env,
                          timeout=180, stdin=stdin, **kw)


def one_line_error(r: subprocess.CompletedProcess, code: int = 2) -> str:
    lines = [l for l in r.stderr.splitlines() if l.startswith("moetool: error:")]
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def run_shell(cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=180)


PY = sys.executable
TRACE = ["trace", "--tokens", "1,2,3", "--device", "cpu"]


# --- 1. one output writer: devices, FIFOs, symlinks, modes ----------------------------------------

def test_output_to_dev_stdout_writes_to_stdout():
    r = run_cli(*TRACE, "--format", "csv", "-o", "/dev/stdout")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("prompt_index,layer,token_index")


def test_output_to_dev_full_fails_and_stays_a_device():
    r = run_cli(*TRACE, "--format", "csv", "-o", "/dev/full")
    assert "no space left" in one_line_error(r)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_output_to_fifo_is_written_in_place(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    r = run_cli(*TRACE, "--format", "csv", "-o", str(fifo))
    out, _ = reader.communicate(timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.startswith("prompt_index,layer")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_output_follows_symlink_and_keeps_mode(tmp_path):
    real = tmp_path / "real.csv"
    real.write_text("old")
    os.chmod(real, 0o640)
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    r = run_cli(*TRACE, "--format", "csv", "-o", str(link))
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and real.read_text().startswith("prompt_index")
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".moetool-")]


def test_new_output_file_gets_the_umask_mode(tmp_path):
    from moetool.files import write_output

    old = os.umask(0o027)
    try:
        write_output(str(tmp_path / "a.json"), b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640


# --- 3. a closed stdout is not an error ----------------------------------------------------------

@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_count_into_head_exits_zero(fmt):
    r = run_shell(f"{PY} -m moetool count mixtral-8x7b --per-layer --format {fmt} | head -1 >/dev/null; "
                  "echo ${PIPESTATUS[0]}")
    assert r.stdout.strip() == "0", r.stderr
    assert "Traceback" not in r.stderr and "error" not in r.stderr


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_trace_into_head_exits_zero(fmt):
    r = run_shell(f"{PY} -m moetool trace --tokens 1,2,3,4,5,6,7,8 --device cpu --format {fmt} | head -1 >/dev/null;"
                  " echo ${PIPESTATUS[0]}")
    assert r.stdout.strip() == "0", r.stderr
    assert "Traceback" not in r.stderr and "error" not in r.stderr


# --- 7. output problems: before the work, one line -----------------------------------------------

@pytest.mark.parametrize("fmt", ["table", "json"])
def test_stdout_on_dev_full_is_one_line(fmt):
    r = run_shell(f"{PY} -m moetool count mixtral-8x7b --format {fmt} >/dev/full")
    assert r.returncode == 2 and r.stderr.count("moetool: error: cannot write to stdout") == 1, r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr


def test_closed_stdout_is_one_line():
    r = run_shell(f"{PY} -m moetool count mixtral-8x7b --json >&-")
    assert r.returncode == 2 and "stdout" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("flag", ["-o", "--save-logits", "--plot"])
def test_output_problems_are_found_before_the_forward(tmp_path, flag, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    suffix = {"-o": ".csv", "--save-logits": ".npy", "--plot": ".png"}[flag]
    cases = {"a directory": str(tmp_path) if flag == "-o" else None,
             "missing directory": str(tmp_path / "nodir" / f"x{suffix}"),
             "read-only directory": str(ro / f"x{suffix}")}
    for what, path in cases.items():
        if path is None:
            continue
        if what == "read-only directory" and os.geteuid() == 0:
            continue  # root writes anywhere
        # A checkpoint path that does not exist: the output check must come first.
        r = run_cli("trace", "--tokens", "1", "--model", str(tmp_path / "no-such-model"), "--format", "csv",
                    flag, path)
        line = one_line_error(r)
        assert path in line and "no-such-model" not in line, (what, line)


def test_read_only_existing_file_is_refused_before_work(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write a read-only file")
    f = tmp_path / "out.csv"
    f.write_text("keep")
    os.chmod(f, 0o444)
    r = run_cli("trace", "--tokens", "1", "--model", str(tmp_path / "nope"), "--format", "csv", "-o", str(f))
    assert "read-only" in one_line_error(r)


# --- 12. signals: Ctrl-C and SIGTERM ---------------------------------------------------------------

_SIGNAL_SCRIPT = """
import os, signal, sys
import moetool.files
real_fsync = os.fsync
def fsync(fd):
    os.kill(os.getpid(), signal.{sig})
    real_fsync(fd)
moetool.files.os.fsync = fsync
from moetool.cli import main
main(["trace", "--tokens", "1,2,3", "--device", "cpu", "--format", "csv", "-o", sys.argv[1]])
"""


@pytest.mark.parametrize("sig,code,word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_signal_during_write_leaves_no_temp_file(tmp_path, sig, code, word):
    out = tmp_path / "out.csv"
    r = subprocess.run([PY, "-c", _SIGNAL_SCRIPT.format(sig=sig), str(out)], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == code, r.stderr
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir()], list(tmp_path.iterdir())
    assert r.stderr.strip().splitlines()[-1] == f"moetool: error: {word}"
    assert "Traceback" not in r.stderr


# --- 17. control characters in paths ---------------------------------------------------------------

def test_terminal_escapes_and_newlines_in_paths_are_escaped(tmp_path):
    bad = str(tmp_path / "evil\x1b[31mred\nsecond-line.json")
    r = run_cli("count", bad)
    line = one_line_error(r)
    assert "\x1b" not in r.stderr
    assert "\\x1b[31mred\\nsecond-line.json" in line  # shown, escaped, not cut at the newline


def test_escapes_in_an_info_line(tmp_path):
    from moetool import render

    assert render.safe("a\x1b[2Jb\nc\td") == "a\\x1b[2Jb\\nc\\td"
    assert render.safe("plain ünïcode") == "plain ünïcode"


# --- 13. headers the safetensors library rejects are rejected ---------------------------------------

def _st_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    import struct

    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


_E = '{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}'
LIBRARY_REJECTS = {
    "duplicate tensor name": ('{"a":%s,"a":{"dtype":"F32","shape":[2,2],"data_offsets":[16,32]}}' % _E, 32),
    "field given twice": ('{"a":{"dtype":"F32","dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}', 16),
    "metadata a list": ('{"__metadata__":[],"a":%s}' % _E, 16),
    "metadata an empty string": ('{"__metadata__":"","a":%s}' % _E, 16),
    "metadata values not strings": ('{"__metadata__":{"k":1},"a":%s}' % _E, 16),
    "trailing bytes": ('{"a":%s}' % _E, 20),
    "a gap between tensors": ('{"a":%s,"b":{"dtype":"F32","shape":[1],"data_offsets":[20,24]}}' % _E, 24),
    "dimension of 2^70": ('{"a":{"dtype":"F32","shape":[%d,0],"data_offsets":[0,0]}}' % 2 ** 70, 0),
    "size overflowing 64 bits": ('{"a":{"dtype":"F32","shape":[%d,%d,0],"data_offsets":[0,0]}}' % (2 ** 40, 2 ** 40), 0),
    "integer of 5000 digits": ('{"a":{"dtype":"F32","shape":[%s],"data_offsets":[0,0]}}' % ("1" * 5000), 0),
    "deep nesting": ('{"a":' + "[" * 100_000 + "]" * 100_000 + "}", 0),
    "sub-byte dtype not filling bytes": ('{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', 2),
}
LIBRARY_ACCEPTS = {
    "metadata null": ('{"__metadata__":null,"a":%s}' % _E, 16),
    "dimension of 2^64-1": ('{"a":{"dtype":"F32","shape":[%d,0],"data_offsets":[0,0]}}' % (2 ** 64 - 1), 0),
    "extra field": ('{"a":{"dtype":"F32","x":1,"shape":[2,2],"data_offsets":[0,16]}}', 16),
    "zero-size tensor in line": ('{"a":%s,"z":{"dtype":"F32","shape":[0],"data_offsets":[16,16]}}' % _E, 16),
    "key strings in metadata": ('{"__metadata__":{"data_offsets":"dtype"},"a":%s}' % _E, 16),
}


def _library_opens(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            list(f.keys())
        return True
    except Exception:
        return False


@pytest.mark.parametrize("case", sorted(LIBRARY_REJECTS))
def test_header_rejected_like_the_safetensors_library(case, tmp_path):
    from moetool.errors import BadCheckpoint
    from moetool.header import read_header, scan_header
    from moetool.names import layer_span

    header, n = LIBRARY_REJECTS[case]
    p = _st_file(tmp_path / "model.safetensors", header.encode(), bytes(n))
    assert not _library_opens(p)
    with pytest.raises(BadCheckpoint) as full:
        read_header(p)
    with pytest.raises(BadCheckpoint) as scan:
        scan_header(str(p), layer_span)
    assert str(full.value) == str(scan.value) and "\n" not in str(full.value)


@pytest.mark.parametrize("case", sorted(LIBRARY_ACCEPTS))
def test_header_accepted_like_the_safetensors_library(case, tmp_path):
    from moetool.header import read_header, scan_header
    from moetool.names import layer_span

    header, n = LIBRARY_ACCEPTS[case]
    p = _st_file(tmp_path / "model.safetensors", header.encode(), bytes(n))
    assert _library_opens(p)
    assert set(read_header(p).tensors) == {k for k in json.loads(header) if k != "__metadata__"}
    scan_header(str(p), layer_span)


def test_duplicate_tensor_name_is_named(tmp_path):
    from moetool.errors import BadCheckpoint
    from moetool.header import read_header

    p = _st_file(tmp_path / "m.safetensors", LIBRARY_REJECTS["duplicate tensor name"][0].encode(), bytes(32))
    with pytest.raises(BadCheckpoint, match="tensor name 'a' appears twice"):
        read_header(p)


# --- 4 and 14. the parallel header scan -----------------------------------------------------------

_DYING_WORKER = """
import os, sys
import moetool.source as source
parent = os.getpid()
real = source._worker_scan
def dying(paths):
    if os.getpid() != parent:
        os._exit(137)  # as if the OOM killer took it
    return real(paths)
source._worker_scan = dying
os.environ["MOETOOL_JOBS"] = "2"
ckpt = source.resolve(sys.argv[1], tensor_table=False)
print(ckpt.stats.num_tensors, "|".join(ckpt.notes))
"""


def test_dead_scan_worker_does_not_hang(tmp_path):
    from test_bad_input import _many_shards

    _many_shards(tmp_path)
    r = subprocess.run([PY, "-c", _DYING_WORKER, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    n, note = r.stdout.strip().split(" ", 1)
    assert int(n) == 20 * 8 and "worker process died" in note


def test_moetool_jobs_capped_at_cpu_count(monkeypatch):
    from moetool import source

    monkeypatch.setenv("MOETOOL_JOBS", "1000")
    assert source._jobs(10_000) == len(os.sched_getaffinity(0))


def test_ctrl_c_is_not_reported_by_scan_workers(tmp_path):
    """SIGINT to the whole process group while workers scan: the parent's one line only."""
    from test_bad_input import _many_shards

    _many_shards(tmp_path)
    script = textwrap.dedent("""
        import os, signal, sys
        import moetool.source as source
        real = source._worker_scan
        def slow(paths):
            import time
            os.kill(os.getppid(), signal.SIGUSR1)
            time.sleep(30)
        source._worker_scan = slow
        def once(*a):
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # one Ctrl-C, however many workers ask
            os.killpg(0, signal.SIGINT)
        signal.signal(signal.SIGUSR1, once)
        os.environ["MOETOOL_JOBS"] = "2"
        from moetool.cli import main
        main(["count", sys.argv[1], "--json"])
    """)
    r = subprocess.run([PY, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60,
                       start_new_session=True)
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip() == "moetool: error: interrupted", r.stderr


# --- 8. crafted JSON: huge integers, deep nesting ---------------------------------------------------

BIG_INT = "1" * 5000
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def saved_trace(tmp_path_factory):
    d = tmp_path_factory.mktemp("trace")
    r = run_cli(*TRACE, "--json", "-o", str(d / "t.json"))
    assert r.returncode == 0, r.stderr
    return d / "t.json"


@pytest.mark.parametrize("payload", ["bigint", "deep"])
def test_crafted_config_and_index(tmp_path, payload):
    cfg = json.loads((REPO / "sample_configs" / "mixtral-8x7b.json").read_text())
    text = json.dumps(cfg)[:-1] + (f', "x": {BIG_INT}}}' if payload == "bigint" else f', "x": {DEEP}}}')
    (tmp_path / "config.json").write_text(text)
    assert "config.json" in one_line_error(run_cli("count", str(tmp_path / "config.json")))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "x.safetensors"}, "n": %s}' % (BIG_INT if payload == "bigint" else DEEP))
    assert "index" in one_line_error(run_cli("count", str(tmp_path)))


@pytest.mark.parametrize("payload", ["bigint", "deep"])
def test_crafted_diff_and_baseline_inputs(tmp_path, saved_trace, payload):
    bad = tmp_path / "bad.json"
    bad.write_text('{"command": "trace", "x": %s}' % (BIG_INT if payload == "bigint" else DEEP))
    assert "bad.json" in one_line_error(run_cli("diff", str(saved_trace), str(bad)))
    assert "bad.json" in one_line_error(run_cli("count", "mixtral-8x7b", "--baseline", str(bad)))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "a", "n": %s}\n' % (BIG_INT if payload == "bigint" else DEEP))
    assert "p.jsonl:1" in one_line_error(run_cli("trace", "--file", str(prompts)))


def test_crafted_trace_structure_for_diff(tmp_path, saved_trace):
    t = json.loads(saved_trace.read_text())
    t["layers"][0]["experts"][0] = [999]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(t))
    assert "expert ids" in one_line_error(run_cli("diff", str(saved_trace), str(bad)))
    t["tokens"] = [1, 2]
    bad.write_text(json.dumps(t))
    one_line_error(run_cli("diff", str(saved_trace), str(bad)))


# --- 10. unbounded reads and allocations -------------------------------------------------------------

@pytest.mark.parametrize("args", [["trace", "--file", "/dev/zero"], ["diff", "/dev/zero", "/dev/zero"],
                                  ["count", "mixtral-8x7b", "--baseline", "/dev/zero"],
                                  ["quantize-report", "--calibration", "/dev/zero", "--calibration-tokens", "16"]])
def test_dev_zero_inputs_are_bounded(args):
    import resource

    # 1.5 GB of address space beyond what this process maps (torch's libraries: a CUDA build maps
    # several GB before reading anything): an unbounded read fails the test instead of the machine
    with open("/proc/self/status") as f:
        mapped = next(int(l.split()[1]) << 10 for l in f if l.startswith("VmSize:"))
    cap = max(3 << 29, mapped + (3 << 29))

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    r = subprocess.run([PY, "-m", "moetool", *args], capture_output=True, text=True, timeout=120,
                       preexec_fn=limit)
    assert "/dev/zero" in one_line_error(r)


@pytest.mark.parametrize("args", [["trace", "--tokens", "1", "--layers", "0-99999999999"],
                                  ["quantize-report", "--weight-only", "--experts", "0-99999999999"],
                                  ["trace", "--tokens", "1", "--layers", "7"]])
def test_huge_ranges_refused_before_allocating(args):
    r = run_cli(*args)
    assert "--layers" in one_line_error(r) or "--experts" in one_line_error(r)


# --- 2, 9, 11, 16: the forward pass ----------------------------------------------------------------

DEFAULT = REPO / "moetool" / "data" / "default"


def _copy_default(tmp_path: Path, config_changes: dict | None = None, tensors=None) -> Path:
    """The bundled model in tmp_path/m, config.json edited, tensors changed by `tensors(dict)`."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(DEFAULT, d)
    if config_changes is not None:
        cfg = json.loads((d / "config.json").read_text())
        for k, v in config_changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (d / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        from safetensors.torch import load_file, save_file

        t = load_file(str(d / "model.safetensors"))
        tensors(t)
        save_file(t, str(d / "model.safetensors"))
    return d


def _trace_error(d: Path) -> str:
    from moetool import trace
    from moetool.errors import MoetoolError

    with pytest.raises(MoetoolError) as e:
        trace(tokens=[1, 2, 3, 4], model=str(d), device=DEVICE)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("where,layer", [("model.layers.2.block_sparse_moe.gate.weight", 2),
                                         ("model.layers.1.self_attn.v_proj.weight", 1)])
def test_nan_reaching_the_router_names_the_layer(tmp_path, where, layer):
    def poison(t):
        t[where][0, 0] = float("nan")

    d = _copy_default(tmp_path, tensors=poison)
    msg = _trace_error(d)
    assert f"layer {layer}:" in msg and "not finite" in msg
    assert ("weight" if "gate" in where else "hidden state") in msg
    r = run_cli("trace", "--tokens", "1,2,3", "--model", str(d), "--json")
    assert "not finite" in one_line_error(r) and r.stdout == ""


def test_inf_in_the_router_weight(tmp_path):
    def poison(t):
        t["model.layers.0.block_sparse_moe.gate.weight"][3, :] = float("inf")

    assert "layer 0:" in _trace_error(_copy_default(tmp_path, tensors=poison))


ROPE_CASES = {
    "yarn without factor": ({"rope_scaling": {"rope_type": "yarn"}}, "'factor'"),
    "rope_scaling a list": ({"rope_scaling": [1, 2]}, "'rope_scaling'"),
    "max_position_embeddings a string": ({"max_position_embeddings": "4096"}, "'max_position_embeddings'"),
    "factor a string": ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "'factor'"),
    "llama3 without original length": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                                       "'original_max_position_embeddings'"),
    "longrope factors of the wrong length": ({"rope_scaling": {"rope_type": "longrope", "long_factor": [1.0],
                                                               "short_factor": [1.0]}}, "long_factor"),
    "rope_type not a string": ({"rope_scaling": {"rope_type": 3}}, "'rope_type'"),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_malformed_rope_and_context_fields(tmp_path, case):
    changes, field = ROPE_CASES[case]
    assert field in _trace_error(_copy_default(tmp_path, changes))


def test_router_with_another_number_of_experts(tmp_path):
    def shrink(t):
        name = "model.layers.1.block_sparse_moe.gate.weight"
        t[name] = t[name][:6].clone()  # config.json says 8 experts

    msg = _trace_error(_copy_default(tmp_path, tensors=shrink))
    assert "model.layers.1.block_sparse_moe.gate.weight" in msg and "[6, 128]" in msg and "[8, 128]" in msg


def test_transposed_projection(tmp_path):
    def transpose(t):
        name = "model.layers.0.self_attn.k_proj.weight"
        t[name] = t[name].t().contiguous()  # [64, 128] stored as [128, 64]

    msg = _trace_error(_copy_default(tmp_path, tensors=transpose))
    assert msg.startswith("layer 0:")


def test_lm_head_is_streamed_in_row_blocks(monkeypatch):
    """The head is never converted whole above HEAD_BLOCK_BYTES; the logits are the same."""
    from moetool.forward import model as fm
    from moetool.forward import run_forward
    from moetool.source import resolve

    ids = [5, 17, 300, 2000, 9]
    whole = run_forward(resolve(None), ids, device=DEVICE).logits
    monkeypatch.setattr(fm, "HEAD_BLOCK_BYTES", 100 * 128 * 4)  # blocks of 100 rows of the 2048
    converted = []
    real_linear = fm.linear

    def spy(x, w, b=None):
        converted.append(w.shape[0])
        return real_linear(x, w, b)

    monkeypatch.setattr(fm, "linear", spy)
    blocked = run_forward(resolve(None), ids, device=DEVICE).logits
    assert max(converted) <= 256  # experts (256 rows) and blocks of 100: never the 2048-row head
    assert torch_equal(whole, blocked)


def torch_equal(a, b) -> bool:
    return bool((a - b).abs().max() <= 1e-5)


def test_logits_too_large_for_memory_are_refused(monkeypatch):
    from moetool.errors import MoetoolError
    from moetool.forward import model as fm
    from moetool.forward import run_forward, weights
    from moetool.source import resolve

    monkeypatch.setattr(fm, "HEAD_BLOCK_BYTES", 1024)
    monkeypatch.setattr(weights, "available_memory", lambda: 10_000)
    with pytest.raises(MoetoolError, match="more than the memory available"):
        run_forward(resolve(None), [1, 2, 3], device=DEVICE, streaming=False)


def test_generate_checked_against_the_context_before_starting(tmp_path, monkeypatch):
    from moetool import forward, trace
    from moetool.errors import MoetoolError

    calls = []
    monkeypatch.setattr(forward, "run_forward", lambda *a, **k: calls.append(1))
    with pytest.raises(MoetoolError, match="--generate 2000 makes 2003, more than the model's context"):
        trace(tokens=[1, 2, 3], generate=2000, device=DEVICE)
    assert not calls


def test_check_kl_fits_a_short_context(tmp_path):
    from moetool.quant.check import kl_check

    d = _copy_default(tmp_path, {"max_position_embeddings": 256})
    plan = {"per_expert": {"assignments": [{"layer": 0, "expert": 0, "scheme": "int4_g128"}]}, "uniform": None}
    out = kl_check(str(d), plan)
    assert out["tokens"] == 256 and out["kl_plan"] >= 0


def test_diff_into_head_exits_zero(saved_trace):
    r = run_shell(f"{PY} -m moetool diff {saved_trace} {saved_trace} | head -1 >/dev/null; echo ${{PIPESTATUS[0]}}")
    assert r.stdout.strip() == "0", r.stderr
    assert "Traceback" not in r.stderr


def test_escapes_in_a_table_title(tmp_path):
    cfg = (REPO / "sample_configs" / "mixtral-8x7b.json").read_text()
    d = tmp_path / "odd\x1b]0;pwned\x07name"
    d.mkdir()
    (d / "config.json").write_text(cfg)
    r = run_cli("count", str(d), env={k: v for k, v in os.environ.items() if k != "COLUMNS"})  # full width
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "odd\\x1b]0;pwned\\x07name" in r.stdout
