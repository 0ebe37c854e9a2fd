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


def mark(phase: str, detail: object = None) -> None:
    """Record that `phase` is reached (first time only; `detail` goes with it) when KOSMOS2_MARKS names a file."""
    if _FILE is None or phase in _seen:
        return
    with _lock:
        if phase in _seen:
            return
        _seen.add(phase)
        line = {"phase": phase, "s": round(time.time() - _T0, 4), "thread": threading.current_thread().name}
        if detail is not None:
            line["detail"] = detail
        with open(_FILE, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")
