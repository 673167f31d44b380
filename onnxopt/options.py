"""Typed options, one dataclass per pipeline step, validated once in `__post_init__`.

The Python API and the CLI build the same dataclasses from the same keywords, so both give the same
answer (and the same message) to the same input. The click options are generated from the fields'
metadata (`cli.py`), so a new option is declared once, here.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable


from .errors import UsageError
from .select import Selection


def option(default: Any = None, help: str = "", *, metavar: str | None = None, flag: str | None = None,
           short: str | None = None, repeat: bool = False, kind: type | None = None, cli: bool = True,
           path: bool = False):
    """A dataclass field with what the CLI needs to declare it: help text, metavar, the flag's name when it
    is not `--field-name`, a short flag, repeatable or not, and the value type click should parse; `path`:
    a file name (a recipe resolves it against the recipe's folder)."""
    meta = {"help": help, "metavar": metavar, "flag": flag, "short": short, "repeat": repeat, "kind": kind,
            "cli": cli, "path": path}
    if repeat:
        return field(default=(), metadata=meta)
    return field(default=default, metadata=meta)


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise UsageError(f"invalid {what} '{value}': choose one of {', '.join(choices)}")
    return value


@contextlib.contextmanager
def _cwd_importable():
    """The current directory on sys.path while importing a user's module (as `python -m` would), then
    sys.path as it was."""
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())


