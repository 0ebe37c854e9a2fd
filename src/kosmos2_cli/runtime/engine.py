"""The narrow interface between the runner (and the service) and the model, and its PyTorch implementation.

`prepare` (decode, orient, check, preprocess) is CPU work that runs on worker threads while the model runs;
`stream` answers prepared images on the model's thread, keeping the device's rows full (`Kosmos2.stream`);
`finish` turns an image's generated tokens into its record on the caller's thread. Another back end only has to
provide `Engine`; the runner, batching, resume and output do not change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kosmos2_cli.api.options import GenerationOptions
from kosmos2_cli.api.results import Result
from kosmos2_cli.api.tasks import TaskSpec
from kosmos2_cli.fast.marks import mark
from kosmos2_cli.runtime.prepare import Picture, Prepared, prepare_image, worker_setup

if TYPE_CHECKING:
    from kosmos2_cli.api.pipeline import Kosmos2, Started

__all__ = ["Engine", "ModelLoadError", "Picture", "PipelineEngine", "Prepared", "check_model_folder",
           "is_out_of_memory", "prepare_image"]


class Pace(Protocol):
    def ready(self, wait: bool) -> bool:
        """May the model take new images now (the consumer keeps up)? With `wait`, block until it may."""


class Engine(Protocol):
    """What the runner needs of a model."""

    on_gpu: bool  # will the model run on a GPU (decides batch sizing and preparation)

    def prepare(self, name: str, spec: TaskSpec) -> Prepared:
        """Load and preprocess one image; thread-safe. Raises ImageLoadError or PromptError for a bad image."""

    def worker_setup(self) -> tuple[Callable, tuple]:
        """(initializer, its arguments) for a worker process that prepares images as `prepare` does."""

    def load(self) -> None:
        """Load the weights now (the runner does so on the model thread while the first images are prepared)."""

    def rows_that_fit(self, share: float = 0.4) -> int:
        """How many images the device may hold in flight within `share` of its free memory."""

    def stream(self, items: Iterator[Prepared], spec: TaskSpec, rows: int, calm: threading.Event | None = None,
               pace: Pace | None = None) -> Iterator[tuple[Prepared, Any]]:
        """(item, started) as each item's answers end, `rows` images in flight; `items` is read as rows free,
        while `pace` is ready."""

    def finish(self, started: Any, spec: TaskSpec) -> Result:
        """The item's record from what `stream` gave for it (CPU work, on the caller's thread)."""

    def free_memory(self) -> None:
        """After an out-of-memory error: give cached device memory back before retrying smaller."""


def is_out_of_memory(err: BaseException) -> bool:
    """A device out-of-memory error (CUDA's, or the 'out of memory' RuntimeError of other back ends)."""
    return type(err).__name__ == "OutOfMemoryError" or (isinstance(err, RuntimeError) and "out of memory" in str(err))


class ModelLoadError(Exception):
    """The model folder cannot be loaded; the message names the folder and what is wrong, on one line."""

    def __init__(self, message: str, advice: str | None = None) -> None:
        super().__init__(message)
        self.advice = advice  # what the caller can change, as a word the front end turns into its own terms


def check_model_folder(folder: Path) -> None:
    """Raise ModelLoadError unless `folder` has the files of a Kosmos-2 checkpoint in the hub's layout."""
    missing = [name for name in ("config.json", "sentencepiece.bpe.model") if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        missing.append("model.safetensors")
    if len(missing) == 3:
        raise ModelLoadError(f"{folder}: not a model folder (no config.json, model.safetensors or "
                             "sentencepiece.bpe.model)", advice="model")
    if missing:
        raise ModelLoadError(f"{folder}: incomplete model folder, missing {', '.join(missing)}")


# For sizing batches (`rows_that_fit`): the released model's parameter count, the cache slots a prompt takes
# (64 image tokens and the task's words), and the activations a row adds at bf16, measured on an H100 as the
# peak beyond weights and cache at 512 and 1024 images (~7 MB).
PARAMETERS = 1_664_000_000
PROMPT_SLOTS = 96
DEFAULT_NEW_TOKENS = 128
ACTIVATIONS_PER_ROW = 8 << 20
# On a GPU the engine's first refill takes this many prompts and decodes them alone: their records come out before
# the large refills pay their first-time costs (cuDNN's start and plans, graph captures, a 256-image encoding),
# which came before the first record when the first refill filled every row. Small enough for FlashAttention and
# the prompt's graph (FLASH_MAX_BATCH, GRAPHED_PREFILL_BATCH). Later streams of the same engine (a Ray actor's
# next block, a retry after running out of memory) start warm and fill every row at once.
FIRST_BATCH = 16


class PipelineEngine:
    """The bundled PyTorch pipeline. The tokenizer and image settings load at once (workers need them); the
    weights on first use (or `load`: a run loads them while its first images are prepared), or from the start
    on a thread of their own with `preload` (a command that will surely run the model: the tokenizer, the batch
    size and the workers' start then overlap the weights' load instead of coming before it)."""

    def __init__(self, folder: Path, device: str = "auto", dtype: str = "auto",
                 options: GenerationOptions | None = None, on_load: Callable[[bool], None] | None = None,
                 refill_share: float | None = None, preload: bool = False, first_batch: int | None = None) -> None:
        from kosmos2_cli.processing.processor import Kosmos2Processor

        self.folder = Path(folder)
        self.device = device
        self.dtype = dtype
        self.options = options or GenerationOptions()
        self.refill_share = refill_share  # None: the row scheduler's default
        self.first_batch = first_batch  # prompts of the first stream's first refill, decoded alone (None:
        # FIRST_BATCH on a GPU, 0 elsewhere: a CPU is busy at any batch, and a lone small batch would idle cores)
        self._streamed = False  # a stream has run: the first-time costs are paid
        check_model_folder(self.folder)
        self._kosmos: Kosmos2 | None = None
        self._stream = None  # the side stream `collate` copies pixels to the GPU on (made on first use)
        self.on_load = on_load  # called with True before the run waits for the weights, False after
        self._model: Future | None = None  # the weights loading on their own thread (`preload`)
        self._free_before: int | None = None  # the device's free memory before they did
        self._measured = threading.Event()
        if preload:
            self._model = Future()
            threading.Thread(target=self._preload, daemon=True, name="kosmos2-load").start()
        with _loading(self.folder):
            self.processor = Kosmos2Processor.from_pretrained(self.folder)

    def _preload(self) -> None:
        try:
            self._model.set_result(self._load_model())
        except BaseException as err:  # raised where the weights are wanted (`kosmos`)
            self._model.set_exception(err)
        finally:
            self._measured.set()

    def _load_model(self):
        from kosmos2_cli.api.models import Kosmos2ForConditionalGeneration

        mark("weights: loading")
        with _loading(self.folder):
            if self.on_gpu:
                import torch

                from kosmos2_cli.model.devices import resolve_device

                self._free_before = torch.cuda.mem_get_info(resolve_device(self.device))[0]
            self._measured.set()
            model = Kosmos2ForConditionalGeneration.from_pretrained(self.folder, device=self.device,
                                                                    dtype=self.dtype)
        mark("weights: loaded")
        return model

    @property
    def kosmos(self) -> Kosmos2:
        """The loaded pipeline (weights load on first use, or are waited for if they are loading)."""
        if self._kosmos is None:
            from kosmos2_cli.api.pipeline import Kosmos2

            if self.on_load:
                self.on_load(True)
            model = self._model.result() if self._model is not None else self._load_model()
            self._kosmos = Kosmos2(model, self.processor, self.options)
            if self.on_load:
                self.on_load(False)
        return self._kosmos

    def load(self) -> None:
        _ = self.kosmos

    @property
    def on_gpu(self) -> bool:
        """Will the model run on a GPU (without loading it: `auto` means CUDA when present)?"""
        import torch

        device = str(self.device)
        return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())

    def rows_that_fit(self, share: float = 0.4) -> int:
        """How many images a batch may hold on the GPU: its key/value cache and activations within `share` of the
        free memory before the weights came, less their size (the same whether they are loaded, loading or not yet)."""
        import torch

        from kosmos2_cli.model.config import Kosmos2Config
        from kosmos2_cli.model.devices import resolve_device, resolve_dtype

        device = resolve_device(self.device)
        width = resolve_dtype(self.dtype, device).itemsize
        config = Kosmos2Config.from_json_file(self.folder / "config.json")
        text = config.text_config
        if self._model is not None:  # loading from the start: the memory free before the weights came
            self._measured.wait()
        free = self._free_before if self._free_before is not None else torch.cuda.mem_get_info(device)[0]
        free -= PARAMETERS * width  # measured before any load: none of the weights are in it yet
        slots = -(-(PROMPT_SLOTS + self.options.max_new_tokens) // 64) * 64  # as the decoder rounds its cache
        per_row = 2 * text.layers * text.embed_dim * slots * width + ACTIVATIONS_PER_ROW * width // 2
        return max(0, int(free * share) // per_row)

    def prepare(self, name: str, spec: TaskSpec) -> Prepared:
        return prepare_image(self.processor.image_processor, name, spec)

    def worker_setup(self) -> tuple[Callable, tuple]:
        return worker_setup(self.folder)

    def collate(self, batch: Sequence[Prepared]):
        """The batch's pixels as one tensor; bound for a GPU, already on their way there (`Staged`).

        Done off the model's thread: the pixels go into page-locked memory and their copy to the GPU runs on a
        stream of its own, beside earlier work, instead of in front of the image encoder (at 256 images, 38 MB).
        """
        import torch

        from kosmos2_cli.runtime.stager import Staged, concatenated

        to_gpu = self.on_gpu and torch.cuda.is_available()
        pixels = concatenated([item.inputs for item in batch], pinned=to_gpu)
        return Staged.copy(pixels, self._staging_stream()) if to_gpu else pixels

    def _staging_stream(self):
        import torch

        if self._stream is None:
            from kosmos2_cli.model.devices import resolve_device

            self._stream = torch.cuda.Stream(resolve_device(self.device))
        return self._stream

    def stream(self, items: Iterator[Prepared], spec: TaskSpec, rows: int, calm: threading.Event | None = None,
               pace: Pace | None = None) -> Iterator[tuple[Prepared, Started]]:
        """Continuous batching (`Kosmos2.stream`), `rows` images in flight: the next refill's pixels are collated
        and copied to the device on a thread of their own while the rows decode (`Stager`)."""
        from kosmos2_cli.api.pipeline import Request
        from kosmos2_cli.runtime.stager import Staged, Stager

        kosmos = self.kosmos
        calm = calm or threading.Event()
        stager = Stager(self.collate, items, calm)
        per_image = max(1, spec.rows_per_image())
        default = FIRST_BATCH if self.on_gpu else 0
        first = 0 if self._streamed else (default if self.first_batch is None else self.first_batch)
        self._streamed = True
        alone = False  # the first refill decodes: nothing joins it

        def take(count: int, wait: bool) -> list[Request] | None:
            nonlocal first, alone
            if alone and not wait:
                return []
            alone = False
            if pace is not None and not pace.ready(wait):
                return []
            images = -(-count // per_image)
            if first and first < count:
                parts = stager.take(-(-first // per_image), then=images)
                alone = bool(parts)
            else:
                parts = stager.take(images)
            first = 0
            if not parts:
                return None
            requests = []
            for chunk, pixels in parts:
                embeds = kosmos.encode_pixels(pixels.take() if isinstance(pixels, Staged) else pixels).clone()
                mark("first images encoded (launched)")
                requests += [Request(item, item.name, item.image, spec.image_jobs(item.name), row)
                             for item, row in zip(chunk, embeds, strict=True)]
            return requests

        try:
            for started in kosmos.stream(take, rows * per_image, calm=calm, refill_share=self.refill_share):
                yield started.key, started
        finally:
            stager.close()

    def finish(self, started: Started, spec: TaskSpec) -> Result:
        return spec.record(self.kosmos.finish(started))

    def infer(self, batch: Sequence[Prepared], spec: TaskSpec) -> list[Result]:
        """One Result per prepared image, in order (a batch all at once: for callers with their own batching)."""
        done = dict((id(item), started) for item, started in self.stream(iter(batch), spec, len(batch)))
        return [self.finish(done[id(item)], spec) for item in batch]

    def free_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
            raise ModelLoadError(f"{folder}: the weights do not fit in the device's memory",
                                 advice="memory") from err
        message = " ".join(str(err).split())
        raise ModelLoadError(message if str(folder) in message else f"{folder}: {message}") from err
