"""Reading `kosmos2 batch` records back for export: one line at a time, bad lines named by their number.

Records are DESIGN §5's: image, width, height, task, entities with boxes, scores and boxes_px; error records
(`{"image": ..., "error": ...}`) are counted, not used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kosmos2_cli.runtime.textfiles import iter_lines, listed


class DatasetError(ValueError):
    """An input file that cannot be used (missing, not JSON lines, not kosmos2 records), in one line."""


def normalize_phrase(phrase: str) -> str:
    """A category name from a phrase: lower case, whitespace collapsed ("A  Red Car " -> "a red car")."""
    return " ".join(str(phrase).split()).lower()


@dataclass
class Box:
    """One box of one record: pixels of the upright picture (x1, y1, x2, y2), its category and its score."""

    category: str
    px: tuple[int, int, int, int]
    score: float | None


@dataclass
class Picture:
    """One image of the records: its path as the records name it, its size as seen, its boxes."""

    image: str
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)


@dataclass
class Pictures:
    """The images of a results file in first-seen order (records of one image, e.g. two tasks, merged), and
    what was left out."""

    pictures: list[Picture] = field(default_factory=list)
    errors: int = 0  # error records
    records: int = 0  # records read, error records included


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; DatasetError for a line that is not a JSON object."""
    for number, line in enumerate(iter_lines(path, "a JSON-lines file", DatasetError), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if not line.endswith("\n"):
                return  # a partial last line left by an interrupted run
            raise DatasetError(f"{path}: line {number} is not a JSON object")
        yield number, record


def read_pictures(path: Path) -> Pictures:
    """Every image of a `kosmos2 batch` (or `--json`) results file with its boxes."""
    out = Pictures()
    by_image: dict[str, Picture] = {}
    for number, record in read_jsonl(path):
        out.records += 1
        if "error" in record:
            out.errors += 1
            continue
        try:
            image, width, height = str(record["image"]), int(record["width"]), int(record["height"])
            entities = record.get("entities") or []
            boxes = [_boxes(entity) for entity in entities]
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{path}: line {number} is not a kosmos2 record (image, width, height, entities "
                               "with boxes_px)") from err
        picture = by_image.get(image)
        if picture is None:
            picture = by_image[image] = Picture(image, width, height)
            out.pictures.append(picture)
        for entity_boxes in boxes:
            picture.boxes.extend(entity_boxes)
    return out


def _boxes(entity: dict[str, Any]) -> list[Box]:
    category = normalize_phrase(entity["phrase"])
    pixels = entity["boxes_px"]
    scores = entity.get("scores") or [None] * len(pixels)
    out = []
    for px, score in zip(pixels, scores, strict=True):
        x1, y1, x2, y2 = (int(v) for v in px)
        out.append(Box(category, (x1, y1, x2, y2), None if score is None else float(score)))
    return out


def read_classes(path: Path) -> list[str]:
    """Class names, one a line (blank lines and lines starting with # skipped), normalized, first kept."""
    names = [normalize_phrase(line) for line in listed(path, "the class list", DatasetError)]
    names = list(dict.fromkeys(names))
    if not names:
        raise DatasetError(f"{path}: no class names (one a line)")
    return names
