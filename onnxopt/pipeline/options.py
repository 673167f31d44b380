"""The option groups every command shares (selection, recovery, check and gates, save, input shapes,
fine-tuning), the table of each command's groups, and `parse`, which builds and validates them.

The Python API and the CLI build the same dataclasses from the same keywords, so both give the same answer (and
the same message) to the same input. The click options are generated from the fields' metadata (`cli.py`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..graph.selection import Selection
from ..options import check_calibration, choice, load_function, option, pairs
from ..passes.factor.options import FactorOptions


@dataclass
class SelectOptions:
    """Which layers a rewrite may touch."""

    only: tuple = option(help="Change only layers matching PATTERN (repeatable).", metavar="PATTERN", repeat=True)
    skip: tuple = option(help="Leave layers matching PATTERN alone (repeatable). A pattern matches a node name, a "
                              "glob on it, or one '/'-separated part of it ('l1' matches '/l1/Gemm').",
                         metavar="PATTERN", repeat=True)
    filter_fn: Any = option(help="node -> bool; False leaves the node alone.", metavar="MODULE:FUNCTION", code=True)

    def __post_init__(self):
        self.only, self.skip = tuple(self.only), tuple(self.skip)
        if any(not isinstance(p, str) or not p for p in self.only + self.skip):
            raise UsageError("--only / --skip patterns must be non-empty strings")
        self.filter_fn = load_function(self.filter_fn, "--filter-fn")

    def selection(self, extra_patterns: list[tuple[str, str]] = ()) -> Selection:
        return Selection(only=list(self.only), skip=list(self.skip), filter_function=self.filter_fn,
                         extra=list(extra_patterns))


@dataclass
class RecoverOptions:
    """What recovers accuracy after a rewrite: calibration data, a training hook or an external trainer."""

    calibration: Any = option(help="Inputs keyed by graph input name: data-aware factors / refit of binarized "
                                   "layers.", metavar="FILE.npz", path=True)
    train_hook: Any = option(help="function(model, **hook_args) -> model: fine-tunes the transformed model "
                                  "(values only).", metavar="MODULE:FUNCTION", code=True)
    hook_arg: tuple = option(help="Keyword argument for --train-hook.", metavar="KEY=VALUE", repeat=True)
    train_cmd: str | None = option(help="External trainer, e.g. \"python train.py {input} {output}\": gets the "
                                        "transformed model, writes the trained one.", metavar="COMMAND", code=True)
    train_timeout: float | None = option(help="Stop --train-hook / --train-cmd after SECONDS (exit 1, nothing "
                                              "written).", metavar="SECONDS", kind=float)

    def __post_init__(self):
        if self.train_hook is not None and self.train_cmd is not None:
            raise UsageError("--train-hook and --train-cmd exclude each other")
        if self.train_timeout is not None and not self.train_timeout > 0:
            raise UsageError(f"invalid --train-timeout {self.train_timeout}: give a number of seconds > 0")
        if self.train_cmd is not None and ("{input}" not in self.train_cmd or "{output}" not in self.train_cmd):
            raise UsageError(f"invalid --train-cmd '{self.train_cmd}': it must contain {{input}} and {{output}}")
        self.hook_kwargs = dict(pairs(self.hook_arg, "--hook-arg"))
        self.train_function = load_function(self.train_hook, "--train-hook")
        check_calibration(self.calibration)

    @property
    def trains(self) -> bool:
        return self.train_function is not None or self.train_cmd is not None


@dataclass
class CheckOptions:
    """Run both models and compare outputs; gate on the difference."""

    check: int | None = option(help="Run N inputs through both models and print the max output difference.",
                               metavar="N", kind=int)
    data: Any = option(help=".npz of inputs for --check (keyed by input name).", metavar="FILE.npz", path=True)
    max_error: float | None = option(help="With --check: fail (exit 1, nothing written) if the max relative "
                                          "difference exceeds X.", metavar="X", kind=float)
    labels: str | None = option(help="Array in --data holding class labels (default: 'label' if present); "
                                     "without labels, the score is top-1 agreement with the input model. With "
                                     "--finetune, the labels in its data too (adds cross-entropy).",
                                metavar="KEY")
    max_drop: float | None = option(help="Fail (exit 1, nothing written) if the score on --data (accuracy, or "
                                         "top-1 agreement) drops by more than X against the input model.",
                                    metavar="X", kind=float)
    min_speedup: float | None = option(help="Fail if the output model is not X times as fast as the input in "
                                            "onnxruntime (median latency, alternating timed blocks, on the first 8 "
                                            "samples of --data, else on --check N random inputs, default 8).",
                                       metavar="X", kind=float)
    max_size: str | None = option(help="Fail if the output model is larger than SIZE: a ratio of the input's size "
                                       "(0.5) or bytes (2000000, 500KB, 2MiB).", metavar="SIZE", kind=str)

    def __post_init__(self):
        if self.check is not None and self.check < 1:
            raise UsageError(f"invalid --check {self.check}: give a number of samples >= 1")
        if self.max_error is not None and not self.max_error >= 0:
            raise UsageError(f"invalid --max-error {self.max_error}: give a relative difference >= 0")
        _fraction_or_none(self.max_drop, "--max-drop")
        if self.max_drop is not None and self.data is None:  # --labels: checked with --finetune (check_together)
            raise UsageError("--max-drop needs --data (inputs and labels to score both models on)")
        if self.min_speedup is not None and not self.min_speedup > 0:
            raise UsageError(f"invalid --min-speedup {self.min_speedup}: give a ratio > 0 (1.2: 20% faster)")
        self.size_limit = None if self.max_size is None else parse_size(self.max_size)

    @property
    def wanted(self) -> bool:
        return self.check is not None or self.data is not None or self.max_error is not None


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | float | int) -> tuple[str, float]:
    """('ratio', 0.5) for a fraction of the input's size, ('bytes', n) for an absolute size."""
    s = str(text).strip()
    split = len(s)
    while split and s[split - 1].upper() in "KMGIB":  # the unit's letters at the end
        split -= 1
    number, unit = s[:split], s[split:].strip().upper()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if value > 0 and unit in _UNITS:
        if unit == "" and ("." in number or value <= 1):
            return "ratio", value
        return "bytes", value * _UNITS[unit]
    raise UsageError(f"invalid --max-size '{text}': give a ratio of the input's size (0.5) or bytes "
                     "(2000000, 500KB, 2MiB)")


