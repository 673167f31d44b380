"""Every graph kind in zoo.py through every command, the way CI runs them: the command either writes a
valid model that computes the right thing, or refuses with one clear line; it never crashes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_clean_refusal, run_cli, sha256
from zoo import KINDS, feeds_for

import onnxopt

COMMANDS = ("factor", "binarize", "lower", "prune", "quantize", "run", "inspect")
# Valid models are refused only where onnxruntime itself cannot run the input (and says why).
EXPECTED_REFUSALS = {("empty and repeated node names", "run"): "two nodes with same node name",
                     # the quantizer writes opset-11 ops; outputs keep the input's opset
                     ("IR 3, opset 9", "quantize"): "quantize needs opset >= 11",
                     ("IR 4, opset 9", "quantize"): "quantize needs opset >= 11",
                     ("IR 5, opset 10", "quantize"): "quantize needs opset >= 11"}


def assert_valid_output(source: onnx.ModelProto, path: Path):
    out = onnx.load(str(path))
    onnx.checker.check_model(out)
    assert out.ir_version == source.ir_version
    opsets = {o.domain: o.version for o in out.opset_import}
    assert {k: v for k, v in opsets.items() if k != "com.onnxopt"} == \
           {("" if o.domain == "ai.onnx" else o.domain): o.version for o in source.opset_import}
    onnxopt.session(out)  # loads in onnxruntime
    return out


def unique_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as onnxruntime can load it: repeated node names suffixed (what the commands do too)."""
    from onnxopt.graph.nodes import rename_repeated

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    rename_repeated(copy.graph)
    return copy


def outputs(model, feeds):
    return onnxopt.session(model).run(None, feeds)  # as `onnxopt run` runs it


def run_command(kind: str, command: str, tmp_path: Path) -> dict:
    """Run one command on one graph kind; returns what happened, for the assertions and the table."""
    model = KINDS[kind]()
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "model.onnx"
    onnx.save(model, str(src))
    digest = sha256(src)
    out = tmp_path / "out.onnx"
    feeds = feeds_for(model)
    target = src
    if command == "factor":  # full rank: the factored model must reproduce the original's outputs
        args = ["factor", src, "--rank", "1.0", "--allow-growth", "-o", out, "-q"]
    elif command in ("binarize", "quantize"):
        args = [command, src, "-o", out, "-q"]
    elif command == "prune":
        args = ["prune", src, "--keep", "0.5", "-o", out, "-q"]
    elif command == "lower":  # lower reads the trainable form
        target = tmp_path / "transformed.onnx"
        code, _, err = run_cli("binarize", src, "--stage", "transform", "-o", target, "-q")
        if code:
            return {"code": code, "err": err, "stage": "binarize --stage transform"}
        args = ["lower", target, "-o", out, "-q"]
    elif command == "run":
        np.savez(tmp_path / "feeds.npz", **feeds)
        args = ["run", src, "--data", tmp_path / "feeds.npz", "-o", tmp_path / "outputs.npz"]
    else:
        args = ["inspect", src]
    code, stdout, err = run_cli(*args)
    assert sha256(src) == digest, "the input model was modified"
    return {"code": code, "out": stdout, "err": err, "model": model, "feeds": feeds, "output": out,
            "target": target, "tmp": tmp_path}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_graph_kind(kind, command, tmp_path):
    result = run_command(kind, command, tmp_path)
    refusal = EXPECTED_REFUSALS.get((kind, command))
    assert bool(result["code"]) == bool(refusal), result["err"]
    if result["code"]:
        assert_clean_refusal(result["code"], result["err"])
        assert refusal in result["err"]
        assert not result["output"].exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
        return
    assert "internal error" not in result["err"]
    model, feeds = result["model"], result["feeds"]
    if command == "run":
        with np.load(tmp_path / "outputs.npz") as saved:
            want = outputs(model, feeds)
            got = [saved[o.name] for o in model.graph.output]
        for w, g in zip(want, got):
            np.testing.assert_array_equal(w, g)
    elif command == "inspect":
        assert result["out"].strip()
    else:
        new = assert_valid_output(model, result["output"])
        reference = onnx.load(str(result["target"])) if command == "lower" else unique_names(model)
        want, got = outputs(reference, feeds), outputs(new, feeds)
        for w, g in zip(want, got):
            assert w.shape == g.shape
            if command == "factor":  # full rank in float32 (float16: its own precision)
                tol = 2e-2 if w.dtype == np.float16 else 1e-4
                np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, float(np.abs(w).max())))
            elif command == "lower":  # BatchNormalization folding: float32 rounding only
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(w).max())))


@pytest.mark.parametrize("command", [["factor", "--rank", "0.3"], ["prune", "--keep", "0.5"], ["quantize"],
                                     ["binarize"]], ids=lambda c: c[0])
