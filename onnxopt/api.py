"""The public Python API: one function per command. The CLI is a thin layer over these functions.

`factor`, `binarize` and `lower` take a model (a ModelProto or a path) and the command's options as
keywords, exactly the CLI's long option names with '-' → '_' (`rank="0.6"`, `skip=["out"]`,
`check=16`, `max_error=0.5`, `output="small.onnx"`), and return (new model, Report). The input model is
never modified. Validation lives in `options`, so a bad keyword here fails with the CLI's message.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx

from . import options as opt
from . import pipeline
from .errors import GateFailed, OnnxoptError, UsageError
from .passes import Progress
from .report import Report

Model = onnx.ModelProto | str | os.PathLike


def _source(model: Model) -> tuple[onnx.ModelProto, list]:
    from .model import load_model_and_files

    if isinstance(model, onnx.ModelProto):
        return model, []
    return load_model_and_files(model)


def _command(command: str, model: Model, progress: Progress | None, options: dict[str, Any]):
    from .model import input_shapes

    groups = opt.parse(command, options)  # usage errors before any file is read
    source, protected = _source(model)
    with input_shapes(source, groups[opt.ShapeOptions].shapes):
        steps = pipeline.build(command, source, groups, protected=protected, progress=progress)
        return pipeline.run(source, steps, Report(command=command))


def factor(model: Model, *, progress: Progress | None = None, **options) -> tuple[onnx.ModelProto, Report]:
    """Gemm / MatMul(X, const W) → two MatMuls of rank k: W (m×n) ≈ U (m×k)·V (k×n).
    With `calibration` (.npz path or dict keyed by input name) the factors minimize each layer's output
    error on those inputs (whitened SVD) instead of the weight error."""
    return _command("factor", model, progress, options)


def binarize(model: Model, *, progress: Progress | None = None, **options) -> tuple[onnx.ModelProto, Report]:
    """Conv → BinaryConv ('transform'), [refit α/bias on calibration data], [train], → BitConv (stage 'all')."""
    return _command("binarize", model, progress, options)


def prune(model: Model, *, progress: Progress | None = None, **options) -> tuple[onnx.ModelProto, Report]:
    """Channel pruning (passes/prune.py): each prunable Conv/Gemm keeps `keep` of its output channels, the
    channels followed through the graph; with `calibration`, reconstruction-based selection and a least-squares
    refit of the next layers."""
    return _command("prune", model, progress, options)


def lower(model: Model, *, progress: Progress | None = None, **options) -> tuple[onnx.ModelProto, Report]:
    """BinaryConv (or its --emulate form) → BitConv: weights packed to bits for the native kernel, then a
    BatchNormalization that follows a BitConv folded into its α and bias (`keep_batchnorm=True`: not)."""
    return _command("lower", model, progress, options)


def quantize(model: Model, *, progress: Progress | None = None, **options) -> tuple[onnx.ModelProto, Report]:
    """int8 through onnxruntime.quantization (static QDQ with `calibration`, dynamic without); with `max_drop`
    and `data`, the layers that cost most accuracy alone are kept float until the model passes."""
    return _command("quantize", model, progress, options)


def finetune(original: Model, transformed: Model, data, *, labels: str | None = None, epochs: int | None = None,
             lr: float | None = None, batch_size: int | None = None, temperature: float | None = None,
             output=None, force: bool = False, external_data: bool = False,
             progress: Progress | None = None) -> tuple[onnx.ModelProto, Report]:
    """The staged workflow: train `transformed` (e.g. written by `binarize --stage transform` or `factor`) by
    distillation from `original` on the inputs in `data` (train/distill.py); the graph is unchanged, only
    weight values. Lower a binarized result with `lower` afterwards."""
    tune = opt.FinetuneOptions(finetune=data, epochs=epochs, lr=lr, batch_size=batch_size, temperature=temperature)
    save = opt.SaveOptions(output=output, force=force, external_data=external_data)
    (teacher, files_a), (student, files_b) = _source(original), _source(transformed)
    steps = [pipeline.Finetune(options=tune, teacher=teacher, labels=labels, progress=progress),
             pipeline.ValidateCustomOps(), pipeline.Check(teacher, opt.CheckOptions())]
    if output is not None:
        steps.append(pipeline.Save.checked(save, files_a + files_b))
    return pipeline.run(student, steps, Report(command="finetune"))


def apply(recipe: str | os.PathLike, model: Model, *, progress: Progress | None = None, output=None,
          force: bool = False, external_data: bool = False) -> tuple[onnx.ModelProto, Report]:
    """Run a recipe (recipe.py: [[step]] tables of commands and options, a [gate]) on `model`; the recipe is
    validated before the model is read. Raises GateFailed when a gate fails (nothing written)."""
    from . import recipe as recipes

    loaded = recipes.load(recipe)
    save = opt.SaveOptions(output=output, force=force, external_data=external_data)
    source, protected = _source(model)
    return pipeline.run_recipe(source, loaded, save, protected=protected, progress=progress)


def _check_workers(jobs: int, ray: str | None) -> None:
    if jobs < 1:
        raise UsageError(f"invalid --jobs {jobs}: give a number of processes >= 1")
    if ray is not None and (not str(ray).strip() or jobs != 1):
        raise UsageError("--ray takes a cluster address (host:port, 'auto', or 'local' to start one here) and "
                         "replaces --jobs: Ray schedules the candidates on the cluster's CPUs")


def sweep(model: Model, data, grid, *, recipe=None, labels: str | None = None, jobs: int = 1, ray: str | None = None,
          keep_best=None, report=None, latency: bool = True, progress: Progress | None = None):
    """Every combination of `grid` (["factor.rank=0.3,0.5", ...]) run as the pipeline would, scored on `data`
    against the input model, with size, FLOPs and latency and the Pareto front (sweep.py). `jobs` local worker
    processes, or `ray`: the address of a Ray cluster to run the candidates on. `keep_best`: a folder for the
    front's models; `report`: an HTML file with the table and charts (needs matplotlib)."""
    from pathlib import Path

    from . import sweep as sweeps
    from .model import check_output

    axes = sweeps.parse_grid(list(grid))  # usage errors before any work
    base = None
    if recipe is not None:
        from . import recipe as recipes

        base = recipes.load(recipe).steps
    _check_workers(jobs, ray)
    if report is not None:
        check_output(report, force=True)
    source, _ = _source(model)
    result = sweeps.sweep(source, data, axes, base=base, labels=labels, jobs=jobs, ray=ray, latency=latency,
                          progress=progress)
    if keep_best is not None:
        folder = Path(keep_best)
        folder.mkdir(parents=True, exist_ok=True)
        from .model import save_model

        for i, row in enumerate(r for r in result.rows if r["front"]):
            row["path"] = str(save_model(onnx.load_model_from_string(row["model"]), folder / f"front_{i}.onnx",
                                         force=True))
    if report is not None:
        from .model import atomic_write_text

        atomic_write_text(sweeps.html_report(result), report)
    return result