@dataclass
class SaveOptions:
    """Where and how the result is written (nothing is written without `output`)."""

    output: Any = option(help="Output path (default: <stem>.<command>ed.onnx beside the input).", short="-o",
                         metavar="PATH")
    force: bool = option(False, "Overwrite an existing output file (never the input).")
    external_data: bool = option(False, "Store weights in <output>.data beside the model.")
    strict: bool = option(False, "Exit 1 when no layer was changed.")


@dataclass
class ShapeOptions:
    """Sizes for inputs the model leaves symbolic: shape inference, FLOPs and random check inputs use them."""

    input_shape: tuple = option(help="Size of a graph input with symbolic dims, e.g. x:1,3,224,224 (repeatable).",
                                metavar="NAME:D1,D2,...", repeat=True)
    input_value: tuple = option(help="A value for every element of an input of the random check inputs, e.g. "
                                     "sr=16000 (repeatable; default: token ids random rows of their table, other "
                                     "integer inputs 1, floats normal).", metavar="NAME=V", repeat=True)

    def __post_init__(self):
        self.values = {}
        for text in self.input_value:
            name, sep, value = str(text).rpartition("=")
            try:
                self.values[name] = float(value)
            except ValueError:
                sep = ""
            if not sep or not name:
                raise UsageError(f"invalid --input-value '{text}': expected NAME=V with V a number")
        self.shapes = {}
        for text in self.input_shape:
            name, sep, dims = str(text).rpartition(":")
            try:
                values = tuple(int(d) for d in dims.split(","))
            except ValueError:
                values = ()
            if not sep or not name or not values or min(values) < 1:
                raise UsageError(f"invalid --input-shape '{text}': expected NAME:D1,D2,... with dims >= 1")
            self.shapes[name] = values


