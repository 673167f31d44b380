"""A whole VGG-style CNN (3x32x32 input, conv widths 64-128-256-512, first conv float) lowered vs its float
original in onnxruntime, plus each session's peak memory.

    python benchmarks/vgg.py            # goal: >= 4x lower latency at batch 1 and 8 (AVX-512), 2.5x AVX2
    python benchmarks/vgg.py --avx2     # the same with AVX2-only numba code

The lowered model folds each BatchNormalization into its BitConv; the same model lowered with
keep_batchnorm=True must equal the transformed (BinaryConv) model bit for bit, and the folded one
within float32 rounding. onnxopt.session chains the lowered BitConv layers in packed bits (runtime/chains.py);
chained and unchained (chain=False) sessions must agree bit for bit, and both are timed.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from common import alternating_ms, isa_label, vgg_model

import onnxopt
import onnxopt.api
import onnxopt.runtime.native

GOAL = 4.0  # AVX-512; 2.5x with AVX2 only


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


def breakdown(lowered, batch: int, chain: bool, runs: int = 50) -> str:
    """Where a lowered run's time goes, per op type (onnxruntime's profiler, the session onnxopt.session builds:
    the C path, BitConv links chained in packed bits when `chain`)."""
    import onnxruntime as ort

    from onnxopt.runtime import chains

    runs_model = (chains.chained(lowered) if chain else None) or lowered
    so = onnxopt.session_options(model=runs_model)
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="onnxopt-profile-"), "vgg")
    sess = ort.InferenceSession(runs_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    for _ in range(2 * runs):
        sess.run(None, {"input": x})
    profile = sess.end_profiling()
    with open(profile) as f:
        events = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    shutil.rmtree(os.path.dirname(profile))
    per_type = {}
    for e in events[len(events) // 2:]:  # the second half: warm
        per_type[e["args"]["op_name"]] = per_type.get(e["args"]["op_name"], 0.0) + e["dur"] / runs / 1e3
    parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(per_type.items(), key=lambda kv: -kv[1]))
    return f"batch {batch}, {'chained' if chain else 'unchained'}, ms per run by op type: {parts}"


def main():
    print(f"numba ISA: {isa_label()}; cores: {os.cpu_count()}; kernel path: {onnxopt.runtime.native.path()}")
    model = vgg_model()
    transformed = onnxopt.convert_to_binary_convolution(model, skip=["first_conv"])
    lowered, _ = onnxopt.api.lower(transformed)
    unfolded, _ = onnxopt.api.lower(transformed, keep_batchnorm=True)
    sessions = {"float": onnxopt.session(model), "transformed": onnxopt.session(transformed),
                "chained": onnxopt.session(lowered), "unchained": onnxopt.session(lowered, chain=False),
                "unfolded": onnxopt.session(unfolded, chain=False)}
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    out = {name: s.run(None, {"input": x})[0] for name, s in sessions.items()}
    exact = np.array_equal(out["unfolded"], out["transformed"]) and np.array_equal(out["chained"], out["unchained"])
    scale = float(np.abs(out["transformed"]).max())
    folded_err = float(np.abs(out["unchained"] - out["transformed"]).max()) / scale
    print(f"lowered without BN folding == transformed model: {'bit for bit' if exact else 'NO'}; chained == "
          f"unchained: {'bit for bit' if np.array_equal(out['chained'], out['unchained']) else 'NO'}; "
          f"with folding: max |diff| / max |y| = {folded_err:.1e}")
    print(f"{'batch':>5} | {'float ms':>9} {'unchained ms':>12} {'chained ms':>10} | {'unchained':>9} {'chained':>8}")
    worst = float("inf")
    for batch in (1, 8):
        xb = x[:batch]
        t_float, t_plain, t_chain = alternating_ms([lambda k=k: sessions[k].run(None, {"input": xb})
                                                    for k in ("float", "unchained", "chained")])
        worst = min(worst, t_float / t_chain)
        print(f"{batch:>5} | {t_float:>9.3f} {t_plain:>12.3f} {t_chain:>10.3f} | {t_float / t_plain:>8.2f}x "
              f"{t_float / t_chain:>7.2f}x")
    print(f"slowest (chained): {worst:.2f}x (goal {GOAL}x)")
    for batch in (1, 8):
        for chain in (False, True):
            print(breakdown(lowered, batch, chain))
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
