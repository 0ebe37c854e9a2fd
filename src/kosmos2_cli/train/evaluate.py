"""Phrase-grounding accuracy (DESIGN §10) for `kosmos2 train --eval`, before and after training.

The model being trained has no folder yet for `kosmos2 eval`'s runner to load, so this asks it in process
(`Kosmos2.ground`, one image encoding per picture) and scores the answers exactly as `kosmos2 eval` does: the
same annotation reader, the same per-item record and the same `score`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from kosmos2_cli.datasets.evaluate import ALL, Item, item_record, key_of, score
from kosmos2_cli.datasets.evaluate import read_annotations as read_items
from kosmos2_cli.datasets.records import DatasetError
from kosmos2_cli.train.data import DataError, resolve_image


def read_annotations(path: Path, images_dir: Path | None = None) -> list[Item]:
    """`kosmos2 eval`'s annotation lines, each image found as the training data's are; DataError naming the first
    bad line."""
    try:
        items = read_items(Path(path))
    except DatasetError as err:
        raise DataError(str(err)) from err
    base = images_dir if images_dir is not None else Path(path).parent
    return [replace(item, image=str(resolve_image(item.image, base))) for item in items]


def evaluate(model, processor, items: Sequence[Item]) -> dict[str, Any]:
    """Ground every item's phrase and score it as `kosmos2 eval` does: accuracy, n, found, mean IoU, ..."""
    import torch

    from kosmos2_cli.api.pipeline import Kosmos2

    kosmos = Kosmos2(model, processor)
    by_image: dict[str, list[Item]] = {}
    for item in items:
        by_image.setdefault(item.image, []).append(item)
    records = {}
    with torch.no_grad():
        for image, group in by_image.items():
            phrases = list(dict.fromkeys(item.phrase for item in group))
            results = kosmos.ground(image, phrases)
            answers = dict(zip(phrases, results if isinstance(results, list) else [results], strict=True))
            for item in group:
                records[key_of(item)] = item_record(item, answers[item.phrase])
    return score(list(items), records)[ALL].to_dict()
