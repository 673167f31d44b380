"""The pipeline: a command is a list of steps, each `(model, report) -> (model, report)`.

    load → rewrite (factor | binarize) → [refit on calibration data] → [train] → lower (+ fold) | emulate
         → check → gate → save

Steps never print: they append to the one Report. `build(command, source, options)` makes the step
list of a command from its typed options; `run` runs it. Sweeps and recipes are lists of such pipelines.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import onnx

from . import options as opt
from .errors import GateFailed, UsageError
from .passes import Progress, Rules, apply_rules, candidate_names
from .report import Report

Step = Callable[[onnx.ModelProto, Report], tuple[onnx.ModelProto, Report]]


@dataclass
class Pass:
    """One rewrite pass over the main graph (factor, binarize, lower, fold, emulate)."""

    name: str
    rules: Callable[[onnx.ModelProto], Rules]  # built per model: data-aware rules read it first
    select: opt.SelectOptions | None = None
    progress: Progress | None = None
    patterns: tuple[tuple[str, str], ...] = ()  # (flag, pattern) of per-layer options, checked like --only

    def __call__(self, model, report):
        rules = self.rules(model)
        selection = (self.select or opt.SelectOptions()).selection(list(self.patterns))
        _check_patterns(selection, candidate_names(model, rules), "/".join(op for _, op in rules))
        new, step_report = apply_rules(model, rules, selection, command=self.name, progress=self.progress)
        report.merge(step_report)
        return new, report


def _check_patterns(selection, names: list[str], kinds: str) -> None:
    """A pattern that matches no candidate layer is a usage error (a typo would otherwise change the
    wrong layers, or none), the same for --only, --skip and --rank-for."""
    for flag, pattern in selection.unused_patterns(names):
        raise UsageError(f"{flag} pattern '{pattern}' matches no {kinds} layer")


def factor_rules(options: opt.FactorOptions, recover: opt.RecoverOptions) -> Callable:
    from .passes import factor

    def build(model):
        whitening = None
        if recover.calibration is not None:
            from .train.calibrate import dense_grams, load_calibration

            feeds = load_calibration(recover.calibration, model)
            whitening = dense_grams(model, feeds, factor.rules(options))
        return factor.rules(options, whitening)

    return build


@dataclass
class Refit:
    """Refit α and bias of each BinaryConv on calibration data (binarize --calibration)."""

    calibration: Any
    name: str = "refit"

    def __call__(self, model, report):
        from .train.calibrate import load_calibration, refit_binary

        if not report.changed:  # no binarized layer to refit
            return model, report
        report.steps.append(self.name)
        return refit_binary(model, load_calibration(self.calibration, model)), report


@dataclass
class Train:
    """A training hook or an external trainer; only weight values may change."""

    recover: opt.RecoverOptions
    name: str = "train"

    def __call__(self, model, report):
        from .train.hooks import command_trainer, run_training

        r = self.recover
        report.steps.append(self.name)
        if r.train_cmd is not None:  # the command's own timeout: its process group is killed
            trainer = command_trainer(r.train_cmd)
            return run_training(lambda m: trainer(m, timeout=r.train_timeout), model), report
        return run_training(r.train_function, model, timeout=r.train_timeout, **r.hook_kwargs), report


@dataclass
class Check:
    """Run the source and the new model in onnxruntime (optimizations off); max abs/rel difference per output."""

    source: onnx.ModelProto
    check: opt.CheckOptions
    name: str = "check"

    def __call__(self, model, report):
        from . import runtime

        if self.check.data is not None:
            feeds = runtime.feeds_from(self.check.data, self.source)
        else:
            feeds = runtime.random_feeds(self.source, self.check.check or 8)
        report.check = runtime.compare_outputs(self.source, model, feeds)
        report.steps.append(self.name)
        return model, report


@dataclass
class Gate:
    """Refuse the result (GateFailed, nothing written) when the check exceeds --max-error, or when nothing
    changed under --strict."""

    max_error: float | None = None
    strict: bool = False
    name: str = "gate"

    def __call__(self, model, report):
        if report.check and self.max_error is not None and report.check["max_rel"] > self.max_error:
            raise GateFailed(f"max relative output difference {report.check['max_rel']:.3g} exceeds --max-error "
                             f"{self.max_error}; nothing was written", report)
        if not report.changed:
            report.warnings.append("no layer was changed")
            if self.strict:
                raise GateFailed("no layer was changed (--strict); nothing was written", report)
        return model, report


@dataclass
class Save:
    """Check and write the model atomically; never over one of `protected` (the input's files)."""

    save: opt.SaveOptions
    protected: tuple[Path, ...] = ()
    name: str = "save"

    def __call__(self, model, report):
        from .model import save_model

        path = save_model(model, self.save.output, force=self.save.force, external_data=self.save.external_data,
                          protected=list(self.protected))
        report.output = str(path)
        return model, report


def _lower_steps(lower: opt.LowerOptions, progress) -> list[Step]:
    from .passes import fold
    from .passes import lower as lowering

    steps: list[Step] = [ValidateCustomOps(), Pass("lower", lambda m: lowering.rules(), progress=progress)]
    if not lower.keep_batchnorm:
        steps.append(Pass("fold", lambda m: fold.rules()))
    return steps


@dataclass
class ValidateCustomOps:
    """Refuse com.onnxopt ops whose constants a kernel could not take (hand-edited files, hooks)."""

    name: str = "validate"

    def __call__(self, model, report):
        from .model import Constants
        from .ops import check_custom_nodes

        check_custom_nodes(model.graph, Constants(model.graph).get)
        return model, report


def _rewrite_steps(command: str, groups: dict, progress) -> list[Step]:
    recover = groups.get(opt.RecoverOptions)
    select = groups.get(opt.SelectOptions)
    if command == "factor":
        options = groups[opt.FactorOptions]
        per_layer = tuple(("--rank-for", p) for p, _ in options.rank_overrides)
        steps: list[Step] = [Pass("factor", factor_rules(options, recover), select, progress, per_layer)]
    elif command == "binarize":
        from .passes import binarize

        options = groups[opt.BinarizeOptions]
        steps = [Pass("binarize", lambda m: binarize.rules(options), select, progress)]
        if recover.calibration is not None:
            steps.append(Refit(recover.calibration))
    else:
        return _lower_steps(groups[opt.LowerOptions], progress)
    if recover.trains:
        steps.append(Train(recover))
    if command == "binarize":
        steps += _binarize_tail(groups[opt.BinarizeOptions], groups[opt.LowerOptions], progress)
    return steps


def _binarize_tail(options: opt.BinarizeOptions, lower: opt.LowerOptions, progress) -> list[Step]:
    if options.emulate:  # standard ops only, for external trainers; `lower` reads this form back
        from .passes import emulate

        return [Pass("emulate", lambda m: emulate.rules())]
    return _lower_steps(lower, progress) if options.stage == "all" else []


def build(command: str, source: onnx.ModelProto, groups: dict, *, protected=(), progress=None) -> list[Step]:
    """The steps of `command` for these options (from `options.parse`)."""
    steps = _rewrite_steps(command, groups, progress)
    check, save = groups[opt.CheckOptions], groups[opt.SaveOptions]
    if check.wanted:
        steps.append(Check(source, check))
    steps.append(Gate(max_error=check.max_error, strict=save.strict))
    if save.output is not None:
        steps.append(Save(save, tuple(protected)))
    return steps


def run(model: onnx.ModelProto, steps: list[Step], report: Report) -> tuple[onnx.ModelProto, Report]:
    for step in steps:
        model, report = step(model, report)
    return model, report
