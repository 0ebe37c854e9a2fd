"""Checkpoint bytes to the GPU at the speed of the page cache.

On Linux with CUDA, the file is mapped read-only and its page-cache pages are registered with CUDA 256 MB at a
time (`cudaHostRegister`, read-only), so the copy engine reads them where they lie: no copy through the CPU.
Threads register the next pieces while the earlier ones are copied (H100 host: 6.7 GB in 0.21-0.24 s).
Elsewhere, or where registering fails, threads `pread` the file into pinned buffers while the copy engine moves
the buffers filled before (0.37-0.54 s for the same file; `tensor.to("cuda")` on a memory-mapped view, one
thread faulting in the map and a pageable copy, took 1.05 s). On the CPU (tests) the same code reads into plain
buffers and copies synchronously.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CHUNK = 8 << 20  # bytes per read and per copy
BUFFERS = 24  # pinned buffers: reads and copies in flight together
THREADS = 16  # at most; measured on an H100 host (16 cores): 5.4 GB/s with 1 thread, 15 with 8, 18 with 16
PIN_CHUNK = 256 << 20  # bytes registered with CUDA at a time
PIN_AHEAD = 8  # pieces registered ahead of the copies (at most ~2 GB of the page cache pinned at once)
PIN_THREADS = 4
_READ_ONLY_PORTABLE = 8 | 1  # cudaHostRegisterReadOnly | cudaHostRegisterPortable


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
    if device.type == "cuda" and sys.platform.startswith("linux"):
        cudart = torch.cuda.cudart()

        def pin(address: int, nbytes: int) -> None:
            error = cudart.cudaHostRegister(address, nbytes, _READ_ONLY_PORTABLE)
            if int(error) != 0:
                raise OSError(f"cudaHostRegister failed ({int(error)})")

        def unpin(address: int) -> None:
            cudart.cudaHostUnregister(address)

        yield from stream_pinned(spans, device, pin, unpin, fallback=lambda rest: _stream_read(
            rest, device, chunk=chunk, buffers=buffers, threads=threads))
    else:
        yield from _stream_read(spans, device, chunk=chunk, buffers=buffers, threads=threads)


class _ReadOnlyMap:
    """A file mapped read-only and shared (its pages are the page cache's), as a uint8 tensor."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            self.map = mmap.mmap(file.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ) if size else None
        array = np.frombuffer(self.map, dtype=np.uint8) if size else np.zeros(0, dtype=np.uint8)
        self.address = array.ctypes.data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # not writable: it is only ever read
            self.bytes = torch.from_numpy(array)

    def will_need(self, offset: int, nbytes: int) -> None:
        """Ask the kernel to read the range ahead in large requests (pinning a cold page faults it in alone)."""
        if self.map is not None and hasattr(mmap, "MADV_WILLNEED"):
            start = offset // mmap.PAGESIZE * mmap.PAGESIZE
            try:
                self.map.madvise(mmap.MADV_WILLNEED, start, offset + nbytes - start)
            except OSError:  # only advice
                pass

    def close(self) -> None:
        self.bytes = None
        try:
            if self.map is not None:
                self.map.close()
        except BufferError:  # a view is still alive somewhere: the map goes with it
            pass


def stream_pinned(spans: Sequence[Span], device: torch.device, pin: Callable[[int, int], None],
                  unpin: Callable[[int], None], fallback: Callable[[Sequence[Span]], Iterator], *,
                  piece: int = PIN_CHUNK, ahead: int = PIN_AHEAD,
                  threads: int = PIN_THREADS) -> Iterator[tuple[Span, torch.Tensor]]:
    """`stream_spans` by registering the mapped file with the device (`pin`, `unpin`) a `piece` at a time and
    copying straight from the map; where a file cannot be mapped or a piece cannot be pinned, the spans from
    there on come from `fallback`. Pieces are unpinned, on a thread, once their copies are done."""
    cuda = device.type == "cuda"
    try:
        maps = {path: _ReadOnlyMap(path) for path in dict.fromkeys(span.path for span in spans)}
    except (OSError, ValueError):
        yield from fallback(spans)
        return
    for span in spans:
        size = maps[span.path].bytes.numel()
        if span.offset + span.nbytes > size:
            for mapped in maps.values():
                mapped.close()
            raise OSError(f"unexpected end of file at byte {size} of {span.path}")
    needs = [[(span.path, k) for k in range(span.offset // piece, -(-(span.offset + span.nbytes) // piece))]
             if span.nbytes else [] for span in spans]
    last_use: dict[tuple[Path, int], int] = {}
    order: list[tuple[Path, int]] = []  # pieces in the order they are first needed
    for i, keys in enumerate(needs):
        for key in keys:
            if key not in last_use:
                order.append(key)
            last_use[key] = i
    position = {key: n for n, key in enumerate(order)}
    pool = ThreadPoolExecutor(threads, thread_name_prefix="kosmos2-pin")
    pinned: dict[tuple[Path, int], Future] = {}
    done: list[Future] = []

    def address(key: tuple[Path, int]) -> int:
        return maps[key[0]].address + key[1] * piece

    def pin_piece(key: tuple[Path, int]) -> None:
        mapped = maps[key[0]]
        nbytes = min(piece, mapped.bytes.numel() - key[1] * piece)
        mapped.will_need(key[1] * piece, nbytes)
        pin(address(key), nbytes)

    def unpin_after(key: tuple[Path, int], event) -> None:
        if event is not None:
            event.synchronize()
        unpin(address(key))

    def release() -> None:
        """Unpin what was pinned and is no longer needed (everything, once the copies queued so far are done)."""
        for future in done:
            future.exception()
        left = [key for key, future in pinned.items()
                if key not in released and future.done() and future.exception() is None]
        last = torch.cuda.Event() if cuda and left else None
        if last is not None:
            last.record()
        for key in left:
            released.add(key)
            unpin_after(key, last)
        pool.shutdown(wait=True)
        for mapped in maps.values():
            mapped.close()

    released: set[tuple[Path, int]] = set()
    submitted = 0
    try:
        for i, span in enumerate(spans):
            keys = needs[i]
            if keys:
                while submitted < len(order) and submitted <= position[keys[-1]] + ahead:
                    pinned[order[submitted]] = pool.submit(pin_piece, order[submitted])
                    submitted += 1
            try:
                for key in keys:
                    pinned[key].result()
            except Exception:  # noqa: BLE001 - not the data's fault: read the rest the other way
                for future in pinned.values():  # let pending pins finish: release() unpins them
                    future.exception()
                release()
                yield from fallback(spans[i:])
                return
            out = torch.empty(span.nbytes, dtype=torch.uint8, device=device)
            source = maps[span.path].bytes
            for key in keys:
                lo = max(span.offset, key[1] * piece)
                hi = min(span.offset + span.nbytes, (key[1] + 1) * piece)
                out[lo - span.offset : hi - span.offset].copy_(source[lo:hi], non_blocking=cuda)
                if last_use[key] == i:
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record()
                    released.add(key)
                    done.append(pool.submit(unpin_after, key, event))
            yield span, out
    except BaseException:
        release()
        raise
    threading.Thread(target=release, daemon=True, name="kosmos2-unpin").start()


def _stream_read(spans: Sequence[Span], device: torch.device, *, chunk: int | None = None,
                 buffers: int = BUFFERS, threads: int | None = None) -> Iterator[tuple[Span, torch.Tensor]]:
    """`stream_spans` through parallel `pread`s into pinned buffers."""
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
