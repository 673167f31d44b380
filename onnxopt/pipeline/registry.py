"""The command registry: one table of the rewriting commands, read by the API (a function per command), the CLI
(a command per entry, its options generated from the entry's dataclasses), recipes (step names and keys) and
sweeps (grid axes).

A command is its option groups and a builder of its rewrite steps from the parsed groups. Adding one is a pass
folder (rules and an options dataclass) and one `Command(...)` line below. Imports stay light here (no onnx, no
numpy) so that `onnxopt --help` does not pay for them: the builders import the steps when they run.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

from ..errors import UsageError
from ..passes.binarize.options import BinarizeOptions, LowerOptions
from ..passes.factor.options import FactorOptions
from ..passes.prune.options import PruneOptions
from ..passes.quantize.options import QuantizeOptions
from . import options as opt

# what every command that can recover accuracy, and every command, takes after its own options
RECOVERY = (opt.RecoverOptions, opt.FinetuneOptions)
COMMON = (opt.SelectOptions, opt.CheckOptions, opt.ShapeOptions, opt.SaveOptions)


@dataclass(frozen=True)
class Command:
    name: str
    groups: tuple[type, ...]  # its option dataclasses, in the order the CLI lists them
    rewrite: Callable[[dict, Any, Any], list]  # (parsed groups, progress, reference model) -> rewrite steps
    suffix: str  # the default output: <stem>.<suffix>.onnx beside the input
    help: str


def rules_command(name: str, options: type, rules: Callable[[Any], dict], suffix: str, help: str) -> Command:
    """A command whose rewrite is one pass of `rules(options)` over the graph, then the recovery steps the user
    asked for: what a new rule-based technique registers."""
    def rewrite(groups, progress, reference):
        from .steps import Pass

        own = groups[options]
        step = Pass(name, lambda m: rules(own), groups[opt.SelectOptions], progress,
                    getattr(own, "patterns", ()), shapes=groups[opt.ShapeOptions].shapes)
        return [step] + recovery_steps(groups, progress, reference)

    return Command(name, (options, *RECOVERY, *COMMON), rewrite, suffix, help)


def recovery_steps(groups: dict, progress, reference) -> list:
    """Fine-tuning by distillation from `reference` and a training hook or command, where asked for."""
    from .steps import Finetune, Train

    steps: list = []
    tune, recover = groups.get(opt.FinetuneOptions), groups.get(opt.RecoverOptions)
    if tune is not None and tune.finetune is not None:
        steps.append(Finetune(options=tune, teacher=reference, labels=groups[opt.CheckOptions].labels,
                              progress=progress))
    if recover is not None and recover.trains:
        steps.append(Train(recover))
    return steps


def _factor(groups, progress, reference):
    from .steps import Budgeted, Pass, factor_rules

    options, recover, select = groups[FactorOptions], groups[opt.RecoverOptions], groups[opt.SelectOptions]
    shapes = groups[opt.ShapeOptions].shapes
    if options.budget_spec is not None:
        steps = [Budgeted(options=options, recover=recover, select=select, check=groups[opt.CheckOptions],
                          progress=progress, reference=reference, shapes=shapes)]
    else:
        steps = [Pass("factor", factor_rules(options, recover, select, shapes), select, progress, options.patterns,
                      shapes=shapes)]
    return steps + recovery_steps(groups, progress, reference)


def _binarize(groups, progress, reference):
    from ..passes.binarize import conv
    from .steps import Pass, Refit

    options, recover = groups[BinarizeOptions], groups[opt.RecoverOptions]
    recovery = recovery_steps(groups, progress, reference)
    # BinaryConv inside an If branch does not load in onnxruntime; --emulate turns it into standard ops at the end,
    # so it may go there when nothing runs the model in between (a refit or fine-tuning would)
    emulated_at_once = options.emulate and recover.calibration is None and not recovery
    steps = [Pass("binarize", lambda m: conv.rules(options), groups[opt.SelectOptions], progress, options.patterns,
                  shapes=groups[opt.ShapeOptions].shapes, custom_ops_in_bodies=emulated_at_once)]
    if recover.calibration is not None:
        steps.append(Refit(recover.calibration))
    steps += recovery
    if options.emulate:  # standard ops only, for external trainers; `lower` reads this form back
        from ..passes.binarize import emulate

        return steps + [Pass("emulate", lambda m: emulate.rules())]
    return steps + (_lower(groups, progress, reference) if options.stage == "all" else [])


def _prune(groups, progress, reference):
    from .steps import Prune

    return [Prune(options=groups[PruneOptions], recover=groups[opt.RecoverOptions], select=groups[opt.SelectOptions],
                  shapes=groups[opt.ShapeOptions].shapes)] + recovery_steps(groups, progress, reference)


def _lower(groups, progress, reference):
    from ..passes.binarize import fold
    from ..passes.binarize import lower as lowering
    from .steps import Pass, ValidateCustomOps

    steps = [ValidateCustomOps(), Pass("lower", lambda m: lowering.rules(), progress=progress)]
    if not groups[LowerOptions].keep_batchnorm:
        steps.append(Pass("fold", lambda m: fold.rules()))
    return steps


def _quantize(groups, progress, reference):
    from .steps import Quantize

    return [Quantize(options=groups[QuantizeOptions], select=groups[opt.SelectOptions],
                     check=groups[opt.CheckOptions], progress=progress, reference=reference)]


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("factor", (FactorOptions, *RECOVERY, *COMMON), _factor, "factored",
            "Replace Gemm and MatMul(X, constant W) by two low-rank MatMuls, W (m x n) ~ U (m x k) . V (k x n), and "
            "Conv by two or three smaller convs. The report's rel.err is ||W - UV||F / ||W||F (with --calibration: "
            "||X(W - UV)||F / ||XW||F on the calibration inputs); above 0.8 it warns."),
    Command("binarize", (BinarizeOptions, LowerOptions, *RECOVERY, *COMMON), _binarize, "binarized",
            "Replace Conv by a binarized convolution: Conv(b(X), alpha * b(W)) + B, b(v) = +1 if v > 0 else -1."),
    Command("prune", (PruneOptions, *RECOVERY, *COMMON), _prune, "pruned",
            "Remove output channels of Conv/Gemm/MatMul layers (and the matching inputs of every layer they reach, "
            "through BatchNormalization, activations, pooling, Concat, Split, depthwise convs, residual Adds); by "
            "filter magnitude, or with --calibration by output reconstruction with a least-squares refit."),
    Command("lower", (LowerOptions, opt.CheckOptions, opt.ShapeOptions, opt.SaveOptions), _lower, "lowered",
            "Replace trainable BinaryConv ops by the native bit-packed BitConv (weights stored as bits)."),
    Command("quantize", (QuantizeOptions, *COMMON), _quantize, "quantized",
            "int8 through onnxruntime.quantization: static QDQ with --calibration, dynamic without; com.onnxopt "
            "ops stay as they are."),
)}


def command(name: str) -> Command:
    if name not in COMMANDS:
        raise UsageError(f"unknown command '{name}': choose one of {', '.join(COMMANDS)}")
    return COMMANDS[name]


def parse(name: str, values: dict[str, Any]) -> dict[type, Any]:
    """The option dataclasses of command `name`, built (and validated) from keyword values; unknown keys are
    refused. Validation runs group by group in the command's order, so the first error is the same for the API
    and the CLI."""
    groups = command(name).groups
    known = {f.name: cls for cls in groups for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(f"unknown option(s) for {name}: {', '.join(unknown)}")
    parsed = {cls: cls(**{k: v for k, v in values.items() if known[k] is cls}) for cls in groups}
    opt.check_together(parsed)
    return parsed
