"""`factor --budget` against the best uniform rank at equal parameters, plain and with calibration.

For each sample model and budget fraction B (of the factorable layers' dense parameters):
- uniform: every layer at rank round(r·min(m,n)) (a layer where that saves nothing stays dense, as `factor`
  does), for the three largest r on a 0.01 grid whose parameters fit in B; the best held-out accuracy of the
  three is the "best uniform";
- budget: `factor --budget params=B`.
Both plain (SVD of W) and calibrated (whitened SVD on the 256-row calibration split). Accuracy on the held-out
1,000 digits, never used for calibration.

    python benchmarks/budget.py [--budgets 0.2 0.3 0.5] [--models mlp token_mlp tiny_vit]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from onnxopt import api
from onnxopt.passes.factor import budget
from onnxopt.passes.factor import dense as factor
from onnxopt.passes.factor.options import FactorOptions
from onnxopt.pipeline.options import SelectOptions
from onnxopt.runtime import run

MODELS = Path(__file__).resolve().parent.parent / "models"
DATA = {"mlp": "mlp", "token_mlp": "cnn", "tiny_vit": "cnn"}  # whose .npz splits feed the model


def accuracy(model, data) -> float:
    logits = next(iter(run(model, {"input": data["input"]}).values()))
    return float((logits.argmax(1) == data["label"]).mean())


def uniform_params(layers, r: float, keep: str | None) -> int:
    total = 0
    for x in layers:
        k = max(1, round(r * min(x.m, x.n)))
        total += x.cost("params", k if k <= x.max_rank and x.name != keep else None)
    return total


def best_uniform(path, layers, fraction, test, calibration, keep=None) -> tuple[float, float, int]:
    """(accuracy, r, params) of the best of the three largest uniform ranks that fit the budget; `keep`: a
    layer left dense (the logits layer, as a user who knows it is fragile would)."""
    dense = sum(x.cost("params", None) for x in layers)
    fitting = [r for r in np.arange(1, 101) / 100 if uniform_params(layers, r, keep) <= fraction * dense][-3:]
    results = []
    for r in fitting:
        model, _ = api.factor(str(path), rank=f"{r:.2f}", calibration=calibration, skip=[keep] if keep else [])
        results.append((accuracy(model, test), float(r), uniform_params(layers, r, keep)))
    return max(results) if results else (float("nan"), float("nan"), 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.2, 0.3, 0.5])
    parser.add_argument("--models", nargs="+", default=list(DATA))
    args = parser.parse_args()
    print("| model | budget | calibration | float | best uniform (r, params) | best uniform, logits layer dense | "
          "budgeted (params) | budgeted - best uniform |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        path = MODELS / f"{name}.onnx"
        test = dict(np.load(MODELS / f"{DATA[name]}_test.npz"))
        calib = str(MODELS / f"{DATA[name]}_calib.npz")
        layers, _ = budget.collect(api._source(str(path))[0], factor.rules(FactorOptions(rank="0.5")),
                                   SelectOptions().selection())
        float_acc = accuracy(str(path), test)
        for fraction in args.budgets:
            for calibration in (None, calib):
                u_acc, r, u_params = best_uniform(path, layers, fraction, test, calibration)
                k_acc, kr, k_params = best_uniform(path, layers, fraction, test, calibration, keep=layers[-1].name)
                model, report = api.factor(str(path), budget=f"params={fraction}", calibration=calibration)
                b_acc = accuracy(model, test)
                print(f"| {name} | {fraction} | {'yes' if calibration else 'no'} | {float_acc:.4f} | "
                      f"{u_acc:.4f} (r={r:.2f}, {u_params:,}) | {k_acc:.4f} (r={kr:.2f}, {k_params:,}) | "
                      f"{b_acc:.4f} ({report.budget['used']:,}) | {b_acc - max(u_acc, k_acc):+.4f} |", flush=True)


if __name__ == "__main__":
    main()
