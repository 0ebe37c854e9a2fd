"""Phrase grounding accuracy (DESIGN §10): the paper's measure on RefCOCO/RefCOCO+/RefCOCOg and Flickr30k Entities.

Each annotation line is `{"image": PATH, "phrase": str, "boxes": [[x1, y1, x2, y2], ...]}` (pixels of the picture
as seen; any listed box counts; optional `"split"`). The model is asked `ground` for the phrase; its prediction is
the first box it gives, correct when its IoU with one of the listed boxes is at least the threshold (0.5). An
image is encoded once for all its phrases, and the images go through the batch runner (prefetching, batching,
out-of-memory retries). Each item's outcome is one record of a JSON-lines file that resumes like `batch`'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kosmos2_cli.api.answers import Job
from kosmos2_cli.api.prompts import PromptError, ground_prompt
from kosmos2_cli.api.results import Failure, Result
from kosmos2_cli.api.tasks import TaskSpec, merge_ground
from kosmos2_cli.datasets.records import DatasetError, read_jsonl

IOU = 0.5
ALL = "all"


@dataclass(frozen=True)
class Item:
    """One annotation line: `index` is its place among the file's items (with image and phrase, its key)."""

    index: int
    image: str
    phrase: str
    boxes: tuple[tuple[float, float, float, float], ...]
    split: str | None = None


