"""From generated token ids to `Result`s: the text a person reads, entities with normalized and pixel boxes, and
each box's score (the probability the model gave its two location tokens)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kosmos2_cli.api import prompts
from kosmos2_cli.api.results import Entity, Result, to_pixels
from kosmos2_cli.processing.postprocess import box_patch_ordinals, patch_index_to_coordinate


@dataclass
class Job:
    """One prompt for one image; `image_index` says which picture of the batch it reads."""

    image_index: int
    task: str
    prompt: str
    extra: dict[str, Any]


def patch_probabilities(ids: Sequence[int], prompt_length: int, logprobs: Sequence[float] | None,
                        patch_ids: frozenset[int]) -> list[float | None]:
    """The probability of each location token of `ids`, in order: 1.0 for those of the prompt, exp(logprob) for
    generated ones (None when their log-probabilities are unknown)."""
    out: list[float | None] = []
    for at, token in enumerate(ids):
        if token in patch_ids:
            if at < prompt_length:
                out.append(1.0)
            else:
                out.append(None if logprobs is None else math.exp(logprobs[at - prompt_length]))
    return out


def _score(probs: Sequence[float | None], pair: tuple[int, int]) -> float | None:
    a, b = (probs[k] if k < len(probs) else None for k in pair)
    return None if a is None or b is None else a * b


class Answers:
    """Turns one job's decoded text into its Result (the processor's post-processing, as the reference's)."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def result(self, job: Job, name: str, image, decoded: str, decoded_prompt: str = "",
               patch_probs: Sequence[float | None] = ()) -> Result:
        """A caption, refer or ask job's Result (`ground_result` takes ground jobs). `patch_probs`: the location
        tokens' probabilities in the order their tags stand in `decoded`."""
        raw = self.processor.post_process_generation(decoded, cleanup_and_extract=False)
        text, found = self.processor.post_process_generation(decoded)
        width, height = image.size
        prefix = ""
        if job.task in ("ask", "refer"):
            prefix, _ = self.processor.post_process_generation(decoded_prompt or job.prompt)
        entities = []
        start = 0
        if prefix and text.startswith(prefix):
            start = len(text) - len(text[len(prefix):].lstrip())
        for (phrase, (a, b), boxes), pairs in zip(found, box_patch_ordinals(raw), strict=True):
            if a < start:
                continue  # a phrase of the prompt (refer's "It"), not of the answer
            entities.append(Entity(phrase, (a - start, b - start), [tuple(x) for x in boxes],
                                   [to_pixels(x, width, height) for x in boxes],
                                   [_score(patch_probs, pair) for pair in pairs]))
        return Result(name, width, height, job.task, job.prompt, text[start:], entities, raw, dict(job.extra))

    def ground_result(self, job: Job, name: str, image, raw: str,
                      patch_probs: Sequence[float | None] = ()) -> Result:
        """A ground job's Result: the phrase's box is the first `<object>` right after it, or none."""
        phrase = job.extra["phrase"]
        head, _, after = raw.partition("</phrase>")  # what the model wrote after the phrase
        # Placed means an <object> right after the phrase; text first means the model went on to something else.
        placed = re.match(r"\s*<object>(.*?)</object>", after)
        cells = re.findall(r"<patch_index_(\d+)><patch_index_(\d+)>", placed.group(1)) if placed else []
        boxes = [patch_index_to_coordinate(int(a), int(b), prompts.GRID) for a, b in cells]
        first = len(re.findall(r"<patch_index_\d+>", head))  # location tags before the answer's (none)
        scores = [_score(patch_probs, (first + 2 * i, first + 2 * i + 1)) for i in range(len(boxes))]
        width, height = image.size
        entities = [Entity(phrase, (0, len(phrase)), boxes, [to_pixels(b, width, height) for b in boxes],
                           scores)] if boxes else []
        return Result(name, width, height, "ground", job.prompt, phrase, entities, raw,
                      {**job.extra, "found": bool(boxes)})
