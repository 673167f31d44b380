"""Measures for gates, searches and compare: a candidate model against the input model, on the same inputs.

Scores: with labels the score is top-1 accuracy; without, top-1 agreement with the input model's own predictions,
which needs class scores ((samples, classes) outputs). The drop is the input model's score minus the
candidate's: the input model scores 1.0 against itself in agreement.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import onnx

from ..errors import OnnxoptError, UsageError
from . import feeds_from, output_differences, run, session

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


def alternating_latency(a, b, feeds: dict[str, np.ndarray], *, rounds: int = 7, block_seconds: float = 0.02,
                        warmup: int = 3) -> dict:
    """Median milliseconds per call of models a and b on the same feeds, timed in alternating blocks (a b, b a,
    ...) after warm-up, so that the machine's noise lands on both sides of the ratio; a block is as many calls
    as take about `block_seconds` (at least 3). `spread`: the ratio's range over the rounds."""
    sessions = [session(a), session(b)]
    slowest = 0.0
    for sess in sessions:
        for _ in range(warmup):
            start = time.perf_counter()
            sess.run(None, feeds)
        slowest = max(slowest, time.perf_counter() - start)
    block = max(3, int(block_seconds / max(slowest, 1e-6)))
    times: list[list[float]] = [[], []]
    for r in range(rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            start = time.perf_counter()
            for _ in range(block):
                sessions[i].run(None, feeds)
            times[i].append((time.perf_counter() - start) / block * 1e3)
    ratios = [x / y for x, y in zip(*times)]
    a_ms, b_ms = statistics.median(times[0]), statistics.median(times[1])
    return {"samples": len(next(iter(feeds.values()))), "a_ms": a_ms, "b_ms": b_ms, "speedup": a_ms / b_ms,
            "spread": [min(ratios), max(ratios)]}


def compare_models(a: onnx.ModelProto, b: onnx.ModelProto, data_path, *, labels: str | None = None) -> dict:
    """A vs B on the inputs in `data_path`: accuracy (with labels), top-1 agreement (class-score outputs only),
    output differences, and latency timed in alternating blocks (measure.alternating_latency). Each model runs
    once on the data besides the timing."""
    feeds = feeds_from(data_path, a)
    outs = {}
    for tag, model in (("A", a), ("B", b)):
        try:
            outs[tag] = run(model, feeds)
        except OnnxoptError as exc:
            raise OnnxoptError(f"{tag}: {exc}") from None
    scorer = Scorer(a, data_path, labels, feeds=feeds, outputs=outs["A"])
    latency = alternating_latency(a, b, scorer.feeds)
    classes = scorer.metric is not None
    score = scorer.drop_of(outs["B"])
    result = {"samples": len(next(iter(scorer.feeds.values()))), "latency": latency}
    for tag, ms in (("A", latency["a_ms"]), ("B", latency["b_ms"])):
        acc = None
        if score and score["metric"] == "accuracy":
            acc = score["reference"] if tag == "A" else score["candidate"]
        result[tag] = {"accuracy": acc, "latency_ms": ms}
    first_name = next(iter(outs["A"]))
    if first_name not in outs["B"]:
        raise OnnxoptError(f"B has no output '{first_name}'")
    result["top1_agreement"] = (float((outs["A"][first_name].argmax(-1) == outs["B"][first_name].argmax(-1)).mean())
                                if classes else None)
    result["outputs"] = output_differences(outs["A"], outs["B"])
    return result
