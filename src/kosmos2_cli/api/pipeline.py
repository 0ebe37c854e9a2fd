"""The scripting API: `Kosmos2.from_pretrained(...).caption(image)` and friends, returning typed results.

It owns the data path from pictures to `Result`s: prompts, the processor, the image encoder, generation through
the row scheduler (`generation.rows`: a batch is rows that start together; a stream of images or requests
keeps them full), post-processing, box scores and pixel boxes in the original image's coordinates. Beam search,
which rows cannot share, runs as static batches.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from kosmos2_cli.api import prompts
from kosmos2_cli.api.answers import Answers, Job, patch_probabilities
from kosmos2_cli.api.options import GenerationOptions
from kosmos2_cli.api.results import Result, to_pixels
from kosmos2_cli.model.hub import DEFAULT_MODEL

__all__ = ["GenerationOptions", "Job", "Kosmos2", "Request", "Started"]

ImageInput = str | Path | Image.Image


@dataclass
class Request:
    """One image and its jobs (prompts), answered together; `key` comes back with them. `embeds`: the image's
    embeddings, (image tokens, width) on the model's device; `options`: this request's own (None: the
    pipeline's)."""

    key: object
    name: str
    image: Any  # a PIL image, or anything with width, height and size
    jobs: list[Job]
    embeds: torch.Tensor
    options: GenerationOptions | None = None


@dataclass
class Started:
    """Jobs whose tokens are generated and not yet turned into results (`Kosmos2.finish` does that)."""

    images: list[tuple[str, Any]]
    jobs: list[Job]
    # (job indices, prompt ids, prompt + answer ids, the answers' log-probabilities or None)
    groups: list[tuple[list[int], list[list[int]], list[list[int]], list[list[float]] | None]]
    key: object = None


# take(n, wait): up to n requests; [] when none is ready (wait=False), None when there will be no more.
Take = Callable[[int, bool], "list[Request] | None"]


@dataclass
class _Open:
    """A request whose answers are being generated: answers by job index."""

    request: Request
    jobs: list[Job]
    prompt_ids: list[list[int]]
    answers: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)
    admitted: int = 0  # prompts handed to the rows
    dropped: int = 0  # ... of which the rows dropped, cancelled


class _CancelledRows:
    """The row scheduler's view of cancelled requests: a row's tag (request number, job) is cancelled while its
    request's key is in `keys` (which callers fill from any thread). Once every row of a cancelled request is
    gone, the request and its key are forgotten."""

    def __init__(self, keys: set, open_requests: dict[int, _Open], waiting: deque) -> None:
        self.keys, self.open, self.waiting = keys, open_requests, waiting

    def __bool__(self) -> bool:
        return bool(self.keys)

    def __contains__(self, tag) -> bool:
        request = self.open.get(tag[0])
        return request is not None and request.request.key in self.keys

    def discard(self, tag) -> None:
        request = self.open.get(tag[0])
        if request is not None:
            request.dropped += 1
            self.forget_if_done(tag[0])

    def forget_if_done(self, index: int) -> None:
        """Forget a cancelled request none of whose prompts is on a row any more (those waiting never start)."""
        request = self.open[index]
        if any(p.tag[0] == index for p in self.waiting):
            kept = [p for p in self.waiting if p.tag[0] != index]
            self.waiting.clear()
            self.waiting.extend(kept)
        if request.dropped + len(request.answers) >= request.admitted:
            del self.open[index]
            self.keys.discard(request.request.key)


