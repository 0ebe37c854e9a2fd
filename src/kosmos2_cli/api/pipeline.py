"""The small scripting API: `Kosmos2.from_pretrained(...).caption(image)` and friends, returning typed results.

It owns the data path from pictures to `Result`s: prompt, processor, one batched `generate`, post-processing,
and pixel boxes in the original image's coordinates.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from kosmos2_cli.api import prompts
from kosmos2_cli.api.results import Entity, Result, to_pixels
from kosmos2_cli.model.hub import DEFAULT_MODEL

ImageInput = str | Path | Image.Image


@dataclass
class GenerationOptions:
    """How tokens are chosen; defaults are the model card's (greedy, up to 128 new tokens)."""

    max_new_tokens: int = 128
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = 50
    seed: int | None = None

    def kwargs(self) -> dict[str, Any]:
        return dict(
            max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=self.do_sample,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
        )


@dataclass
class Started:
    """A batch whose tokens are generated and not yet turned into results (see `Kosmos2.start`)."""

    images: list[tuple[str, Any]]
    jobs: list[Job]
    groups: list[tuple[list[int], list[list[int]], list[list[int]]]]  # (job indices, prompt ids, all ids)


@dataclass
class _Open:
    """An image whose answers are being generated (continuous batching): answers by job index."""

    key: object
    name: str
    image: Any
    jobs: list[Job]
    prompt_ids: list[list[int]]
    answers: dict[int, list[int]]


@dataclass
class Job:
    """One prompt for one image; `image_index` says which picture of the batch it reads."""

    image_index: int
    task: str
    prompt: str
    extra: dict[str, Any]


