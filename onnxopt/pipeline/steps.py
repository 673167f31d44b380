"""The steps a command is made of, each `(model, report) -> (model, report)`: a rewrite pass, a budget search,
int8, pruning, recovery (refit, fine-tune, train), check, gate, save. Steps never print.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from ..errors import GateFailed, OnnxoptError, UsageError
from ..passes.factor.options import FactorOptions
from ..passes.prune.options import PruneOptions
from ..passes.quantize.options import QuantizeOptions
from ..passes.rules import Progress, Rules, apply_rules, candidate_layers
from ..report import Report
from . import options as opt

Step = Callable[[onnx.ModelProto, Report], tuple[onnx.ModelProto, Report]]


@dataclass
class Pass:
    """One rewrite pass over the main graph (factor, binarize, lower, fold, emulate)."""

    name: str
    rules: Callable[[onnx.ModelProto], Rules]  # built per model: data-aware rules read it first
    select: opt.SelectOptions | None = None
    progress: Progress | None = None
    patterns: tuple[tuple[str, str], ...] = ()  # (flag, pattern) of per-layer options, checked like --only
    shapes: dict | None = None  # --input-shape sizes for symbolic inputs
    custom_ops_in_bodies: bool = False  # a later step makes them standard ops (binarize --emulate)

    def __call__(self, model, report):
        rules = self.rules(model)
        selection = (self.select or opt.SelectOptions()).selection(list(self.patterns))
        matched = _check_patterns(selection, candidate_layers(model, rules), "/".join(op for _, op in rules))
        new, step_report = apply_rules(model, rules, selection, command=self.name, progress=self.progress,
                                       shapes=self.shapes, custom_ops_in_bodies=self.custom_ops_in_bodies)
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


def _whitening(model, options: FactorOptions, recover: opt.RecoverOptions,
               select: opt.SelectOptions | None, shapes: dict | None) -> dict | None:
    """Gram matrices of the inputs of the layers factor will take (selected, accepted by their rule), on the
    calibration data, if any was given: a conv's Gram is of its im2col'd patches, too costly to make for
    layers that are skipped or cannot be factored (and one without a constant weight has no kernel size)."""
    if recover.calibration is None:
        return None
    from ..graph.context import GraphContext
    from ..passes.factor import dense as factor
    from ..passes.rules import layer_verdicts
    from ..recover.calibrate import dense_grams, load_calibration

    rules, ctx = factor.rules(options), GraphContext(model, shapes)
    selection = (select or opt.SelectOptions()).selection()
    wanted = {name for _, name, _, reason in layer_verdicts(ctx, rules, selection) if reason is None}
    return dense_grams(model, load_calibration(recover.calibration, model), rules, wanted)


def factor_rules(options: FactorOptions, recover: opt.RecoverOptions, select: opt.SelectOptions | None,
                 shapes: dict | None = None):
    from ..passes.factor import dense as factor

    return lambda model: factor.rules(options, _whitening(model, options, recover, select, shapes))


@dataclass(kw_only=True)
class _ScoringStep:
    """What the steps that score their candidates against --data share (a budget search, int8 exclusion)."""

    select: opt.SelectOptions
    check: opt.CheckOptions
    progress: Progress | None = None
    reference: onnx.ModelProto | None = None  # what --max-drop scores against (a recipe's input), else the step's
    shapes: dict | None = None  # --input-shape sizes for symbolic inputs

    def scorer(self, model):
        from ..measure.scores import Scorer, require_scores

        scorer = Scorer(self.reference or model, self.check.data, self.check.labels)
        require_scores(scorer)
        return scorer


@dataclass(kw_only=True)
class Budgeted(_ScoringStep):
    """factor --budget: ranks allocated under the budget (`budget.allocate`); with KIND=auto, the smallest
    budget whose model loses at most --max-drop on --data, by bisection, each candidate a full allocation.
    The SVDs (and Gram matrices) are computed once for all candidates."""

    options: FactorOptions
    recover: opt.RecoverOptions
    name: str = "factor"

    def __call__(self, model, report):
        from ..passes.factor import budget
        from ..passes.factor import dense as factor

        spec = self.options.budget_spec
        whitening = _whitening(model, self.options, self.recover, self.select, self.shapes)
        layers, spectra = budget.collect(model, factor.rules(self.options), self.select.selection(), whitening,
                                         self.shapes)
        patterns = self.options.patterns

        def factored(fraction):
            allocation = budget.allocate(layers, spec.kind, fraction)
            rules = factor.rules(self.options, whitening, ranks=allocation.ranks, spectra=spectra)
            new, step_report = Pass(self.name, lambda m: rules, self.select, None, patterns, self.shapes)(
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
    """int8 through onnxruntime.quantization (passes/quantize/int8.py); with --max-drop on --data, the layers that cost
    most alone are kept float, one at a time, until the model passes."""

    options: QuantizeOptions
    name: str = "quantize"

    def __call__(self, model, report):
        from ..passes.quantize import int8 as q
        from ..runtime import session_options

        if self.options.weight_bits == 4:
            return self._four_bit(model, report)
        problem = q.opset_problem(model)
        if problem:
            raise OnnxoptError(problem)
        named = q.name_nodes(model)
        calibration = None
        if self.options.calibration is not None:
            from ..recover.calibrate import load_calibration

            calibration = load_calibration(self.options.calibration, named)
        selection = self.select.selection()
        include, step_report = q.candidates(named, selection, dynamic=calibration is None)
        step_report.patterns = _check_patterns(selection, candidate_layers(named, q.rules(calibration is None)),
                                               "Conv/Gemm/MatMul or embedding Gather")

        def quantize(names):
            return q.run_quantizer(named, names, calibration=calibration, per_channel=self.options.per_channel,
                                   session_options=session_options)

        return self._gated(model, quantize, include, step_report, q.quantized_layers, report)

    def _gated(self, model, quantize, include, step_report, quantized_layers, report):
        """The selection quantized; with --max-drop, layers kept float until the model passes (int8 and 4-bit)."""
        from ..passes.quantize import int8 as q

        kept: dict[str, float] = {}
        if self.check.max_drop is not None:
            scorer = self.scorer(model)
            new, kept = q.keep_float_until(quantize, include, lambda m: scorer.drop(m)["drop"],
                                           self.check.max_drop, self.progress)
        else:
            new = quantize(include)
        q.mark_results(step_report, quantized_layers(new), kept)
        report.merge(step_report)
        return new, report

    def _four_bit(self, model, report):
        """Weight-only 4-bit MatMuls and Gather tables (passes/quantize/int4.py), with the same --max-drop search as
        int8."""
        from ..passes.quantize import int4
        from ..passes.quantize import int8 as q

        named, o = q.name_nodes(model), self.options
        selection = self.select.selection()
        include, step_report = int4.candidates(named, selection, o.block_size, o.algorithm)
        step_report.patterns = _check_patterns(selection, candidate_layers(named, int4.rules(o.algorithm)),
                                               "MatMul or Gather")

        def quantize(names):
            return int4.quantize_4bit(named, names, o.block_size, o.algorithm)

        return self._gated(model, quantize, include, step_report, int4.quantized_layers, report)


@dataclass(kw_only=True)
class Prune:
    """Channel pruning (passes/prune/): magnitude, or with calibration data He et al.'s reconstruction and a
    least-squares refit of each consumer."""

    options: PruneOptions
    recover: opt.RecoverOptions
    select: opt.SelectOptions
    shapes: dict | None = None  # --input-shape sizes for symbolic inputs
    name: str = "prune"

    def __call__(self, model, report):
        from ..graph.selection import layer_paths
        from ..passes.prune import rewrite as prune
        from ..passes.prune.channels import ChannelGraph

        graph = ChannelGraph(model, self.shapes)
        selection = self.select.selection(list(self.options.patterns))
        producers = [(layer.name, layer_paths(layer.node)) for layer in graph.layers.values() if layer.out_atoms]
        matched = _check_patterns(selection, producers, "Conv/Gemm/MatMul")
        grams = None
        if self.recover.calibration is not None:
            from ..recover.calibrate import input_grams, load_calibration

            consumers = [layer for layer in graph.layers.values() if layer.in_atoms]
            grams = input_grams(model, load_calibration(self.recover.calibration, model), consumers)
        spec = self.options.budget_spec
        new, step_report = prune.prune(model, self.options.fraction, self.options.overrides, selection, grams,
                                       budget=(spec.kind, spec.fraction) if spec else None, shapes=self.shapes)
        step_report.patterns = matched
        report.merge(step_report)
        return new, report


@dataclass
class Refit:
    """Refit α and bias of each BinaryConv on calibration data (binarize --calibration)."""

    calibration: Any
    name: str = "refit"

    def __call__(self, model, report):
        from ..recover.calibrate import load_calibration, refit_binary

        if not report.changed:  # no binarized layer to refit
            return model, report
        report.steps.append(self.name)
        return refit_binary(model, load_calibration(self.calibration, model)), report


@dataclass(kw_only=True)
class Finetune:
    """Distillation from the model before the rewrite (`teacher`) into the transformed one (recover/distill.py)."""

    options: opt.FinetuneOptions
    teacher: onnx.ModelProto
    labels: str | None = None
    progress: Progress | None = None
    name: str = "finetune"

    def __call__(self, model, report):
        from ..recover.distill import finetune

        model, report.finetune = finetune(self.teacher, model, self.options, labels=self.labels,
                                          progress=self.progress)
        if not report.finetune["kept"]:
            report.warnings.append(f"fine-tuning did not lower the held-out loss ({report.finetune['loss_before']:.4g}"
                                   f" -> {report.finetune['loss_after']:.4g}): the weights were left as they were; "
                                   "try a smaller --lr, more --steps or more data")
        report.steps.append(self.name)
        return model, report


@dataclass
class Train:
    """A training hook or an external trainer; only weight values may change."""

    recover: opt.RecoverOptions
    name: str = "train"

    def __call__(self, model, report):
        from ..recover.hooks import command_trainer, run_training

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
    shapes: dict | None = None  # --input-shape sizes for symbolic inputs
    values: dict | None = None  # --input-value: an input's value in the random check inputs
    given_bytes: int | None = None  # the input's size as given (its files); else the source's serialized size
    name: str = "check"

    def check_inputs(self) -> None:
        """Fail now, not after the rewrite (minutes of SVDs on a large model), if the random check inputs cannot
        be made (a symbolic dim without --input-shape)."""
        from ..measure.feeds import random_feeds

        c = self.check
        if (c.wanted or c.min_speedup is not None) and c.data is None:
            random_feeds(self.source, 1, shapes=self.shapes, values=self.values)

    def __call__(self, model, report):
        from ..graph.flops import model_flops, model_weights
        from ..measure.compare import difference_report
        from ..measure.feeds import feeds_from, random_feed_batches

        (w0, b0), (w1, b1) = model_weights(self.source), model_weights(model)
        (f0, u0), (f1, u1) = model_flops(self.source, self.shapes), model_flops(model, self.shapes)
        before = self.source.ByteSize() if self.given_bytes is None else self.given_bytes
        report.size = {"before": before, "after": model.ByteSize(), "weights_before": w0,
                       "weights_after": w1, "weight_bytes_before": b0, "weight_bytes_after": b1,
                       "flops_before": f0, "flops_after": f1, "flops_unknown_layers": max(u0, u1)}
        if report.size["after"] > before:
            report.warnings.append(f"the model file grows: {before:,} -> {report.size['after']:,} bytes "
                                   f"({report.size['after'] / max(before, 1):.1%})")
        c = self.check
        if not (c.wanted or c.min_speedup is not None):
            return model, report
        if c.data is not None:
            batches = [feeds_from(c.data, self.source)]
        else:
            batches = random_feed_batches(self.source, c.check or 8, shapes=self.shapes, values=self.values)
        feeds = batches[0]
        if c.wanted:  # each model runs once: the differences and the score read the same outputs
            before, after = (_outputs_of(m, batches) for m in (self.source, model))
            samples = None if c.data is not None else c.check or 8
            report.check = difference_report(before, after, feeds, samples)
        if c.data is not None:
            from ..measure.scores import Scorer, require_scores

            scorer = Scorer(self.source, c.data, c.labels, feeds=feeds, outputs=before)
            if c.max_drop is not None:
                require_scores(scorer)
            report.check["score"] = scorer.drop_of(after)
        if c.min_speedup is not None:
            from ..measure.compare import alternating_latency

            report.latency = alternating_latency(self.source, model, {k: v[:8] for k, v in feeds.items()})
        report.steps.append(self.name)
        return model, report


def _outputs_of(model, batches: list[dict]) -> dict[str, np.ndarray]:
    """The model's outputs on each feed of `batches`, stacked per output (one feed: its outputs as they are)."""
    from .. import runtime

    runs = [runtime.run(model, feeds, optimize=False) for feeds in batches]
    return runs[0] if len(runs) == 1 else {name: np.stack([r[name] for r in runs]) for name in runs[0]}


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
        from ..graph.io import check_output

        check_output(save.output, force=save.force, protected=list(protected))
        return cls(save, tuple(protected))

    def __call__(self, model, report):
        from ..graph.io import save_model

        path = save_model(model, self.save.output, force=self.save.force, external_data=self.save.external_data,
                          protected=list(self.protected))
        report.output = str(path)
        return model, report


@dataclass
class ValidateCustomOps:
    """Refuse com.onnxopt ops whose constants a kernel could not take (hand-edited files, hooks)."""

    name: str = "validate"

    def __call__(self, model, report):
        from ..graph.constants import Constants
        from ..graph.schemas import check_custom_nodes

        check_custom_nodes(model.graph, Constants(model.graph).get)
        return model, report


def run(model: onnx.ModelProto, steps: list[Step], report: Report) -> tuple[onnx.ModelProto, Report]:
    for step in steps:
        model, report = step(model, report)
    return model, report
