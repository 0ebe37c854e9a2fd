"""Work begun ahead on threads of its own, that the first use of its results waits for (`fast.precompile`'s
compile workers: a kernel's first launch in the model waits for them rather than compiling the same kernel beside
them). Imports no torch: the command line begins such work before it imports torch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

_begun: list[Future] = []
_local = threading.local()  # `.ahead` is set on the threads doing the work (they must not wait for themselves)


def begin(calls: list[Callable[[], object]]) -> None:
    """Run each of `calls` on a thread of its own; `ready` waits for them all."""
    pool = ThreadPoolExecutor(max_workers=max(1, len(calls)), thread_name_prefix="kosmos2-ahead")
    _begun.extend(pool.submit(_run, call) for call in calls)
    pool.shutdown(wait=False)


def _run(call: Callable[[], object]) -> None:
    _local.ahead = True
    call()


def ready() -> None:
    """Wait for the work begun ahead, unless called from it (afterwards: one test of an empty list). A call that
    failed is only work not done ahead: whoever needs its result meets the failure again and reports it."""
    if _begun and not getattr(_local, "ahead", False):
        for work in list(_begun):
            work.exception()
        _begun.clear()


def pending() -> int:
    """How many of the calls begun ahead have not finished."""
    return sum(not work.done() for work in _begun)
