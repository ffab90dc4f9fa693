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


def _parse_tokens(value: Optional[str], flag: str = "--tokens") -> Optional[list[int]]:
    if value is None:
        return None
    try:
        ids = [int(x) for x in value.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise MoetoolError(f"{flag} must be comma-separated integers, got {value!r}") from None
    if not ids:
        raise MoetoolError(f"{flag} is empty")
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
    decoder_tokens: Annotated[Optional[str], typer.Option(help="Encoder-decoder models (Switch, NLLB-MoE): the decoder's "
                                                          "input after its start token, as ids, e.g. 5,9 (the prompt is "
                                                          "the encoder's input). DiffusionGemma: the canvas of its "
                                                          "denoising step (default: canvas_length random tokens, seed 0).")] = None,
    decoder_text: Annotated[Optional[str], typer.Option(help="Encoder-decoder models: the decoder's input after its start "
                                                        "token, as text (tokenised without special tokens); "
                                                        "DiffusionGemma: the canvas, as text.")] = None,
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
    if file and (decoder_tokens is not None or decoder_text is not None):
        raise MoetoolError("--decoder-tokens / --decoder-text go with one prompt, not --file")
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
    dec_ids = _parse_tokens(decoder_tokens, "--decoder-tokens")
    _check_outputs((output, "-o"), (save_logits, "--save-logits"), (plot, "--plot"))
    from .gates import baseline_gate, check_threshold, parse_fraction, trace_gate

    for value, flag in ((max_imbalance, "--max-imbalance"), (max_maxvio, "--max-maxvio"), (min_entropy, "--min-entropy")):
        check_threshold(value, flag)
    _check_share(min_entropy, "--min-entropy")
    if max_drift is not None:
        parse_fraction(max_drift, "--max-drift")
    prompts = read_prompts(file) if file else None
    ckpt = open_checkpoint(model, revision)
    wanted = parse_layers(layers)
    _check_layers(ckpt, wanted, trace=True)
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
            report = do_trace(prompt, model=ckpt, tokens=ids, progress=progress, decoder_text=decoder_text,
                              decoder_tokens=dec_ids, **options)
        single = report
    for note in dict.fromkeys(n for r in ([single] if single else report.prompts) for n in r.notes) if machine else ():
        render.info(note)  # e.g. how --generate ran (KV cache or recompute); a table shows its notes itself
    if save_logits:
        write_logits(single, save_logits)
        render.info(f"logits [{single.logits.shape[0]}, {single.logits.shape[-1]}] written to {save_logits}")
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


def _check_output_dir(path: Optional[str], flag: str = "-o") -> None:
    """Refuse an unusable output path before any work is done (files.check_output: missing or
    read-only directory, a directory named as the file ...); `-` is stdout."""
    if path and path != "-":
        from .files import check_output

        check_output(path, flag)


def _check_layers(ckpt, wanted: Optional[set[int]], trace: bool = False) -> None:
    """--layers against the model before any forward: every requested layer must exist, and at
    least one must be a MoE layer. `trace`: DiffusionGemma's denoiser layers count too (L..2L-1)."""
    if wanted is None:
        return
    from .arch import spec_from_config

    spec = spec_from_config(ckpt.config, ckpt.config_path)
    n, moe = spec.num_layers, list(spec.moe_layers)
    if trace and spec.family == "diffusion_gemma":  # the decoder stack re-runs the layers (forward/diffusion_gemma.py)
        n, moe = 2 * n, moe + [n + l for l in moe]
    outside = sorted(l for l in wanted if not 0 <= l < n)
    if outside:
        raise MoetoolError(f"--layers {outside[0]} is out of range: the model has {n} layers (0-{n - 1})")
    if not any(l in wanted for l in moe):
        raise MoetoolError(f"--layers selects no MoE layer; MoE layers: {', '.join(map(str, moe))}")


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
    corpus: Annotated[Optional[str], typer.Option(help="Calibrate on many prompts (.txt one per line, .jsonl, - for "
                                                  "stdin) through profile's layer-major engine, all of them.")] = None,
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
    if corpus is not None and (weight_only or calibration is not None):
        raise MoetoolError("--corpus is the calibration: drop --weight-only / --calibration, or --corpus")
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
    _check_outputs((output, "-o"), (export_plan, "--export-plan"), (llama_cpp, "--llama-cpp"), (plot, "--plot"))
    from .quant.report import quantize_report

    ckpt = open_checkpoint(model)
    _check_layers(ckpt, parse_layers(layers))
    _check_budget(ckpt, chosen, budget_bits)
    _check_layers(ckpt, parse_layers(layers))
    if model is None:
        _say_default()
    set_threads(threads, ckpt)
    prompts = None
    if corpus is not None:
        from .profile.corpus import read_corpus

        prompts = read_corpus(corpus)
    with _layer_progress(enabled=True, label="experts") as progress:
        report = quantize_report(ckpt, schemes=chosen, layers=parse_layers(layers), experts=parse_layers(experts, "--experts"),
                                 calibration=calibration, calibration_tokens=calibration_tokens,
                                 weight_only=weight_only, budget_bits=budget_bits, budget_gb=budget_gb,
                                 device=device.value, progress=progress, corpus=prompts)
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


@app.command("profile")
def profile_cmd(
    corpus: Annotated[str, typer.Argument(metavar="CORPUS", help="Prompts: .txt (one per line), .jsonl ({\"text\", "
                                          "\"domain\"} per line) or - for stdin; with --show, a profile directory.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Checkpoint (as for trace); default: the "
                                                 "bundled model.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Profile directory to write "
                                                  "(stats.safetensors + profile.json).")] = None,
    max_memory: Annotated[str, typer.Option(help="Activation memory budget of one block of prompts, e.g. 2GB.")] = "2GB",
    block_tokens: Annotated[Optional[int], typer.Option(min=1, help="Tokens per block (overrides --max-memory).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from OUT/partial.")] = False,
    per_token: Annotated[Optional[str], typer.Option(help="Also write the long table (prompt, layer, token, slot, "
                                                     "expert, weight) to this .parquet file as it goes.")] = None,
    ray: Annotated[Optional[str], typer.Option("--ray", help="Run shards on Ray workers: 'local' or a cluster "
                                               "address (ray://host:10001, auto).")] = None,
    ray_workers: Annotated[int, typer.Option(min=1, help="Ray workers (one model each).")] = 2,
    show: Annotated[bool, typer.Option("--show", help="CORPUS is a profile directory: render it.")] = False,
    plot: Annotated[Optional[str], typer.Option(help="Write load, domain x expert and co-activation heatmaps "
                                                "(.png or .svg).")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision.")] = None,
    dtype: Annotated[DType, typer.Option(help="Compute dtype of the forward.")] = DType.float32,
    router_dtype: Annotated[DType, typer.Option(help="Router matmul dtype.")] = DType.float32,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when available.")] = Device.auto,
    json_: Annotated[bool, typer.Option("--json", help="Print profile.json on stdout.")] = False,
) -> None:
    """Routing statistics over a whole corpus: one weight pass per block of prompts, mergeable (docs/profile.md)."""
    from . import render
    from .gates import parse_bytes
    from .profile.show import plot_profile, render_profile
    from .profile.stats import ProfileStats

    if plot is not None and not plot.endswith((".png", ".svg")):
        raise MoetoolError("--plot must name a .png or .svg file")
    if per_token is not None and not per_token.endswith(".parquet"):
        raise MoetoolError("--per-token must name a .parquet file")
    if show:
        stats = ProfileStats.load(corpus)
    else:
        from .profile.corpus import read_corpus
        from .profile.engine import profile

        budget = parse_bytes(max_memory, "--max-memory")
        if output is None:
            raise MoetoolError("profile needs -o OUT (a directory for the statistics)")
        if os.path.exists(output) and not os.path.isdir(output):
            raise MoetoolError(f"{output}: exists and is not a directory")
        prompts = read_corpus(corpus)
        if model is None:
            _say_default()
        opts = dict(model=model, revision=revision, max_memory=budget, block_tokens=block_tokens, dtype=dtype.value,
                    router_dtype=router_dtype.value, device=device.value)
        if ray is not None:
            if resume or per_token:
                raise MoetoolError("--ray does not combine with --resume or --per-token")
            from .profile.distributed import profile_on_ray

            stats = profile_on_ray(prompts, address=ray, workers=ray_workers, out=output, **opts)
        else:
            stats = profile(prompts, out=output, resume=resume, per_token=per_token, progress=True, **opts)
        render.info(f"profile of {stats.tokens:,} tokens written to {output}")
    summary = _read_summary(corpus if show else output)
    if plot:
        plot_profile(stats, plot)
        render.info(f"plot written to {plot}")
    if json_:
        render.write_stdout(render.to_json(summary) + "\n")
    else:
        render_profile(summary, stats)


def _read_summary(directory: str) -> dict:
    import json

    from .profile.stats import SUMMARY_FILE

    with open(os.path.join(directory, SUMMARY_FILE), encoding="utf-8") as f:
        return json.load(f)


@app.command("merge")
def merge_cmd(
    profiles: Annotated[list[str], typer.Argument(metavar="PROFILE...", help="Profile directories of the same model.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Directory for the merged profile.")],
    json_: Annotated[bool, typer.Option("--json", help="Print the merged profile.json on stdout.")] = False,
) -> None:
    """Add profiles of the same model and options exactly (shards of a corpus merged = the whole corpus)."""
    from . import render
    from .profile.show import render_profile
    from .profile.stats import ProfileStats

    if len(profiles) < 2:
        raise MoetoolError("merge needs at least two profiles")
    merged = ProfileStats.load(profiles[0])
    for p in profiles[1:]:
        merged.merge(ProfileStats.load(p))
    summary = merged.save(output)
    render.info(f"{len(profiles)} profiles ({merged.tokens:,} tokens) merged into {output}")
    if json_:
        render.write_stdout(render.to_json(summary) + "\n")
    else:
        render_profile(summary, merged)


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
    objective: Annotated[str, typer.Option("--objective", help="slot: most routed (token, slot) assignments resident "
                                           "(bytes moved per token; by frequency). step: most (token, layer) pairs "
                                           "with every chosen expert resident (no stall; by co-activation).")] = "slot",
    plot: Annotated[Optional[str], typer.Option("--plot", help="Write the hit-rate curve (.png or .svg).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the JSON plan to this file.")] = None,
    min_hit_rate: Annotated[Optional[float], typer.Option(help="Gate: hit rate (held-out when given) (0-1).")] = None,
    min_step_hit_rate: Annotated[Optional[float], typer.Option(help="Gate: step-hit rate, every top-k expert "
                                                               "resident (held-out when given; k <= 2) (0-1).")] = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Report gate failures without exit code 1.")] = False,
) -> None:
    """Which routed experts to keep on the GPU under a budget, and the hit rate that buys."""
    from . import render
    from .formats import FORMATS
    from .gates import Gate, check_threshold
    from .gates import parse_bytes
    from .plans import SCHEMA_VERSION, expert_bytes, load_profile, model_spec
    from .plans.pin import pin_plan

    from .plans.pin import OBJECTIVES

    for value, flag in ((min_hit_rate, "--min-hit-rate"), (min_step_hit_rate, "--min-step-hit-rate")):
        check_threshold(value, flag)
        if value is not None and not 0 <= value <= 1:
            raise MoetoolError(f"{flag} is a share: give a number between 0 and 1")
    if objective not in OBJECTIVES:
        raise MoetoolError(f"--objective must be one of {', '.join(OBJECTIVES)}")
    if fmt not in FORMATS:
        raise MoetoolError(f"--format must be one of {', '.join(FORMATS)}")
    if plot is not None and not plot.endswith((".png", ".svg")):
        raise MoetoolError("--plot must name a .png or .svg file")
    nbytes = parse_bytes(budget, "--budget", minimum=0)
    stats = load_profile(profile)
    ho = load_profile(holdout) if holdout else None
    spec, _ = model_spec(model, stats)
    if min_step_hit_rate is not None and stats.top_k > 2:
        raise MoetoolError(f"--min-step-hit-rate: a top-{stats.top_k} profile's pairwise counts do not determine "
                           "the step-hit rate (k <= 2 only); see step_hit_bounds in --json")
    plan = pin_plan(stats, expert_bytes(spec, fmt), nbytes, ho, objective=objective)
    plan = {"schema_version": SCHEMA_VERSION, "command": "plan pin", "model": stats.meta.get("model"), "format": fmt,
            "top_k": stats.top_k, **plan}
    gate = Gate()
    sfx = "_holdout" if ho is not None else ""
    if min_hit_rate is not None:
        gate.check("hit_rate" + sfx, plan["hit_rate" + sfx], min_hit_rate, ">=")
    if min_step_hit_rate is not None:
        gate.check("step_hit_rate" + sfx, plan["step_hit_rate" + sfx], min_step_hit_rate, ">=")
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

        def step_txt(d: dict, sfx: str) -> str:
            if d["step_hit_rate" + sfx] is not None:
                return f"{d['step_hit_rate' + sfx]:.3f}"
            lo, hi = d["step_hit_bounds" + sfx]
            return f"{lo:.3f}-{hi:.3f}"

        def rates_txt(d: dict) -> str:
            txt = f"hit rate {d['hit_rate']:.3f}" + ("" if ho is None else f" (held-out {d['hit_rate_holdout']:.3f})")
            txt += f", step-hit rate {step_txt(d, '')}" + ("" if ho is None else f" (held-out {step_txt(d, '_holdout')})")
            if stats.top_k > 2:
                txt += f", pair-hit rate {d['pair_hit_rate']:.3f}" + (
                    "" if ho is None else f" (held-out {d['pair_hit_rate_holdout']:.3f})")
            return txt

        con.print(f"[bold]pin[/bold] {plan['resident_experts']} of {plan['experts_total']} routed experts "
                  f"({render.human_bytes(plan['resident_bytes'])} of {render.human_bytes(plan['all_experts_bytes'])}, "
                  f"{fmt}) under {render.human_bytes(nbytes)}, objective {objective}: {rates_txt(plan)}")
        alt = plan["other_objective"]
        con.print(f"objective {alt['objective']} instead: {alt['resident_experts']} experts, {rates_txt(alt)}")
        if stats.top_k > 2:
            con.print(f"top-{stats.top_k}: the step-hit rate is bounded from the pairwise counts (a range); the step "
                      "objective maximises the pair-hit rate (docs/plans.md)")
        from rich.table import Table

        t = Table(title="Hit rate against the budget" + ("" if ho is None else " (fitted / held-out)"),
                  title_justify="left", box=None, header_style="bold")
        for c in ("budget", "slot: experts", "hit rate", "step-hit", "step: experts", "hit rate", "step-hit"):
            t.add_column(c, justify="right")
        two = lambda d, key: (step_txt(d, "") if key == "step" else f"{d['hit_rate']:.3f}") + (
            "" if ho is None else " / " + (step_txt(d, "_holdout") if key == "step" else f"{d['hit_rate_holdout']:.3f}"))
        for a, b in zip(plan["curves"]["slot"], plan["curves"]["step"]):
            t.add_row(render.human_bytes(a["budget_bytes"]), str(a["experts"]), two(a, "hit"), two(a, "step"),
                      str(b["experts"]), two(b, "hit"), two(b, "step"))
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
    from .gates import parse_bytes
    from .plans import SCHEMA_VERSION, load_profile
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
    sizes = {flag: parse_bytes(v, flag, minimum=0) for flag, v in (("--vram", vram), ("--reserve", reserve),
                                                        ("--gpu-bandwidth", gpu_bandwidth),
                                                        ("--cpu-bandwidth", cpu_bandwidth),
                                                        ("--pcie-bandwidth", pcie_bandwidth))}
    for flag in ("--gpu-bandwidth", "--cpu-bandwidth", "--pcie-bandwidth"):
        if sizes[flag] <= 0:
            raise MoetoolError(f"{flag} must be positive")
    ram_b = parse_bytes(ram, "--ram", minimum=0) if ram else None
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


@app.command()
def analyze(
    files: Annotated[list[str], typer.Argument(metavar="FILE...", help="Routing recorded by an engine: vLLM routed "
                                               "experts (.npy/.json), SGLang responses (.json/.jsonl) or recorder "
                                               "dump (.pt), router trace .jsonl, TensorRT-LLM expert-statistics "
                                               "directory, llama.cpp imatrix.gguf, long-table .csv.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="The model that was served (E, k and the MoE "
                                                 "layers): checkpoint directory, config.json, sample name or hub "
                                                 "id; no weights are read. Default: the bundled model.")] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="A config.json instead of --model.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="auto (detect from content), vllm, sglang, sglang-pt, "
                                     "router-jsonl, trtllm, imatrix or csv.")] = "auto",
    revision: Annotated[Optional[str], typer.Option(help="Hub revision of --model.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the JSON to this file.")] = None,
    profile_out: Annotated[Optional[str], typer.Option("--profile-out", help="Also write the recording as a profile "
                                                       "directory (mergeable with `moetool profile` output; input "
                                                       "of `moetool plan`).")] = None,
    max_imbalance: Annotated[Optional[float], typer.Option(help="Gate: max load / mean load in every layer.")] = None,
    max_maxvio: Annotated[Optional[float], typer.Option(help="Gate: MaxVio in every layer.")] = None,
    max_dead_experts: Annotated[Optional[int], typer.Option(min=0, help="Gate: experts never chosen, per layer.")] = None,
    min_entropy: Annotated[Optional[float], typer.Option(help="Gate: normalised load entropy in every layer.")] = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Report gate failures without exit code 1.")] = False,
) -> None:
    """Measure routing recorded by vLLM, SGLang, TensorRT-LLM, llama.cpp or a router trace."""
    from . import render
    from .analyze import analyze as do_analyze
    from .gates import check_threshold, trace_gate

    if model is not None and config is not None:
        raise MoetoolError("give --model or --config, not both")
    model = model or config
    if model is None:
        _say_default()
    for value, flag in ((max_imbalance, "--max-imbalance"), (max_maxvio, "--max-maxvio"), (min_entropy, "--min-entropy")):
        check_threshold(value, flag)
    if profile_out is not None and os.path.exists(profile_out) and not os.path.isdir(profile_out):
        raise MoetoolError(f"--profile-out {profile_out}: exists and is not a directory")
    report = do_analyze(files, model=model, fmt=fmt, revision=revision)
    if profile_out is not None:
        if report.stats is None:
            raise MoetoolError(f"--profile-out: a {report.format} recording holds per-expert counts only, not the "
                               "per-token choices a profile is made of")
        report.stats.save(profile_out)
        render.info(f"profile of {report.tokens:,} recorded tokens written to {profile_out}")
    gate = trace_gate(report.summary, [(l["layer"], l["metrics"]) for l in report.layers], max_imbalance=max_imbalance,
                      max_maxvio=max_maxvio, max_dead_experts=max_dead_experts, min_entropy=min_entropy)
    full = report.to_dict()
    full["gate"] = gate.to_dict()
    for note in report.notes:
        render.info(note)
    if json_ or output:
        _emit(render.to_json(full).encode(), output, "analysis")
    else:
        render.stdout_console().print(
            f"[bold]{render._escape(report.model)}[/bold]  model_type={report.model_type}  format={report.format}  "
            f"{report.tokens:,} token{'s' * (report.tokens != 1)} in {report.sequences:,} sequence{'s' * (report.sequences != 1)}"
            f", {report.num_experts} experts, top-{report.top_k}")
        render.render_metrics(report.layers, report.summary, report.num_experts, report.top_k,
                              title=f"Routing metrics per MoE layer (recorded by {report.format})")
    _finish_gate(gate, exit_zero)


