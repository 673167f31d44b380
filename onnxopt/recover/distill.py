"""Fine-tuning by distillation: the transformed model (student) learns the input model's (teacher's) outputs and,
layer by layer, the tensors its changed layers compute.

- Teacher: the float model before the rewrite, run in onnxruntime (its outputs, and the intermediate tensors the
  student matches, computed once per sample and kept when they fit in TEACHER_CACHE_BYTES, else recomputed per
  batch).
- Student: the transformed graph run in torch (torch_graph.py); its weight initializers are trained (factored
  U and V, latent binary weights through the straight-through estimator, α, biases, normalization scale and
  shift; BatchNormalization statistics stay frozen: the stored ones are what the exported graph computes with).
- Layer-wise (`--distill layers|both`, the default both): a rewrite keeps the name of the tensor it replaced, so a
  changed layer's output (a factored Gemm's, a binarized conv's; for prune the next layer's, whose shape is
  the teacher's again) is matched with the teacher's tensor of that name: normalized MSE (MSE over the teacher's
  mean square) per tensor, their mean added to the output loss. A loss that only sees the last layer has to
  find every layer's correction through the whole network; this one gives each layer its own target.
- Loss per float output: class scores (samples × classes) → KL(softmax(t/T) ‖ softmax(s/T))·T² (Hinton et al.;
  outputs that already are probabilities, per sample or per position as a CTC recognizer's, through their
  logarithms, KL averaged over the positions); any other output (sentence embeddings,
  hidden states, detector maps) → normalized MSE plus (1 − cosine) along its last axis. With labels, plus
  cross-entropy on the first class-score output.
- A schedule in optimizer steps (default 1000, whatever the data size; or --epochs passes): Adam, a linear
  warm-up over the first 5% of the steps, then a cosine decay to 0. A held-out share of the data (--holdout;
  at most 512 samples of it) is scored every 5% of the steps (10 at least): the best weights are kept,
  training stops early after 5 scores without a new best (or at --max-time), and the result is kept only if it
  beats the held-out loss before training.
  The data order is a seeded permutation per pass, so a run is deterministic for a seed on one machine.

The trained values go back into the same initializers: nodes, names, shapes and dtypes are unchanged.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OnnxoptError
from ..graph.nodes import copy_model
from ..measure.feeds import feeds_from
from ..measure.scores import load_labels
from ..runtime import session
from ..runtime.guard import graph_inputs

TEACHER_CACHE_BYTES = 2 << 30
EVALUATIONS = 20  # held-out scores per run
SCORE_GAP = 10  # steps at least between two scores: 20 scores of a 100-step run cost a fifth of its time
SCORED_SAMPLES = 512  # the most samples one score reads
PATIENCE = 5  # scores without a new best before training stops
# a rate too high for the model makes the held-out loss climb from the first score (PP-OCR rec at lr 0.005: 2.6 →
# 7-12, where lr 0.0003 took it to 1.4 in 60 steps): that many scores in a row above DIVERGED x the loss before
# training, with no better one yet, restart from the starting weights at a tenth of the rate, at most BACKOFFS times
DIVERGED, BACKOFF_SCORES, BACKOFFS = 1.5, 2, 2


class _Tick:
    """A progress item whose text a progress bar can show (`progress_text`): step, running and held-out loss."""

    def __init__(self, state: dict, step: int):
        self.state, self.step = state, step

    @property
    def progress_text(self) -> str:
        s = self.state
        if s["loss"] is None:
            return ""
        held = f"  held-out {s['held_out']:.4f}" if s["held_out"] is not None else ""
        return f"step {self.step}/{s['steps']}  loss {s['loss']:.4f}{held}"


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
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    start = time.perf_counter()
    module = GraphModule(student, trainable)
    taps = matched_tensors(teacher, student) if options.distill != "outputs" else []
    targets = _Teacher(teacher, feeds, options.batch_size, taps)
    taps = targets.keep_taps(module, feeds, options.batch_size)
    loss_fn = _DistillationLoss(targets.output_kinds(), options.temperature, len(targets.first) - len(taps),
                                options.distill if taps else "outputs")
    train, held = _split(samples, options.holdout, options.finetune_seed)
    data = _Data(module, feeds, targets, loss_fn, truth, taps, options.batch_size)
    scored = _scored(train, held, options.finetune_seed)
    before = data.mean_loss(scored)
    run = _train(data, train, scored, options, progress, before, start)
    after = run["best"]
    kept = after < before  # training that made the model worse (too high a rate, too little data) is not kept
    trained = _write_back(student, run["weights"]) if kept else student
    return trained, {
        "kept": kept, "samples": samples, "train_samples": len(train), "held_out_samples": len(held),
        "steps": run["steps"], "planned_steps": run["planned"], "stopped": run["stopped"],
        "best_step": run["best_step"], "history": run["history"],
        "loss_before": before, "loss_after": after,
        "distill": loss_fn.mode, "matched_tensors": len(taps), "teacher_cached": targets.cache is not None,
        "labels": truth is not None, "trained_tensors": len(trainable),
        "trained_params": int(sum(p.numel() for p in module.weights)), "seconds": time.perf_counter() - start,
        "batch_size": options.batch_size, "lr": run["lr"], "lr_backoffs": run["backoffs"],
        "temperature": options.temperature,
        "loss": " + ".join(loss_fn.describe() + (["cross-entropy"] if truth is not None else [])),
    }


def matched_tensors(teacher: onnx.ModelProto, student: onnx.ModelProto) -> list[str]:
    """Intermediate tensors both models compute under one name where the student's producer differs from the
    teacher's: the outputs of the layers the rewrite changed (it keeps the replaced tensor's name), and after a
    pruned layer the next one's. Graph outputs are matched by the output loss already."""
    made = {o: n for n in teacher.graph.node for o in n.output}
    outputs = {o.name for o in student.graph.output}
    taps = []
    for node in student.graph.node:
        for name in node.output:
            theirs = made.get(name)
            if name and name not in outputs and theirs is not None and not _same_node(node, theirs):
                taps.append(name)
    return taps


