"""Recipes: `onnxopt apply RECIPE.toml MODEL -o OUT` runs commands in order on one model, then the gates, as one
CI step. The schema (one place, so that recipes written by hand and by tools agree):

    [[step]]                    one table per step, run in order
    run = "factor"              a command: factor, binarize, lower, quantize
    budget = "params=0.5"       its options: the long option names with '-' → '_', typed as the CLI parses them
    calibration = "calib.npz"   (repeatable options are lists; flags are true/false)
    [gate]                      optional; checked on the final model against MODEL, nothing written on failure
    data = "test.npz"           the gate options of every command: data, labels, max_drop, min_speedup, max_size,
    max_drop = 0.01             max_error, check
Paths (calibration, data) are relative to the recipe file. A recipe meant for any model names no data: `apply
--calibration/--finetune` give every step that takes them their data, `--data/--labels` the gate's (and replace
the recipe's). Output options (output, force, ...) belong to `apply` itself, gates to [gate]; anything else is
refused with the file and the key named (exit 2).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from ..errors import UsageError
from ..options import coerce
from . import options as opt
from . import registry
from .registry import COMMANDS

STEP_EXCLUDED = (opt.SaveOptions, opt.CheckOptions, opt.ShapeOptions)  # apply's own, the [gate] table's


@dataclass
class Recipe:
    path: Path
    steps: list[tuple[str, dict[str, Any]]]  # (command, option keywords), validated
    gate: dict[str, Any]  # CheckOptions keywords


def _fields(groups) -> dict[str, dataclasses.Field]:
    return {f.name: f for cls in groups for f in dataclasses.fields(cls)}


def _typed(value: Any, fld: dataclasses.Field, where: str, base: Path) -> Any:
    """The value, checked against the type the CLI would parse; paths resolved against the recipe's folder."""
    value = coerce(value, fld, where)
    return str(base / value) if fld.metadata.get("path") else value


def _table(values: dict, allowed: dict[str, dataclasses.Field], where: str, base: Path,
           allow_code: bool = False) -> dict[str, Any]:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise UsageError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(allowed))})")
    code = [k for k in values if allowed[k].metadata.get("code")]
    if code and not allow_code:  # a recipe is a file users share: running what it names needs the user's word
        raise UsageError(f"{where}: '{code[0]}' runs code (a module to import or a shell command); pass "
                         "--allow-code (allow_code=True) if you trust this recipe")
    return {k: _typed(v, allowed[k], where, base) for k, v in values.items()}


GATE_DATA = ("data", "labels")  # what `given` puts into the [gate]; its other keys go to each step that takes them


def load(path: str | Path, allow_code: bool = False, given: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe: every step's options are parsed as the command would parse them, so a bad
    recipe fails before the model is read. Keys that run code are refused unless `allow_code`. `given`: data
    named on the command line (calibration, finetune, data, labels; paths as given), which replace the recipe's."""
    given = given or {}
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"step", "gate"})
    if unknown:
        raise UsageError(f"{path}: unknown key '{unknown[0]}' (a recipe has [[step]] tables and one [gate])")
    steps_data = data.get("step", [])
    if not isinstance(steps_data, list) or not steps_data or not all(isinstance(s, dict) for s in steps_data):
        raise UsageError(f"{path}: no steps: give one or more [[step]] tables with run = \"COMMAND\"")
    base = path.parent
    gate = data.get("gate", {})
    if not isinstance(gate, dict):
        raise UsageError(f"{path}: 'gate' must be a table")
    gate = _table(gate, _fields([opt.CheckOptions]), f"{path}: [gate]", base)
    gate.update({k: v for k, v in given.items() if k in GATE_DATA})
    _prefixed(lambda: opt.CheckOptions(**gate), f"{path}: [gate]")
    steps = []
    for i, table in enumerate(steps_data, 1):
        command = table.get("run")
        where = f"{path}: step {i}"
        if command not in COMMANDS:
            raise UsageError(f"{where}: 'run' must name a command ({', '.join(COMMANDS)}), got {command!r}")
        groups = [g for g in registry.command(command).groups if g not in STEP_EXCLUDED]
        fields = _fields(groups)
        options = _table({k: v for k, v in table.items() if k != "run"}, fields, f"{where} ({command})", base,
                         allow_code)
        options.update({k: v for k, v in given.items() if k in fields and k not in GATE_DATA})
        # parsed with the gate's options, as the step runs: a search (budget=auto) reads the gate's data
        _prefixed(lambda: registry.parse(command, {**options, **gate}), f"{where} ({command})")
        steps.append((command, options))
    return Recipe(path, steps, gate)


def _prefixed(build, where: str):
    try:
        return build()
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