class Kosmos2:
    """A loaded model and processor, with one method per task of the model card."""

    def __init__(self, model, processor, options: GenerationOptions | None = None) -> None:
        self.model = model
        self.processor = processor
        self.options = options or GenerationOptions()
        self.answers = Answers(processor)
        self._patch_ids: frozenset[int] | None = None
        self._tables: dict[torch.device, torch.Tensor] = {}  # `_values`' lookup table, per device

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
        """Run `jobs` over `images`: each image is encoded once (unless `image_embeds`, one row per image, are
        given), then every prompt decodes as one batch. Results in the order of `jobs`."""
        opts = self._options(options)
        if image_embeds is None:
            image_embeds = self.encode_images([image for _, image in images])
        image_embeds = image_embeds.clone()  # small batches come from a CUDA graph's output, which later calls reuse
        by_image: dict[int, list[int]] = {}
        for index, job in enumerate(jobs):
            by_image.setdefault(job.image_index, []).append(index)
        requests = [Request(i, *images[i], [replace(jobs[j], image_index=0) for j in picked], image_embeds[i])
                    for i, picked in by_image.items()]
        pending: list[Request] | None = requests

        def take(count: int, wait: bool) -> list[Request] | None:
            nonlocal pending
            handed, pending = pending, None
            return handed

        results: dict[int, Result] = {}
        for started in self.stream(take, rows=max(1, len(jobs)), options=opts):
            for job_index, result in zip(by_image[started.key], self.finish(started), strict=True):
                results[job_index] = result
        return [results[i] for i in range(len(jobs))]

    @torch.no_grad()
    def stream(self, take: Take, rows: int, *, options: GenerationOptions | None = None,
               calm: threading.Event | None = None, cancelled: set | None = None,
               longest_prompt: int | None = None, refill_share: float | None = None) -> Iterator[Started]:
        """Answers for the requests `take` hands over, `rows` prompts in flight: a Started (its `key` the
        request's) for each request once all its answers have ended, in that order; `finish` makes results.

        `longest_prompt` bounds the prompts' tokens (default: the first requests' longest); `refill_share`: see
        `generation.rows.stream` (default there). The key of a request taken and not yet answered, put into
        `cancelled` (from any thread), stops its rows at the next step; its prompts still waiting never start, no
        Started comes for it, and its key is removed once its rows are gone. Other keys are removed.
        With beams (`options.num_beams` > 1) requests are answered as static batches of `rows` prompts.
        """
        opts = options or self.options
        if opts.num_beams > 1:
            yield from self._beam_batches(take, rows, opts)
            return
        from kosmos2_cli.generation.rows import Prompt
        from kosmos2_cli.generation.rows import stream as row_stream

        eos = self.model.config.text_config.eos_token_id
        object_end = self.processor.tokenizer.convert_tokens_to_ids("</object>")
        tokenized: dict[str, tuple[list[int], list[int]]] = {}  # prompt text -> ids, image slots
        waiting: deque[Prompt] = deque()
        open_requests: dict[int, _Open] = {}
        numbers = itertools.count()
        run_sampling = self._sampling(opts)
        exhausted = False
        keys = cancelled if cancelled is not None else set()
        dropping = _CancelledRows(keys, open_requests, waiting)

        def prune() -> None:
            """Cancelled requests: their waiting prompts go; those with no row left are forgotten."""
            if not keys:
                return
            mine = {request.request.key: index for index, request in open_requests.items()}
            gone = [key for key in list(keys) if key not in mine]
            keys.difference_update(gone)  # answered already (or never taken): nothing to stop
            for index in {mine[key] for key in list(keys) if key in mine}:
                dropping.forget_if_done(index)

        def accept(requests: list[Request]) -> None:
            for request in requests:
                mine = [self._with_refer_prompt(job, request.image) for job in request.jobs]
                new = list(dict.fromkeys(job.prompt for job in mine if job.prompt not in tokenized))
                if new:
                    batch = self._prompts(new, [request.image] * len(new))
                    for text, ids, slots, keep in zip(new, batch["input_ids"], batch["image_embeds_position_mask"],
                                                      batch["attention_mask"].bool(), strict=True):
                        tokenized[text] = ids[keep].tolist(), slots[keep].tolist()
                own = request.options
                # Rows that choose tokens as the run does share its sampling (one group per step, not one per
                # request): greedy is greedy whatever the cap, temperature or top-k.
                same = own is None or (not own.do_sample and not opts.do_sample) or \
                    replace(own, max_new_tokens=opts.max_new_tokens) == opts
                sampling = None if same else self._sampling(own)
                cap = None if own is None else own.max_new_tokens
                index = next(numbers)
                open_requests[index] = _Open(request, mine, [tokenized[job.prompt][0] for job in mine])
                waiting.extend(Prompt((index, j), *tokenized[job.prompt], request.embeds, cap,
                                      (object_end,) if job.task == "ground" else (), sampling)
                               for j, job in enumerate(mine))

        def admit(count: int, wait: bool):
            nonlocal exhausted
            prune()
            while len(waiting) < count and not exhausted:
                got = take(count - len(waiting), wait and not waiting)
                if got is None:
                    exhausted = True
                elif not got:
                    break
                else:
                    accept(got)
                    prune()
            if not waiting:
                return None if exhausted else []
            handed = [waiting.popleft() for _ in range(min(count, len(waiting)))]
            for prompt in handed:
                open_requests[prompt.tag[0]].admitted += 1
            return handed

        first = take(rows, True)
        if not first:
            return
        accept(first)
        prune()
        if not waiting:
            return
        longest = longest_prompt or max(len(p.ids) for p in waiting)
        share = {} if refill_share is None else {"refill_share": refill_share}
        answers = row_stream(self.model, admit, rows=rows, longest_prompt=longest,
                             max_new_tokens=opts.max_new_tokens, stops=[eos],
                             pad=self.model.config.text_config.pad_token_id, sampling=run_sampling, calm=calm,
                             cancelled=dropping, **share)
        for answer in answers:
            index, j = answer.tag
            request = open_requests.get(index)
            if request is None:
                continue
            request.answers[j] = (answer.ids, answer.logprobs)
            if keys and request.request.key in keys:  # cancelled while this row ended
                dropping.forget_if_done(index)
            elif len(request.answers) == len(request.jobs):
                del open_requests[index]
                yield self._started(request)

    def _started(self, request: _Open) -> Started:
        count = len(request.jobs)
        all_ids = [request.prompt_ids[k] + request.answers[k][0] for k in range(count)]
        logprobs = [request.answers[k][1] for k in range(count)]
        return Started([(request.request.name, request.request.image)], request.jobs,
                       [(list(range(count)), request.prompt_ids, all_ids, logprobs)], request.request.key)

    def _sampling(self, opts: GenerationOptions):
        from kosmos2_cli.generation.sampling import Sampling

        generator = None
        if opts.do_sample and opts.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(opts.seed)
        return Sampling(opts.do_sample, opts.temperature, opts.top_k, opts.top_p, generator)

    def _options(self, options: dict[str, Any]) -> GenerationOptions:
        return GenerationOptions(**{**self.options.__dict__, **options})

    def _beam_batches(self, take: Take, rows: int, opts: GenerationOptions) -> Iterator[Started]:
        """Beam search: requests in static batches of about `rows` prompts, one `generate` per batch."""
        while (requests := take(rows, True)) is not None:
            if not requests:
                continue
            images = [(r.name, r.image) for r in requests]
            jobs = [replace(job, image_index=i) for i, r in enumerate(requests) for job in r.jobs]
            embeds = torch.stack([r.embeds for r in requests])
            started = self._generate_beams(images, jobs, embeds, opts)
            for i, request in enumerate(requests):
                picked = [k for k, job in enumerate(jobs) if job.image_index == i]
                groups = []
                for indices, prompt_ids, all_ids, logprobs in started.groups:
                    mine = [n for n, k in enumerate(indices) if k in picked]
                    if mine:
                        groups.append(([picked.index(indices[n]) for n in mine], [prompt_ids[n] for n in mine],
                                       [all_ids[n] for n in mine], None if logprobs is None else
                                       [logprobs[n] for n in mine]))
                yield Started([images[i]], [replace(jobs[k], image_index=0) for k in picked], groups, request.key)

    def _generate_beams(self, images, jobs: list[Job], embeds: torch.Tensor, opts: GenerationOptions) -> Started:
        """One static `generate` with beams for each kind of job (`ground` rows stop at their first `</object>`;
        the others must not), then the location tokens scored along the returned beams."""
        from kosmos2_cli.generation.scoring import answer_logprobs

        jobs = [self._with_refer_prompt(job, images[job.image_index][1]) for job in jobs]
        groups = []
        for grounding in (False, True):
            picked = [i for i, job in enumerate(jobs) if (job.task == "ground") == grounding]
            if not picked:
                continue
            chosen = [jobs[i] for i in picked]
            batch = self._prompts([job.prompt for job in chosen], [images[job.image_index][1] for job in chosen])
            rows = torch.tensor([job.image_index for job in chosen], device=embeds.device)
            stop = [self.processor.tokenizer.convert_tokens_to_ids("</object>")] if grounding else []
            image_embeds = embeds.index_select(0, rows)
            generated = self.model.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_embeds=image_embeds,
                image_embeds_position_mask=batch["image_embeds_position_mask"], stop_token_ids=stop,
                **opts.kwargs(),
            )
            logprobs = answer_logprobs(self.model, generated, batch, image_embeds, self.patch_ids)
            groups.append((picked, batch["input_ids"].tolist(), generated.tolist(), logprobs))
        return Started(list(images), jobs, groups)

    def finish(self, started: Started) -> list[Result]:
        """The CPU half: token ids to text, post-processing, box scores; results in the order of the jobs."""
        results: dict[int, Result] = {}
        decode = self.processor.batch_decode
        for picked, prompt_ids, all_ids, logprobs in started.groups:
            full = decode(all_ids, skip_special_tokens=True)
            # The prompt as the tokenizer gives it back (normalized like the answer), to cut it off exactly.
            asked = decode(prompt_ids, skip_special_tokens=True)
            for n, (i, text, prompt_text) in enumerate(zip(picked, full, asked, strict=True)):
                job = started.jobs[i]
                name, image = started.images[job.image_index]
                probs = patch_probabilities(all_ids[n], len(prompt_ids[n]), None if logprobs is None else
                                            logprobs[n], self.patch_ids)
                results[i] = self._result(job, name, image, text, prompt_text, probs)
        return [results[i] for i in range(len(started.jobs))]

    @property
    def patch_ids(self) -> frozenset[int]:
        """The ids of the location tokens `<patch_index_0000>` ... (one per grid cell)."""
        if self._patch_ids is None:
            tokenizer = self.processor.tokenizer
            self._patch_ids = frozenset(tokenizer.convert_tokens_to_ids(prompts.patch_token(i))
                                        for i in range(prompts.GRID * prompts.GRID))
        return self._patch_ids

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Pixel values, one row per image: CPU work that needs no model, so callers may run it on threads."""
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image embeddings for the decoder from `preprocess`'s pixel values, or from the image processor's
        `resized` bytes (uint8), one row per image."""
        from kosmos2_cli.generation.decoder import encode_images

        pixels = pixel_values.to(self.model.device, non_blocking=pixel_values.is_pinned())
        if pixels.dtype == torch.uint8:
            pixels = self._values(pixels)
        return encode_images(self.model, pixels)

    def _values(self, pixels: torch.Tensor) -> torch.Tensor:
        """The processor's float values of resized bytes (N, 3, H, W), looked up where the bytes are."""
        table = self._tables.get(pixels.device)
        if table is None:
            table = torch.from_numpy(self.processor.image_processor.lookup_table()).to(pixels.device)
            self._tables[pixels.device] = table
        channel = torch.arange(table.shape[0], device=pixels.device).view(1, -1, 1, 1) * table.shape[1]
        return table.flatten()[pixels.long() + channel]

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Image embeddings for the decoder, one row per image."""
        return self.encode_pixels(self.preprocess(images))

    def _prompts(self, texts: list[str], images: list) -> Any:
        """Token ids, attention mask and image slots of prompts whose images are already encoded."""
        return self.processor(text=texts, images=images, pixels=False,
                              num_image_tokens=self.model.config.latent_query_num, return_tensors="pt")

    def _with_refer_prompt(self, job: Job, image) -> Job:
        if job.task != "refer" or job.prompt:
            return job
        box = prompts.normalize_box(job.extra["box"], image.width, image.height, job.extra["normalized"])
        cells = prompts.box_to_cells(box)
        extra = {"box": [round(v, 6) for v in box], "box_px": list(to_pixels(box, image.width, image.height)),
                 "cells": list(cells)}
        return Job(job.image_index, "refer", prompts.refer_prompt(cells), extra)

    def _result(self, job: Job, name: str, image, decoded: str, decoded_prompt: str = "",
                patch_probs: Sequence[float | None] = ()) -> Result:
        if job.task == "ground":
            raw = self.processor.post_process_generation(decoded, cleanup_and_extract=False)
            return self._ground_result(job, name, image, raw, patch_probs)
        return self.answers.result(job, name, image, decoded, decoded_prompt, patch_probs)

    def _ground_result(self, job: Job, name: str, image, raw: str,
                       patch_probs: Sequence[float | None] = ()) -> Result:
        return self.answers.ground_result(job, name, image, raw, patch_probs)