def _same_node(a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
    return (a.op_type, a.domain, list(a.input), [x.SerializeToString() for x in a.attribute]) == (
        b.op_type, b.domain, list(b.input), [x.SerializeToString() for x in b.attribute])


def _split(samples: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices): a seeded random share held out, none from fewer than 10 samples."""
    order = np.random.default_rng(seed + 1).permutation(samples)
    held = int(round(samples * holdout)) if samples >= 10 else 0
    return np.sort(order[held:]), np.sort(order[:held])


def _scored(train: np.ndarray, held: np.ndarray, seed: int) -> np.ndarray:
    """The samples every periodic score reads: the held-out ones (the training ones when none are held out), at
    most SCORED_SAMPLES of them, a seeded choice fixed for the run (scoring all 2,000 training digits 20 times
    cost more than 96 training steps)."""
    pool = held if len(held) else train
    if len(pool) <= SCORED_SAMPLES:
        return pool
    return np.sort(np.random.default_rng(seed + 2).choice(pool, SCORED_SAMPLES, replace=False))


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
    """The teacher's outputs (then the tapped intermediate tensors) per sample range, computed in onnxruntime;
    kept when they fit in memory."""

    def __init__(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray], batch: int, taps: list[str]):
        self.taps = list(taps)
        self.session, self.feeds = session(_with_outputs(model, self.taps)), feeds
        first = self.session.run(None, {k: v[:batch] for k, v in feeds.items()})
        samples = len(next(iter(feeds.values())))
        self.cache, self.first, self._drop = None, first, set()
        if sum(o.nbytes for o in first) / max(len(first[0]), 1) * samples <= TEACHER_CACHE_BYTES:
            rest = [self._run(start, batch) for start in range(batch, samples, batch)]
            self.cache = [np.concatenate(parts) for parts in zip(first, *rest)]

    def _run(self, start: int, size: int) -> list[np.ndarray]:
        return self.session.run(None, {k: v[start:start + size] for k, v in self.feeds.items()})

    def outputs(self, index: np.ndarray) -> list[np.ndarray]:
        if self.cache is not None:
            return [o[index] for o in self.cache]
        out = self.session.run(None, {k: v[index] for k, v in self.feeds.items()})
        return [o for j, o in enumerate(out) if j not in self._drop]

    def keep_taps(self, module, feeds, batch: int) -> list[str]:
        """The taps whose student tensor is a float of the teacher's shape (a pruned layer's own output is not:
        its consumer's is matched instead); the others are dropped from the teacher's outputs."""
        import torch

        if not self.taps:
            return []
        n = len(self.first) - len(self.taps)
        with torch.no_grad():
            got = module(_batch_feeds(feeds, np.arange(min(batch, len(self.first[0])))), tuple(self.taps))[n:]
        keep = [i for i, (s, t) in enumerate(zip(got, self.first[n:]))
                if isinstance(s, torch.Tensor) and s.is_floating_point() and np.issubdtype(t.dtype, np.floating)
                and tuple(s.shape) == t.shape]
        drop = [n + i for i in range(len(self.taps)) if i not in keep]
        self.first = [o for j, o in enumerate(self.first) if j not in drop]
        if self.cache is not None:
            self.cache = [o for j, o in enumerate(self.cache) if j not in drop]
        else:  # recomputed per batch: the session keeps its outputs, the dropped ones are sliced away
            self._drop = set(drop)
        self.taps = [self.taps[i] for i in keep]
        return self.taps

    def output_kinds(self) -> list[str]:
        """Per output: 'probabilities', 'logits' (class scores), 'values' (embeddings, maps, anything else) or
        'skip' (not float)."""
        kinds = []
        for o in self.first:
            if not np.issubdtype(o.dtype, np.floating):
                kinds.append("skip")
            elif o.ndim >= 2 and o.shape[-1] >= 2 and o.min() >= 0 and np.allclose(o.sum(-1), 1, atol=1e-3):
                kinds.append("probabilities")  # per sample, or per position (a CTC recognizer's characters)
            elif o.ndim == 2 and o.shape[1] >= 2:
                unit = np.allclose(np.linalg.norm(o, axis=1), 1, atol=1e-3)  # a normalized embedding
                kinds.append("values" if unit else "logits")
            else:
                kinds.append("values")
        return kinds


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs these intermediate tensors (typed float where shape inference cannot
    tell; a tensor of another type is dropped by `keep_taps`)."""
    if not names:
        return model
    from ..graph.shapes import infer_shapes

    out = copy_model(model)
    known = infer_shapes(out)
    for name in names:
        vi = known.get(name)
        elem = vi.type.tensor_type.elem_type if vi is not None and vi.type.tensor_type.elem_type else 1
        out.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return out


class _DistillationLoss:
    """The output loss (per output kind) and, in `mode` layers/both, the mean normalized MSE of the tapped
    tensors (the entries after the first `outputs`)."""

    def __init__(self, kinds: list[str], temperature: float, outputs: int, mode: str):
        self.kinds, self.t, self.outputs, self.mode = kinds[:outputs], temperature, outputs, mode

    def describe(self) -> list[str]:
        kl = f"KL(T={self.t:g})"
        names = {"logits": kl, "probabilities": kl, "values": "normalized MSE + cosine"}
        parts = sorted({names[k] for k in self.kinds if k in names}) if self.mode != "layers" else []
        return parts + (["layer-wise normalized MSE"] if self.mode != "outputs" else [])

    def __call__(self, student: list, teacher: list, truth=None):
        import torch
        import torch.nn.functional as F

        total = 0.0
        if self.mode != "layers":
            for kind, s, t in zip(self.kinds, student, teacher):
                t = torch.from_numpy(np.asarray(t))
                if kind in ("logits", "probabilities"):
                    total = total + self._soft_kl(s, t, kind == "probabilities")
                elif kind == "values":
                    total = total + _normalized_mse(s, t)
                    if s.ndim >= 1 and s.shape[-1] > 1:
                        total = total + (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()
        if self.mode != "outputs":
            layers = [_normalized_mse(s, torch.from_numpy(np.asarray(t)))
                      for s, t in zip(student[self.outputs:], teacher[self.outputs:])]
            if layers:
                total = total + sum(layers) / len(layers)
        if truth is not None:
            first = next((i for i, (k, s) in enumerate(zip(self.kinds, student))
                          if k in ("logits", "probabilities") and s.dim() == 2), None)
            if first is None:
                raise OnnxoptError("--labels needs a class-score output (samples × classes); this model has none")
            scores = student[first]
            scores = torch.log(scores.clamp_min(1e-8)) if self.kinds[first] == "probabilities" else scores
            total = total + F.cross_entropy(scores, truth)
        return total

    def _soft_kl(self, s, t, probabilities: bool):
        """KL(softmax(t/T) ‖ softmax(s/T))·T² per row of the last axis (a sample's, or a position's class scores),
        averaged over rows; probabilities are softened through their logarithms (the logits up to a constant)."""
        import torch
        import torch.nn.functional as F

        if probabilities:  # the greedy decoding of a CTC recognizer follows the argmax at every position
            s, t = torch.log(s.clamp_min(1e-8)), torch.log(t.clamp_min(1e-8))
        s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        return F.kl_div(F.log_softmax(s / self.t, 1), F.log_softmax(t / self.t, 1), reduction="batchmean",
                        log_target=True) * self.t ** 2


def _normalized_mse(s, t):
    import torch.nn.functional as F

    return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)


def _batch_feeds(feeds, index):
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v[index])) for k, v in feeds.items()}


