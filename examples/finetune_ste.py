"""Fine-tune a binarized model with a straight-through estimator (STE), as an onnxopt training hook.

    pip install '.[train]'      # torch; e.g. pip install torch==2.13.0
    onnxopt binarize models/cnn.onnx --skip first_conv --train-hook examples.finetune_ste:finetune \\
        --hook-arg data=models/cnn_train.npz --hook-arg epochs=3
    # or: tox -e finetune      (runs this file's main: prints accuracies before/after)

The hook reads the transformed model (com.onnxopt BinaryConv nodes with their float latent weights),
mirrors its graph in torch, trains the latent weights, α and biases with b(v) = +1 if v > 0 else −1 in
the forward pass and the clipped identity (d b/dv = 1 for |v| ≤ 1) in the backward pass, and writes the
new values back into the same initializers: the graph is unchanged, so onnxopt can lower it.
Supported ops: Conv, BinaryConv, Relu, MaxPool, Flatten, Gemm (what the sample models use).
"""
from __future__ import annotations

import sys

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from onnxopt.kernels.geometry import Geometry


class _Sign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v):
        ctx.save_for_backward(v)
        return torch.where(v > 0, 1.0, -1.0)

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        return grad * (v.abs() <= 1).to(grad.dtype)


class GraphModule(torch.nn.Module):
    """The ONNX graph as a torch module whose parameters are the model's float initializers."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        self.model = model
        self.names = {}
        self.consts = {}
        for t in model.graph.initializer:
            arr = numpy_helper.to_array(t)
            if arr.dtype == np.float32:
                key = f"p{len(self.names)}"
                self.names[t.name] = key
                self.register_parameter(key, torch.nn.Parameter(torch.from_numpy(arr.copy())))
            else:
                self.consts[t.name] = arr

    def value(self, env, name):
        if name in self.names:
            return getattr(self, self.names[name])
        return env[name]

    def forward(self, x):
        g = self.model.graph
        env = {g.input[0].name: x}
        for node in g.node:
            a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
            ins = [self.value(env, n) if n in self.names or n in env else None for n in node.input]
            if node.op_type == "BinaryConv":
                geo = Geometry.decode(self.consts[node.input[4]])
                top, left, bottom, right = geo.pads
                xb = F.pad(_Sign.apply(ins[0]), (left, right, top, bottom))  # zero padding after b()
                wb = _Sign.apply(ins[1]) * ins[2].view(-1, 1, 1, 1)
                y = F.conv2d(xb, wb, ins[3], stride=geo.strides, dilation=geo.dilations)
            elif node.op_type == "Conv":
                p = a.get("pads", [0, 0, 0, 0])
                y = F.conv2d(F.pad(ins[0], (p[1], p[3], p[0], p[2])), ins[1], ins[2] if len(ins) > 2 else None,
                             stride=a.get("strides", 1), dilation=a.get("dilations", 1))
            elif node.op_type == "Relu":
                y = torch.relu(ins[0])
            elif node.op_type == "MaxPool":
                y = F.max_pool2d(ins[0], a["kernel_shape"], a.get("strides"))
            elif node.op_type == "Flatten":
                y = torch.flatten(ins[0], a.get("axis", 1))
            elif node.op_type == "Gemm":
                w = ins[1].T if a.get("transB", 0) else ins[1]
                y = ins[0] @ w + (ins[2] if len(ins) > 2 else 0)
            else:
                raise NotImplementedError(f"finetune_ste: op {node.op_type} is not supported")
            env[node.output[0]] = y
        return env[g.output[0].name]

    def write_back(self) -> onnx.ModelProto:
        for t in self.model.graph.initializer:
            if t.name in self.names:
                value = getattr(self, self.names[t.name]).detach().numpy()
                t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), t.name))
        return self.model


def finetune(model: onnx.ModelProto, data: str = "models/cnn_train.npz", epochs: str = "3", lr: str = "1e-3",
             **_) -> onnx.ModelProto:
    """The training hook: STE fine-tuning on `data` (.npz with `input` and `label`)."""
    torch.manual_seed(0)
    with np.load(data) as d:
        x, y = torch.from_numpy(d["input"]), torch.from_numpy(d["label"])
    net = GraphModule(model)
    opt = torch.optim.Adam(net.parameters(), lr=float(lr))
    for _ in range(int(epochs)):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.write_back()


def main(argv):
    import onnxopt

    data = argv[0] if argv else "models/cnn_test.npz"
    source = onnxopt.load_model("models/cnn.onnx")
    with np.load(data) as d:
        x, y = d["input"], d["label"]

    def acc(m):
        return float((onnxopt.session(m).run(None, {"input": x})[0].argmax(1) == y).mean())

    plain = onnxopt.binarize_convolution(source, skip=["first_conv"])
    tuned = onnxopt.binarize_convolution(source, skip=["first_conv"], train_function=finetune)
    print(f"held-out accuracy: float {acc(source):.4f}, binarized {acc(plain):.4f}, STE fine-tuned {acc(tuned):.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
