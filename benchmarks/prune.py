"""`prune`: accuracy of the sample CNN, and latency of pruned models against the originals in onnxruntime.

    python benchmarks/prune.py [--yolo PATH/320n.onnx]      # full-size resnet18/mobilenet_v2 need torch

- Accuracy: the sample CNN, every prunable conv at 50% and 25% of its channels, by magnitude and with the
  least-squares refit on models/cnn_calib.npz (256 training digits); scored on the 1,000 held-out digits.
- Latency: original and pruned model in onnxruntime, batch 8, alternating timed blocks in one process
  (measure.alternating_latency), 3 repeats; the speed-up is compared with the whole-model FLOP ratio
  (target: within 1.3x of it, i.e. speed-up >= FLOP ratio / 1.3).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxopt import api  # noqa: E402
from onnxopt.graph.shapes import input_shapes  # noqa: E402
from onnxopt.measure.compare import alternating_latency  # noqa: E402
from onnxopt.measure.feeds import random_feeds  # noqa: E402


def accuracy_table():
    models = ROOT / "models"
    print("| kept | magnitude | + least-squares refit (calibration) |\n|---|---|---|")
    for keep in (0.5, 0.25):
        scores = []
        for extra in ({}, {"calibration": models / "cnn_calib.npz"}):
            _, report = api.prune(models / "cnn.onnx", keep=keep, data=models / "cnn_test.npz", **extra)
            scores.append(report.check["score"]["candidate"])
        print(f"| {keep:.0%} | {scores[0]:.3f} | {scores[1]:.3f} |", flush=True)
    print(f"float: {report.check['score']['reference']:.3f}")


def budget_table():
    """--budget: channel counts chosen per group under a FLOP budget, against one fraction for all (--keep)."""
    models = ROOT / "models"
    calib = {"calibration": models / "cnn_calib.npz"}
    print("\n| budget | magnitude (one fraction) | calibration (greedy allocation) | channels kept (calibrated) |")
    print("|---|---|---|---|")
    for budget in ("flops=0.25", "flops=0.07", "flops=0.04"):
        scores, kept = [], ""
        for extra in ({}, calib):
            _, report = api.prune(models / "cnn.onnx", budget=budget, data=models / "cnn_test.npz", **extra)
            scores.append(report.check["score"]["candidate"])
            kept = ", ".join(f"{x['after']}/{x['before']}" for x in report.budget["layers"])
        print(f"| {budget} | {scores[0]:.3f} | {scores[1]:.3f} | {kept} |", flush=True)
    for keep in (0.5, 0.25, 0.18):
        _, report = api.prune(models / "cnn.onnx", keep=keep, data=models / "cnn_test.npz", **calib)
        t = report.totals()
        print(f"--keep {keep} with calibration: {report.check['score']['candidate']:.3f} at "
              f"flops={t['flops_after'] / t['flops_before']:.3f}", flush=True)


def latency(name: str, source, shape: dict, keep: float = 0.5, batch: int = 8):
    import onnx

    model = onnx.load(source) if not isinstance(source, onnx.ModelProto) else source
    with input_shapes(model, shape):
        pruned, report = api.prune(model, keep=keep, input_shape=[f"{k}:{','.join(map(str, v))}"
                                                                  for k, v in shape.items()])
        feeds = random_feeds(model, batch)
    flops = report.size["flops_before"] / report.size["flops_after"]
    runs = [alternating_latency(model, pruned, feeds) for _ in range(3)]
    speedup = statistics.median(r["speedup"] for r in runs)
    print(f"| {name} | {keep} | {len(report.changed)} | {flops:.2f}x | {speedup:.2f}x | "
          f"{speedup / flops:.2f} | {runs[0]['a_ms']:.2f} -> {runs[0]['b_ms']:.2f} ms |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--yolo", type=Path, help="the YOLOv8n detector 320n.onnx (nudenet wheel)")
    parser.add_argument("--budget-only", action="store_true", help="the accuracy tables, no latency")
    args = parser.parse_args()
    accuracy_table()
    budget_table()
    if args.budget_only:
        return
    print("\n| model | keep | layers pruned | FLOP ratio | speed-up | speed-up / FLOP ratio | median |")
    print("|---|---|---|---|---|---|---|")
    latency("sample CNN", ROOT / "models" / "cnn.onnx", {})
    latency("sample CNN", ROOT / "models" / "cnn.onnx", {}, keep=0.25)
    try:
        import torch

        from models.reference_nets import MobileNetV2, ResNet18, export
    except ImportError:
        print("(torch not installed: no resnet18 / mobilenet_v2)")
        torch = None
    with tempfile.TemporaryDirectory() as tmp:
        if torch is not None:
            for name, make in (("resnet18 224", ResNet18), ("mobilenet_v2 224", MobileNetV2)):
                torch.manual_seed(0)
                path = export(make(), Path(tmp) / f"{name.split()[0]}.onnx", 224)
                latency(name, path, {}, batch=1)  # exported with batch 1
        if args.yolo:
            latency("YOLOv8n 320 (nudenet)", args.yolo, {"images": (8, 3, 320, 320)})


if __name__ == "__main__":
    main()
