"""A command run: `build` adds to a registered command's rewrite steps the check, gate and save steps every command
shares; `run_recipe` chains several commands, measures each, and gates the result."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx

from ..report import Report
from . import options as opt
from . import registry
from .steps import (
    Check,
    Gate,
    Save,
    Step,
    run,
)


def build(command: str, source: onnx.ModelProto, groups: dict, *, protected=(), progress=None,
          given_bytes: int | None = None) -> list[Step]:
    """The steps of `command` for these options (from `registry.parse`): its rewrite, then check, gate, save.
    `given_bytes`: the input's size as given (its files), which the report compares the output with."""
    check, save = groups[opt.CheckOptions], groups[opt.SaveOptions]
    shape = groups[opt.ShapeOptions]
    measure = Check(source, check, shapes=shape.shapes, values=shape.values, given_bytes=given_bytes)
    measure.check_inputs()  # before the rewrite's work
    steps = registry.command(command).rewrite(groups, progress, source)
    steps += [measure, Gate(check, strict=save.strict)]
    if save.output is not None:
        steps.append(Save.checked(save, protected))
    return steps


def run_recipe(source: onnx.ModelProto, recipe, save: opt.SaveOptions, *, protected=(),
               progress=None, given_bytes: int | None = None) -> tuple[onnx.ModelProto, Report]:
    """A recipe's commands in order on `source` (each one's rewrite steps, scored against `source` where a step
    searches or gates), a summary row per command, then the recipe's gates on the final model, then save."""
    gate = opt.CheckOptions(**recipe.gate)
    save_step = Save.checked(save, protected) if save.output is not None else None
    measure = StepMeasure(source, gate)
    report = Report(command="apply")
    report.recipe = {"path": str(recipe.path), "steps": []}
    final = Check(source, gate, given_bytes=given_bytes)
    final.check_inputs()  # before the first step's work
    model = source
    for command, options in recipe.steps:
        groups = registry.parse(command, {**options, **recipe.gate})
        model, step_report = run(model, registry.command(command).rewrite(groups, progress, source),
                                 Report(command=command))
        report.merge(step_report)
        report.recipe["steps"].append({"run": command, "layers_changed": len(step_report.changed),
                                       "size": model.ByteSize(), **measure(model)})
    steps = [final, Gate(gate, strict=save.strict)]
    steps += [save_step] if save_step else []
    return run(model, steps, report)


@dataclass
class StepMeasure:
    """Score and latency of a recipe's intermediate model against its input, when the gate gives data."""

    source: onnx.ModelProto
    gate: opt.CheckOptions
    scorer: Any = None

    def __call__(self, model) -> dict:
        if self.gate.data is None:
            return {"score": None, "latency": None}
        from ..measure.compare import alternating_latency
        from ..measure.scores import Scorer

        if self.scorer is None:  # the input model's predictions, once
            self.scorer = Scorer(self.source, self.gate.data, self.gate.labels)
        feeds = {k: v[:8] for k, v in self.scorer.feeds.items()}
        return {"score": self.scorer.drop(model), "latency": alternating_latency(self.source, model, feeds)}
