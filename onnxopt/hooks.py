"""User functions named on the command line as `package.module:function`."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

from .errors import UsageError


def load_function(spec: str, what: str = "hook") -> Callable:
    """Import `module:function` (the current directory is searched too, as `python -m` would)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"invalid {what} '{spec}': expected module:function, e.g. mypkg.rank:choose")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
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