def read_annotations(path: Path) -> list[Item]:
    """The items of an annotation file; DatasetError naming the line for anything malformed."""
    items = []
    for number, line in read_jsonl(path):
        where = f"{path}: line {number}"
        image, phrase, boxes, split = line.get("image"), line.get("phrase"), line.get("boxes"), line.get("split")
        if not isinstance(image, str) or not image:
            raise DatasetError(f"{where}: needs \"image\": a path")
        if not isinstance(phrase, str) or not phrase.split():
            raise DatasetError(f"{where}: needs \"phrase\": the text to ground")
        if not isinstance(boxes, list) or not boxes:
            raise DatasetError(f"{where}: needs \"boxes\": [[x1, y1, x2, y2], ...] in pixels")
        checked = []
        for box in boxes:
            if (not isinstance(box, list) or len(box) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
                raise DatasetError(f"{where}: a box is four numbers [x1, y1, x2, y2] (got {json.dumps(box)})")
            if not (box[0] < box[2] and box[1] < box[3]):
                raise DatasetError(f"{where}: box {json.dumps(box)} needs x1 < x2 and y1 < y2")
            checked.append(tuple(float(v) for v in box))
        if split is not None and not isinstance(split, str):
            raise DatasetError(f"{where}: \"split\" is a name such as \"refcoco/val\"")
        items.append(Item(len(items), image, " ".join(phrase.split()), tuple(checked), split or None))
    if not items:
        raise DatasetError(f"{path}: no annotations (one JSON object a line: image, phrase, boxes)")
    return items


def iou(a: Iterable[float], b: Iterable[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    w = min(ax2, bx2) - max(ax1, bx1)
    h = min(ay2, by2) - max(ay1, by1)
    inter = max(w, 0.0) * max(h, 0.0)
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def item_key(record: Mapping[str, Any]) -> str | None:
    """What identifies an item's record in the predictions file: its index, image and phrase."""
    if not {"item", "image", "phrase"} <= record.keys():
        return None
    return json.dumps([record["item"], record["image"], record["phrase"]], ensure_ascii=False)


def key_of(item: Item) -> str:
    return json.dumps([item.index, item.image, item.phrase], ensure_ascii=False)


@dataclass(frozen=True)
class PhrasesByImage(TaskSpec):
    """`ground` with each image's own phrases: what the runner streams for eval (one encoding per image)."""

    by_image: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False, hash=False)

    def image_jobs(self, name: str) -> list[Job]:
        return [Job(0, "ground", ground_prompt(p), {"phrase": p}) for p in self.by_image[name]]

    def rows_per_image(self) -> int:
        counts = [len(p) for p in self.by_image.values()]
        return max(1, round(sum(counts) / len(counts))) if counts else 1

    def record(self, results) -> Result:
        merged = merge_ground(results)
        merged.extra = {**merged.extra, "phrases": list(self.by_image[merged.image])}
        return merged


def item_record(item: Item, result: Result | None, error: str | None = None) -> dict[str, Any]:
    """An item's outcome: the predicted box (pixels, as the model's normalized box times the picture's size) and
    its score, or null when the model did not place the phrase; or the image's error."""
    out: dict[str, Any] = {"item": item.index, "image": item.image, "phrase": item.phrase}
    if item.split:
        out["split"] = item.split
    if error is not None or result is None:
        out["error"] = error or "no result"
        return out
    entity = next((e for e in result.entities if e.phrase == item.phrase and e.boxes), None)
    if entity is None:
        out.update(box=None, score=None)
    else:
        x1, y1, x2, y2 = entity.boxes[0]
        w, h = result.width, result.height
        out.update(box=[x1 * w, y1 * h, x2 * w, y2 * h], score=_round(entity.scores[0] if entity.scores else None))
    out.update(width=result.width, height=result.height, raw=_raw_for(result, item.phrase))
    return out


def _round(score: float | None) -> float | None:
    return None if score is None else float(f"{score:.6g}")  # as records carry scores


def _raw_for(result: Result, phrase: str) -> str:
    phrases = result.extra.get("phrases") or []
    lines = result.raw.split("\n")
    return lines[phrases.index(phrase)] if phrase in phrases and len(lines) == len(phrases) else result.raw


def image_paths(items: Iterable[Item], images: Path | None) -> dict[Item, str]:
    """Where each item's picture is read from: its path under `images` when given and the path is relative."""
    out = {}
    for item in items:
        path = Path(item.image)
        out[item] = str(images / path) if images is not None and not path.is_absolute() else item.image
    return out


def run_items(items: list[Item], images: Path | None, engine, write: Callable[[dict[str, Any]], None], *,
              batch_size: int | None = None, workers: int | None = None,
              notice: Callable[[str], None] | None = None, advance: Callable[[int], None] | None = None) -> None:
    """Ground every item's phrase on its picture (one encoding per picture) and `write` each item's record as
    its picture is done."""
    from kosmos2_cli.runtime.runner import Runner

    where = image_paths(items, images)
    by_path: dict[str, list[Item]] = {}
    for item in items:
        by_path.setdefault(where[item], []).append(item)
    phrases = {path: tuple(dict.fromkeys(item.phrase for item in group)) for path, group in by_path.items()}
    for group in phrases.values():
        for phrase in group:
            try:
                ground_prompt(phrase)
            except PromptError as err:
                raise DatasetError(f"phrase {phrase!r}: {err}") from err
    spec = PhrasesByImage("ground", by_image=phrases)
    runner = Runner(engine, spec, batch_size, workers, notice=notice, keep_images=False)
    for outcome, _ in runner.run(list(by_path)):
        group = by_path[outcome.image]
        for item in group:
            if isinstance(outcome, Failure):
                write(item_record(item, None, outcome.error))
            else:
                write(item_record(item, outcome))
        if advance is not None:
            advance(len(group))


@dataclass
class Score:
    """Totals of one split (or all): items scored, placed, correct; IoU summed over the scored items."""

    n: int = 0
    found: int = 0
    correct: int = 0
    iou_sum: float = 0.0
    failed: int = 0  # items whose image could not be read: not scored
    missing: int = 0  # items with no record yet (an interrupted run)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def mean_iou(self) -> float:
        """Mean over all scored items, 0 for a phrase the model did not place."""
        return self.iou_sum / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "n": self.n, "found": self.found, "correct": self.correct,
                "mean_iou": self.mean_iou, "failed": self.failed, "missing": self.missing}


def score(items: list[Item], records: Mapping[str, Mapping[str, Any]], threshold: float = IOU) -> dict[str, Score]:
    """Scores by split (`ALL` first: every item), from each item's record (keyed by `key_of`)."""
    out: dict[str, Score] = {ALL: Score()}
    for item in items:
        totals = [out[ALL]]
        if item.split:
            totals.append(out.setdefault(item.split, Score()))
        record = records.get(key_of(item))
        for total in totals:
            if record is None:
                total.missing += 1
            elif "error" in record:
                total.failed += 1
            else:
                total.n += 1
                box = record.get("box")
                if box is not None:
                    best = max(iou(box, truth) for truth in item.boxes)
                    total.found += 1
                    total.iou_sum += best
                    total.correct += best >= threshold
    return out


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """The predictions file's records by item key (the last one of a key wins)."""
    out = {}
    for _, record in read_jsonl(path):
        key = item_key(record)
        if key is not None:
            out[key] = record
    return out
