"""Running one task over many images: preparation on workers ahead of the model, the model on a thread of its own.

Images are prepared (decoded, turned upright, checked, preprocessed) by a small pool, a bounded number ahead,
while the model answers earlier ones; Pillow, NumPy and OpenCV release the GIL for that work. The model thread
keeps `batch_size` images in flight (continuous batching: an image whose answers end makes room for the next),
and this thread turns each answer into its record. Outcomes come back in input order, one per image: a Result,
or a Failure saying why that image could not be used. Out of device memory, the images in flight start again
with half as many rows, and the smaller size is kept for the rest of the run.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from kosmos2_cli.api.results import Failure, Result
from kosmos2_cli.api.tasks import TaskSpec
from kosmos2_cli.fast.marks import mark
from kosmos2_cli.runtime.engine import Engine, Prepared, is_out_of_memory

if TYPE_CHECKING:
    from PIL import Image

Outcome = Result | Failure


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


MAX_AUTO_BATCH = 256  # images: past this an H100 gains ~10% more images/s for twice the memory and wait


def default_batch_size(engine: Engine) -> int:
    """Images in flight when the user gives no number. On a GPU, the largest power of two up to MAX_AUTO_BATCH
    that fits the free memory (`rows_that_fit`; at least 8): on an H100 256 images a call run ~2x the images/s of
    64 in ~15 GB. A CPU gains little from larger batches: 8."""
    if not engine.on_gpu:
        return 8
    try:
        rows = min(engine.rows_that_fit(), MAX_AUTO_BATCH)
    except (ValueError, RuntimeError):  # no usable GPU or dtype: the model's load says so in its own words
        rows = 64
    mark("batch size chosen")
    size = 8
    while size * 2 <= rows:
        size *= 2
    return size


def use_processes(images: int) -> bool:
    """Prepare images in worker processes rather than threads?

    Threads share the GIL with the thread that drives the GPU step by step, and decoding and preprocessing hold
    it for part of each image: on a many-core GPU machine a thread pool caps a batch far below what the model
    does. Processes cost a second to start, so they pay off for long runs on machines with cores to spare.
    KOSMOS2_PREPARE=processes|threads overrides.
    """
    forced = forced_processes()
    if forced is not None:
        return forced
    return images >= 256 and cores_to_spare()


def forced_processes() -> bool | None:
    """KOSMOS2_PREPARE=processes (True) or threads (False); None when it does not say."""
    forced = os.environ.get("KOSMOS2_PREPARE", "").strip().lower()
    return forced == "processes" if forced in ("processes", "threads") else None


def cores_to_spare() -> bool:
    """Enough cores that worker processes pay off beside the model's thread and the run's own."""
    return (os.cpu_count() or 1) >= 8


def process_workers() -> int:
    return max(2, min(16, (os.cpu_count() or 2) - 2))


def preparing_pool(engine: Engine, workers: int):
    """A pool of `workers` processes set up to prepare images as `engine.prepare` does."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    initializer, args = engine.worker_setup()
    # spawn: the workers start clean (no copy of a process that may hold a CUDA context)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer,
                               initargs=args)


def prepare_outcome(prepare: Callable, name: str, spec: TaskSpec, *args) -> Prepared | Failure:
    """`prepare(name, spec, *args)`, or the Failure that says why the image cannot be used (picklable: it may
    run in a worker process)."""
    from kosmos2_cli.api.prompts import PromptError
    from kosmos2_cli.processing.images import ImageLoadError

    try:
        return prepare(name, spec, *args)
    except ImageLoadError as err:
        return Failure(name, str(err), spec.task)
    except PromptError as err:
        return Failure(name, f"{name}: {err}", spec.task)
    except Exception as err:  # a picture the preprocessing cannot take: its record says so, the run goes on
        return Failure(name, f"{name}: cannot prepare the image ({type(err).__name__}: {err})", spec.task)


def _prepare_in_worker(name: str, spec: TaskSpec, keep_image: bool) -> Prepared:
    from kosmos2_cli.runtime.prepare import prepare_in_worker

    return prepare_in_worker(name, spec, keep_image)


