"""Training hooks used by the tests, named on the command line as tests.hookmods.trainhooks:NAME."""
import os
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


def change_attribute(model, **kwargs):
    """Changes a node attribute (here: a BatchNormalization's epsilon, or the first node's name-free attribute)."""
    for node in model.graph.node:
        if node.attribute:
            node.attribute[0].CopyFrom(onnx.helper.make_attribute(node.attribute[0].name, 7)
                                       if node.attribute[0].type == onnx.AttributeProto.INT
                                       else onnx.helper.make_attribute(node.attribute[0].name, 0.5))
            return model
    raise RuntimeError("no node with attributes")


def infinite_alpha(model, **kwargs):
    for t in model.graph.initializer:
        if t.name.endswith("binary_alpha"):
            a = numpy_helper.to_array(t).copy()
            a[0] = np.inf
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            return model
    raise RuntimeError("no alpha")


def external_data(model, **kwargs):
    from onnx.external_data_helper import set_external_data

    t = next(t for t in model.graph.initializer if t.name.endswith("binary_alpha"))
    set_external_data(t, "/etc/passwd")
    return model


def stride_zero(model, **kwargs):
    for t in model.graph.initializer:
        if t.name.endswith("binary_geometry"):
            g = numpy_helper.to_array(t).copy()
            g[1] = 0
            t.CopyFrom(numpy_helper.from_array(g, t.name))
            return model
    raise RuntimeError("no geometry")


def sleep(model, seconds="30", **kwargs):
    import time

    time.sleep(float(seconds))
    return model


if __name__ == "__main__":  # external trainer: python trainhooks.py MODE INPUT OUTPUT
    mode, src, dst = sys.argv[1:]
    if mode == "spawn":  # a trainer that starts a grandchild, says its pid, and hangs
        import subprocess
        import time

        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        with open(os.environ["ONNXOPT_TEST_PIDFILE"], "w") as f:
            f.write(f"{os.getpid()} {child.pid}\n")
        time.sleep(120)
    if mode == "fail":
        print("CUDA out of memory (pretend)", file=sys.stderr)
        sys.exit(3)
    if mode == "nothing":
        sys.exit(0)
    m = onnx.load(src)
    onnx.save(flip_conv3(m) if mode == "flip" else m, dst)
    np.save(dst + ".seen.npy", np.zeros(1))
