"""Recovery on real vision models (issue 31): PP-OCR v4 rec `factor --budget params=0.5` and PP-OCR v4 det
`prune --keep 0.5` (and `binarize`), each with no recovery, calibration, and fine-tuning by distillation, on
rendered inputs. Fine-tuning and calibration read their own rendered set; every figure is on a held-out set rendered
from other random strings (another seed), never used for either.

    python benchmarks/recovery_ocr.py [--cache DIR] [--train 2000] [--steps 1000] [--max-time 1200] [--batch-size 8]
                                      [--only rec|det] [--only-finetune] [--no-binarize]
                                      [--distill outputs|layers|both] [--lr X]

rec: the share of held-out lines whose greedy CTC decoding equals the float model's (goal >= 95%).
det: the IoU of the text masks (probability > 0.3) with the float model's on held-out pages (goal >= 0.9).
"""
from __future__ import annotations

import argparse
import string
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from models_users_bring import fetch, lines_read_the_same, model_path, stem, text_mask_iou

import onnxopt
from onnxopt import api

CHARS = string.ascii_letters + string.digits + " .,:-/()%"


def random_lines(n: int, seed: int, height: int = 48, width: int = 320) -> np.ndarray:
    """n rendered lines of random text (3-24 characters, font 18-30 px, varied offset, shade and noise), PaddleOCR's
    rec normalization, NCHW."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = "".join(rng.choice(list(CHARS), int(rng.integers(3, 25))))
        font = ImageFont.load_default(size=int(rng.integers(18, 31)))
        paper = int(rng.integers(190, 256))
        tint = (paper, paper - int(rng.integers(0, 15)), paper - int(rng.integers(0, 25)))
        img = Image.new("RGB", (width, height), tint)
        ink = int(rng.integers(0, 80))
        ImageDraw.Draw(img).text((int(rng.integers(2, 20)), int(rng.integers(2, 14))), text, fill=(ink, ink, ink + 20),
                                 font=font)
        pixels = np.asarray(img, np.float32) + rng.normal(0, 4, (height, width, 3))
        out.append(np.clip(pixels, 0, 255).transpose(2, 0, 1))
    return ((np.stack(out) / 255 - 0.5) / 0.5).astype(np.float32)


def random_pages(n: int, seed: int, height: int = 320, width: int = 320) -> np.ndarray:
    """n pages with 2-5 lines of random text each, ImageNet normalization as PaddleOCR's det expects."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        paper = int(rng.integers(200, 256))
        img = Image.new("RGB", (width, height), (paper, paper - 5, paper - 15))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            text = "".join(rng.choice(list(CHARS), int(rng.integers(4, 18))))
            font = ImageFont.load_default(size=int(rng.integers(16, 34)))
            ink = int(rng.integers(0, 70))
            draw.text((int(rng.integers(0, width // 2)), int(rng.integers(0, height - 40))), text, fill=(ink,) * 3,
                      font=font)
        out.append(np.asarray(img, np.float32) / 255)
    x = (np.stack(out) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    return x.transpose(0, 3, 1, 2).astype(np.float32)


def run(model, x: np.ndarray, name: str, batch: int = 32) -> np.ndarray:
    session = onnxopt.session(model)
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def rec_score(reference: np.ndarray, candidate: np.ndarray) -> str:
    return f"{lines_read_the_same(reference, candidate):.1%} of lines read the same"


def det_score(reference: np.ndarray, candidate: np.ndarray) -> str:
    return f"text-mask IoU {text_mask_iou(reference, candidate):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "onnxopt-models")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--max-time", type=float, default=1200)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int, default=8, help="fine-tune batch (64 lines of 48x320: ~10 s a step)")
    parser.add_argument("--holdout", type=float, default=0.05)
    parser.add_argument("--only", choices=["rec", "det"])
    parser.add_argument("--distill", choices=["outputs", "layers", "both"], default="both")
    parser.add_argument("--only-finetune", action="store_true", help="skip the no-recovery and calibration rows")
    parser.add_argument("--no-binarize", action="store_true", help="only the factor (rec) and prune (det) rows")
    args = parser.parse_args()
    folders = fetch(args.cache)
    cases = [("rec", "ppocr_rec", random_lines, rec_score, [("factor", {"budget": "params=0.5"}),
                                                            ("binarize", {})]),
             ("det", "ppocr_det", random_pages, det_score, [("prune", {"keep": 0.5}), ("binarize", {})])]
    with tempfile.TemporaryDirectory() as tmp:
        for key, name, render, score, commands in cases:
            if args.only and args.only != key:
                continue
            path = model_path(name, folders, args.cache)
            train, calib, held = render(args.train, 1), render(128, 2), render(args.held_out, 3)
            np.savez(Path(tmp) / "train.npz", x=train)
            np.savez(Path(tmp) / "calib.npz", x=calib)
            reference = run(path, held, "x")
            tune = {"steps": args.steps, "max_time": args.max_time, "batch_size": args.batch_size,
                    "holdout": args.holdout, "distill": args.distill, **({"lr": args.lr} if args.lr else {})}
            for command, options in commands:
                if command == "binarize" and args.no_binarize:
                    continue
                if command == "binarize":
                    options = {"skip": [stem(onnx.load(str(path)))]}
                for label, extra in (("no recovery", {}), ("calibration", {"calibration": Path(tmp) / "calib.npz"}),
                                     ("fine-tune", {"finetune": Path(tmp) / "train.npz", **tune})):
                    if command == "prune" and label == "calibration":
                        continue  # prune has no calibration refit
                    if args.only_finetune and label != "fine-tune":
                        continue
                    start = time.perf_counter()
                    try:
                        model, report = getattr(api, command)(str(path), **options, **extra)
                    except onnxopt.OnnxoptError as exc:
                        print(f"{name} {command} {label}: refused: {exc}", flush=True)
                        continue
                    took = time.perf_counter() - start
                    ft = getattr(report, "finetune", None) or {}
                    how = (f", {ft['steps']} steps ({ft['stopped']}), lr {ft['lr']:g}, held-out loss "
                           f"{ft['loss_before']:.4f} -> {ft['loss_after']:.4f}, {ft['loss']}" if ft else "")
                    print(f"{name} {command} {options} {label}: {score(reference, run(model, held, 'x'))} "
                          f"({took:.0f} s{how})", flush=True)


if __name__ == "__main__":
    main()
