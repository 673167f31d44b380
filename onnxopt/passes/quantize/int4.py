"""4-bit weight-only quantization through onnxruntime's MatMulNBits quantizer (what MatMul-heavy models on CPUs
use): MatMul weights in blocks of `block_size` along the input axis, one float scale and a 4-bit zero point per
block, activations float; and embedding tables read by Gather (GatherBlockQuantized: blocks along each row,
dequantized per gathered row; a transformer's token embedding is often half its weights). The rewrite is
onnxruntime's; this module chooses the layers (the same selection as every pass), runs it on a copy and reports
per layer. The output imports `com.microsoft`, the domain
of onnxruntime's contrib ops, which every onnxruntime build (C, C++, C#, Java, mobile) runs.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

import onnx

from ...errors import OnnxoptError
from ...graph.io import check_model
from ...graph.nodes import copy_model, graphs_with_prefix, op_key, subgraphs
from ...report import LayerReport, Report
from ..rules import Rule, TableRule, constant_weight, rewrite_bodies_as_models, verdicts_with_bodies

CONTRIB = "com.microsoft"


class MatMulWeightRule(Rule):
    """MatMul whose second input is a constant 2-D float32 initializer weight."""

    def check(self, node, ctx):
        w, reason = constant_weight(node, ctx, float32=True)
        if reason:
            return reason
        if w.ndim != 2:
            return f"weight is {w.ndim}-D: MatMulNBits takes 2-D weights"
        if node.input[1] not in {t.name for t in ctx.model.graph.initializer}:
            return "weight is computed (not an initializer)"
        return None


class GatherTableRule(TableRule):
    """An embedding table as GatherBlockQuantized. Its 4-bit table is an ONNX uint4 tensor, which needs IR
    version 10; onnxruntime's HQQ gives float zero points, which GatherBlockQuantized does not take."""

    def __init__(self, algorithm: str = "rtn"):
        self.algorithm = algorithm

    def check(self, node, ctx):
        reason = super().check(node, ctx)
        if reason:
            return reason
        if next((a.i for a in node.attribute if a.name == "axis"), 0) not in (0, -2):
            return "gathers along axis 1: rows (axis 0) are quantized"
        if ctx.model.ir_version < 10:
            return f"IR version {ctx.model.ir_version}: a 4-bit table is a uint4 tensor, which needs IR 10"
        if self.algorithm != "rtn":
            return f"--algorithm {self.algorithm} gives float zero points, which GatherBlockQuantized does not take"
        return None


def rules(algorithm: str = "rtn") -> dict:
    return {("", "MatMul"): MatMulWeightRule(), ("", "Gather"): GatherTableRule(algorithm)}


def candidates(model: onnx.ModelProto, selection, block_size: int,
               algorithm: str = "rtn") -> tuple[list[str], Report]:
    """The layers 4-bit may take, and a row per layer; a body's layer as `<control node>/<body>/<layer>`."""
    report = Report(command="quantize")
    chosen = []
    for ctx, node, name, reason, _ in verdicts_with_bodies(model, rules(algorithm), selection):
        row = LayerReport(name=name, op_type=node.op_type, reason=reason or "")
        if not reason:
            if node.op_type == "Gather":  # blocks along each row of the table: the same count as a weight's
                w = ctx.constant(node.input[0])
                n, k = w.shape
            else:
                w = ctx.constant(node.input[1])
                k, n = w.shape
            blocks = -(-k // block_size) * n
            row.shape, row.action = "x".join(map(str, w.shape)), "quantized"
            row.params_before = row.params_after = int(w.size)
            row.bytes_before, row.bytes_after = int(w.nbytes), int(-(-k // 2) * n + blocks * 4 + -(-blocks // 2))
            chosen.append(name)
        report.layers.append(row)
    return chosen, report


def quantize_4bit(model: onnx.ModelProto, include: list[str], block_size: int, algorithm: str) -> onnx.ModelProto:
    """onnxruntime's MatMulNBits quantizer on a copy of `model` (nodes uniquely named), on exactly `include`;
    layers inside If/Loop/Scan bodies each body as a model of its own (its outer-scope weights as initializers)."""
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: F401
    except ImportError as exc:  # onnxruntime's module needs onnx-ir, a dependency of onnxopt
        raise OnnxoptError(f"--weight-bits 4 needs onnxruntime's MatMulNBits quantizer ({exc}); "
                           "pip install onnx-ir") from None
    if algorithm == "hqq":
        import importlib.util

        if importlib.util.find_spec("torch") is None:  # onnxruntime's HQQ runs in torch
            raise OnnxoptError("--algorithm hqq needs torch (onnxruntime's HQQ runs in it): "
                               "pip install 'onnxopt[train]', or use --algorithm rtn")
    main = {node.name for node in model.graph.node}
    out = _nbits(model, [n for n in include if n in main], block_size, algorithm)
    rewrite_bodies_as_models(out, [n for n in include if n not in main],
                             lambda scope, names: _nbits(scope, names, block_size, algorithm))
    # the quantizer imports com.microsoft at version 1; everything else keeps the input's opsets (for a Gather it
    # raises the default one to 21, which its uint4 table does not need: only GatherBlockQuantized reads it)
    given = {o.domain: o.version for o in model.opset_import}
    for opset in out.opset_import:
        opset.version = given.get(opset.domain, opset.version)
    out.ir_version = model.ir_version
    check_model(out, what="4-bit model")
    return out


def _nbits(model: onnx.ModelProto, include: list[str], block_size: int, algorithm: str) -> onnx.ModelProto:
    """The quantizer on a copy of `model`'s main graph, on the nodes named in `include` only."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    if not include:
        return copy_model(model)
    work = copy_model(model)  # the quantizer edits the ModelProto it is given in place
    if algorithm == "hqq":
        config = nbits.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
    else:
        # Gather only when one is chosen: with it in the list the quantizer raises the default opset to 21
        gathers = any(n.op_type == "Gather" and n.name in include for n in work.graph.node)
        config = nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=4,
                                                    op_types_to_quantize=("MatMul", "Gather") if gathers else None,
                                                    quant_axes=(("MatMul", 0), ("Gather", 1)))
    with _quiet():
        # its nodes_to_include adds to the op types it takes anyway; only an exclude list restricts it
        others = sorted(_all_names(work.graph) - set(include))
        quantizer = nbits.MatMulNBitsQuantizer(work, bits=4, block_size=block_size, is_symmetric=False,
                                               nodes_to_exclude=others, algo_config=config)
        quantizer.process()
    out = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    return copy_model(out)


def _all_names(graph: onnx.GraphProto) -> set[str]:
    return {n.name for n in graph.node} | {name for n in graph.node for body in subgraphs(n)
                                           for name in _all_names(body)}


def quantized_layers(model: onnx.ModelProto) -> set[str]:
    """Names of the MatMuls and Gathers onnxruntime replaced (its nodes keep the original name + '_Q4'); a body's
    as `<control node>/<body>/<layer>`."""
    return {prefix + n.name.rsplit("_Q4", 1)[0] for graph, prefix in graphs_with_prefix(model.graph)
            for n in graph.node if op_key(n) in ((CONTRIB, "MatMulNBits"), (CONTRIB, "GatherBlockQuantized"))}


@contextlib.contextmanager
def _quiet():
    """The quantizer logs a line per node at INFO on its own logger: the report says what was quantized."""
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    previous = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():  # HQQ hands torch read-only arrays it only reads
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            yield
    finally:
        logger.setLevel(previous)
