"""Command line: each command parses options, calls the public API (api.py), prints, and maps errors to exit
codes: 0 done, 1 a failure (bad model, failed gate, write error), 2 a usage error, 130 Ctrl-C, 143 SIGTERM.
The rewriting commands' options are generated from the option dataclasses (options.py)."""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading

import click

from .errors import GateFailed, OnnxoptError
from .options import COMMAND_OPTIONS


class Terminated(BaseException):
    """SIGTERM (timeout, docker, Kubernetes), raised where the process is, so cleanup runs as for Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def _fail(message: str, code: int):
    click.echo(f"onnxopt: error: {message}", err=True)
    sys.exit(code)


def main(argv=None):
    in_main = threading.current_thread() is threading.main_thread()  # only there can signals be handled
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        cli.main(args=argv, prog_name="onnxopt", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _fail("interrupted; nothing was written", 130)
    except Terminated:
        _fail("terminated; nothing was written", 143)
    except click.ClickException as exc:  # usage errors: one line, exit 2
        _fail(exc.format_message(), exc.exit_code)
    except OnnxoptError as exc:
        _fail(str(exc), exc.exit_code)
    except Exception as exc:
        if os.environ.get("ONNXOPT_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (set ONNXOPT_DEBUG=1 for a traceback)", 1)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _print_version(ctx, _param, value):
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import version

    from .runtime import cabi

    click.echo(f"onnxopt {version('onnxopt')}\nlowered layers run on: {cabi.path()}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and the path lowered layers run on (C ABI or PyOp bridge), then exit.")
def cli():
    """Make ONNX models cheaper: low-rank dense layers (factor), binarized convolutions (binarize, lower)."""


def _field_option(f, fld: dataclasses.Field):
    meta = fld.metadata
    names = [n for n in (meta["short"], meta["flag"] or "--" + fld.name.replace("_", "-")) if n]
    kind = ({"multiple": True} if meta["repeat"] else {"is_flag": True} if fld.default is False else
            {"type": meta["kind"] or str, "default": fld.default, "show_default": fld.default is not None})
    return click.option(*names, fld.name, help=meta["help"], metavar=meta["metavar"], **kind)(f)


def _command_options(command: str):
    """The click options of a rewriting command, from its option dataclasses, plus --json and --quiet."""
    def decorate(f):
        f = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")(f)
        f = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for CI).")(f)
        for cls in reversed(COMMAND_OPTIONS[command]):
            for fld in reversed([x for x in dataclasses.fields(cls) if x.metadata.get("cli")]):
                f = _field_option(f, fld)
        return click.argument("model_path", metavar="MODEL", type=click.Path())(f)
    return decorate


def _progress(quiet: bool):
    if quiet or not sys.stderr.isatty():  # a bar in a CI log is noise
        return None

    def bar(items, label):  # an item may say what to show beside the bar (fine-tuning: batch and loss)
        with click.progressbar(items, label=label, file=sys.stderr,
                               item_show_func=lambda item: getattr(item, "progress_text", None)) as it:
            yield from it

    return bar


def _print_report(report, as_json):
    click.echo(report.to_json() if as_json else report.text())
    for w in [] if as_json else report.warnings:
        click.echo(f"onnxopt: warning: {w}", err=True)


def _rewrite_command(command: str, suffix: str, help: str):
    def run_command(model_path, as_json, quiet, **options):
        from . import api
        from .model import default_output

        options["output"] = options["output"] or default_output(model_path, suffix)
        try:
            _, report = getattr(api, command)(model_path, progress=_progress(quiet or as_json), **options)
        except GateFailed as exc:
            if exc.report is not None:
                _print_report(exc.report, as_json)
            raise
        _print_report(report, as_json)

    cli.command(name=command, help=help)(_command_options(command)(run_command))


_rewrite_command("factor", "factored", "Replace Gemm and MatMul(X, constant W) by two low-rank MatMuls, "
                                       "W (m x n) ~ U (m x k) . V (k x n), and Conv by two or three smaller "
                                       "convs. The report's rel.err is ||W - UV||F / ||W||F (with --calibration: "
                                       "||X(W - UV)||F / ||XW||F on the calibration inputs); above 0.8 it warns.")
_rewrite_command("binarize", "binarized", "Replace Conv by a binarized convolution: Conv(b(X), alpha * b(W)) + B, "
                                          "b(v) = +1 if v > 0 else -1.")
_rewrite_command("prune", "pruned", "Remove output channels of Conv/Gemm/MatMul layers (and the matching inputs of "
                                    "every layer they reach, through BatchNormalization, activations, pooling, "
                                    "Concat, Split, depthwise convs, residual Adds); by filter magnitude, or with "
                                    "--calibration by output reconstruction with a least-squares refit.")
_rewrite_command("lower", "lowered", "Replace trainable BinaryConv ops by the native bit-packed BitConv "
                                     "(weights stored as bits).")
_rewrite_command("quantize", "quantized", "int8 through onnxruntime.quantization: static QDQ with --calibration, "
                                          "dynamic without; com.onnxopt ops stay as they are.")


@cli.command()
@click.argument("recipe", metavar="RECIPE.toml", type=click.Path())
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("-o", "--output", metavar="PATH", help="Output path (default: <stem>.applied.onnx beside the input).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file (never the input).")
@click.option("--external-data", is_flag=True, help="Store weights in <output>.data beside the model.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for CI).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def apply(recipe, model_path, output, force, external_data, as_json, quiet):
    """Run a recipe: its [[step]] commands in order (factor, binarize, lower, quantize, with their options),
    then its [gate] on the final model against MODEL; nothing is written when a gate fails."""
    from . import api
    from .model import default_output

    try:
        _, report = api.apply(recipe, model_path, progress=_progress(quiet or as_json), force=force,
                              output=output or default_output(model_path, "applied"), external_data=external_data)
    except GateFailed as exc:
        if exc.report is not None:
            _print_report(exc.report, as_json)
        raise
    _print_report(report, as_json)


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--data", required=True, metavar="DATA.npz", help="Held-out inputs (and labels) to score on.")
@click.option("--grid", multiple=True, metavar="STEP.OPTION=V1,V2,...",
              help="Values of one option of one step (repeatable); every combination is a candidate.")
@click.option("--sensitivity", metavar="STEP.OPTION=V1,V2,...",
              help="Instead of a grid: per layer the step changes and per value, the score with only that layer "
                   "changed (Distiller's sensitivity analysis).")
@click.option("--recipe", metavar="RECIPE.toml", help="The steps the grid varies (default: the grid's commands).")
@click.option("--labels", metavar="KEY", help="Array in --data holding class labels (default: 'label' if present).")
@click.option("--jobs", type=int, default=1, show_default=True, metavar="N", help="Candidates built in parallel.")
@click.option("--ray", metavar="ADDRESS", help="Run the candidates as Ray tasks on the cluster at ADDRESS "
                                               "(host:port, 'auto', or 'local' to start one here); needs "
                                               "onnxopt[ray].")
@click.option("--keep-best", metavar="DIR", help="Write the Pareto front's models here (front_0.onnx, ...).")
@click.option("--report", "report_path", metavar="FILE.html", help="A self-contained HTML page with the table and "
                                                                 "charts (needs matplotlib: onnxopt[report]).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def sweep(model_path, data, grid, sensitivity, recipe, labels, jobs, ray, keep_best, report_path, as_json, quiet):
    """Run every combination of --grid values as the pipeline would, and measure each against MODEL: score on
    --data, file size, FLOPs, latency (alternating blocks, batch of 8); mark the Pareto front."""
    import json

    from . import api
    from .errors import UsageError
    from .sweep import sensitivity_table, table

    if bool(grid) == bool(sensitivity):
        raise UsageError("give --grid STEP.OPTION=V1,V2,... (repeatable) or --sensitivity STEP.OPTION=V1,V2,...")
    if sensitivity:
        if recipe or keep_best:
            raise UsageError("--recipe and --keep-best go with --grid, not --sensitivity")
        result = api.sensitivity(model_path, data, sensitivity, labels=labels, jobs=jobs, ray=ray,
                                 report=report_path, progress=_progress(quiet or as_json))
        click.echo(json.dumps(result, indent=2) if as_json else sensitivity_table(result))
        return

    result = api.sweep(model_path, data, grid, recipe=recipe, labels=labels, jobs=jobs, ray=ray, keep_best=keep_best,
                       report=report_path, progress=_progress(quiet or as_json))
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else table(result))


@cli.command()
@click.argument("original", metavar="ORIGINAL", type=click.Path())
@click.argument("transformed", metavar="TRANSFORMED", type=click.Path())
@click.option("--data", required=True, metavar="DATA.npz", help="Training inputs keyed by input name.")
@click.option("--labels", metavar="KEY", help="Array in --data holding class labels: adds cross-entropy "
                                              "(default: distillation alone).")
@click.option("--epochs", type=int, metavar="N", help="Passes over --data (default 3).")
@click.option("--lr", type=float, metavar="X", help="Adam learning rate, cosine-decayed (default 0.001).")
@click.option("--batch-size", type=int, metavar="B", help="Samples per step (default 64).")
@click.option("--temperature", type=float, metavar="T", help="Distillation temperature (default 4).")
@click.option("-o", "--output", metavar="PATH", help="Output path (default: <stem>.finetuned.onnx beside "
                                                     "TRANSFORMED).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file (never an input).")
@click.option("--external-data", is_flag=True, help="Store weights in <output>.data beside the model.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for CI).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def finetune(original, transformed, data, output, as_json, quiet, **options):
    """Train TRANSFORMED (from factor, or binarize --stage transform) by distillation from ORIGINAL on the inputs
    in --data: only weight values change. Needs torch (pip install 'onnxopt[train]')."""
    from . import api
    from .model import default_output

    _, report = api.finetune(original, transformed, data, progress=_progress(quiet or as_json),
                             output=output or default_output(transformed, "finetuned"), **options)
    _print_report(report, as_json)


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--input-shape", multiple=True, metavar="NAME:D1,D2,...", help="Size of a symbolic input, for FLOPs.")
def inspect(model_path, as_json, input_shape):
    """List every Gemm, MatMul and Conv (and transformed, lowered or int8 layers) with shapes, params, FLOPs,
    what onnxopt can do with it, and the model's totals."""
    import json

    from . import api
    from .report import inspect_table

    result = api.inspect(model_path, input_shape=input_shape)
    click.echo(json.dumps(result, indent=2) if as_json else inspect_table(result))


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--data", required=True, type=click.Path(dir_okay=False), help=".npz of inputs keyed by input name.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Save outputs to this .npz.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def run(model_path, data, output, force):
    """Run any model (plain, binarized, lowered) in onnxruntime on the inputs in an .npz."""
    from . import api
    from .model import atomic_save_npz

    outputs = api.run(model_path, data)
    for name, value in outputs.items():
        click.echo(f"{name}: shape {list(value.shape)} dtype {value.dtype}")
    if output:
        click.echo(f"wrote {atomic_save_npz(outputs, output, force=force)}")


@cli.command()
@click.argument("model_a", metavar="A.onnx", type=click.Path())
@click.argument("model_b", metavar="B.onnx", type=click.Path())
@click.option("--data", required=True, type=click.Path(dir_okay=False), help=".npz of inputs keyed by input name.")
@click.option("--labels", metavar="KEY", help="Array in --data holding class labels (default: 'label' if present).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--min-accuracy", type=float, metavar="X", help="Exit 1 if B's accuracy is below X.")
@click.option("--max-drop", type=float, metavar="X", help="Exit 1 if B loses more than X accuracy vs A.")
def compare(model_a, model_b, data, labels, as_json, min_accuracy, max_drop):
    """Top-1 agreement, accuracy, output differences and median latency of two models on the same inputs."""
    from . import api
    from .report import compare_text

    try:
        click.echo(compare_text(api.compare(model_a, model_b, data, labels=labels, min_accuracy=min_accuracy,
                                            max_drop=max_drop), as_json))
    except GateFailed as exc:  # the figures, then the failed gate's line
        click.echo(compare_text(exc.report, as_json))
        raise
