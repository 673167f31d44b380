"""How an option is declared: `option()` makes a dataclass field that carries what the CLI needs (help, metavar,
flag, repeatable, type), so every command's click options and recipe keys come from its dataclasses; plus the
small value parsers those dataclasses share (choices, KEY=VALUE pairs, AxB, module:function)."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from dataclasses import field
from pathlib import Path
from typing import Any, Callable

from .errors import UsageError


def option(default: Any = None, help: str = "", *, metavar: str | None = None, flag: str | None = None,
           short: str | None = None, repeat: bool = False, kind: type | None = None, cli: bool = True,
           path: bool = False, argument: bool = False, required: bool = False, code: bool = False):
    """A dataclass field with what the CLI needs to declare it: help text, metavar, the flag's name when it
    is not `--field-name`, a short flag, repeatable or not, and the value type click should parse; `path`:
    a file name (a recipe resolves it against the recipe's folder); `argument`: a positional argument;
    `required`: an option the command cannot run without; `code`: its value runs code (a module:function to import,
    a shell command), so a recipe may set it only with --allow-code."""
    meta = {"help": help, "metavar": metavar, "flag": flag, "short": short, "repeat": repeat, "kind": kind,
            "cli": cli, "path": path, "argument": argument, "required": required,
            "code": code}
    if repeat:
        return field(default=(), metadata=meta)
    return field(default=default, metadata=meta)


def choice(value: str, choices: tuple[str, ...], what: str) -> str:
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


def pairs(values, what: str, separator: str = "=") -> list[tuple[str, Any]]:
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


def int_pair(text, largest: int | None = None) -> tuple[int, int] | None:
    """`AxB` as two integers in 1..largest, or None (--rank-for's Tucker ranks, --bits-for's levels)."""
    a, sep, b = str(text).partition("x")
    try:
        pair = (int(a), int(b))
    except ValueError:
        return None
    ok = sep and min(pair) >= 1 and (largest is None or max(pair) <= largest)
    return pair if ok else None


def check_calibration(calibration) -> None:
    if isinstance(calibration, (str, os.PathLike)) and not Path(calibration).is_file():
        raise UsageError(f"{calibration}: no such calibration file")
    if calibration is not None and not isinstance(calibration, (str, os.PathLike, dict)):
        raise UsageError("calibration must be an .npz path or a dict of arrays keyed by input name")


def _field_kind(fld) -> str:
    meta = fld.metadata
    if meta.get("repeat"):
        return "list"
    if fld.default is False:
        return "flag"
    return {int: "int", float: "float", str: "text"}.get(meta.get("kind"), "str")


_WANTED = {"list": "a list of strings", "flag": "true or false", "int": "an integer", "float": "a number",
           "text": "a string or a number", "str": "a string"}


def coerce(value: Any, fld, where: str, *, from_text: bool = False) -> Any:
    """A value for the option field `fld`, typed as the CLI types it: from a sweep's grid (`from_text`: parsed
    from the text, as click would) or from a recipe's TOML (checked, not converted); the one place both meet."""
    kind = _field_kind(fld)
    if from_text:
        text = str(value)
        try:
            if kind == "flag" and text.lower() not in ("true", "false"):
                raise ValueError
            return {"list": lambda: [text], "flag": lambda: text.lower() == "true", "int": lambda: int(text),
                    "float": lambda: float(text)}.get(kind, lambda: text)()
        except ValueError:
            raise UsageError(f"{where}: value '{text}' is not {_WANTED[kind]}") from None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"list": isinstance(value, list) and all(isinstance(v, str) for v in value),
          "flag": isinstance(value, bool), "float": number,
          "int": isinstance(value, int) and not isinstance(value, bool),
          "text": isinstance(value, str) or number}.get(kind, isinstance(value, str))
    if not ok:
        raise UsageError(f"{where}: '{fld.name}' must be {_WANTED[kind]}, got {value!r}")
    return value
