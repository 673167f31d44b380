"""The pattern rule on real torch exports: resnet18's module names at 1/16 of its width, written by the legacy
and by the dynamo exporter (`python benchmarks/real_models.py --write-test-models tests/data`)."""
import json

import pytest
from conftest import ROOT, run_cli

import onnxopt
from onnxopt.errors import UsageError

DATA = ROOT / "tests" / "data"
EXPORTS = ["legacy", "dynamo"]


def _matched(exporter, **options):
    _, report = onnxopt.factor(DATA / f"resnet18_tiny_{exporter}.onnx", rank="0.5", conv_mode="channel",
                               allow_growth=True, **options)
    return {m["pattern"]: m["layers"] for m in report.patterns}, report


@pytest.mark.parametrize("exporter", EXPORTS)
@pytest.mark.parametrize("pattern,count", [
    ("conv1", 1),  # the stem only: a bare word is a path from the root, not any block's conv1
    ("layer1.0.conv1", 1),
    ("layer1", 4),  # a prefix at a '.' takes the whole stage
    ("layer2.0", 3),  # conv1, conv2 and the downsample conv
    ("*.conv1", 8),  # a glob reaches every block's conv1
    ("layer*.downsample*", 3),
    ("fc", 1),
])
def test_patterns_match_module_paths_on_both_exporters(exporter, pattern, count):
    matched, report = _matched(exporter, skip=[pattern])
    assert len(matched[pattern]) == count, matched
    skipped = [x for x in report.layers if x.reason == f"--skip '{pattern}'"]
    assert len(skipped) == count


def test_both_exporters_select_the_same_layers():
    """Node names differ completely (`/layer1/layer1.0/conv1/Conv` vs `node_Conv_295`); the selections agree."""
    kept = {}
    for exporter in EXPORTS:
        _, report = _matched(exporter, skip=["conv1", "layer4"], rank_for=["*.conv2=2"])
        kept[exporter] = [(x.op_type, x.shape, x.rank) for x in report.changed]
    assert kept["legacy"] == kept["dynamo"] and len(kept["legacy"]) == 15


def test_dynamo_fused_conv_is_found_by_its_weight_name():
    """The dynamo exporter fuses BatchNormalization into the conv and scopes the conv under the BN: the
    conv's weight keeps its parameter name, and its module path comes from there."""
    matched, _ = _matched("dynamo", only=["layer3.1.conv2"])
    assert len(matched["layer3.1.conv2"]) == 1


@pytest.mark.parametrize("exporter", EXPORTS)
def test_a_pattern_matching_nothing_names_close_layers(exporter):
    with pytest.raises(UsageError, match=r"--skip pattern 'layer1.0.conv3' matches no .* \(close: layer1.0.conv"):
        _matched(exporter, skip=["layer1.0.conv3"])


def test_json_report_says_what_each_pattern_matched(tmp_path):
    code, out, err = run_cli("factor", DATA / "resnet18_tiny_legacy.onnx", "--rank", "0.5", "--skip", "layer1",
                             "--json", "-o", tmp_path / "r.onnx")
    assert code == 0, err
    (entry,) = json.loads(out)["patterns"]
    assert entry["flag"] == "--skip" and len(entry["layers"]) == 4


def test_reports_and_inspect_name_layers_by_module_path():
    """A dynamo export's nodes are `node_Conv_295`: reports and `inspect` showed only that, although `--skip
    layer1.0.conv1` matched it. Both show the module path now, with the node name."""
    from onnxopt.report import inspect_table

    model = DATA / "resnet18_tiny_dynamo.onnx"
    rows = {r["name"]: r for r in onnxopt.inspect(model)["layers"]}
    assert rows["node_Conv_295"]["module"] == "layer1.0.conv1"  # the conv's weight, not the fused BN's scope
    assert "layer1.0.conv1 (node_Conv_295)" in inspect_table(onnxopt.inspect(model))
    _, report = onnxopt.factor(model, rank="0.5", conv_mode="channel", skip=["layer1.0.conv1"])
    shown = report.table()
    assert "layer1.0.conv1 (node_Conv_295)" in shown and "skipped" in shown.split("layer1.0.conv1 (")[1][:200]
    assert "layer2.0.conv2 (node_Conv_310)" in shown
