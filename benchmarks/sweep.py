"""`onnxopt sweep`: the local process pool against Ray tasks on the same grids, same machine.

    python benchmarks/sweep.py            # needs onnxopt[ray]

Two grids of 12 candidates each: the sample CNN (prune.keep x quantize.per_channel) and the MLP (factor.budget x
quantize.per_channel), scored on their held-out digits. Each grid is built and scored twice, by a pool of 2
processes and as Ray tasks on a local one-node cluster (2 CPUs) started here, and the rows are compared (score,
size, FLOPs, per-layer figures). Latency timing is left out of both (`latency=False`): it runs in this process
after either, the same work. Wall times: Ray's start once, then each grid per executor, pool and Ray alternated
(pool, Ray, Ray, pool) so a machine that slows down over the run does not favour one.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# a single-machine cluster kept on loopback, Ray's telemetry sent to a closed local port (see tests/test_sweep.py)
CLOSED = "http://127.0.0.1:9"
os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_USAGE_STATS_REPORT_URL": CLOSED + "/", "HTTP_PROXY": CLOSED, "HTTPS_PROXY": CLOSED,
                   "NO_PROXY": "127.0.0.1,localhost"})

from onnxopt import api  # noqa: E402

MODELS = ROOT / "models"
GRIDS = {
    "cnn": (MODELS / "cnn.onnx", MODELS / "cnn_test.npz",
            ["prune.keep=1.0,0.75,0.5,0.35,0.25,0.15", "quantize.per_channel=true,false"]),
    "mlp": (MODELS / "mlp.onnx", MODELS / "mlp_test.npz",
            ["factor.budget=params=0.05,params=0.1,params=0.2,params=0.3,params=0.5,params=0.7",
             "quantize.per_channel=true,false"]),
}


def rows(result) -> list:
    return sorted((r["label"], r["score"], r["size"], r["flops"], json.dumps(r["layers"]))
                  for r in result.to_dict()["rows"])


def main() -> None:
    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    print(f"Ray local cluster start: {time.perf_counter() - start:.1f} s\n")
    print("| grid | candidates | pool (2 processes) s, each run | Ray (2 CPUs) s, each run | Ray / pool (best) "
          "| rows equal |\n|---|---|---|---|---|---|")
    for name, (model, data, grid) in GRIDS.items():
        times = {"pool": [], "ray": []}
        results = {}
        for executor in ("pool", "ray", "ray", "pool"):
            start = time.perf_counter()
            results[executor] = api.sweep(model, data, grid, latency=False,
                                          **({"jobs": 2} if executor == "pool" else {"ray": "auto"}))
            times[executor].append(time.perf_counter() - start)
        pool, on_ray = min(times["pool"]), min(times["ray"])
        same = rows(results["pool"]) == rows(results["ray"])
        each = {k: ", ".join(f"{t:.1f}" for t in v) for k, v in times.items()}
        print(f"| {name} | {len(results['pool'].rows)} | {each['pool']} | {each['ray']} | {on_ray / pool:.2f} | "
              f"{'yes' if same else 'NO'} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
