"""Training data: JSON lines of grounded answers -> the token sequences the model reads and the labels it learns.

A line is either a record as `kosmos2 batch` writes it (`image`, `task` and its arguments, `raw`: the prompt and
the answer with their tags), or the simple form `{"image", "text", "entities": [{"phrase", "span",
"boxes_px"}]}`: a caption as `kosmos2 caption` prints it (with or without its "An image of"), whose phrases and
pixel boxes become `<phrase>`/`<object>` tags and patch-index tokens as the processor makes them.

Each answer becomes the prompt's ids exactly as the pipeline builds them at inference (`<s><image>`, the image
slots, `</image>`, the prompt), then the answer's ids as the model writes them, then `</s>`. The loss covers the
answer and `</s>` only: the image slots, the prompt (given at inference, never generated) and padding are -100.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kosmos2_cli.api import prompts
from kosmos2_cli.processing.images import ImageLoadError, load_image
from kosmos2_cli.processing.postprocess import coordinate_to_patch_index
from kosmos2_cli.runtime.textfiles import iter_lines

IGNORE = -100
_TAG = re.compile(r"<[^<>]*>")
_PATCH = re.compile(r"<patch_index_(\d{4})>")
_OBJECT = re.compile(r"<object>((?:<patch_index_\d{4}><patch_index_\d{4}>(?:</delimiter_of_multi_objects/>)?)+)"
                     r"</object>")
_KNOWN_TAGS = {"<phrase>", "</phrase>", "<object>", "</object>", "</delimiter_of_multi_objects/>"}


class DataError(ValueError):
    """A training line that cannot be used; the message names the file and line and says why."""


@dataclass(frozen=True)
class Example:
    """One answer to learn: its image (the path as resolved), the prompt and the answer (tags included)."""

    line: int
    image: str
    prompt: str
    answer: str

    @property
    def raw(self) -> str:
        return self.prompt + self.answer


@dataclass
class Encoded:
    """An example's ids (prompt + answer + `</s>`), labels (-100 but on the answer and `</s>`), image slots."""

    input_ids: list[int]
    labels: list[int]
    image_mask: list[int]


def read_examples(path: Path, images_dir: Path | None = None) -> tuple[list[Example], int]:
    """Every example of the JSON-lines file (a ground record gives one per phrase) and how many error records
    (`{"image", "error"}`, as a batch writes for images that failed) were skipped. Raises DataError naming the
    first bad line: not JSON, no image, a missing image file, a box outside its image, an answer that does not
    follow its prompt, malformed tags."""
    path = Path(path)
    text = "".join(iter_lines(path, "the training data", DataError))
    examples: list[Example] = []
    skipped = 0
    sizes: dict[str, tuple[int, int]] = {}
    base = images_dir if images_dir is not None else path.parent
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            raise DataError(f"{where}: not a JSON object ({err.args[0] if err.args else err})") from err
        if not isinstance(record, dict):
            raise DataError(f"{where}: not a JSON object")
        if "error" in record:
            skipped += 1
            continue
        try:
            examples += _examples(record, number, base, sizes)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
    if not examples:
        raise DataError(f"{path}: no training examples in the file")
    return examples, skipped


def resolve_image(name: str, base: Path) -> Path:
    """An image named by a line: absolute as is; relative to `base` (the data file's folder or the given images
    folder) when it is there, else to the working directory."""
    given = Path(name).expanduser()
    if given.is_absolute():
        return given
    beside = base / given
    return beside if beside.exists() or not given.exists() else given


def _examples(record: dict[str, Any], number: int, base: Path, sizes: dict) -> list[Example]:
    name = record.get("image")
    if not isinstance(name, str) or not name:
        raise DataError('no "image" (the path of the picture)')
    image = str(resolve_image(name, base))
    size = sizes.get(image) or sizes.setdefault(image, _size(image, name))
    if "raw" in record or "task" in record:
        pairs = _record_answers(record)
    elif "text" in record:
        pairs = [_simple_answer(record, size)]
    else:
        raise DataError('neither a record ("task", "raw") nor a caption ("text", "entities")')
    for _, answer in pairs:
        _check_answer(answer)
    return [Example(number, image, prompt, answer) for prompt, answer in pairs]


