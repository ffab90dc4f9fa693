"""Gates and exit codes (0 ok, 1 gate failed, 2 bad input), `moetool diff`, baselines, and
determinism of the JSON."""

from __future__ import annotations

import json

import pytest

from test_bad_input import run_cli


def test_count_gates():
    # --expect-active includes the input embedding (the published 12.9B); the excl. variant is explicit
    r = run_cli("count", "mixtral-8x7b", "--expect-total", "46.7B", "--expect-active", "12.9B",
                "--expect-active-excl-embedding", "12.75B", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["gate"] == {"enabled": True, "passed": True, "violations": []}
    r = run_cli("count", "mixtral-8x7b", "--expect-active-excl-embedding", "12.9B", "--tolerance", "0.5%", "--json")
    assert r.returncode == 1
    gate = json.loads(r.stdout)["gate"]
    assert not gate["passed"] and gate["violations"][0]["metric"] == "active_params_excl_embedding"
    r = run_cli("count", "mixtral-8x7b", "--expect-active-excl-embedding", "12.9B", "--tolerance", "2%")
    assert r.returncode == 0
    r = run_cli("count", "mixtral-8x7b", "--expect-active-excl-embedding", "12.9B", "--exit-zero")
    assert r.returncode == 0 and "gate failed" in r.stderr
    r = run_cli("count", "mixtral-8x7b", "--json")
    assert json.loads(r.stdout)["gate"]["enabled"] is False


@pytest.mark.parametrize("args", [["--expect-total", "nan"], ["--expect-total", "inf"], ["--expect-total", "lots"],
                                  ["--expect-total", "-3B"], ["--tolerance", "nan%"], ["--max-drift", "2%"],
                                  ["--baseline", "/nonexistent.json"]])
def test_count_bad_thresholds(args):
    r = run_cli("count", "mixtral-8x7b", *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr


def test_count_baseline_drift(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(run_cli("count", "mixtral-8x7b", "--json").stdout)
    assert run_cli("count", "mixtral-8x7b", "--baseline", str(base), "--max-drift", "0%").returncode == 0
    r = run_cli("count", "qwen3-30b-a3b", "--baseline", str(base), "--max-drift", "2%", "--json")
    assert r.returncode == 1
    assert {v["metric"] for v in json.loads(r.stdout)["gate"]["violations"]} >= {"total_params"}
    (tmp_path / "trace.json").write_text(json.dumps({"schema_version": 1, "command": "trace"}))
    r = run_cli("count", "mixtral-8x7b", "--baseline", str(tmp_path / "trace.json"))
    assert r.returncode == 2


@pytest.fixture(scope="module")
def traced(tiny_checkpoint, tmp_path_factory):
    d, _ = tiny_checkpoint("qwen3_moe")
    out = tmp_path_factory.mktemp("traces")
    ids = ",".join(str(i) for i in range(3, 40))
    for name, extra in (("a", []), ("b", ["--dtype", "bfloat16", "--router-dtype", "bfloat16"])):
        r = run_cli("trace", "--model", str(d), "--tokens", ids, "--logits", "--json", "--device", "cpu", *extra)
        assert r.returncode == 0, r.stderr
        (out / f"{name}.json").write_text(r.stdout)
    return d, out, ids


def test_trace_gates(traced):
    d, out, ids = traced
    a = json.loads((out / "a.json").read_text())
    worst = max(l["metrics"]["max_mean_ratio"] for l in a["layers"])
    r = run_cli("trace", "--model", str(d), "--tokens", ids, "--json", "--device", "cpu",
                "--max-imbalance", str(worst - 0.01), "--max-dead-experts", "8")
    assert r.returncode == 1
    v = json.loads(r.stdout)["gate"]["violations"]
    assert v and all(x["metric"] == "max_mean_ratio" and x["value"] > worst - 0.01 for x in v)
    r = run_cli("trace", "--model", str(d), "--tokens", ids, "--device", "cpu", "--max-imbalance", str(worst))
    assert r.returncode == 0
    r = run_cli("trace", "--model", str(d), "--tokens", ids, "--device", "cpu", "--min-entropy", "nan")
    assert r.returncode == 2
    r = run_cli("trace", "--model", str(d), "--tokens", ids, "--device", "cpu", "--json",
                "--baseline", str(out / "a.json"), "--max-drift", "0.1%")
    assert r.returncode == 0, r.stderr  # the same run: no drift


def test_diff(traced):
    _, out, _ = traced
    a, b = json.loads((out / "a.json").read_text()), json.loads((out / "b.json").read_text())
    r = run_cli("diff", str(out / "a.json"), str(out / "b.json"), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["command"] == "diff" and d["tokens"] == len(a["tokens"])
    for la, lb, ld in zip(a["layers"], b["layers"], d["layers"]):
        T = len(la["experts"])
        first = sum(x[0] != y[0] for x, y in zip(la["experts"], lb["experts"])) / T
        sets = sum(set(x) != set(y) for x, y in zip(la["experts"], lb["experts"])) / T
        assert ld["first_choice_changed"] == pytest.approx(first)
        assert ld["expert_set_changed"] == pytest.approx(sets)
        la_load, lb_load = la["metrics"]["load"], lb["metrics"]["load"]
        tv = 0.5 * sum(abs(x / sum(la_load) - y / sum(lb_load)) for x, y in zip(la_load, lb_load))
        assert ld["load_tv"] == pytest.approx(tv)
        assert ld["changes_on_near_ties"] is not None  # both traced with --logits
    same = run_cli("diff", str(out / "a.json"), str(out / "a.json"), "--max-first-choice-change", "0", "--json")
    assert same.returncode == 0 and json.loads(same.stdout)["summary"]["first_choice_changed"]["max"] == 0.0


def test_diff_bad_input(traced, tmp_path):
    _, out, _ = traced
    other = json.loads((out / "a.json").read_text())
    other["tokens"] = other["tokens"][:-1]
    (tmp_path / "short.json").write_text(json.dumps(other))
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "count.json").write_text(run_cli("count", "mixtral-8x7b", "--json").stdout)
    for b in ("short.json", "bad.json", "count.json", "missing.json"):
        r = run_cli("diff", str(out / "a.json"), str(tmp_path / b))
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (b, r.stderr)


def test_trace_json_is_byte_identical(traced):
    d, out, ids = traced
    r = run_cli("trace", "--model", str(d), "--tokens", ids, "--logits", "--json", "--device", "cpu")
    assert r.stdout == (out / "a.json").read_text()


def test_outputs_are_atomic(traced, tmp_path):
    """A failing run leaves no partial file and never clobbers an existing good one."""
    d, _, ids = traced
    target = tmp_path / "out.csv"
    target.write_text("good\n")
    r = run_cli("trace", "--model", str(d), "--tokens", "999999", "--format", "csv", "-o", str(target))
    assert r.returncode == 2 and target.read_text() == "good\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
    r = run_cli("trace", "--model", str(d), "--tokens", ids, "--format", "csv", "-o", str(target), "--device", "cpu")
    assert r.returncode == 0 and target.read_text().startswith("prompt_index,")
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
    r = run_cli("trace", "--model", str(d), "--tokens", ids, "-o", str(tmp_path / "no" / "dir.csv"), "--format", "csv")
    assert r.returncode == 2
