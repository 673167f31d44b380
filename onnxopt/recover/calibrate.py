"""Calibration: layer activations from onnxruntime, and reconstruction from them.

The layers come from the rewrite registries (`passes`): factor's rules name the input each dense layer
needs, and the float reference of a binarized model is the `unbinarize` pass.

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

from ..errors import OnnxoptError
from ..graph import schemas as ops
from ..graph.constants import Constants
from ..graph.nodes import copy_model, op_key, unique_node_names
from ..kernels import reference
from ..measure.feeds import feeds_from
from ..passes.binarize import unbinarize
from ..passes.rules import Rules, apply_rules
from ..runtime import session

BATCH = 64


def batches(feeds: dict[str, np.ndarray], size: int = BATCH) -> Iterator[dict[str, np.ndarray]]:
    n = len(next(iter(feeds.values())))
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in feeds.items()}


def load_calibration(source, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Calibration inputs from an .npz path, or a dict of arrays keyed by graph input name."""
    feeds = feeds_from(source, model)
    path = "calibration" if isinstance(source, dict) else source
    sizes = {len(v) for v in feeds.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise OnnxoptError(f"{path}: calibration arrays must share one non-empty first (sample) dimension")
    for name, array in feeds.items():  # NaN/Inf reach the Gram matrices and LAPACK fails far from the cause
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise OnnxoptError(f"{path}: calibration input '{name}' has NaN or infinite values")
    return feeds


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    probe = copy_model(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.ValueInfoProto(name=n) for n in names if n not in present)
    return probe


def activations(model: onnx.ModelProto, feeds, names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """The values of tensors `names`, one calibration batch at a time."""
    sess = session(_with_outputs(model, names), optimize=False)
    for batch in batches(feeds):
        yield dict(zip(names, sess.run(names, batch)))


def dense_grams(model: onnx.ModelProto, feeds, rules: Rules,
                wanted: set[str] | None = None) -> dict[str, np.ndarray]:
    """{layer name: XᵀX} for the layers `rules` (factor's) take (those named in `wanted`, if given), each rule
    naming the input it needs
    (`calibration_input(node)`) and the Gram matrix of one batch of it (`calibration_gram`: of a conv's
    patches, for a conv); accumulated batch by batch."""
    layers = {}
    for node, name in zip(model.graph.node, unique_node_names(model.graph)):
        rule = rules.get(op_key(node))
        if rule is not None and hasattr(rule, "calibration_input") and (wanted is None or name in wanted):
            layers[name] = (rule.calibration_input(node), rule, node)
    tensors = sorted({t for t, _, _ in layers.values()})
    constants = Constants(model.graph)
    grams: dict[str, np.ndarray] = {}
    for acts in activations(model, feeds, tensors):
        for name, (tensor, rule, node) in layers.items():
            grams[name] = grams.get(name, 0) + rule.calibration_gram(node, acts[tensor], constants.get)
    return grams


def refit_binary(model: onnx.ModelProto, feeds) -> onnx.ModelProto:
    """Refit α and bias of each BinaryConv, in graph order."""
    fitted = copy_model(model)
    reference_model = apply_rules(model, unbinarize.rules(), command="unbinarize")[0]
    inits = {t.name: t for t in fitted.graph.initializer}
    for node in [n for n in fitted.graph.node if ops.is_custom(n, ops.MULTIBIT_CONV)]:
        _refit_multibit(node, fitted, reference_model, feeds)
    layers = [n for n in fitted.graph.node if ops.is_custom(n, ops.BINARY_CONV)]
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



def _refit_multibit(node, fitted: onnx.ModelProto, reference_model: onnx.ModelProto, feeds) -> None:
    """Per output channel, the Kw level scales and the bias by least squares: the float layer's output
    y_o ≈ Σ_i α_io·Conv(approx(X), B_i)_o + b_o, with the bit planes B_i of W held as they are."""
    inits = {t.name: t for t in fitted.graph.initializer}
    x_name, w_name, a_name, b_name, g_name = node.input
    w, alpha, geometry = (numpy_helper.to_array(inits[n]) for n in (w_name, a_name, g_name))
    levels, o = alpha.shape
    normal, right = np.zeros((o, levels + 1, levels + 1)), np.zeros((o, levels + 1))
    targets = activations(reference_model, feeds, [node.output[0]])
    for acts, target in zip(activations(fitted, feeds, [x_name]), targets):
        parts = []
        for i in range(levels):  # the layer's output from level i alone, at scale 1
            one = np.zeros_like(alpha)
            one[i] = 1
            parts.append(reference.multibit_conv(acts[x_name], w, one, np.zeros(o, np.float32), geometry))
        z = np.stack(parts + [np.ones_like(parts[0])], axis=-1).astype(np.float64)  # (N, O, ..., L+1)
        z = np.moveaxis(z, 1, 0).reshape(o, -1, levels + 1)
        y = np.moveaxis(target[node.output[0]], 1, 0).reshape(o, -1).astype(np.float64)
        normal += np.einsum("onl,onm->olm", z, z)
        right += np.einsum("onl,on->ol", z, y)
    ridge = 1e-9 * np.trace(normal, axis1=1, axis2=2)[:, None, None] * np.eye(levels + 1)
    solved = np.linalg.solve(normal + ridge, right[..., None])[..., 0]
    inits[a_name].CopyFrom(numpy_helper.from_array(solved[:, :levels].T.astype(np.float32).copy(), a_name))
    inits[b_name].CopyFrom(numpy_helper.from_array(solved[:, levels].astype(np.float32), b_name))


def input_grams(model: onnx.ModelProto, feeds, layers) -> dict[str, np.ndarray]:
    """{layer name: [X 1]ᵀ[X 1]} of each prune.Layer's input on the calibration data (a conv's X: its im2col
    patches), a constant column appended so a least-squares refit can move the bias too."""
    from ..graph.nodes import node_attributes
    from ..kernels.geometry import Geometry, im2col

    constants = Constants(model.graph)
    tensors = sorted({layer.node.input[0] for layer in layers})
    grams: dict[str, np.ndarray] = {}
    for acts in activations(model, feeds, tensors):
        for layer in layers:
            x = acts[layer.node.input[0]]
            if layer.kind == "conv":
                w = constants.get(layer.weight)
                geometry = Geometry.from_conv(node_attributes(layer.node), 2, x.shape[1])
                parts = [im2col(x[s:s + 8], tuple(w.shape[2:]), geometry) for s in range(0, len(x), 8)]
            else:
                parts = [x.reshape(-1, x.shape[-1])]
            for cols in parts:
                cols = np.hstack([cols.astype(np.float64), np.ones((len(cols), 1))])
                grams[layer.name] = grams.get(layer.name, 0) + cols.T @ cols
    return grams
