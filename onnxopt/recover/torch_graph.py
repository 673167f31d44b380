"""An ONNX graph run in torch, eagerly, node by node, so that gradients reach its weights.

Why not a converter: onnx2torch (the maintained one; last release 2024-08) fails on what users have here
(dynamo exports at opset 18+: no ReduceMean-18 converter; legacy ResNet exports: KeyError on an initializer
name), and it moves weights into nn.Conv2d / nn.Linear modules with their own layouts, so
the trained values would have to be mapped back to initializers converter by converter. Here every float
initializer stays one tensor keyed by its name: writing the trained values back is a copy, the graph is
unchanged. The op table covers what torchvision-style CNNs, YOLO-style detectors and transformer exports
contain; `unsupported_ops` names anything else before training starts.

Semantics are inference semantics: BatchNormalization uses the model's stored statistics (frozen; its scale
and bias train), Dropout is the identity. The binarized op uses a straight-through estimator: b(v) forward,
the clipped identity (d b/dv = 1 for |v| <= 1) backward, as CNTK's netopt.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from ..graph.schemas import BINARY_CONV, DOMAIN, MULTIBIT_CONV
from ..kernels.geometry import Geometry

OpFunction = Callable[..., "list[torch.Tensor] | torch.Tensor"]
OPS: dict[tuple[str, str], OpFunction] = {}
# which inputs of an op are weights (trainable when they are float initializers); all others stay constant
PARAMETER_INPUTS: dict[str, set[int]] = {
    "Conv": {1, 2}, "ConvTranspose": {1, 2}, "Gemm": {0, 1, 2}, "MatMul": {0, 1}, "Einsum": set(range(8)),
    "BatchNormalization": {1, 2}, "LayerNormalization": {1, 2}, "InstanceNormalization": {1, 2},
    "Add": {0, 1}, "Sub": {0, 1}, "Mul": {0, 1}, "PRelu": {1}, BINARY_CONV: {1, 2, 3}, MULTIBIT_CONV: {1, 2, 3},
}


def op(*names: str, domain: str = ""):
    def register(fn):
        for name in names:
            OPS[(domain, name)] = fn
        return fn
    return register


class Node:
    """A node with its attributes decoded once, and the opset of its domain."""

    def __init__(self, node: onnx.NodeProto, opset: int):
        self.proto, self.opset = node, opset
        self.attrs = {}
        for a in node.attribute:
            value = helper.get_attribute_value(a)
            if a.type == onnx.AttributeProto.TENSOR:
                value = numpy_helper.to_array(value)
            self.attrs[a.name] = value.decode() if isinstance(value, bytes) else value

    def get(self, name, default=None):
        return self.attrs.get(name, default)


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _opt(inputs, i):
    return inputs[i] if len(inputs) > i and inputs[i] is not None else None


# ---- elementwise -------------------------------------------------------------------------------------------
_UNARY = {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log,
          "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs, "Erf": torch.erf, "Reciprocal": torch.reciprocal,
          "Floor": torch.floor, "Ceil": torch.ceil, "Sin": torch.sin, "Cos": torch.cos, "Not": torch.logical_not,
          "Softplus": F.softplus, "Mish": F.mish, "Sign": torch.sign, "Round": torch.round}
_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow, "Equal": torch.eq,
           "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge,
           "And": torch.logical_and, "Or": torch.logical_or, "Mod": torch.remainder}
for _name, _fn in _UNARY.items():
    OPS[("", _name)] = lambda n, x, _fn=_fn: _fn(x)
for _name, _fn in _BINARY.items():
    OPS[("", _name)] = lambda n, a, b, _fn=_fn: _fn(a, b)


@op("Div")
def _div(n, a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # integer division, as ONNX (shape arithmetic)
    return a / b


@op("Identity", "Dropout")
def _identity(n, x, *rest):
    return x


@op("Max", "Min", "Sum", "Mean")
def _variadic(n, *xs):
    fn = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[n.proto.op_type]
    y = xs[0]
    for x in xs[1:]:
        y = fn(y, x)
    return y / len(xs) if n.proto.op_type == "Mean" else y


@op("Clip")
def _clip(n, x, lo=None, hi=None):
    lo = n.get("min") if lo is None and n.opset < 11 else lo
    hi = n.get("max") if hi is None and n.opset < 11 else hi
    return torch.clamp(x, min=lo, max=hi)


@op("LeakyRelu")
def _leaky(n, x):
    return F.leaky_relu(x, n.get("alpha", 0.01))


@op("Elu")
def _elu(n, x):
    return F.elu(x, n.get("alpha", 1.0))


@op("PRelu")
def _prelu(n, x, slope):
    return torch.where(x >= 0, x, x * slope)


@op("HardSigmoid")
def _hard_sigmoid(n, x):
    return torch.clamp(n.get("alpha", 0.2) * x + n.get("beta", 0.5), 0, 1)


@op("HardSwish")
def _hard_swish(n, x):
    return F.hardswish(x)


@op("Gelu")
def _gelu(n, x):
    return F.gelu(x, approximate=n.get("approximate", "none"))


@op("Where")
def _where(n, c, a, b):
    return torch.where(c.bool(), a, b)


@op("Cast")
def _cast(n, x):
    return x.to(_TORCH_DTYPES[n.get("to")])


_TORCH_DTYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64}


# ---- shapes ------------------------------------------------------------------------------------------------
@op("Shape")
def _shape(n, x):
    shape = list(x.shape)[n.get("start", 0):n.get("end")]
    return torch.tensor(shape, dtype=torch.int64)


@op("Size")
def _size(n, x):
    return torch.tensor(x.numel(), dtype=torch.int64)


@op("Reshape")
def _reshape(n, x, shape):
    dims = _ints(shape)
    if not n.get("allowzero", 0):  # 0 copies the input's dim
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@op("Flatten")
def _flatten(n, x):
    axis = n.get("axis", 1) % max(x.dim(), 1) if n.get("axis", 1) < 0 else n.get("axis", 1)
    return x.reshape(math.prod(x.shape[:axis]), -1)


@op("Transpose")
def _transpose(n, x):
    return x.permute(n.get("perm", list(range(x.dim()))[::-1]))


def _axes(n, given, default=None):
    if given is not None:
        return _ints(given)
    return n.get("axes", default)


@op("Squeeze")
def _squeeze(n, x, axes=None):
    axes = _axes(n, axes)
    return x.squeeze() if axes is None else x.squeeze(tuple(a % x.dim() for a in axes))


@op("Unsqueeze")
def _unsqueeze(n, x, axes=None):
    for a in sorted(a % (x.dim() + len(_axes(n, axes))) for a in _axes(n, axes)):
        x = x.unsqueeze(a)
    return x


@op("Concat")
def _concat(n, *xs):
    return torch.cat([x for x in xs if x.numel() or x.dim() > 1], dim=n.get("axis"))


@op("Split")
def _split(n, x, split=None):
    axis, count = n.get("axis", 0), len(n.proto.output)
    sizes = _ints(split) if split is not None else n.get("split")
    if sizes is None:
        size = -(-x.shape[axis] // (n.get("num_outputs") or count))
        sizes = [min(size, x.shape[axis] - i * size) for i in range(count)]
    return list(torch.split(x, sizes, dim=axis))


@op("Slice")
def _slice(n, x, starts=None, ends=None, axes=None, steps=None):
    if n.opset < 10:
        starts, ends, axes = n.get("starts"), n.get("ends"), n.get("axes")
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        size = x.shape[a]
        if st < 0:  # torch slices forward only: flip, then slice
            x = x.flip(a)
            s, e = size - 1 - max(min(s, size - 1), -size), size - 1 - max(min(e, size), -size - 1)
            st = -st
        index[a] = slice(max(min(s, size), -size), max(min(e, size), -size - 1), st)
    return x[tuple(index)]


@op("Gather")
def _gather(n, x, indices):
    axis = n.get("axis", 0) % x.dim()
    idx = indices.long() % x.shape[axis]
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))


@op("Expand")
def _expand(n, x, shape):
    target = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))
    return x.expand(target)


@op("Tile")
def _tile(n, x, repeats):
    return x.repeat(_ints(repeats))


@op("Constant")
def _constant(n):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in n.attrs:
            return torch.from_numpy(np.array(n.attrs[key]))
    raise ValueError("unsupported Constant attribute")


@op("ConstantOfShape")
def _constant_of_shape(n, shape):
    value = torch.from_numpy(np.array(n.get("value", np.zeros(1, np.float32))))
    return torch.full(_ints(shape), value.reshape(-1)[0].item(), dtype=value.dtype)


@op("Range")
def _range(n, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


# ---- reductions and normalizations ---------------------------------------------------------------------------
def _reduce(fn):
    def reduce(n, x, axes=None):
        axes = _axes(n, axes)
        if not axes:
            if n.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=tuple(axes), keepdim=bool(n.get("keepdims", 1)))
    return reduce


OPS[("", "ReduceMean")] = _reduce(torch.mean)
OPS[("", "ReduceSum")] = _reduce(torch.sum)
OPS[("", "ReduceMax")] = _reduce(torch.amax)
OPS[("", "ReduceMin")] = _reduce(torch.amin)
OPS[("", "ReduceL2")] = _reduce(lambda x, dim, keepdim: torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim))


@op("Softmax", "LogSoftmax")
def _softmax(n, x):
    fn = torch.softmax if n.proto.op_type == "Softmax" else torch.log_softmax
    if n.opset < 13:  # the old semantic: softmax over the flattened dims from `axis` on
        axis = n.get("axis", 1) % x.dim()
        return fn(x.reshape(*x.shape[:axis], -1), dim=-1).reshape(x.shape)
    return fn(x, dim=n.get("axis", -1))


@op("BatchNormalization")
def _batchnorm(n, x, scale, bias, mean, var):
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=n.get("epsilon", 1e-5))


@op("LayerNormalization")
def _layernorm(n, x, scale, bias=None):
    axis = n.get("axis", -1) % x.dim()
    return F.layer_norm(x, x.shape[axis:], scale, bias, eps=n.get("epsilon", 1e-5))


@op("InstanceNormalization")
def _instancenorm(n, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=n.get("epsilon", 1e-5))


# ---- linear layers -----------------------------------------------------------------------------------------
@op("MatMul")
def _matmul(n, a, b):
    return torch.matmul(a, b)


@op("Gemm")
def _gemm(n, a, b, c=None):
    a = a.t() if n.get("transA", 0) else a
    b = b.t() if n.get("transB", 0) else b
    y = n.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + n.get("beta", 1.0) * c


@op("Einsum")
def _einsum(n, *xs):
    return torch.einsum(n.get("equation"), *xs)


def _same_pads(n, x, kernel, strides, dilations) -> list[int]:
    """ONNX pads [begin..., end...] for auto_pad SAME_UPPER / SAME_LOWER / VALID / NOTSET."""
    rank = len(kernel)
    auto = n.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", None):
        return list(n.get("pads", [0] * 2 * rank))
    if auto == "VALID":
        return [0] * 2 * rank
    begin, end = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin + end


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [b1, b2, .., e1, e2, ..] → torch's (last dim first) [b_last, e_last, ..., b1, e1]."""
    rank = len(pads) // 2
    return [p for i in reversed(range(rank)) for p in (pads[i], pads[i + rank])]


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@op("Conv")
def _conv(n, x, w, b=None):
    kernel = list(w.shape[2:])
    strides, dilations = n.get("strides", [1] * len(kernel)), n.get("dilations", [1] * len(kernel))
    pads = _same_pads(n, x, kernel, strides, dilations)
    rank = len(kernel)
    if pads[:rank] == pads[rank:]:  # symmetric: the conv pads itself (a separate F.pad copies the whole input)
        return _CONV[rank](x, w, b, stride=strides, padding=list(pads[:rank]), dilation=dilations,
                           groups=n.get("group", 1))
    x = F.pad(x, _torch_pad(pads))
    return _CONV[rank](x, w, b, stride=strides, dilation=dilations, groups=n.get("group", 1))


