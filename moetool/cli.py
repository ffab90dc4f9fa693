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
    add_completion=True,
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
    version: Annotated[Optional[bool], typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    pass


@app.command()
def count(
    model: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", help="Local directory, config.json, .safetensors "
                                                   "file, sample config name (e.g. mixtral-8x7b), or hub id org/name; "
                                                   "- reads a config.json from stdin; default: the bundled model.")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    context: Annotated[str, typer.Option(help="Context length for the KV cache and attention FLOPs: 4096, 32k "
                                         "(k = 1024), 1M.")] = "4096",
    batch: Annotated[int, typer.Option(min=1, help="Sequences served at once (KV cache).")] = 1,
    kv_dtype: Annotated[str, typer.Option(help="KV cache element type: bf16, fp16, fp32, fp8.")] = "bf16",
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Show the per-layer table.")] = False,
    config_only: Annotated[bool, typer.Option("--config-only", help="Count from config.json alone; skip the headers.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="JSON on stdout (same as --format json).")] = False,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.table,
    expect_total: Annotated[Optional[str], typer.Option(help="Gate: expected total parameters, e.g. 46.7B.")] = None,
    expect_active: Annotated[Optional[str], typer.Option(help="Gate: expected active parameters per token "
                                                         "INCLUDING the input embedding, as model cards publish them "
                                                         "(Mixtral 8x7B: 12.9B).")] = None,
    expect_active_excl_embedding: Annotated[Optional[str], typer.Option(
        "--expect-active-excl-embedding", help="Gate: expected active parameters EXCLUDING the input embedding "
        "(Mixtral 8x7B: 12.75B).")] = None,
    tolerance: Annotated[str, typer.Option(help="Relative tolerance of --expect-*, e.g. 0.5%.")] = "0.5%",
    baseline: Annotated[Optional[str], typer.Option(help="Gate: compare with a saved `count --json` report.")] = None,
    max_drift: Annotated[Optional[str], typer.Option(help="Relative drift allowed against --baseline, e.g. 2%.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the output (any --format) to this "
                                                  "file instead of stdout.")] = None,
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
    context_len = parse_context(context)
    _check_output_dir(output)
    if model == "-":
        from .source import resolve

        model = resolve(_stdin_config(), read_headers=False)
        model.source = "-"
    report = do_count(model, revision=revision, context=context_len, batch=batch, kv_dtype=kv_dtype.lower(),
                      use_headers=not config_only)
    gate = count_gate(report, expect_total, expect_active, tolerance, expect_active_excl_embedding)
    data = report.to_dict()
    gate = baseline_gate(gate, data, baseline, max_drift)
    data["gate"] = gate.to_dict()
    fmt = Format.json if json_ else fmt
    if fmt is Format.json:
        _emit(render.to_json(data).encode(), output, "json")
        for n in report.notes:
            render.info(n)
    elif fmt is Format.csv:
        _emit(render.count_csv(report, per_layer).encode(), output, "csv")
    else:
        _table_out(lambda: render.render_count(report, per_layer=per_layer), output)
    _finish_gate(gate, exit_zero)


def parse_context(value: str) -> int:
    """'4096', '32k' / '32K' (x1024), '1M' (x1024^2), '131072' -> tokens."""
    t = value.strip().replace("_", "").replace(",", "")
    mult = {"k": 1024, "m": 1024 ** 2}.get(t[-1:].lower(), 1)
    try:
        n = int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise MoetoolError(f"--context: cannot read {value!r} as a length (e.g. 4096, 32k, 1M)") from None
    if n < 1:
        raise MoetoolError(f"--context must be at least 1, got {value!r}")
    return n


def _stdin_config(name: str = "config.json") -> str:
    """`count -` / `diff - B.json`: stdin saved as `name` in a temporary directory that lives until exit."""
    import atexit
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="moetool-stdin-")
    atexit.register(shutil.rmtree, d, True)
    path = os.path.join(d, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(sys.stdin.read())
    return path


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
    args: Annotated[Optional[list[str]], typer.Argument(metavar="[MODEL] [PROMPT]", help="MODEL then PROMPT; one "
                                                        "argument is the PROMPT (the MODEL when it names an existing "
                                                        "directory or .safetensors file, or with --tokens / --file); "
                                                        "PROMPT - reads it from stdin.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Checkpoint: local directory, .safetensors "
                                                 "file, or hub id (downloaded into the hub cache); default: the "
                                                 "bundled model.")] = None,
    tokens: Annotated[Optional[str], typer.Option(help="Token ids instead of a prompt, e.g. 1,2,3.")] = None,
    file: Annotated[Optional[str], typer.Option("--file", help="Many prompts: .txt (one per line) or .jsonl "
                                                "({\"text\": ...} per line); - reads lines from stdin. Prints the "
                                                "corpus tables (add --per-token for each prompt's tokens).")] = None,
    per_token: Annotated[bool, typer.Option("--per-token", help="With --file: also each prompt's per-token "
                                            "table.")] = False,
    generate: Annotated[int, typer.Option(min=0, help="Greedy-generate N tokens after the prompt and trace them too.")] = 0,
    capacity_factor: Annotated[Optional[float], typer.Option(help="Report tokens dropped at this capacity factor "
                                                             "(Switch/GShard, position order).")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Only these decoder layers, e.g. 0,3,5-7 (the forward stops "
                                                  "after the last one).")] = None,
    logits: Annotated[bool, typer.Option("--logits", help="Include router logits, selection scores and the k/k+1 "
                                         "margin per token in the JSON.")] = False,
    plot: Annotated[Optional[str], typer.Option(help="Write a layer x expert load heatmap and a token x layer "
                                                "first-choice map (.png or .svg).")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision.")] = None,
    dtype: Annotated[DType, typer.Option(help="Compute dtype of the forward (the router runs in float32).")] = DType.float32,
    router_dtype: Annotated[DType, typer.Option(help="Router matmul dtype (near ties flip in bf16).")] = DType.float32,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when available.")] = Device.auto,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads of the forward (default: 1 for models "
                                                   "with hidden size under 1024, where more threads cost more CPU "
                                                   "time than they save; otherwise torch's default).")] = None,
    save_logits: Annotated[Optional[str], typer.Option(help="Write final float32 logits [tokens, vocab] as .npy.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="JSON on stdout (same as --format json).")] = False,
    fmt: Annotated[TraceFormat, typer.Option("--format", help="table, json, or the long table (one row per prompt, "
                                             "layer, token, slot) as jsonl, csv or parquet.")] = TraceFormat.table,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the --format output (the table too) "
                                                  "to this file (atomically) instead of stdout.")] = None,
    max_imbalance: Annotated[Optional[float], typer.Option(help="Gate: max load / mean load in every layer.")] = None,
    max_maxvio: Annotated[Optional[float], typer.Option(help="Gate: MaxVio in every layer.")] = None,
    max_dead_experts: Annotated[Optional[int], typer.Option(min=0, help="Gate: experts never chosen, per layer.")] = None,
    min_entropy: Annotated[Optional[float], typer.Option(help="Gate: normalised load entropy in every layer (a share, "
                                                         "0 to 1).")] = None,
    baseline: Annotated[Optional[str], typer.Option(help="Gate: compare the summary with a saved `trace --json`.")] = None,
    max_drift: Annotated[Optional[str], typer.Option(help="Relative drift allowed against --baseline, e.g. 2%.")] = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Report gate failures without exit code 1.")] = False,
) -> None:
    """Run the reference forward pass, record every router decision, and measure the routing."""
    from . import render
    from .tracing import open_checkpoint, parse_layers, read_prompts, set_threads, trace_many
    from .tracing import save_logits as write_logits
    from .tracing import trace as do_trace

    model, prompt = _model_and_prompt(args or [], model, tokens is not None or file is not None)
    if prompt == "-":
        prompt = sys.stdin.read().removesuffix("\n")  # as "$(cat file)" would
    example = prompt is None and tokens is None and file is None
    if example:
        from .tracing import EXAMPLE_PROMPT

        prompt = EXAMPLE_PROMPT
    fmt = TraceFormat.json if json_ else fmt
    if fmt is TraceFormat.parquet and not output:
        raise MoetoolError("--format parquet needs -o FILE")
    if sum(x is not None for x in (prompt, tokens, file)) > 1:
        raise MoetoolError("give one of PROMPT, --tokens or --file")
    if per_token and not file:
        raise MoetoolError("--per-token goes with --file (one prompt always shows its tokens)")
    if save_logits is not None and not save_logits.endswith(".npy"):
        raise MoetoolError("--save-logits must name a .npy file")
    if save_logits and file:
        raise MoetoolError("--save-logits works with one prompt, not --file")
    if save_logits and layers:
        raise MoetoolError("--save-logits needs the whole forward; drop --layers")
    if plot is not None and not plot.endswith((".png", ".svg")):
        raise MoetoolError("--plot must name a .png or .svg file")
    for path in (plot, save_logits, output):
        _check_output_dir(path)
    ids = _parse_tokens(tokens)
    from .gates import baseline_gate, check_threshold, parse_fraction, trace_gate

    for value, flag in ((max_imbalance, "--max-imbalance"), (max_maxvio, "--max-maxvio"), (min_entropy, "--min-entropy")):
        check_threshold(value, flag)
    _check_share(min_entropy, "--min-entropy")
    if max_drift is not None:
        parse_fraction(max_drift, "--max-drift")
    prompts = read_prompts(file) if file else None
    ckpt = open_checkpoint(model, revision)
    wanted = parse_layers(layers)
    _check_layers(ckpt, wanted)
    if model is None:
        _say_default()
    if example:
        render.info("no prompt given: tracing a built-in example (Python code, then English prose)")
    set_threads(threads, ckpt)
    options = dict(dtype=dtype.value, router_dtype=router_dtype.value, device=device.value, generate=generate,
                   capacity_factor=capacity_factor, layers=wanted, router_logits=logits)
    machine = fmt is not TraceFormat.table
    label = "tokens generated, then layers" if generate else "layers"
    if file:
        with _layer_progress(enabled=not machine or output is not None, label="prompts") as progress:
            report = trace_many(prompts, model=ckpt, progress=progress, **options)
        single = None
    else:
        with _layer_progress(enabled=not machine or output is not None, label=label) as progress:
            report = do_trace(prompt, model=ckpt, tokens=ids, progress=progress, **options)
        single = report
    if save_logits:
        write_logits(single, save_logits)
        render.info(f"logits [{len(single.tokens)}, {single.logits.shape[-1]}] written to {save_logits}")
    if plot:
        from .plot import plot_trace

        plot_trace(report, plot)
        render.info(f"plot written to {plot}" + (f" (all {len(report.prompts)} prompts pooled)" if single is None else ""))
    gated_layers = ([(l.layer, l.metrics) for l in single.layers] if single
                    else [(l["layer"], l["metrics"]) for l in report.layers])
    gate = trace_gate(single.summary if single else report.summary, gated_layers, max_imbalance=max_imbalance,
                      max_maxvio=max_maxvio, max_dead_experts=max_dead_experts, min_entropy=min_entropy)
    full = report.to_dict() if (fmt is TraceFormat.json or baseline) else {"command": "trace"}
    gate = baseline_gate(gate, full, baseline, max_drift)
    full["gate"] = gate.to_dict()
    if fmt is TraceFormat.table:
        def draw() -> None:
            if single:
                render.render_trace(single)
            else:
                for r in report.prompts if per_token else []:
                    render.render_trace(r)
                render.render_corpus(report)

        _table_out(draw, output)
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


def _model_and_prompt(args: list[str], model: Optional[str], model_implied: bool) -> tuple[Optional[str], Optional[str]]:
    """`trace [MODEL] [PROMPT]`: two arguments are MODEL and PROMPT; one is the PROMPT, unless it
    names an existing directory or .safetensors file, or --tokens / --file already give the input."""
    import os

    if len(args) > 2:
        raise MoetoolError(f"trace takes at most MODEL and PROMPT, got {len(args)} arguments (quote the prompt)")
    if len(args) == 2:
        if model is not None:
            raise MoetoolError("give the model once: as the first argument or with --model")
        return args[0], args[1]
    if len(args) == 1:
        a = args[0]
        local = os.path.isdir(a) or (a.endswith(".safetensors") and os.path.isfile(a))
        if model is None and (model_implied or local):
            return a, None
        return model, a
    return model, None


def _check_share(value: Optional[float], flag: str) -> None:
    if value is not None and not 0 <= value <= 1:
        raise MoetoolError(f"{flag} is a share between 0 and 1, got {value}")


def _check_output_dir(path: Optional[str]) -> None:
    """Refuse an output path whose directory does not exist before any work is done."""
    import os

    if path and path != "-":
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise MoetoolError(f"{path}: directory {os.path.dirname(path) or directory} does not exist")


def _check_layers(ckpt, wanted: Optional[set[int]]) -> None:
    """--layers against the model before any forward: every requested layer must exist, and at
    least one must be a MoE layer."""
    if wanted is None:
        return
    from .arch import spec_from_config

    spec = spec_from_config(ckpt.config, ckpt.config_path)
    n = spec.num_layers
    outside = sorted(l for l in wanted if not 0 <= l < n)
    if outside:
        raise MoetoolError(f"--layers {outside[0]} is out of range: the model has {n} layers (0-{n - 1})")
    if not any(l in wanted for l in spec.moe_layers):
        raise MoetoolError(f"--layers selects no MoE layer; MoE layers: {', '.join(map(str, spec.moe_layers))}")


def _table_out(draw, output: Optional[str]) -> None:
    """The table view on stdout, or (with -o) as plain text written atomically to the file."""
    from . import render

    if not output:
        draw()
        return
    with render.capture() as buf:
        draw()
    render.atomic_write_bytes(output, buf.getvalue().encode())
    render.info(f"table written to {output}")


@app.command()
def diff(
    a: Annotated[str, typer.Argument(metavar="A.json", help="A saved `moetool trace --json` report (- for stdin).")],
    b: Annotated[str, typer.Argument(metavar="B.json", help="Another trace of the same tokens (- for stdin).")],
    json_: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the output (table or --json) to this "
                                                  "file instead of stdout.")] = None,
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
    for value, flag in ((max_first_choice_change, "--max-first-choice-change"), (max_set_change, "--max-set-change"),
                        (max_load_tv, "--max-load-tv")):
        _check_share(value, flag)
    if a == "-" and b == "-":
        raise MoetoolError("only one of A and B can be - (stdin)")
    _check_output_dir(output)
    paths = [_stdin_config("stdin.json") if p == "-" else p for p in (a, b)]
    report = diff_traces(load_trace(paths[0]), load_trace(paths[1]), a, b)
    gate = Gate()
    for metric, limit in limits:
        if limit is not None:
            for l in report.layers:
                gate.check(metric, l[metric], limit, "<=", l["layer"])
    report.gate = gate.to_dict()
    if json_:
        _emit(render.to_json(report.to_dict()).encode(), output, "json")
    else:
        _table_out(lambda: render.render_diff(report), output)
    _finish_gate(gate, exit_zero)


class QuantFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    parquet = "parquet"


@app.command("quantize-report")
def quantize_report_cmd(
    model_arg: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", help="Checkpoint (local directory, "
                                                       ".safetensors, hub id); default: the bundled model.",
                                                       show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Same as MODEL.")] = None,
    schemes: Annotated[Optional[str], typer.Option(help="Comma-separated, from: int8, int4_g128, nf4, fp8_channel, "
                                                   "fp8_block, mxfp4, nvfp4 (default: all).")] = None,
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
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads (default: 1 for models with hidden size "
                                                   "under 1024, otherwise torch's default).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    fmt: Annotated[QuantFormat, typer.Option("--format", help="table, json, or one row per (layer, expert, "
                                             "projection, scheme) as csv or parquet.")] = QuantFormat.table,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the --format output (the table too) "
                                                  "to this file.")] = None,
    max_output_error: Annotated[Optional[float], typer.Option(help="Gate: output_rel_error of every routed expert "
                                                              "projection under every scheme.")] = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Report gate failures without exit code 1.")] = False,
) -> None:
    """Per-expert quantization sensitivity on routed tokens, and a mixed-precision plan."""
    from . import render
    from .gates import Gate, check_threshold
    from .quant.schemes import parse_schemes
    from .tracing import open_checkpoint, parse_layers, set_threads

    if model_arg is not None and model is not None:
        raise MoetoolError("give the model once: as the argument or with --model")
    model = model_arg if model_arg is not None else model
    if weight_only and max_output_error is not None:
        raise MoetoolError("--max-output-error gates the activation error, which --weight-only does not measure; "
                           "drop one of them")
    if weight_only and calibration is not None:
        raise MoetoolError("--weight-only runs no calibration text: drop --calibration or --weight-only")
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
    for path in (plot, export_plan, llama_cpp, output):
        _check_output_dir(path)
    from .quant.report import quantize_report

    ckpt = open_checkpoint(model)
    _check_layers(ckpt, parse_layers(layers))
    _check_budget(ckpt, chosen, budget_bits)
    if model is None:
        _say_default()
    set_threads(threads, ckpt)
    with _layer_progress(enabled=True, label="experts") as progress:
        report = quantize_report(ckpt, schemes=chosen, layers=parse_layers(layers), experts=parse_layers(experts),
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
                           f"expert {r.expert} {r.projection} under {r.scheme}")
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
        _table_out(lambda: render.render_quant(report), output)
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


