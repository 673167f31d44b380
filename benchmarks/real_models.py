"""`factor` (convs and dense layers) on real exported graphs: does it run, is the output valid, how much of the
whole model's weights does it remove, and how far do the outputs move (random weights for resnet18).

- resnet18 written in plain torch (torchvision's wheels do not load against torch 2.13 here), exported by the
  legacy and by the dynamo exporter (needs `pip install torch==2.13.0 onnxscript`);
- any .onnx given with --model (e.g. PaddleOCR det/rec/cls from the `rapidocr-onnxruntime` wheel, the YOLOv8n
  detector `320n.onnx` from the `nudenet` wheel: `pip download --no-deps`, then unzip).

    python benchmarks/real_models.py [--model PATH[@NAME:D1,D2,...] ...] [--rank 0.5] [--skip-torch]

(`@NAME:dims` gives a symbolic input its size, as `--input-shape`: PaddleOCR's det takes `@x:1,3,320,320`.)
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt import api
from onnxopt.measure.feeds import random_feeds
from onnxopt.pipeline.options import ShapeOptions
from onnxopt.runtime import run


def weights(model: onnx.ModelProto) -> int:
    """Every constant element of the model: initializers and Constant nodes."""
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    total += int(numpy_helper.to_array(a.t).size)
    return total


def resnet18_exports(folder: Path, width: int = 64, size: int = 224, classes: int = 1000,
                     exporters: tuple[str, ...] = ("legacy", "dynamo"), dynamic_batch: bool = False) -> list[Path]:
    """torchvision's resnet18 layout and module names (models/reference_nets.py), `width` channels in the first
    stage, exported by these exporters (batch 1, or a dynamic batch from the legacy one)."""
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from models.reference_nets import ResNet18

    torch.manual_seed(0)
    model = ResNet18(width, classes).eval()
    x = torch.randn(1, 3, size, size)
    paths = []
    for exporter in exporters:
        dynamo = exporter == "dynamo"
        path = folder / f"resnet18_{exporter}.onnx"
        legacy = {"opset_version": 17, **({"dynamic_axes": {"input": {0: "batch"}}} if dynamic_batch else {})}
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["input"], output_names=["logits"],
                          **({"external_data": False} if dynamo else legacy))
        paths.append(path)
    return paths


def tiny_bert_export(folder: Path) -> Path:
    """A BERT-shaped encoder (token, position and type embeddings, 2 post-norm layers with GELU FFNs, a pooler and
    a 2-class head), hidden 128, vocab 1,000, exported by the dynamo exporter with a dynamic sequence length:
    int64 input_ids / attention_mask, the case where random check inputs and FLOPs need --input-shape."""
    import torch
    from torch import nn

    class TinyBert(nn.Module):
        def __init__(self, vocab=1000, hidden=128, heads=4, layers=2, positions=64):
            super().__init__()
            self.word_embeddings = nn.Embedding(vocab, hidden)
            self.position_embeddings = nn.Embedding(positions, hidden)
            self.norm = nn.LayerNorm(hidden)
            layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, activation="gelu", batch_first=True,
                                               dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.pooler = nn.Linear(hidden, hidden)
            self.classifier = nn.Linear(hidden, 2)

        def forward(self, input_ids, attention_mask):
            positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
            x = self.norm(self.word_embeddings(input_ids) + self.position_embeddings(positions))
            x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
            return self.classifier(torch.tanh(self.pooler(x[:, 0])))

    torch.manual_seed(0)
    model = TinyBert().eval()
    ids, mask = torch.ones(1, 16, dtype=torch.int64), torch.ones(1, 16, dtype=torch.int64)
    path = folder / "tiny_bert_dynamo.onnx"
    seq = torch.export.Dim("seq", min=2, max=64)
    torch.onnx.export(model, (ids, mask), str(path), dynamo=True, external_data=False,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_shapes=({1: seq}, {1: seq}))
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="*", default=[])
    parser.add_argument("--rank", default="0.5")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--write-test-models", metavar="DIR", help="write the tiny resnets the tests use, and stop")
    args = parser.parse_args()
    if args.write_test_models:  # the module names of resnet18 at 1/16 of its width: a few hundred KB
        for path in resnet18_exports(Path(args.write_test_models), width=4, size=32, classes=10):
            path.rename(path.with_name(path.name.replace("resnet18", "resnet18_tiny")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        paths = [] if args.skip_torch else resnet18_exports(Path(tmp)) + [tiny_bert_export(Path(tmp))]
        shapes = {paths[-1]: ["input_ids:1,16", "attention_mask:1,16"]} if paths else {}
        for spec in args.model:
            path, _, shape = spec.partition("@")  # PATH@NAME:dims[@NAME:dims...]
            paths.append(Path(path))
            shapes[Path(path)] = shape.split("@") if shape else []
        print(f"| model | weights before | after `--rank {args.rank}` | convs factored (channel/tucker/spatial) | "
              "dense factored | left alone | valid, runs | max rel output diff |")
        print("|---|---|---|---|---|---|---|---|")
        for path in paths:
            source = api._source(str(path))[0]
            given = shapes.get(path, [])
            new, report = api.factor(source, rank=args.rank, input_shape=given)
            onnx.checker.check_model(new)
            feeds = random_feeds(source, 1, shapes=ShapeOptions(input_shape=tuple(given)).shapes)
            a, b = run(source, feeds), run(new, feeds)
            rel = max(float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(a[k])), 1e-12)) for k in a)
            modes = [x.action for x in report.changed if x.op_type == "Conv"]
            counts = "/".join(str(sum(m == f"factored ({k})" for m in modes)) for k in ("channel", "tucker", "spatial"))
            dense = sum(x.op_type != "Conv" for x in report.changed)
            print(f"| {path.name} | {weights(source):,} | {weights(new):,} ({weights(new) / weights(source):.0%}) | "
                  f"{counts} | {dense} | {len(report.layers) - len(report.changed)} | yes | {rel:.3g} |", flush=True)


if __name__ == "__main__":
    main()
