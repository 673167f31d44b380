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


def _whitening(model, options: opt.FactorOptions, recover: opt.RecoverOptions) -> dict | None:
    """Gram matrices of the dense layers' inputs on the calibration data, if any was given."""
    if recover.calibration is None:
        return None
    from .passes import factor
    from .train.calibrate import dense_grams, load_calibration

    return dense_grams(model, load_calibration(recover.calibration, model), factor.rules(options))


def factor_rules(options: opt.FactorOptions, recover: opt.RecoverOptions) -> Callable:
    from .passes import factor

    return lambda model: factor.rules(options, _whitening(model, options, recover))


@dataclass
class Budgeted:
    """factor --budget: ranks allocated under the budget (`budget.allocate`); with KIND=auto, the smallest
    budget whose model loses at most --max-drop on --data, by bisection, each candidate a full allocation.
    The SVDs (and Gram matrices) are computed once for all candidates."""

    options: opt.FactorOptions
    recover: opt.RecoverOptions
    select: opt.SelectOptions
    check: opt.CheckOptions
    progress: Progress | None = None
    name: str = "factor"

    def __call__(self, model, report):
        from . import budget
        from .passes import factor

        spec, whitening = self.options.budget_spec, _whitening(model, self.options, self.recover)
        layers, spectra = budget.collect(model, factor.rules(self.options), self.select.selection(), whitening)
        patterns = tuple(("--rank-for", p) for p, _ in self.options.rank_overrides)

        def factored(fraction):
            allocation = budget.allocate(layers, spec.kind, fraction)
            rules = factor.rules(self.options, whitening, ranks=allocation.ranks, spectra=spectra)
            new, step_report = Pass(self.name, lambda m: rules, self.select, None, patterns)(
                model, Report(command=self.name))
            return new, step_report, allocation

        fraction, searched = spec.fraction, None
        if fraction is None:
            from .runtime.score import Scorer, require_scores

            scorer = Scorer(model, self.check.data, self.check.labels)
            require_scores(scorer)
            searched = budget.search(lambda f: scorer.drop(factored(f)[0])["drop"],
                                     budget.smallest_fraction(layers, spec.kind), self.check.max_drop, self.progress)
            fraction = min((c["fraction"] for c in searched if c["passed"]), default=1.0)
        new, step_report, allocation = factored(fraction)
        report.merge(step_report)
        report.budget = {"budget": str(spec), **allocation.to_dict(), "search": searched}
        return new, report


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
        if self.check.data is not None:
            from .runtime.score import Scorer, require_scores

            scorer = Scorer(self.source, self.check.data, self.check.labels)
            if self.check.max_drop is not None:
                require_scores(scorer)
            report.check["score"] = scorer.drop(model)
        report.steps.append(self.name)
        return model, report


@dataclass
class Gate:
    """Refuse the result (GateFailed, nothing written) when the check exceeds --max-error or --max-drop, or
    when nothing changed under --strict."""

    max_error: float | None = None
    strict: bool = False
    max_drop: float | None = None
    name: str = "gate"

    def __call__(self, model, report):
        if report.check and self.max_error is not None and report.check["max_rel"] > self.max_error:
            raise GateFailed(f"max relative output difference {report.check['max_rel']:.3g} exceeds --max-error "
                             f"{self.max_error}; nothing was written", report)
        score = (report.check or {}).get("score")
        if score and self.max_drop is not None and score["drop"] > self.max_drop:
            raise GateFailed(f"{score['metric']} drops by {score['drop']:.4f} ({score['reference']:.4f} -> "
                             f"{score['candidate']:.4f}), more than --max-drop {self.max_drop}; nothing was "
                             "written", report)
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
        if options.budget_spec is not None:
            steps = [Budgeted(options, recover, select or opt.SelectOptions(), groups[opt.CheckOptions], progress)]
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
    steps.append(Gate(max_error=check.max_error, strict=save.strict, max_drop=check.max_drop))
    if save.output is not None:
        steps.append(Save(save, tuple(protected)))
    return steps


def run(model: onnx.ModelProto, steps: list[Step], report: Report) -> tuple[onnx.ModelProto, Report]:
    for step in steps:
        model, report = step(model, report)
    return model, report