def _check_budget(ckpt, schemes: list[str], budget_bits: Optional[float]) -> None:
    """--budget-bits below the cheapest requested scheme on this model's expert shapes is refused
    before the calibration forward (the plan would fail after it)."""
    if budget_bits is None:
        return
    from .arch import spec_from_config
    from .quant.schemes import bits

    spec = spec_from_config(ckpt.config, ckpt.config_path)
    if spec.moe is None:
        return
    F, D = spec.moe.expert_ffn, spec.hidden_size
    cheapest = min((2 * bits(s, F, D) + bits(s, D, F)) / 3 for s in schemes)  # gate, up [F, D]; down [D, F]
    if budget_bits < cheapest - 1e-9:
        raise MoetoolError(f"--budget-bits {budget_bits:g} is below the cheapest requested scheme on this model "
                           f"({cheapest:.3f} bits per weight)")


def _parquet(df) -> bytes:
    import io

    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise MoetoolError("--format parquet needs pyarrow: pip install 'moetool[parquet]'") from None
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


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
        render.gate_failed(gate_message(v))
    if not gate.passed and not exit_zero:
        raise typer.Exit(1)


def _num(x) -> str:
    """A number for a message: integers with thousands separators, floats to 4 significant digits."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    return f"{x:.4g}"


def gate_message(v: dict) -> str:
    """One violation as a sentence: where (layer, expert, projection, scheme), the value, and the
    limit it broke; drift is against the baseline and two-sided (either direction counts)."""
    where = ""
    if "layer" in v:
        where = f" in layer {v['layer']}" + (f", {v['detail']}" if v.get("detail") else "")
    if "baseline" in v:
        return (f"{v['metric']} = {_num(v['value'])} vs baseline {_num(v['baseline'])}: drift "
                f"{100 * v['relative_drift']:.3g}% in either direction, limit {100 * v['max_drift']:.3g}%")
    if "expected" in v:
        return (f"{v['metric']} = {_num(v['value'])}, expected {_num(v['expected'])} within "
                f"{100 * v['tolerance']:.3g}% (off by {100 * v['relative_error']:.3g}%)")
    return f"{v['metric']}{where} = {_num(v['value'])}, limit {v.get('op', '')} {_num(v['limit'])}".replace("  ", " ")


def _say_default() -> None:
    from . import render
    from .source import DEFAULT_NAME, default_model_dir

    render.info(f"no model given: using the bundled default model {DEFAULT_NAME} ({default_model_dir()}), "
                "a small MoE that moetool trained itself")


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

        # "done/total" only once the total is known (never "0/None")
        done = TextColumn("{task.fields[done]}")
        self.bar = Progress(TextColumn(self.label), BarColumn(), done, TimeElapsedColumn(),
                            console=stderr_console(), transient=True)
        self.bar.start()
        task = self.bar.add_task("layers", total=None, done="")
        return lambda done, total: self.bar.update(task, completed=done, total=total,
                                                   done=f"{done:,}/{total:,}" if total else "")

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