@op("ConvTranspose")
def _conv_transpose(n, x, w, b=None):
    rank = w.dim() - 2
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[rank]
    pads = n.get("pads", [0] * 2 * rank)
    y = fn(x, w, b, stride=n.get("strides", [1] * rank), output_padding=n.get("output_padding", [0] * rank),
           groups=n.get("group", 1), dilation=n.get("dilations", [1] * rank))
    index = [slice(None), slice(None)] + [slice(pads[i], y.shape[2 + i] - pads[i + rank]) for i in range(rank)]
    return y[tuple(index)]


# ---- pooling and resizing ----------------------------------------------------------------------------------
@op("MaxPool", "AveragePool")
def _pool(n, x):
    kernel = n.get("kernel_shape")
    rank = len(kernel)
    strides, dilations = n.get("strides", [1] * rank), n.get("dilations", [1] * rank)
    pads = _torch_pad(_same_pads(n, x, kernel, strides, dilations))
    ceil = bool(n.get("ceil_mode", 0))
    if n.proto.op_type == "MaxPool":
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[rank]
        x = F.pad(x, pads, value=-math.inf) if any(pads) else x  # F.pad copies even when it pads nothing
        return fn(x, kernel, strides, dilation=dilations, ceil_mode=ceil)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[rank]
    y = fn(F.pad(x, pads) if any(pads) else x, kernel, strides, ceil_mode=ceil, count_include_pad=True)
    if any(pads) and not n.get("count_include_pad", 0):  # divide by the taps inside the input instead
        y = y / fn(F.pad(torch.ones_like(x[:1, :1]), pads), kernel, strides, ceil_mode=ceil, count_include_pad=True)
    return y


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(n, x):
    dims = tuple(range(2, x.dim()))
    return x.mean(dims, keepdim=True) if n.proto.op_type == "GlobalAveragePool" else x.amax(dims, keepdim=True)