class _Data:
    """The student, its targets and loss over sample indices."""

    def __init__(self, module, feeds, targets, loss_fn, truth, taps, batch: int):
        self.module, self.feeds, self.targets, self.loss_fn = module, feeds, targets, loss_fn
        self.truth, self.taps, self.batch = truth, tuple(taps), batch

    def loss(self, index: np.ndarray):
        return self.loss_fn(self.module(_batch_feeds(self.feeds, index), self.taps), self.targets.outputs(index),
                            None if self.truth is None else self.truth[index])

    def mean_loss(self, index: np.ndarray) -> float:
        import torch

        total = 0.0
        with torch.no_grad():
            for start in range(0, len(index), self.batch):
                part = index[start:start + self.batch]
                total += float(self.loss(part).detach()) * len(part)
        return total / max(len(index), 1)


def _optimizer(module, rate: float, steps: int):
    """Adam at `rate` with a linear warm-up over 5% of `steps`, then a cosine decay to 0."""
    import torch

    optimizer = torch.optim.Adam(module.parameters(), lr=rate)
    steps = max(steps, 1)
    ramp = max(1, steps // 20)

    def factor(i):
        return (i + 1) / ramp if i < ramp else 0.5 * (1 + math.cos(math.pi * (i - ramp) / max(steps - ramp, 1)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train(data: _Data, train: np.ndarray, scored: np.ndarray, options, progress, before: float,
           start: float) -> dict:
    """Adam over `options.total_steps` steps (warm-up, cosine); the held-out loss every 5% of the steps picks
    the best weights and stops the run early; --max-time stops it too. A run that diverges from the start is
    restarted at a tenth of the rate (DIVERGED); the steps it used count."""
    module, bs = data.module, options.batch_size
    per_epoch = math.ceil(len(train) / bs)
    steps = options.total_steps(per_epoch)
    lr = options.lr
    initial = module.trained_values()

    optimizer, schedule = _optimizer(module, lr, steps)
    every = max(SCORE_GAP, steps // EVALUATIONS)
    rng = np.random.default_rng(options.finetune_seed)
    state = {"steps": steps, "loss": None, "held_out": None}
    best = {"loss": before, "step": 0, "weights": initial}
    history, order, stale, stopped, running, done = [], np.array([], int), 0, "all steps", 0.0, 0
    diverged, backoffs = 0, 0
    ticks = [_Tick(state, i + 1) for i in range(steps)]
    for tick in (progress(ticks, "finetune") if progress else ticks):
        if len(order) < bs:  # a new pass over the training samples
            order = np.concatenate([order, rng.permutation(train)])
        index, order = np.sort(order[:bs]), order[bs:]
        loss = data.loss(index)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        done = tick.step
        running = float(loss.detach()) if running == 0.0 else 0.95 * running + 0.05 * float(loss.detach())
        state["loss"] = running
        out_of_time = options.max_time is not None and time.perf_counter() - start > options.max_time
        if tick.step % every == 0 or tick.step == steps or out_of_time:
            score = data.mean_loss(scored)
            state["held_out"] = score
            history.append({"step": tick.step, "loss": running, "held_out": score, "lr": lr,
                            "seconds": time.perf_counter() - start})
            if score < best["loss"]:
                best, stale = {"loss": score, "step": tick.step, "weights": module.trained_values()}, 0
            else:
                stale += 1
            diverged = diverged + 1 if best["step"] == 0 and score > DIVERGED * before else 0
            if out_of_time:
                stopped = f"--max-time {options.max_time:g} s"
                break
            if diverged >= BACKOFF_SCORES and backoffs < BACKOFFS:
                lr, backoffs, diverged, stale, running = lr / 10, backoffs + 1, 0, 0, 0.0
                module.load_values(initial)
                optimizer, schedule = _optimizer(module, lr, steps - tick.step)
                continue
            if stale >= PATIENCE:
                stopped = f"early: no better held-out loss in {PATIENCE} scores"
                break
    return {"best": best["loss"], "best_step": best["step"], "weights": best["weights"], "steps": done,
            "planned": steps, "stopped": stopped, "history": history, "lr": lr, "backoffs": backoffs}


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