def sensitivity(model: Model, data, axis: str, *, labels: str | None = None, jobs: int = 1, ray: str | None = None,
                report=None, progress: Progress | None = None) -> dict:
    """Distiller's sensitivity analysis: for `axis` ("factor.rank=0.1,0.3"), per layer the step changes and per
    value, the score with only that layer changed (sweep.sensitivity). `report`: an HTML file with the table
    and a chart of score vs value per layer."""
    from . import sweep as sweeps
    from .model import check_output

    (parsed,) = sweeps.parse_grid([axis])
    _check_workers(jobs, ray)
    if report is not None:
        check_output(report, force=True)
    result = sweeps.sensitivity(_source(model)[0], data, parsed, labels=labels, jobs=jobs, ray=ray,
                                progress=progress)
    if report is not None:
        from .model import atomic_write_text

        atomic_write_text(sweeps.sensitivity_html(result), report)
    return result


def inspect(model: Model, *, input_shape=()) -> dict:
    """{"layers": every layer a pass's registry knows (plain, transformed, lowered, int8; If/Loop bodies
    marked) with weight shape, params, FLOPs per sample (None where a size is unknown) and each pass's verdict,
    "totals": the whole model's params, weight bytes, model bytes and FLOPs, "notes"}. `input_shape`: sizes for
    symbolic inputs, as `--input-shape`."""
    from .inspection import inspect_model
    from .model import input_shapes

    source, _ = _source(model)
    with input_shapes(source, opt.ShapeOptions(input_shape=tuple(input_shape)).shapes):
        return inspect_model(source)


def run(model: Model, data) -> dict[str, np.ndarray]:
    """Outputs of any model (plain, transformed, lowered) on `data` (.npz path or dict keyed by input name)."""
    from . import runtime

    source, _ = _source(model)
    feeds = runtime.feeds_from(data, source)
    # from the file when there is one: no 2 GiB re-serialization
    return runtime.run(model if not isinstance(model, onnx.ModelProto) else source, feeds)


def check(reference: Model, candidate: Model, *, data=None, samples: int = 8) -> dict:
    """Both models in onnxruntime with graph optimizations off: max abs/rel output difference per output,
    on `data` or on `samples` random inputs."""
    from . import runtime

    a, b = _source(reference)[0], _source(candidate)[0]
    feeds = runtime.feeds_from(data, a) if data is not None else runtime.random_feeds(a, samples)
    return runtime.compare_outputs(a, b, feeds)


def compare(a: Model, b: Model, data, *, labels: str | None = None, min_accuracy: float | None = None,
            max_drop: float | None = None) -> dict:
    """A vs B on `data` (.npz): top-1 agreement, accuracy (with labels), output differences, latency.
    Raises GateFailed when B's accuracy is below `min_accuracy` or drops more than `max_drop`."""
    from .runtime.measure import compare_models

    for name, value in (("--min-accuracy", min_accuracy), ("--max-drop", max_drop)):
        if value is not None and not 0 <= value <= 1:
            raise UsageError(f"invalid {name} {value}: give a fraction in [0, 1]")
    result = compare_models(_source(a)[0], _source(b)[0], data, labels=labels)
    acc_a, acc_b = result["A"]["accuracy"], result["B"]["accuracy"]
    if (min_accuracy is not None or max_drop is not None) and acc_b is None:
        raise UsageError("--min-accuracy / --max-drop need labels in --data (--labels KEY)")
    if min_accuracy is not None and acc_b < min_accuracy:
        raise GateFailed(f"B's accuracy {acc_b:.4f} is below --min-accuracy {min_accuracy}", result)
    if max_drop is not None and acc_a - acc_b > max_drop:
        raise GateFailed(f"B loses {acc_a - acc_b:.4f} accuracy, more than --max-drop {max_drop}", result)
    return result


__all__ = ["factor", "binarize", "prune", "lower", "quantize", "finetune", "apply", "sweep", "sensitivity",
           "inspect", "run", "check", "compare", "OnnxoptError"]
