"""Pixels for the next refill of decoder rows, collated and on their way to the GPU before the refill asks."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from kosmos2_cli.fast.marks import mark
from kosmos2_cli.runtime.prepare import Prepared


def concatenated(arrays: Sequence[Any], pinned: bool):
    """NumPy arrays as one tensor along their first axis, in page-locked memory when `pinned`: a copy from there
    to the GPU is queued behind the device's work, where one from ordinary memory first waits for that work."""
    import numpy as np
    import torch

    shape = (sum(array.shape[0] for array in arrays), *arrays[0].shape[1:])
    out = torch.empty(shape, dtype=torch.from_numpy(arrays[0][:0]).dtype, pin_memory=pinned)
    np.concatenate(arrays, out=out.numpy())
    return out


@dataclass
class Staged:
    """Pixels copied to the GPU on a side stream; `take` them on the stream that will use them."""

    pixels: Any
    ready: Any

    @classmethod
    def copy(cls, pinned, stream) -> Staged:
        import torch

        with torch.cuda.stream(stream):
            pixels = pinned.to(stream.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return cls(pixels, ready)

    def take(self):
        """The pixels, once the current stream has waited (on the GPU, not here) for their copy."""
        import torch

        current = torch.cuda.current_stream(self.pixels.device)
        current.wait_event(self.ready)
        self.pixels.record_stream(current)  # freed later on this stream: not reused before it is done with them
        return self.pixels


class Stager:
    """Images for the next refill of rows, taken from `items` and collated (pixels on their way to the device) on
    a thread of their own: a refill finds them ready instead of leaving the device idle while they are made.
    After each `take(n)`, the next n are staged; a refill that wants fewer keeps the rest for later."""

    def __init__(self, collate: Callable, items: Iterator[Prepared], calm: threading.Event) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.collate, self.items, self.calm = collate, items, calm
        self.ready: deque[tuple[list[Prepared], Any]] = deque()
        self.ahead = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kosmos2-stage")
        # Set while the model's thread waits for the staging ahead: that staging must not wait for `calm` then,
        # since the waiting thread is the one that cleared it (a refill found nothing staged: stage it now).
        self.wanted = threading.Event()

    def _stage(self, count: int, wait: bool = False) -> tuple[list[Prepared], Any]:
        if wait:
            while not self.calm.wait(0.005) and not self.wanted.is_set():
                pass
        chunk = list(islice(self.items, count))
        mark("stager: first images taken", len(chunk))
        staged = self.collate(chunk) if chunk else None
        mark("stager: first pixels collated")
        return chunk, staged

    def take(self, count: int, then: int | None = None) -> list[tuple[list[Prepared], Any]]:
        """Up to `count` images (fewer only at the end), as (images, pixels) parts in input order; `then` images
        (default `count`) are staged next."""
        if self.ahead is not None:
            self.ready.append(self._wait_ahead())
        parts: list[tuple[list[Prepared], Any]] = []
        have = 0
        while have < count:
            chunk, pixels = self.ready.popleft() if self.ready else self._stage(count - have)
            if not chunk:
                break
            if have + len(chunk) > count:
                keep = count - have
                self.ready.appendleft((chunk[keep:], _rows(pixels, keep, None)))
                chunk, pixels = chunk[:keep], _rows(pixels, 0, keep)
            parts.append((chunk, pixels))
            have += len(chunk)
        if have == count:
            self.ahead = self.pool.submit(self._stage, then or count, True)
        return parts

    def close(self) -> None:
        """Wait for the staging in progress (it reads `items`, which its next user reads) and stop the thread."""
        if self.ahead is not None:
            try:
                self._wait_ahead()
            except BaseException:  # noqa: S110 (the error belongs to images that will not be used now)
                pass
        self.pool.shutdown(wait=True)

    def _wait_ahead(self) -> tuple[list[Prepared], Any]:
        self.wanted.set()
        try:
            return self.ahead.result()
        finally:
            self.wanted.clear()
            self.ahead = None


def _rows(pixels, start: int, stop: int | None):
    """Images start:stop of collated pixels (staged on the device or not)."""
    if isinstance(pixels, Staged):
        return Staged(pixels.pixels[start:stop], pixels.ready)
    return pixels[start:stop]
