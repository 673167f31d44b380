"""Fine-tuning by distillation: the transformed model (student) learns the input model's (teacher's) outputs.

- Teacher: the float model before the rewrite, run in onnxruntime (its outputs are computed once per sample
  and kept when they fit in TEACHER_CACHE_BYTES, else recomputed per batch).
- Student: the transformed graph run in torch (torch_graph.py); its weight initializers are trained (factored
  U and V, latent binary weights through the straight-through estimator, α, biases, normalization scale and
  shift; BatchNormalization statistics stay frozen: the stored ones are what the exported graph computes with).
- Loss per float output: class scores (samples × classes) → KL(softmax(t/T) ‖ softmax(s/T))·T² (Hinton et al.;
  outputs that already are probabilities are compared as they are); any other output → mean squared error
  divided by the teacher output's mean square (so outputs of different scales weigh alike). With labels, plus
  cross-entropy on the first class-score output.
- Adam, learning rate decayed to 0 on a cosine; the data order is a seeded permutation per epoch, so a run
  is deterministic for a seed on one machine.

The trained values go back into the same initializers: nodes, names, shapes and dtypes are unchanged.
"""
from __future__ import annotations

import math
import time

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OnnxoptError
from ..graph.nodes import copy_model
from ..measure.feeds import feeds_from
from ..measure.scores import load_labels
from ..runtime import graph_inputs, session

TEACHER_CACHE_BYTES = 2 << 30


class _Tick:
    """A progress item whose text a progress bar can show (`progress_text`): epoch, batch, running loss."""

    def __init__(self, state: dict, batch: int):
        self.state, self.batch = state, batch

    @property
    def progress_text(self) -> str:
        s = self.state
        return f"batch {self.batch}/{s['batches']}  loss {s['loss']:.4f}" if s["loss"] is not None else ""


def finetune(teacher: onnx.ModelProto, student: onnx.ModelProto, options, *, labels: str | None = None,
             progress=None) -> tuple[onnx.ModelProto, dict]:
    """The student with its weights trained to match the teacher on `options.finetune` (FinetuneOptions);
    returns (trained model, summary for the report)."""
    import torch

    from .torch_graph import GraphModule, trainable_initializers, unsupported_ops

    feeds = _training_feeds(teacher, student, options.finetune)
    samples = len(next(iter(feeds.values())))
    truth = _labels(options.finetune, labels, samples)
    missing = unsupported_ops(student)
    if missing:
        hint = " (fine-tune before lowering: --stage transform)" if any("BitConv" in m for m in missing) else ""
        raise OnnxoptError(f"cannot fine-tune through {', '.join(missing)}: onnxopt has no torch form for "
                           f"{'it' if len(missing) == 1 else 'them'}{hint}; use --train-hook instead")
    trainable = trainable_initializers(student)
    if not trainable:
        raise OnnxoptError("nothing to fine-tune: the model has no float weight initializers")
    torch.manual_seed(options.finetune_seed)
    module = GraphModule(student, trainable)
    targets = _Teacher(teacher, feeds, options.batch_size)
    loss_fn = _DistillationLoss(targets.output_kinds(), options.temperature)
    start = time.perf_counter()
    before = _mean_loss(module, feeds, targets, loss_fn, truth, options.batch_size)
    epochs = _train(module, feeds, targets, loss_fn, truth, options, progress)
    after = _mean_loss(module, feeds, targets, loss_fn, truth, options.batch_size)
    kept = after < before  # training that made the model worse (too high a rate, too little data) is not kept
    trained = _write_back(student, module.trained_values()) if kept else student
    return trained, {"kept": kept,
        "samples": samples, "epochs": epochs, "loss_before": before, "loss_after": after,
        "labels": truth is not None, "trained_tensors": len(trainable),
        "trained_params": int(sum(p.numel() for p in module.weights)), "seconds": time.perf_counter() - start,
        "batch_size": options.batch_size, "lr": options.lr, "temperature": options.temperature,
        "loss": " + ".join(loss_fn.describe() + (["cross-entropy"] if truth is not None else [])),
    }


