"""A newcomer's first day (issue 15, items 18-35): tables that never cut data, -o everywhere,
argument checks before the work, flag conventions, gate messages, the Python API, plots, hub
downloads, declared quantized storage."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_tokenizer
from fakes import DEVICE, build_transformers_model
from test_bad_input import run_cli

ROOT = Path(__file__).parents[1]


def run_env(*args: str, stdin: str | None = None, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    e.update(env)
    return subprocess.run([sys.executable, "-m", "moetool", *args], capture_output=True, text=True, env=e,
                          input=stdin, timeout=180)


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    """A Qwen3-MoE checkpoint with 128 experts, top-8, 6 layers (transformers save_pretrained)."""
    d = tmp_path_factory.mktemp("wide")
    cfg = dict(model_type="qwen3_moe", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
               num_hidden_layers=6, max_position_embeddings=512, intermediate_size=48, moe_intermediate_size=8,
               num_experts=128, num_experts_per_tok=8, head_dim=8)
    build_transformers_model(cfg, seed=3).save_pretrained(d)
    write_tokenizer(d)
    return d


# --- 19: tables never truncate ------------------------------------------------------------------

def test_count_tables_at_80_columns_and_piped():
    r = run_env("count", "mixtral-8x7b", "--per-layer", COLUMNS="80")
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    for needle in ("46,702,792,704", "1,409,286,144", "active", "dense MLP", "non-expert + top-k experts"):
        assert needle in r.stdout
    piped = run_env("count", "mixtral-8x7b", "--per-layer")  # no COLUMNS, stdout a pipe: full width
    assert "…" not in piped.stdout
    header = next(l for l in piped.stdout.splitlines() if l.startswith("layer"))
    assert "mixer" in header and header.rstrip().endswith("active")  # one table, not cut at 120 columns
    assert any("serving total" in l and "FLOPs" not in l and len(l) > 80 for l in piped.stdout.splitlines())


def test_top8_trace_at_80_columns_keeps_tokens_and_weights(wide_ckpt):
    r = run_env("trace", str(wide_ckpt), "--tokens", "5,6,7,8", "--device", "cpu", COLUMNS="80")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "…" not in r.stdout and max(len(l) for l in lines) <= 80
    headers = [l for l in lines if re.match(r"#\s+token\s+L\d", l)]
    assert len(headers) >= 2  # split by layers, each part repeating the token columns
    assert sorted(int(x) for h in headers for x in re.findall(r"L(\d+)", h)) == list(range(6))
    body = [l for l in lines if re.match(r"[0-3]\s+\S", l)]
    assert len(body) == 4 * len(headers)  # every token in every part
    assert all(re.search(r"\d\.\d\d\s*$", l) for l in body)  # its weight column too
    piped = run_env("trace", str(wide_ckpt), "--tokens", "5,6,7,8", "--device", "cpu")
    assert len([l for l in piped.stdout.splitlines() if re.match(r"#\s+token\s+L\d", l)]) == 1


# --- 25: -o with the table format ------------------------------------------------------------------

def test_output_writes_the_table(tmp_path):
    out = tmp_path / "count.txt"
    r = run_cli("count", "mixtral-8x7b", "-o", str(out))
    assert r.returncode == 0 and r.stdout == "" and "46,702,792,704" in out.read_text()
    out = tmp_path / "trace.txt"
    r = run_cli("trace", "--tokens", "1,2,3", "-o", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and "Routing metrics per MoE layer" in out.read_text()
    out = tmp_path / "quant.txt"
    r = run_cli("quantize-report", "--weight-only", "--schemes", "int8", "--layers", "1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and "bits/weight" in out.read_text()


# --- 26 / 35: --generate marks, long-table columns, byte tokens, plurals -----------------------------

def test_generate_marks_and_long_table(tmp_path):
    r = run_cli("trace", "--tokens", "5,6,7", "--generate", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rows = [l.split() for l in r.stdout.splitlines() if re.match(r"\s*\d+\*?\s", l)][:5]
    assert [row[0] for row in rows] == ["0", "1", "2", "3*", "4*"] and "* after the index marks generated" in r.stdout
    assert "(first choice bold)" not in r.stdout  # piped: nothing is bold
    csv = run_cli("trace", "--tokens", "5,6,7", "--generate", "2", "--device", "cpu", "--format", "csv")
    import csv as csvmod, io
    header, *body = csvmod.reader(io.StringIO(csv.stdout))  # a token may hold a comma or a newline
    assert header[:6] == ["prompt_index", "layer", "token_index", "token_id", "token", "generated"]
    ids = {(int(b[2]), int(b[3]), b[5]) for b in body}
    full = json.loads(run_cli("trace", "--tokens", "5,6,7", "--generate", "2", "--device", "cpu", "--json").stdout)
    assert ids == {(t["index"], t["id"], str(t["generated"])) for t in full["tokens"]}


def test_byte_tokens_and_plurals():
    r = run_cli("trace", "naïve", "--device", "cpu", "--json")
    texts = [t["text"] for t in json.loads(r.stdout)["tokens"]]
    assert "<0xC3>" in texts and "\ufffd" not in "".join(texts)
    r = run_cli("trace", "--tokens", "7", "--device", "cpu")
    assert "1 token," in r.stdout and "1 tokens" not in r.stdout
    r = run_cli("count", "switch-base-8")
    assert "1 experts" not in r.stdout


# --- 27: --weight-only -----------------------------------------------------------------------------

def test_weight_only_refuses_output_gate_and_does_not_warn():
    r = run_cli("quantize-report", "--weight-only", "--max-output-error", "0.05")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--weight-only" in r.stderr, r.stderr
    r = run_cli("quantize-report", "--weight-only", "--schemes", "int4_g128")
    assert r.returncode == 0, r.stderr
    assert "calibration tokens" not in r.stdout and "weight space only" in r.stdout
    assert "(few tokens)" not in r.stdout


# --- 28: arguments before the work -------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["trace", "--layers", "7"], "out of range"),
    (["trace", "--plot", "nodir/p.png"], "does not exist"),
    (["trace", "-o", "nodir/t.json", "--json"], "does not exist"),
    (["quantize-report", "--budget-bits", "2"], "cheapest"),
    (["quantize-report", "--plot", "nodir/p.png"], "does not exist"),
    (["quantize-report", "--layers", "9"], "out of range"),
])
def test_arguments_checked_first(args, needle, tmp_path):
    import time

    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "moetool", *args], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)  # cwd: a directory without nodir/ (and without a moetool/ to import)
    assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "Routing" not in r.stdout and r.stdout == ""
    assert time.perf_counter() - t0 < 60


def test_layers_stop_the_forward():
    import moetool

    seen = []
    t = moetool.trace(tokens=[1, 2, 3], layers={1}, device=DEVICE, progress=lambda d, n: seen.append((d, n)))
    assert [l.layer for l in t.layers] == [1] and seen[-1] == (2, 2)  # layers 0 and 1 of 4, then stop
    full = moetool.trace(tokens=[1, 2, 3], device=DEVICE)
    assert t.layers[0].experts == full.layers[1].experts


# --- 23: --expect-active conventions ------------------------------------------------------------------

def test_expect_active_is_the_published_figure():
    r = run_cli("count", "mixtral-8x7b", "--expect-active", "12.9B", "--json")  # the help's own example
    assert r.returncode == 0, r.stderr
    r = run_cli("count", "mixtral-8x7b", "--expect-active-excl-embedding", "12.75B", "--json")
    assert r.returncode == 0
    r = run_cli("count", "mixtral-8x7b", "--expect-active", "12.75B", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["gate"]["violations"][0]["metric"] == "active_params"
    assert "INCLUDING the input embedding" in " ".join(run_cli("count", "--help").stdout.split())


# --- 24: declared storage ---------------------------------------------------------------------------

def test_declared_quantized_storage():
    ds = json.loads(run_cli("count", "deepseek-v3", "--json").stdout)
    assert ds["declared_storage"] == "fp8, 128x128 blocks"
    assert 680e9 < ds["bytes_declared"] < 690e9  # published: ~688 GB of fp8 shards (MTP layer included)
    assert ds["kv_cache"]["serve_bytes"] == ds["bytes_declared"] + ds["kv_cache"]["bytes"]
    oss = json.loads(run_cli("count", "gpt-oss-20b", "--json").stdout)
    assert oss["declared_storage"] == "MXFP4" and 13.5e9 < oss["bytes_declared"] < 14.0e9  # published 13.8 GB
    # modules_to_not_convert: attention, routers, embedding and head stay bf16, so less than all-MXFP4
    assert oss["bytes_declared"] > oss["weights_bytes"]["mxfp4"]
    table = run_cli("count", "gpt-oss-20b").stdout
    assert "as declared (MXFP4)" in table and "(weights MXFP4)" in table


# --- 30: gate messages ------------------------------------------------------------------------------

def test_gate_messages(tmp_path):
    r = run_cli("count", "mixtral-8x7b", "--expect-total", "40B")
    assert r.returncode == 1 and "warning" not in r.stderr
    assert "gate failed: total_params = 46,702,792,704, expected 40,000,000,000 within 0.5% (off by 16.8%)" in r.stderr
    base = tmp_path / "base.json"
    base.write_text(run_cli("count", "mixtral-8x7b", "--json").stdout)
    r = run_cli("count", "olmoe-1b-7b-0924", "--baseline", str(base), "--max-drift", "1%")
    assert r.returncode == 1 and "vs baseline 46,702,792,704" in r.stderr and "in either direction" in r.stderr
    r = run_cli("trace", "--tokens", "1,2,3,4,5", "--device", "cpu", "--max-imbalance", "1.5")
    assert r.returncode == 1 and "warning" not in r.stderr
    line = next(l for l in r.stderr.splitlines() if l.startswith("gate failed"))
    assert re.fullmatch(r"gate failed: max_mean_ratio in layer \d+ = \d+(\.\d{1,3})?, limit <= 1\.5", line), line
    r = run_cli("quantize-report", "--schemes", "int4_g128", "--layers", "1", "--calibration-tokens", "64",
                "--max-output-error", "0.001")
    line = next(l for l in r.stderr.splitlines() if l.startswith("gate failed"))
    assert re.fullmatch(r"gate failed: output_rel_error in layer 1, expert \d+ (gate|up|down) under int4_g128 = "
                        r"0\.0*[1-9]\d{0,3}, limit <= 0\.001", line), line


def test_drift_message_says_vs_baseline():
    from moetool.cli import gate_message

    msg = gate_message({"metric": "total_params", "value": 110, "baseline": 100, "max_drift": 0.02,
                        "relative_drift": 0.1})
    assert msg == "total_params = 110 vs baseline 100: drift 10% in either direction, limit 2%"


# --- 31: threads -------------------------------------------------------------------------------------

def test_threads_default_and_flag():
    from moetool.source import resolve
    from moetool.tracing import set_threads

    import torch

    before = torch.get_num_threads()
    try:
        assert set_threads(None, resolve(None)) == 1  # the bundled model: hidden size 128
        assert set_threads(2) == 2
    finally:
        torch.set_num_threads(before)
    assert run_cli("trace", "--tokens", "1,2", "--threads", "0").returncode == 2


# --- 32: --file prints the corpus tables ------------------------------------------------------------

def test_file_prints_corpus_tables(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("def add(a, b): return a + b\nThe quick brown fox\nimport os\n")
    r = run_cli("trace", "--file", str(prompts), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "Corpus-level routing metrics (3 prompts pooled)" in r.stdout
    assert not re.search(r"^\s*#\s+token", r.stdout, re.M)
    r = run_cli("trace", "--file", str(prompts), "--device", "cpu", "--per-token")
    assert len(re.findall(r"^\s*#\s+token", r.stdout, re.M)) == 3
    r = run_env("trace", "--file", "-", "--device", "cpu", "--json", stdin=prompts.read_text())
    assert r.returncode == 0 and len(json.loads(r.stdout)["prompts"]) == 3


# --- 33: CLI consistency ------------------------------------------------------------------------------

def test_cli_consistency(tmp_path):
    from moetool.source import default_model_dir

    d = str(default_model_dir())
    a = run_cli("trace", d, "def add(a, b)", "--json", "--device", "cpu")
    b = run_cli("trace", "def add(a, b)", "--model", d, "--json", "--device", "cpu")
    assert a.returncode == 0 and json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]
    c = run_cli("trace", d, "--tokens", "1,2", "--json", "--device", "cpu")  # one argument + --tokens: MODEL
    assert c.returncode == 0 and len(json.loads(c.stdout)["tokens"]) == 2
    q = run_cli("quantize-report", d, "--weight-only", "--schemes", "int8", "--json")
    assert q.returncode == 0 and json.loads(q.stdout)["command"] == "quantize-report"
    assert run_cli("-V").stdout.startswith("moetool ")
    assert "--show-completion" in run_cli("--help").stdout
    k = json.loads(run_cli("count", "mixtral-8x7b", "--context", "32k", "--json").stdout)
    assert k["kv_cache"]["context"] == 32768
    cfg = (ROOT / "sample_configs" / "mixtral-8x7b.json").read_text()
    s = run_env("count", "-", "--json", stdin=cfg)
    assert s.returncode == 0 and json.loads(s.stdout)["total_params"] == 46702792704
    t1 = tmp_path / "a.json"
    t1.write_text(run_cli("trace", "--tokens", "1,2,3", "--json", "--device", "cpu").stdout)
    dout = tmp_path / "diff.json"
    r = run_env("diff", "-", str(t1), "--json", "-o", str(dout), stdin=t1.read_text())
    assert r.returncode == 0 and json.loads(dout.read_text())["command"] == "diff"
    for args in (["trace", "--tokens", "1", "--min-entropy", "1.5"], ["diff", str(t1), str(t1), "--max-load-tv", "2"]):
        r = run_cli(*args)
        assert r.returncode == 2 and "between 0 and 1" in r.stderr


# --- 35: the smaller list -----------------------------------------------------------------------------

def test_smaller_items(tmp_path):
    jamba = run_cli("count", "jamba-v0.1", "--per-layer").stdout
    assert "mixer params" in jamba
    r = run_cli("count", "mixtral-8x7b", "--context", "1M")
    assert "past the model's maximum of 32,768" in r.stderr
    (tmp_path / "config.json").write_text((ROOT / "sample_configs" / "mixtral-8x7b.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04.")
    r = run_cli("count", str(tmp_path), "--config-only", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["total_params"] == 46702792704
    r = run_cli("count")
    assert "docs/" not in r.stderr  # the wheel ships no docs folder
    h = run_env("quantize-report", "--help", COLUMNS="80").stdout
    for name in ("int8", "int4_g128", "fp8_channel", "fp8_block", "mxfp4", "nvfp4"):
        assert re.search(rf"(^|[\s,]){name}([\s,.)]|$)", h), name
    from moetool.render import plural

    assert plural(45808, "tensor") == "45,808 tensors" and plural(1, "expert") == "1 expert"


# --- 22: hub downloads only what the index names ---------------------------------------------------

def test_hub_download_only_indexed_shards(tmp_path, tiny_checkpoint):
    import shutil

    from hubserver import FakeHub, hub_env

    src, _ = tiny_checkpoint("qwen3_moe")
    repo = tmp_path / "repo"
    shutil.copytree(src, repo)
    write_tokenizer(repo)
    shutil.copy(repo / "model.safetensors", repo / "consolidated.safetensors")  # a second copy
    with FakeHub({"org/tiny-moe": repo}) as hub:
        r = subprocess.run([sys.executable, "-m", "moetool", "trace", "org/tiny-moe", "def add", "--json",
                            "--device", "cpu"], capture_output=True, text=True, env=hub_env(hub, tmp_path / "cache"),
                           timeout=180)
        assert r.returncode == 0, r.stderr
        assert "consolidated.safetensors" not in hub.bytes_sent
        size = (repo / "model.safetensors").stat().st_size
        assert f"downloading 1 safetensors file ({size / 1e3:.2f} KB)" in r.stderr
    # with an index: exactly the shards it names
    (repo / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model.safetensors" for k in _tensor_names(repo / "model.safetensors")}}))
    with FakeHub({"org/tiny-moe2": repo}) as hub:
        r = subprocess.run([sys.executable, "-m", "moetool", "trace", "org/tiny-moe2", "def add", "--json",
                            "--device", "cpu"], capture_output=True, text=True, env=hub_env(hub, tmp_path / "cache2"),
                           timeout=180)
        assert r.returncode == 0, r.stderr
        assert "consolidated.safetensors" not in hub.bytes_sent and "model.safetensors" in hub.bytes_sent


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


# --- 29: the Python API ----------------------------------------------------------------------------

def test_python_api():
    import inspect

    import moetool

    assert {"count", "trace", "trace_many", "quantize_report", "MoetoolError"} <= set(moetool.__all__)
    assert moetool.MoetoolError is __import__("moetool.errors").errors.MoetoolError
    for f in (moetool.count, moetool.trace, moetool.trace_many, moetool.quantize_report):
        params = inspect.signature(f).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), f
    assert "context" in inspect.signature(moetool.count).parameters
    import importlib

    named = re.findall(r"`(moetool(?:\.\w+)+)", moetool.__doc__)
    assert "moetool.counting.count" in named
    for name in named:  # every module and function the docstring names exists
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:n]))
                break
            except ModuleNotFoundError:
                continue
        for attr in parts[n:]:
            obj = getattr(obj, attr)
    r = moetool.count("deepseek-v3")
    assert len(repr(r)) < 300 and "671" in repr(r) and "<table>" in r._repr_html_()
    t = moetool.trace(tokens=list(range(1, 200)), device=DEVICE)
    assert len(repr(t)) < 300 and len(repr(t.layers[0])) < 100 and "TraceReport" in t._repr_html_()
    c = moetool.trace_many(["def add", "import os"], device=DEVICE)
    assert len(repr(c)) < 300 and "prompts=2" in repr(c)


# --- 20: readable plots ------------------------------------------------------------------------------

def test_plot_readable_at_many_experts_and_long_prompts(wide_ckpt, tmp_path):
    import matplotlib
    from PIL import Image

    import moetool
    from moetool.plot import plot_trace

    long = moetool.trace(model=str(wide_ckpt), tokens=[i % 120 + 1 for i in range(200)], device=DEVICE)
    png = tmp_path / "long.png"
    plot_trace(long, str(png))
    w, h = Image.open(png).size
    assert w <= 1920 and h <= 1440  # before: 0.35 in per expert, 0.22 in per token, at 150 dpi
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # keep text as text to read it back
        svg = tmp_path / "short.svg"
        plot_trace(moetool.trace(model=str(wide_ckpt), tokens=[5, 6, 7], device=DEVICE), str(svg))
        text = svg.read_text()
        assert str(wide_ckpt) in text and "top-8 of 128 experts" in text
        assert "gate weight" in text and "first-choice expert" not in text  # no 128 categorical colours
        few = moetool.trace(tokens=[1, 2, 3], device=DEVICE)  # 8 experts: one colour each
        plot_trace(few, str(svg))
        assert "first-choice expert" in svg.read_text() and "moetool-default" in svg.read_text()
        corpus = moetool.trace_many(["def add", "import os", "The fox"], model=str(wide_ckpt), device=DEVICE)
        plot_trace(corpus, str(svg))
        text = svg.read_text()
        assert "3 prompts pooled" in text and "experts sorted by load" in text


def test_plot_with_file_pools_the_corpus(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("def add(a, b): return a + b\nThe quick brown fox\n")
    r = run_cli("trace", "--file", str(prompts), "--plot", str(tmp_path / "c.png"), "--device", "cpu")
    assert r.returncode == 0 and "all 2 prompts pooled" in r.stderr and (tmp_path / "c.png").stat().st_size > 0


# --- 18 / 21: install recipes that work ------------------------------------------------------------

def test_install_recipes():
    readme = (ROOT / "README.md").read_text()
    first_pip = next(l for l in readme.splitlines() if l.startswith("pip install"))
    assert first_pip == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert "takes minutes on a CPU" in readme
    ci = (ROOT / "docs" / "ci.md").read_text()
    assert not re.search(r"pip install moetool(\s|$)", ci)  # not published on a package index
    assert 'pip install "moetool @ git+' in ci and "--index-url https://download.pytorch.org/whl/cpu" in ci


def test_generate_reports_progress():
    import moetool

    calls = []
    moetool.trace(tokens=[5, 6], generate=2, device=DEVICE, progress=lambda d, n: calls.append((d, n)))
    assert calls[:2] == [(1, 2), (2, 2)] and calls[-1] == (4, 4) and all(n for _, n in calls)


def test_shell_completion():
    r = run_env(_MOETOOL_COMPLETE="complete_bash", COMP_WORDS="moetool tr", COMP_CWORD="1")
    assert r.returncode == 0 and r.stdout.split() == ["trace"]
