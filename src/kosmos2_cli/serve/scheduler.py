"""The one thread that owns the model in `kosmos2 serve`, and the bounded queue that feeds it.

HTTP handlers prepare their image (`Work`: on their worker thread, or in a pool of worker processes on a machine
with cores to spare), `submit` it and await its future. The model
thread runs the row scheduler (`Kosmos2.stream`, continuous batching) over everything submitted: whenever rows
free, the requests waiting are taken, their pictures encoded in one batch, and their prompts join the rows in
flight, so no request waits for another's longest answer. A request ends with its `Started` (the answers'
tokens); the handler makes the record off this thread (`finish`). A cancelled request (its client went away)
frees its rows at the next step. Out of device memory, the requests in flight start again on half the rows; one
that does not fit alone fails alone. `stop` drains: nothing new is accepted, what was accepted is answered.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kosmos2_cli.api.options import GenerationOptions
from kosmos2_cli.api.tasks import TaskSpec
from kosmos2_cli.generation.rows import REFILL_SHARE, refill_size
from kosmos2_cli.runtime.engine import Picture, PipelineEngine, Prepared, is_out_of_memory

SHRINK_AFTER = 1.0  # seconds of less demand than rows before the rows narrow to it
# While rows decode, requests that arrive are held up to this long so that they join the rows together: a refill
# of a handful costs the GPU nearly what one of a quarter of the rows does, and refills after every step would
# leave the answers in flight waiting on them.
GATHER_WAIT = 0.03
# With at most this many requests in the service (preparing, waiting or decoding) an upload is prepared on its own
# thread even when there are worker processes: a few threads barely contend for the GIL, and the round trip to a
# process costs a lone request ~7 ms (H100 machine: 1 client p50 0.127 s on threads, 0.134 s in processes).
FEW_REQUESTS = 8


class QueueFull(Exception):
    """The queue holds as many requests as it may: the client should retry later (HTTP 503)."""


class Draining(Exception):
    """The server is shutting down: it answers what it accepted, and accepts nothing new (HTTP 503)."""


class TooBig(Exception):
    """A request that does not fit in device memory even alone."""


@dataclass(eq=False)
class Work:
    """One request, prepared: its task, the picture's size, its pixels (1, 3, H, W) and generation options."""

    spec: TaskSpec
    name: str
    picture: Picture
    pixels: np.ndarray
    options: GenerationOptions
    key: int = 0
    future: Future = field(default_factory=Future)
    submitted: float = 0.0

    @property
    def prompts(self) -> int:
        return len(self.spec.jobs(0))


