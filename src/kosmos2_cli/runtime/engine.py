"""The narrow interface between the command line and the model: `prepare` one image, `infer` a batch.

`prepare` (decode, orient, check, preprocess) is plain CPU work that runs on worker threads while the model
runs; `infer` runs on the calling thread. A faster engine (another GPU back end) only has to provide these two
methods; the runner, batching, resume and output do not change.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kosmos2_cli.api.results import Result
from kosmos2_cli.api.tasks import TaskSpec

if TYPE_CHECKING:
    from PIL import Image

    from kosmos2_cli.api.pipeline import GenerationOptions


@dataclass
class Prepared:
    """One image ready for the model: its name (path as given), the upright picture (or only its size, when it
    was prepared in another process and nothing will draw on it) and model inputs."""

    name: str
    image: Image.Image | Picture
    inputs: Any


@dataclass(frozen=True)
class Picture:
    """What the model side needs of an image prepared elsewhere: its size."""

    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


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


def prepare_image(image_processor, name: str, spec: TaskSpec, keep_image: bool = True) -> Prepared:
    """Load, check and preprocess one image (CPU work that needs no model). Pixels come back as a float32
    (1, 3, H, W) array, which crosses process boundaries cheaply."""
    from kosmos2_cli.processing.images import load_image

    image = load_image(name)
    spec.check_image(*image.size)
    pixels = image_processor(image, return_tensors="np")["pixel_values"]
    return Prepared(name, image if keep_image else Picture(*image.size), pixels)


class Engine(Protocol):
    def prepare(self, name: str, spec: TaskSpec) -> Prepared:
        """Load and preprocess one image; thread-safe. Raises ImageLoadError or PromptError for a bad image."""

    def infer(self, batch: Sequence[Prepared], spec: TaskSpec) -> list[Result]:
        """One Result per prepared image, in order."""


def is_out_of_memory(err: BaseException) -> bool:
    """A device out-of-memory error (CUDA's, or the 'out of memory' RuntimeError of other back ends)."""
    return type(err).__name__ == "OutOfMemoryError" or (isinstance(err, RuntimeError) and "out of memory" in str(err))


class ModelLoadError(Exception):
    """The model folder cannot be loaded; the message names the folder and what is wrong, on one line."""


def check_model_folder(folder: Path) -> None:
    """Raise ModelLoadError unless `folder` has the files of a Kosmos-2 checkpoint in the hub's layout."""
    missing = [name for name in ("config.json", "sentencepiece.bpe.model") if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        missing.append("model.safetensors")
    if len(missing) == 3:
        raise ModelLoadError(f"{folder}: not a model folder (no config.json, model.safetensors or "
                             "sentencepiece.bpe.model: --model takes a folder in the hub's layout, or a repo id)")
    if missing:
        raise ModelLoadError(f"{folder}: incomplete model folder, missing {', '.join(missing)}")


# For sizing batches (`rows_that_fit`): the released model's parameter count, the cache slots a prompt takes
# (64 image tokens and the task's words), and the activations a row adds at bf16, measured on an H100 as the
# peak beyond weights and cache at 512 and 1024 images (~7 MB).
PARAMETERS = 1_664_000_000
PROMPT_SLOTS = 96
DEFAULT_NEW_TOKENS = 128
ACTIVATIONS_PER_ROW = 8 << 20


class PipelineEngine:
    """The bundled PyTorch pipeline. The tokenizer and image settings load at once (workers need them); the
    weights on first use (or `load`: a pipelined run loads them while its first images are prepared)."""

    def __init__(self, folder: Path, device: str = "auto", dtype: str = "auto",
                 options: GenerationOptions | None = None, on_load: Callable[[bool], None] | None = None) -> None:
        from kosmos2_cli.processing.processor import Kosmos2Processor

        self.folder = Path(folder)
        self.device = device
        self.dtype = dtype
        self.options = options
        check_model_folder(self.folder)
        with _loading(self.folder):
            self.processor = Kosmos2Processor.from_pretrained(self.folder)
        self._kosmos = None
        self._stream = None  # the side stream `collate` copies pixels to the GPU on (made on first use)
        self.on_load = on_load  # called with True before the weights load, False after

    @property
    def kosmos(self):
        """The loaded pipeline (weights load on first use)."""
        if self._kosmos is None:
            from kosmos2_cli.api.models import Kosmos2ForConditionalGeneration
            from kosmos2_cli.api.pipeline import Kosmos2

            if self.on_load:
                self.on_load(True)
            with _loading(self.folder):
                model = Kosmos2ForConditionalGeneration.from_pretrained(self.folder, device=self.device,
                                                                        dtype=self.dtype)
            self._kosmos = Kosmos2(model, self.processor, self.options)
            if self.on_load:
                self.on_load(False)
        return self._kosmos

    def load(self) -> None:
        """Load the weights now (the runner does so on its model thread while the first images are prepared)."""
        _ = self.kosmos

    @property
    def on_gpu(self) -> bool:
        """Will the model run on a GPU (without loading it: `auto` means CUDA when present)?"""
        import torch

        device = str(self.device)
        return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())

    def rows_that_fit(self, share: float = 0.4) -> int:
        """How many images a batch may hold on the GPU: its key/value cache and activations within `share` of the
        free memory (the weights counted out until they are loaded)."""
        import torch

        from kosmos2_cli.model.config import Kosmos2Config
        from kosmos2_cli.model.devices import resolve_device, resolve_dtype

        device = resolve_device(self.device)
        width = resolve_dtype(self.dtype, device).itemsize
        config = Kosmos2Config.from_json_file(self.folder / "config.json")
        text = config.text_config
        free, _ = torch.cuda.mem_get_info(device)
        if self._kosmos is None:
            free -= PARAMETERS * width
        new_tokens = self.options.max_new_tokens if self.options else DEFAULT_NEW_TOKENS
        slots = -(-(PROMPT_SLOTS + new_tokens) // 64) * 64  # as the decoder rounds its cache
        per_row = 2 * text.layers * text.embed_dim * slots * width + ACTIVATIONS_PER_ROW * width // 2
        return max(0, int(free * share) // per_row)

    def prepare(self, name: str, spec: TaskSpec) -> Prepared:
        return prepare_image(self.processor.image_processor, name, spec)

    def worker_setup(self) -> tuple[Callable, tuple]:
        """(initializer, its arguments) for a worker process that prepares images as `prepare` does."""
        return _init_worker, (self.folder,)

    def infer(self, batch: Sequence[Prepared], spec: TaskSpec) -> list[Result]:
        return self.finish(self.start(batch, spec), spec)

    def collate(self, batch: Sequence[Prepared]):
        """The batch's pixels as one tensor; bound for a GPU, already on their way there (`Staged`).

        Done by the runner's thread while the model thread is busy with the previous batch: the pixels go into
        page-locked memory and their copy to the GPU runs on a stream of its own, beside the previous batch's
        work, instead of in front of this batch's image encoder (at 256 images, 154 MB each time).
        """
        import numpy as np
        import torch

        shape = (sum(item.inputs.shape[0] for item in batch), *batch[0].inputs.shape[1:])
        to_gpu = self.on_gpu and torch.cuda.is_available()
        pixels = torch.empty(shape, dtype=torch.float32, pin_memory=to_gpu)
        np.concatenate([item.inputs for item in batch], out=pixels.numpy())
        return Staged.copy(pixels, self._staging_stream()) if to_gpu else pixels

    def _staging_stream(self):
        import torch

        if self._stream is None:
            from kosmos2_cli.model.devices import resolve_device

            self._stream = torch.cuda.Stream(resolve_device(self.device))
        return self._stream

    def start(self, batch: Sequence[Prepared], spec: TaskSpec, pixels=None):
        """The device's half of `infer` (image encoder, generation): may run on a thread of its own while the
        previous batch `finish`es. `pixels`: `collate(batch)`, if already made."""
        kosmos = self.kosmos
        pixels = self.collate(batch) if pixels is None else pixels
        embeds = kosmos.encode_pixels(pixels.take() if isinstance(pixels, Staged) else pixels)
        jobs = [job for index in range(len(batch)) for job in spec.jobs(index)]
        return len(batch), kosmos.start([(item.name, item.image) for item in batch], jobs, image_embeds=embeds)

    def stream(self, items: Iterator[Prepared], spec: TaskSpec, rows: int,
               calm: threading.Event | None = None) -> Iterator[tuple[Prepared, Any]]:
        """Continuous batching (`Kosmos2.stream`): (item, started) for each item as its answers end; `finish`
        turns `started` into the item's record. The next refill's pixels are collated and copied to the device
        on a thread of their own while the rows decode (`_Stager`), once the refill is launched (`calm`)."""
        kosmos = self.kosmos
        calm = calm or threading.Event()
        stager = _Stager(self.collate, items, calm)

        def encoded(count: int):
            parts = stager.take(count)
            if not parts:
                return [], None
            import torch

            embeds = [kosmos.encode_pixels(pixels.take() if isinstance(pixels, Staged) else pixels)
                      for _, pixels in parts]
            return [(item, item.name, item.image) for chunk, _ in parts for item in chunk], torch.cat(embeds)

        try:
            for item, started in kosmos.stream(encoded, spec.jobs(0), rows, calm=calm):
                yield item, (1, started)
        finally:
            stager.close()

    def streams(self, spec: TaskSpec) -> bool:
        """Can `stream` run this task with these options (one beam)?"""
        return self.options is None or self.options.num_beams == 1

    def finish(self, started, spec: TaskSpec) -> list[Result]:
        """The CPU half of `infer`: decoding, post-processing, one record per image."""
        count, pending = started
        per_image: list[list[Result]] = [[] for _ in range(count)]
        for job, result in zip(pending.jobs, self.kosmos.finish(pending), strict=True):
            per_image[job.image_index].append(result)
        return [spec.record(rows) for rows in per_image]

    def free_memory(self) -> None:
        """After an out-of-memory error: give cached device memory back before retrying smaller."""
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _Stager:
    """Images for the next refill of rows, taken from `items` and collated (pixels on their way to the device) on
    a thread of their own: a refill finds them ready instead of leaving the device idle while they are made.
    After each `take(n)`, the next n are staged; a refill that wants fewer keeps the rest for later."""

    def __init__(self, collate: Callable, items: Iterator[Prepared], calm: threading.Event) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.collate, self.items, self.calm = collate, items, calm
        self.ready: deque[tuple[list[Prepared], Any]] = deque()
        self.ahead = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kosmos2-stage")

    def _stage(self, count: int, wait: bool = False) -> tuple[list[Prepared], Any]:
        if wait:
            self.calm.wait()
        chunk = list(islice(self.items, count))
        return chunk, (self.collate(chunk) if chunk else None)

    def take(self, count: int) -> list[tuple[list[Prepared], Any]]:
        """Up to `count` images (fewer only at the end), as (images, pixels) parts in input order."""
        if self.ahead is not None:
            self.ready.append(self.ahead.result())
            self.ahead = None
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
            self.ahead = self.pool.submit(self._stage, count, True)
        return parts

    def close(self) -> None:
        """Wait for the staging in progress (it reads `items`, which its next user reads) and stop the thread."""
        if self.ahead is not None:
            try:
                self.ahead.result()
            except BaseException:  # noqa: S110 (the error belongs to images that will not be used now)
                pass
        self.pool.shutdown(wait=True)


def _rows(pixels, start: int, stop: int | None):
    """Images start:stop of collated pixels (staged on the device or not)."""
    if isinstance(pixels, Staged):
        return Staged(pixels.pixels[start:stop], pixels.ready)
    return pixels[start:stop]


_WORKER: dict[str, Any] = {}


def _init_worker(folder: Path) -> None:
    from kosmos2_cli.processing.image_processing import Kosmos2ImageProcessor

    _die_with_parent()
    _WORKER["image_processor"] = Kosmos2ImageProcessor.from_pretrained(folder)


def _die_with_parent() -> None:
    """A worker must not outlive a killed run (it would hold the run's output pipes open): on Linux the kernel
    kills it with its parent; elsewhere a watchdog thread notices the parent is gone."""
    import os
    import signal
    import sys
    import threading
    import time

    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="kosmos2-parent-watch").start()


def prepare_in_worker(name: str, spec: TaskSpec, keep_image: bool) -> Prepared:
    """`prepare` in a worker process set up by `PipelineEngine.worker_setup`."""
    return prepare_image(_WORKER["image_processor"], name, spec, keep_image)


@contextmanager
def _loading(folder: Path) -> Iterator[None]:
    """Loading errors (bad files, wrong tensors, no room on the device) as ModelLoadError: they are no image's
    fault, so the runner must not treat them as a batch to split."""
    try:
        yield
    except ModelLoadError:
        raise
    except (ValueError, OSError, RuntimeError) as err:
        if is_out_of_memory(err):
            raise ModelLoadError(f"{folder}: the weights do not fit in the device's memory (try --dtype float16, "
                                 "another --device, or free the GPU)") from err
        message = " ".join(str(err).split())
        raise ModelLoadError(message if str(folder) in message else f"{folder}: {message}") from err
