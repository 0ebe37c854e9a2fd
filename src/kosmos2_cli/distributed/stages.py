"""What runs on the Ray cluster's workers: image preparation as CPU tasks, the model in one actor per GPU.

Both stages do what plain `batch` does for one image, with the same code: `prepare_outcome` + `prepare_image`
(so a bad image gets the same error record, word for word) and the runtime's `Runner` over a `PipelineEngine`
(the single-GPU fast path, its automatic batch size, continuous batching, halving on out-of-memory), whose
records are built by the same `TaskSpec.record` / `failure_record`. Records travel back as JSON text.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from kosmos2_cli.api.options import GenerationOptions
from kosmos2_cli.api.results import Failure
from kosmos2_cli.api.tasks import TaskSpec


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, sent to it once (picklable). `folder` is the model folder on the driver's
    machine; a node that lacks it finds `model` (a repo id) in its own hub cache, or downloads it there."""

    spec: TaskSpec
    folder: str
    model: str
    revision: str | None
    device: str  # "cuda" (the actor's own GPU) or "cpu"
    dtype: str
    options: GenerationOptions
    refill_share: float | None = None
    batch_size: int = 0  # images in flight per actor; 0: the engine's automatic size


def model_folder(job: Job) -> Path:
    """The model folder on this node."""
    folder = Path(job.folder)
    if (folder / "config.json").is_file():
        return folder
    from kosmos2_cli.model.hub import resolve_model_dir

    return resolve_model_dir(job.model, revision=job.revision)


@lru_cache(maxsize=4)
def _image_processor(folder: Path):
    from kosmos2_cli.processing.image_processing import Kosmos2ImageProcessor

    return Kosmos2ImageProcessor.from_pretrained(folder)


@lru_cache(maxsize=4)
def _blank(folder: Path):
    """The pixels of a black picture: what a failed image's row carries (a tensor column has one shape)."""
    from PIL import Image

    return _image_processor(folder).resized(Image.new("RGB", (8, 8))) * 0  # as prepared pictures: bytes


def _prepare_one(name: str, spec: TaskSpec, processor) -> Any:
    """Plain batch's preparation of one image; an object-store URI is read into a temporary file first (the
    checks are the file's), and its messages name the URI."""
    from kosmos2_cli.distributed.listing import is_uri
    from kosmos2_cli.runtime.prepare import prepare_image

    if not is_uri(name):
        return prepare_image(processor, name, spec, keep_image=False)
    from kosmos2_cli.distributed.listing import open_uri
    from kosmos2_cli.processing.images import ImageLoadError

    try:
        filesystem, path = open_uri(name)
        with filesystem.open_input_stream(path) as stream:
            data = stream.read()
    except Exception as err:  # pyarrow's own words: missing object, no access, a folder
        raise ImageLoadError(f"{name}: cannot read ({' '.join(str(err).split())})") from err
    with tempfile.NamedTemporaryFile(suffix=Path(path).suffix) as temp:
        temp.write(data)
        temp.flush()
        try:
            prepared = prepare_image(processor, temp.name, spec, keep_image=False)
        except ImageLoadError as err:
            raise ImageLoadError(str(err).replace(temp.name, name)) from err
    prepared.name = name
    return prepared


def prepare_batch(batch, job: Job) -> dict[str, Any]:
    """Ray Data CPU task: names in, rows out (name, pixels, size, error: "" for a good image)."""
    import numpy as np

    from kosmos2_cli.runtime.runner import prepare_outcome

    folder = model_folder(job)
    processor = _image_processor(folder)
    names = batch["image"].to_pylist() if hasattr(batch["image"], "to_pylist") else list(batch["image"])
    pixels, widths, heights, errors = [], [], [], []
    for name in names:
        outcome = prepare_outcome(_prepare_one, name, job.spec, processor)
        if isinstance(outcome, Failure):
            pixels.append(_blank(folder))
            widths.append(0)
            heights.append(0)
            errors.append(outcome.error)
        else:
            pixels.append(outcome.inputs[0])
            widths.append(outcome.image.width)
            heights.append(outcome.image.height)
            errors.append("")
    return {"image": np.array(names, dtype=object), "pixels": np.stack(pixels),
            "width": np.array(widths, dtype=np.int64), "height": np.array(heights, dtype=np.int64),
            "error": np.array(errors, dtype=object)}


class _Ready:
    """The engine of one actor call: images come prepared (by the CPU tasks); everything else is the actor's
    PipelineEngine."""

    def __init__(self, engine, items: dict) -> None:
        self._engine = engine
        self._items = items

    def prepare(self, name: str, spec: TaskSpec):
        return self._items[name]

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


class ModelWorker:
    """Ray Data actor: the model on this actor's device, loaded once; each call answers one batch of rows."""

    def __init__(self, job: Job) -> None:
        from kosmos2_cli.runtime.engine import PipelineEngine
        from kosmos2_cli.runtime.runner import default_batch_size

        self.job = job
        self.engine = PipelineEngine(model_folder(job), job.device, job.dtype, job.options,
                                     refill_share=job.refill_share)
        self.engine.load()
        self.rows = job.batch_size or default_batch_size(self.engine)
        self.pid = os.getpid()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from kosmos2_cli.runtime.prepare import Picture, Prepared
        from kosmos2_cli.runtime.runner import Runner

        spec = self.job.spec
        names = [str(name) for name in batch["image"]]
        records: dict[str, dict] = {}
        ready: dict[str, Prepared] = {}
        for index, name in enumerate(names):
            if batch["error"][index]:
                records[name] = spec.failure_record(Failure(name, str(batch["error"][index]), spec.task))
            else:
                picture = Picture(int(batch["width"][index]), int(batch["height"][index]))
                ready[name] = Prepared(name, picture, batch["pixels"][index][None])
        if ready:
            runner = Runner(_Ready(self.engine, ready), spec, self.rows, workers=1, keep_images=False)
            for outcome, _ in runner.run(list(ready)):
                records[outcome.image] = (spec.failure_record(outcome) if isinstance(outcome, Failure)
                                          else outcome.to_dict())
            self.rows = runner.batch_size  # smaller after running out of device memory: keep it
        lines = [json.dumps(records[name], ensure_ascii=False) for name in names]
        return {"image": np.array(names, dtype=object), "record": np.array(lines, dtype=object)}
