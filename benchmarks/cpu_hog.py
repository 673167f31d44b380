"""Lowered vs float on real models: the speed-up on a quiet machine, and how much each side slows down with a
second CPU-bound process on the machine.

A machine running a model is rarely quiet. The lowered model's kernel threads must not make it suffer more from a
busy core than the float model does (a thread that spins or waits for a taken core stalls every layer). For each
model: latency of the float model (plain onnxruntime) and of the lowered one (onnxopt.session), timed in
alternating blocks, first on a quiet machine, then with one busy process (a Python loop) beside them. Printed: each
side's slowdown under the hog and their quotient (lowered slowdown / float slowdown; ≤ 1 means the lowered model
suffers no more than float; the goal is ≤ 1.5). The native library runs its kernels on onnxruntime's own pool.
Models (every conv but the stem binarized; depthwise convs stay float): the sample CNN and real third-party ones,
PP-OCR v2 cls, PP-OCR v4 rec, YOLOv8n at 320, the plain-torch ResNet-18 (legacy export; random weights: latency
only), fetched or built as benchmarks/models_users_bring.py does. Goals: no model slower than float, ResNet-18 2x.

    python benchmarks/cpu_hog.py [--cache DIR] [--batch 1]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from common import alternating_ms
from models_users_bring import fetch, model_path, photo, stem, text_lines

import onnxopt
from onnxopt.runtime import native

ROOT = Path(__file__).resolve().parent.parent


def models(cache: Path, batch: int):
    """(name, float model path, lowered model, feeds) per model."""
    test = np.load(ROOT / "models" / "cnn_test.npz")["input"][:batch]
    yield "sample CNN", ROOT / "models" / "cnn.onnx", ["first_conv"], {"input": test}
    folders = fetch(cache)
    for name, feed in (("ppocr_cls", {"x": text_lines(batch, 48, 192, rotate=True)}),
                       ("ppocr_rec", {"x": text_lines(batch, 48, 320)}),
                       ("yolov8n_320", {"images": np.repeat(photo(320), batch, 0)}),
                       ("resnet18_legacy", {"input": np.repeat(photo(224, imagenet=True), batch, 0)})):
        path = model_path(name, folders, cache)
        model = onnx.load(str(path))
        dim = model.graph.input[0].type.tensor_type.shape.dim[0]
        if batch > 1 and dim.HasField("dim_value"):  # an export with batch 1 fixed: the same graph, batch symbolic
            dim.dim_param = "N"
            path = cache / "batched" / path.name
            path.parent.mkdir(exist_ok=True)
            onnx.save(model, path)
        yield name, path, [stem(model)], feed


def timed(sessions, feed):
    return alternating_ms([lambda s=s: s.run(None, feed) for s in sessions], rounds=5, block=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "onnxopt-models")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    print(f"{native.path()}, {os.cpu_count()} cores, batch {args.batch}; ms are medians")
    print("| model | float quiet | lowered quiet | speed-up | float hog | lowered hog | float slowdown "
          "| lowered slowdown | quotient |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, path, skip, feed in models(args.cache, args.batch):
        lowered, _ = onnxopt.binarize(str(path), skip=skip)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        plain = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        fast = onnxopt.session(lowered)
        quiet = timed([plain, fast], feed)
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            busy = timed([plain, fast], feed)
        finally:
            hog.kill()
            hog.wait()
        f_slow, l_slow = busy[0] / quiet[0], busy[1] / quiet[1]
        print(f"| {name} | {quiet[0]:.2f} | {quiet[1]:.2f} | {quiet[0] / quiet[1]:.2f}x | {busy[0]:.2f} | "
              f"{busy[1]:.2f} | {f_slow:.2f}x | {l_slow:.2f}x | {l_slow / f_slow:.2f} |", flush=True)


if __name__ == "__main__":
    main()
