"""Scores on held-out data: accuracy with labels, else top-1 agreement with the reference model."""
from __future__ import annotations

import numpy as np
import onnx

from ..errors import OnnxoptError, UsageError
from ..runtime import run
from .feeds import feeds_from

LABEL_KEYS = ("label", "labels")


def load_labels(data, key: str | None) -> np.ndarray | None:
    """The label array of `data` (.npz path or dict): `key`, else 'label'/'labels' if present, else None."""
    if isinstance(data, dict):
        return _pick_labels(list(data), lambda name: np.asarray(data[name]), key, "data")
    with np.load(data, allow_pickle=False) as d:  # one open; members load lazily, so only the labels are read
        return _pick_labels(list(d.files), lambda name: d[name], key, str(data))


def _pick_labels(names: list[str], read, key: str | None, where: str) -> np.ndarray | None:
    if key is not None and key not in names:
        raise OnnxoptError(f"{where}: no array '{key}' for --labels (has: {', '.join(names)})")
    found = key or next((k for k in LABEL_KEYS if k in names), None)
    return None if found is None else read(found)


def checked_labels(labels: np.ndarray, classes: int) -> np.ndarray:
    """Labels as int64 class indices in [0, classes), else a UsageError: string or NaN labels compare unequal to
    every prediction, so both models scored 0.0 and any --max-drop gate passed."""
    if labels.dtype.kind in "iu":
        values = labels.astype(np.int64)
    elif labels.dtype.kind == "f" and np.isfinite(labels).all() and (labels == np.round(labels)).all():
        values = labels.astype(np.int64)  # integral floats (a CSV round trip): the same classes
    else:
        bad = labels.dtype if labels.dtype.kind not in "f" else "NaN, Inf or fractional values"
        raise UsageError(f"labels must be integer class indices, got {bad}")
    if values.size and (values.min() < 0 or values.max() >= classes):
        raise UsageError(f"labels must be class indices in 0..{classes - 1} (the model's first output has {classes} "
                         f"classes), got values {values.min()}..{values.max()}")
    return values


class Scorer:
    """The input model's outputs on `data`, computed once; `drop(model)` scores candidates against them."""

    def __init__(self, reference: onnx.ModelProto, data, labels: str | None = None, *, feeds=None, outputs=None):
        """`feeds`, `outputs`: the data's inputs and the reference's outputs on them, when already at hand."""
        self.feeds = feeds if feeds is not None else feeds_from(data, reference)
        self.labels = load_labels(data, labels)
        self.outputs = outputs if outputs is not None else run(reference, self.feeds)
        first = next(iter(self.outputs.values()))
        samples = len(next(iter(self.feeds.values())))
        if first.ndim != 2 or first.shape[1] < 2:
            self.metric = None  # not class scores: neither accuracy nor agreement means anything
            if self.labels is not None and labels is not None:
                raise UsageError(f"--labels needs class scores (samples, classes) as the first output; "
                                 f"it has shape {list(first.shape)}")
            return
        if self.labels is not None and self.labels.shape != (samples,):
            raise OnnxoptError(f"labels have shape {list(self.labels.shape)}, expected ({samples},) for "
                               f"{samples} samples")
        if self.labels is not None:
            self.labels = checked_labels(self.labels, first.shape[1])
        self.metric = "accuracy" if self.labels is not None else "top-1 agreement"
        self.predictions = first.argmax(1)
        self.reference = self._score(self.predictions)

    def _score(self, predictions: np.ndarray) -> float:
        truth = self.labels if self.labels is not None else self.predictions
        return float((predictions == truth).mean())

    def drop(self, model: onnx.ModelProto) -> dict | None:
        """{"metric", "reference", "candidate", "drop"}, or None when the outputs are not class scores."""
        return self.drop_of(run(model, self.feeds)) if self.metric is not None else None

    def drop_of(self, outputs: dict[str, np.ndarray]) -> dict | None:
        """The same, for a candidate's outputs already computed on `self.feeds`."""
        if self.metric is None:
            return None
        candidate = self._score(next(iter(outputs.values())).argmax(1))
        return {"metric": self.metric, "samples": len(self.predictions), "reference": self.reference,
                "candidate": candidate, "drop": self.reference - candidate}


def require_scores(scorer: Scorer, flag: str = "--max-drop") -> None:
    if scorer.metric is None:
        raise UsageError(f"{flag} needs class scores (samples, classes) as the model's first output")
