"""Start-up marks: where a process's first seconds go, for `benchmarks/startup.py --batch`.

With `KOSMOS2_MARKS=FILE`, each `mark(phase)` appends one JSON line `{"phase", "s", "thread"}` to FILE, `s` being
seconds since `KOSMOS2_T0` (a `time.time()` the launcher sets just before starting the process) or, without it,
since this module was imported. Without `KOSMOS2_MARKS` a mark costs one dictionary lookup. Each phase is marked
once per process (the first time), so marks may sit on hot paths.
"""

from __future__ import annotations

import json
import os
import threading
import time

_FILE = os.environ.get("KOSMOS2_MARKS") or None
_T0 = float(os.environ.get("KOSMOS2_T0") or time.time())
_seen: set[str] = set()
_lock = threading.Lock()


def mark(phase: str, detail: object = None, once: bool = True) -> None:
    """Record that `phase` is reached (first time only, unless not `once`; `detail` goes with it) when
    KOSMOS2_MARKS names a file."""
    if _FILE is None or (once and phase in _seen):
        return
    with _lock:
        if once and phase in _seen:
            return
        _seen.add(phase)
        line = {"phase": phase, "s": round(time.time() - _T0, 4), "thread": threading.current_thread().name}
        if detail is not None:
            line["detail"] = detail
        with open(_FILE, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")


def watch_triton() -> None:
    """With marks on, one line per Triton kernel compiled or loaded from its cache (name; seconds and the
    specialisation: argument types, warps), from the thread that compiled it, and a "triton built" line for each
    that was not in the disk cache: which of a new machine's first seconds are compiles, and on which thread."""
    if _FILE is None:
        return
    try:
        from triton import knobs
    except ImportError:  # older Triton: no hooks
        return
    begun: dict[str, float] = {}

    def before(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002 - Triton's names
        begun[str(key)] = time.time()
        return False

    def after(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002
        seconds = max(0.0, time.time() - begun.pop(str(key), time.time()))
        mark("triton: " + repr.split("[", 1)[0], [round(seconds, 4), repr], once=False)

    def built(*, src, metadata, metadata_group, times, cache_hit):  # a compile that missed the disk cache
        if not cache_hit:
            mark("triton built: " + str(getattr(src, "name", "?")), once=False)

    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before, after
    if hasattr(knobs, "compilation") and hasattr(knobs.compilation, "listener"):
        knobs.compilation.listener = built
