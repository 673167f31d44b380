"""Command line: each command parses options, calls the public API, prints, and maps errors to exit codes.

Exit codes: 0 done, 1 a failure (bad model, failed gate, write error), 2 a usage error, 130 interrupted.
"""
from __future__ import annotations

import os
import sys

import click

from .errors import GateFailed, OnnxoptError, UsageError


def _fail(message: str, code: int):
    click.echo(f"onnxopt: error: {message}", err=True)
    sys.exit(code)


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="onnxopt", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _fail("interrupted; nothing was written", 130)
    except click.ClickException as exc:  # usage errors: one line, exit 2
        _fail(exc.format_message(), exc.exit_code)
    except OnnxoptError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", 130)
    except Exception as exc:
        if os.environ.get("ONNXOPT_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (set ONNXOPT_DEBUG=1 for a traceback)", 1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxopt")
def cli():
    """Make ONNX models cheaper: low-rank dense layers (factor), binarized convolutions (binarize, lower)."""


def _progress(quiet: bool):
    if quiet or not sys.stderr.isatty():  # a bar in a CI log is noise
        return None

    def bar(items, label):
        with click.progressbar(items, label=f"{label}: layers", file=sys.stderr) as it:
            yield from it

    return bar


def _output_options(f):
    f = click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output path.")(f)
    f = click.option("--force", is_flag=True, help="Overwrite an existing output file.")(f)
    f = click.option("--external-data", is_flag=True, help="Store weights in <output>.data beside the model.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for CI).")(f)
    f = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")(f)
    f = click.option("--strict", is_flag=True, help="Exit 1 when no layer was changed.")(f)
    return f


def _selection_options(f):
    f = click.option("--only", multiple=True, metavar="PATTERN",
                     help="Change only layers matching PATTERN (repeatable).")(f)
    f = click.option("--skip", multiple=True, metavar="PATTERN",
                     help="Leave layers matching PATTERN alone (repeatable). A pattern matches a node name, a glob "
                          "on it, or one '/'-separated part of it ('l1' matches '/l1/Gemm').")(f)
    f = click.option("--filter-fn", metavar="MODULE:FUNCTION", help="node -> bool; False leaves the node alone.")(f)
    return f


def _fold_option(f):
    return click.option("--keep-batchnorm", is_flag=True,
                        help="Do not fold a BatchNormalization after a lowered conv into its alpha/bias (folding "
                             "saves a pass over the output; outputs then differ by float32 rounding only).")(f)


def _training_options(f):
    f = click.option("--train-hook", metavar="MODULE:FUNCTION",
                     help="function(model, **hook_args) -> model: fine-tunes the transformed model (values only).")(f)
    f = click.option("--hook-arg", multiple=True, metavar="KEY=VALUE", help="Keyword argument for --train-hook.")(f)
    f = click.option("--train-cmd", metavar="COMMAND",
                     help="External trainer, e.g. \"python train.py {input} {output}\": gets the transformed model, "
                          "writes the trained one.")(f)
    f = click.option("--calibration", type=click.Path(dir_okay=False), metavar="FILE.npz",
                     help="Inputs keyed by graph input name: data-aware factors / refit of binarized layers.")(f)
    return f


def _trainer(train_hook, hook_arg, train_cmd):
    if train_hook and train_cmd:
        raise UsageError("--train-hook and --train-cmd exclude each other")
    if train_cmd:
        from .hooks import command_trainer

        return command_trainer(train_cmd)
    if not train_hook:
        return None
    hook = _hook(train_hook, "--train-hook")
    kwargs = dict(_key_values(hook_arg))
    return lambda model: hook(model, **kwargs)


def _calibration(path, model):
    if not path:
        return None
    from .calibrate import load_calibration

    return load_calibration(path, model)


def _check_options(f):
    f = click.option("--check", "check_samples", type=click.IntRange(min=1), metavar="N",
                     help="Run N inputs through both models and print the max output difference.")(f)
    f = click.option("--data", type=click.Path(dir_okay=False),
                     help=".npz of inputs for --check (keyed by input name).")(f)
    f = click.option("--max-error", type=click.FloatRange(min=0), metavar="X",
                     help="With --check: fail (exit 1, nothing written) if the max relative difference exceeds X.")(f)
    return f


def _finish(source_model, new_model, report, *, input_path, suffix, output, force, external_data, as_json, strict,
            check_samples=None, data=None, max_error=None):
    """Shared tail of every rewriting command: check, gate, save, print."""
    from . import model as model_io
    from . import runtime

    if check_samples or data or max_error is not None:
        feeds = (runtime.load_feeds(data, source_model) if data
                 else runtime.random_feeds(source_model, check_samples or 8))
        report.check = runtime.compare_outputs(source_model, new_model, feeds)
    out = output or model_io.default_output(input_path, suffix)
    if report.check and max_error is not None and report.check["max_rel"] > max_error:
        _print_report(report, as_json)
        raise GateFailed(f"max relative output difference {report.check['max_rel']:.3g} exceeds --max-error "
                         f"{max_error}; nothing was written")
    if not report.changed:
        report.warnings.append("no layer was changed")
        if strict:
            _print_report(report, as_json)
            raise GateFailed("no layer was changed (--strict); nothing was written")
    report.output = str(model_io.save_model(new_model, out, force=force, external_data=external_data))
    _print_report(report, as_json)


def _print_report(report, as_json):
    if as_json:
        click.echo(report.to_json())
        return
    click.echo(report.table())
    for w in report.warnings:
        click.echo(f"onnxopt: warning: {w}", err=True)
    if report.output:
        click.echo(f"wrote {report.output}")


def _hook(spec, what):
    if not spec:
        return None
    from .hooks import load_function

    return load_function(spec, what)


def _pairs(values, option):
    pairs = []
    for v in values:
        pattern, sep, rank = v.rpartition("=")
        if not sep or not pattern:
            raise UsageError(f"invalid {option} '{v}': expected PATTERN=RANK")
        pairs.append((pattern, rank))
    return pairs


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--rank", metavar="R", help="Rank: a fraction of min(m,n) (0.6) or an integer (32).")
@click.option("--energy", type=float, metavar="E",
              help="Smallest rank keeping share E of the sum of squared singular values.")
@click.option("--rank-for", multiple=True, metavar="PATTERN=R", help="Per-layer rank; first match wins (repeatable).")
@click.option("--projection-fn", metavar="MODULE:FUNCTION", help="W (m x n numpy array) -> rank k.")
@click.option("--factor-fn", metavar="MODULE:FUNCTION", help="(W, k) -> (U, V), replacing the SVD.")
@click.option("--allow-growth", is_flag=True, help="Factor even layers where k(m+n) >= m*n (e.g. full-rank checks).")
@_training_options
@_selection_options
@_check_options
@_output_options
def factor(model_path, rank, energy, rank_for, projection_fn, factor_fn, allow_growth, train_hook, hook_arg,
           train_cmd, calibration, only, skip, filter_fn, check_samples, data,
           max_error, output, force, external_data, as_json, quiet, strict):
    """Replace Gemm and MatMul(X, constant W) by two low-rank MatMuls: W (m x n) ~ U (m x k) . V (k x n)."""
    from . import api
    from .model import load_model

    if rank is None and energy is None and not projection_fn and not rank_for:
        raise UsageError("give a rank: --rank 0.6, --rank 32, --energy 0.95 or --projection-fn")
    if rank is not None and energy is not None:
        raise UsageError("--rank and --energy exclude each other")
    train = _trainer(train_hook, hook_arg, train_cmd)
    source = load_model(model_path)
    model, report = api.factor_with_report(
        source, rank=rank, energy=energy, rank_for=_pairs(rank_for, "--rank-for"), only=only, skip=skip,
        projection_function=_hook(projection_fn, "--projection-fn"), filter_function=_hook(filter_fn, "--filter-fn"),
        factor_function=_hook(factor_fn, "--factor-fn"), allow_growth=allow_growth,
        calibration=_calibration(calibration, source), train_function=train, progress=_progress(quiet or as_json))
    _finish(source, model, report, input_path=model_path, suffix="factored", output=output, force=force,
            external_data=external_data, as_json=as_json, strict=strict, check_samples=check_samples, data=data,
            max_error=max_error)


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect(model_path, as_json):
    """List every Gemm, MatMul and Conv with shapes, params, FLOPs, and what onnxopt can do with it."""
    from . import api
    from .model import load_model

    rows = api.inspect(load_model(model_path))
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2))
        return
    head = ["layer", "op", "weight", "params", "FLOPs/sample", "factor", "binarize"]
    table = [[r["name"], r["op_type"], r["weight_shape"], f"{r['params']:,}", f"{r['flops']:,}",
              r["factor"], r["binarize"]] for r in rows]
    widths = [max(len(str(x[i])) for x in table + [head]) for i in range(len(head))]
    for line in [head] + table:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--stage", type=click.Choice(["transform", "all"]), default="all", show_default=True,
              help="transform: stop at the trainable BinaryConv model; all: lower to bit-packed BitConv too.")
