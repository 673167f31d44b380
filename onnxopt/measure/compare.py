"""Two models side by side: output differences, latency in alternating blocks, the `compare` command."""
from __future__ import annotations

import statistics
import time

import numpy as np
import onnx

from ..errors import OnnxoptError
from ..runtime import run, session
from .feeds import feeds_from
from .scores import Scorer


def compare_outputs(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict:
    """Both models in onnxruntime, graph optimizations off: max abs / rel difference per output."""
    return difference_report(run(reference, feeds, optimize=False), run(candidate, feeds, optimize=False), feeds)


def difference_report(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], feeds,
                      samples: int | None = None) -> dict:
    """{"samples", "outputs": per output max abs/rel difference, "max_rel"} of two models' outputs on `feeds`
    (`samples`: how many inputs they were, when not the feeds' first dim)."""
    if samples is None:
        samples = len(next(iter(feeds.values()))) if feeds else 0
    outputs = output_differences(reference, candidate)
    return {"samples": samples, "outputs": outputs,
            "max_rel": max((v["max_rel"] for v in outputs.values()), default=0.0)}


def output_differences(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict:
    """Max abs difference and max abs difference / max |reference| per output both sides have."""
    diffs = {}
    for name, ref in reference.items():
        got = candidate.get(name)
        if got is None or got.shape != ref.shape:
            continue
        diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        diffs[name] = {"max_abs": diff, "max_rel": diff / scale if scale else diff}
    return diffs




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
