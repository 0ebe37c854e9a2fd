"""Checkpoint bytes to the GPU at the speed of the page cache: threads `pread` the file into pinned buffers while
the copy engine moves the buffers filled before.

Why not `tensor.to("cuda")` on a memory-mapped view: one thread faulting in the map and a pageable copy move
~6 GB/s (1.05 s for the released 6.7 GB fp32 file on an H100 host); 16 threads reading 8 MB pieces into pinned
memory, with the copies overlapping the reads, move ~18 GB/s (0.37 s; benchmarks/startup.py --reads). On the
CPU (tests) the same code reads into plain buffers and copies synchronously.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

CHUNK = 8 << 20  # bytes per read and per copy
BUFFERS = 24  # pinned buffers: reads and copies in flight together
THREADS = 16  # at most; measured on an H100 host (16 cores): 5.4 GB/s with 1 thread, 15 with 8, 18 with 16


@dataclass(frozen=True)
class Span:
    """`nbytes` bytes of `path` from `offset`: one tensor's data."""

    key: str
    path: Path
    offset: int
    nbytes: int


def _read(fd: int, buffer: torch.Tensor, offset: int, nbytes: int) -> None:
    view = memoryview(buffer.numpy())[:nbytes]
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)  # releases the GIL: the threads read in parallel
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += got


def stream_spans(spans: Sequence[Span], device: torch.device, *, chunk: int | None = None,
                 buffers: int = BUFFERS, threads: int | None = None) -> Iterator[tuple[Span, torch.Tensor]]:
    """(span, its bytes as a uint8 tensor on `device`), in the order of `spans`.

    A yielded tensor may still be filling on the current CUDA stream: work queued on that stream sees it whole.
    """
    cuda = device.type == "cuda"
    chunk = chunk or CHUNK
    threads = threads or max(1, min(THREADS, os.cpu_count() or 1))
    plan = [(i, start) for i, span in enumerate(spans) for start in range(0, span.nbytes, chunk)]
    free = [torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(min(buffers, len(plan)))]
    copying: deque[tuple[torch.cuda.Event | None, torch.Tensor]] = deque()
    reads: deque[tuple[Future, torch.Tensor]] = deque()
    fds = {path: os.open(path, os.O_RDONLY) for path in dict.fromkeys(span.path for span in spans)}
    pool = ThreadPoolExecutor(threads, thread_name_prefix="kosmos2-read")

    def buffer() -> torch.Tensor:
        if free:
            return free.pop()
        event, oldest = copying.popleft()
        if event is not None:
            event.synchronize()  # its copy to the device is done: the buffer can be overwritten
        return oldest

    def submit(step: int) -> None:
        i, start = plan[step]
        span = spans[i]
        target = buffer()
        reads.append((pool.submit(_read, fds[span.path], target, span.offset + start,
                                  min(chunk, span.nbytes - start)), target))

    try:
        submitted = len(free)
        for step in range(submitted):
            submit(step)
        for span in spans:
            out = torch.empty(span.nbytes, dtype=torch.uint8, device=device)
            for start in range(0, span.nbytes, chunk):
                future, filled = reads.popleft()
                future.result()
                count = min(chunk, span.nbytes - start)
                out[start : start + count].copy_(filled[:count], non_blocking=cuda)
                event = None
                if cuda:
                    event = torch.cuda.Event()
                    event.record()
                copying.append((event, filled))
                if submitted < len(plan):
                    submit(submitted)
                    submitted += 1
            yield span, out
        if cuda:
            torch.cuda.current_stream().synchronize()  # the pinned buffers may go once every copy is done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for fd in fds.values():
            os.close(fd)
        free.clear()
        copying.clear()
        reads.clear()
        if cuda and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # hand the pinned buffers back to the system
