"""The public Python API; the CLI is a thin layer over these functions.

Each `*_with_report` function returns (new model, Report); the netopt-named functions return the
model alone. The input model is never modified.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx

from . import linalg
from .errors import UsageError
from .passes import Progress, apply_rules, candidate_names
from .select import matches
from .passes.factor import RULES as FACTOR_RULES
from .passes.factor import FactorOptions
from .report import Report
from .select import Selection


def factor_with_report(model: onnx.ModelProto, *, rank: str | float | int | None = None, energy: float | None = None,
                       rank_for: Iterable[tuple[str, str | float | int]] = (), only: Iterable[str] = (),
                       skip: Iterable[str] = (), projection_function: Callable | None = None,
                       filter_function: Callable | None = None, factor_function: Callable | None = None,
                       calibration: dict[str, np.ndarray] | None = None, allow_growth: bool = False,
                       train_function: Callable | None = None, progress: Progress | None = None,
                       seed: int = 0) -> tuple[onnx.ModelProto, Report]:
    """Replace Gemm / MatMul(X, const W) by two MatMuls of rank k. See `onnxopt factor --help`.

    With `calibration` (inputs keyed by graph input name) the factors minimize the layer's output error on
    those inputs (whitened SVD) instead of the weight error.
    """
    whitening = _dense_grams(model, calibration) if calibration is not None else None
    opts = FactorOptions(
        rank=linalg.RankSpec.parse(rank) if rank is not None else None,
        energy=linalg.parse_energy(energy) if energy is not None else None,
        rank_for=[(p, linalg.RankSpec.parse(r)) for p, r in rank_for],
        projection_function=projection_function, factor_function=factor_function, whitening=whitening,
        allow_growth=allow_growth,
        seed=seed)
    if opts.rank is None and opts.energy is None and opts.projection_function is None and not opts.rank_for:
        opts.rank = linalg.RankSpec(fraction=0.5)
    names = candidate_names(model, FACTOR_RULES)
    for pattern, _ in opts.rank_for:
        if not any(matches(n, pattern) for n in names):
            raise UsageError(f"--rank-for pattern '{pattern}' matches no Gemm/MatMul layer")
    selection = Selection(only=list(only), skip=list(skip), filter_function=filter_function)
    factored, report = apply_rules(model, FACTOR_RULES, selection, command="factor", options=opts, progress=progress)
    if train_function is not None:
        from .hooks import run_training

        factored = run_training(train_function, factored)
    return factored, report


def _dense_grams(model: onnx.ModelProto, calibration: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from .calibrate import dense_grams
    from .model import unique_node_names

    layers = {}
    for node, name in zip(model.graph.node, unique_node_names(model.graph)):
        if node.op_type in ("Gemm", "MatMul") and node.domain in ("", "ai.onnx"):
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            layers[name] = (node.input[0], trans_a)
    return dense_grams(model, calibration, layers)


def factor_dense(model: onnx.ModelProto, projection_function: Callable | None = None,
                 filter_function: Callable | None = None, factor_function: Callable | None = None,
                 **options) -> onnx.ModelProto:
    """netopt's factor_dense: the factored model (default rank: half of min(m, n))."""
    return factor_with_report(model, projection_function=projection_function, filter_function=filter_function,
                              factor_function=factor_function, **options)[0]


def inspect(model: onnx.ModelProto) -> list[dict]:
    """Every Gemm / MatMul / Conv with its weight shape, params, FLOPs per sample, and each pass's verdict."""
    from .passes import GraphContext
    from .passes.binarize import RULES as BINARIZE_RULES

    ctx = GraphContext.build(model)
    passes = {"factor": FACTOR_RULES, "binarize": BINARIZE_RULES}
    rows = []
    for node in model.graph.node:
        key = ("" if node.domain == "ai.onnx" else node.domain, node.op_type)
        if key not in {("", "Gemm"), ("", "MatMul"), ("", "Conv")}:
            continue
        w = ctx.constant(node.input[1]) if len(node.input) > 1 else None
        row = {"name": ctx.name_of(node), "op_type": node.op_type,
               "weight_shape": "x".join(map(str, w.shape)) if w is not None else "not constant",
               "params": int(w.size) if w is not None else 0, "flops": _flops(node, w, ctx)}
        for pass_name, rules in passes.items():
            rule = rules.get(key)
            reason = rule.check(node, ctx) if rule else "not handled by this pass"
            row[pass_name] = "yes" if reason is None else f"no: {reason}"
        rows.append(row)
    return rows


