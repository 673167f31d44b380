"""Scores for gates and budget searches: a candidate model against the input model, on the same inputs.

With labels the score is top-1 accuracy; without, top-1 agreement with the input model's own predictions,
which needs class scores ((samples, classes) outputs). The drop is the input model's score minus the
candidate's: the input model scores 1.0 against itself in agreement.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..errors import OnnxoptError, UsageError
from . import feeds_from, graph_inputs, run

LABEL_KEYS = ("label", "labels")


def _labels(data, key: str | None) -> np.ndarray | None:
    """The label array of `data` (.npz path or dict): `key`, else 'label'/'labels' if present, else None."""
    if isinstance(data, dict):
        names = list(data)
    else:
        with np.load(data, allow_pickle=False) as d:
            names = list(d.files)
    if key is not None and key not in names:
        where = "data" if isinstance(data, dict) else str(data)
        raise OnnxoptError(f"{where}: no array '{key}' for --labels (has: {', '.join(names)})")
    found = key or next((k for k in LABEL_KEYS if k in names), None)
    if found is None:
        return None
    if isinstance(data, dict):
        return np.asarray(data[found])
    with np.load(data, allow_pickle=False) as d:
        return d[found]


class Scorer:
    """The input model's predictions on `data`, computed once; `drop(model)` scores candidates against them."""

    def __init__(self, reference: onnx.ModelProto, data, labels: str | None = None):
        feeds = feeds_from(data, reference)
        self.feeds = {k: v for k, v in feeds.items() if k in graph_inputs(reference)}
        self.labels = _labels(data, labels)
        first = next(iter(run(reference, self.feeds).values()))
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
        self.metric = "accuracy" if self.labels is not None else "top-1 agreement"
        self.predictions = first.argmax(1)
        self.reference = self._score(self.predictions)

    def _score(self, predictions: np.ndarray) -> float:
        truth = self.labels if self.labels is not None else self.predictions
        return float((predictions == truth).mean())

    def drop(self, model: onnx.ModelProto) -> dict | None:
        """{"metric", "reference", "candidate", "drop"}, or None when the outputs are not class scores."""
        if self.metric is None:
            return None
        candidate = self._score(next(iter(run(model, self.feeds).values())).argmax(1))
        return {"metric": self.metric, "samples": len(self.predictions), "reference": self.reference,
                "candidate": candidate, "drop": self.reference - candidate}


def require_scores(scorer: Scorer, flag: str = "--max-drop") -> None:
    if scorer.metric is None:
        raise UsageError(f"{flag} needs class scores (samples, classes) as the model's first output")
