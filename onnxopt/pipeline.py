"""The pipeline: a command is a list of steps, each `(model, report) -> (model, report)`.

    load → rewrite (factor | binarize) → [refit on calibration data] → [finetune by distillation] → [train hook]
         → lower (+ fold) | emulate → check → gate → save

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
from .passes import Progress, Rules, apply_rules, candidate_layers
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
        matched = _check_patterns(selection, candidate_layers(model, rules), "/".join(op for _, op in rules))
        new, step_report = apply_rules(model, rules, selection, command=self.name, progress=self.progress)
        step_report.patterns = matched
        report.merge(step_report)
        return new, report


def _check_patterns(selection, layers: list[tuple[str, tuple]], kinds: str) -> list[dict]:
    """What each pattern matches among the candidate layers; one that matches none is a usage error (a typo would
    otherwise change the wrong layers, or none), the same for --only, --skip and --rank-for."""
    matched = selection.matched(layers)
    for m in matched:
        if not m["layers"]:
            raise UsageError(f"{m['flag']} pattern '{m['pattern']}' matches no {kinds} layer{_close(m, layers)}")
    return matched


def _close(m: dict, layers) -> str:
    import difflib

    names = sorted({p for n, paths in layers for p in (n, *paths)})
    close = difflib.get_close_matches(m["pattern"], names, n=3, cutoff=0.5)
    return f" (close: {', '.join(close)})" if close else ""


def _whitening(model, options: opt.FactorOptions, recover: opt.RecoverOptions,
               select: opt.SelectOptions | None) -> dict | None:
    """Gram matrices of the inputs of the layers factor will take (selected, accepted by their rule), on the
    calibration data, if any was given: a conv's Gram is of its im2col'd patches, too costly to make for
    layers that are skipped or cannot be factored (and one without a constant weight has no kernel size)."""
    if recover.calibration is None:
        return None
    from .passes import GraphContext, factor, op_key
    from .train.calibrate import dense_grams, load_calibration

    rules, ctx = factor.rules(options), GraphContext(model)
    selection = (select or opt.SelectOptions()).selection()
    wanted = {ctx.name_of(n) for n in model.graph.node if op_key(n) in rules
              and not (selection.decline_reason(n, ctx.name_of(n)) or rules[op_key(n)].check(n, ctx))}
    return dense_grams(model, load_calibration(recover.calibration, model), rules, wanted)


def factor_rules(options: opt.FactorOptions, recover: opt.RecoverOptions, select: opt.SelectOptions | None):
    from .passes import factor

    return lambda model: factor.rules(options, _whitening(model, options, recover, select))


@dataclass(kw_only=True)
class _ScoringStep:
    """What the steps that score their candidates against --data share (a budget search, int8 exclusion)."""

    select: opt.SelectOptions
    check: opt.CheckOptions
    progress: Progress | None = None
    reference: onnx.ModelProto | None = None  # what --max-drop scores against (a recipe's input), else the step's

    def scorer(self, model):
        from .runtime.measure import Scorer, require_scores

        scorer = Scorer(self.reference or model, self.check.data, self.check.labels)
        require_scores(scorer)
        return scorer


@dataclass(kw_only=True)
class Budgeted(_ScoringStep):
    """factor --budget: ranks allocated under the budget (`budget.allocate`); with KIND=auto, the smallest
    budget whose model loses at most --max-drop on --data, by bisection, each candidate a full allocation.
    The SVDs (and Gram matrices) are computed once for all candidates."""

    options: opt.FactorOptions
    recover: opt.RecoverOptions
    name: str = "factor"

    def __call__(self, model, report):
        from . import budget
        from .passes import factor

        spec, whitening = self.options.budget_spec, _whitening(model, self.options, self.recover, self.select)
        layers, spectra = budget.collect(model, factor.rules(self.options), self.select.selection(), whitening)
        patterns = self.options.patterns

        def factored(fraction):
            allocation = budget.allocate(layers, spec.kind, fraction)
            rules = factor.rules(self.options, whitening, ranks=allocation.ranks, spectra=spectra)
            new, step_report = Pass(self.name, lambda m: rules, self.select, None, patterns)(
                model, Report(command=self.name))
            return new, step_report, allocation

        fraction, searched = spec.fraction, None
        if fraction is None:
            scorer = self.scorer(model)
            searched = budget.search(lambda f: scorer.drop(factored(f)[0])["drop"],
                                     budget.smallest_fraction(layers, spec.kind), self.check.max_drop, self.progress)
            fraction = min((c["fraction"] for c in searched if c["passed"]), default=1.0)
        new, step_report, allocation = factored(fraction)
        report.merge(step_report)
        report.budget = {"budget": str(spec), **allocation.to_dict(), "search": searched}
        return new, report


@dataclass(kw_only=True)
class Quantize(_ScoringStep):
    """int8 through onnxruntime.quantization (passes/quantize.py); with --max-drop on --data, the layers that cost
    most alone are kept float, one at a time, until the model passes."""

    options: opt.QuantizeOptions
    name: str = "quantize"

    def __call__(self, model, report):
        from .passes import quantize as q
        from .runtime import session_options

        named = q.name_nodes(model)
        calibration = None
        if self.options.calibration is not None:
            from .train.calibrate import load_calibration

            calibration = load_calibration(self.options.calibration, named)
        selection = self.select.selection()
        include, step_report = q.candidates(named, selection, dynamic=calibration is None)
        step_report.patterns = _check_patterns(selection, q.candidate_layers(named, dynamic=calibration is None),
                                               "Conv/Gemm/MatMul")

        def quantize(names):
            return q.run_quantizer(named, names, calibration=calibration, per_channel=self.options.per_channel,
                                   session_options=session_options)

        kept: dict[str, float] = {}
        if self.check.max_drop is not None:
            scorer = self.scorer(model)
            new, kept = q.keep_float_until(quantize, include, lambda m: scorer.drop(m)["drop"],
                                           self.check.max_drop, self.progress)
        else:
            new = quantize(include)
        q.mark_results(step_report, q.quantized_layers(new), kept)
        report.merge(step_report)
        return new, report


@dataclass(kw_only=True)
class Prune:
    """Channel pruning (passes/prune.py): magnitude, or with calibration data He et al.'s reconstruction and a
    least-squares refit of each consumer."""

    options: opt.PruneOptions
    recover: opt.RecoverOptions
    select: opt.SelectOptions
    name: str = "prune"

    def __call__(self, model, report):
        from .passes import prune
        from .select import layer_paths

        graph = prune.ChannelGraph(model)
        selection = self.select.selection(list(self.options.patterns))
        producers = [(layer.name, layer_paths(layer.node)) for layer in graph.layers.values() if layer.out_atoms]
        matched = _check_patterns(selection, producers, "Conv/Gemm/MatMul")
        grams = None
        if self.recover.calibration is not None:
            from .train.calibrate import input_grams, load_calibration

            consumers = [layer for layer in graph.layers.values() if layer.in_atoms]
            grams = input_grams(model, load_calibration(self.recover.calibration, model), consumers)
        spec = self.options.budget_spec
        new, step_report = prune.prune(model, self.options.fraction, self.options.overrides, selection, grams,
                                       budget=(spec.kind, spec.fraction) if spec else None)
        step_report.patterns = matched
        report.merge(step_report)
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


@dataclass(kw_only=True)
class Finetune:
    """Distillation from the model before the rewrite (`teacher`) into the transformed one (train/distill.py)."""

    options: opt.FinetuneOptions
    teacher: onnx.ModelProto
    labels: str | None = None
    progress: Progress | None = None
    name: str = "finetune"

    def __call__(self, model, report):
        from .train.distill import finetune

        model, report.finetune = finetune(self.teacher, model, self.options, labels=self.labels,
                                          progress=self.progress)
        if not report.finetune["kept"]:
            report.warnings.append(f"fine-tuning raised the loss ({report.finetune['loss_before']:.4g} -> "
                                   f"{report.finetune['loss_after']:.4g}): the weights were left as they were; try "
                                   "a smaller --lr, more --epochs or more data")
        report.steps.append(self.name)
        return model, report


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
    """Measure the new model against the source: always its size; with --check/--data the max abs/rel output
    difference (onnxruntime, optimizations off) and, with --data, the score; with --min-speedup the latency."""

    source: onnx.ModelProto
    check: opt.CheckOptions
    name: str = "check"

    def __call__(self, model, report):
        from . import runtime
        from .inspection import model_flops, model_weights

        (w0, b0), (w1, b1) = model_weights(self.source), model_weights(model)
        (f0, u0), (f1, u1) = model_flops(self.source), model_flops(model)
        report.size = {"before": self.source.ByteSize(), "after": model.ByteSize(), "weights_before": w0,
                       "weights_after": w1, "weight_bytes_before": b0, "weight_bytes_after": b1,
                       "flops_before": f0, "flops_after": f1, "flops_unknown_layers": max(u0, u1)}
        c = self.check
        if not (c.wanted or c.min_speedup is not None):
            return model, report
        if c.data is not None:
            feeds = runtime.feeds_from(c.data, self.source)
        else:
            feeds = runtime.random_feeds(self.source, c.check or 8)
        if c.wanted:  # each model runs once: the differences and the score read the same outputs
            before, after = runtime.run(self.source, feeds, optimize=False), runtime.run(model, feeds, optimize=False)
            report.check = runtime.difference_report(before, after, feeds)
        if c.data is not None:
            from .runtime.measure import Scorer, require_scores

            scorer = Scorer(self.source, c.data, c.labels, feeds=feeds, outputs=before)
            if c.max_drop is not None:
                require_scores(scorer)
            report.check["score"] = scorer.drop_of(after)
        if c.min_speedup is not None:
            from .runtime.measure import alternating_latency

            report.latency = alternating_latency(self.source, model, {k: v[:8] for k, v in feeds.items()})
        report.steps.append(self.name)
        return model, report


@dataclass
class Gate:
    """Refuse the result (GateFailed, nothing written) when a measure misses its threshold (--max-error,
    --max-drop, --min-speedup, --max-size), or when nothing changed under --strict."""

    check: opt.CheckOptions
    strict: bool = False
    name: str = "gate"

    def __call__(self, model, report):
        for failure in gate_failures(report, self.check):
            raise GateFailed(f"{failure}; nothing was written", report)
        if not report.changed:
            report.warnings.append("no layer was changed")
            if self.strict:
                raise GateFailed("no layer was changed (--strict); nothing was written", report)
        return model, report


def gate_failures(report: Report, c: opt.CheckOptions) -> list[str]:
    """One line per threshold the measured figures miss: the figure and the threshold."""
    failures = []
    check = report.check or {}
    if check and c.max_error is not None and check["max_rel"] > c.max_error:
        failures.append(f"max relative output difference {check['max_rel']:.3g} exceeds --max-error {c.max_error}")
    score = check.get("score")
    if score and c.max_drop is not None and score["drop"] > c.max_drop:
        failures.append(f"{score['metric']} drops by {score['drop']:.4f} ({score['reference']:.4f} -> "
                        f"{score['candidate']:.4f}), more than --max-drop {c.max_drop}")
    latency = report.latency
    if latency and c.min_speedup is not None and latency["speedup"] < c.min_speedup:
        failures.append(f"speed-up {latency['speedup']:.2f}x ({latency['a_ms']:.3f} -> {latency['b_ms']:.3f} ms) "
                        f"is below --min-speedup {c.min_speedup}")
    if report.size and c.size_limit is not None:
        kind, value = c.size_limit
        limit = value * report.size["before"] if kind == "ratio" else value
        if report.size["after"] > limit:
            failures.append(f"model size {report.size['after']:,} bytes exceeds --max-size {c.max_size} "
                            f"({int(limit):,} bytes)")
    return failures


@dataclass
class Save:
    """Check and write the model atomically; never over one of `protected` (the input's files)."""

    save: opt.SaveOptions
    protected: tuple[Path, ...] = ()
    name: str = "save"

    @classmethod
    def checked(cls, save: opt.SaveOptions, protected) -> "Save":
        """The step, once the output path has passed the save rules (before the pipeline does any work)."""
        from .model import check_output

        check_output(save.output, force=save.force, protected=list(protected))
        return cls(save, tuple(protected))

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


def rewrite_steps(command: str, groups: dict, progress, reference=None) -> list[Step]:
    recover = groups.get(opt.RecoverOptions)
    select = groups.get(opt.SelectOptions)
    if command == "factor":
        options = groups[opt.FactorOptions]
        rules = factor_rules(options, recover, select)
        steps: list[Step] = [Pass("factor", rules, select, progress, options.patterns)]
        if options.budget_spec is not None:
            steps = [Budgeted(options=options, recover=recover, select=select or opt.SelectOptions(),
                              check=groups[opt.CheckOptions], progress=progress, reference=reference)]
    elif command == "binarize":
        from .passes import binarize

        options = groups[opt.BinarizeOptions]
        steps = [Pass("binarize", lambda m: binarize.rules(options), select, progress, options.patterns)]
        if recover.calibration is not None:
            steps.append(Refit(recover.calibration))
    elif command == "prune":
        steps = [Prune(options=groups[opt.PruneOptions], recover=recover, select=select)]
    elif command == "quantize":
        return [Quantize(options=groups[opt.QuantizeOptions], select=select, check=groups[opt.CheckOptions],
                         progress=progress, reference=reference)]
    else:
        return _lower_steps(groups[opt.LowerOptions], progress)
    tune = groups.get(opt.FinetuneOptions)
    if tune is not None and tune.finetune is not None:
        steps.append(Finetune(options=tune, teacher=reference, labels=groups[opt.CheckOptions].labels,
                              progress=progress))
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
    steps = rewrite_steps(command, groups, progress, reference=source)
    check, save = groups[opt.CheckOptions], groups[opt.SaveOptions]
    steps += [Check(source, check), Gate(check, strict=save.strict)]
    if save.output is not None:
        steps.append(Save.checked(save, protected))
    return steps


def run(model: onnx.ModelProto, steps: list[Step], report: Report) -> tuple[onnx.ModelProto, Report]:
    for step in steps:
        model, report = step(model, report)
    return model, report


def run_recipe(source: onnx.ModelProto, recipe, save: opt.SaveOptions, *, protected=(),
               progress=None) -> tuple[onnx.ModelProto, Report]:
    """A recipe's commands in order on `source` (each one's rewrite steps, scored against `source` where a step
    searches or gates), a summary row per command, then the recipe's gates on the final model, then save."""
    gate = opt.CheckOptions(**recipe.gate)
    save_step = Save.checked(save, protected) if save.output is not None else None
    measure = _StepMeasure(source, gate)
    report = Report(command="apply")
    report.recipe = {"path": str(recipe.path), "steps": []}
    model = source
    for command, options in recipe.steps:
        groups = opt.parse(command, {**options, **recipe.gate})
        model, step_report = run(model, rewrite_steps(command, groups, progress, reference=source),
                                 Report(command=command))
        report.merge(step_report)
        report.recipe["steps"].append({"run": command, "layers_changed": len(step_report.changed),
                                       "size": model.ByteSize(), **measure(model)})
    steps = [Check(source, gate), Gate(gate)] + ([save_step] if save_step else [])
    return run(model, steps, report)


@dataclass
class _StepMeasure:
    """Score and latency of a recipe's intermediate model against its input, when the gate gives data."""

    source: onnx.ModelProto
    gate: opt.CheckOptions
    scorer: Any = None

    def __call__(self, model) -> dict:
        if self.gate.data is None:
            return {"score": None, "latency": None}
        from .runtime.measure import Scorer, alternating_latency

        if self.scorer is None:  # the input model's predictions, once
            self.scorer = Scorer(self.source, self.gate.data, self.gate.labels)
        feeds = {k: v[:8] for k, v in self.scorer.feeds.items()}
        return {"score": self.scorer.drop(model), "latency": alternating_latency(self.source, model, feeds)}
