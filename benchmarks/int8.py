"""`onnxopt quantize` on the sample models: size, held-out accuracy and latency against the float model.

Latency: onnxruntime, float and int8 sessions timed in alternating blocks of ~50 ms, 21 rounds, in the same process
(onnxopt.measure.compare.alternating_latency), batch 1 and batch 8; the median of the rounds and their range.
Accuracy on the 1,000 held-out digits; calibration on the 256-digit split; the --max-drop exclusion (where used)
scores on 1,000 training digits, not on the held-out ones.

    python benchmarks/int8.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxopt import api
from onnxopt.measure.compare import alternating_latency
from onnxopt.runtime import run

MODELS = Path(__file__).resolve().parent.parent / "models"


def accuracy(model, data) -> float:
    logits = next(iter(run(model, {"input": data["input"]}).values()))
    return float((logits.argmax(1) == data["label"]).mean())


def main():
    print("| model | variant | size | held-out accuracy | speed-up b1 (range) | speed-up b8 (range) |")
    print("|---|---|---|---|---|---|")
    for name, data_name in (("mlp", "mlp"), ("cnn", "cnn"), ("tiny_vit", "cnn")):
        source = api._source(str(MODELS / f"{name}.onnx"))[0]
        test = dict(np.load(MODELS / f"{data_name}_test.npz"))
        calib = str(MODELS / f"{data_name}_calib.npz")
        train = dict(np.load(MODELS / f"{data_name}_train.npz"))
        validation = {"input": train["input"][:1000], "label": train["label"][:1000]}
        variants = {"float": source,
                    "int8 dynamic": api.quantize(source)[0],
                    "int8 static": api.quantize(source, calibration=calib)[0],
                    "int8 static per-channel": api.quantize(source, calibration=calib, per_channel=True)[0],
                    "int8 static, --max-drop 0.002 (validation)": api.quantize(
                        source, calibration=calib, data=validation, max_drop=0.002)[0]}
        if name == "mlp":
            factored = api.factor(source, budget="params=0.3", calibration=calib)[0]
            variants["factor params=0.3"] = factored
            variants["factor params=0.3 + int8 static"] = api.quantize(factored, calibration=calib)[0]
        for label, model in variants.items():
            cells = []
            for batch in (1, 8):
                t = alternating_latency(source, model, {"input": test["input"][:batch]}, rounds=21, block_seconds=0.05)
                cells.append(f"{t['speedup']:.2f}x ({t['spread'][0]:.2f}-{t['spread'][1]:.2f})")
            print(f"| {name} | {label} | {model.ByteSize() / 1024:,.0f} KiB | {accuracy(model, test):.4f} | "
                  f"{cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
