"""Inputs for a model: from an .npz or a dict, checked against the graph inputs, or random ones."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from ..errors import OnnxoptError, UsageError
from ..runtime.guard import check_feed, graph_inputs


def feeds_from(data, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Feeds from an .npz path (`load_feeds`) or a dict of arrays keyed by input name, checked alike."""
    if not isinstance(data, dict):
        return load_feeds(data, model)
    feeds = {}
    for name, vi in graph_inputs(model).items():
        if name not in data:
            raise OnnxoptError(f"no array for input '{name}' (given: {', '.join(data) or 'none'})")
        feeds[name] = np.asarray(data[name])
        check_feed(name, feeds[name], vi)
    return feeds  # only the graph's inputs: labels and other arrays may ride along in the dict


def load_feeds(path: str | os.PathLike, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Arrays keyed by graph input name from an .npz; a file with one array feeds a one-input model."""
    path = Path(path)
    if not path.is_file():
        raise OnnxoptError(f"{path}: no such data file")
    inputs = graph_inputs(model)
    try:
        with np.load(path, allow_pickle=False) as data:  # members load lazily: only the inputs' arrays are read
            names = list(data.files)
            feeds = {name: data[name] for name in inputs if name in names}
            unnamed = [k for k in names if k not in ("label", "labels")]
            if not feeds and len(inputs) == 1 and len(unnamed) == 1:
                feeds = {next(iter(inputs)): data[unnamed[0]]}
    except Exception as exc:
        raise OnnxoptError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [n for n in inputs if n not in feeds]
    if missing:
        raise OnnxoptError(f"{path}: no array for input(s) {', '.join(missing)} (has: {', '.join(names) or 'none'})")
    for name, vi in inputs.items():
        check_feed(name, feeds[name], vi, source=str(path))
    return feeds


def table_rows(model: onnx.ModelProto) -> dict[str, int]:
    """Graph inputs used as indices into a constant table (Gather's indices over an initializer, e.g. token ids
    into an embedding): the number of rows they may index (the smallest, when several tables read one input)."""
    inputs = set(graph_inputs(model))
    tables = {t.name: list(t.dims) for t in model.graph.initializer}
    rows: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] not in inputs:
            continue
        dims = tables.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if dims and -len(dims) <= axis < len(dims) and dims[axis] > 0:
            rows[node.input[1]] = min(rows.get(node.input[1], dims[axis]), dims[axis])
    return rows


def random_feeds(model: onnx.ModelProto, samples: int, seed: int = 0, shapes: dict | None = None,
                 values: dict | None = None) -> dict[str, np.ndarray]:
    """Random float inputs; integer inputs that index a table (token ids into a Gather's embedding) are random
    rows of it, other integer inputs ones (a mask of ones attends everywhere), inputs in `values` (--input-value)
    that value everywhere; a symbolic first dim becomes `samples`, other symbolic dims need --input-shape or
    --data."""
    rng = np.random.default_rng(seed)
    feeds = {}
    given, values = shapes or {}, values or {}
    rows = table_rows(model)
    inputs = graph_inputs(model)
    unknown = sorted(set(values) - set(inputs))
    if unknown:
        raise UsageError(f"--input-value {unknown[0]}: the model has no input of that name "
                         f"(inputs: {', '.join(inputs)})")
    for name, vi in inputs.items():
        tt = vi.type.tensor_type
        dims = []
        if name in given:
            dims = list(given[name])
            tt = onnx.helper.make_tensor_type_proto(tt.elem_type, []).tensor_type  # no dims left to fill
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            elif i == 0:
                dims.append(samples)
            else:
                raise OnnxoptError(f"input '{name}' has an unknown dim {i} ('{d.dim_param or '?'}'): pass --data "
                                   f"or --input-shape {name}:{','.join(['N'] * len(tt.shape.dim))}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if name in values:
            value = values[name]
            if np.issubdtype(dtype, np.integer) and value != int(value):
                raise UsageError(f"--input-value {name}={value:g}: input '{name}' is {np.dtype(dtype)}, "
                                 "give a whole number")
            feeds[name] = np.full(dims, value, dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[name] = rng.integers(0, rows[name], dims).astype(dtype) if name in rows else np.ones(dims, dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        else:
            raise OnnxoptError(f"input '{name}' is {np.dtype(dtype)}: random inputs are numbers only, pass --data")
    return feeds


def random_feed_batches(model: onnx.ModelProto, samples: int, shapes: dict | None = None,
                        values: dict | None = None) -> list[dict[str, np.ndarray]]:
    """`samples` random inputs as a list of feeds: one feed when the batch dim is free, else as many feeds of the
    model's fixed batch (a batch-1 export checked with --check 8 runs 8 feeds, not 1 sample), each its own seed."""
    first = random_feeds(model, samples, shapes=shapes, values=values)
    batch = next((v.shape[0] for v in first.values() if v.ndim), samples)
    count = -(-samples // max(batch, 1))
    return [first] + [random_feeds(model, samples, seed=i, shapes=shapes, values=values) for i in range(1, count)]