@op("Resize", "Upsample")
def _resize(n, x, roi=None, scales=None, sizes=None):
    if n.proto.op_type == "Upsample":
        scales = roi if roi is not None else n.get("scales")  # Upsample(X, scales)
    mode = n.get("mode", "nearest")
    if sizes is not None and sizes.numel():
        size = _ints(sizes)[2:]
    else:
        size = [int(math.floor(s * f)) for s, f in zip(x.shape[2:], [float(v) for v in _ints_f(scales)[2:]])]
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")  # asymmetric + floor, ONNX's default for nearest
    align = n.get("coordinate_transformation_mode", "half_pixel") == "align_corners"
    return F.interpolate(x, size=size, mode={3: "linear", 4: "bilinear", 5: "trilinear"}[x.dim()], align_corners=align)


def _ints_f(t) -> list[float]:
    return [float(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


@op("Pad")
def _pad(n, x, pads=None, value=None, axes=None):
    pads = _ints(pads) if pads is not None else n.get("pads")
    mode = n.get("mode", "constant")
    fill = float(value.item()) if value is not None and value.numel() else float(n.get("value", 0.0))
    if axes is not None:
        full = [0] * 2 * x.dim()
        axes = [a % x.dim() for a in _ints(axes)]
        for i, a in enumerate(axes):
            full[a], full[a + x.dim()] = pads[i], pads[i + len(axes)]
        pads = full
    torch_pads = _torch_pad(pads)
    if mode == "constant":
        return F.pad(x, torch_pads, value=fill)
    return F.pad(x, torch_pads[:2 * (x.dim() - 2)], mode={"reflect": "reflect", "edge": "replicate"}[mode])


# ---- com.onnxopt -------------------------------------------------------------------------------------------
class SignSTE(torch.autograd.Function):
    """b(v) = +1 if v > 0 else −1; backward: the clipped identity, d b/dv = 1 for |v| <= 1 (netopt)."""

    @staticmethod
    def forward(ctx, v):
        ctx.save_for_backward(v)
        return torch.where(v > 0, 1.0, -1.0).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        return grad * (v.abs() <= 1).to(grad.dtype)


def _planes(v: torch.Tensor, levels: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """kernels.reference.residual_planes in torch, without gradient: bit planes and scales per slice of axis 0."""
    with torch.no_grad():
        r, planes, scales = v, [], []
        for _ in range(levels):
            s = r.abs().mean(dim=tuple(range(1, v.dim())), keepdim=True)
            b = torch.where(r > 0, 1.0, -1.0).to(v.dtype)
            planes.append(b)
            scales.append(s)
            r = r - s * b
    return planes, scales


def _clipped(v: torch.Tensor, value: torch.Tensor, limit: int) -> torch.Tensor:
    """`value` forward; backward the identity where |v| <= limit (netopt's Multibit: the number of levels)."""
    return value.detach() + (v - v.detach()) * (v.detach().abs() <= limit).to(v.dtype)


@op(MULTIBIT_CONV, domain=DOMAIN)
def _multibit_conv(n, x, w, alpha, bias, geometry):
    """Conv(approx(X), Σ α_i·B_i(W)) + bias, as kernels.reference.multibit_conv; α trains through its planes."""
    levels_x = int(geometry[11])
    planes, _ = _planes(w, len(alpha))
    shape = (-1,) + (1,) * (w.dim() - 1)
    wa = sum(a.view(shape) * p for a, p in zip(alpha, planes))
    wa = wa + (w - w.detach()) * (w.detach().abs() <= len(alpha)).to(w.dtype)
    if levels_x == 1:
        xa = SignSTE.apply(x)
    else:
        bits, scales = _planes(x, levels_x)
        xa = _clipped(x, sum(s * b for s, b in zip(scales, bits)), levels_x)
    return _padded_conv(xa, wa, alpha.new_ones(w.shape[0]), bias, geometry[:11])


@op(BINARY_CONV, domain=DOMAIN)
def _binary_conv(n, x, w, alpha, bias, geometry):
    """α·Conv(b(X), b(W)) + bias with zero padding after b() (kernels/reference.py is the same in numpy)."""
    return _padded_conv(SignSTE.apply(x), SignSTE.apply(w), alpha, bias, geometry)


def _padded_conv(x, w, alpha, bias, geometry):
    """α·Conv(x, w) + bias with the op's geometry, zero padding (of the already binarized input)."""
    g = Geometry.decode(geometry.numpy())
    one_d = g.spatial_rank == 1
    x4, w4 = (x.unsqueeze(2), w.unsqueeze(2)) if one_d else (x, w)
    h, wd = x4.shape[2:]
    kh, kw = w4.shape[2:]
    pt, pl, oh, ow = g.resolve(h, wd, kh, kw)
    span_h = (oh - 1) * g.strides[0] + (kh - 1) * g.dilations[0] + 1
    span_w = (ow - 1) * g.strides[1] + (kw - 1) * g.dilations[1] + 1
    pr, pb = max(span_w - wd - pl, 0), max(span_h - h - pt, 0)
    if (pr, pb) == (pl, pt):  # symmetric: the conv pads itself (zeros, as F.pad would) without copying the input
        y = F.conv2d(x4, w4, None, stride=g.strides, padding=(pt, pl), dilation=g.dilations)[:, :, :oh, :ow]
    else:
        xb = F.pad(x4, (pl, pr, pt, pb))
        y = F.conv2d(xb, w4, None, stride=g.strides, dilation=g.dilations)[:, :, :oh, :ow]
    y = y * alpha.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    return y[:, :, 0, :] if one_d else y


# ---- the graph -------------------------------------------------------------------------------------------------
def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """'OpType (node name)' for each node this module cannot run in torch, first occurrence per op type."""
    seen, found = set(), []
    for node in model.graph.node:
        key = ("" if node.domain == "ai.onnx" else node.domain, node.op_type)
        if key not in OPS and key not in seen:
            seen.add(key)
            found.append(f"{node.domain + '::' if key[0] else ''}{node.op_type} ({node.name or node.output[0]})")
    return found


def trainable_initializers(model: onnx.ModelProto) -> list[str]:
    """Float32 initializers with more than one element whose every consumer takes them as a weight (a conv's
    kernel, a linear layer's matrix or bias, a normalization's scale or shift, BinaryConv's W, α, bias);
    statistics, shapes, scalars and the like stay constant."""
    floats = {t.name for t in model.graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT and math.prod(t.dims) > 1}
    frozen = set()
    for node in model.graph.node:
        slots = PARAMETER_INPUTS.get(node.op_type, set())
        frozen |= {name for i, name in enumerate(node.input) if name in floats and i not in slots}
    return [t.name for t in model.graph.initializer if t.name in floats - frozen]


class GraphModule(torch.nn.Module):
    """The model's main graph as a torch module: its trainable initializers are parameters (in initializer
    order), the other initializers constants; `forward(feeds)` returns the graph outputs in order."""

    def __init__(self, model: onnx.ModelProto, trainable: list[str]):
        super().__init__()
        opsets = {o.domain or "": o.version for o in model.opset_import}
        opsets[""] = opsets.get("ai.onnx", opsets.get("", 1))
        self.nodes = [Node(node, opsets.get(node.domain or "", 1)) for node in model.graph.node]
        self.names = list(trainable)
        self.weights = torch.nn.ParameterList()
        self.constants: dict[str, torch.Tensor] = {}
        wanted = set(trainable)
        for t in model.graph.initializer:
            value = torch.from_numpy(numpy_helper.to_array(t).copy())
            if t.name in wanted:
                self.weights.append(torch.nn.Parameter(value))
            else:
                self.constants[t.name] = value
        self.weights_by_name = dict(zip(self.names, self.weights))
        self.outputs = [o.name for o in model.graph.output]

    def forward(self, feeds: dict[str, torch.Tensor], taps: tuple[str, ...] = ()) -> list[torch.Tensor]:
        """The graph outputs in order, then the intermediate tensors named in `taps` (layer-wise distillation)."""
        env = {**self.constants, **self.weights_by_name, **feeds, "": None}
        for node in self.nodes:
            key = ("" if node.proto.domain == "ai.onnx" else node.proto.domain, node.proto.op_type)
            result = OPS[key](node, *[env[name] for name in node.proto.input])
            results = result if isinstance(result, (list, tuple)) else [result]
            env.update(zip(node.proto.output, results))
        return [env[name] for name in (*self.outputs, *taps)]

    def trained_values(self) -> dict[str, np.ndarray]:
        return {name: p.detach().numpy().astype(np.float32) for name, p in zip(self.names, self.weights)}

    def load_values(self, values: dict[str, np.ndarray]) -> None:
        """Set the trained weights back to `values` (trained_values' form)."""
        with torch.no_grad():
            for name, p in zip(self.names, self.weights):
                p.copy_(torch.from_numpy(values[name]))
