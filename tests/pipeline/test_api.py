"""The library's shape: API entry points, API/CLI agreement, the README's examples, the import graph."""
import ast
import re
import shlex
import shutil
import sys

import pytest
from conftest import MODELS, ROOT, cli, run_cli, sha256

import onnxopt
from onnxopt.errors import GateFailed, UsageError

PACKAGE = ROOT / "onnxopt"


# ---- API/CLI agreement: the same bad input, the same message ----------------------------------------

@pytest.mark.parametrize("command,kwargs,argv", [
    ("factor", {}, []),
    ("factor", {"rank": "0"}, ["--rank", "0"]),
    ("factor", {"rank": "1.5"}, ["--rank", "1.5"]),
    ("factor", {"rank": 2, "energy": 0.9}, ["--rank", "2", "--energy", "0.9"]),
    ("factor", {"energy": 1.5}, ["--energy", "1.5"]),
    ("factor", {"rank": 4, "rank_for": ["nothing_here=2"]}, ["--rank", "4", "--rank-for", "nothing_here=2"]),
    ("factor", {"rank": 4, "rank_for": ["noequals"]}, ["--rank", "4", "--rank-for", "noequals"]),
    ("factor", {"rank": 4, "skip": ["nothing_here"]}, ["--rank", "4", "--skip", "nothing_here"]),
    ("factor", {"rank": 4, "only": ["nothing_here"]}, ["--rank", "4", "--only", "nothing_here"]),
    ("factor", {"rank": 4, "projection_fn": "nomodule:f"}, ["--rank", "4", "--projection-fn", "nomodule:f"]),
    ("factor", {"rank": 4, "check": 0}, ["--rank", "4", "--check", "0"]),
    ("factor", {"rank": 4, "max_error": -1.0}, ["--rank", "4", "--max-error", "-1"]),
    ("factor", {"rank": 4, "train_hook": "a:b", "train_cmd": "t {input} {output}"},
     ["--rank", "4", "--train-hook", "a:b", "--train-cmd", "t {input} {output}"]),
    ("factor", {"rank": 4, "train_cmd": "python train.py"}, ["--rank", "4", "--train-cmd", "python train.py"]),
    ("factor", {"rank": 4, "train_timeout": 0.0}, ["--rank", "4", "--train-timeout", "0"]),
    ("factor", {"rank": 4, "hook_arg": ["novalue"]}, ["--rank", "4", "--hook-arg", "novalue"]),
    ("factor", {"budget": "params=1.5"}, ["--budget", "params=1.5"]),
    ("factor", {"budget": "foo=0.5"}, ["--budget", "foo=0.5"]),
    ("factor", {"budget": "params=0"}, ["--budget", "params=0"]),
    ("factor", {"budget": "params=0.5", "rank": "0.5"}, ["--budget", "params=0.5", "--rank", "0.5"]),
    ("factor", {"budget": "params=0.5", "energy": 0.9}, ["--budget", "params=0.5", "--energy", "0.9"]),
    ("factor", {"budget": "params=auto"}, ["--budget", "params=auto"]),
    ("factor", {"budget": "params=0.001"}, ["--budget", "params=0.001"]),
    ("factor", {"budget": "params=0.3", "rank_for": ["l1=1.0"]}, ["--budget", "params=0.3", "--rank-for", "l1=1.0"]),
    ("factor", {"rank": 4, "max_drop": 0.01}, ["--rank", "4", "--max-drop", "0.01"]),
    ("factor", {"rank": 4, "max_drop": 2.0, "data": "x.npz"}, ["--rank", "4", "--max-drop", "2", "--data", "x.npz"]),
    ("binarize", {"scale": "weird"}, ["--scale", "weird"]),
    ("binarize", {"stage": "later"}, ["--stage", "later"]),
    ("binarize", {"calibration": "missing.npz"}, ["--calibration", "missing.npz"]),
])
def test_api_and_cli_refuse_with_the_same_message(tmp_path, command, kwargs, argv):
    model = MODELS / ("mlp.onnx" if command == "factor" else "cnn.onnx")
    with pytest.raises(UsageError) as api_error:
        getattr(onnxopt, command)(model, output=tmp_path / "out.onnx", **kwargs)
    code, _, err = run_cli(command, model, *argv, "-o", tmp_path / "out.onnx")
    assert code == 2
    assert err.strip() == f"onnxopt: error: {api_error.value}"
    assert not (tmp_path / "out.onnx").exists()


