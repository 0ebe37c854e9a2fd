"""Phrase-grounding accuracy (DESIGN §10) for `kosmos2 train --eval`, before and after training.

A small in-process scorer on the public API (`Kosmos2.ground` and `kosmos2 eval`'s IoU) for the model being
trained, which has no folder yet for `kosmos2 eval`'s runner to load. Each line is
`{"image", "phrase", "boxes": [[x1, y1, x2, y2], ...]}` in pixels of the picture as seen; the prediction is
the first box the model gives for the phrase, correct when its IoU with any listed box is at least 0.5.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kosmos2_cli.datasets.evaluate import iou
from kosmos2_cli.train.data import DataError, resolve_image

IOU = 0.5


@dataclass(frozen=True)
class Item:
    image: str
    phrase: str
    boxes: tuple[tuple[float, float, float, float], ...]


@dataclass
class Score:
    accuracy: float  # share of items whose first box has IoU >= the threshold with one of theirs
    n: int
    found: int  # items for which the model gave a box
    mean_iou: float  # over all items (0 where none was given)


def read_annotations(path: Path, images_dir: Path | None = None) -> list[Item]:
    """The annotation lines; DataError naming the first bad one."""
    items = []
    base = images_dir if images_dir is not None else path.parent
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the annotations ({err})") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, phrase, boxes = record["image"], record["phrase"], record["boxes"]
            boxes = tuple(tuple(float(v) for v in box) for box in boxes)
            if not (isinstance(image, str) and isinstance(phrase, str) and phrase.strip() and boxes
                    and all(len(b) == 4 for b in boxes)):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise DataError(f'{path}:{number}: not {{"image": PATH, "phrase": TEXT, "boxes": [[x1, y1, x2, y2], '
                            "...]}") from None
        items.append(Item(str(resolve_image(image, base)), phrase, boxes))  # type: ignore[arg-type]
    if not items:
        raise DataError(f"{path}: no annotations in the file")
    return items


def evaluate(model, processor, items: Sequence[Item], threshold: float = IOU) -> Score:
    """Ground every item's phrase (one image encoding per picture) and score the first box of each."""
    import torch

    from kosmos2_cli.api.pipeline import Kosmos2

    kosmos = Kosmos2(model, processor)
    by_image: dict[str, list[Item]] = {}
    for item in items:
        by_image.setdefault(item.image, []).append(item)
    correct = found = 0
    total_iou = 0.0
    with torch.no_grad():
        for image, group in by_image.items():
            results = kosmos.ground(image, [item.phrase for item in group])
            results = results if isinstance(results, list) else [results]
            for item, result in zip(group, results, strict=True):
                if not result.entities:
                    continue
                found += 1
                x1, y1, x2, y2 = result.entities[0].boxes[0]
                box = (x1 * result.width, y1 * result.height, x2 * result.width, y2 * result.height)
                best = max(iou(box, truth) for truth in item.boxes)
                total_iou += best
                correct += best >= threshold
    n = len(items)
    return Score(correct / n, n, found, total_iou / n)
