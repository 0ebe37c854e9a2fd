"""Images made ready for the model on CPU workers: decoded, upright, checked against the task, preprocessed.

Plain CPU work that needs no model, so it runs on worker threads (or processes, for long runs on many cores)
while the model works on earlier images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kosmos2_cli.api.tasks import TaskSpec

if TYPE_CHECKING:
    from PIL import Image


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


def prepare_image(image_processor, name: str, spec: TaskSpec, keep_image: bool = True) -> Prepared:
    """Load, check and preprocess one image (CPU work that needs no model). Pixels come back as the resized
    picture, a (1, 3, H, W) uint8 array (a quarter of the float values' bytes to move between processes and to
    the device); `Kosmos2.encode_pixels` turns it into the processor's values."""
    from kosmos2_cli.processing.images import load_image

    return _checked(image_processor, load_image(name), name, spec, keep_image)


def prepare_upload(image_processor, data: bytes, name: str, spec: TaskSpec) -> Prepared:
    """`prepare_image` for an upload's bytes (`name` only labels the messages; nothing is read from disk); the
    picture comes back as its size."""
    from kosmos2_cli.processing.images import load_image_bytes

    return _checked(image_processor, load_image_bytes(data, name), name, spec, keep_image=False)


def _checked(image_processor, image: Image.Image, name: str, spec: TaskSpec, keep_image: bool) -> Prepared:
    spec.check_image(*image.size)
    pixels = image_processor.resized(image)[None]  # bytes: the model's side looks their values up
    return Prepared(name, image if keep_image else Picture(*image.size), pixels)


def worker_setup(folder: Path) -> tuple[Callable, tuple]:
    """(initializer, its arguments) for a worker process that prepares images for the model in `folder`."""
    return _init_worker, (folder,)


_WORKER: dict[str, Any] = {}


def _init_worker(folder: Path) -> None:
    import signal

    from kosmos2_cli.processing.image_processing import Kosmos2ImageProcessor

    # Ctrl-C reaches the whole process group: the parent handles it (it drains, or stops the run and keeps what was
    # written) and then shuts its pool down; a worker's own KeyboardInterrupt would only print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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


def prepare_upload_in_worker(data: bytes, name: str, spec: TaskSpec) -> Prepared:
    """`prepare_upload` in a worker process set up by `PipelineEngine.worker_setup`."""
    return prepare_upload(_WORKER["image_processor"], data, name, spec)
