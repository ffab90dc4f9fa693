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
