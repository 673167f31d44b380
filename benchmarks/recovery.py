"""Recovery table: technique x model x (no recovery, calibration, fine-tune on the outputs only, fine-tune layer-wise),
with the time each took. Held-out scores only: fine-tuning reads the first 2,000 images of models/cnn_train.npz
(or mlp_train.npz) with their labels removed; calibration reads models/*_calib.npz; every score is on the 1,000
held-out digits of models/*_test.npz (top-1 accuracy), never seen by either.

    python benchmarks/recovery.py [--only NAME ...] [--lr X] [--temperature T] [--steps N]   # needs torch ('.[train]')
    git worktree add /tmp/old 6ca2580 && python benchmarks/recovery.py --short --baseline /tmp/old  # vs old default

The fine-tune columns use the defaults (1000 steps, warm-up + cosine, 10% held out of the fine-tune data for early
stopping) unless --lr/--temperature/--steps are given.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxopt import api  # noqa: E402

MODELS = ROOT / "models"
# name, command, model, options, the digits its data comes from
CASES = [
    ("cnn 1-bit", "binarize", "cnn", {"skip": ["first_conv"]}, "cnn"),
    ("mlp factor 5% params", "factor", "mlp", {"budget": "params=0.05"}, "mlp"),
    ("token_mlp factor rank 0.3", "factor", "token_mlp", {"rank": "0.3"}, "cnn"),
    ("tiny_vit factor rank 0.3", "factor", "tiny_vit", {"rank": "0.3"}, "cnn"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="case names (substrings) to run")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--short", action="store_true", help="short runs of the new schedule on the CNN, with "
                        "--baseline against the old default in that checkout")
    parser.add_argument("--baseline", type=Path, help="a checkout of the code before issue 31 (for --short)")
    args = parser.parse_args()
    tune = {k: v for k, v in (("lr", args.lr), ("temperature", args.temperature), ("steps", args.steps))
            if v is not None}
    if args.short:
        short_runs(args.baseline)
        return
    print("| case | float | no recovery | calibration | fine-tune outputs | fine-tune layer-wise |")
    print("|---|---|---|---|---|---|")
    for title, command, model, options, digits in CASES:
        if args.only and not any(o in title for o in args.only):
            continue
        with np.load(MODELS / f"{digits}_train.npz") as d:
            data = {"input": d["input"][:2000]}
        columns = [("no recovery", {}), ("calibration", {"calibration": MODELS / f"{digits}_calib.npz"}),
                   ("outputs", {"finetune": data, "distill": "outputs", **tune}),
                   ("layers", {"finetune": data, "distill": "both", **tune})]
        cells, reference = [], None
        for _, extra in columns:
            start = time.perf_counter()
            _, report = getattr(api, command)(MODELS / f"{model}.onnx", data=MODELS / f"{digits}_test.npz",
                                              **options, **extra)
            score = report.check["score"]
            reference = score["reference"]
            cells.append(f"{score['candidate']:.3f} ({time.perf_counter() - start:.0f} s)")
        print(f"| {title} | {reference:.3f} | " + " | ".join(cells) + " |", flush=True)


CHILD = """
import json, sys, time
from onnxopt import api
options = json.loads(sys.argv[1])
start = time.perf_counter()
models = sys.argv[2] + "/models/"
_, report = api.binarize(models + "cnn.onnx", skip=["first_conv"], data=models + "cnn_test.npz", finetune=sys.argv[3],
                         **options)
took = time.perf_counter() - start
print(json.dumps([report.check["score"]["candidate"], took, (report.finetune or {}).get("steps")]))
"""


def short_runs(baseline: Path | None) -> None:
    """The binarized CNN's held-out accuracy and the time of `binarize --finetune`: short runs of the new schedule
    and, with --baseline CHECKOUT (e.g. `git worktree add /tmp/old 6ca2580`, the code before issue 31), the old
    default there. Each run is a fresh process (each pays torch's one-time imports), twice, alternating, so that
    every variant sees the same machine state."""
    import json
    import subprocess
    import tempfile

    runs = {"--steps 100 --distill outputs": (ROOT, {"steps": 100, "distill": "outputs"}),
            "--steps 150 --distill outputs": (ROOT, {"steps": 150, "distill": "outputs"})}
    if baseline:
        runs = {"old default (3 epochs, outputs, lr 0.001, T 4), old code": (baseline, {}), **runs}
    results = {label: [] for label in runs}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "cnn_2k.npz"
        with np.load(MODELS / "cnn_train.npz") as d:
            np.savez(data, input=d["input"][:2000])
        for _ in range(2):
            for label, (code, options) in runs.items():
                out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(options), str(ROOT), str(data)],
                                     env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True, text=True,
                                     check=True, cwd=tmp)
                results[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| cnn 1-bit, binarize --finetune | held-out top-1 | seconds (each run) | steps |")
    print("|---|---|---|---|")
    for label, got in results.items():
        print(f"| {label} | {' / '.join(f'{a:.3f}' for a, _, _ in got)} | "
              f"{' / '.join(f'{t:.1f}' for _, t, _ in got)} | {got[0][2]} |")


if __name__ == "__main__":
    main()
