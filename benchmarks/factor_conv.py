"""`factor` on convolutions: held-out accuracy of the sample CNN, and latency of factored convs vs the original.

Accuracy: the CNN's convs (fc left dense) at 20/30/50% of their params, by `--budget` (channel mode) plain and
calibrated, and by a uniform `--rank` in each mode on conv2 and conv3 (the rank giving about that size; the
first conv, with one input channel, kept dense); 1,000 held-out digits,
calibration on the 256-digit training split.

Latency: one 3x3 conv (pad 1) as a one-node model against its factored form in each mode at about 30% and 50%
of its params; onnxruntime, both sessions in one process, alternating ~50 ms blocks, 15 rounds; batch 1 and 8;
speed-up = original ms / factored ms, next to the FLOP ratio (original / factored).

    python benchmarks/factor_conv.py [--skip-accuracy] [--skip-latency]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt import api
from onnxopt.measure.compare import alternating_latency
from onnxopt.runtime import run

MODELS = Path(__file__).resolve().parent.parent / "models"
LAYERS = [(64, 56), (128, 28), (256, 14), (512, 7)]  # channels (C = O), spatial size


def uniform_ranks(fraction: float) -> list[tuple[str, float]]:
    """(mode, --rank) giving a C=O 3x3 conv about `fraction` of its params: channel k(9C + C) = f·9C²;
    Tucker r1 = r2 = rC, 9r²C² + 2rC² = f·9C²; spatial r(3C + 3C) = f·9C² with r a share of 3C."""
    return [("channel", fraction * 0.9), ("tucker", fraction ** 0.5 * 0.9), ("spatial", fraction / 2)]


def accuracy(model, data) -> float:
    logits = next(iter(run(model, {"input": data["input"]}).values()))
    return float((logits.argmax(1) == data["label"]).mean())


def accuracy_table():
    test = dict(np.load(MODELS / "cnn_test.npz"))
    calib = str(MODELS / "cnn_calib.npz")
    path = str(MODELS / "cnn.onnx")
    print("| conv params kept | budget, plain | budget, calibrated | channel --rank | tucker --rank | "
          "spatial --rank |")
    print("|---|---|---|---|---|---|")
    for fraction in (0.2, 0.3, 0.5):
        cells = []
        for calibration in (None, calib):
            model, report = api.factor(path, budget=f"params={fraction}", skip=["fc"], calibration=calibration)
            cells.append(f"{accuracy(model, test):.4f}")
        # a uniform rank per mode: channel rank k·(C·9 + O) ≈ fraction·C·O·9 → k ≈ fraction·min(...)·0.9
        for mode, rank in uniform_ranks(fraction):
            model, report = api.factor(path, rank=f"{rank:.3f}", skip=["fc", "first_conv"], conv_mode=mode)
            t = report.totals()
            cells.append(f"{accuracy(model, test):.4f} ({t['params_after'] / t['params_before']:.0%} of "
                         f"{t['params_before']:,})")
        print(f"| {fraction:.0%} | " + " | ".join(cells) + " |", flush=True)


def one_conv(c, size, seed=0) -> onnx.ModelProto:
    w = np.random.default_rng(seed).standard_normal((c, c, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    shape = ["n", c, size, size]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def latency_table():
    print("| C=O, size | mode | params | FLOP ratio | speed-up b1 (range) | speed-up b8 (range) |")
    print("|---|---|---|---|---|---|")
    for c, size in LAYERS:
        model = one_conv(c, size)
        for fraction in (0.3, 0.5):
            for mode, rank in uniform_ranks(fraction):
                new, report = api.factor(model, rank=f"{rank:.3f}", conv_mode=mode)
                if not report.changed:
                    continue
                layer = report.changed[0]
                cells = []
                for batch in (1, 8):
                    x = np.random.default_rng(1).standard_normal((batch, c, size, size)).astype(np.float32)
                    t = alternating_latency(model, new, {"x": x}, rounds=15, block_seconds=0.05)
                    cells.append(f"{t['speedup']:.2f}x ({t['spread'][0]:.2f}-{t['spread'][1]:.2f})")
                print(f"| {c}, {size} | {mode} | {layer.params_after / layer.params_before:.0%} | "
                      f"{layer.flops_before / layer.flops_after:.2f} | {cells[0]} | {cells[1]} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    if not args.skip_accuracy:
        accuracy_table()
    if not args.skip_latency:
        latency_table()


if __name__ == "__main__":
    main()
