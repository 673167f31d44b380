"""Calibration: layer activations from onnxruntime, and reconstruction from them.

- Gram matrices XᵀX of the inputs of dense layers, accumulated batch by batch (memory does not grow
  with the data), for the data-aware factorization in linalg.whitened_low_rank.
- Binary-layer refit: layer by layer in graph order, α and bias of each BinaryConv are refit per output
  channel by least squares, y_float ≈ α·s + β, where s are the layer's ±1 sums on the activations of the
  already-refit binarized model and y_float the float model's output of that layer.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .convgeom import Geometry
from .errors import OnnxoptError
from .kernels import reference
from .model import CUSTOM_DOMAIN
from .passes import remove_unused
from .runtime import load_feeds, session

BATCH = 64


def batches(feeds: dict[str, np.ndarray], size: int = BATCH) -> Iterator[dict[str, np.ndarray]]:
    n = len(next(iter(feeds.values())))
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in feeds.items()}


def load_calibration(path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    feeds = load_feeds(path, model)
    sizes = {len(v) for v in feeds.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise OnnxoptError(f"{path}: calibration arrays must share one non-empty first (sample) dimension")
    return feeds


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.ValueInfoProto(name=n) for n in names if n not in present)
    return probe


def activations(model: onnx.ModelProto, feeds, names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """The values of tensors `names`, one calibration batch at a time."""
    sess = session(_with_outputs(model, names), optimize=False)
    for batch in batches(feeds):
        yield dict(zip(names, sess.run(names, batch)))


def dense_grams(model: onnx.ModelProto, feeds, layers: dict[str, tuple[str, bool]]) -> dict[str, np.ndarray]:
    """{layer name: XᵀX} for layers given as {name: (input tensor, transposed)}; X is (rows, m)."""
    tensors = sorted({t for t, _ in layers.values()})
    grams: dict[str, np.ndarray] = {}
    for acts in activations(model, feeds, tensors):
        for name, (tensor, transposed) in layers.items():
            x = acts[tensor]
            x = (x.T if transposed else x.reshape(-1, x.shape[-1])).astype(np.float64)
            grams[name] = grams.get(name, 0) + x.T @ x
    return grams


def float_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every BinaryConv turned back into the float Conv it came from."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    consts = {t.name: numpy_helper.to_array(t) for t in twin.graph.initializer}
    for node in twin.graph.node:
        if node.domain == CUSTOM_DOMAIN and node.op_type == "BinaryConv":
            g = Geometry.decode(consts[node.input[4]])
            attrs = conv_attributes(g)
            new = helper.make_node("Conv", [node.input[0], node.input[1], node.input[3]], list(node.output),
                                   name=node.name, **attrs)
            node.CopyFrom(new)
    remove_unused(twin.graph)
    return twin


def conv_attributes(g: Geometry) -> dict:
    one_d = g.spatial_rank == 1
    attrs = {"strides": [g.strides[1]] if one_d else list(g.strides),
             "dilations": [g.dilations[1]] if one_d else list(g.dilations)}
    if g.auto_pad:
        attrs["auto_pad"] = {1: "SAME_UPPER", 2: "SAME_LOWER", 3: "VALID"}[g.auto_pad]
    else:
        top, left, bottom, right = g.pads
        attrs["pads"] = [left, right] if one_d else [top, left, bottom, right]
    return attrs


def refit_binary(model: onnx.ModelProto, feeds) -> onnx.ModelProto:
    """Refit α and bias of each BinaryConv, in graph order."""
    fitted = onnx.ModelProto()
    fitted.CopyFrom(model)
    reference_model = float_twin(model)
    inits = {t.name: t for t in fitted.graph.initializer}
    layers = [n for n in fitted.graph.node if n.domain == CUSTOM_DOMAIN and n.op_type == "BinaryConv"]
    for node in layers:
        x_name, w_name, a_name, b_name, g_name = node.input
        w = numpy_helper.to_array(inits[w_name])
        geometry = numpy_helper.to_array(inits[g_name])
        o = w.shape[0]
        sums = np.zeros((5, o))  # Σ1, Σs, Σs², Σy, Σsy per channel
        targets = activations(reference_model, feeds, [node.output[0]])
        for acts, target in zip(activations(fitted, feeds, [x_name]), targets):
            s = reference.binary_conv(acts[x_name], w, np.ones(o, np.float32), np.zeros(o, np.float32), geometry)
            y = target[node.output[0]]
            axes = tuple(i for i in range(s.ndim) if i != 1)
            sums += [np.full(o, s.size / o), s.sum(axes), (s.astype(np.float64) ** 2).sum(axes), y.sum(axes),
                     (s.astype(np.float64) * y).sum(axes)]
        count, s1, s2, y1, sy = sums
        var = count * s2 - s1**2
        alpha = np.where(var > 0, (count * sy - s1 * y1) / np.where(var > 0, var, 1), 0.0)
        bias = (y1 - alpha * s1) / count
        inits[a_name].CopyFrom(numpy_helper.from_array(alpha.astype(np.float32), a_name))
        inits[b_name].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), b_name))
    return fitted