def load_function(spec: str | Callable | None, what: str) -> Callable | None:
    """A callable as given, or imported from `module:function` (the current directory is searched too)."""
    if spec is None or callable(spec):
        return spec
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"invalid {what} '{spec}': expected module:function, e.g. mypkg.rank:choose")
    try:
        with _cwd_importable():
            module = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(f"{what} '{spec}': cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UsageError(f"{what} '{spec}': {module_name} has no attribute '{attr}'")
    if not callable(fn):
        raise UsageError(f"{what} '{spec}': {attr} is not callable")
    return fn


def _pairs(values, what: str, separator: str = "=") -> list[tuple[str, Any]]:
    """`KEY=VALUE` strings (or (key, value) pairs from Python) as pairs."""
    pairs = []
    for v in values:
        if isinstance(v, tuple) and len(v) == 2:
            pairs.append(v)
            continue
        key, sep, value = str(v).rpartition(separator) if what == "--rank-for" else str(v).partition(separator)
        if not sep or not key:
            shape = "PATTERN=RANK" if what == "--rank-for" else "KEY=VALUE"
            raise UsageError(f"invalid {what} '{v}': expected {shape}")
        pairs.append((key, value))
    return pairs


@dataclass
class SelectOptions:
    """Which layers a rewrite may touch."""

    only: tuple = option(help="Change only layers matching PATTERN (repeatable).", metavar="PATTERN", repeat=True)
    skip: tuple = option(help="Leave layers matching PATTERN alone (repeatable). A pattern matches a node name, a "
                              "glob on it, or one '/'-separated part of it ('l1' matches '/l1/Gemm').",
                         metavar="PATTERN", repeat=True)
    filter_fn: Any = option(help="node -> bool; False leaves the node alone.", metavar="MODULE:FUNCTION")

    def __post_init__(self):
        self.only, self.skip = tuple(self.only), tuple(self.skip)
        if any(not isinstance(p, str) or not p for p in self.only + self.skip):
            raise UsageError("--only / --skip patterns must be non-empty strings")
        self.filter_fn = load_function(self.filter_fn, "--filter-fn")

    def selection(self, extra_patterns: list[tuple[str, str]] = ()) -> Selection:
        return Selection(only=list(self.only), skip=list(self.skip), filter_function=self.filter_fn,
                         extra=list(extra_patterns))


CONV_MODES = ("auto", "channel", "tucker", "spatial")


def _int_pair(text, largest: int | None = None) -> tuple[int, int] | None:
    """`AxB` as two integers in 1..largest, or None (--rank-for's Tucker ranks, --bits-for's levels)."""
    a, sep, b = str(text).partition("x")
    try:
        pair = (int(a), int(b))
    except ValueError:
        return None
    ok = sep and min(pair) >= 1 and (largest is None or max(pair) <= largest)
    return pair if ok else None


def _tucker_ranks(text: str) -> tuple[int, int]:
    """`R1xR2`: a conv's Tucker-2 ranks (input, output channels)."""
    pair = _int_pair(text)
    if pair is None:
        raise UsageError(f"invalid Tucker ranks '{text}' for --rank-for: expected R1xR2 like 16x32")
    return pair


@dataclass
class FactorOptions:
    """`factor`: how each dense layer's rank is chosen and how its factors are computed."""

    rank: Any = option(help="Rank per layer: a fraction of min(m,n) written with a '.' (0.6: 60% of min(m,n); "
                            "a square layer then keeps 1.2x its params, a 784x400 one 91%: see the report's params) "
                            "or an integer (32; '1' is rank 1, '1.0' full rank).", metavar="R", kind=str)
    budget: str | None = option(help="Choose every layer's rank (or keep it dense) so that the selected layers "
                                     "use at most fraction F of their dense params (or FLOPs per sample), losing "
                                     "as little as possible; KIND=auto: the smallest budget that passes --max-drop "
                                     "on --data.", metavar="params=F|flops=F|KIND=auto")
    energy: float | None = option(help="Smallest rank keeping share E of the sum of squared singular values.",
                                  metavar="E", kind=float)
    rank_for: tuple = option(help="Per-layer rank; first match wins (repeatable).", metavar="PATTERN=R", repeat=True)
    projection_fn: Any = option(help="W (m x n numpy array) -> rank k.", metavar="MODULE:FUNCTION")
    factor_fn: Any = option(help="(W, k) -> (U, V), replacing the SVD.", metavar="MODULE:FUNCTION")
    conv_mode: str = option("auto", "How convs are factored: channel (kxk conv to k channels, then 1x1), tucker "
                                    "(1x1, kxk core, 1x1), spatial (kx1 then 1xk), or auto: per layer the one with "
                                    "the lowest weight error at the channel mode's size.",
                            metavar="auto|channel|tucker|spatial")
    allow_growth: bool = option(False, "Factor even layers where k(m+n) >= m*n (e.g. full-rank checks).")
    seed: int = option(0, "Seed of the randomized SVD.", cli=False)

    def __post_init__(self):
        from . import linalg  # numpy: imported when a command runs, not for `onnxopt --help`
        from .budget import BudgetSpec

        if (self.rank is None and self.energy is None and self.projection_fn is None and not self.rank_for
                and self.budget is None):
            raise UsageError("give a rank: --rank 0.6, --rank 32, --energy 0.95, --budget params=0.5 or "
                             "--projection-fn")
        if self.rank is not None and self.energy is not None:
            raise UsageError("--rank and --energy exclude each other")
        self.budget_spec = None
        if self.budget is not None:
            given = [flag for flag, v in (("--rank", self.rank), ("--energy", self.energy),
                                          ("--projection-fn", self.projection_fn)) if v is not None]
            given += ["--allow-growth"] if self.allow_growth else []
            if given:
                raise UsageError(f"--budget chooses the ranks itself: drop {' and '.join(given)} (--rank-for pins "
                                 "single layers)")
            self.budget_spec = BudgetSpec.parse(self.budget)
        self.rank_spec = linalg.RankSpec.parse(self.rank) if self.rank is not None else None
        if self.energy is not None:
            linalg.parse_energy(self.energy)
        _choice(self.conv_mode, CONV_MODES, "--conv-mode")
        pairs = _pairs(self.rank_for, "--rank-for")
        self.rank_overrides = [(p, linalg.RankSpec.parse(r)) for p, r in pairs if "x" not in str(r)]
        self.tucker_overrides = [(p, _tucker_ranks(r)) for p, r in pairs if "x" in str(r)]
        self.projection_function = load_function(self.projection_fn, "--projection-fn")
        self.patterns = tuple(("--rank-for", p) for p, _ in self.rank_overrides + self.tucker_overrides)
        self.factor_function = load_function(self.factor_fn, "--factor-fn")


def _fraction(text, what: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 < value <= 1:
        raise UsageError(f"invalid {what} '{text}': give the fraction of channels to keep, in (0, 1]")
    return value


@dataclass
class PruneOptions:
    """`prune`: how many output channels each prunable layer keeps."""

    keep: float | None = option(help="Fraction of output channels (Gemm: output features) each prunable layer "
                                     "keeps, in (0, 1].", metavar="F", kind=float)
    keep_for: tuple = option(help="Per-layer fraction; first match wins (repeatable). Layers tied by a residual "
                                  "Add share one channel set: the first of them that matches decides.",
                             metavar="PATTERN=F", repeat=True)
    budget: str | None = option(help="Choose each layer's channel count so that the prunable layers keep at most "
                                     "fraction F of their params (or FLOPs per sample), losing as little as possible.",
                                metavar="params=F|flops=F")

    def __post_init__(self):
        from .budget import BudgetSpec

        if self.keep is None and not self.keep_for and self.budget is None:
            raise UsageError("give --keep F (the fraction of channels to keep, e.g. 0.5), --keep-for PATTERN=F or "
                             "--budget flops=F")
        if self.keep is not None and self.budget is not None:
            raise UsageError("--keep and --budget exclude each other (--keep-for pins single layers)")
        self.budget_spec = None if self.budget is None else BudgetSpec.parse(self.budget)
        if self.budget_spec is not None and self.budget_spec.fraction is None:
            raise UsageError(f"prune --budget takes params=F or flops=F, not {self.budget}")
        self.fraction = 1.0 if self.keep is None else _fraction(self.keep, "--keep")
        self.overrides = [(p, _fraction(f, f"--keep-for {p}")) for p, f in _pairs(self.keep_for, "--keep-for")]
        self.patterns = tuple(("--keep-for", p) for p, _ in self.overrides)


SCALES = ("channel", "tensor", "none")
STAGES = ("transform", "all")


@dataclass
class BinarizeOptions:
    """`binarize`: the scale of the binarized weights and where the pipeline stops."""

    scale: str = option("channel", f"alpha: mean |W| per output channel, one for the tensor, or 1 "
                                   f"({'|'.join(SCALES)}).", metavar="|".join(SCALES))
    stage: str = option("all", "transform: stop at the trainable BinaryConv model; all: lower to bit-packed "
                               "BitConv too.", metavar="|".join(STAGES))
    emulate: bool = option(False, "Write the transformed model in standard ONNX ops only (Greater/Where + Conv + "
                                  "Mul/Add) for external trainers; implies --stage transform. `onnxopt lower` "
                                  "reads it back.")
    weight_bits: int = option(1, "Weight levels Kw (1..4): residual binarization, one scale per level and output "
                                 "channel (netopt's MultibitKernel).", metavar="KW", kind=int)
    activation_bits: int = option(1, "Activation levels Ka (1..4): residual binarization of each sample at run time "
                                     "(netopt's Multibit); 1 is b(X) with no scale.", metavar="KA", kind=int)
    bits_for: tuple = option(help="Per-layer levels, e.g. conv3=2x2; first match wins (repeatable).",
                             metavar="PATTERN=KWxKA", repeat=True)

    def __post_init__(self):
        _choice(self.scale, SCALES, "scale")
        _choice(self.stage, STAGES, "stage")
        self.bits = (_levels(self.weight_bits, "--weight-bits"), _levels(self.activation_bits, "--activation-bits"))
        self.bits_overrides = [(p, _bits_pair(v)) for p, v in _pairs(self.bits_for, "--bits-for")]
        self.patterns = tuple(("--bits-for", p) for p, _ in self.bits_overrides)


def _levels(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4:
        raise UsageError(f"invalid {what} {value}: give a number of levels from 1 to 4")
    return value


def _bits_pair(text) -> tuple[int, int]:
    """`KWxKA`, e.g. 2x2."""
    pair = _int_pair(text, largest=4)
    if pair is None:
        raise UsageError(f"invalid --bits-for levels '{text}': expected KWxKA with levels 1..4, like 2x2")
    return pair


@dataclass
class LowerOptions:
    """`lower` (also the last step of `binarize`)."""

    keep_batchnorm: bool = option(False, "Do not fold a BatchNormalization after a lowered conv into its "
                                          "alpha/bias (folding saves a pass over the output; outputs then differ "
                                          "by float32 rounding only).")


def _check_calibration(calibration) -> None:
    if isinstance(calibration, (str, os.PathLike)) and not Path(calibration).is_file():
        raise UsageError(f"{calibration}: no such calibration file")
    if calibration is not None and not isinstance(calibration, (str, os.PathLike, dict)):
        raise UsageError("calibration must be an .npz path or a dict of arrays keyed by input name")


@dataclass
class RecoverOptions:
    """What recovers accuracy after a rewrite: calibration data, a training hook or an external trainer."""

    calibration: Any = option(help="Inputs keyed by graph input name: data-aware factors / refit of binarized "
                                   "layers.", metavar="FILE.npz", path=True)
    train_hook: Any = option(help="function(model, **hook_args) -> model: fine-tunes the transformed model "
                                  "(values only).", metavar="MODULE:FUNCTION")
    hook_arg: tuple = option(help="Keyword argument for --train-hook.", metavar="KEY=VALUE", repeat=True)
    train_cmd: str | None = option(help="External trainer, e.g. \"python train.py {input} {output}\": gets the "
                                        "transformed model, writes the trained one.", metavar="COMMAND")
    train_timeout: float | None = option(help="Stop --train-hook / --train-cmd after SECONDS (exit 1, nothing "
                                              "written).", metavar="SECONDS", kind=float)

    def __post_init__(self):
        if self.train_hook is not None and self.train_cmd is not None:
            raise UsageError("--train-hook and --train-cmd exclude each other")
        if self.train_timeout is not None and not self.train_timeout > 0:
            raise UsageError(f"invalid --train-timeout {self.train_timeout}: give a number of seconds > 0")
        if self.train_cmd is not None and ("{input}" not in self.train_cmd or "{output}" not in self.train_cmd):
            raise UsageError(f"invalid --train-cmd '{self.train_cmd}': it must contain {{input}} and {{output}}")
        self.hook_kwargs = dict(_pairs(self.hook_arg, "--hook-arg"))
        self.train_function = load_function(self.train_hook, "--train-hook")
        _check_calibration(self.calibration)

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
        if self.max_drop is not None and not 0 <= self.max_drop <= 1:
            raise UsageError(f"invalid --max-drop {self.max_drop}: give a fraction in [0, 1]")
        if self.max_drop is not None and self.data is None:  # --labels: checked with --finetune (_check_together)
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
class QuantizeOptions:
    """`quantize`: int8 through onnxruntime.quantization."""

    calibration: Any = option(help="Inputs keyed by graph input name: static int8 (QDQ, activations too); "
                                   "without it, dynamic int8 (weights; MatMul and Conv only).", metavar="FILE.npz",
                              path=True)
    per_channel: bool = option(False, "One weight scale per output channel instead of per tensor.")

    def __post_init__(self):
        _check_calibration(self.calibration)


@dataclass
class ShapeOptions:
    """Sizes for inputs the model leaves symbolic: shape inference, FLOPs and random check inputs use them."""

    input_shape: tuple = option(help="Size of a graph input with symbolic dims, e.g. x:1,3,224,224 (repeatable).",
                                metavar="NAME:D1,D2,...", repeat=True)

    def __post_init__(self):
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
    """`--finetune`: recover accuracy by distillation from the input model (train/distill.py; needs torch)."""

    finetune: Any = option(help="Fine-tune the transformed model by distillation from the input model on these "
                                "inputs (.npz keyed by input name; no labels needed). Needs torch: pip install "
                                "'onnxopt[train]'.", metavar="DATA.npz", path=True)
    epochs: int | None = option(help="Passes over the --finetune data (default 3).", metavar="N", kind=int)
    lr: float | None = option(help="Adam learning rate, decayed to 0 on a cosine (default 0.001).", metavar="X",
                              kind=float)
    batch_size: int | None = option(help="Samples per training step (default 64).", metavar="B", kind=int)
    temperature: float | None = option(help="Softmax temperature of the distillation loss on class-score outputs "
                                            "(default 4).", metavar="T", kind=float)
    finetune_seed: int = option(0, "Seed of the data order (runs are deterministic for a seed).", cli=False)

    DEFAULTS = {"epochs": 3, "lr": 1e-3, "batch_size": 64, "temperature": 4.0}

    def __post_init__(self):
        given = [k for k in self.DEFAULTS if getattr(self, k) is not None]
        if given and self.finetune is None:
            raise UsageError(f"--{given[0].replace('_', '-')} needs --finetune DATA.npz")
        for key, default in self.DEFAULTS.items():
            value = getattr(self, key)
            setattr(self, key, default if value is None else value)
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise UsageError(f"invalid --epochs {self.epochs}: give a number of passes >= 1")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise UsageError(f"invalid --batch-size {self.batch_size}: give a number of samples >= 1")
        for key in ("lr", "temperature"):
            if not (isinstance(getattr(self, key), (int, float)) and getattr(self, key) > 0):
                raise UsageError(f"invalid --{key} {getattr(self, key)}: give a number > 0")
        if isinstance(self.finetune, (str, os.PathLike)) and not Path(self.finetune).is_file():
            raise UsageError(f"{self.finetune}: no such --finetune data file")
        if self.finetune is not None:
            from .train import require_torch

            require_torch("--finetune")


# the option groups of each command, in the order the CLI lists them
COMMAND_OPTIONS: dict[str, tuple[type, ...]] = {
    "factor": (FactorOptions, RecoverOptions, FinetuneOptions, SelectOptions, CheckOptions, ShapeOptions,
               SaveOptions),
    "binarize": (BinarizeOptions, LowerOptions, RecoverOptions, FinetuneOptions, SelectOptions, CheckOptions,
                 ShapeOptions, SaveOptions),
    "prune": (PruneOptions, RecoverOptions, FinetuneOptions, SelectOptions, CheckOptions, ShapeOptions, SaveOptions),
    "lower": (LowerOptions, CheckOptions, ShapeOptions, SaveOptions),
    "quantize": (QuantizeOptions, SelectOptions, CheckOptions, ShapeOptions, SaveOptions),
}


def parse(command: str, values: dict[str, Any]) -> dict[type, Any]:
    """The option dataclasses of `command`, built (and validated) from keyword values; unknown keys are
    refused. Validation runs group by group in COMMAND_OPTIONS order, so the first error is the same for the
    API and the CLI."""
    groups = COMMAND_OPTIONS[command]
    known = {f.name: cls for cls in groups for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(f"unknown option(s) for {command}: {', '.join(unknown)}")
    groups = {cls: cls(**{k: v for k, v in values.items() if known[k] is cls}) for cls in groups}
    _check_together(groups)
    return groups


def _check_together(groups: dict[type, Any]) -> None:
    """Rules that span two option groups."""
    factor, check = groups.get(FactorOptions), groups.get(CheckOptions)
    finetune = groups.get(FinetuneOptions)
    if check.labels is not None and check.data is None and (finetune is None or finetune.finetune is None):
        raise UsageError("--labels needs --data (or --finetune): the file that holds the labels")
    if factor is not None and factor.budget_spec is not None and factor.budget_spec.fraction is None:
        if check.max_drop is None:
            raise UsageError(f"--budget {factor.budget_spec} searches for the smallest budget that passes "
                             "--max-drop: give --max-drop X and --data")
