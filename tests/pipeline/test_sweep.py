"""`onnxopt sweep`: grid, candidates run as the pipeline runs them, Pareto front, JSON, --keep-best, HTML report."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import onnx
import pytest
from conftest import MODELS, cli

from onnxopt import api
from onnxopt.pipeline.sweep import pareto

GRID = ["--grid", "factor.rank=0.05,0.3", "--grid", "quantize.per_channel=true,false"]


def test_pareto_marks_the_undominated():
    rows = [{"score": 0.9, "size": 100, "latency_ms": 1.0}, {"score": 0.8, "size": 50, "latency_ms": 1.0},
            {"score": 0.8, "size": 100, "latency_ms": 1.0}, {"score": 0.95, "size": 200, "latency_ms": 2.0}]
    pareto(rows)
    assert [r["front"] for r in rows] == [True, True, False, True]


@pytest.mark.slow
def test_sweep_command_line(tmp_path):
    """Four candidates (factor rank x int8 scale kind) on the MLP, scored on the held-out digits; the front's models
    written; the same rows from one process and from a pool of two."""
    best = tmp_path / "best"
    r = cli("sweep", MODELS / "mlp.onnx", "--data", MODELS / "mlp_test.npz", *GRID, "--json", "--jobs", "2",
            "--keep-best", best)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    rows = result["rows"]
    assert len(rows) == 4 and result["reference"]["metric"] == "accuracy"
    assert {row["label"] for row in rows} == {f"factor.rank={a} quantize.per_channel={b}"
                                              for a in ("0.05", "0.3") for b in (True, False)}
    front = [row for row in rows if row["front"]]
    assert front and all(row["size"] < result["reference"]["size"] for row in rows)
    for row in front:  # nothing else is better on every measure
        assert not any(o["score"] >= row["score"] and o["size"] <= row["size"] and o["latency_ms"] <= row["latency_ms"]
                       and (o["score"], o["size"], o["latency_ms"]) != (row["score"], row["size"], row["latency_ms"])
                       for o in rows)
    saved = sorted(best.glob("front_*.onnx"))
    assert len(saved) == len(front)
    for path in saved:
        onnx.checker.check_model(onnx.load(path))
    serial = api.sweep(MODELS / "mlp.onnx", MODELS / "mlp_test.npz", GRID[1::2], jobs=1, latency=False)
    assert sorted((row["label"], row["score"], row["size"]) for row in serial.to_dict()["rows"]) == \
        sorted((row["label"], row["score"], row["size"]) for row in rows)


@pytest.mark.parametrize("grid, text", [
    ("factor.rnak=0.3", "factor has no option 'rnak'"),
    ("binarize.activation_bits=two", "value 'two' is not an integer"),
    ("sweep.rank=0.3", "'sweep' is not a command"),
    ("factor.rank", "expected STEP.OPTION=V1,V2"),
    ("prune.keep=0.5,1.5", "candidate 'prune.keep=1.5': invalid --keep '1.5'"),
])
def test_bad_grid(grid, text):
    r = cli("sweep", MODELS / "cnn.onnx", "--data", MODELS / "cnn_test.npz", "--grid", grid)
    assert r.returncode == 2 and text in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome", "chrome") if shutil.which(b)), None)


def _screenshot(page, tmp_path, height=2400):
    """Headless Chromium renders `page`: (the screenshot as an RGB array, the page's console messages)."""
    from matplotlib.image import imread

    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium): the page was checked as text only")
    shot = tmp_path / "shot.png"
    run = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          f"--screenshot={shot}", f"--window-size=1200,{height}", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert shot.exists(), run.stderr
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    return imread(shot)[..., :3], console


@pytest.mark.slow
def test_html_report(tmp_path):
    """The page: four charts (score vs size and vs latency, per-layer params and FLOPs), the table, the per-layer
    table, nothing fetched; rendered by Chromium with no console message, neither blank nor without the front's
    red marks."""
    pytest.importorskip("matplotlib")
    page = tmp_path / "report.html"
    result = api.sweep(MODELS / "mlp.onnx", MODELS / "mlp_test.npz", ["factor.rank=0.05,0.3"], report=page)
    text = page.read_text()
    assert text.count("<svg") == 4 and "Pareto front" in text and "per-layer parameters" in text
    assert not any(tag in text for tag in ("<script", "src=", "<link", "@import", 'href="http'))  # nothing fetched
    assert all(row["label"] in text for row in result.rows)
    assert all(name in text for name in ("/l1/Gemm", "/l2/Gemm", "/out/Gemm"))  # the per-layer table
    pixels, console = _screenshot(page, tmp_path)
    assert console == []
    ink = (pixels < 0.9).any(axis=2)
    assert ink.mean() > 0.03, f"only {ink.mean():.1%} of the screenshot is not white"
    red = (pixels[..., 0] > 0.7) & (pixels[..., 1] < 0.35) & (pixels[..., 2] < 0.35)
    assert red.sum() > 50  # the front's stars and line (#d33)


@pytest.mark.slow
def test_sensitivity_report(tmp_path):
    pytest.importorskip("matplotlib")
    page = tmp_path / "sens.html"
    r = cli("sweep", MODELS / "mlp.onnx", "--data", MODELS / "mlp_test.npz", "--sensitivity", "factor.rank=0.05,0.5",
            "--report", page)
    assert r.returncode == 0, r.stderr
    text = page.read_text()
    assert text.count("<svg") == 1 and "one layer at a time" in text and "/out/Gemm" in text
    pixels, console = _screenshot(page, tmp_path, height=700)
    assert console == [] and (pixels < 0.9).any(axis=2).mean() > 0.015  # a blank page: 0


