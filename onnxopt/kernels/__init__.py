"""Compute kernels, apart from graph code: numba bit-packed convolution and numpy references."""
from __future__ import annotations

# numba compiles for the host CPU. This environment makes it emit AVX2-only code (no AVX-512, no VPOPCNTQ)
# in a fresh process, for testing and benchmarking that code path on an AVX-512 machine; compiled kernels
# are cached per CPU name and features, so the two never mix.
AVX2_ONLY_ENV = {
    "NUMBA_CPU_NAME": "haswell",
    "NUMBA_CPU_FEATURES": "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+lzcnt,+movbe,+popcnt,+sse,+sse2,"
                          "+sse3,+sse4.1,+sse4.2,+ssse3,+xsave",
}


def ensure_numba_cache() -> None:
    """numba caches compiled kernels beside their source or in ~/.cache/numba; where neither is writable (a
    read-only install, an unwritable HOME) every `cache=True` function failed with 'cannot cache function'. Then
    numba is pointed at a fresh temporary folder (compiled again per process), with one warning. Runs when this
    package is imported, before any kernel module is decorated."""
    import os
    import sys
    import tempfile
    from pathlib import Path

    try:  # numba's cache layout is not public API: if it moves, numba's own behaviour stays
        from numba.core import config
        from numba.core.caching import CacheImpl

        source = str(Path(__file__).resolve().with_name("geometry.py"))
        if any(cls.from_function(ensure_numba_cache, source) for cls in CacheImpl._locator_classes):
            return
        config.CACHE_DIR = tempfile.mkdtemp(prefix="onnxopt-numba-")
        os.environ["NUMBA_CACHE_DIR"] = config.CACHE_DIR  # for worker processes too
        print(f"onnxopt: warning: no writable numba cache (install folder and HOME read-only); compiled kernels "
              f"go to {config.CACHE_DIR} for this run", file=sys.stderr)
    except Exception:  # noqa: BLE001
        pass


ensure_numba_cache()


def drop_stale_numba_caches() -> None:
    """numba keys a cached function on its own file's timestamp only, so a cached function keeps running the
    callees it was compiled with after their file changed (kernels/multibit.py, kernels/chain.py and the C entry
    points in runtime/cabi*.py call into kernels/bitconv.py; it happened in development: an old kernel in a
    benchmark, a C-vs-PyOp mismatch in a test). A digest of all those sources, kept beside each file's cache,
    drops the cache when any of them changed. Called before the first kernel loads (kernels/bitconv.py's import)."""
    import hashlib
    from pathlib import Path

    try:  # numba's cache layout is not public API: if it moves, numba's own behaviour stays
        from numba.core.caching import CacheImpl

        root = Path(__file__).resolve().parent.parent
        sources = sorted(root.glob("kernels/*.py")) + sorted(root.glob("runtime/cabi*.py"))
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
        for source in sources:
            locator = next(filter(None, (cls.from_function(drop_stale_numba_caches, str(source))
                                         for cls in CacheImpl._locator_classes)))
            folder = Path(locator.get_cache_path())
            stamp = folder / f"{source.stem}.sources-digest"
            if stamp.exists() and stamp.read_text() == digest:
                continue
            for cached in folder.glob(f"{source.stem}.*.nb[ic]"):
                cached.unlink(missing_ok=True)
            folder.mkdir(parents=True, exist_ok=True)
            stamp.write_text(digest)
    except Exception:  # noqa: BLE001
        pass


def start_thread_pool() -> None:
    """Start numba's thread pool before a cached kernel runs. A cached function that calls a parallel kernel links
    against the pool's scheduler; when that caller was compiled against a callee loaded from the cache (the C path
    compiled bit_conv_into, then the PyOp path compiled bit_conv around it), the cached caller no longer starts the
    pool when it loads, and its first call jumps into a pool that is not there (segfault, or 'LLVM ERROR: Symbol
    not found: allocate_sched'). `get_num_threads` starts the pool as a side effect (~10 ms). Called when
    kernels/bitconv.py is imported, which every parallel kernel module imports."""
    import numba

    numba.get_num_threads()