def test_unknown_keyword_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown option.*rnak"):
        onnxopt.factor(MODELS / "mlp.onnx", rnak="0.5")


# ---- the API does what the CLI does ------------------------------------------------------------------

def test_api_check_gate_and_save(tmp_path):
    out = tmp_path / "f.onnx"
    model, report = onnxopt.factor(MODELS / "mlp.onnx", rank="1.0", allow_growth=True, data=MODELS / "mlp_test.npz",
                                   max_error=1e-4, output=out)
    assert report.output == str(out) and out.exists() and report.check["max_rel"] < 1e-4
    assert report.steps == ["factor", "check"]
    with pytest.raises(GateFailed, match="exceeds --max-error") as failed:
        onnxopt.factor(MODELS / "mlp.onnx", rank=2, check=4, max_error=0.01, output=tmp_path / "x.onnx")
    assert failed.value.report.check["max_rel"] > 0.01 and not (tmp_path / "x.onnx").exists()
    with pytest.raises(GateFailed, match="no layer was changed"):
        onnxopt.factor(MODELS / "mlp.onnx", rank="1.0", strict=True)


def test_api_never_writes_over_its_input(tmp_path):
    src = tmp_path / "m.onnx"
    shutil.copy(MODELS / "mlp.onnx", src)
    before = sha256(src)
    with pytest.raises(UsageError, match="is the input model"):
        onnxopt.factor(src, rank="0.5", output=src, force=True)
    assert sha256(src) == before


def test_binarize_pipeline_report_is_one_object():
    lowered, report = onnxopt.binarize(MODELS / "cnn.onnx", skip=["first_conv"])
    assert report.steps == ["binarize", "lower", "fold"]
    rows = {x.name: x for x in report.layers}
    assert rows["/conv2/Conv"].action == "binarized" and rows["/conv2/Conv"].bytes_after == 64 * 9 * 8
    assert [n.op_type for n in lowered.graph.node].count("BitConv") == 2


@pytest.mark.slow
def test_run_check_compare(tmp_path):
    trainable, _ = onnxopt.binarize(MODELS / "cnn.onnx", skip=["first_conv"], stage="transform")
    native, _ = onnxopt.lower(trainable)
    outputs = onnxopt.run(native, MODELS / "cnn_test.npz")
    assert outputs["logits"].shape == (1000, 10)
    assert onnxopt.check(trainable, native, data=MODELS / "cnn_test.npz")["max_rel"] == 0.0
    same = onnxopt.compare(MODELS / "cnn.onnx", MODELS / "cnn.onnx", MODELS / "cnn_test.npz", max_drop=0)
    assert same["top1_agreement"] == 1.0
    with pytest.raises(GateFailed, match="more than --max-drop"):
        onnxopt.compare(MODELS / "cnn.onnx", native, MODELS / "cnn_test.npz", max_drop=0.01)


def test_hooks_leave_sys_path_as_it_was(tmp_path, monkeypatch):
    (tmp_path / "myhooks.py").write_text("def keep(model, **kw):\n    return model\n")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    onnxopt.binarize(MODELS / "cnn.onnx", skip=["first_conv"], stage="transform", train_hook="myhooks:keep")
    assert sys.path == before


def test_importing_the_package_registers_nothing():
    code = ("import onnxopt, onnxopt.api, onnxopt.runtime, onnxopt.runtime.pyop as p, sys; "
            "assert p._library_path is None and not p._ours; print('clean')")
    r = __import__("subprocess").run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr


# ---- README ----------------------------------------------------------------------------------------

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _blocks(lang: str, pages=DOCS) -> list[str]:
    return [b for page in pages for b in re.findall(rf"```{lang}\n(.*?)```", page.read_text(), flags=re.S)]


def test_readme_is_the_door():
    """The README stays short (the reference lives in docs/) and every link in README and docs/ resolves."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            assert target.startswith("http") or (page.parent / target).exists(), (page, target)


@pytest.mark.slow
def test_readme_python_api_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    for block in [b for b in _blocks("python") if "import onnxopt" in b]:
        exec(compile(block, "README.md", "exec"), {})


def _doc_commands() -> list[list[str]]:
    """Every `onnxopt ...` line of the README's and docs' bash blocks (continuations joined), except those that
    need what a test machine lacks: a user's train.py or module."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("onnxopt ") and not re.search(r"finetune_ste|train\.py|mypkg", line):
                commands.append(shlex.split(line)[1:])
    return commands