def _size(image: str, name: str) -> tuple[int, int]:
    try:
        with load_image(image) as picture:
            return picture.size
    except ImageLoadError as err:
        message = str(err)
        if message.startswith(image):
            message = name + message[len(image):]
        raise DataError(message) from err


def _record_answers(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a batch/export record: its `raw` after its prompt (ground: one per line)."""
    task = record.get("task")
    raw = record.get("raw")
    if task not in prompts.TASKS:
        raise DataError(f'"task" must be one of {", ".join(prompts.TASKS)} (got {task!r})')
    if not isinstance(raw, str):
        raise DataError('no "raw" (the answer with its tags, as the model writes it)')
    given = record.get("prompt")
    try:
        if isinstance(given, str) and given:
            wanted = given.split("\n") if task == "ground" else [given]
        elif task == "caption":
            wanted = [prompts.caption_prompt(bool(record.get("detailed", False)))]
        elif task == "ask":
            wanted = [prompts.ask_prompt(str(record.get("question") or ""))]
        elif task == "ground":
            wanted = [prompts.ground_prompt(str(p)) for p in record.get("phrases") or []]
        elif isinstance(record.get("cells"), list) and len(record["cells"]) == 2:
            wanted = [prompts.refer_prompt(tuple(int(c) for c in record["cells"]))]
        else:
            raise DataError('a refer record needs its "prompt" or "cells"')
    except (prompts.PromptError, TypeError, ValueError) as err:
        raise DataError(f"cannot rebuild the {task} prompt ({err})") from err
    raws = raw.split("\n") if task == "ground" else [raw]
    if len(raws) != len(wanted) or not wanted:
        raise DataError(f'"raw" has {len(raws)} line(s) for {len(wanted)} prompt(s)')
    pairs = []
    for prompt, text in zip(wanted, raws, strict=True):
        if not text.startswith(prompt):
            raise DataError(f'"raw" does not start with the prompt {prompt!r}: there is no answer to learn')
        pairs.append((prompt, text[len(prompt):]))
    return pairs


def _simple_answer(record: dict[str, Any], size: tuple[int, int]) -> tuple[str, str]:
    """A caption and its entities as the prompt and the answer with tags. The text may start with the prompt's
    words ("An image of"); otherwise it is what follows them."""
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError('"text" is empty: there is no answer to learn')
    detailed = bool(record.get("detailed", False))
    prompt = prompts.caption_prompt(detailed)
    words = prompt.removeprefix("<grounding>").strip()
    entities = record.get("entities") or []
    if not isinstance(entities, list):
        raise DataError('"entities" must be a list of {"phrase", "span", "boxes_px"}')
    width, height = size
    cuts: list[tuple[int, int, str]] = []
    for k, entity in enumerate(entities, 1):
        if not isinstance(entity, dict):
            raise DataError(f"entity {k} is not an object")
        span, phrase, boxes = entity.get("span"), entity.get("phrase"), entity.get("boxes_px")
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)
                and 0 <= span[0] < span[1] <= len(text)):
            raise DataError(f"entity {k}: span {span!r} is not [start, end] inside the text")
        if isinstance(phrase, str) and text[span[0]:span[1]] != phrase:
            raise DataError(f"entity {k}: the text at span {span} is {text[span[0]:span[1]]!r}, not the phrase "
                            f"{phrase!r}")
        if not isinstance(boxes, list) or not boxes:
            raise DataError(f'entity {k}: "boxes_px" must be a list of [x1, y1, x2, y2]')
        cells = [_cells(box, width, height, f"entity {k}") for box in boxes]
        pairs = "</delimiter_of_multi_objects/>".join(f"{prompts.patch_token(a)}{prompts.patch_token(b)}"
                                                     for a, b in cells)
        cuts.append((span[0], span[1], f"<object>{pairs}</object>"))
    cuts.sort()
    for (_, end, _), (start, _, _) in zip(cuts, cuts[1:], strict=False):
        if start < end:
            raise DataError("entities overlap in the text")
    out, done = [], 0
    for start, end, objects in cuts:
        before = text[done:start]
        lead = len(before) - len(before.rstrip())  # the space before a phrase goes inside its tag
        out += [before[:len(before) - lead], "<phrase>", before[len(before) - lead:], text[start:end], "</phrase>",
                objects]
        done = end
    out.append(text[done:])
    tagged = "".join(out)
    if tagged.startswith(words):
        answer = tagged[len(words):]
    else:
        answer = " " + tagged.lstrip()
    return prompt, answer


def _cells(box: Any, width: int, height: int, what: str) -> tuple[int, int]:
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
            and all(math.isfinite(v) for v in box)):
        raise DataError(f"{what}: a box must be four numbers [x1, y1, x2, y2] in pixels, got {box!r}")
    x1, y1, x2, y2 = box
    if not (x1 < x2 and y1 < y2):
        raise DataError(f"{what}: box {box} needs x1 < x2 and y1 < y2")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise DataError(f"{what}: box {box} is outside the {width}x{height} image")
    return coordinate_to_patch_index((x1 / width, y1 / height, x2 / width, y2 / height), prompts.GRID)


def _check_answer(answer: str) -> None:
    """The answer's tags are Kosmos-2's, each phrase followed by its boxes' `<object>` (or none)."""
    for tag in _TAG.findall(answer):
        patch = _PATCH.fullmatch(tag)
        if tag not in _KNOWN_TAGS and not (patch and int(patch.group(1)) < prompts.GRID * prompts.GRID):
            raise DataError(f"unknown tag {tag} in the answer")
    rest = _OBJECT.sub("", answer)
    if any(tag in rest for tag in ("<object>", "</object>", "<patch_index_", "</delimiter_of_multi_objects/>")):
        raise DataError("malformed <object>: it must hold pairs of <patch_index_NNNN> tokens")
    if len(re.findall("<phrase>", rest)) != len(re.findall("</phrase>", rest)) or re.search(
            r"<phrase>[^<]*<phrase>|</phrase>[^<]*</phrase>", rest):
        raise DataError("malformed <phrase>...</phrase> pairs in the answer")


# --- encoding and batches ------------------------------------------------------------------------------------


def encode(processor, example: Example) -> Encoded:
    """The example's ids, labels and image-slot mask (see the module's docstring)."""
    # The pipeline's own call for a prompt whose image is encoded apart (the slots do not depend on the picture).
    inputs = processor(text=[example.prompt], images=[example.image], pixels=False)
    prompt_ids = list(inputs["input_ids"][0])
    mask = list(inputs["image_embeds_position_mask"][0])
    tokenizer = processor.tokenizer
    answer = tokenizer.encode_continuation(example.answer) + [tokenizer.eos_token_id]
    return Encoded(prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer, mask + [0] * len(answer))


def collate(encoded: Sequence[Encoded], pixel_values: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: padding is masked out of attention and of the loss."""
    length = max(len(e.input_ids) for e in encoded)

    def pad(rows, fill):
        return torch.tensor([row + [fill] * (length - len(row)) for row in rows], dtype=torch.long)

    return {
        "input_ids": pad([e.input_ids for e in encoded], pad_id),
        "attention_mask": pad([[1] * len(e.input_ids) for e in encoded], 0),
        "image_embeds_position_mask": pad([e.image_mask for e in encoded], 0),
        "labels": pad([e.labels for e in encoded], IGNORE),
        "pixel_values": pixel_values,
    }


def label_count(labels: torch.Tensor) -> int:
    """Tokens the loss counts: labels after the shift that are not -100 (what `num_items_in_batch` wants)."""
    return int((labels[:, 1:] != IGNORE).sum())


def data_order(count: int, epochs: int, seed: int) -> list[int]:
    """The examples in training order: every epoch a fresh permutation, drawn from `seed` and the epoch alone
    (so a resumed run can rebuild it, and the state file keeps it anyway)."""
    order: list[int] = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order += torch.randperm(count, generator=generator).tolist()
    return order


def file_digest(path: Path) -> str:
    """A short digest of the data file, so a resumed run knows it reads the same data."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


__all__ = ["DataError", "Encoded", "Example", "collate", "data_order", "encode", "file_digest", "label_count",
           "read_examples", "resolve_image"]
