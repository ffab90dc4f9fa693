"""The `moetool` command line. Each command parses, makes one library call, renders, and maps
errors to exit codes: 0 ok, 1 a requested gate failed, 2 bad usage or bad input (one line on
stderr), 3 internal error (traceback with MOETOOL_DEBUG=1).

Heavy imports (torch, pandas, huggingface-hub) happen inside the commands that need them, so
`moetool --help` and `moetool count` start fast.
"""

from __future__ import annotations

import os
import sys
import traceback
from enum import Enum
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import MoetoolError

app = typer.Typer(
    name="moetool",
    help="Analyse Mixture-of-Experts checkpoints: parameters, memory, KV cache, FLOPs, router traces.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def _version(value: bool) -> None:
    if value:
        from .render import write_stdout

        write_stdout(f"moetool {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    pass


@app.command()
def count(
    model: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", help="Local directory, config.json, .safetensors "
                                                   "file, sample config name (e.g. mixtral-8x7b), or hub id org/name; "
                                                   "default: the bundled model.")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    context: Annotated[int, typer.Option(min=1, help="Context length for the KV cache and attention FLOPs.")] = 4096,
    batch: Annotated[int, typer.Option(min=1, help="Sequences served at once (KV cache).")] = 1,
    kv_dtype: Annotated[str, typer.Option(help="KV cache element type: bf16, fp16, fp32, fp8.")] = "bf16",
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Show the per-layer table.")] = False,
    config_only: Annotated[bool, typer.Option("--config-only", help="Count from config.json alone; skip the headers.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="JSON on stdout (same as --format json).")] = False,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.table,
    expect_total: Annotated[Optional[str], typer.Option(help="Gate: expected total parameters, e.g. 46.7B.")] = None,
    expect_active: Annotated[Optional[str], typer.Option(help="Gate: expected active parameters excluding the input "
                                                         "embedding, e.g. 12.9B.")] = None,
    tolerance: Annotated[str, typer.Option(help="Relative tolerance of --expect-*, e.g. 0.5%.")] = "0.5%",
    baseline: Annotated[Optional[str], typer.Option(help="Gate: compare with a saved `count --json` report.")] = None,
    max_drift: Annotated[Optional[str], typer.Option(help="Relative drift allowed against --baseline, e.g. 2%.")] = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Report gate failures without exit code 1.")] = False,
) -> None:
    """Total vs active parameters, breakdown, memory per storage format, KV cache, FLOPs per token."""
    from .gates import baseline_gate, count_gate, parse_fraction
    from . import render
    from .counting import count as do_count
    from .formats import DTYPE_BYTES

    if kv_dtype.lower() not in DTYPE_BYTES:
        raise MoetoolError(f"--kv-dtype {kv_dtype!r} is not one of: {', '.join(sorted(DTYPE_BYTES))}")
    if model is None:
        _say_default()
    parse_fraction(tolerance, "--tolerance")
    report = do_count(model, revision=revision, context=context, batch=batch, kv_dtype=kv_dtype.lower(),
                      use_headers=not config_only)
    gate = count_gate(report, expect_total, expect_active, tolerance)
    data = report.to_dict()
    gate = baseline_gate(gate, data, baseline, max_drift)
    data["gate"] = gate.to_dict()
    fmt = Format.json if json_ else fmt
    if fmt is Format.json:
        render.write_stdout(render.to_json(data))
        for n in report.notes:
            render.info(n)
    elif fmt is Format.csv:
        render.write_stdout(render.count_csv(report, per_layer))
    else:
        render.render_count(report, per_layer=per_layer)
    _finish_gate(gate, exit_zero)


# Typer < 0.16 raises click's exceptions; later versions vendor click as typer._click. The
# usage-error class is found through the public `typer.BadParameter` either way.
_USAGE_ERRORS = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def app_help() -> str:
    import typer.main

    command = typer.main.get_command(app)
    ctx = command.make_context("moetool", [], resilient_parsing=True)
    return command.get_help(ctx)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def _parse_tokens(value: Optional[str]) -> Optional[list[int]]:
    if value is None:
        return None
    try:
        ids = [int(x) for x in value.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise MoetoolError(f"--tokens must be comma-separated integers, got {value!r}") from None
    if not ids:
        raise MoetoolError("--tokens is empty")
    return ids


class TraceFormat(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"
    parquet = "parquet"


@app.command()
def trace(
    prompt: Annotated[Optional[str], typer.Argument(metavar="PROMPT", help="Text to trace.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Checkpoint: local directory, .safetensors "
                                                 "file, or hub id (downloaded into the hub cache); default: the "
                                                 "bundled model.")] = None,
    tokens: Annotated[Optional[str], typer.Option(help="Token ids instead of a prompt, e.g. 1,2,3.")] = None,
    file: Annotated[Optional[str], typer.Option("--file", help="Many prompts: .txt (one per line) or .jsonl "
                                                "({\"text\": ...} per line).")] = None,
    generate: Annotated[int, typer.Option(min=0, help="Greedy-generate N tokens after the prompt and trace them too.")] = 0,
    capacity_factor: Annotated[Optional[float], typer.Option(help="Report tokens dropped at this capacity factor "
                                                             "(Switch/GShard, position order).")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Only these decoder layers, e.g. 0,3,5-7.")] = None,
    logits: Annotated[bool, typer.Option("--logits", help="Include router logits, selection scores and the k/k+1 "
                                         "margin per token in the JSON.")] = False,
    plot: Annotated[Optional[str], typer.Option(help="Write a layer x expert load heatmap and a token x layer "
                                                "first-choice map (.png or .svg).")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision.")] = None,
    dtype: Annotated[DType, typer.Option(help="Compute dtype of the forward (the router runs in float32).")] = DType.float32,
    router_dtype: Annotated[DType, typer.Option(help="Router matmul dtype (near ties flip in bf16).")] = DType.float32,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when available.")] = Device.auto,
    save_logits: Annotated[Optional[str], typer.Option(help="Write final float32 logits [tokens, vocab] as .npy.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="JSON on stdout (same as --format json).")] = False,
    fmt: Annotated[TraceFormat, typer.Option("--format", help="table, json, or the long table (one row per prompt, "
                                             "layer, token, slot) as jsonl, csv or parquet.")] = TraceFormat.table,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the --format output to this file "
                                                  "(atomically) instead of stdout.")] = None,
    max_imbalance: Annotated[Optional[float], typer.Option(help="Gate: max load / mean load in every layer.")] = None,
    max_maxvio: Annotated[Optional[float], typer.Option(help="Gate: MaxVio in every layer.")] = None,
    max_dead_experts: Annotated[Optional[int], typer.Option(min=0, help="Gate: experts never chosen, per layer.")] = None,
    min_entropy: Annotated[Optional[float], typer.Option(help="Gate: normalised load entropy in every layer.")] = None,
    baseline: Annotated[Optional[str], typer.Option(help="Gate: compare the summary with a saved `trace --json`.")] = None,
    max_drift: Annotated[Optional[str], typer.Option(help="Relative drift allowed against --baseline, e.g. 2%.")] = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Report gate failures without exit code 1.")] = False,
) -> None:
    """Run the reference forward pass, record every router decision, and measure the routing."""
    from . import render
    from .tracing import parse_layers, read_prompts, trace_many
    from .tracing import save_logits as write_logits
    from .tracing import trace as do_trace

    if model is None:
        _say_default()
    if prompt is None and tokens is None and file is None:
        from .tracing import EXAMPLE_PROMPT

        prompt = EXAMPLE_PROMPT
        from . import render as _r

        _r.info("no prompt given: tracing a built-in example (Python code, then English prose)")
    fmt = TraceFormat.json if json_ else fmt
    if fmt is TraceFormat.parquet and not output:
        raise MoetoolError("--format parquet needs -o FILE")
    if sum(x is not None for x in (prompt, tokens, file)) > 1:
        raise MoetoolError("give one of PROMPT, --tokens or --file")
    if save_logits is not None and not save_logits.endswith(".npy"):
        raise MoetoolError("--save-logits must name a .npy file")
    if save_logits and file:
        raise MoetoolError("--save-logits works with one prompt, not --file")
    if plot is not None and not plot.endswith((".png", ".svg")):
        raise MoetoolError("--plot must name a .png or .svg file")
    ids = _parse_tokens(tokens)
    from .gates import baseline_gate, check_threshold, parse_fraction, trace_gate

    for value, flag in ((max_imbalance, "--max-imbalance"), (max_maxvio, "--max-maxvio"), (min_entropy, "--min-entropy")):
        check_threshold(value, flag)
    if max_drift is not None:
        parse_fraction(max_drift, "--max-drift")
    options = dict(dtype=dtype.value, router_dtype=router_dtype.value, device=device.value, generate=generate,
                   capacity_factor=capacity_factor, layers=parse_layers(layers), router_logits=logits)
    machine = fmt is not TraceFormat.table
    if file:
        prompts = read_prompts(file)
        with _layer_progress(enabled=not machine or output is not None, label="prompts") as progress:
            report = trace_many(prompts, model=model, revision=revision, progress=progress, **options)
        single = None
    else:
        with _layer_progress(enabled=not machine or output is not None) as progress:
            report = do_trace(prompt, model=model, tokens=ids, revision=revision, progress=progress, **options)
        single = report
    if save_logits:
        write_logits(single, save_logits)
        render.info(f"logits [{len(single.tokens)}, {single.logits.shape[-1]}] written to {save_logits}")
    if plot:
        from .plot import plot_trace

        plot_trace(single or report.prompts[0], plot)
        render.info(f"plot written to {plot}" + (" (first prompt)" if single is None else ""))
    gated_layers = ([(l.layer, l.metrics) for l in single.layers] if single
                    else [(l["layer"], l["metrics"]) for l in report.layers])
    gate = trace_gate(single.summary if single else report.summary, gated_layers, max_imbalance=max_imbalance,
                      max_maxvio=max_maxvio, max_dead_experts=max_dead_experts, min_entropy=min_entropy)
    full = report.to_dict() if (fmt is TraceFormat.json or baseline) else {"command": "trace"}
    gate = baseline_gate(gate, full, baseline, max_drift)
    full["gate"] = gate.to_dict()
    if fmt is TraceFormat.table:
        for r in ([single] if single else report.prompts):
            render.render_trace(r)
        if single is None:
            render.render_corpus(report)
        _finish_gate(gate, exit_zero)
        return
    if fmt is TraceFormat.json:
        data = render.to_json(full).encode()
    elif fmt is TraceFormat.jsonl:
        data = render.to_jsonl(report.rows()).encode()
    elif fmt is TraceFormat.csv:
        data = render.to_csv(report.rows()).encode()
    else:
        data = _parquet(report.to_dataframe())
    _emit(data, output, fmt.value)
    _finish_gate(gate, exit_zero)


@app.command()
def diff(
    a: Annotated[str, typer.Argument(metavar="A.json", help="A saved `moetool trace --json` report.")],
    b: Annotated[str, typer.Argument(metavar="B.json", help="Another trace of the same tokens.")],
    json_: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    max_first_choice_change: Annotated[Optional[float], typer.Option(help="Gate: share of tokens whose first choice "
                                                                     "changed, in every layer.")] = None,
    max_set_change: Annotated[Optional[float], typer.Option(help="Gate: share of tokens whose expert set changed.")] = None,
    max_load_tv: Annotated[Optional[float], typer.Option(help="Gate: total-variation distance of the loads.")] = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Report gate failures without exit code 1.")] = False,
) -> None:
    """Compare two traces of the same tokens: changed first choices, changed expert sets, load shift."""
    from . import render
    from .diff import diff_traces, load_trace
    from .gates import Gate, check_threshold

    limits = [("first_choice_changed", check_threshold(max_first_choice_change, "--max-first-choice-change")),
              ("expert_set_changed", check_threshold(max_set_change, "--max-set-change")),
              ("load_tv", check_threshold(max_load_tv, "--max-load-tv"))]
    report = diff_traces(load_trace(a), load_trace(b), a, b)
    gate = Gate()
    for metric, limit in limits:
        if limit is not None:
            for l in report.layers:
                gate.check(metric, l[metric], limit, "<=", l["layer"])
    report.gate = gate.to_dict()
    if json_:
        render.write_stdout(render.to_json(report.to_dict()))
    else:
        render.render_diff(report)
    _finish_gate(gate, exit_zero)


class QuantFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    parquet = "parquet"


@app.command("quantize-report")
def quantize_report_cmd(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Checkpoint (local directory, .safetensors, "
                                                 "hub id); default: the bundled model.")] = None,
    schemes: Annotated[Optional[str], typer.Option(help="Comma-separated: int8,int4_g128,nf4,fp8_channel,fp8_block,"
                                                   "mxfp4,nvfp4 (default: all).")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Only these decoder layers, e.g. 0,3,5-7.")] = None,
    experts: Annotated[Optional[str], typer.Option(help="Only these experts, e.g. 0-7.")] = None,
    calibration: Annotated[Optional[str], typer.Option(help="Calibration text file (default: Python docs topics "
                                                       "and stdlib source).")] = None,
    calibration_tokens: Annotated[int, typer.Option(min=1, help="Calibration tokens to run.")] = 512,
    weight_only: Annotated[bool, typer.Option("--weight-only", help="Weight-space metrics only, no forward.")] = False,
    budget_bits: Annotated[Optional[float], typer.Option(help="Plan: average bits per expert weight, e.g. 4.5.")] = None,
    budget_gb: Annotated[Optional[float], typer.Option(help="Plan: GB (1e9 bytes) for the routed experts.")] = None,
    check_kl: Annotated[bool, typer.Option("--check-kl", help="Check the plan end to end: KL of the final logits "
                                           "vs full precision on held-out text, plan vs best uniform scheme.")] = False,
    export_plan: Annotated[Optional[str], typer.Option(help="Write the plan as JSON.")] = None,
    llama_cpp: Annotated[Optional[str], typer.Option(help="Write the per-layer plan as llama.cpp --tensor-type lines.")] = None,
    plot: Annotated[Optional[str], typer.Option(help="Layer x expert heatmap of output error (.png/.svg).")] = None,
    device: Annotated[Device, typer.Option(help="Device of the calibration forward.")] = Device.auto,
    json_: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    fmt: Annotated[QuantFormat, typer.Option("--format", help="table, json, or one row per (layer, expert, "
                                             "projection, scheme) as csv or parquet.")] = QuantFormat.table,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write --format output to this file.")] = None,
    max_output_error: Annotated[Optional[float], typer.Option(help="Gate: output_rel_error of every routed expert "
                                                              "projection under every scheme.")] = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Report gate failures without exit code 1.")] = False,
) -> None:
    """Per-expert quantization sensitivity on routed tokens, and a mixed-precision plan."""
    from . import render
    from .gates import Gate, check_threshold
    from .quant.schemes import parse_schemes
    from .tracing import parse_layers

    if model is None:
        _say_default()
    chosen = parse_schemes(schemes)
    for value, flag in ((budget_bits, "--budget-bits"), (budget_gb, "--budget-gb"),
                        (max_output_error, "--max-output-error")):
        if check_threshold(value, flag) is not None and value <= 0:
            raise MoetoolError(f"{flag} must be positive, got {value}")
    if budget_bits is not None and budget_gb is not None:
        raise MoetoolError("give --budget-bits or --budget-gb, not both")
    if (check_kl or export_plan or llama_cpp) and budget_bits is None and budget_gb is None:
        raise MoetoolError("--check-kl, --export-plan and --llama-cpp need a plan: pass --budget-bits or --budget-gb")
    if fmt is QuantFormat.parquet and not output:
        raise MoetoolError("--format parquet needs -o FILE")
    if plot is not None and not plot.endswith((".png", ".svg")):
        raise MoetoolError("--plot must name a .png or .svg file")
    from .quant.report import quantize_report

    with _layer_progress(enabled=True, label="experts") as progress:
        report = quantize_report(model, schemes=chosen, layers=parse_layers(layers), experts=parse_layers(experts),
                                 calibration=calibration, calibration_tokens=calibration_tokens,
                                 weight_only=weight_only, budget_bits=budget_bits, budget_gb=budget_gb,
                                 device=device.value, progress=progress)
    if check_kl:
        from .quant.check import kl_check

        report.plan["kl_check"] = kl_check(model, report.plan)
    gate = Gate()
    if max_output_error is not None:
        for r in report.rows:
            if isinstance(r.expert, int) and r.output_rel_error is not None:
                gate.check("output_rel_error", r.output_rel_error, max_output_error, "<=", r.layer,
                           f"expert {r.expert} {r.projection} {r.scheme}")
    data = report.to_dict()
    data["gate"] = gate.to_dict()
    if export_plan:
        render.atomic_write_bytes(export_plan, render.to_json(report.plan).encode())
        render.info(f"plan written to {export_plan}")
    if llama_cpp:
        lines = "".join(f"--tensor-type {t}\n" for t in report.plan["llama_cpp_tensor_types"])
        render.atomic_write_bytes(llama_cpp, lines.encode())
        render.info(f"llama.cpp overrides written to {llama_cpp}")
    if plot:
        from .plot import plot_quant

        plot_quant(report, plot)
        render.info(f"plot written to {plot}")
    fmt = QuantFormat.json if json_ else fmt
    if fmt is QuantFormat.table:
        render.render_quant(report)
    else:
        if fmt is QuantFormat.json:
            payload = render.to_json(data).encode()
        elif fmt is QuantFormat.csv:
            from dataclasses import asdict

            payload = render.to_csv(asdict(r) for r in report.rows).encode()
        else:
            payload = _parquet(report.to_dataframe().astype({"expert": "string"}))
        _emit(payload, output, fmt.value)
    _finish_gate(gate, exit_zero)


def _parquet(df) -> bytes:
    import io

    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise MoetoolError("--format parquet needs pyarrow: pip install 'moetool[parquet]'") from None
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


plan_app = typer.Typer(help="Plans in the runtime's own terms: offload, expert pinning, expert-parallel placement.",
                       no_args_is_help=True, add_completion=False)
app.add_typer(plan_app, name="plan")


@plan_app.command("eplb")
def plan_eplb(
    profile: Annotated[str, typer.Option("--profile", "-p", help="A `moetool profile` directory or a `trace --json` report.")],
    ranks: Annotated[int, typer.Option("--ranks", help="Expert-parallel GPUs.")],
    redundant: Annotated[int, typer.Option("--redundant", help="Extra physical expert slots (replicas of hot experts).")] = 0,
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes (hierarchical policy keeps an expert group on one node).")] = 1,
    groups: Annotated[Optional[int], typer.Option("--groups", help="Expert groups (default: the model's n_group, else 1).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="The profiled model (default: the profile's).")] = None,
    export_sglang: Annotated[Optional[str], typer.Option("--export-sglang", help="Write SGLang --init-expert-location JSON.")] = None,
    export_trtllm: Annotated[Optional[str], typer.Option("--export-trtllm", help="Write a TensorRT-LLM load-balancer YAML.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the JSON plan to this file.")] = None,
    min_balancedness: Annotated[Optional[float], typer.Option(help="Gate: mean balancedness after placement (0-1).")] = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Report gate failures without exit code 1.")] = False,
) -> None:
    """Expert-parallel placement with DeepSeek's EPLB: balancedness before/after, engine exports."""
    from . import render
    from .gates import Gate, check_threshold
    from .plans import eplb_plan, export_sglang as to_sglang, export_trtllm as to_trtllm, load_profile, model_spec
    from .plans import public, vllm_flags

    check_threshold(min_balancedness, "--min-balancedness")
    if min_balancedness is not None and not 0 <= min_balancedness <= 1:
        raise MoetoolError("--min-balancedness is a share: give a number between 0 and 1")
    stats = load_profile(profile)
    spec, _ = model_spec(model, stats)
    plan = eplb_plan(stats, spec, ranks, redundant, nodes, groups)
    gate = Gate()
    if min_balancedness is not None:
        gate.check("balancedness_after", plan["balancedness_after"], min_balancedness, ">=")
    if export_sglang:
        render.atomic_write_bytes(export_sglang, render.to_json(to_sglang(plan)).encode())
        render.info(f"SGLang expert location written to {export_sglang} (use with --init-expert-location "
                    f"{export_sglang} --ep-num-redundant-experts {redundant})")
    if export_trtllm:
        render.atomic_write_bytes(export_trtllm, to_trtllm(plan).encode())
        render.info(f"TensorRT-LLM load-balancer config written to {export_trtllm}")
    out = public(plan)
    out["vllm_flags"] = vllm_flags(plan)
    out["gate"] = gate.to_dict()
    if json_ or output:
        _emit(render.to_json(out).encode(), output, "EPLB plan")
    else:
        con = render.stdout_console()
        before = plan["balancedness_before"]
        con.print(f"[bold]EPLB[/bold] {plan['num_experts']} experts + {redundant} redundant on {ranks} ranks "
                  f"({plan['slots_per_rank']} slots each, {nodes} node(s), {plan['groups']} group(s), {plan['policy']} "
                  f"policy), fitted on {plan['tokens']:,} tokens")
        con.print(f"balancedness (mean / max rank load, 1.0 = perfect): before "
                  f"{'-' if before is None else f'{before:.3f}'}, after {plan['balancedness_after']:.3f}")
        from rich.table import Table

        t = Table(box=None, header_style="bold")
        for c in ("layer", "before", "after", "replicated experts"):
            t.add_column(c, justify="right" if c != "replicated experts" else "left")
        for l in plan["layers"]:
            rep = [f"{e}x{c}" for e, c in enumerate(l["replicas"]) if c > 1]
            t.add_row(str(l["layer"]), "-" if l["balancedness_before"] is None else f"{l['balancedness_before']:.3f}",
                      f"{l['balancedness_after']:.3f}", " ".join(rep) or "-")
        con.print(t)
        con.print(f"vLLM (rebalances online): {out['vllm_flags']}")
    _finish_gate(gate, exit_zero)


@plan_app.command("pin")
def plan_pin(
    profile: Annotated[str, typer.Option("--profile", "-p", help="A `moetool profile` directory or a `trace --json` report.")],
    budget: Annotated[str, typer.Option("--budget", help="GPU memory for routed experts, e.g. 12GB or 12GiB.")],
    holdout: Annotated[Optional[str], typer.Option("--holdout", help="A profile of held-out text of the same workload: "
                                                   "the expected hit rate on unseen traffic.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="The profiled model (default: the profile's).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Storage format of the expert weights (bf16, fp8, int4_g128, "
                                     "nf4, mxfp4, ...).")] = "bf16",
    plot: Annotated[Optional[str], typer.Option("--plot", help="Write the hit-rate curve (.png or .svg).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the JSON plan to this file.")] = None,
    min_hit_rate: Annotated[Optional[float], typer.Option(help="Gate: hit rate (held-out when given) (0-1).")] = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Report gate failures without exit code 1.")] = False,
) -> None:
    """Which routed experts to keep on the GPU under a budget, and the hit rate that buys."""
    from . import render
    from .formats import FORMATS
    from .gates import Gate, check_threshold
    from .plans import SCHEMA_VERSION, expert_bytes, load_profile, model_spec, parse_bytes
    from .plans.pin import pin_plan

    check_threshold(min_hit_rate, "--min-hit-rate")
    if min_hit_rate is not None and not 0 <= min_hit_rate <= 1:
        raise MoetoolError("--min-hit-rate is a share: give a number between 0 and 1")
    if fmt not in FORMATS:
        raise MoetoolError(f"--format must be one of {', '.join(FORMATS)}")
    if plot is not None and not plot.endswith((".png", ".svg")):
        raise MoetoolError("--plot must name a .png or .svg file")
    nbytes = parse_bytes(budget, "--budget")
    stats = load_profile(profile)
    ho = load_profile(holdout) if holdout else None
    spec, _ = model_spec(model, stats)
    plan = pin_plan(stats, expert_bytes(spec, fmt), nbytes, ho)
    plan = {"schema_version": SCHEMA_VERSION, "command": "plan pin", "model": stats.meta.get("model"), "format": fmt,
            **plan}
    gate = Gate()
    if min_hit_rate is not None:
        which = "hit_rate_holdout" if ho is not None else "hit_rate"
        gate.check(which, plan[which], min_hit_rate, ">=")
    plan["gate"] = gate.to_dict()
    if ho is None:
        render.info("hit rate measured on the profile the plan was fitted on (optimistic); --holdout PROFILE "
                    "of other text gives the expected rate on unseen traffic")
    if plot:
        from .plans.plot import plot_hit_curve

        plot_hit_curve(plan, plot)
        render.info(f"hit-rate curve written to {plot}")
    if json_ or output:
        _emit(render.to_json(plan).encode(), output, "pinning plan")
    else:
        con = render.stdout_console()
        ho_txt = "" if ho is None else f", held-out {plan['hit_rate_holdout']:.3f}"
        full = plan["full_hit_rate"]
        con.print(f"[bold]pin[/bold] {plan['resident_experts']} of {plan['experts_total']} routed experts "
                  f"({render.human_bytes(plan['resident_bytes'])} of {render.human_bytes(plan['all_experts_bytes'])}, "
                  f"{fmt}) under {render.human_bytes(nbytes)}: hit rate {plan['hit_rate']:.3f}{ho_txt}"
                  + ("" if full is None else f"; every top-k expert resident for {full:.3f} of token-layers"))
        from rich.table import Table

        t = Table(title="Hit rate against the budget", title_justify="left", box=None, header_style="bold")
        for c in ("budget", "experts", "hit rate", "held-out"):
            t.add_column(c, justify="right")
        for row in plan["curve"]:
            t.add_row(render.human_bytes(row["budget_bytes"]), str(row["experts"]), f"{row['hit_rate']:.3f}",
                      "-" if row["hit_rate_holdout"] is None else f"{row['hit_rate_holdout']:.3f}")
        con.print(t)
    _finish_gate(gate, exit_zero)


@plan_app.command("offload")
def plan_offload(
    model: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", help="Checkpoint directory (exact bytes from the "
                                                   "headers), config.json, sample name or hub id.")] = None,
    model_opt: Annotated[Optional[str], typer.Option("--model", "-m", help="Same as MODEL.")] = None,
    vram: Annotated[str, typer.Option("--vram", help="GPU memory, e.g. 24GB or 24GiB.")] = "24GB",
    ram: Annotated[Optional[str], typer.Option("--ram", help="CPU memory available for weights, e.g. 64GB.")] = None,
    context: Annotated[str, typer.Option("--context", help="Context length for the KV cache, e.g. 8192 or 32k.")] = "4096",
    batch: Annotated[int, typer.Option("--batch", min=1, help="Sequences decoded together.")] = 1,
    kv_dtype: Annotated[str, typer.Option("--kv-dtype", help="KV cache dtype: bf16, fp16, fp32, fp8.")] = "bf16",
    fmt: Annotated[Optional[str], typer.Option("--format", help="Storage format when counting from config.json "
                                               "(bf16, fp8, int4_g128, nf4, mxfp4, ...); a checkpoint's own "
                                               "bytes are used when it has weights.")] = None,
    profile: Annotated[Optional[str], typer.Option("--profile", "-p", help="A profile of the workload: measured distinct "
                                                   "experts per decode step for --batch > 1.")] = None,
    reserve: Annotated[str, typer.Option("--reserve", help="GPU memory kept free for the CUDA context and compute "
                                         "buffers.")] = "1GiB",
    gpu_bandwidth: Annotated[str, typer.Option("--gpu-bandwidth", help="GPU memory bandwidth per second.")] = "1000GB",
    cpu_bandwidth: Annotated[str, typer.Option("--cpu-bandwidth", help="CPU memory bandwidth per second.")] = "60GB",
    pcie_bandwidth: Annotated[str, typer.Option("--pcie-bandwidth", help="Host-to-GPU bandwidth per second.")] = "25GB",
    device_map_out: Annotated[Optional[str], typer.Option("--device-map", help="Write the accelerate device_map JSON "
                                                          "(needs transformers).")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the JSON plan to this file.")] = None,
    min_tokens_per_s: Annotated[Optional[float], typer.Option(help="Gate: estimated llama.cpp decode tokens/s.")] = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Report gate failures without exit code 1.")] = False,
) -> None:
    """What fits on the GPU: per-layer placement, llama.cpp flags, accelerate device_map, decode estimate."""
    from . import render
    from .arch import spec_from_config
    from .counting import count as do_count
    from .formats import FORMATS
    from .gates import Gate, check_threshold
    from .plans import SCHEMA_VERSION, load_profile, parse_bytes
    from .plans.offload import device_map, items_from_checkpoint, items_from_config, offload_plan
    from .source import resolve

    if model is not None and model_opt is not None:
        raise MoetoolError("give MODEL or --model, not both")
    model = model or model_opt
    if model is None:
        _say_default()
    check_threshold(min_tokens_per_s, "--min-tokens-per-s")
    if fmt is not None and fmt not in FORMATS:
        raise MoetoolError(f"--format must be one of {', '.join(FORMATS)}")
    ctx_s = context.strip().lower()
    try:
        ctx = int(float(ctx_s[:-1]) * 1024) if ctx_s.endswith("k") else int(ctx_s)
    except ValueError:
        raise MoetoolError(f"--context: cannot read {context!r} (e.g. 8192 or 32k)") from None
    if ctx < 1:
        raise MoetoolError("--context must be at least 1")
    sizes = {flag: parse_bytes(v, flag) for flag, v in (("--vram", vram), ("--reserve", reserve),
                                                        ("--gpu-bandwidth", gpu_bandwidth),
                                                        ("--cpu-bandwidth", cpu_bandwidth),
                                                        ("--pcie-bandwidth", pcie_bandwidth))}
    for flag in ("--gpu-bandwidth", "--cpu-bandwidth", "--pcie-bandwidth"):
        if sizes[flag] <= 0:
            raise MoetoolError(f"{flag} must be positive")
    ram_b = parse_bytes(ram, "--ram") if ram else None
    stats = load_profile(profile) if profile else None
    use_headers = fmt is None
    ckpt = resolve(model, revision=revision, read_headers=use_headers)
    spec = spec_from_config(ckpt.config, ckpt.config_path)
    if spec.moe is None:
        raise MoetoolError(f"{ckpt.source}: {spec.model_type} has no routed experts; nothing to offload by expert")
    if stats is not None and (stats.num_experts != spec.moe.num_experts or list(stats.meta["moe_layers"]) != spec.moe_layers):
        raise MoetoolError(f"{profile}: a profile of another model (experts or MoE layers differ)")
    notes = []
    if ckpt.tensors is not None:
        items, notes = items_from_checkpoint(ckpt, spec)
        source = "safetensors headers (exact stored bytes)"
    else:
        fmt = fmt or "bf16"
        items = items_from_config(spec, fmt)
        source = f"config.json, weights in {fmt} (formats.py)"
    report = do_count(ckpt, context=ctx, batch=batch, kv_dtype=kv_dtype, use_headers=False)
    kv = report.kv_cache
    kv_bytes = int(kv["bytes"]) + int(kv.get("state_bytes") or 0)
    plan = offload_plan(items, spec, vram=sizes["--vram"], ram=ram_b, kv_bytes=kv_bytes, kv_per_step=kv_bytes, context=ctx,
                        batch=batch, reserve=sizes["--reserve"], stats=stats, gpu_bw=sizes["--gpu-bandwidth"],
                        cpu_bw=sizes["--cpu-bandwidth"], pcie_bw=sizes["--pcie-bandwidth"])
    plan["notes"] = notes + plan["notes"]
    dmap = None
    if device_map_out:
        dmap, why = device_map(ckpt.config, plan)
        if why:
            plan["notes"].append(why)
    out = {"schema_version": SCHEMA_VERSION, "command": "plan offload", "model": ckpt.source,
           "model_type": spec.model_type, "bytes_from": source,
           **{k: v for k, v in plan.items() if not k.startswith("_")}, "device_map": dmap}
    gate = Gate()
    if min_tokens_per_s is not None:
        gate.check("llama_cpp_tokens_per_s", out["estimate"]["llama_cpp_tokens_per_s"], min_tokens_per_s, ">=")
    if not out["fits_vram"] or not out["fits_ram"]:
        gate.enabled = True
    out["gate"] = gate.to_dict()
    if device_map_out and dmap is not None:
        render.atomic_write_bytes(device_map_out, render.to_json(dmap).encode())
        render.info(f"device_map written to {device_map_out} (from_pretrained(..., device_map=json.load(open(...))))")
    for n in out["notes"]:
        render.info(n)
    if json_ or output:
        _emit(render.to_json(out).encode(), output, "offload plan")
    else:
        con = render.stdout_console()
        est = out["estimate"]
        hb = render.human_bytes
        con.print(f"[bold]{render._escape(ckpt.source)}[/bold]  model_type={spec.model_type}  bytes from {source}")
        con.print(f"GPU {hb(out['gpu_bytes'])} of {hb(out['vram_bytes'])} (reserve {hb(out['reserve_bytes'])}, KV cache "
                  f"{hb(out['kv_cache_bytes'])} at context {ctx:,} x batch {batch}); CPU {hb(out['cpu_bytes'])}"
                  + ("" if ram_b is None else f" of {hb(ram_b)}"))
        con.print(f"expert layers on the GPU: {out['expert_layers_on_gpu']} of {out['expert_layers']}; "
                  f"layers on the GPU: {out['gpu_layers']} of {spec.num_layers}")
        con.print(f"[bold]llama.cpp[/bold]: {out['llama_cpp']}    or: {out['llama_cpp_override']}")
        tps = est["llama_cpp_tokens_per_s"]
        acc = est["accelerate_tokens_per_s"]
        con.print(f"decode estimate (upper bound, memory-bound roofline; GPU {hb(est['gpu_bandwidth'])}/s, CPU "
                  f"{hb(est['cpu_bandwidth'])}/s, PCIe {hb(est['pcie_bandwidth'])}/s): llama.cpp "
                  f"{tps:,.3g} tokens/s" + ("" if acc is None else f", accelerate offload {acc:,.3g} tokens/s"))
        from rich.table import Table

        t = Table(box=None, header_style="bold")
        for c in ("layer", "non-expert", "on", "experts", "on"):
            t.add_column(c, justify="right")
        for l in out["layers"]:
            t.add_row(str(l["layer"]), hb(l["non_expert_bytes"]), l["non_expert_device"],
                      hb(l["expert_bytes"]) if l["expert_bytes"] else "-", l["expert_device"] or "-")
        con.print(t)
    if not out["fits_vram"] or not out["fits_ram"]:
        gate.passed = False
    _finish_gate(gate, exit_zero)


@app.command()
def prune(
    model: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", help="Checkpoint directory with safetensors weights.")] = None,
    model_opt: Annotated[Optional[str], typer.Option("--model", "-m", help="Same as MODEL.")] = None,
    profile: Annotated[Optional[str], typer.Option("--profile", "-p", help="A `moetool profile` directory (or a "
                                                   "`trace --json` report) of the workload.")] = None,
    keep: Annotated[Optional[int], typer.Option("--keep", min=1, help="Experts to keep in every MoE layer.")] = None,
    drop_fraction: Annotated[Optional[float], typer.Option("--drop-fraction", help="Share of experts to drop in every "
                                                           "MoE layer, e.g. 0.25.")] = None,
    criterion: Annotated[str, typer.Option("--criterion", help="reap, frequency or weighted-frequency.")] = "reap",
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Directory for the pruned checkpoint (new).")] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="Only the per-expert saliency table; write nothing.")] = False,
    check_kl: Annotated[bool, typer.Option("--check-kl", help="KL of the pruned model's next-token distribution vs "
                                           "the original on held-out text (moetool's forward).")] = False,
    check_text: Annotated[Optional[str], typer.Option("--check-text", help="Held-out text file for --check-kl "
                                                      "(default: Python documentation text).")] = None,
    max_kl: Annotated[Optional[float], typer.Option(help="Gate: mean KL(original || pruned) per token.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Report gate failures without exit code 1.")] = False,
) -> None:
    """Per-expert saliency (REAP, frequency) from a profile, and a pruned checkpoint transformers loads."""
    import numpy as np

    from . import render
    from .gates import Gate, check_threshold
    from .plans import SCHEMA_VERSION, load_profile, model_spec
    from .plans.prune import choose, prune_checkpoint, report_rows, saliency

    if model is not None and model_opt is not None:
        raise MoetoolError("give MODEL or --model, not both")
    model = model or model_opt
    if profile is None:
        raise MoetoolError("prune needs --profile (a `moetool profile` of the workload to keep)")
    if not report_only:
        if (keep is None) == (drop_fraction is None):
            raise MoetoolError("give one of --keep N or --drop-fraction F")
        if output is None:
            raise MoetoolError("name the pruned checkpoint's directory with -o DIR (or use --report-only)")
        if os.path.exists(output):
            raise MoetoolError(f"{output} exists; name a new directory for the pruned checkpoint")
    if drop_fraction is not None and not 0 <= drop_fraction < 1:
        raise MoetoolError("--drop-fraction is a share: give a number in [0, 1)")
    check_threshold(max_kl, "--max-kl")
    if max_kl is not None and not check_kl:
        raise MoetoolError("--max-kl needs --check-kl")
    if check_text is not None and not os.path.isfile(check_text):
        raise MoetoolError(f"--check-text: {check_text} is not a file")
    stats = load_profile(profile)
    spec, ckpt = model_spec(model, stats, read_headers=not report_only)
    E, k = spec.moe.num_experts, spec.moe.top_k
    if keep is not None:
        n_keep = keep
    elif drop_fraction is not None:
        n_keep = E - int(round(drop_fraction * E))
    else:
        n_keep = None
    notes = []
    g = spec.moe.router.n_group
    if n_keep is not None:
        if not k <= n_keep <= E:
            raise MoetoolError(f"keep {n_keep} experts per layer: must be between top-k ({k}) and {E}")
        if g > 1 and n_keep % g:
            raise MoetoolError(f"the router picks among {g} expert groups: --keep must be a multiple of {g}")
        if g > 1:
            notes.append(f"group-limited router ({g} groups): {n_keep // g} experts kept per group; group scores can "
                         "differ from the original with the dropped experts masked")
    sal = saliency(stats, criterion)
    kept = choose(sal, n_keep, g if g > 1 else 1) if n_keep is not None else None
    out = {"schema_version": SCHEMA_VERSION, "command": "prune", "model": ckpt.source, "criterion": criterion,
           "num_experts": E, "keep": n_keep, "tokens": stats.tokens,
           "kept": {str(l): v for l, v in kept.items()} if kept else None,
           "experts": report_rows(stats, kept), "notes": notes}
    gate = Gate()
    if not report_only:
        if ckpt.root is None or not ckpt.has_weights:
            raise MoetoolError(f"{ckpt.source}: prune needs a local checkpoint directory with safetensors weights")
        out["written"] = prune_checkpoint(ckpt.root, output, ckpt.config, kept, E, spec.moe.expert_ffn)
        out["output"] = output
        render.info(f"pruned checkpoint ({n_keep} of {E} experts per MoE layer) written to {output}")
        if check_kl:
            import torch

            from .quant.check import default_eval_text
            from .tracing import _resolve_for_forward, load_tokenizer
            from .forward import run_forward

            orig = _resolve_for_forward(ckpt.root, None)
            tok = load_tokenizer(orig)
            if tok is None:
                raise MoetoolError("--check-kl needs the checkpoint's tokenizer.json")
            text = open(check_text, encoding="utf-8").read() if check_text else default_eval_text()
            limit = min(512, getattr(spec, "max_position_embeddings", None) or 512)
            ids = tok.encode(text).ids[:limit]
            if not ids:
                raise MoetoolError("--check-text has no tokens")
            p = run_forward(orig, ids, record=False).logits.double()
            q = run_forward(_resolve_for_forward(output, None), ids, record=False).logits.double()
            lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
            kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
            out["kl_check"] = {"tokens": len(ids), "kl_mean": kl,
                               "top1_agreement": float((p.argmax(-1) == q.argmax(-1)).double().mean())}
            if max_kl is not None:
                gate.check("kl_mean", kl, max_kl, "<=")
    out["gate"] = gate.to_dict()
    for n in notes:
        render.info(n)
    if json_:
        _emit(render.to_json(out).encode(), None, "prune report")
    else:
        con = render.stdout_console()
        con.print(f"[bold]{render._escape(ckpt.source)}[/bold]  {criterion} saliency over {stats.tokens:,} tokens"
                  + ("" if n_keep is None else f"; keeping {n_keep} of {E} experts per MoE layer"))
        from rich.table import Table

        t = Table(box=None, header_style="bold")
        for c in ("layer", "kept" if kept else "most salient", "dropped" if kept else "least salient"):
            t.add_column(c, justify="left")
        for l, v in sal.items():
            order = [int(i) for i in np.argsort(-v, kind="stable")]
            if kept:
                t.add_row(str(l), " ".join(map(str, kept[l])), " ".join(str(e) for e in range(E) if e not in kept[l]))
            else:
                t.add_row(str(l), " ".join(map(str, order[:8])), " ".join(map(str, order[-8:][::-1])))
        con.print(t)
        if "kl_check" in out:
            c = out["kl_check"]
            con.print(f"KL(original || pruned) {c['kl_mean']:.4g} per token over {c['tokens']} held-out tokens; "
                      f"top-1 agreement {c['top1_agreement']:.3f}")
    _finish_gate(gate, exit_zero)


whatif_app = typer.Typer(help="What-ifs on the routing: fewer experts per token.", no_args_is_help=True,
                         add_completion=False)
app.add_typer(whatif_app, name="whatif")


@whatif_app.command("topk")
def whatif_topk(
    prompt: Annotated[Optional[str], typer.Argument(metavar="[PROMPT]", help="Text to run (default: held-out Python "
                                                    "documentation text, first --max-tokens tokens).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Checkpoint (default: the bundled model).")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Experts per token in the variant.")] = None,
    min_p: Annotated[Optional[float], typer.Option("--min-p", help="Variant: keep experts with gate weight >= P x "
                                                   "the token's largest.")] = None,
    renormalize: Annotated[bool, typer.Option("--renormalize", help="With --min-p: scale kept weights back to the "
                                              "original sum.")] = False,
    file: Annotated[Optional[str], typer.Option("--file", help="Read the text from this file.")] = None,
    tokens: Annotated[Optional[str], typer.Option(help="Token ids instead of text, e.g. 1,2,3.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="At most this many tokens.")] = 256,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when available.")] = Device.auto,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the JSON to this file.")] = None,
    max_kl: Annotated[Optional[float], typer.Option(help="Gate: mean KL(original || variant) per token.")] = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Report gate failures without exit code 1.")] = False,
) -> None:
    """KL of the final logits and routing changes when each token uses fewer experts."""
    from . import render
    from .gates import Gate, check_threshold
    from .plans.whatif import whatif

    check_threshold(max_kl, "--max-kl")
    if sum(x is not None for x in (prompt, file, tokens)) > 1:
        raise MoetoolError("give one of PROMPT, --file or --tokens")
    if (k is None) == (min_p is None):
        raise MoetoolError("give one of --k or --min-p")
    if renormalize and min_p is None:
        raise MoetoolError("--renormalize goes with --min-p")
    if model is None:
        _say_default()
    ids = _parse_tokens(tokens)
    if ids is None:
        from .quant.check import default_eval_text
        from .tracing import _resolve_for_forward, load_tokenizer

        if file is not None:
            try:
                with open(file, encoding="utf-8") as fh:
                    text = fh.read(1 << 24)
            except (OSError, UnicodeDecodeError) as e:
                raise MoetoolError(f"--file {file}: cannot read it as UTF-8 text ({e.__class__.__name__})") from None
        else:
            text = prompt if prompt is not None else default_eval_text()
        tok = load_tokenizer(_resolve_for_forward(model, revision))
        if tok is None:
            raise MoetoolError("the checkpoint has no tokenizer.json: give --tokens")
        ids = tok.encode(text).ids
    ids = ids[:max_tokens]
    r = whatif(model, ids, k=k, min_p=min_p, renormalize=renormalize, device=device.value, revision=revision)
    gate = Gate()
    if max_kl is not None:
        gate.check("kl_mean", r["kl_mean"], max_kl, "<=")
    r["gate"] = gate.to_dict()
    if json_ or output:
        _emit(render.to_json(r).encode(), output, "what-if")
    else:
        con = render.stdout_console()
        v = r["variant"]
        what = f"top-{v['k']}" if "k" in v else f"min-p {v['min_p']}" + (" (renormalised)" if v["renormalize"] else "")
        con.print(f"[bold]{render._escape(r['model'])}[/bold]  top-{r['top_k']} -> {what} over {r['tokens']} tokens: "
                  f"KL(original || variant) mean {r['kl_mean']:.4g}, max {r['kl_max']:.4g}; top-1 agreement "
                  f"{r['top1_agreement']:.3f}; {r['experts_per_token']:.2f} experts per token "
                  f"({100 * r['compute_saved']:.1f}% expert compute saved)")
        from rich.table import Table

        t = Table(box=None, header_style="bold")
        for c in ("layer", "experts/token", "saved", "first choice kept", "set overlap (Jaccard)"):
            t.add_column(c, justify="right")
        for l in r["layers"]:
            t.add_row(str(l["layer"]), f"{l['experts_per_token']:.2f}", f"{100 * l['compute_saved']:.1f}%",
                      f"{l['first_choice_unchanged']:.3f}", f"{l['jaccard_mean']:.3f}")
        con.print(t)
    _finish_gate(gate, exit_zero)


def _emit(data: bytes, output: Optional[str], what: str) -> None:
    """Machine-readable output: atomically to `output`, or raw to stdout."""
    from . import render

    if output:
        render.atomic_write_bytes(output, data)
        render.info(f"{what} written to {output}")
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def _finish_gate(gate, exit_zero: bool) -> None:
    """Print gate violations on stderr; exit 1 when a requested gate failed (unless --exit-zero)."""
    from . import render

    if not gate.enabled:
        return
    for v in gate.violations:
        where = f" (layer {v['layer']})" if "layer" in v else ""
        limit = v.get("limit", v.get("expected", v.get("baseline")))
        render.warn(f"gate failed: {v['metric']}{where} = {v['value']}, limit {limit}")
    if not gate.passed and not exit_zero:
        raise typer.Exit(1)


def _say_default() -> None:
    from . import render
    from .source import DEFAULT_NAME, default_model_dir

    render.info(f"no model given: using the bundled default model {DEFAULT_NAME} ({default_model_dir()}); "
                "see docs/default-model.md")


class _layer_progress:
    """A progress bar over decoder layers on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool, label: str = "layers"):
        self.enabled = enabled and sys.stderr.isatty()
        self.label = label
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from .render import stderr_console

        self.bar = Progress(TextColumn(self.label), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), console=stderr_console(), transient=True)
        self.bar.start()
        task = self.bar.add_task("layers", total=None)
        return lambda done, total: self.bar.update(task, completed=done, total=total)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: run the app and turn every failure into an exit code."""
    from . import render

    try:
        rv = app(args=argv, prog_name="moetool", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        code = getattr(e, "exit_code", 0)
    except _USAGE_ERRORS as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `moetool`: help was wanted
            render.write_stdout(app_help() + "\n")
            code = 0
        else:
            render.error_line(e.format_message().strip().replace("\n", " "))
            code = 2
    except typer.Abort:
        render.error_line("aborted")
        code = 130
    except MoetoolError as e:
        render.error_line(str(e))
        code = e.exit_code
    except BrokenPipeError:
        code = 0  # `moetool ... | head` closed the pipe: not an error
        try:
            sys.stdout = None  # type: ignore[assignment]
        except Exception:
            pass
    except KeyboardInterrupt:
        render.error_line("interrupted")
        code = 130
    except Exception as e:  # an internal error: our bug, not the user's input
        if render.debug_enabled():
            traceback.print_exc()
        render.error_line(f"internal error: {e.__class__.__name__}: {e} (set MOETOOL_DEBUG=1 for the traceback)")
        code = 3
    sys.exit(code)