class Runner:
    """One task over a stream of image names, `batch_size` images in flight (None: `default_batch_size`)."""

    def __init__(self, engine: Engine, spec: TaskSpec, batch_size: int | None = None, workers: int | None = None,
                 prefetch: int | None = None, notice: Callable[[str], None] | None = None,
                 processes: bool = False, keep_images: bool = True) -> None:
        batch_size = default_batch_size(engine) if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.engine = engine
        self.spec = spec
        self.batch_size = batch_size
        self.processes = processes  # `keep_images`: send the pictures back from worker processes (to draw them)
        self.keep_images = keep_images
        self.workers = workers or (process_workers() if self.processes else default_workers())
        self.prefetch = prefetch or 2 * batch_size + self.workers
        self.notice = notice or (lambda message: None)

    def _pool(self):
        if not self.processes:
            return ThreadPoolExecutor(self.workers, thread_name_prefix="kosmos2-prepare")
        return preparing_pool(self.engine, self.workers)

    def _submit(self, pool, name: str) -> Future:
        """Prepare `name` on the pool (a worker process or thread): a Prepared or a Failure."""
        if self.processes:
            return pool.submit(prepare_outcome, _prepare_in_worker, name, self.spec, self.keep_images)
        return pool.submit(prepare_outcome, self.engine.prepare, name, self.spec)

    def run(self, names: Iterable[str]) -> Iterator[tuple[Outcome, Image.Image | None]]:
        """(outcome, upright image or None for a failure) in the order of `names`, each as soon as it and those
        before it are done. The weights load on the model thread while the first images are prepared."""
        pool = self._pool()
        done: queue.SimpleQueue = queue.SimpleQueue()
        feed = _Feed(self, pool, names, done)
        feed.refill()
        device = _ModelThread()
        switch = sys.getswitchinterval()
        # The model thread launches a GPU step every few ms and needs the GIL for it: while this thread finishes
        # records, hand the GIL over within 1 ms instead of Python's default 5.
        sys.setswitchinterval(min(switch, 0.001))
        calm = threading.Event()  # cleared while the model thread launches a refill: finishing waits then
        calm.set()
        device.submit(self._serve, feed, done, calm, feed.pace)
        try:
            ready: dict[int, tuple] = {}
            position = 0
            while (message := _next_message(done)) is not _END:
                if isinstance(message, BaseException):
                    raise message
                where, outcome, item = message
                ready[where] = (outcome, item)
                while position in ready:
                    outcome, item = ready.pop(position)
                    if not isinstance(outcome, Failure):
                        calm.wait()
                        outcome = self.engine.finish(outcome, self.spec)
                    feed.pace.taken()
                    mark("first outcome")
                    yield outcome, (None if isinstance(outcome, Failure) else item.image)
                    position += 1
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            device.close()
            sys.setswitchinterval(switch)

    def _serve(self, feed: _Feed, done: queue.SimpleQueue, calm: threading.Event, pace: Pace) -> None:
        """The model thread: load, then answer the feed. Out of device memory, the images in flight start again
        with half the rows; an image that does not fit alone fails alone."""
        try:
            self.engine.load()
            rows = self.batch_size
            while True:
                try:
                    for item, started in self.engine.stream(feed.items(), self.spec, rows, calm, pace):
                        feed.put(feed.finished(item), started, item)
                    break
                except Exception as err:
                    self._recover(err)
                    if rows == 1 and feed.in_flight:
                        item = feed.oldest()
                        feed.put(feed.finished(item), self._too_big(item.name), None)
                    elif rows > 1:
                        size = min(rows, len(feed.in_flight)) or rows
                        rows = max(1, size // 2)
                        self.batch_size = rows
                        self.notice(f"out of device memory with {size} images per batch; going on with {rows}")
                    feed.retry()
            done.put(_END)
        except BaseException as err:  # handed to the runner's thread, which raises it
            done.put(err)
        finally:
            calm.set()

    def _recover(self, err: Exception) -> None:
        """Raise `err` unless the device ran out of memory; then give its cached memory back before a retry."""
        if not is_out_of_memory(err):
            raise err
        self.engine.free_memory()

    def _too_big(self, name: str) -> Failure:
        return Failure(name, f"{name}: out of device memory even alone (try fewer new tokens, one beam or "
                             "float16)", self.spec.task)


_END = object()


class Pace:
    """How far the model may run ahead of the runner's thread: at most `limit` outcomes made and not yet taken
    (a slow writer must not make every image of the input wait in memory)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.ahead = 0
        self._changed = threading.Condition()

    def made(self) -> None:
        with self._changed:
            self.ahead += 1

    def taken(self) -> None:
        with self._changed:
            self.ahead -= 1
            self._changed.notify_all()

    def ready(self, wait: bool) -> bool:
        """May the model take new images? With `wait` (no row runs, so the runner can catch up), once it may."""
        with self._changed:
            while self.ahead >= self.limit:
                if not wait:
                    return False
                self._changed.wait(0.2)
            return True


def _next_message(done: queue.SimpleQueue):
    """The model thread's next message; waits in short slices so that Ctrl-C lands at once."""
    while True:
        try:
            return done.get(timeout=0.2)
        except queue.Empty:
            continue


class _Feed:
    """Prepared images in input order for the model thread (`items`), `prefetch` of them prepared ahead; failed
    images go straight to `done` in their place. Keeps the images in flight, to start them again (`retry`)."""

    def __init__(self, runner: Runner, pool, names: Iterable[str], done: queue.SimpleQueue) -> None:
        self.runner, self.pool, self.done = runner, pool, done
        self.upcoming = iter(names)
        self.pending: deque[Future] = deque()
        self.position = 0
        self.in_flight: dict[int, tuple[int, Prepared]] = {}  # id(item) -> (position, item), in input order
        self.again: deque[Prepared] = deque()
        self.pace = Pace(runner.prefetch)

    def put(self, position: int, outcome, item: Prepared | None) -> None:
        """An outcome for the runner's thread, in its place."""
        self.pace.made()
        self.done.put((position, outcome, item))

    def refill(self) -> None:
        while len(self.pending) < self.runner.prefetch and (name := next(self.upcoming, None)) is not None:
            self.pending.append(self.runner._submit(self.pool, name))

    def items(self) -> Iterator[Prepared]:
        while True:
            if self.again:
                yield self.again.popleft()
                continue
            self.refill()
            if not self.pending:
                return
            outcome = _result(self.pending.popleft())
            position, self.position = self.position, self.position + 1
            if isinstance(outcome, Failure):
                self.put(position, outcome, None)
                continue
            self.in_flight[id(outcome)] = (position, outcome)
            mark("first image prepared")
            yield outcome

    def finished(self, item: Prepared) -> int:
        """`item` is done: its position in the input."""
        return self.in_flight.pop(id(item))[0]

    def oldest(self) -> Prepared:
        return next(iter(self.in_flight.values()))[1]

    def retry(self) -> None:
        """Feed every image in flight again, before the next new one."""
        self.again = deque(item for _, item in self.in_flight.values())


def _result(future: Future):
    """`future.result()`, waiting in short slices so that an interrupt raised in this thread lands at once."""
    while True:
        try:
            return future.result(timeout=0.2)
        except TimeoutError:
            continue


class _ModelThread:
    """One thread that runs the model's calls in order. `close` stops it between two decoding steps (an
    interrupt raised in the thread) and waits for it: the process never exits with the model mid-call."""

    def __init__(self) -> None:
        import queue
        import threading

        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="kosmos2-model")
        self._thread.start()

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args))
        return future

    def close(self) -> None:
        import ctypes

        self._calls.put(None)
        if self._busy:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread.ident),
                                                       ctypes.py_object(KeyboardInterrupt))
        self._thread.join()

    _busy = False

    def _serve(self) -> None:
        try:
            while (call := self._calls.get()) is not None:
                future, fn, args = call
                if not future.set_running_or_notify_cancel():
                    continue
                self._busy = True
                try:
                    future.set_result(fn(*args))
                except BaseException as err:  # handed to the waiting caller
                    future.set_exception(err)
                finally:
                    self._busy = False
        except KeyboardInterrupt:  # `close` interrupted an idle moment: nothing to hand over
            pass
