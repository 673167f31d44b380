"""The public Python API: one function per command. The CLI is a thin layer over these functions.

The rewriting commands (factor, binarize, prune, lower, quantize: one function each, made from the command
registry) take a model (a ModelProto or a path) and the command's options as keywords, exactly the CLI's long
option names with '-' → '_' (`rank="0.6"`, `skip=["out"]`, `check=16`, `max_error=0.5`, `output="small.onnx"`),
and return (new model, Report). The input model is never modified. Validation lives in the option dataclasses,
so a bad keyword here fails with the CLI's message.
"""
from __future__ import annotations

import os

import numpy as np
import onnx

from .errors import GateFailed, OnnxoptError, UsageError
from .passes.rules import Progress
from .pipeline import build as commands
from .pipeline import options as opt
from .pipeline import registry
from .pipeline import steps as pipeline_steps
from .report import Report

Model = onnx.ModelProto | str | os.PathLike


def _source(model: Model) -> tuple[onnx.ModelProto, list]:
    """The model every command starts from (weights normalized: `Constant` tensors become initializers) and
    the files it was read from."""
    from .graph.constants import constants_as_initializers
    from .graph.io import load_model_and_files

    model, files = (model, []) if isinstance(model, onnx.ModelProto) else load_model_and_files(model)
    return constants_as_initializers(model), files


def _given_bytes(model: Model, files: list) -> int:
    """The input's size as the user measures it: its files on disk (the .onnx and its data), or the proto's."""
    if isinstance(model, onnx.ModelProto):
        return model.ByteSize()
    return sum(os.path.getsize(f) for f in files)


def run_command(name: str, model: Model, *, progress: Progress | None = None,
                **options) -> tuple[onnx.ModelProto, Report]:
    """Run the registered command `name` (pipeline/registry.py) on `model` with the CLI's options as keywords."""
    from .graph.shapes import check_input_shapes

    groups = registry.parse(name, options)  # usage errors before any file is read
    source, files = _source(model)
    check_input_shapes(source, groups[opt.ShapeOptions].shapes)
    protected = _inputs(files, *_path_options(groups))
    steps = commands.build(name, source, groups, protected=protected, progress=progress,
                           given_bytes=_given_bytes(model, files))
    return pipeline_steps.run(source, steps, Report(command=name))


def _command_function(command: registry.Command):
    """The API function of a registered command: `onnxopt.factor(model, rank="0.6")` is `onnxopt factor MODEL
    --rank 0.6`."""
    def function(model: Model, *, progress: Progress | None = None, **options) -> tuple[onnx.ModelProto, Report]:
        return run_command(command.name, model, progress=progress, **options)

    function.__name__ = function.__qualname__ = command.name
    function.__doc__ = (f"{command.help}\n\nOptions: the keywords of `onnxopt {command.name} --help` (long option "
                        "names, '-' → '_'). Returns (new model, Report); the input model is never modified.")
    return function


# factor, binarize, prune, lower, quantize, and any command registered later
globals().update({name: _command_function(c) for name, c in registry.COMMANDS.items()})


def __getattr__(name: str):
    if name in registry.COMMANDS:  # registered after this module was imported
        return _command_function(registry.COMMANDS[name])
    raise AttributeError(f"module 'onnxopt.api' has no attribute {name!r}")


def finetune(original: Model, transformed: Model, data, *, labels: str | None = None, steps: int | None = None,
             epochs: int | None = None, lr: float | None = None, batch_size: int | None = None,
             temperature: float | None = None, distill: str | None = None, holdout: float | None = None,
             max_time: float | None = None, output=None, force: bool = False, external_data: bool = False,
             progress: Progress | None = None) -> tuple[onnx.ModelProto, Report]:
    """The staged workflow: train `transformed` (e.g. written by `binarize --stage transform` or `factor`) by
    distillation from `original` on the inputs in `data` (recover/distill.py); the graph is unchanged, only
    weight values. Lower a binarized result with `lower` afterwards."""
    tune = opt.FinetuneOptions(finetune=data, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size,
                               temperature=temperature, distill=distill, holdout=holdout, max_time=max_time)
    save = opt.SaveOptions(output=output, force=force, external_data=external_data)
    (teacher, files_a), (student, files_b) = _source(original), _source(transformed)
    steps = [pipeline_steps.Finetune(options=tune, teacher=teacher, labels=labels, progress=progress),
             pipeline_steps.ValidateCustomOps(), pipeline_steps.Check(teacher, opt.CheckOptions())]
    if output is not None:
        steps.append(pipeline_steps.Save.checked(save, _inputs(files_a + files_b, data)))
    return pipeline_steps.run(student, steps, Report(command="finetune"))