@pytest.mark.slow
def test_readme_and_docs_commands_run(tmp_path):
    shutil.copytree(MODELS, tmp_path / "models", ignore=shutil.ignore_patterns("*.py"))
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("*.py"))
    commands = _doc_commands()
    assert len(commands) >= 10
    for args in commands:  # in order, as a reader copies them: no example overwrites another's output
        r = cli(*args, cwd=tmp_path)
        assert r.returncode == 0, (args, r.stderr)


# ---- the import graph --------------------------------------------------------------------------------

def import_graph() -> dict[str, set[str]]:
    """module → package modules it imports (function-level imports included)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import x` may name a submodule
                    sub = f"{module}.{alias.name}"
                    targets.add(sub if (ROOT / (sub.replace(".", "/") + ".py")).exists()
                                or (ROOT / sub.replace(".", "/")).is_dir() else module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("onnxopt")}
        graph[name] = {t for t in targets if t != name}
    return graph


def _cycle(graph):
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for m in graph.get(n, ()):
            if state.get(m) == "open":
                return stack + [m]
            if m not in state:
                found = visit(m, stack + [m])
                if found:
                    return found
        state[n] = "done"
        return None

    for n in graph:
        if n not in state:
            found = visit(n, [n])
            if found:
                return found
    return None


# the layers, bottom up: a module imports only from its own layer or below (within a layer, no cycle)
LAYERS = [
    ("onnxopt.errors", "onnxopt.options", "onnxopt.report"),
    ("onnxopt.kernels",),
    ("onnxopt.graph",),
    ("onnxopt.passes",),
    ("onnxopt.runtime",),
    ("onnxopt.measure",),
    ("onnxopt.recover",),
    ("onnxopt.pipeline",),
    ("onnxopt.api", "onnxopt.netopt", "onnxopt"),
    ("onnxopt.cli", "onnxopt.__main__"),
]


def layer_of(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    assert best is not None, f"{module} is in no layer"
    return best[0]


def test_import_graph_has_no_cycle_and_no_upward_arrow():
    graph = import_graph()
    assert _cycle(graph) is None, _cycle(graph)
    upward = [f"{m} -> {t}" for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m)]
    assert not upward, upward


def test_each_technique_folder_imports_no_other_technique():
    graph = import_graph()
    crossing = [f"{m} -> {t}" for m, targets in graph.items() for t in targets
                if m.startswith("onnxopt.passes.") and t.startswith("onnxopt.passes.")
                and len(m.split(".")) > 3 and len(t.split(".")) > 3 and m.split(".")[2] != t.split(".")[2]]
    assert not crossing, crossing


def test_top_level_is_the_public_surface_only():
    """Besides the packages, the top level holds the entry points and the three base modules."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == {"__init__", "__main__", "api", "cli", "netopt", "errors", "options", "report"}, modules


def test_no_function_over_sixty_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.name}")
    assert not long


if __name__ == "__main__":  # the import graph, for the closing note
    for module, targets in sorted(import_graph().items()):
        print(f"{module} -> {', '.join(sorted(targets)) or '-'}")


def test_the_cli_imports_neither_numpy_nor_onnx_before_a_command_runs():
    """`onnxopt --help` in 0.1 s instead of 0.3 s: heavy imports happen where a command needs them."""
    import subprocess

    code = "import sys, onnxopt.cli; print(sorted(m for m in ('numpy', 'onnx', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_check_n_on_a_fixed_batch_model_runs_n_inputs():
    """`--check 4` on a batch-1 export checked 1 sample (the random batch could only be the model's): it runs 4
    feeds of one sample now, each its own random input."""
    import numpy as np
    import onnx

    from onnxopt.measure.feeds import random_feed_batches

    model = ROOT / "tests" / "data" / "resnet18_tiny_dynamo.onnx"
    _, report = onnxopt.factor(model, rank="0.5", conv_mode="channel", check=4)
    assert report.check["samples"] == 4
    batches = random_feed_batches(onnx.load(str(model)), 4)
    assert len(batches) == 4 and not np.array_equal(batches[0]["input"], batches[1]["input"])
    _, report = onnxopt.factor(MODELS / "mlp.onnx", rank="0.5", check=5)  # a free batch dim: one feed of 5
    assert report.check["samples"] == 5