def _emit(data: bytes, output: Optional[str], what: str) -> None:
    """Machine-readable output: atomically to `output`, or raw to stdout."""
    from . import render

    if output:
        render.atomic_write_bytes(output, data)
        render.info(f"{what} written to {output}")
    else:
        render.write_stdout_bytes(data)


def _check_outputs(*outputs: tuple[Optional[str], str]) -> None:
    """Refuse unusable output paths before the work starts (files.check_output)."""
    from .files import check_output

    for path, flag in outputs:
        if path is not None:
            check_output(path, flag)


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

    _signals_to_exceptions()
    try:
        rv = app(args=argv, prog_name="moetool", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
        if code == 130:  # typer turns Ctrl-C (KeyboardInterrupt) into exit code 130, silently
            render.error_line("interrupted")
    except typer.Exit as e:
        code = getattr(e, "exit_code", 0)
        if code == 130:  # typer turns Ctrl-C (KeyboardInterrupt) into Exit(130)
            render.error_line("interrupted")
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
    except (BrokenPipeError, render.StdoutClosed):
        code = 0  # `moetool ... | head` closed the pipe: not an error
    except KeyboardInterrupt:
        render.error_line("interrupted")
        code = 130
    except _Terminated:
        render.error_line("terminated")
        code = 143
    except Exception as e:  # an internal error: our bug, not the user's input
        if render.debug_enabled():
            traceback.print_exc()
        render.error_line(f"internal error: {e.__class__.__name__}: {e} (set MOETOOL_DEBUG=1 for the traceback)")
        code = 3
    _quiet_stdout()
    sys.exit(code)


class _Terminated(BaseException):
    """SIGTERM, raised where the process is, so that `finally` blocks (a temporary output file's
    removal) run before the exit (code 143)."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def _signals_to_exceptions() -> None:
    import signal

    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (main() called from a thread): keep the default
        pass


def _quiet_stdout() -> None:
    """Flush stdout now; if that fails (a closed pipe, a full device), point fd 1 at /dev/null so
    the interpreter's own flush at exit neither fails nor prints a second message."""
    import os

    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
