"""Reference networks in plain torch (torchvision's wheels do not load against torch 2.13 here): resnet18 and
mobilenet_v2 with torchvision's layouts and module names, and a YOLOv8-style detector (Conv-BN-SiLU, C2f blocks
with Split/Concat and residual Adds, SPPF max-pools, nearest Resize, a detection head). Random weights: they
are for mechanics (does a pass or fine-tuning run through the graph), not accuracy.

    python models/reference_nets.py --write-test-models tests/data   # the small exports the tests read

Needs torch (and onnxscript for the dynamo exporter).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU6):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         act() if act else nn.Identity())


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision's resnet18 (conv1, bn1, layer1.0.conv1, ..., fc) with `width` channels in the first stage."""

    def __init__(self, width: int = 64, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        w = width
        for i, (cin, cout, stride) in enumerate([(w, w, 1), (w, 2 * w, 2), (2 * w, 4 * w, 2), (4 * w, 8 * w, 2)], 1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
        self.fc = nn.Linear(8 * width, classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 (features.N, classifier.1): depthwise convs, ReLU6 (Clip), residual Adds."""

    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]

    def __init__(self, width: float = 1.0, classes: int = 1000):
        super().__init__()
        cin = int(32 * width)
        features = [conv_bn(3, cin, 3, 2)]
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(cin, int(c * width), s if i == 0 else 1, t))
                cin = int(c * width)
        last = max(1280, int(1280 * width)) if width > 1 else int(1280 * max(width, 0.25))
        features.append(conv_bn(cin, last, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class YoloConv(nn.Module):
    def __init__(self, cin, cout, k=1, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn, self.act = nn.BatchNorm2d(cout), nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class C2f(nn.Module):
    """YOLOv8's C2f: split in two, a chain of residual bottlenecks on one half, concat everything, 1x1 conv."""

    def __init__(self, cin, cout, n=1):
        super().__init__()
        self.c = cout // 2
        self.cv1, self.cv2 = YoloConv(cin, 2 * self.c), YoloConv((2 + n) * self.c, cout)
        self.m = nn.ModuleList(nn.Sequential(YoloConv(self.c, self.c, 3), YoloConv(self.c, self.c, 3))
                               for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class YoloStyle(nn.Module):
    """A YOLOv8n-shaped detector: backbone of strided convs and C2f, SPPF, an upsampling neck, one head."""

    def __init__(self, w: int = 16, outputs: int = 84):
        super().__init__()
        self.stem = nn.Sequential(YoloConv(3, w, 3, 2), YoloConv(w, 2 * w, 3, 2), C2f(2 * w, 2 * w))
        self.down = nn.Sequential(YoloConv(2 * w, 4 * w, 3, 2), C2f(4 * w, 4 * w, 2))
        self.sppf_in, self.sppf_out = YoloConv(4 * w, 2 * w), YoloConv(8 * w, 4 * w)
        self.neck = C2f(6 * w, 2 * w)
        self.head = nn.Sequential(YoloConv(2 * w, 2 * w, 3), nn.Conv2d(2 * w, outputs, 1))

    def forward(self, x):
        p3 = self.stem(x)
        p4 = self.down(p3)
        y = [self.sppf_in(p4)]
        for _ in range(3):
            y.append(nn.functional.max_pool2d(y[-1], 5, 1, 2))
        p4 = self.sppf_out(torch.cat(y, 1))
        up = nn.functional.interpolate(p4, scale_factor=2.0, mode="nearest")
        out = self.head(self.neck(torch.cat([up, p3], 1)))
        return out.flatten(2)  # (batch, outputs, anchors), as YOLOv8's raw output


def export(model: nn.Module, path: Path, size: int, *, dynamo: bool = False) -> Path:
    """Export with random weights and BN statistics that are not the identity (so folding them is tested)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(1, 3, size, size)
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["input"], output_names=["output"],
                      **({"external_data": False} if dynamo else {"opset_version": 17}))
    return path


TEST_MODELS = {  # name: (constructor, input size, exporters); small, for the tests (tests/data)
    "mobilenet_v2_tiny": (lambda: MobileNetV2(width=0.25, classes=10), 32, (False, True)),
    "yolo_tiny": (lambda: YoloStyle(w=8, outputs=20), 64, (False,)),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-test-models", metavar="DIR", type=Path, required=True)
    args = parser.parse_args()
    for name, (make, size, exporters) in TEST_MODELS.items():
        for dynamo in exporters:
            torch.manual_seed(0)
            path = export(make(), args.write_test_models / f"{name}_{'dynamo' if dynamo else 'legacy'}.onnx", size,
                          dynamo=dynamo)
            print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
