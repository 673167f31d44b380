"""Recovery table: technique x model x (no recovery, calibration, fine-tune on the outputs only, fine-tune layer-wise),
with the time each took. Held-out scores only: fine-tuning reads the first 2,000 images of models/cnn_train.npz
(or mlp_train.npz) with their labels removed; calibration reads models/*_calib.npz; every score is on the 1,000
held-out digits of models/*_test.npz (top-1 accuracy), never seen by either.

    python benchmarks/recovery.py [--only NAME ...] [--lr X] [--temperature T]    # needs torch ('.[train]')

The fine-tune columns use the defaults (1000 steps, warm-up + cosine, 10% held out of the fine-tune data for early
stopping) unless --lr/--temperature are given.
"""
from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    tune = {k: v for k, v in (("lr", args.lr), ("temperature", args.temperature)) if v is not None}
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


if __name__ == "__main__":
    main()
