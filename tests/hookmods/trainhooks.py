"""Training hooks used by the tests, named on the command line as tests.hookmods.trainhooks:NAME."""
import sys

import numpy as np
import onnx
from onnx import numpy_helper


def flip_conv3(model, **kwargs):
    """Negates conv3's latent weights: the lowered model must carry the change."""
    for t in model.graph.initializer:
        if t.name == "conv3.weight":
            t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), t.name))
    return model


def add_node(model, **kwargs):
    model.graph.node.append(onnx.helper.make_node("Identity", ["logits"], ["extra"]))
    return model


def boom(model, **kwargs):
    raise RuntimeError("diverged")


def needs_arg(model, scale=None, **kwargs):
    if scale != "2":
        raise ValueError(f"scale={scale!r}")
    return model


if __name__ == "__main__":  # external trainer: python trainhooks.py MODE INPUT OUTPUT
    mode, src, dst = sys.argv[1:]
    if mode == "fail":
        print("CUDA out of memory (pretend)", file=sys.stderr)
        sys.exit(3)
    if mode == "nothing":
        sys.exit(0)
    m = onnx.load(src)
    onnx.save(flip_conv3(m) if mode == "flip" else m, dst)
    np.save(dst + ".seen.npy", np.zeros(1))
