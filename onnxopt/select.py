"""Which nodes a pass touches.

Pattern rule (`--only` / `--skip`, also `--rank-for`): a pattern matches a node when it equals the
node's name, matches it as a shell glob (`*conv*`), or equals one `/`-separated component of a
PyTorch-style name (`l1` matches `/l1/Gemm`, `first_conv` matches `/first_conv/Conv`).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import onnx


def matches(name: str, pattern: str) -> bool:
    if name == pattern or fnmatch.fnmatchcase(name, pattern):
        return True
    return pattern in [part for part in name.split("/") if part]


@dataclass
class Selection:
    """`only`/`skip` patterns plus an optional netopt-style `filter_function(node) -> bool`."""

    only: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    filter_function: Callable[[onnx.NodeProto], bool] | None = None

    def decline_reason(self, node: onnx.NodeProto, name: str) -> str | None:
        """None if the node is selected, else why not."""
        if self.only and not any(matches(name, p) for p in self.only):
            return "not matched by --only"
        hit = next((p for p in self.skip if matches(name, p)), None)
        if hit is not None:
            return f"skipped by pattern '{hit}'"
        if self.filter_function is not None and not self.filter_function(node):
            return "declined by filter function"
        return None

    extra: list[tuple[str, str]] = field(default_factory=list)  # (flag, pattern) of per-layer options

    def unused_patterns(self, names: list[str]) -> list[tuple[str, str]]:
        """(flag, pattern) for each pattern that matches none of `names`."""
        given = [("--only", p) for p in self.only] + [("--skip", p) for p in self.skip] + self.extra
        return [(flag, p) for flag, p in given if not any(matches(n, p) for n in names)]
