"""A whole VGG-style CNN (3x32x32 input, conv widths 64-128-256-512, first conv float) lowered vs its float
original in onnxruntime, plus each session's peak memory.

    python benchmarks/vgg.py            # goal: >= 3x lower latency at batch 1 and 8
    python benchmarks/vgg.py --avx2     # the same with AVX2-only numba code

The lowered model folds each BatchNormalization into its BitConv; the same model lowered with
fold_batch_norm=False must equal the transformed (BinaryConv) model bit for bit, and the folded one
within float32 rounding.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import onnx

import onnxopt
import onnxopt.api
from common import isa_label, kernel_timer, paired_ms, vgg_model

GOAL = 3.0


def peak_rss_mb(path: str, batch: int) -> dict:
    """Peak RSS (VmHWM) of a fresh process that loads onnxopt's runtime, then opens a session on `path` and
    runs it once; `imports` is the RSS before the session (numba, onnxruntime and the custom-op library;
    onnxruntime-extensions also imports torch when torch is installed, as in a dev environment)."""
    code = f"""
import json, numpy as np, onnxopt

def status(key): return int(dict(l.split(':', 1) for l in open('/proc/self/status'))[key].split()[0]) / 1024
base = status('VmRSS')
sess = onnxopt.session({path!r})
sess.run(None, {{"input": np.zeros(({batch}, 3, 32, 32), np.float32)}})
print(json.dumps({{"imports": base, "peak": status('VmHWM')}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def breakdown(lowered, batch: int, runs: int = 50) -> str:
    """Where a lowered run's time goes: onnxruntime's profiler times each node, a wrapper times the numba
    kernel inside each BitConv; the BitConv node time minus the kernel time is the custom-op bridge."""
    import onnxruntime as ort

    so = onnxopt.session_options()
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="onnxopt-profile-"), "vgg")
    sess = ort.InferenceSession(lowered.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    with kernel_timer() as kernel:
        for _ in range(runs):
            sess.run(None, {"input": x})
    profile = sess.end_profiling()
    with open(profile) as f:
        events = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    shutil.rmtree(os.path.dirname(profile))
    bit = sum(e["dur"] for e in events if e["args"].get("op_name") == "BitConv") / runs / 1e3
    other = sum(e["dur"] for e in events if e["args"].get("op_name") != "BitConv") / runs / 1e3
    calls = sum(1 for e in events if e["args"].get("op_name") == "BitConv") // runs
    numba = sum(kernel) / runs * 1e3
    return (f"batch {batch}, per run: {calls} BitConv nodes {bit:.3f} ms (numba kernels {numba:.3f} ms, bridge "
            f"{bit - numba:.3f} ms = {(bit - numba) / calls * 1e3:.0f} us/call), other nodes {other:.3f} ms")


def main():
    print(f"numba ISA: {isa_label()}; cores: {os.cpu_count()}")
    model = vgg_model()
    transformed = onnxopt.convert_to_binary_convolution(model, skip=["first_conv"])
    lowered, _ = onnxopt.api.lower(transformed)
    unfolded, _ = onnxopt.api.lower(transformed, keep_batchnorm=True)
    sessions = {name: onnxopt.session(m) for name, m in
                (("float", model), ("transformed", transformed), ("lowered", lowered), ("unfolded", unfolded))}
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    out = {name: s.run(None, {"input": x})[0] for name, s in sessions.items()}
    exact = np.array_equal(out["unfolded"], out["transformed"])
    scale = float(np.abs(out["transformed"]).max())
    folded_err = float(np.abs(out["lowered"] - out["transformed"]).max()) / scale
    print(f"lowered without BN folding == transformed model: {'bit for bit' if exact else 'NO'}; "
          f"with folding: max |diff| / max |y| = {folded_err:.1e}")
    print(f"{'batch':>5} | {'float ms':>9} {'lowered ms':>10} | {'speed-up':>8}")
    worst = float("inf")
    for batch in (1, 8):
        xb = x[:batch]
        t_float, t_low = paired_ms(lambda: sessions["float"].run(None, {"input": xb}),
                                   lambda: sessions["lowered"].run(None, {"input": xb}))
        worst = min(worst, t_float / t_low)
        print(f"{batch:>5} | {t_float:>9.3f} {t_low:>10.3f} | {t_float / t_low:>7.2f}x")
    print(f"slowest: {worst:.2f}x (goal {GOAL}x)")
    for batch in (1, 8):
        print(breakdown(lowered, batch))
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for name in ("float", "lowered"):
            path = os.path.join(tmp, f"{name}.onnx")
            onnx.save(model if name == "float" else lowered, path)
            sizes[name] = os.path.getsize(path) / 2**20
            rss = peak_rss_mb(path, 8)
            print(f"{name:>8}: file {sizes[name]:6.2f} MB; session + one batch-8 run: peak RSS "
                  f"{rss['peak']:7.1f} MB, {rss['peak'] - rss['imports']:+.1f} MB over the imports")
    return worst if exact else 0.0


if __name__ == "__main__":
    if "--avx2" in sys.argv:
        from onnxopt.kernels import AVX2_ONLY_ENV

        sys.exit(subprocess.call([sys.executable, __file__], env={**os.environ, **AVX2_ONLY_ENV}))
    sys.exit(0 if main() > 0 else 1)