class Kosmos2:
    """A loaded model and processor, with one method per task of the model card."""

    def __init__(self, model, processor, options: GenerationOptions | None = None) -> None:
        self.model = model
        self.processor = processor
        self.options = options or GenerationOptions()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = DEFAULT_MODEL,
        *,
        revision: str | None = None,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        options: GenerationOptions | None = None,
    ) -> Kosmos2:
        from kosmos2_cli.api.models import Kosmos2ForConditionalGeneration
        from kosmos2_cli.model.hub import resolve_model_dir
        from kosmos2_cli.processing.processor import Kosmos2Processor

        folder = resolve_model_dir(name_or_path, revision=revision)
        model = Kosmos2ForConditionalGeneration.from_pretrained(folder, device=device, dtype=dtype)
        return cls(model, Kosmos2Processor.from_pretrained(folder), options)

    # -- tasks ------------------------------------------------------------------------------------------------

    def caption(self, images: ImageInput | Sequence[ImageInput], detailed: bool = False, **options):
        """'An image of ...' (or a detailed description) with its phrases grounded."""
        return self._single_or_list(images, lambda i: [Job(i, "caption", prompts.caption_prompt(detailed), {})],
                                    options)

    def ask(self, images: ImageInput | Sequence[ImageInput], question: str, **options):
        """The answer to a question about the picture, with grounded phrases."""
        prompt = prompts.ask_prompt(question)
        return self._single_or_list(images, lambda i: [Job(i, "ask", prompt, {"question": question})], options)

    def ground(self, images: ImageInput | Sequence[ImageInput], phrases: str | Sequence[str], **options):
        """Where each phrase is: one image encoding, all phrases generated as one batch."""
        phrases = [phrases] if isinstance(phrases, str) else list(phrases)
        if not phrases:
            raise prompts.PromptError("give at least one phrase")
        built = [prompts.ground_prompt(p) for p in phrases]
        return self._single_or_list(
            images, lambda i: [Job(i, "ground", p, {"phrase": " ".join(ph.split())}) for p, ph in
                               zip(built, phrases, strict=True)], options)

    def refer(self, images: ImageInput | Sequence[ImageInput], box: Sequence[float], normalized: bool = False,
              **options):
        """A description of what is inside `box` (pixels of the image, or 0..1 with `normalized`)."""
        return self._single_or_list(images, lambda i: [Job(i, "refer", "", {"box": tuple(box),
                                                                          "normalized": normalized})], options)

    # -- machinery --------------------------------------------------------------------------------------------

    def _single_or_list(self, images, jobs_for, options):
        single = isinstance(images, (str, Path, Image.Image))
        items = [images] if single else list(images)
        loaded = [self._load(item) for item in items]
        jobs = [job for index in range(len(loaded)) for job in jobs_for(index)]
        results = self.run(loaded, jobs, **options)
        return results[0] if single and len(results) == 1 else results

    @staticmethod
    def _load(item: ImageInput) -> tuple[str, Image.Image]:
        if isinstance(item, Image.Image):
            return getattr(item, "filename", "") or "<image>", item
        from kosmos2_cli.processing.images import load_image

        return str(item), load_image(item)

    def run(self, images: Sequence[tuple[str, Image.Image]], jobs: Sequence[Job], image_embeds=None,
            **options) -> list[Result]:
        """Run `jobs` over `images`: each image is encoded once, then the prompts decode as batches.

        `image_embeds` (one row per image) skips the image encoder, e.g. when the caller encoded ahead.
        """
        return self.finish(self.start(images, jobs, image_embeds, **options))

    @torch.no_grad()
    def start(self, images: Sequence[tuple[str, Image.Image]], jobs: Sequence[Job], image_embeds=None,
              **options) -> Started:
        """The model's half of `run` (image encoder, generation), up to token ids on the host. A caller may
        `finish` one batch on the CPU while the next one `start`s on the device."""
        opts = GenerationOptions(**{**self.options.__dict__, **options})
        jobs = [self._with_refer_prompt(job, images[job.image_index][1]) for job in jobs]
        if image_embeds is None:
            image_embeds = self.encode_images([image for _, image in images])
        groups = []
        # `ground` rows stop at their first </object>; other tasks must not, so they generate apart.
        for grounding in (False, True):
            picked = [i for i, job in enumerate(jobs) if (job.task == "ground") == grounding]
            if picked:
                prompt_ids, all_ids = self._generate([jobs[i] for i in picked], [im for _, im in images],
                                                     image_embeds, opts, grounding)
                groups.append((picked, prompt_ids, all_ids))
        return Started(list(images), jobs, groups)

    def finish(self, started: Started) -> list[Result]:
        """The CPU half of `run`: token ids to text, post-processing, results in the order of the jobs."""
        results: dict[int, Result] = {}
        decode = self.processor.batch_decode
        for picked, prompt_ids, all_ids in started.groups:
            full = decode(all_ids, skip_special_tokens=True)
            # The prompt as the tokenizer gives it back (normalized like the answer), to cut it off exactly.
            asked = decode(prompt_ids, skip_special_tokens=True)
            for i, text, prompt_text in zip(picked, full, asked, strict=True):
                job = started.jobs[i]
                name, image = started.images[job.image_index]
                results[i] = self._result(job, name, image, text, prompt_text)
        return [results[i] for i in range(len(started.jobs))]

    @torch.no_grad()
    def stream(self, encoded: Callable[[int], tuple[list[tuple[object, str, Any]], torch.Tensor | None]],
               jobs: Sequence[Job], rows: int, calm: threading.Event | None = None,
               **options) -> Iterator[tuple[object, Started]]:
        """Continuous batching: `jobs` (one image's, `image_index` 0) for every image `encoded(n)` hands over (up
        to n `(key, name, image)` with their embeddings, none when there are no more), `rows` answers in flight.

        (key, Started) for each image once all its answers have ended, in that order; `finish` makes results.
        Greedy or sampling (one beam), and one kind of job (ground's stop at `</object>` applies to every row).
        `calm`: see `continuous.stream`.
        """
        from kosmos2_cli.generation.continuous import Prompt
        from kosmos2_cli.generation.continuous import stream as continuous_stream
        from kosmos2_cli.generation.generate import Sampling

        opts = GenerationOptions(**{**self.options.__dict__, **options})
        if opts.num_beams != 1 or len({job.task == "ground" for job in jobs}) != 1:
            raise ValueError("continuous batching takes one beam and one kind of job")
        tokenizer = self.processor.tokenizer
        stops = [self.model.config.text_config.eos_token_id]
        if jobs[0].task == "ground":
            stops.append(tokenizer.convert_tokens_to_ids("</object>"))
        tokenized: dict[str, tuple[list[int], list[int]]] = {}  # prompt text -> ids, image slots
        waiting: deque[Prompt] = deque()
        images: dict[int, _Open] = {}  # by the order they came in
        numbers = itertools.count()

        def take_images(count: int) -> bool:
            got, embeds = encoded(count)
            if not got:
                return False
            embeds = embeds.clone()  # small batches come from a CUDA graph's output, which the next call reuses
            for (key, name, image), row in zip(got, embeds, strict=True):
                mine = [self._with_refer_prompt(Job(0, job.task, job.prompt, dict(job.extra)), image) for job in jobs]
                new = list(dict.fromkeys(job.prompt for job in mine if job.prompt not in tokenized))
                if new:
                    batch = self._prompts(new, [image] * len(new))
                    for text, ids, slots, keep in zip(new, batch["input_ids"], batch["image_embeds_position_mask"],
                                                      batch["attention_mask"].bool(), strict=True):
                        tokenized[text] = ids[keep].tolist(), slots[keep].tolist()
                index = next(numbers)
                images[index] = _Open(key, name, image, mine, [tokenized[job.prompt][0] for job in mine], {})
                waiting.extend(Prompt((index, j), *tokenized[job.prompt], row) for j, job in enumerate(mine))
            return True

        def admit(count: int) -> list[Prompt]:
            while len(waiting) < count and take_images(-(-(count - len(waiting)) // len(jobs))):
                pass
            return [waiting.popleft() for _ in range(min(count, len(waiting)))]

        if not take_images(-(-rows // len(jobs))):
            return
        generator = torch.Generator(device=self.model.device).manual_seed(opts.seed) if (
            opts.seed is not None) else None
        sampling = Sampling(opts.do_sample, opts.temperature, opts.top_k, opts.top_p, generator)
        answers = continuous_stream(self.model, admit, rows=rows, longest_prompt=max(len(p.ids) for p in waiting),
                                    max_new_tokens=opts.max_new_tokens, stops=stops,
                                    pad=self.model.config.text_config.pad_token_id, sampling=sampling, calm=calm)
        for (index, j), answer in answers:
            image = images[index]
            image.answers[j] = answer
            if len(image.answers) == len(image.jobs):
                del images[index]
                prompt_ids = image.prompt_ids
                all_ids = [prompt_ids[k] + image.answers[k] for k in range(len(image.jobs))]
                yield image.key, Started([(image.name, image.image)], image.jobs,
                                         [(list(range(len(image.jobs))), prompt_ids, all_ids)])

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Pixel values, one row per image: CPU work that needs no model, so callers may run it on threads."""
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image embeddings for the decoder from `preprocess`'s pixel values, one row per image."""
        from kosmos2_cli.generation.generate import encode_images

        return encode_images(self.model, pixel_values.to(self.model.device, non_blocking=pixel_values.is_pinned()))

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Image embeddings for the decoder, one row per image."""
        return self.encode_pixels(self.preprocess(images))

    def _generate(self, jobs: Sequence[Job], images: Sequence[Image.Image], image_embeds: torch.Tensor,
                  opts: GenerationOptions, grounding: bool) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt ids, prompt + answer ids) per job, as host lists."""
        batch = self._prompts([job.prompt for job in jobs], [images[job.image_index] for job in jobs])
        rows = torch.tensor([job.image_index for job in jobs], device=image_embeds.device)
        stop = [self.processor.tokenizer.convert_tokens_to_ids("</object>")] if grounding else []
        generated = self.model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            image_embeds=image_embeds.index_select(0, rows),
            image_embeds_position_mask=batch["image_embeds_position_mask"], stop_token_ids=stop, **opts.kwargs(),
        )
        return batch["input_ids"].tolist(), generated.tolist()

    def _prompts(self, texts: list[str], images: list) -> Any:
        """Token ids, attention mask and image slots of prompts whose images are already encoded."""
        return self.processor(text=texts, images=images, pixels=False,
                              num_image_tokens=self.model.config.latent_query_num, return_tensors="pt")

    def _with_refer_prompt(self, job: Job, image: Image.Image) -> Job:
        if job.task != "refer" or job.prompt:
            return job
        box = prompts.normalize_box(job.extra["box"], image.width, image.height, job.extra["normalized"])
        cells = prompts.box_to_cells(box)
        extra = {"box": [round(v, 6) for v in box], "box_px": list(to_pixels(box, image.width, image.height)),
                 "cells": list(cells)}
        return Job(job.image_index, "refer", prompts.refer_prompt(cells), extra)

    def _result(self, job: Job, name: str, image: Image.Image, decoded: str, decoded_prompt: str = "") -> Result:
        raw = self.processor.post_process_generation(decoded, cleanup_and_extract=False)
        text, found = self.processor.post_process_generation(decoded)
        width, height = image.size
        prefix = ""
        if job.task == "ground":
            return self._ground_result(job, name, image, raw)
        if job.task in ("ask", "refer"):
            prefix, _ = self.processor.post_process_generation(decoded_prompt or job.prompt)
        entities = []
        start = 0
        if prefix and text.startswith(prefix):
            start = len(text) - len(text[len(prefix):].lstrip())
        for phrase, (a, b), boxes in found:
            if a < start:
                continue  # a phrase of the prompt (refer's "It"), not of the answer
            entities.append(Entity(phrase, (a - start, b - start), [tuple(x) for x in boxes],
                                   [to_pixels(x, width, height) for x in boxes]))
        return Result(name, width, height, job.task, job.prompt, text[start:], entities, raw, dict(job.extra))

    def _ground_result(self, job: Job, name: str, image: Image.Image, raw: str) -> Result:
        from kosmos2_cli.processing.postprocess import patch_index_to_coordinate

        phrase = job.extra["phrase"]
        after = raw.split("</phrase>", 1)[-1]  # what the model wrote after the phrase
        # Placed means an <object> right after the phrase; text first means the model went on to something else.
        placed = re.match(r"\s*<object>(.*?)</object>", after)
        cells = re.findall(r"<patch_index_(\d+)><patch_index_(\d+)>", placed.group(1)) if placed else []
        boxes = [patch_index_to_coordinate(int(a), int(b), prompts.GRID) for a, b in cells]
        width, height = image.size
        entities = [Entity(phrase, (0, len(phrase)), boxes, [to_pixels(b, width, height) for b in boxes])] if (
            boxes) else []
        return Result(name, width, height, "ground", job.prompt, phrase, entities, raw,
                      {**job.extra, "found": bool(boxes)})