class Scheduler:
    """Feeds the engine's model from a bounded queue on a thread of its own; `rows` prompts decode at a time."""

    def __init__(self, engine: PipelineEngine, rows: int, queue_limit: int, longest_prompt: int,
                 max_new_tokens: int, refill_share: float | None = None,
                 notice: Callable[[str], None] | None = None, gather_wait: float = GATHER_WAIT,
                 workers: int = 0) -> None:
        if rows < 1 or queue_limit < 1 or workers < 0:
            raise ValueError("rows and the queue length must be at least 1, the workers at least 0")
        self.engine = engine
        self.rows = rows  # the most rows (halved for good when the device runs out of memory)
        self.stream_rows = 0  # the rows of the stream running now: the demand's power of two, up to `rows`
        self._narrow_since: float | None = None  # since when the demand has been below the stream's rows
        self.queue_limit = queue_limit
        self.longest_prompt = longest_prompt
        # The run's options: the requests' own choose their tokens and caps within them.
        self.run_options = GenerationOptions(**{**engine.options.__dict__, "max_new_tokens": max_new_tokens,
                                                "num_beams": 1})
        self.refill_share = refill_share
        self.gather_wait = gather_wait
        self.notice = notice or (lambda message: None)
        self._lock = threading.Condition()
        self._queue: deque[Work] = deque()
        self._in_flight: dict[int, Work] = {}  # taken by the model thread, not yet answered (insertion order)
        self._cancelled: set[int] = set()  # keys of requests in flight whose clients went away
        self._numbers = itertools.count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._finishing = threading.Lock()
        self.calm = threading.Event()  # cleared while the model thread launches a refill
        self.calm.set()
        self.failure: BaseException | None = None  # what stopped the model thread, if anything did
        self._switch = sys.getswitchinterval()
        self.prompt_lengths: dict[tuple[str, ...], int] = {}  # prompt texts -> tokens, image's included
        self.workers = workers  # processes that prepare uploads (0: the handlers' threads do)
        self._pool = None
        self._pool_lock = threading.Lock()
        self._preparing = 0  # uploads being prepared now
        self.few_requests = FEW_REQUESTS

    # -- the handlers' side -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the model thread (the weights load first, if they have not) and the preparing processes."""
        self.engine.load()
        if self.workers:
            self._pool = self._start_pool()
        # The model thread launches a device step every few ms and needs the GIL for it: hand it over within
        # 1 ms instead of Python's default 5 while the handlers parse, prepare and finish.
        sys.setswitchinterval(min(self._switch, 0.001))
        self._thread = threading.Thread(target=self._run, daemon=True, name="kosmos2-serve-model")
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, work: Work) -> Future:
        """Queue `work`; its future gets the `Started` (or the exception) once its answers end."""
        with self._lock:
            if self._stopping:
                raise Draining("the server is shutting down")
            if len(self._queue) >= self.queue_limit:
                raise QueueFull(f"the queue is full ({self.queue_limit} requests waiting); try again shortly")
            work.key = next(self._numbers)
            work.submitted = time.perf_counter()
            self._queue.append(work)
            self._lock.notify_all()
        return work.future

    def cancel(self, work: Work) -> None:
        """The client went away: a waiting request leaves the queue, one in flight frees its rows."""
        with self._lock:
            if work in self._queue:
                self._queue.remove(work)
                work.future.cancel()
            elif self._in_flight.pop(work.key, None) is not None:
                self._cancelled.add(work.key)
                work.future.cancel()

    def finish(self, work: Work, started: Any) -> dict[str, Any]:
        """The request's record, as `kosmos2 TASK IMAGE --json` prints it (CPU work, on the caller's thread)."""
        self.calm.wait(1.0)  # keep out of the model thread's way while it launches a refill
        with self._finishing:
            return self.engine.finish(started, work.spec).to_dict()

    def stop(self, timeout: float | None = None) -> None:
        """Drain: accept nothing new, answer what is queued and in flight, then end the model thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        sys.setswitchinterval(self._switch)
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def prepare(self, upload: bytes, name: str, spec: TaskSpec) -> Prepared:
        """Decode, check and preprocess an upload: in a worker process when there are any and more than a few
        requests are in the service (their CPU work then leaves the GIL to the model thread), else on the caller's
        thread. A pool whose worker died (killed, out of memory) is replaced and the upload tried once more there; a
        second loss fails this upload alone."""
        with self._lock:
            self._preparing += 1
            few = self._preparing + len(self._queue) + len(self._in_flight) <= self.few_requests
        try:
            return self._prepare(upload, name, spec, few)
        finally:
            with self._lock:
                self._preparing -= 1

    def _prepare(self, upload: bytes, name: str, spec: TaskSpec, few: bool) -> Prepared:
        from concurrent.futures.process import BrokenProcessPool

        from kosmos2_cli.runtime.prepare import prepare_upload, prepare_upload_in_worker

        for _ in range(2):  # on this pool, then once on its replacement
            pool = self._pool
            if pool is None or few:
                return prepare_upload(self.engine.processor.image_processor, upload, name, spec)
            try:
                return pool.submit(prepare_upload_in_worker, upload, name, spec).result()
            except BrokenProcessPool:
                self._replace_pool(pool)
        raise RuntimeError(f"{name}: the process preparing it stopped")

    def _start_pool(self):
        from concurrent.futures import wait

        from kosmos2_cli.runtime.runner import preparing_pool

        pool = preparing_pool(self.engine, self.workers)
        # A pool starts a process per task it is given: busy them all now, before the first upload.
        wait([pool.submit(time.sleep, 0.2) for _ in range(self.workers)])
        return pool

    def _replace_pool(self, broken) -> None:
        with self._pool_lock:
            if self._pool is not broken or self._stopping:
                return  # another handler replaced it already, or the server is stopping
            self.notice("a process preparing uploads stopped; starting a fresh pool")
            broken.shutdown(wait=False, cancel_futures=True)
            self._pool = self._start_pool()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def rows_in_flight(self) -> int:
        """Prompts taken by the model thread and not yet answered (at most `rows` of them decode at once)."""
        return sum(work.prompts for work in list(self._in_flight.values()))

    # -- the model thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        kosmos = self.engine.kosmos
        try:
            while True:
                with self._lock:
                    if self._stopping and not self._queue and not self._in_flight:
                        return
                try:
                    with self._lock:
                        self.stream_rows = self._rows_for_demand()
                        self._narrow_since = None
                    # By default the rows ask at every free row and `_take` decides (`_room`); a share set by
                    # the operator (1: static batches) is the rows' own rule, as in `kosmos2 batch`.
                    share = 0.0 if self.refill_share is None else self.refill_share
                    for started in kosmos.stream(self._take, self.stream_rows, options=self.run_options,
                                                 calm=self.calm,
                                                 cancelled=self._cancelled, longest_prompt=self.longest_prompt,
                                                 refill_share=share):
                        self._deliver(started)
                except Exception as err:  # noqa: BLE001 - every request in flight hears of it; serving goes on
                    self._recover(err)
        except BaseException as err:  # the thread must not die silently: /healthz turns 503
            self.failure = err
            self._fail_all(err)
            raise
        finally:
            self.calm.set()

    def _take(self, count: int, wait: bool):
        """Up to `count` prompts' worth of waiting requests (at least one), their pictures encoded in one batch;
        [] when none waits (without `wait`), None once stopping with nothing left."""
        from kosmos2_cli.api.pipeline import Request

        with self._lock:
            while True:
                if self._queue:
                    hold: float | None = 0.0 if self._stopping else self._holding()
                    if not hold and (wait or self._stopping or self._room(count)):
                        break
                elif self._stopping:
                    return None
                else:
                    hold = None  # until a request arrives
                if not wait:
                    return []
                # Nothing runs while the rows wait for work: those finishing records need not keep out of the way.
                self.calm.set()
                self._lock.wait(hold)
                self.calm.clear()
            # Rows sized to the demand: a lone request decodes at batch 1, a crowd on every row. More demand than
            # rows ends this stream (its rows finish, then a wider one starts); less for SHRINK_AFTER, a narrower.
            wanted = self._rows_for_demand()
            now = time.perf_counter()
            if wanted >= self.stream_rows:
                self._narrow_since = None
            elif self._narrow_since is None:
                self._narrow_since = now
            if wanted > self.stream_rows or (self._narrow_since is not None and
                                             now - self._narrow_since >= SHRINK_AFTER):
                return None
            chosen: list[Work] = []
            prompts = 0
            while self._queue and (not chosen or prompts + self._queue[0].prompts <= count):
                work = self._queue.popleft()
                chosen.append(work)
                prompts += work.prompts
                self._in_flight[work.key] = work

        from kosmos2_cli.runtime.stager import concatenated

        kosmos = self.engine.kosmos
        pixels = concatenated([work.pixels for work in chosen], pinned=kosmos.model.device.type == "cuda")
        embeds = kosmos.encode_pixels(pixels).clone()
        return [Request(work.key, work.name, work.picture, work.spec.jobs(0), row, work.options)
                for work, row in zip(chosen, embeds, strict=True)]

    def _holding(self) -> float:
        """How much longer the waiting requests are held for others to join them: while they are fewer than a
        refill's share of the rows, until the oldest has waited `gather_wait` (0: take them now; lock held)."""
        enough = self._share()
        left = self.gather_wait - (time.perf_counter() - self._queue[0].submitted)
        if left <= 0:
            return 0.0
        waiting = 0
        for work in self._queue:
            waiting += work.prompts
            if waiting >= enough:
                return 0.0
        return left

    def _room(self, count: int) -> bool:
        """Whether `count` free rows (others decoding) are worth a refill now: a refill's share of the rows, or
        fewer when every waiting request fits in them and the oldest has waited `gather_wait`. Requests that
        arrive just after a refill then need not wait for a share of the rows to free, a whole answer's time
        when answers end together; a crowd still waits for a share (lock held)."""
        if self.refill_share is not None or count >= self._share():
            return True  # (with a share of the operator's, the rows ask only once that share is free)
        waited = time.perf_counter() - self._queue[0].submitted >= self.gather_wait
        return waited and sum(work.prompts for work in self._queue) <= count

    def _share(self) -> int:
        """A refill's share of the stream's rows, in prompts (the operator's share, else REFILL_SHARE)."""
        return refill_size(self.stream_rows, REFILL_SHARE if self.refill_share is None else self.refill_share)

    def _rows_for_demand(self) -> int:
        """The power of two of rows that holds every prompt taken or waiting, at most `rows` (lock held)."""
        demand = sum(work.prompts for work in self._in_flight.values()) + sum(w.prompts for w in self._queue)
        size = 1
        while size < min(demand, self.rows):
            size *= 2
        return min(size, self.rows)

    def _deliver(self, started) -> None:
        with self._lock:
            work = self._in_flight.pop(started.key, None)
        if work is not None and not work.future.done():
            work.future.set_result(started)

    def _recover(self, err: Exception) -> None:
        """Out of device memory: the requests in flight go back to the front of the queue and the rows halve (one
        that does not fit alone fails alone). Any other error fails the requests in flight."""
        with self._lock:
            flight = list(self._in_flight.values())
            self._in_flight.clear()
            self._cancelled.clear()
            if not is_out_of_memory(err):
                self.notice(f"a model call failed ({type(err).__name__}: {err}); its requests get an error")
                for work in flight:
                    if not work.future.done():
                        work.future.set_exception(err)
                return
            self.engine.free_memory()
            size = min(self.stream_rows or self.rows, self.rows)  # the rows that did not fit
            if size == 1 and flight:
                oldest, flight = flight[0], flight[1:]
                oldest.future.set_exception(TooBig(f"{oldest.name}: out of device memory even alone (try fewer new "
                                                   "tokens, or float16)"))
            elif size > 1:
                self.rows = size // 2
                self.notice(f"out of device memory with {size} rows; going on with at most {self.rows}")
            self._queue.extendleft(reversed(flight))

    def _fail_all(self, err: BaseException) -> None:
        with self._lock:
            pending = [*self._in_flight.values(), *self._queue]
            self._in_flight.clear()
            self._queue.clear()
            self._stopping = True
        for work in pending:
            if not work.future.done():
                work.future.set_exception(RuntimeError(f"the model thread stopped ({type(err).__name__})"))


