"""quantize: int8 through onnxruntime.quantization, not re-implemented.

onnxruntime's quantizer does the rewriting: static QDQ (uint8 activations, int8 weights: the pair its x86 kernels
are fastest with) when calibration inputs are given, dynamic (weights int8, activations quantized at run time;
MatMul and Conv only) without. What this module adds:
- the choice of nodes: the selection (--only/--skip), and never a com.onnxopt op (BitConv is already 1-bit);
- the calibration data reader over an .npz;
- with --max-drop: the layers are measured one at a time (that layer alone int8), and the most costly are kept
  float, one by one, until the whole model passes the gate; the report says which and what each cost.
The rules below are the registry `inspect` reads: which layers int8 can take.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ...graph.constants import Constants
from ...graph.io import check_model
from ...graph.nodes import (
    add_initializers,
    copy_model,
    list_initializers_as_inputs,
    op_key,
    remove_unused,
    graphs_with_prefix,
    sort_topologically,
    subgraphs,
    unique_node_names,
)
from ...graph.schemas import DOMAIN
from ...report import LayerReport, Report
from ..rules import Rule, TableRule, constant_weight, rewrite_bodies_as_models, verdicts_with_bodies

OP_TYPES = ("Conv", "Gemm", "MatMul")  # the layers with weights; onnxruntime quantizes the ops between them too
DYNAMIC_OP_TYPES = ("Conv", "MatMul")  # what dynamic quantization has integer kernels for
# Gather of an embedding table: an int8 table, each gathered row dequantized (static and dynamic alike)
TABLE_OP = "Gather"

BATCH = 32


class WeightedRule(Rule):
    def __init__(self, dynamic: bool = False):
        self.dynamic = dynamic

    def check(self, node, ctx):
        if self.dynamic and node.op_type not in DYNAMIC_OP_TYPES:
            return f"dynamic quantization has no integer {node.op_type}: give --calibration for static int8"
        return constant_weight(node, ctx, float32=True, finite=False)[1]


def rules(dynamic: bool = False) -> dict:
    rule = WeightedRule(dynamic)
    return {**{("", op): rule for op in OP_TYPES}, ("", TABLE_OP): TableRule()}


def weight_input(node: onnx.NodeProto) -> int:
    """Which input of a layer int8 quantizes: a Gather's table, else the weight."""
    return 0 if node.op_type == TABLE_OP else 1