def apply(recipe: str | os.PathLike, model: Model, *, progress: Progress | None = None, output=None,
          force: bool = False, external_data: bool = False, strict: bool = False, allow_code: bool = False,
          calibration=None, finetune=None, data=None, labels: str | None = None) -> tuple[onnx.ModelProto, Report]:
    """Run a recipe (pipeline/recipe.py: [[step]] tables of commands and options, a [gate]) on `model`; the recipe is
    validated before the model is read. Raises GateFailed when a gate fails (nothing written), and with
    `strict` when no layer was changed. A recipe key that runs code (train_cmd, train_hook, ...) needs
    `allow_code`. `calibration`/`finetune`: data for every step that takes it, `data`/`labels`: the gate's; they
    replace what the recipe names, so that one recipe serves any model."""
    from .pipeline import recipe as recipes

    given = opt.ApplyOptions(recipe, model, allow_code=allow_code, calibration=calibration, finetune=finetune,
                             data=data, labels=labels).given
    loaded = recipes.load(recipe, allow_code=allow_code, given=given)
    save = opt.SaveOptions(output=output, force=force, external_data=external_data, strict=strict)
    source, files = _source(model)
    named = [v for _, options in loaded.steps for v in options.values()] + list(loaded.gate.values())
    protected = _inputs(files, recipe, *(v for v in named if isinstance(v, str)))  # the recipe's files
    return commands.run_recipe(source, loaded, save, protected=protected, progress=progress,
                               given_bytes=_given_bytes(model, files))


def sweep(model: Model, data, grid, *, recipe=None, labels: str | None = None, jobs: int = 1, ray: str | None = None,
          keep_best=None, report=None, latency: bool = True, progress: Progress | None = None,
          allow_code: bool = False, force: bool = False):
    """Every combination of `grid` (["factor.rank=0.3,0.5", ...]) run as the pipeline would, scored on `data`
    against the input model, with size, FLOPs and latency and the Pareto front (pipeline/sweep.py). `jobs` local worker
    processes, or `ray`: the address of a Ray cluster to run the candidates on. `keep_best`: a folder for the
    front's models; `report`: an HTML file with the table and charts (needs matplotlib); existing files there are
    replaced only with `force`, input files never."""
    from .graph.io import check_models_folder, check_output, save_models
    from .pipeline import sweep as sweeps

    axes = sweeps.parse_grid(list(grid))  # usage errors before any work
    base = None
    if recipe is not None:
        from .pipeline import recipe as recipes

        base = recipes.load(recipe, allow_code=allow_code).steps
    opt.SweepOptions(grid=tuple(grid), recipe=recipe, jobs=jobs, ray=ray, keep_best=keep_best, report=report)
    source, protected = _source(model)
    protected = _inputs(protected, data, recipe)
    if report is not None:
        check_output(report, force=force, protected=protected)
    if keep_best is not None:
        check_models_folder(keep_best, "front_*.onnx", force=force, protected=protected)
    result = sweeps.sweep(source, data, axes, base=base, labels=labels, jobs=jobs, ray=ray, latency=latency,
                          progress=progress)
    if keep_best is not None:
        front = [r for r in result.rows if r["front"]]
        models = {f"front_{i}.onnx": onnx.load_model_from_string(r["model"]) for i, r in enumerate(front)}
        for row, path in zip(front, save_models(models, keep_best, force=force, protected=protected)):
            row["path"] = str(path)
    if report is not None:
        from .graph.io import atomic_write_text
        from .pipeline.report_page import html_report

        atomic_write_text(html_report(result), report, force=force, protected=protected)
    return result


def _path_options(groups) -> list:
    """The values of a command's file options (calibration, data, ...): files it reads."""
    import dataclasses

    return [getattr(g, f.name) for g in groups.values() if dataclasses.is_dataclass(g)
            for f in dataclasses.fields(g) if f.metadata.get("path")]


def _inputs(model_files: list, *paths) -> list:
    """The files a run reads (the model's, the data, a recipe): no output may replace one."""
    from pathlib import Path

    return list(model_files) + [Path(p) for p in paths if isinstance(p, (str, os.PathLike))]