@click.option("--emulate", is_flag=True, help="Write the transformed model in standard ONNX ops only (Greater/Where + "
              "Conv + Mul/Add) for external trainers; implies --stage transform. `onnxopt lower` reads it back.")
@click.option("--scale", type=click.Choice(["channel", "tensor", "none"]), default="channel", show_default=True,
              help="alpha: mean |W| per output channel, one for the tensor, or 1.")
@_fold_option
@_training_options
@_selection_options
@_check_options
@_output_options
def binarize(model_path, stage, emulate, scale, keep_batchnorm, train_hook, hook_arg, train_cmd, calibration, only,
             skip, filter_fn, check_samples, data, max_error, output, force, external_data, as_json, quiet, strict):
    """Replace Conv by a binarized convolution: Conv(b(X), alpha * b(W)) + B, b(v) = +1 if v > 0 else -1."""
    from . import api
    from .model import load_model

    train = _trainer(train_hook, hook_arg, train_cmd)
    source = load_model(model_path)
    model, report = api.binarize_with_report(
        source, only=only, skip=skip, filter_function=_hook(filter_fn, "--filter-fn"), scale=scale, stage=stage,
        calibration=_calibration(calibration, source), train_function=train, emulate=emulate,
        fold_batch_norm=not keep_batchnorm, progress=_progress(quiet or as_json))
    _finish(source, model, report, input_path=model_path, suffix="binarized", output=output, force=force,
            external_data=external_data, as_json=as_json, strict=strict, check_samples=check_samples, data=data,
            max_error=max_error)


