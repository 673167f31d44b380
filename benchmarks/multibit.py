"""Multi-bit binarization: accuracy on the sample CNN, and lowered speed against onnxruntime's float Conv.

    python benchmarks/multibit.py [--skip-accuracy]      # --finetune rows need torch

Accuracy: all convs but the first at Kw x Ka levels, held-out digits; no recovery, calibration refit
(models/cnn_calib.npz), --finetune (first 2,000 training images, labels removed, 3 epochs).
Speed: the bitconv.py rows (3x3, pad 1, C = O), the lowered MultibitBitConv vs the float Conv in the same process,
timed alternately (common.paired_ms); file size per layer: float bytes / packed bytes.
"""
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import conv_model, isa_label, paired_ms

import onnxopt

ROOT = Path(__file__).resolve().parent.parent
ROWS = [(64, 56), (128, 28), (256, 14), (512, 7)]
LEVELS = [(1, 1), (1, 2), (2, 2), (1, 4)]


def accuracy_table():
    models = ROOT / "models"
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "cnn_2k.npz"
        with np.load(models / "cnn_train.npz") as d:
            np.savez(data, input=d["input"][:2000])
        recoveries = [("no recovery", {}), ("calibration refit", {"calibration": models / "cnn_calib.npz"}),
                      ("--finetune 3 epochs", {"finetune": data})]
        print("| Kw x Ka | " + " | ".join(r for r, _ in recoveries) + " |\n|---|---|---|---|")
        for kw, ka in LEVELS:
            scores = []
            for _, extra in recoveries:
                _, report = onnxopt.binarize(models / "cnn.onnx", skip=["first_conv"], weight_bits=kw,
                                             activation_bits=ka, data=models / "cnn_test.npz", **extra)
                scores.append(f"{report.check['score']['candidate']:.3f}")
            print(f"| {kw}x{ka} | " + " | ".join(scores) + " |", flush=True)


def speed_table():
    print(f"\nnumba ISA: {isa_label()}")
    print("| C=O | H | batch | " + " | ".join(f"{kw}x{ka}" for kw, ka in LEVELS) + " | size ratio (Kw=1 / 2) |")
    print("|---|---|---|" + "---|" * (len(LEVELS) + 1))
    rng = np.random.default_rng(0)
    for c, h in ROWS:
        model = conv_model(c, c)
        float_sess = onnxopt.session(model)
        lowered = {lv: onnxopt.binarize(model, weight_bits=lv[0], activation_bits=lv[1]) for lv in LEVELS}
        sessions = {lv: onnxopt.session(m) for lv, (m, _) in lowered.items()}
        sizes = [r.changed[0].bytes_before / r.changed[0].bytes_after for lv, (_, r) in lowered.items()
                 if lv in ((1, 1), (2, 2))]
        for batch in (1, 8):
            x = rng.standard_normal((batch, c, h, h)).astype(np.float32)
            ratios = []
            for lv in LEVELS:
                t_float, t_low = paired_ms(lambda: float_sess.run(None, {"x": x}),
                                           lambda: sessions[lv].run(None, {"x": x}))
                ratios.append(f"{t_float / t_low:.2f}x")
            print(f"| {c} | {h} | {batch} | " + " | ".join(ratios) + f" | {sizes[0]:.1f}x / {sizes[1]:.1f}x |",
                  flush=True)


if __name__ == "__main__":
    if "--skip-accuracy" not in sys.argv:
        accuracy_table()
    speed_table()