def _training_feeds(teacher, student, data) -> dict[str, np.ndarray]:
    feeds = feeds_from(data, student)
    if set(graph_inputs(teacher)) != set(feeds):
        raise OnnxoptError(f"the models' inputs differ ({', '.join(graph_inputs(teacher))} vs {', '.join(feeds)}): "
                           "the transformed model must come from the original")
    sizes = {len(v) for v in feeds.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise OnnxoptError("--finetune arrays must share one non-empty first (sample) dimension")
    return feeds


def _labels(data, key: str | None, samples: int):
    """Labels only when --labels names them: without it, training is distillation alone (the data may hold
    labels the user does not want used)."""
    if key is None:
        return None
    import torch

    truth = load_labels(data, key)
    if truth.shape != (samples,) or not np.issubdtype(truth.dtype, np.integer):
        raise OnnxoptError(f"--labels '{key}' must be integer class ids of shape ({samples},), got {truth.dtype} "
                           f"of shape {list(truth.shape)}")
    return torch.from_numpy(truth.astype(np.int64))


class _Teacher:
    """The teacher's outputs per sample range, computed in onnxruntime; kept when they fit in memory."""

    def __init__(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray], batch: int):
        self.session, self.feeds = session(model), feeds
        first = self.session.run(None, {k: v[:batch] for k, v in feeds.items()})
        samples = len(next(iter(feeds.values())))
        self.cache, self.first = None, first
        if sum(o.nbytes for o in first) / max(len(first[0]), 1) * samples <= TEACHER_CACHE_BYTES:
            rest = [self._run(start, batch) for start in range(batch, samples, batch)]
            self.cache = [np.concatenate(parts) for parts in zip(first, *rest)]

    def _run(self, start: int, size: int) -> list[np.ndarray]:
        return self.session.run(None, {k: v[start:start + size] for k, v in self.feeds.items()})

    def outputs(self, index: np.ndarray) -> list[np.ndarray]:
        if self.cache is not None:
            return [o[index] for o in self.cache]
        return self.session.run(None, {k: v[index] for k, v in self.feeds.items()})

    def output_kinds(self) -> list[str]:
        """Per output: 'probabilities', 'logits' (class scores), 'values' (regression-like) or 'skip' (not float)."""
        kinds = []
        for o in self.first:
            if not np.issubdtype(o.dtype, np.floating):
                kinds.append("skip")
            elif o.ndim == 2 and o.shape[1] >= 2:
                rows = o.sum(1)
                kinds.append("probabilities" if o.min() >= 0 and np.allclose(rows, 1, atol=1e-3) else "logits")
            else:
                kinds.append("values")
        return kinds


class _DistillationLoss:
    def __init__(self, kinds: list[str], temperature: float):
        self.kinds, self.t = kinds, temperature

    def describe(self) -> list[str]:
        names = {"logits": f"KL(T={self.t:g})", "probabilities": "KL", "values": "normalized MSE"}
        return sorted({names[k] for k in self.kinds if k in names})

    def __call__(self, student: list, teacher: list, truth=None):
        import torch
        import torch.nn.functional as F

        total = 0.0
        for kind, s, t in zip(self.kinds, student, teacher):
            t = torch.from_numpy(np.asarray(t))
            if kind == "logits":
                total = total + F.kl_div(F.log_softmax(s / self.t, 1), F.log_softmax(t / self.t, 1),
                                         reduction="batchmean", log_target=True) * self.t ** 2
            elif kind == "probabilities":
                total = total + F.kl_div(torch.log(s.clamp_min(1e-8)), t, reduction="batchmean")
            elif kind == "values":
                total = total + F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)
        if truth is not None:
            first = next(i for i, k in enumerate(self.kinds) if k in ("logits", "probabilities"))
            scores = student[first]
            scores = torch.log(scores.clamp_min(1e-8)) if self.kinds[first] == "probabilities" else scores
            total = total + F.cross_entropy(scores, truth)
        return total


def _batch_feeds(feeds, index):
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v[index])) for k, v in feeds.items()}


def _train(module, feeds, targets, loss_fn, truth, options, progress) -> list[dict]:
    import torch

    samples = len(next(iter(feeds.values())))
    batches = math.ceil(samples / options.batch_size)
    optimizer = torch.optim.Adam(module.parameters(), lr=options.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=options.epochs * batches)
    rng = np.random.default_rng(options.finetune_seed)
    state, history = {"batches": batches, "loss": None}, []
    for epoch in range(1, options.epochs + 1):
        order, total, started = rng.permutation(samples), 0.0, time.perf_counter()
        ticks = [_Tick(state, b + 1) for b in range(batches)]
        label = f"finetune epoch {epoch}/{options.epochs}"
        for tick in (progress(ticks, label) if progress else ticks):
            index = np.sort(order[(tick.batch - 1) * options.batch_size:tick.batch * options.batch_size])
            loss = loss_fn(module(_batch_feeds(feeds, index)), targets.outputs(index),
                           None if truth is None else truth[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
            state["loss"] = total / min(tick.batch * options.batch_size, samples)
        history.append({"epoch": epoch, "loss": total / samples, "seconds": time.perf_counter() - started})
    return history


def _mean_loss(module, feeds, targets, loss_fn, truth, batch: int) -> float:
    import torch

    samples, total = len(next(iter(feeds.values()))), 0.0
    with torch.no_grad():
        for start in range(0, samples, batch):
            index = np.arange(start, min(start + batch, samples))
            loss = loss_fn(module(_batch_feeds(feeds, index)), targets.outputs(index),
                           None if truth is None else truth[index])
            total += float(loss.detach()) * len(index)
    return total / samples


def _write_back(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` with these initializers' values replaced (same names, shapes, dtypes)."""
    out = copy_model(model)
    for t in out.graph.initializer:
        if t.name in values:
            if not np.isfinite(values[t.name]).all():
                raise OnnxoptError(f"fine-tuning diverged: '{t.name}' has NaN or infinite values (try a smaller "
                                   "--lr)")
            t.CopyFrom(numpy_helper.from_array(values[t.name].reshape(tuple(t.dims)), t.name))
    return out
