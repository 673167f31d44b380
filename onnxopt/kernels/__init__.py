"""Compute kernels, apart from graph code: numba bit-packed convolution and numpy references, and native/ (the same
arithmetic in C, for the custom-op library). Importing this package does not import numba (graph code and
serving read geometry.py and packing.py); the numba modules set up its cache first (bitconv.py)."""
from __future__ import annotations

from .cache import drop_stale_numba_caches, ensure_numba_cache, start_thread_pool  # noqa: F401 (their home)

# numba compiles for the host CPU. This environment makes it emit AVX2-only code (no AVX-512, no VPOPCNTQ)
# in a fresh process, for testing and benchmarking that code path on an AVX-512 machine; compiled kernels
# are cached per CPU name and features, so the two never mix.
AVX2_ONLY_ENV = {
    "NUMBA_CPU_NAME": "haswell",
    "NUMBA_CPU_FEATURES": "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+lzcnt,+movbe,+popcnt,+sse,+sse2,"
                          "+sse3,+sse4.1,+sse4.2,+ssse3,+xsave",
}
