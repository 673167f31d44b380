"""The hostile review's attacks (issue 28) that are not about one module: bad labels, oversized data members,
outputs landing on inputs, code in recipes. Each failed before its fix."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, assert_clean_refusal, run_cli, sha256


def _with_labels(tmp_path, labels):
    data = dict(np.load(MODELS / "mlp_test.npz"))
    data["label"] = labels
    path = tmp_path / "bad_labels.npz"
    np.savez(path, **data)
    return path


@pytest.mark.parametrize("make, text", [
    (lambda n: np.array(["cat"] * n), "labels must be integer class indices, got <U3"),
    (lambda n: np.full(n, np.nan), "labels must be integer class indices, got NaN"),
    (lambda n: np.full(n, 0.5), "fractional"),
    (lambda n: np.full(n, 10), "labels must be class indices in 0..9"),
    (lambda n: np.full(n, -1), "labels must be class indices in 0..9"),
])
def test_labels_that_are_not_class_indices_are_usage_errors(tmp_path, make, text):
    """String or NaN labels scored both models 0.0, so `--max-drop` passed and a rank-0.01 model was written."""
    n = len(np.load(MODELS / "mlp_test.npz")["label"])
    data = _with_labels(tmp_path, make(n))
    out = tmp_path / "out.onnx"
    code, _, err = run_cli("factor", MODELS / "mlp.onnx", "--rank", "0.01", "--data", data, "--max-drop", "0.01",
                           "-o", out)
    assert code == 2 and text in err, err
    assert_clean_refusal(code, err)
    assert not out.exists()


def test_integral_float_labels_are_the_same_classes(tmp_path):
    labels = np.load(MODELS / "mlp_test.npz")["label"]
    data = _with_labels(tmp_path, labels.astype(np.float64))
    code, out, err = run_cli("compare", MODELS / "mlp.onnx", MODELS / "mlp.onnx", "--data", data)
    assert code == 0, err


@pytest.mark.slow
def test_unused_npz_members_are_not_read(tmp_path):
    """An .npz with a 1 GiB member no input names: only the inputs' members are read (6.35 GB RSS before)."""
    import subprocess
    import sys

    data = dict(np.load(MODELS / "mlp_test.npz"))
    path = tmp_path / "big.npz"
    np.savez(path, **data, unused=np.zeros(1 << 27))  # 1 GiB of float64, uncompressed
    script = ("import sys; from onnxopt.measure.feeds import load_feeds; import onnx; "
              "load_feeds(sys.argv[1], onnx.load(sys.argv[2])); "  # VmHWM: ru_maxrss carries the parent's over exec
              "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])")
    result = subprocess.run([sys.executable, "-c", script, str(path), str(MODELS / "mlp.onnx")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 300 * 1024, f"max RSS {int(result.stdout) // 1024} MB"  # kB: 48 MB now, 1072 MB before


@pytest.mark.parametrize("key, value", [
    ("train_cmd", '"touch {output}.pwned {input} {output}"'),
    ("factor_fn", '"planted:factor"'),
    ("filter_fn", '"planted:keep"'),
])
def test_recipe_keys_that_run_code_need_allow_code(tmp_path, monkeypatch, key, value):
    """A recipe is a file users share: `train_cmd` ran a shell command and `*_fn` keys imported a module from the
    current directory. Without --allow-code: one line naming the key, exit 2, nothing run or written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "planted.py").write_text("open('imported', 'w').close()\nkeep = lambda node: True\n"
                                         "def factor(w, k):\n    raise SystemExit(9)\n")
    recipe = tmp_path / "shared.toml"
    recipe.write_text(f'[[step]]\nrun = "factor"\nrank = 0.5\n{key} = {value}\n')
    out = tmp_path / "out.onnx"
    code, _, err = run_cli("apply", recipe, MODELS / "mlp.onnx", "-o", out)
    assert code == 2 and f"'{key}' runs code" in err and "--allow-code" in err, err
    assert_clean_refusal(code, err)
    assert not out.exists() and not (tmp_path / "imported").exists()
    assert not list(tmp_path.glob("*.pwned"))


def test_allow_code_lets_a_trusted_recipe_run_its_hook(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "planted.py").write_text("keep = lambda node: node.name != 'out'\n")
    recipe = tmp_path / "trusted.toml"
    recipe.write_text('[[step]]\nrun = "factor"\nrank = 0.5\nfilter_fn = "planted:keep"\n')
    out = tmp_path / "out.onnx"
    code, _, err = run_cli("apply", recipe, MODELS / "mlp.onnx", "-o", out, "--allow-code")
    assert code == 0 and out.exists(), err


# ---- every output through the same check -------------------------------------------------------------------

def _copies(tmp_path):
    import shutil

    model, data = tmp_path / "mlp.onnx", tmp_path / "test.npz"
    shutil.copy(MODELS / "mlp.onnx", model)
    shutil.copy(MODELS / "mlp_test.npz", data)
    return model, data


SMALL_GRID = ["--grid", "factor.rank=0.3,0.5"]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["model", "data", "other"])
@pytest.mark.parametrize("mode", [SMALL_GRID, ["--sensitivity", "factor.rank=0.5"]])
def test_sweep_report_never_replaces_inputs_and_needs_force(tmp_path, target, mode):
    """`sweep --report FILE` (and `--sensitivity --report`) replaced anything, the input model and data
    included, without --force."""
    model, data = _copies(tmp_path)
    other = tmp_path / "page.html"
    other.write_text("mine")
    path = {"model": model, "data": data, "other": other}[target]
    before = sha256(path)
    for force in ([], ["--force"]):
        code, _, err = run_cli("sweep", model, "--data", data, *mode, "--report", path, *force)
        if target == "other" and force:
            break
        assert_clean_refusal(code, err)
        assert ("input" in err) if target != "other" else ("exists; pass --force" in err), err
        assert sha256(path) == before


def test_keep_best_never_overwrites_its_own_input(tmp_path):
    """`sweep D/front_0.onnx --keep-best D` overwrote its own input, even when it then failed."""
    model, data = _copies(tmp_path)
    folder = tmp_path / "best"
    folder.mkdir()
    front = folder / "front_0.onnx"
    model.rename(front)
    before = sha256(front)
    for force in ([], ["--force"]):
        code, _, err = run_cli("sweep", front, "--data", data, *SMALL_GRID, "--keep-best", folder, *force)
        assert_clean_refusal(code, err)
        assert "is an input of this run" in err, err
    assert sha256(front) == before


def test_keep_best_into_a_read_only_folder_fails_before_the_work(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    model, data = _copies(tmp_path)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, _, err = run_cli("sweep", model, "--data", data, *SMALL_GRID, "--keep-best", folder)
    finally:
        folder.chmod(0o755)
    assert_clean_refusal(code, err)
    assert "cannot write here" in err and not list(folder.iterdir())


def test_keep_best_under_a_file_fails_before_the_work(tmp_path):
    model, data = _copies(tmp_path)
    code, _, err = run_cli("sweep", model, "--data", data, *SMALL_GRID, "--keep-best", data / "best")
    assert_clean_refusal(code, err)
    assert "cannot write here" in err


@pytest.mark.slow
def test_keep_best_writes_all_or_nothing(tmp_path, monkeypatch):
    """A write failing after the first front model (a full disk) leaves the folder as it was."""
    import onnx

    from onnxopt.graph import io

    model, data = _copies(tmp_path)
    folder = tmp_path / "best"
    real, calls = onnx.save_model, []

    def full_disk(proto, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(proto, path, *args, **kwargs)

    monkeypatch.setattr(io.onnx, "save_model", full_disk)
    code, _, err = run_cli("sweep", model, "--data", data, "--grid", "factor.rank=0.05,0.3,0.6,1.0",
                           "--keep-best", folder)
    assert_clean_refusal(code, err)
    assert "nothing was written" in err and len(calls) == 2, err
    assert not list(folder.iterdir())


@pytest.mark.slow
def test_keep_best_refuses_existing_fronts_without_force(tmp_path):
    model, data = _copies(tmp_path)
    folder = tmp_path / "best"
    folder.mkdir()
    (folder / "front_0.onnx").write_text("an earlier sweep's")
    code, _, err = run_cli("sweep", model, "--data", data, *SMALL_GRID, "--keep-best", folder)
    assert code == 2 and "front_0.onnx: exists; pass --force" in err, err
    code, _, err = run_cli("sweep", model, "--data", data, *SMALL_GRID, "--keep-best", folder, "--force")
    assert code == 0, err
    onnx_files = sorted(p.name for p in folder.iterdir())
    assert onnx_files and all(name.startswith("front_") for name in onnx_files)


@pytest.mark.parametrize("target", ["model", "data"])
def test_run_output_never_replaces_an_input(tmp_path, target):
    """`run -o MODEL --force` replaced the model by an npz."""
    model, data = _copies(tmp_path)
    path = model if target == "model" else data
    before = sha256(path)
    code, _, err = run_cli("run", model, "--data", data, "-o", path, "--force")
    assert_clean_refusal(code, err)
    assert "input" in err and sha256(path) == before


# ---- the .onnx and .data pair as one unit --------------------------------------------------------------

DELAYED_WRITE = """
import os, signal, sys, time
from onnxopt.graph import io
real = os.replace
def delayed(src, dst):
    if str(dst).endswith(".onnx"):  # the data file is in place; the .onnx rename comes late (or never)
        if sys.argv[3] == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(float(sys.argv[4]))
    return real(src, dst)
io.os.replace = delayed
from onnxopt.cli import main
main(["factor", sys.argv[1], "--rank", sys.argv[2], "-o", sys.argv[5], "--external-data", "--force"])
"""


def _write(rank, out, mode="sleep", delay=0.0):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", DELAYED_WRITE, str(MODELS / "mlp.onnx"), rank, mode, str(delay),
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _outputs(path):
    import onnxopt

    x = np.load(MODELS / "mlp_test.npz")["input"][:64]
    return onnxopt.run(onnxopt.load_model(path), {"input": x})


@pytest.mark.slow
def test_two_writers_racing_leave_one_consistent_pair(tmp_path):
    """Two `--external-data --force` writers of the same path, the first one's .onnx rename delayed past the
    second's whole write: the file left is one writer's model with that writer's data (before: A's tensors
    with B's data, a model that loaded and scored 0.149)."""
    out = tmp_path / "m.onnx"
    a = _write("0.3", out, delay=4.0)
    import time

    time.sleep(2.0)  # A has written its data and waits before renaming its .onnx
    b = _write("0.9", out)
    assert b.wait(timeout=300) == 0 and a.wait(timeout=300) == 0, a.stderr.read() + b.stderr.read()
    got = _outputs(out)
    wants = [_outputs_of_rank(tmp_path, rank) for rank in ("0.3", "0.9")]
    assert any(all(np.array_equal(got[k], want[k]) for k in got) for want in wants)
    referenced = {p.name for p in tmp_path.glob("m.onnx.*.data")}
    assert referenced  # the .onnx's data is there; an orphan of the losing writer may be, never a torn pair


def _outputs_of_rank(tmp_path, rank):
    import onnxopt

    model, _ = onnxopt.factor(MODELS / "mlp.onnx", rank=rank)
    x = np.load(MODELS / "mlp_test.npz")["input"][:64]
    return onnxopt.run(model, {"input": x})


@pytest.mark.slow
def test_sigterm_between_the_two_renames_leaves_the_old_pair(tmp_path):
    """SIGTERM after the data file is in place, before the .onnx rename: the .onnx that was there still loads
    with its own data and outputs (before: an .onnx that no longer loaded); the new data file is removed."""
    out = tmp_path / "m.onnx"
    first = _write("0.5", out)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    before = _outputs(out)
    files = sorted(p.name for p in tmp_path.iterdir())
    stopped = _write("0.2", out, mode="term")
    assert stopped.wait(timeout=300) == 143, stopped.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    after = _outputs(out)
    assert all(np.array_equal(before[k], after[k]) for k in before)


# ---- sweep processes ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sweep_of_a_lowered_model_with_two_jobs(tmp_path):
    """Workers forked after onnxruntime/numba started OpenMP threads aborted ('fork() called from a process
    already using GNU OpenMP', exit 143); they start from a clean forkserver now."""
    import onnxopt

    lowered = tmp_path / "cnn_bin.onnx"
    onnxopt.binarize(MODELS / "cnn.onnx", skip=["first_conv"], output=lowered)
    code, out, err = run_cli("sweep", lowered, "--data", MODELS / "cnn_test.npz", "--grid",
                             "factor.rank=0.3,0.6", "--jobs", "2")
    assert code == 0, err
    code, out, err = run_cli("sweep", lowered, "--data", MODELS / "cnn_test.npz", "--sensitivity",
                             "factor.rank=0.5")
    assert code == 0, err


def test_grids_are_capped(tmp_path):
    values = ",".join(str(v / 1000) for v in range(1, 102))
    code, _, err = run_cli("sweep", MODELS / "mlp.onnx", "--data", MODELS / "mlp_test.npz", "--grid",
                           f"factor.rank={values}", "--grid", f"quantize.per_channel={','.join(['true'] * 100)}")
    assert code == 2 and "10,100 candidates, over the limit of 10,000" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_sweep_at_once(tmp_path, sig):
    """SIGTERM or SIGINT to a sweep waited for the whole queue (8 minutes after the signal on a large one): it
    stops now, its workers with it, and writes nothing. The bound asserted is loose (30 s, against minutes) so
    that a busy machine does not fail it; the figure measured is printed."""
    import signal
    import subprocess
    import sys
    import time

    values = ",".join(str(v / 100) for v in range(1, 100))
    report, best = tmp_path / "page.html", tmp_path / "best"
    proc = subprocess.Popen([sys.executable, "-m", "onnxopt", "sweep", str(MODELS / "mlp.onnx"), "--data",
                             str(MODELS / "mlp_test.npz"), "--grid", f"factor.rank={values}", "--jobs", "2",
                             "--keep-best", str(best), "--report", str(report), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # imports, the reference scored, workers started on the queue
    assert proc.poll() is None, proc.stderr.read()
    start = time.monotonic()
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=120)
    took = time.monotonic() - start
    print(f"\n{sig}: the sweep stopped {took:.1f} s after the signal")
    assert proc.returncode in (130, 143), proc.stderr.read()
    assert took < 30
    assert not report.exists() and not (best.exists() and list(best.iterdir()))
    leftover = subprocess.run(["pgrep", "-f", "multiprocessing.forkserver|multiprocessing.spawn"],
                              capture_output=True, text=True).stdout.split()
    time.sleep(1)
    assert not [pid for pid in leftover if _parent_is(pid, proc.pid)]


def _parent_is(pid: str, parent: int) -> bool:
    try:
        return int(open(f"/proc/{pid}/stat").read().split(")")[-1].split()[1]) == parent
    except OSError:
        return False


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("command", [["factor", "--rank", "0.3"], ["quantize"]])
def test_nan_in_calibration_data_names_the_input(tmp_path, bad, command):
    """NaN/Inf in calibration data: 'internal error: LinAlgError' before."""
    data = dict(np.load(MODELS / "mlp_calib.npz"))
    data["input"] = data["input"].copy()
    data["input"][3, 5] = bad
    path = tmp_path / "calib.npz"
    np.savez(path, **data)
    code, _, err = run_cli(*command[:1], MODELS / "mlp.onnx", *command[1:], "--calibration", path,
                           "-o", tmp_path / "out.onnx")
    assert_clean_refusal(code, err)
    assert "calibration input 'input' has NaN or infinite values" in err, err


RO_SCRIPT = """
set -e
mount --bind "$1" "$1"
mount -o remount,bind,ro "$1"
cd /
HOME=/dev/null PYTHONPATH="$1" PATH=/nonexistent "$2" -m onnxopt --version
HOME=/dev/null PYTHONPATH="$1" PATH=/nonexistent "$2" -m onnxopt run "$3" --data "$4"
echo ---pyop--- >&2
HOME=/dev/null PYTHONPATH="$1" ONNXOPT_KERNEL_PATH=pyop "$2" -m onnxopt run "$3" --data "$4"
"""


@pytest.mark.slow
def test_read_only_install_with_an_unwritable_home(tmp_path):
    """A read-only install (a read-only bind mount), a HOME nobody can write and no compiler on PATH: the lowered
    model runs on the native library built at install, touching no cache at all. On the PyOp bridge (numba),
    which failed with 'cannot cache function', it runs too, compiling into a temporary folder, with one warning."""
    import os
    import shutil
    import subprocess
    import sys

    import onnxopt

    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs unshare and mount for a read-only bind mount")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no mount namespace here (needs root)")
    install = tmp_path / "install"
    shutil.copytree(Path(onnxopt.__file__).parent, install / "onnxopt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    lowered = tmp_path / "cnn_bin.onnx"
    onnxopt.binarize(MODELS / "cnn.onnx", skip=["first_conv"], output=lowered)
    data = tmp_path / "x.npz"
    np.savez(data, input=np.load(MODELS / "cnn_test.npz")["input"][:4])
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "ONNXOPT_CACHE_DIR")}
    result = subprocess.run(["unshare", "-m", "sh", "-c", RO_SCRIPT, "sh", str(install), sys.executable,
                             str(lowered), str(data)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "onnxopt 0.1" in result.stdout and "native library" in result.stdout, result.stdout
    assert result.stdout.count("shape [4, 10]") == 2, result.stdout
    native, bridge = result.stderr.split("---pyop---")
    assert "numba" not in native and "warning" not in native, native
    assert "no writable numba cache" in bridge and "cannot cache" not in bridge


def _edit_emulated(tmp_path, edit):
    import onnx

    import onnxopt

    model, _ = onnxopt.binarize(MODELS / "cnn.onnx", skip=["first_conv"], emulate=True)
    edit(model)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return model, path


def _flip_comparison(model):
    next(n for n in model.graph.node if n.op_type == "Greater" and "x_pos" in n.output[0]).op_type = "Less"


def _swap_where(model):
    where = next(n for n in model.graph.node if n.op_type == "Where")
    where.input[1], where.input[2] = where.input[2], where.input[1]


def _move_threshold(model):
    from onnx import numpy_helper

    greater = next(n for n in model.graph.node if n.op_type == "Greater")
    zero = numpy_helper.from_array(np.array(0.5, np.float32), "edited_threshold")
    model.graph.initializer.append(zero)
    greater.input[1] = zero.name


@pytest.mark.parametrize("edit", [_flip_comparison, _swap_where, _move_threshold])
def test_lower_reads_back_only_the_pattern_it_wrote(tmp_path, edit):
    """`lower` of an edited --emulate model found the marker and lowered the layer as if unedited (3.5% agreement
    with the edited model). Now an edited layer is declined with the reason and stays as it is."""
    import onnxopt

    model, path = _edit_emulated(tmp_path, edit)
    lowered, report = onnxopt.lower(path, keep_batchnorm=True)
    declined = [x for x in report.layers if x.action == "skipped" and "pattern before it was changed" in x.reason]
    x = np.load(MODELS / "cnn_test.npz")["input"][:200]
    want = onnxopt.session(model).run(None, {"input": x})[0].argmax(1)
    got = onnxopt.session(lowered).run(None, {"input": x})[0].argmax(1)
    assert (want == got).mean() >= 0.99  # the other layers lowered: the same ±1 sums, rounding only
    assert len(declined) == 1


@pytest.mark.slow
def test_pyop_after_the_c_path_in_a_fresh_cache(tmp_path):
    """Fresh numba cache; the C path runs a lowered model, then the PyOp path twice: the second PyOp process
    segfaulted (exit 139). The first PyOp process compiled bit_conv around the C path's cached bit_conv_into, and
    the cached bit_conv no longer started numba's thread pool when it loaded."""
    import os
    import subprocess
    import sys

    import onnxopt

    lowered = tmp_path / "resnet.onnx"
    onnxopt.binarize(Path(__file__).parent / "data" / "resnet18_tiny_legacy.onnx", skip=["/conv1/Conv"],
                     output=lowered)
    data = tmp_path / "x.npz"
    np.savez(data, input=np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32))
    printed = []
    for path in ("c", "pyop", "pyop"):
        env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "ONNXOPT_KERNEL_PATH": path}
        out = tmp_path / f"out_{len(printed)}.npz"
        result = subprocess.run([sys.executable, "-m", "onnxopt", "run", lowered, "--data", data, "-o", out],
                                capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, (path, result.returncode, result.stderr[-2000:])
        printed.append(dict(np.load(out)))
    for other in printed[1:]:
        for name, value in printed[0].items():
            np.testing.assert_array_equal(other[name], value)  # the same kernel arithmetic on both paths


TINY_KERNEL = ("import numpy as np; from onnxopt.kernels import bitconv; "
               "print(bitconv.output_shape(1, 8, 8, 3, 3, 4, np.array([2, 1, 1, 1, 1, 1, 1, 1, 1, 0, 4], np.int64)))")


class _Payload:
    """What another local user plants as a numba cache index: unpickling it creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_a_planted_numba_cache_is_not_loaded(tmp_path):
    """numba unpickles its cache index: a cache folder others can write into (NUMBA_CACHE_DIR, ~/.cache/numba)
    ran a planted index as the victim. Such a folder is passed over now, with one warning."""
    import os
    import pickle
    import subprocess
    import sys

    private, shared, marker = tmp_path / "private", tmp_path / "shared", tmp_path / "planted-code-ran"
    ran = subprocess.run([sys.executable, "-c", TINY_KERNEL], env={**os.environ, "NUMBA_CACHE_DIR": str(private)},
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert list(private.rglob("*.nbi"))  # the names numba looks up for these kernels
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # writable by every local user, not sticky
    for made in private.rglob("*.*"):  # the indexes, planted; the rest (source digests) as they are
        planted = shared / made.relative_to(private)
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.write_bytes(pickle.dumps(_Payload(marker)) if made.suffix == ".nbi" else made.read_bytes())
    victim = subprocess.run([sys.executable, "-c", TINY_KERNEL], env={**os.environ, "NUMBA_CACHE_DIR": str(shared)},
                            capture_output=True, text=True, timeout=300)
    assert victim.returncode == 0, victim.stderr
    assert not marker.exists(), "the planted cache index ran"
    assert "not using numba's cache" in victim.stderr and "writable by others" in victim.stderr, victim.stderr
    assert victim.stdout == ran.stdout
