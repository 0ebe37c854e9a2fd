"""Triton's compiler fingerprint, computed once per Triton install instead of once per process.

Before a new process can take any kernel from Triton's on-disk cache, Triton hashes its own sources and its
compiler library (`triton.runtime.cache.triton_key`, ~500 MB of reads): 0.43-0.46 s on an H100 host, the largest
part of the first kernel launch. The fingerprint changes only when those files change, so it is kept in Triton's
cache folder under a name made from their paths, sizes and modification times, and later processes read it back.
KOSMOS2_TRITON_KEY=0 leaves Triton untouched.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_SOURCES = ("compiler", "backends", "language", "_C")  # what triton_key reads, besides runtime/cache.py


def remember() -> bool:
    """Replace `triton.runtime.cache.triton_key` by a reader of the stored fingerprint; False where it cannot."""
    if os.environ.get("KOSMOS2_TRITON_KEY", "1").strip() == "0":
        return False
    try:
        from triton.runtime import cache
    except ImportError:
        return False
    original = getattr(cache, "triton_key", None)
    if original is None or getattr(original, "remembered", False):
        return original is not None

    def triton_key() -> str:
        if not memo:
            memo.append(_stored(original, Path(cache.__file__)))
        return memo[0]

    memo: list[str] = []
    triton_key.remembered = True  # type: ignore[attr-defined]
    triton_key.cache_clear = memo.clear  # type: ignore[attr-defined]  # as the functools.lru_cache it replaces
    cache.triton_key = triton_key
    return True


def _stamp(cache_module: Path) -> str:
    """A digest of the path, size and modification time of every file the fingerprint is computed from."""
    import triton

    root = cache_module.resolve().parents[1]
    digest = hashlib.sha256(f"{triton.__version__}\n".encode())
    paths = [cache_module.resolve()]
    for folder in _SOURCES:
        for dirpath, dirnames, filenames in os.walk(root / folder):
            dirnames.sort()
            paths += [Path(dirpath) / name for name in sorted(filenames) if not name.endswith(".pyc")]
    for path in paths:
        info = path.stat()
        digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _folder() -> Path:
    try:
        from triton import knobs

        found = knobs.cache.dir
    except (ImportError, AttributeError):
        found = None
    return Path(found or os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def _stored(compute, cache_module: Path) -> str:
    """The fingerprint from its file, or computed by Triton and written there (atomically) for next time."""
    try:
        path = _folder() / f"kosmos2-triton-key-{_stamp(cache_module)}.txt"
        if path.is_file():
            value = path.read_text(encoding="utf-8")
            if value:
                return value
    except OSError:
        return compute()
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(value, encoding="utf-8")
        os.replace(partial, path)
    except OSError:
        pass  # a read-only cache folder: the next process computes it again
    return value
