"""Command line: each command parses options, calls the public API (api.py), prints, and maps errors to exit
codes: 0 done, 1 a failure (bad model, failed gate, write error), 2 a usage error, 130 Ctrl-C, 143 SIGTERM.
The rewriting commands' options are generated from the option dataclasses
(pipeline/registry.py, pipeline/options.py)."""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading

import click

from .errors import GateFailed, OnnxoptError
from .pipeline import options as opt
from .pipeline.registry import COMMANDS


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

    from .runtime import native

    click.echo(f"onnxopt {version('onnxopt')}\nlowered layers run on: {native.path()}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and the path lowered layers run on (native library or PyOp bridge), then exit.")
def cli():
    """Make ONNX models cheaper: low-rank dense layers (factor), binarized convolutions (binarize, lower)."""


def _field_option(f, fld: dataclasses.Field):
    meta = fld.metadata
    if meta.get("argument"):
        return click.argument(fld.name, metavar=meta["metavar"], type=click.Path())(f)
    names = [n for n in (meta["short"], meta["flag"] or "--" + fld.name.replace("_", "-")) if n]
    kind = ({"multiple": True} if meta["repeat"] else {"is_flag": True} if fld.default is False else
            {"type": meta["kind"] or str, "default": fld.default, "show_default": fld.default is not None})
    return click.option(*names, fld.name, help=meta["help"], metavar=meta["metavar"], required=meta["required"],
                        **kind)(f)


def _generated_options(groups: tuple[type, ...], *, model: str | None = "MODEL", json: str | None = None,
                       quiet: bool = False, skip: tuple[str, ...] = ()):
    """A command's click parameters from its option dataclasses (in order), after its MODEL argument, with
    --json (its help text given) and --quiet where the command has them."""
    def decorate(f):
        if quiet:
            f = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")(f)
        if json:
            f = click.option("--json", "as_json", is_flag=True, help=json)(f)
        for cls in reversed(groups):
            for fld in reversed([x for x in dataclasses.fields(cls) if x.metadata.get("cli") and x.name not in skip]):
                f = _field_option(f, fld)
        return click.argument("model_path", metavar=model, type=click.Path())(f) if model else f
    return decorate


REPORT_JSON = "Print the report as JSON (for CI)."


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
        from .graph.io import default_output

        options["output"] = options["output"] or default_output(model_path, suffix)
        _print_report_of(lambda: api.run_command(command, model_path, progress=_progress(quiet or as_json),
                                                 **options), as_json)

    options = _generated_options(COMMANDS[command].groups, json=REPORT_JSON, quiet=True)
    cli.command(name=command, help=help)(options(run_command))


for _command in COMMANDS.values():  # factor, binarize, prune, lower, quantize: one registry, one CLI command each
    _rewrite_command(_command.name, _command.suffix, _command.help)


def _print_report_of(call, as_json: bool):
    """Run `call`, print its report; a failed gate prints the report so far, then fails."""
    try:
        _, report = call()
    except GateFailed as exc:
        if exc.report is not None:
            _print_report(exc.report, as_json)
        raise
    _print_report(report, as_json)


@cli.command()
@_generated_options((opt.ApplyOptions, opt.SaveOptions), model=None, json=REPORT_JSON, quiet=True)
def apply(recipe, model_path, allow_code, calibration, finetune, data, labels, output, force, external_data, strict,
          as_json, quiet):
    """Run a recipe: its [[step]] commands in order (factor, binarize, lower, quantize, with their options),
    then its [gate] on the final model against MODEL; nothing is written when a gate fails."""
    from . import api
    from .graph.io import default_output

    _print_report_of(lambda: api.apply(recipe, model_path, progress=_progress(quiet or as_json), force=force,
                                       output=output or default_output(model_path, "applied"),
                                       external_data=external_data, strict=strict, allow_code=allow_code,
                                       calibration=calibration, finetune=finetune, data=data, labels=labels),
                      as_json)


@cli.command()
@_generated_options((opt.DataOptions, opt.SweepOptions), json="Print the rows as JSON.", quiet=True)
def sweep(model_path, data, labels, as_json, quiet, **options):
    """Run every combination of --grid values as the pipeline would, and measure each against MODEL: score on
    --data, file size, FLOPs, latency (alternating blocks, batch of 8); mark the Pareto front."""
    import json

    from . import api
    from .pipeline.sweep import sensitivity_table, table

    given = opt.SweepOptions(**options)  # which of --grid / --sensitivity, and the rules between them
    common = {"labels": labels, "jobs": given.jobs, "ray": given.ray, "report": given.report,
              "progress": _progress(quiet or as_json), "force": given.force}
    if given.sensitivity:
        result = api.sensitivity(model_path, data, given.sensitivity, **common)
        click.echo(json.dumps(result, indent=2) if as_json else sensitivity_table(result))
        return
    result = api.sweep(model_path, data, given.grid, recipe=given.recipe, keep_best=given.keep_best,
                       allow_code=given.allow_code, **common)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else table(result))


@cli.command()
@_generated_options((opt.FinetuneRunOptions, opt.FinetuneOptions, opt.SaveOptions), model=None,
                    json=REPORT_JSON, quiet=True, skip=("finetune", "strict"))
def finetune(original, transformed, data, output, as_json, quiet, **options):
    """Train TRANSFORMED (from factor, or binarize --stage transform) by distillation from ORIGINAL on the inputs
    in --data: only weight values change. Needs torch (pip install 'onnxopt[train]')."""
    from . import api
    from .graph.io import default_output

    _print_report_of(lambda: api.finetune(original, transformed, data, progress=_progress(quiet or as_json),
                                          output=output or default_output(transformed, "finetuned"), **options),
                     as_json)


@cli.command()
@_generated_options((opt.ShapeOptions,), json="Print as JSON.", skip=("input_value",))  # no inputs run
def inspect(model_path, as_json, input_shape):
    """List every Gemm, MatMul and Conv (and transformed, lowered or int8 layers) with shapes, params, FLOPs,
    what onnxopt can do with it, and the model's totals."""
    import json

    from . import api
    from .report import inspect_table

    result = api.inspect(model_path, input_shape=input_shape)
    click.echo(json.dumps(result, indent=2) if as_json else inspect_table(result))


@cli.command()
@_generated_options((opt.RunOptions,))
def run(model_path, data, output, force):
    """Run any model (plain, binarized, lowered) in onnxruntime on the inputs in an .npz."""
    from . import api

    outputs = api.run(model_path, data, output=output, force=force)
    for name, value in outputs.items():
        click.echo(f"{name}: shape {list(value.shape)} dtype {value.dtype}")
    if output:
        click.echo(f"wrote {output}")


@cli.command()
@_generated_options((opt.CompareOptions, opt.DataOptions), model=None, json="Print as JSON.")
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


@cli.command("library-path")
def library_path():
    """Print the path of the native custom-op library that runs lowered layers, for onnxruntime outside Python
    (RegisterCustomOpsLibrary_V2 in C/C++/C#/Java; docs/deploy.md). Exit 1 where it was not built."""
    from .runtime import native

    found = native.library_path()
    if found is None:
        raise OnnxoptError(f"no native library: lowered layers run on the {native.path()}")
    click.echo(found)
