"""--finetune: accuracy recovered on the sample models (held-out digits), and the mechanics on full-size exports.

    python benchmarks/finetune.py [--yolo PATH/320n.onnx]    # needs torch (pip install '.[train]')

Accuracy: fine-tuning reads the first 2,000 images of models/*_train.npz with the labels removed; every figure
is on the 1,000 held-out digits of models/*_test.npz. Full-size resnet18 / mobilenet_v2 (plain torch,
models/reference_nets.py, random weights, 224x224) and optionally the YOLOv8n detector from the nudenet wheel:
binarize (first conv kept) and factor (rank 0.5), one epoch on 4 random images, the output loaded and run.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxopt import api, runtime  # noqa: E402
from onnxopt.measure.feeds import random_feeds  # noqa: E402


def accuracy_rows(folder: Path) -> list[tuple]:
    models = ROOT / "models"
    data = {}
    for name in ("cnn", "mlp"):
        with np.load(models / f"{name}_train.npz") as d:
            data[name] = folder / f"{name}_2k.npz"
            np.savez(data[name], input=d["input"][:2000])
    cases = [("CNN, convs but first_conv binarized", "binarize", "cnn", {"skip": ["first_conv"]}, 3),
             ("MLP factored to 5% of dense params", "factor", "mlp", {"budget": "params=0.05"}, 5)]
    rows = []
    for title, command, name, options, epochs in cases:
        recover = [("no recovery", {}), ("calibration", {"calibration": models / f"{name}_calib.npz"}),
                   (f"--finetune ({epochs} epochs)", {"finetune": data[name], "epochs": epochs}),
                   ("calibration + --finetune", {"calibration": models / f"{name}_calib.npz",
                                                 "finetune": data[name], "epochs": epochs})]
        for label, extra in recover:
            start = time.perf_counter()
            _, report = getattr(api, command)(models / f"{name}.onnx", data=models / f"{name}_test.npz",
                                              **options, **extra)
            score = report.check["score"]
            rows.append((title, label, score["reference"], score["candidate"], time.perf_counter() - start))
            print(f"{title:38s} {label:28s} float {score['reference']:.3f} -> {score['candidate']:.3f} "
                  f"({rows[-1][-1]:.1f} s)", flush=True)
    return rows


def mechanics(path: Path, folder: Path, input_shape: tuple[int, ...], first_conv: str):
    import onnx

    from onnxopt.graph.shapes import input_shapes

    source = onnx.load(path)
    name = next(iter(runtime.graph_inputs(source)))
    with input_shapes(source, {name: input_shape}):
        feeds = random_feeds(source, input_shape[0] * 4)
    data = folder / "random.npz"
    np.savez(data, **feeds)
    for command, options in (("binarize", {"skip": [first_conv]}), ("factor", {"rank": "0.5"})):
        out = folder / f"{path.stem}.{command}.onnx"
        start = time.perf_counter()
        _, report = getattr(api, command)(source, finetune=data, epochs=1, batch_size=2, output=out, force=True,
                                          **options)
        seconds = time.perf_counter() - start
        outputs = runtime.run(out, {name: feeds[name][:1]})
        shapes = {k: list(v.shape) for k, v in outputs.items()}
        f = report.finetune
        print(f"{path.stem:22s} {command:8s} {len(report.changed):3d} layers, {f['trained_params']:,} weights "
              f"trained, loss {f['loss_before']:.4g} -> {f['loss_after']:.4g}, {seconds:.1f} s, outputs {shapes}, "
              f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--yolo", type=Path, help="the YOLOv8n detector 320n.onnx (nudenet wheel)")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    import torch

    from models.reference_nets import MobileNetV2, ResNet18, export

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.skip_accuracy:
            accuracy_rows(folder)
        for name, make, first in (("resnet18", ResNet18, "conv1"), ("mobilenet_v2", MobileNetV2, "features.0")):
            torch.manual_seed(0)
            mechanics(export(make(), folder / f"{name}.onnx", 224), folder, (1, 3, 224, 224), first)
        if args.yolo:
            mechanics(args.yolo, folder, (1, 3, 320, 320), "model.0")


if __name__ == "__main__":
    main()
