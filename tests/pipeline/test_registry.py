"""A new command is a rules module, an options dataclass and one registry line: the API, recipes and sweeps see it."""
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from conftest import parse_model
from onnx import helper

import onnxopt
from onnxopt.errors import UsageError
from onnxopt.options import option
from onnxopt.passes.rules import Rewrite, Rule
from onnxopt.pipeline import registry
from onnxopt.pipeline.sweep import parse_grid
from onnxopt.report import LayerReport


@dataclass
class ReluOptions:
    """A toy technique's options: Relu(x) rewritten as Max(x, floor)."""

    floor: float = option(0.0, "The value Max compares with (0: the same function).", metavar="F", kind=float)

    def __post_init__(self):
        if self.floor < 0:
            raise UsageError(f"invalid --floor {self.floor}: give a value >= 0")


class ReluAsMax(Rule):
    def __init__(self, options: ReluOptions):
        self.options = options

    def check(self, node, ctx):
        return None

    def rewrite(self, node, ctx):
        floor = ctx.initializer(f"{ctx.name_of(node)}/floor", np.array(self.options.floor, np.float32))
        new = helper.make_node("Max", [node.input[0], floor.name], list(node.output), name=f"{ctx.name_of(node)}/max")
        return Rewrite([new], [floor], LayerReport(name=ctx.name_of(node), op_type="Relu", action="rewritten"))


@pytest.fixture
def relu_command():
    registry.COMMANDS["relumax"] = registry.rules_command(
        "relumax", ReluOptions, lambda o: {("", "Relu"): ReluAsMax(o)}, "relumax", "Relu as Max.")
    yield
    del registry.COMMANDS["relumax"]


MODEL = """<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 4] x) => (float[N, 4] y) {
    h = Relu(x)
    y = Neg(h)
}"""


def test_a_registered_command_runs_through_the_api_with_its_checks(relu_command):
    source = parse_model(MODEL)
    model, report = onnxopt.relumax(source, check=4)
    assert [n.op_type for n in model.graph.node] == ["Max", "Neg"]
    assert len(report.changed) == 1 and report.check["max_rel"] == 0.0
    onnx.checker.check_model(model)
    with pytest.raises(UsageError, match="invalid --floor -1"):
        onnxopt.relumax(source, floor=-1.0)
    with pytest.raises(UsageError, match="unknown option"):
        onnxopt.relumax(source, rank="0.5")


def test_recipes_and_sweeps_read_the_same_registry(relu_command):
    groups = registry.parse("relumax", {"floor": 0.5})
    assert groups[ReluOptions].floor == 0.5
    (axis,) = parse_grid(["relumax.floor=0,0.5"])
    assert axis.values == [0.0, 0.5]
    with pytest.raises(UsageError, match="unknown command 'nope'"):
        registry.parse("nope", {})