def _flops(node, w, ctx) -> int:
    """Multiply-adds x2 per sample (symbolic dims count as 1)."""
    if w is None:
        return 0
    if node.op_type == "Conv":
        out = ctx.shape(node.output[0])
        spatial = [d if isinstance(d, int) else 1 for d in (out or [])[2:]]
        return int(2 * w.size * (np.prod(spatial) if spatial else 1))
    shape = ctx.shape(node.input[0]) or []
    rows = np.prod([d if isinstance(d, int) else 1 for d in shape[1:-1]]) if node.op_type == "MatMul" else 1
    return int(2 * w.size * rows)


def binarize_with_report(model: onnx.ModelProto, *, only: Iterable[str] = (), skip: Iterable[str] = (),
                         filter_function: Callable | None = None, scale: str = "channel", stage: str = "all",
                         calibration: dict[str, np.ndarray] | None = None, train_function: Callable | None = None,
                         emulate: bool = False, fold_batch_norm: bool = True,
                         progress: Progress | None = None) -> tuple[onnx.ModelProto, Report]:
    """Conv → BinaryConv (stage 'transform'), [refit α/bias on calibration data], [train], → BitConv ('all')."""
    from .model import with_custom_domain
    from .passes.binarize import RULES as BINARIZE_RULES
    from .passes.binarize import BinarizeOptions

    if stage not in ("transform", "all"):
        raise UsageError(f"invalid stage '{stage}': choose transform or all")
    selection = Selection(only=list(only), skip=list(skip), filter_function=filter_function)
    transformed, report = apply_rules(model, BINARIZE_RULES, selection, command="binarize",
                                      options=BinarizeOptions(scale=scale), progress=progress)
    if report.changed:
        with_custom_domain(transformed)
    if calibration is not None and report.changed:
        from .calibrate import refit_binary

        transformed = refit_binary(transformed, calibration)
    if train_function is not None:
        from .hooks import run_training

        transformed = run_training(train_function, transformed)
    if emulate:  # standard ops only, for external trainers; `lower` reads this form back
        from .passes.emulate import RULES as EMULATE_RULES

        return apply_rules(transformed, EMULATE_RULES, Selection(), command="emulate")[0], report
    if stage == "transform":
        return transformed, report
    lowered, lower_report = lower_with_report(transformed, fold_batch_norm=fold_batch_norm)
    by_name = {layer.name: layer for layer in lower_report.changed}
    for layer in report.changed:
        if layer.name in by_name:
            layer.bytes_after = by_name[layer.name].bytes_after
    report.layers += [layer for layer in lower_report.changed if layer.action == "folded"]
    return lowered, report


def lower_with_report(model: onnx.ModelProto, *, fold_batch_norm: bool = True,
                      progress: Progress | None = None) -> tuple[onnx.ModelProto, Report]:
    """BinaryConv → BitConv: pack weights to bits for the native kernel; then fold a BatchNormalization
    that follows a BitConv into its α and bias (equal up to float32 rounding; off: bit-identical)."""
    from .passes.fold import RULES as FOLD_RULES
    from .passes.lower import RULES as LOWER_RULES

    lowered, report = apply_rules(model, LOWER_RULES, Selection(), command="lower", progress=progress)
    if fold_batch_norm and report.changed:
        lowered, folds = apply_rules(lowered, FOLD_RULES, Selection(), command="fold")
        report.layers += folds.layers
        report.warnings += folds.warnings
    return lowered, report


def convert_to_binary_convolution(model: onnx.ModelProto, filter_function: Callable | None = None,
                                  **options) -> onnx.ModelProto:
    """netopt's name: Conv → trainable BinaryConv."""
    return binarize_with_report(model, filter_function=filter_function, stage="transform", **options)[0]


def convert_to_native_binary_convolution(model: onnx.ModelProto) -> onnx.ModelProto:
    """netopt's name: BinaryConv → native bit-packed BitConv."""
    return lower_with_report(model)[0]


def binarize_convolution(model: onnx.ModelProto, train_function: Callable | None = None,
                         filter_function: Callable | None = None, **options) -> onnx.ModelProto:
    """netopt's name: transform, train with `train_function(model) -> model` if given, lower."""
    return binarize_with_report(model, train_function=train_function, filter_function=filter_function,
                                **options)[0]