def test_constant_node_weights_leave_nothing_behind(command, tmp_path):
    """Exporters such as Paddle's keep every weight in a Constant node. Each weight-removing command writes a
    smaller file than its input, and none of the Constant weights it replaced stays in the file (before: prune
    kept the old Constants beside new initializers, quantize left the weights float: files grew)."""
    model = KINDS["weights as Constant nodes"]()
    onnx.save(model, str(tmp_path / "m.onnx"))
    code, out, err = run_cli(command[0], tmp_path / "m.onnx", *command[1:], "-o", tmp_path / "o.onnx", "-q")
    assert code == 0, err
    assert (tmp_path / "o.onnx").stat().st_size < 0.9 * (tmp_path / "m.onnx").stat().st_size, out
    assert "grows" not in err
    new = assert_valid_output(model, tmp_path / "o.onnx")
    assert not [n for n in new.graph.node if n.op_type == "Constant"]  # every weight became an initializer
    firsts = [line.split(":")[0] for line in out.splitlines() if ":" in line]
    changed = "changed layers' weights, as their ops store them"
    assert firsts.index("model file") < (firsts.index(changed) if changed in firsts else len(firsts))


def test_a_growing_file_is_warned_about(tmp_path):
    onnx.save(KINDS["weights as Constant nodes"](), str(tmp_path / "m.onnx"))
    code, _, err = run_cli("factor", tmp_path / "m.onnx", "--rank", "1.0", "--allow-growth", "-o",
                           tmp_path / "o.onnx", "-q")
    assert code == 0 and "warning: the model file grows" in err, err


def _changed(model: onnx.ModelProto | onnx.GraphProto, op_type: str) -> int:
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    return sum(n.op_type == op_type for n in graph.node)


def test_expected_outcomes_for_notable_kinds(tmp_path):
    """What the matrix above only checks for validity, here checked for what was done."""
    r = run_command("weights behind Reshape/ConstantOfShape chains", "factor", tmp_path / "a")
    assert r["code"] == 0 and _changed(onnx.load(str(r["output"])), "Gemm") == 0  # both Gemms factored
    r = run_command("depthwise, grouped and 1x1 convs", "binarize", tmp_path / "b")
    assert "depthwise" in r["out"] and "grouped" in r["out"]
    assert _changed(onnx.load(str(r["output"])), "BitConv") == 1  # only the 1x1 conv
    r = run_command("Gemm/Conv/MatMul in If/Loop/Scan bodies", "factor", tmp_path / "c")
    for path in ("if/then_branch/then_gemm", "if/else_branch/else_gemm", "loop/body/loop_conv",
                 "scan/body/scan_matmul"):  # the bodies' layers are candidates too, named by where they are
        assert path in r["out"]
    r = run_command("Gemm/Conv/MatMul in If/Loop/Scan bodies", "binarize", tmp_path / "c2")
    body = next(a.g for n in onnx.load(str(r["output"])).graph.node if n.op_type == "Loop" for a in n.attribute)
    assert _changed(body, "BitConv") == 1 and "loop/body/loop_conv" in r["out"]
    r = run_command("Conv + BatchNormalization", "binarize", tmp_path / "d")
    lowered = onnx.load(str(r["output"]))
    assert _changed(lowered, "BatchNormalization") == 0 and "folded" in r["out"]
    r = run_command("float16", "binarize", tmp_path / "e")
    assert r["code"] == 0 and "not float32" in r["out"]
    r = run_command("IR 3, opset 9", "binarize", tmp_path / "f")
    out = onnx.load(str(r["output"]))
    assert {i.name for i in out.graph.input} >= {t.name for t in out.graph.initializer}


def outcome_table() -> str:
    """Markdown table of kind × command outcomes (used for the closing note: `python tests/zoo.py`)."""
    import tempfile

    rows = ["| graph kind | " + " | ".join(COMMANDS) + " |", "|---|" + "---|" * len(COMMANDS)]
    for kind in KINDS:
        cells = []
        for command in COMMANDS:
            with tempfile.TemporaryDirectory() as tmp:
                r = run_command(kind, command, Path(tmp))
            if r["code"]:
                cells.append("refused: " + r["err"].strip().splitlines()[-1].removeprefix("onnxopt: error: "))
            elif command in ("run", "inspect"):
                cells.append("ok")
            else:
                actions = {"factored", "binarized", "lowered", "folded"}
                changed = [line for line in r["out"].splitlines()
                           if actions & set(line.split()) and not line.startswith("total") and "skipped:" not in line]
                skipped = [line for line in r["out"].splitlines() if "skipped:" in line or "left intact" in line]
                cells.append(f"transformed {len(changed)}" + (f", left {len(skipped)}" if skipped else ""))
        rows.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