class _Batches:
    """onnxruntime's CalibrationDataReader protocol (get_next → a feed dict, None at the end) over arrays."""

    def __init__(self, feeds: dict[str, np.ndarray]):
        n = len(next(iter(feeds.values())))
        self._batches = iter([{k: v[i:i + BATCH] for k, v in feeds.items()} for i in range(0, n, BATCH)])

    def get_next(self):
        return next(self._batches, None)


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes all have unique names (onnxruntime's quantizer selects by name), and whose com.onnxopt
    outputs are declared float tensors: onnx's type inference does not know those ops, and the quantizer
    calibrates only tensors whose type it knows (without this, the layers after a BitConv get no scale)."""
    named = copy_model(model)
    _name_all(named.graph)
    _fold_weights(named)
    declared = {v.name for v in named.graph.value_info}
    named.graph.value_info.extend(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)
                                  for n in named.graph.node if n.domain == DOMAIN for out in n.output
                                  if out not in declared)
    return named


def _name_all(graph: onnx.GraphProto) -> None:
    for node, name in zip(graph.node, unique_node_names(graph)):
        node.name = name
        for body in subgraphs(node):
            _name_all(body)


def _fold_weights(model: onnx.ModelProto) -> None:
    """The quantizer reads a weight only as an initializer ("Expected W to be an initializer" otherwise): a weight
    computed by a constant chain (Reshape/Cast/... of constants) is folded into one, and the chain dropped."""
    graph = model.graph
    constants = Constants(graph)
    initializers = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type not in (*OP_TYPES, TABLE_OP) or len(node.input) < 2:
            continue
        index = weight_input(node)
        if node.input[index] in initializers:
            continue
        value = constants.get(node.input[index])
        if value is not None and (node.op_type != TABLE_OP or value.ndim >= 2):
            folded = numpy_helper.from_array(value, f"{node.input[index]}/folded")
            add_initializers(model, [folded])
            node.input[index] = folded.name
            initializers.add(folded.name)
    remove_unused(graph)


MIN_OPSET = 11  # the quantizer writes DynamicQuantizeLinear (opset 11) and raises an older model's opset


def opset_problem(model: onnx.ModelProto) -> str | None:
    """Why int8 cannot keep this model's opset, or None: outputs keep the input's opsets."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), MIN_OPSET)
    if version < MIN_OPSET:
        return (f"quantize needs opset >= {MIN_OPSET} (onnxruntime's quantizer writes opset-{MIN_OPSET} ops) and "
                f"onnxopt keeps the input's opset {version}; convert the model first (onnx.version_converter)")
    return None


def run_quantizer(model: onnx.ModelProto, include: list[str], *, calibration=None, per_channel: bool = False,
                  session_options=None) -> onnx.ModelProto:
    """onnxruntime's quantizer on `model` (nodes uniquely named), quantizing exactly the layers in `include`
    (their inputs and weights); every other node, com.onnxopt ops included, stays float. `session_options`:
    a SessionOptions factory with the com.onnxopt ops registered, for calibrating a model that has them."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    main = {node.name for node in model.graph.node}  # the rest are `<control node>/<body>/<layer>`
    in_bodies = [name for name in include if name not in main]
    include = [name for name in include if name in main]
    if not include:  # the quantizer reads an empty list as "every node"
        return _quantize_bodies(copy_model(model), in_bodies, per_channel)
    model = copy_model(model)  # the quantizer moves a ModelProto's tensors to external data in place
    custom = any(op_key(n)[0] == DOMAIN for n in model.graph.node)
    with (_quiet_quantizer(), _calibration_sees_custom_ops(session_options if custom else None),
          tempfile.TemporaryDirectory(prefix="onnxopt-int8-") as tmp):
        out = Path(tmp) / "int8.onnx"
        if calibration is not None:
            quantize_static(model, out, _Batches(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_quantize=include)
        else:
            _quantize_dynamic(model, out, include, per_channel)
        quantized = onnx.load(str(out))
    sort_topologically(quantized.graph)
    list_initializers_as_inputs(quantized)  # the quantizer's new scales too, before IR 4
    return _quantize_bodies(quantized, in_bodies, per_channel)


def _quantize_bodies(model: onnx.ModelProto, include: list[str], per_channel: bool) -> onnx.ModelProto:
    """Dynamic int8 of the chosen layers inside If/Loop/Scan bodies. onnxruntime's own subgraph mode
    (EnableSubgraph) fails on weights defined outside the body ("Expected W to be an initializer"), so each
    body is quantized as a model of its own."""
    def quantize_body(scope, names):
        with _quiet_quantizer(), tempfile.TemporaryDirectory(prefix="onnxopt-int8-") as tmp:
            out = Path(tmp) / "body.onnx"
            _quantize_dynamic(scope, out, names, per_channel)
            quantized = onnx.load(str(out))
        sort_topologically(quantized.graph)
        return quantized

    rewrite_bodies_as_models(model, include, quantize_body)
    check_model(model, what="quantized model")
    return model


def _quantize_dynamic(model: onnx.ModelProto, out: Path, names: list[str], per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(model, out, per_channel=per_channel, weight_type=QuantType.QInt8,
                     op_types_to_quantize=[*DYNAMIC_OP_TYPES, TABLE_OP], nodes_to_quantize=names)


@contextlib.contextmanager
def _calibration_sees_custom_ops(session_options):
    """The quantizer's calibration runs the model in its own InferenceSession, built from
    `onnxruntime.SessionOptions()` inside its calibrate module; onnxruntime has no process-wide custom-op
    registration, so for a model with com.onnxopt ops that module is shown, for the duration of the call, an
    onnxruntime whose SessionOptions have them registered (everything else is the real module)."""
    if session_options is None:
        yield
        return
    import onnxruntime
    from onnxruntime.quantization import calibrate

    class WithCustomOps:
        SessionOptions = staticmethod(session_options)

        def __getattr__(self, name):
            return getattr(onnxruntime, name)

    calibrate.onnxruntime = WithCustomOps()
    try:
        yield
    finally:
        calibrate.onnxruntime = onnxruntime


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime's quantizer logs advice (pre-processing, opset) on the root logger: not the user's business
    when onnxopt drives it; the report says what was quantized."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def keep_float_until(quantize, include: list[str], drop_of, max_drop: float, progress=None):
    """The whole selection int8; while the model loses more than `max_drop`, keep float the layer whose int8
    alone loses most (each layer measured once, alone). Returns (model, {layer kept float: its drop alone})."""
    model = quantize(include)
    if drop_of(model) <= max_drop or drop_of(quantize([])) > max_drop:  # passes, or no float layer could help
        return model, {}
    layers = progress(include, "int8: cost of each layer alone") if progress else include
    alone = {name: drop_of(quantize([name])) for name in layers}
    kept: dict[str, float] = {}
    for name in sorted(include, key=lambda n: -alone[n]):
        kept[name] = alone[name]
        model = quantize([n for n in include if n not in kept])
        if drop_of(model) <= max_drop:
            break
    return model, kept


def mark_results(report: Report, quantized: set[str], kept: dict[str, float]) -> None:
    """Rows of layers that were chosen but are float in the result say why."""
    for row in report.layers:
        if row.action != "quantized" or row.name in quantized:
            continue
        row.action, row.bytes_before, row.bytes_after = "skipped", 0, 0
        row.reason = (f"kept float for --max-drop: int8 alone loses {kept[row.name]:.4f}" if row.name in kept
                      else "onnxruntime's quantizer left it float")


def quantized_layers(model: onnx.ModelProto) -> set[str]:
    """Names of the layers whose weight is int8 in `model` (QDQ: read through DequantizeLinear; dynamic:
    MatMulInteger / ConvInteger, which keep no name of their own, are matched by their inputs' names); a body's
    as `<control node>/<body>/<layer>`."""
    return {prefix + name for graph, prefix in graphs_with_prefix(model.graph) for name in _quantized_in(graph)}


def _quantized_in(graph: onnx.GraphProto) -> set[str]:
    producers = {o: n for n in graph.node for o in n.output}
    int8 = {t.name for t in graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    names = set()
    for node in graph.node:
        if node.op_type in (*OP_TYPES, TABLE_OP) and len(node.input) > 1:
            weight = node.input[weight_input(node)]
            source = producers.get(weight)
            if (source is not None and source.op_type == "DequantizeLinear") or weight in int8:
                names.add(node.name)
        elif node.op_type in ("MatMulInteger", "ConvInteger"):
            names.add(node.name.rsplit("_quant", 1)[0])
    return names


def candidates(model: onnx.ModelProto, selection, dynamic: bool) -> tuple[list[str], Report]:
    """The layers int8 may take (selected and accepted by the rules), and a report with a row per layer; a layer
    inside an If/Loop/Scan body is named `<control node>/<body>/<layer>`."""
    report = Report(command="quantize")
    chosen = []
    for ctx, node, name, reason, in_body in verdicts_with_bodies(model, rules(dynamic), selection):
        w = ctx.constant(node.input[weight_input(node)]) if len(node.input) > 1 else None
        if not reason and in_body and not dynamic:
            reason = STATIC_IN_BODY
        row = LayerReport(name=name, op_type=node.op_type, reason=reason or "",
                          shape="x".join(map(str, w.shape)) if w is not None else "",
                          params_before=int(w.size) if w is not None else 0,
                          params_after=int(w.size) if w is not None else 0)  # int8 weights are parameters too
        if not reason:
            chosen.append(name)
            row.action, row.bytes_before, row.bytes_after = "quantized", int(w.nbytes), int(w.size)
        report.layers.append(row)
    return chosen, report


# onnxruntime's QDQ quantizer works on the main graph only; its operator-format one (dynamic) does bodies
STATIC_IN_BODY = ("static int8 does not reach If/Loop/Scan bodies (onnxruntime's QDQ quantizer calibrates the "
                  "main graph): without --calibration it is quantized dynamically")