@dataclass
class FinetuneOptions:
    """`--finetune`: recover accuracy by distillation from the input model (recover/distill.py; needs torch)."""

    finetune: Any = option(help="Fine-tune the transformed model by distillation from the input model on these "
                                "inputs (.npz keyed by input name; no labels needed). Needs torch: pip install "
                                "'onnxopt[train]'.", metavar="DATA.npz", path=True)
    steps: int | None = option(help="Optimizer steps (default 1000 whatever the data size; --epochs instead "
                                    "counts passes over the data).", metavar="N", kind=int)
    epochs: int | None = option(help="Passes over the --finetune data instead of --steps.", metavar="N", kind=int)
    lr: float | None = option(help="Adam learning rate: a linear warm-up over the first 5% of the steps, then a "
                                   "cosine decay to 0 (default 0.005).", metavar="X", kind=float)
    batch_size: int | None = option(help="Samples per training step (default 64).", metavar="B", kind=int)
    temperature: float | None = option(help="Softmax temperature of the distillation loss on class-score outputs "
                                            "(default 2).", metavar="T", kind=float)
    distill: str | None = option(help="What the student matches: the teacher's outputs, the outputs of the layers "
                                      "it changed (tensors of the same name, normalized MSE), or both (default).",
                                 metavar="outputs|layers|both")
    holdout: float | None = option(help="Share of the --finetune samples held out of training: the loss on them "
                                        "picks the best weights, stops training early when it stops falling, and "
                                        "decides whether the result is kept (default 0.1; 0: the training loss; at "
                                        "most 512 samples are scored).",
                                   metavar="F", kind=float)
    max_time: float | None = option(help="Stop training after SECONDS (the best weights so far are kept).",
                                    metavar="SECONDS", kind=float)
    finetune_seed: int = option(0, "Seed of the data order (runs are deterministic for a seed).", cli=False)

    # lr and temperature chosen on held-out digits over lr 0.002-0.01 x T 2, 4 (benchmarks/README, issue 31): the
    # sample CNN 1-bit 0.963, token_mlp and tiny_vit at rank 0.3 0.890 and 0.916 (lr 0.001, T 4: 0.962, 0.852, 0.905)
    DEFAULTS = {"steps": None, "epochs": None, "lr": 5e-3, "batch_size": 64, "temperature": 2.0, "distill": "both",
                "holdout": 0.1, "max_time": None}
    DEFAULT_STEPS = 1000  # enough for a loss that sees every changed layer, whatever the data size
    DISTILL = ("outputs", "layers", "both")

    def __post_init__(self):
        given = [k for k in self.DEFAULTS if getattr(self, k) is not None]
        if given and self.finetune is None:
            raise UsageError(f"--{given[0].replace('_', '-')} needs --finetune DATA.npz")
        if self.steps is not None and self.epochs is not None:
            raise UsageError("give --steps or --epochs, not both")
        for key, default in self.DEFAULTS.items():
            value = getattr(self, key)
            setattr(self, key, default if value is None else value)
        for key in ("steps", "epochs", "batch_size"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise UsageError(f"invalid --{key.replace('_', '-')} {value}: give a whole number >= 1")
        for key in ("lr", "temperature"):
            if not (isinstance(getattr(self, key), (int, float)) and getattr(self, key) > 0):
                raise UsageError(f"invalid --{key} {getattr(self, key)}: give a number > 0")
        if self.max_time is not None and not (isinstance(self.max_time, (int, float)) and self.max_time > 0):
            raise UsageError(f"invalid --max-time {self.max_time}: give seconds > 0")
        if not (isinstance(self.holdout, (int, float)) and 0 <= self.holdout < 1):
            raise UsageError(f"invalid --holdout {self.holdout}: give a share >= 0 and < 1")
        choice(self.distill, self.DISTILL, "--distill")
        if isinstance(self.finetune, (str, os.PathLike)) and not Path(self.finetune).is_file():
            raise UsageError(f"{self.finetune}: no such --finetune data file")
        if self.finetune is not None:
            from ..recover import require_torch

            require_torch("--finetune")

    def total_steps(self, batches_per_epoch: int) -> int:
        return self.epochs * batches_per_epoch if self.epochs is not None else self.steps or self.DEFAULT_STEPS


def check_together(groups: dict[type, Any]) -> None:
    """Rules that span two option groups."""
    factor, check = groups.get(FactorOptions), groups.get(CheckOptions)
    finetune = groups.get(FinetuneOptions)
    if check.labels is not None and check.data is None and (finetune is None or finetune.finetune is None):
        raise UsageError("--labels needs --data (or --finetune): the file that holds the labels")
    if factor is not None and factor.budget_spec is not None and factor.budget_spec.fraction is None:
        if check.max_drop is None:
            raise UsageError(f"--budget {factor.budget_spec} searches for the smallest budget that passes "
                             "--max-drop: give --max-drop X and --data")


# ---- the commands that measure or run instead of rewriting: their options, declared once for CLI and API ----

def _fraction_or_none(value, flag: str) -> None:
    if value is not None and not 0 <= value <= 1:
        raise UsageError(f"invalid {flag} {value}: give a fraction in [0, 1]")


ALLOW_CODE_HELP = ("Let the recipe set keys that run code (train_cmd, train_hook, filter_fn, factor_fn, "
                   "projection_fn): such a recipe is a program, run it only if you trust it.")


@dataclass
class ApplyOptions:
    """`apply`: a recipe's steps, then its gates."""

    recipe: Any = option(help="The recipe.", metavar="RECIPE.toml", argument=True)
    model_path: Any = option(help="The model the recipe runs on.", metavar="MODEL", argument=True)
    allow_code: bool = option(False, ALLOW_CODE_HELP)
    calibration: Any = option(help="Calibration data for every step that takes it (replaces the recipe's).",
                              metavar="CALIB.npz", path=True)
    finetune: Any = option(help="Fine-tuning data for every step that takes it (replaces the recipe's).",
                           metavar="DATA.npz", path=True)
    data: Any = option(help="The [gate]'s held-out data (replaces the recipe's).", metavar="DATA.npz", path=True)
    labels: str | None = option(help="The [gate]'s array of class labels in --data.", metavar="KEY")

    @property
    def given(self) -> dict[str, Any]:
        """The data named on the command line, by recipe key: a recipe need not name a model's data."""
        keys = ("calibration", "finetune", "data", "labels")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class DataOptions:
    """The held-out data a measuring command scores on."""

    data: Any = option(help="Held-out inputs (and labels) keyed by input name.", metavar="DATA.npz", required=True,
                       path=True)
    labels: str | None = option(help="Array in --data holding class labels (default: 'label' if present).",
                                metavar="KEY")


@dataclass
class SweepOptions:
    """`sweep`: a grid (or one axis per layer) of options, run and measured against the input model."""

    grid: tuple = option(help="Values of one option of one step (repeatable); every combination is a candidate.",
                         metavar="STEP.OPTION=V1,V2,...", repeat=True)
    sensitivity: str | None = option(help="Instead of a grid: per layer the step changes and per value, the score "
                                          "with only that layer changed (Distiller's sensitivity analysis).",
                                     metavar="STEP.OPTION=V1,V2,...")
    recipe: Any = option(help="The steps the grid varies (default: the grid's commands).", metavar="RECIPE.toml")
    allow_code: bool = option(False, ALLOW_CODE_HELP)
    jobs: int = option(1, "Candidates built in parallel.", metavar="N", kind=int)
    ray: str | None = option(help="Run the candidates as Ray tasks on the cluster at ADDRESS (host:port, 'auto', or "
                                  "'local' to start one here); needs onnxopt[ray].", metavar="ADDRESS")
    keep_best: Any = option(help="Write the Pareto front's models here (front_0.onnx, ...).", metavar="DIR")
    report: Any = option(help="A self-contained HTML page with the table and charts (needs matplotlib: "
                              "onnxopt[report]).", metavar="FILE.html")
    force: bool = option(False, "Replace an existing --report file and --keep-best models.")

    def __post_init__(self):
        if bool(self.grid) == bool(self.sensitivity):
            raise UsageError("give --grid STEP.OPTION=V1,V2,... (repeatable) or --sensitivity STEP.OPTION=V1,V2,...")
        if self.sensitivity and (self.recipe or self.keep_best):
            raise UsageError("--recipe and --keep-best go with --grid, not --sensitivity")
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise UsageError(f"invalid --jobs {self.jobs}: give a number of processes >= 1")
        if self.ray is not None and (not str(self.ray).strip() or self.jobs != 1):
            raise UsageError("--ray takes a cluster address (host:port, 'auto', or 'local' to start one here) and "
                             "replaces --jobs: Ray schedules the candidates on the cluster's CPUs")


@dataclass
class RunOptions:
    """`run`: outputs of any model on the inputs in an .npz."""

    data: Any = option(help=".npz of inputs keyed by input name.", metavar="DATA.npz", required=True)
    output: Any = option(help="Save outputs to this .npz.", short="-o", metavar="PATH")
    force: bool = option(False, "Overwrite an existing output file.")


@dataclass
class FinetuneRunOptions:
    """`finetune`: the two models and the data the staged workflow trains on."""

    original: Any = option(help="The model before the rewrite (the teacher).", metavar="ORIGINAL", argument=True)
    transformed: Any = option(help="The rewritten model to train.", metavar="TRANSFORMED", argument=True)
    data: Any = option(help="Training inputs keyed by input name.", metavar="DATA.npz", required=True)
    labels: str | None = option(help="Array in --data holding class labels: adds cross-entropy (default: "
                                     "distillation alone).", metavar="KEY")


@dataclass
class CompareOptions:
    """`compare`: two models on the same inputs, with accuracy gates."""

    model_a: Any = option(help="The reference model.", metavar="A.onnx", argument=True)
    model_b: Any = option(help="The model measured against it.", metavar="B.onnx", argument=True)

    min_accuracy: float | None = option(help="Exit 1 if B's accuracy is below X.", metavar="X", kind=float)
    max_drop: float | None = option(help="Exit 1 if B loses more than X accuracy vs A.", metavar="X", kind=float)

    def __post_init__(self):
        _fraction_or_none(self.min_accuracy, "--min-accuracy")
        _fraction_or_none(self.max_drop, "--max-drop")