def sensitivity(model: Model, data, axis: str, *, labels: str | None = None, jobs: int = 1, ray: str | None = None,
                report=None, progress: Progress | None = None, force: bool = False) -> dict:
    """Distiller's sensitivity analysis: for `axis` ("factor.rank=0.1,0.3"), per layer the step changes and per
    value, the score with only that layer changed (sweep.sensitivity). `report`: an HTML file with the table
    and a chart of score vs value per layer."""
    from .graph.io import check_output
    from .pipeline import sweep as sweeps

    (parsed,) = sweeps.parse_grid([axis])
    opt.SweepOptions(sensitivity=axis, jobs=jobs, ray=ray, report=report)
    source, protected = _source(model)
    protected = _inputs(protected, data)
    if report is not None:
        check_output(report, force=force, protected=protected)
    result = sweeps.sensitivity(source, data, parsed, labels=labels, jobs=jobs, ray=ray, progress=progress)
    if report is not None:
        from .graph.io import atomic_write_text
        from .pipeline.report_page import sensitivity_html

        atomic_write_text(sensitivity_html(result), report, force=force, protected=protected)
    return result


def inspect(model: Model, *, input_shape=()) -> dict:
    """{"layers": every layer a pass's registry knows (plain, transformed, lowered, int8; If/Loop bodies
    marked) with weight shape, params, FLOPs per sample (None where a size is unknown) and each pass's verdict,
    "totals": the whole model's params, weight bytes, model bytes and FLOPs, "notes"}. `input_shape`: sizes for
    symbolic inputs, as `--input-shape`."""
    from .graph.shapes import check_input_shapes
    from .measure.inspect import inspect_model

    shapes = opt.ShapeOptions(input_shape=tuple(input_shape)).shapes
    source, _ = _source(model)
    check_input_shapes(source, shapes)
    return inspect_model(source, shapes)


def run(model: Model, data, *, output=None, force: bool = False) -> dict[str, np.ndarray]:
    """Outputs of any model (plain, transformed, lowered) on `data` (.npz path or dict keyed by input name);
    `output`: an .npz to save them to (never one of the inputs, an existing file only with `force`)."""
    from . import runtime
    from .graph.io import atomic_save_npz, check_output
    from .measure.feeds import feeds_from

    source, protected = _source(model)
    protected = _inputs(protected, data)
    if output is not None:
        check_output(output, force=force, protected=protected)
    feeds = feeds_from(data, source)
    # from the file when there is one: no 2 GiB re-serialization
    outputs = runtime.run(model if not isinstance(model, onnx.ModelProto) else source, feeds)
    if output is not None:
        atomic_save_npz(outputs, output, force=force, protected=protected)
    return outputs


def check(reference: Model, candidate: Model, *, data=None, samples: int = 8) -> dict:
    """Both models in onnxruntime with graph optimizations off: max abs/rel output difference per output,
    on `data` or on `samples` random inputs."""
    from .measure.compare import compare_outputs
    from .measure.feeds import feeds_from, random_feeds

    a, b = _source(reference)[0], _source(candidate)[0]
    feeds = feeds_from(data, a) if data is not None else random_feeds(a, samples)
    return compare_outputs(a, b, feeds)


def compare(a: Model, b: Model, data, *, labels: str | None = None, min_accuracy: float | None = None,
            max_drop: float | None = None) -> dict:
    """A vs B on `data` (.npz): top-1 agreement, accuracy (with labels), output differences, latency.
    Raises GateFailed when B's accuracy is below `min_accuracy` or drops more than `max_drop`."""
    from .measure.compare import compare_models

    opt.CompareOptions(model_a=a, model_b=b, min_accuracy=min_accuracy, max_drop=max_drop)
    result = compare_models(_source(a)[0], _source(b)[0], data, labels=labels)
    acc_a, acc_b = result["A"]["accuracy"], result["B"]["accuracy"]
    if (min_accuracy is not None or max_drop is not None) and acc_b is None:
        raise UsageError("--min-accuracy / --max-drop need labels in --data (--labels KEY)")
    if min_accuracy is not None and acc_b < min_accuracy:
        raise GateFailed(f"B's accuracy {acc_b:.4f} is below --min-accuracy {min_accuracy}", result)
    if max_drop is not None and acc_a - acc_b > max_drop:
        raise GateFailed(f"B loses {acc_a - acc_b:.4f} accuracy, more than --max-drop {max_drop}", result)
    return result


__all__ = [*registry.COMMANDS, "finetune", "apply", "sweep", "sensitivity",
           "inspect", "run", "check", "compare", "OnnxoptError"]
