"""The com.onnxopt ops: their domain, their inputs, and the one validation of their constants.

- BinaryConv (trainable): X, W float [O, C, (kh,) kw], alpha [O], bias [O], geometry int64 [11]
  computes α·Conv(b(X), b(W)) + bias, b(v) = +1 if v > 0 else −1, zero padding.
- BitConv (lowered): the same, with W as sign bits packed to uint64 [kh, kw, words(C), O].
- MultibitConv (trainable): residual binarization (netopt's Multibit / MultibitKernel) of the weights in Kw levels
  and of the activations in Ka levels; alpha is [Kw, O] (one scale per level and output channel), geometry is
  the conv geometry followed by Ka (12 int64). Semantics: `kernels.reference.multibit_conv`.
- MultibitBitConv (lowered): the same, with the Kw weight bit planes packed side by side along the output
  channels, uint64 [kh, kw, words(C), Kw·O].
- PackSigns, PackedBitConv, PackedBitConvSigns: BitConv layers chained in packed sign bits (kernels/chain.py,
  runtime/chains.py); sessions build them from BitConv → Relu/MaxPool → BitConv, files never hold them.

Every path that hands these constants to a kernel (lowering, session creation, training hooks, each
`run` of a guarded session) goes through `constants_problem` / `input_problem`, so the kernels can index
without bounds checks. No onnxruntime or numba here: graph code imports this module.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..errors import OnnxoptError
from ..kernels.geometry import MAX_WORK_BYTES, Geometry, geometry_problem, work_bytes
from ..kernels.packing import words as packed_words

DOMAIN = "com.onnxopt"
OPSET = 1
BINARY_CONV = "BinaryConv"
BIT_CONV = "BitConv"
MULTIBIT_CONV = "MultibitConv"
MULTIBIT_BIT_CONV = "MultibitBitConv"
OP_TYPES = (BINARY_CONV, BIT_CONV, MULTIBIT_CONV, MULTIBIT_BIT_CONV)
PACKED = (BIT_CONV, MULTIBIT_BIT_CONV)
# BitConv layers chained in packed bits (kernels/chain.py): made by onnxopt.session on the C path, never saved
PACK_SIGNS = "PackSigns"
PACKED_BIT_CONV = "PackedBitConv"
PACKED_BIT_CONV_SIGNS = "PackedBitConvSigns"
CHAINED = (PACK_SIGNS, PACKED_BIT_CONV, PACKED_BIT_CONV_SIGNS)
MAX_LEVELS = 4


def is_custom(node: onnx.NodeProto, op_type: str | None = None) -> bool:
    return node.domain == DOMAIN and (op_type is None or node.op_type == op_type)


def _vector_problem(role: str, v: np.ndarray, out_channels: int) -> str | None:
    if v.dtype != np.float32 or v.shape != (out_channels,):
        return f"{role} must be float32 of shape [{out_channels}], got {v.dtype} of shape {list(v.shape)}"
    if not np.isfinite(v).all():
        return f"{role} has NaN or infinite values"
    return None


def kernel_shape(op_type: str, w: np.ndarray) -> tuple[int, int, int]:
    """(out_channels, kh, kw) from the weight of either op (Conv1d weights have no kh)."""
    if op_type in PACKED:
        return w.shape[3], w.shape[0], w.shape[1]
    return (w.shape[0], 1, w.shape[2]) if w.ndim == 3 else (w.shape[0], w.shape[2], w.shape[3])


def constants_problem(op_type: str, w: np.ndarray, alpha: np.ndarray, bias: np.ndarray,
                      geometry: np.ndarray) -> str | None:
    """Why these constants cannot run in the kernel (sizes, ranges, finiteness), or None."""
    multibit = op_type in (MULTIBIT_CONV, MULTIBIT_BIT_CONV)
    if multibit:
        geometry = np.asarray(geometry)
        if geometry.dtype != np.int64 or geometry.shape != (12,) or not 1 <= int(geometry[11]) <= MAX_LEVELS:
            return f"geometry must be 12 int64 values ending with activation levels 1..{MAX_LEVELS}"
        if alpha.dtype != np.float32 or alpha.ndim != 2 or not 1 <= alpha.shape[0] <= MAX_LEVELS:
            return f"alpha must be float32 [levels 1..{MAX_LEVELS}, O], got {alpha.dtype} of shape {list(alpha.shape)}"
        levels, alpha_rows = alpha.shape[0], alpha
        alpha, geometry = alpha[0], geometry[:11]
    problem = geometry_problem(geometry)
    if problem:
        return problem
    g = Geometry.decode(geometry)
    if op_type in PACKED:
        words = packed_words(g.channels)
        if w.dtype != np.uint64 or w.ndim != 4 or w.shape[2] != words or 0 in w.shape:
            return (f"packed weight must be uint64 [kh, kw, {words}, O] for {g.channels} channels, "
                    f"got {w.dtype} of shape {list(w.shape)}")
        if g.spatial_rank == 1 and w.shape[0] != 1:
            return f"a 1-D BitConv needs kh = 1, got {w.shape[0]}"
    else:
        if w.dtype != np.float32 or w.ndim != g.spatial_rank + 2 or 0 in w.shape:
            return f"weight must be {g.spatial_rank + 2}-D float32, got {w.dtype} of shape {list(w.shape)}"
        if w.shape[1] != g.channels:
            return f"weight has {w.shape[1]} input channels, geometry says {g.channels}"
        if not np.isfinite(w).all():
            return "weight has NaN or infinite values"
    out_channels = kernel_shape(op_type, w)[0]
    if multibit:
        if op_type == MULTIBIT_BIT_CONV:
            if out_channels % levels:
                return f"packed weight has {out_channels} columns, not a multiple of {levels} levels"
            out_channels //= levels
        if not np.isfinite(alpha_rows).all():
            return "alpha has NaN or infinite values"
    return _vector_problem("alpha", alpha, out_channels) or _vector_problem("bias", bias, out_channels)


def input_problem(op_type: str, x_shape, w: np.ndarray, geometry: np.ndarray) -> str | None:
    """Why an input of `x_shape` cannot go through this op (channels, rank, an empty output), or None.
    Dims that are not known integers are not judged."""
    g = Geometry.decode(geometry[:11])
    if len(x_shape) != g.spatial_rank + 2:
        return f"input has rank {len(x_shape)}, expected {g.spatial_rank + 2}"
    if isinstance(x_shape[1], int) and x_shape[1] != g.channels:
        return f"input has {x_shape[1]} channels, the layer expects {g.channels}"
    _, kh, kw = kernel_shape(op_type, w)
    size = list(x_shape[2:]) if g.spatial_rank == 2 else [1, x_shape[2]]
    if not all(isinstance(d, int) for d in size):
        return None
    if 0 in size:  # an empty batch is fine (an empty output); an empty image is not
        return f"input {list(x_shape)} has an empty spatial dim"
    _, _, oh, ow = g.resolve(size[0], size[1], kh, kw)
    if oh < 1 or ow < 1:
        return f"input {'x'.join(map(str, size))} is smaller than the {kh}x{kw} kernel's span: no output"
    if isinstance(x_shape[0], int):
        levels = int(geometry[11]) if len(geometry) > 11 else 1
        need = work_bytes((x_shape[0], g.channels, *size), (kh, kw), g, levels)
        if need > MAX_WORK_BYTES:
            return (f"the kernel's padded input would take {need / 2**30:.1f} GiB for input {list(x_shape)} "
                    f"(limit {MAX_WORK_BYTES >> 30} GiB): pads or strides far beyond the input")
    return None


def check_custom_nodes(graph: onnx.GraphProto, constant) -> None:
    """Raise OnnxoptError for the first com.onnxopt node whose constants a kernel could not take (or are not
    constants at all). `constant(tensor_name)` returns the value or None."""
    from .nodes import unique_node_names

    names = unique_node_names(graph)
    for index, node in enumerate(graph.node):
        if not is_custom(node) or node.op_type not in OP_TYPES:
            continue
        if len(node.input) != 5:
            raise OnnxoptError(f"{node.op_type} '{names[index]}' has {len(node.input)} inputs, expected 5")
        values = [constant(t) for t in node.input[1:]]
        if any(v is None for v in values):
            missing = next(t for t, v in zip(node.input[1:], values) if v is None)
            raise OnnxoptError(f"{node.op_type} '{names[index]}': input '{missing}' is not a constant")
        problem = constants_problem(node.op_type, *values)
        if problem:
            raise OnnxoptError(f"{node.op_type} '{names[index]}': {problem}")
