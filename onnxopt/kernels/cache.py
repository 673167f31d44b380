"""numba's on-disk cache of compiled kernels, made safe to use: only private folders, never stale code, and the
thread pool that cached parallel kernels need."""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path


def unsafe_because(path: Path) -> str | None:
    """Why native code under `path` could have been planted by another local user, or None: `path` must be
    ours (or root's) and writable by nobody else, and each folder above it ours or root's, and not writable by
    others unless sticky (like /tmp, where others cannot rename our entries)."""
    uid = os.getuid()
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if os.path.islink(path) or info.st_uid not in (0, uid) or info.st_mode & 0o022:
        return f"{path} is a link, not owned by you, or writable by group or others"
    for folder in Path(os.path.realpath(path)).parents:
        st = os.stat(folder)
        if st.st_uid not in (0, uid) or (st.st_mode & 0o022 and not st.st_mode & 0o1000):
            return f"{folder} (above {path}) is writable by others or not owned by you or root"
    return None


def _cache_folders() -> list[Path] | None:
    """The folders numba will read and write our compiled kernels in (kernels/), or None when it has no writable
    one. numba's cache layout is not public API: if it moves, this raises."""
    from numba.core.caching import CacheImpl

    root = Path(__file__).resolve().parent.parent
    folders = []
    for source in (root / "kernels" / "geometry.py",):
        locator = next(filter(None, (cls.from_function(ensure_numba_cache, str(source))
                                     for cls in CacheImpl._locator_classes)), None)
        if locator is None:
            return None
        folders.append(Path(locator.get_cache_path()))
    return folders


def ensure_numba_cache() -> None:
    """numba caches compiled kernels beside their source or in ~/.cache/numba (NUMBA_CACHE_DIR), and it unpickles
    what it finds there: a cache folder another local user can write into runs their code in our process. Such a
    folder is not used, nor is a missing one (a read-only install, an unwritable HOME: every `cache=True` function
    failed with 'cannot cache function'): numba is pointed at a fresh private temporary folder (kernels compile
    again per process), with one warning. Runs when this package is imported, before any kernel module is
    decorated."""
    from numba.core import config

    try:
        folders = _cache_folders()
    except Exception:  # noqa: BLE001 - numba's layout moved: its own behaviour stays
        return
    if folders is None:
        problem = "no writable numba cache (install folder and HOME read-only)"
    else:
        problem = None
        for folder in folders:
            try:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                problem = problem or unsafe_because(folder)
            except OSError as exc:
                problem = problem or f"{folder}: {exc.strerror}"
        if problem is None:
            return
        problem = f"not using numba's cache ({problem})"
    config.CACHE_DIR = tempfile.mkdtemp(prefix="onnxopt-numba-")
    os.environ["NUMBA_CACHE_DIR"] = config.CACHE_DIR  # for worker processes too
    print(f"onnxopt: warning: {problem}; compiled kernels go to {config.CACHE_DIR} for this run", file=sys.stderr)


def drop_stale_numba_caches() -> None:
    """numba keys a cached function on its own file's timestamp only, so a cached function keeps running the
    callees it was compiled with after their file changed (kernels/multibit.py and kernels/chain.py call into
    kernels/bitconv.py; it happened in development: an old kernel in a benchmark, a mismatch in a test). A digest
    of all those sources, kept beside each file's cache,
    drops the cache when any of them changed. Called before the first kernel loads (kernels/bitconv.py's import)."""
    try:  # numba's cache layout is not public API: if it moves, numba's own behaviour stays
        from numba.core.caching import CacheImpl

        root = Path(__file__).resolve().parent.parent
        sources = sorted(root.glob("kernels/*.py"))
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
    against the pool's scheduler; when that caller was compiled against a callee loaded from the cache (one entry
    point compiled bit_conv_into, then another compiled bit_conv around it), the cached caller no longer starts the
    pool when it loads, and its first call jumps into a pool that is not there (segfault, or 'LLVM ERROR: Symbol
    not found: allocate_sched'). `get_num_threads` starts the pool as a side effect (~10 ms). Called when
    kernels/bitconv.py is imported, which every parallel kernel module imports."""
    import numba

    numba.get_num_threads()