def _key_values(values):
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise UsageError(f"invalid --hook-arg '{v}': expected KEY=VALUE")
        yield key, value


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@_fold_option
@_check_options
@_output_options
def lower(model_path, keep_batchnorm, check_samples, data, max_error, output, force, external_data, as_json, quiet,
          strict):
    """Replace trainable BinaryConv ops by the native bit-packed BitConv (weights stored as bits)."""
    from . import api
    from .model import load_model

    source = load_model(model_path)
    model, report = api.lower_with_report(source, fold_batch_norm=not keep_batchnorm,
                                          progress=_progress(quiet or as_json))
    _finish(source, model, report, input_path=model_path, suffix="lowered", output=output, force=force,
            external_data=external_data, as_json=as_json, strict=strict, check_samples=check_samples, data=data,
            max_error=max_error)


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--data", required=True, type=click.Path(dir_okay=False), help=".npz of inputs keyed by input name.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Save outputs to this .npz.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def run(model_path, data, output, force):
    """Run any model (plain, binarized, lowered) in onnxruntime on the inputs in an .npz."""
    from . import runtime
    from .model import atomic_save_npz, load_model

    model = load_model(model_path)
    outputs = runtime.run(model_path, runtime.load_feeds(data, model))  # from the file: no 2 GiB re-serialization
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
@click.option("--min-accuracy", type=click.FloatRange(0, 1), metavar="X", help="Exit 1 if B's accuracy is below X.")
@click.option("--max-drop", type=click.FloatRange(0, 1), metavar="X",
              help="Exit 1 if B loses more than X accuracy vs A.")
def compare(model_a, model_b, data, labels, as_json, min_accuracy, max_drop):
    """Top-1 agreement, accuracy, output differences and median latency of two models on the same inputs."""
    from . import runtime
    from .model import load_model

    a, b = load_model(model_a), load_model(model_b)
    result = runtime.compare_models(a, b, data, labels=labels)
    if as_json:
        import json

        click.echo(json.dumps(result, indent=2))
    else:
        for key in ("A", "B"):
            r = result[key]
            acc = "" if r["accuracy"] is None else f"accuracy {r['accuracy']:.4f}, "
            click.echo(f"{key}: {acc}median latency {r['latency_ms']:.3f} ms per batch of {result['samples']}")
        click.echo(f"top-1 agreement {result['top1_agreement']:.4f}")
        for name, v in result["outputs"].items():
            click.echo(f"{name}: max abs diff {v['max_abs']:.3g}, max rel diff {v['max_rel']:.3g}")
    acc_a, acc_b = result["A"]["accuracy"], result["B"]["accuracy"]
    if (min_accuracy is not None or max_drop is not None) and acc_b is None:
        raise UsageError("--min-accuracy / --max-drop need labels in --data (--labels KEY)")
    if min_accuracy is not None and acc_b < min_accuracy:
        raise GateFailed(f"B's accuracy {acc_b:.4f} is below --min-accuracy {min_accuracy}")
    if max_drop is not None and acc_a - acc_b > max_drop:
        raise GateFailed(f"B loses {acc_a - acc_b:.4f} accuracy, more than --max-drop {max_drop}")