def prepare_work(scheduler: Scheduler, spec: TaskSpec, upload: bytes, name: str,
                 options: GenerationOptions) -> Work:
    """Decode, check and preprocess an upload (CPU work for a worker thread) with the CLI's checks: raises
    ImageLoadError (not an image, truncated, a decompression bomb) or PromptError (a box outside the picture, a
    prompt longer than the rows allow)."""
    from kosmos2_cli.api.prompts import PromptError, refer_prompt

    engine = scheduler.engine
    prepared = scheduler.prepare(upload, name, spec)
    picture, pixels = prepared.image, prepared.inputs
    texts = tuple(spec.prompt_texts) or (refer_prompt((0, 0)),)  # refer's prompt: the same length for any box
    length = scheduler.prompt_lengths.get(texts)
    if length is None:
        length = int(engine.processor(text=list(texts), images=[picture] * len(texts), pixels=False,
                                      num_image_tokens=engine.kosmos.model.config.latent_query_num,
                                      return_tensors="pt")["attention_mask"].sum(1).max())
        if len(scheduler.prompt_lengths) > 4096:  # questions are many: keep the cache bounded
            scheduler.prompt_lengths.clear()
        scheduler.prompt_lengths[texts] = length
    if length > scheduler.longest_prompt:
        raise PromptError(f"the prompt is too long ({length} tokens with the image's; at most "
                          f"{scheduler.longest_prompt})")
    return Work(spec, name, picture, pixels, options)
