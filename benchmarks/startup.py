"""Cold start: `onnxopt --help`, and the first run of a lowered model in a new process with the numba
kernel cache cold (compiles) and warm (loads the cached machine code).

    python benchmarks/startup.py        # goals: --help <= 0.5 s; the warm first run shows no compile
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time

import onnx
from common import conv_model

import onnxopt

FIRST_RUN = """
import time, numpy as np
t0 = time.perf_counter()
import onnxopt
sess = onnxopt.session({path!r})
t1 = time.perf_counter()
sess.run(None, {{"x": np.ones((1, 64, 56, 56), np.float32)}})
t2 = time.perf_counter()
sess.run(None, {{"x": np.ones((1, 64, 56, 56), np.float32)}})
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def seconds(cmd, env=None, repeat=5):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    cli = [sys.executable, "-m", "onnxopt", "--help"]
    help_s = seconds(cli)
    print(f"onnxopt --help: {help_s:.3f} s (goal <= 0.5 s)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lowered.onnx")
        onnx.save(onnxopt.binarize_convolution(conv_model(64, 64)), path)
        env = {**os.environ, "NUMBA_CACHE_DIR": os.path.join(tmp, "numba-cache")}  # starts empty
        for label in ("cold cache (compiles)", "warm cache (2nd process)", "warm cache (3rd process)"):
            out = subprocess.run([sys.executable, "-c", FIRST_RUN.format(path=path)], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            load, first, second = (float(v) for v in out)
            print(f"{label:>26}: import + session {load:.2f} s, first run {first * 1e3:8.1f} ms, "
                  f"second run {second * 1e3:6.2f} ms")
    return help_s


if __name__ == "__main__":
    sys.exit(0 if main() <= 0.5 else 1)
