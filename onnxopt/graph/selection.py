"""Which nodes a pass touches.

Pattern rule (`--only`, `--skip`, `--rank-for` and every per-layer option). A layer is known by its node name
and by its module paths: the torch module that made it, read from the dynamo exporter's
`pkg.torch.onnx.name_scopes` metadata, from the legacy exporter's node name (`/layer1/layer1.0/conv1/Conv` →
`layer1.0.conv1`), and from its weight's parameter name (`layer1.0.conv1.weight` → `layer1.0.conv1`; the dynamo
exporter fuses BatchNormalization into the conv and then scopes the conv under the BN). A pattern matches a layer
when it equals the node name or matches it as a shell glob (`*conv*`), or when, on a module path, it names the
path or a prefix of it at a '.' from the root (`layer1` matches all of layer1, `layer1.0.conv1` that one conv,
`conv1` only the stem's conv1, never `layer1.0.conv1`) or matches the path as a glob (`*.conv1`: every block's).
"""
from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # annotations only: `onnxopt --help` should not pay for importing onnx
    import onnx


NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def _module_of_scopes(text: str) -> str | None:
    """The module of a dynamo node: its scopes are module paths from the root (''), then the op's own name."""
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list) or len(scopes) < 2:
        return None
    module = scopes[-2]
    return module if isinstance(module, str) and module else None


def _module_of_legacy_name(name: str) -> str | None:
    """`/layer1/layer1.0/conv1/Conv` → `layer1.0.conv1`: each scope is a full path or a child's attribute name."""
    parts = [p for p in name.split("/") if p]
    if not name.startswith("/") or len(parts) < 2:
        return None
    path = ""
    for part in parts[:-1]:  # the last part is the op
        path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
    return path


def layer_paths(node: onnx.NodeProto) -> tuple[str, ...]:
    """The torch module paths a node carries (none for graphs from elsewhere)."""
    paths = []
    scopes = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES), None)
    if scopes:
        paths.append(_module_of_scopes(scopes))
    paths.append(_module_of_legacy_name(node.name))
    if len(node.input) > 1 and node.input[1].endswith(".weight"):
        paths.append(node.input[1][: -len(".weight")])
    return tuple(dict.fromkeys(p for p in paths if p))


def module_path(node: onnx.NodeProto) -> str:
    """The module path reports show beside the node name ('' when none): the weight's parameter path first (a
    dynamo-fused conv's scopes name its BatchNormalization, its weight keeps the conv's name), else the first of
    `layer_paths`."""
    paths = layer_paths(node)
    weight = node.input[1][: -len(".weight")] if len(node.input) > 1 and node.input[1].endswith(".weight") else ""
    return weight if weight in paths else (paths[0] if paths else "")


def matches(name: str, pattern: str, paths: tuple[str, ...] = ()) -> bool:
    if name == pattern or fnmatch.fnmatchcase(name, pattern):
        return True
    return any(p == pattern or p.startswith(pattern + ".") or fnmatch.fnmatchcase(p, pattern) for p in paths)


@dataclass
class Selection:
    """`only`/`skip` patterns plus an optional netopt-style `filter_function(node) -> bool`."""

    only: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    filter_function: Callable[[onnx.NodeProto], bool] | None = None
    extra: list[tuple[str, str]] = field(default_factory=list)  # (flag, pattern) of per-layer options

    def decline_reason(self, node: onnx.NodeProto, name: str) -> str | None:
        """None if the node is selected, else why not."""
        paths = layer_paths(node)
        if self.only and not any(matches(name, p, paths) for p in self.only):
            return "not matched by --only"
        hit = next((p for p in self.skip if matches(name, p, paths)), None)
        if hit is not None:
            return f"--skip '{hit}'"
        if self.filter_function is not None and not self.filter_function(node):
            return "declined by filter function"
        return None

    def given(self) -> list[tuple[str, str]]:
        return [("--only", p) for p in self.only] + [("--skip", p) for p in self.skip] + self.extra

    def matched(self, layers: list[tuple[str, tuple[str, ...]]]) -> list[dict]:
        """For each pattern given, the candidate layers (name, paths) it matches."""
        return [{"flag": flag, "pattern": p, "layers": [n for n, paths in layers if matches(n, p, paths)]}
                for flag, p in self.given()]