@pytest.mark.slow
def test_sensitivity_one_layer_at_a_time():
    """Each cell changes one layer only: the MLP's output layer (10 classes) at rank 0.05 hurts far more than its
    first layer at the same rank, and a larger rank never scores much lower on the same layer."""
    result = api.sensitivity(MODELS / "mlp.onnx", MODELS / "mlp_test.npz", "factor.rank=0.05,0.5")
    scores = {(r["layer"], r["value"]): r["score"] for r in result["rows"]}
    assert {layer for layer, _ in scores} == {"/l1/Gemm", "/l2/Gemm", "/out/Gemm"}
    assert scores[("/out/Gemm", "0.05")] < scores[("/l1/Gemm", "0.05")] - 0.2
    for layer in ("/l1/Gemm", "/l2/Gemm", "/out/Gemm"):
        assert scores[(layer, "0.5")] >= scores[(layer, "0.05")] - 0.01
    r = cli("sweep", MODELS / "mlp.onnx", "--data", MODELS / "mlp_test.npz", "--sensitivity", "factor.rank=0.05")
    assert r.returncode == 0 and "/out/Gemm" in r.stdout and "rank=0.05" in r.stdout, r.stderr
    r = cli("sweep", MODELS / "mlp.onnx", "--data", MODELS / "mlp_test.npz")
    assert r.returncode == 2 and "give --grid" in r.stderr


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster on the loopback address, as `ray start --head` makes one; torn down after."""
    pytest.importorskip("ray")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Keep every connection on loopback (checked with strace): on Linux Ray swaps 127.0.0.1 for the host's network
    # address unless told it is a single-machine cluster; its dashboard asks cloud metadata servers and a usage
    # server for telemetry even with usage stats off: both sent to a closed loopback port. A test cluster that
    # only this machine reaches, hence no auth token.
    closed = "http://127.0.0.1:9"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_REPORT_URL": closed + "/", "HTTP_PROXY": closed,
           "HTTPS_PROXY": closed, "NO_PROXY": "127.0.0.1,localhost"}
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={tempfile.mkdtemp(prefix='ray')}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + 90
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.3)
    yield f"127.0.0.1:{port}", env
    head.terminate()
    head.wait(60)


def _rows(stdout: str) -> list:
    return sorted((r["label"], r["score"], r["size"], r["flops"], json.dumps(r["layers"]))
                  for r in json.loads(stdout)["rows"])


@pytest.mark.slow
def test_ray_runs_the_same_rows_as_the_pool(ray_head):
    """The four MLP candidates as Ray tasks on a running cluster: the same scores, sizes, FLOPs and per-layer
    figures as the local pool (latency is measured here either way)."""
    address, env = ray_head
    args = ["sweep", MODELS / "mlp.onnx", "--data", MODELS / "mlp_test.npz", *GRID, "--json"]
    on_ray = subprocess.run([sys.executable, "-m", "onnxopt", *map(str, args), "--ray", address], env=env,
                            capture_output=True, text=True, timeout=600)
    assert on_ray.returncode == 0, on_ray.stderr
    pooled = cli(*args, "--jobs", "2")
    assert pooled.returncode == 0, pooled.stderr
    assert _rows(on_ray.stdout) == _rows(pooled.stdout) and len(_rows(pooled.stdout)) == 4


@pytest.mark.slow
def test_bad_ray_address():
    pytest.importorskip("ray")
    for extra, text in ((["--ray", "127.0.0.1:9"], "no Ray cluster answers"),
                        (["--ray", "nowhere"], "expected host:port"),
                        (["--ray", "auto", "--jobs", "2"], "replaces --jobs")):
        r = cli("sweep", MODELS / "mlp.onnx", "--data", MODELS / "mlp_test.npz", "--grid", "factor.rank=0.1", *extra)
        assert r.returncode == 2 and text in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _busy_ray_workers() -> list[str]:
    """Ray worker processes running a candidate (Ray names a worker's process after the task it runs)."""
    found = subprocess.run(["pgrep", "-f", "ray::run_candidate"], capture_output=True, text=True).stdout.split()
    return [pid for pid in found if pid != str(os.getpid())]


@pytest.mark.slow
def test_a_signal_cancels_the_ray_tasks(ray_head):
    """SIGTERM to a sweep on Ray: ray.init had replaced onnxopt's handler with its own (a stack dump, exit 1, no
    cleanup). Now: exit 143, and no worker runs a candidate a few seconds after the signal (loose bound: 20 s).
    Ray also tears a job's workers down when its driver exits; the explicit cancel is for a sweep that fails in a
    process that goes on (the API)."""
    import signal

    address, env = ray_head
    values = ",".join(str(v / 100) for v in range(1, 60))
    proc = subprocess.Popen([sys.executable, "-m", "onnxopt", "sweep", str(MODELS / "mlp.onnx"), "--data",
                             str(MODELS / "mlp_test.npz"), "--grid", f"factor.rank={values}", "--ray", address,
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not _busy_ray_workers():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 143, proc.stderr.read()
    deadline = time.monotonic() + 20
    while _busy_ray_workers():
        assert time.monotonic() < deadline, f"Ray still runs candidates: {_busy_ray_workers()}"
        time.sleep(0.5)
