"""Memory of fine-tuning a ResNet-18-size model (issue 31: within 24 GiB): torchvision's resnet18 layout at 224x224
(models/reference_nets.py, seeded random weights), binarized but for the stem and fine-tuned by layer-wise
distillation on N images. The teacher's outputs and tapped tensors for N images outgrow the 2 GiB cache, so they
are recomputed per batch; the peak resident memory of the process is printed with what it held.

    python benchmarks/recovery_memory.py [--images 2048] [--batch-size 32] [--steps 10]    # needs torch ('.[train]')
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from common import isa_label
from real_models import resnet18_exports

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxopt import api  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = resnet18_exports(Path(tmp), exporters=("legacy",), dynamic_batch=True)[0]
        stem = next(n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv")
        # smooth random images (noise blurred by a 4x4 block upsampling), ImageNet-normalized scale
        rng = np.random.default_rng(0)
        coarse = rng.normal(0, 1, (args.images, 3, 56, 56)).astype(np.float32)
        images = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)
        data = Path(tmp) / "images.npz"
        np.savez(data, input=images)
        data_bytes = images.nbytes
        del images, coarse
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        start = time.perf_counter()
        _, report = api.binarize(str(path), skip=[stem], finetune=data, steps=args.steps,
                                 batch_size=args.batch_size)
        took = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        f = report.finetune
        print(f"{isa_label()}; resnet18 224x224, {args.images} images ({data_bytes / 2**30:.2f} GiB), batch "
              f"{args.batch_size}, {f['steps']} steps, {f['matched_tensors']} matched tensors, teacher "
              f"{'cached' if f['teacher_cached'] else 'recomputed per batch'}: peak RSS {peak:.2f} GiB "
              f"(before fine-tuning {before:.2f} GiB), {took:.0f} s ({f['seconds'] / max(f['steps'], 1):.1f} s a "
              f"step incl. setup)")


if __name__ == "__main__":
    main()
