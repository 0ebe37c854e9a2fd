"""Detection datasets from `kosmos2 batch` records (DESIGN §10): COCO, YOLO and Label Studio predictions.

The categories are the entities' phrases, case and whitespace normalized, in first-seen order, or a fixed list
(`classes`): boxes of other phrases are then dropped and counted. Boxes are the records' `boxes_px`, pixels of
the picture as the user sees it (EXIF orientation applied), so every format's reader gives back those numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kosmos2_cli.datasets.records import Box, DatasetError, Picture, read_pictures

FORMATS = ("coco", "yolo", "labelstudio")


@dataclass
class ExportSummary:
    """What went into the dataset and what was left out, for the command's summary line."""

    output: str
    format: str
    images: int = 0
    boxes: int = 0
    categories: int = 0
    error_records: int = 0  # records of images that failed in the batch: skipped
    below_score: int = 0  # boxes under min_score (or with no score while a minimum is set)
    other_classes: int = 0  # boxes whose phrase is not in the class list
    copied: int = 0  # images copied (yolo with copy_images)
    names: list[str] = field(default_factory=list)
    config: str | None = None  # labelstudio: the labeling config written beside the tasks


def export(results: Path, fmt: str, output: Path, *, min_score: float | None = None,
           classes: Sequence[str] | None = None, copy_images: bool = False, url_prefix: str = "") -> ExportSummary:
    """Write `results` (a batch's JSON lines) as a `fmt` dataset at `output` (COCO and Label Studio: a JSON file;
    YOLO: a folder). `url_prefix` goes before each image path in Label Studio's tasks (e.g. its local-files
    URL)."""
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if copy_images and fmt != "yolo":
        raise DatasetError("copying the images applies to the yolo format (COCO and Label Studio name them by path)")
    read = read_pictures(results)
    summary = ExportSummary(str(output), fmt, error_records=read.errors)
    pictures, names = _select(read.pictures, min_score, classes, summary)
    summary.images, summary.boxes, summary.categories, summary.names = (
        len(pictures), sum(len(p.boxes) for p in pictures), len(names), names)
    if fmt == "coco":
        _write_json(output, coco(pictures, names))
    elif fmt == "labelstudio":
        _write_json(output, labelstudio(pictures, url_prefix))
        config = Path(output).with_suffix(".xml")
        config.write_text(labelstudio_config(names))
        summary.config = str(config)
    else:
        summary.copied = write_yolo(pictures, names, output, copy_images=copy_images)
    return summary


def _select(pictures: list[Picture], min_score: float | None, classes: Sequence[str] | None,
            summary: ExportSummary) -> tuple[list[Picture], list[str]]:
    """The pictures with only the boxes kept, and the category names (class list order, or first seen)."""
    fixed = list(classes) if classes is not None else None
    allowed = set(fixed) if fixed is not None else None
    seen: dict[str, None] = {}
    kept_pictures = []
    for picture in pictures:
        kept: list[Box] = []
        for box in picture.boxes:
            if min_score is not None and (box.score is None or box.score < min_score):
                summary.below_score += 1
            elif allowed is not None and box.category not in allowed:
                summary.other_classes += 1
            else:
                kept.append(box)
                seen.setdefault(box.category)
        kept_pictures.append(Picture(picture.image, picture.width, picture.height, kept))
    return kept_pictures, fixed if fixed is not None else list(seen)


def coco(pictures: list[Picture], names: list[str]) -> dict[str, Any]:
    """A COCO detection file: images by path, categories numbered from 1, bbox [x, y, w, h] in pixels, score."""
    ids = {name: number for number, name in enumerate(names, 1)}
    images, annotations = [], []
    for image_id, picture in enumerate(pictures, 1):
        images.append({"id": image_id, "file_name": picture.image, "width": picture.width,
                       "height": picture.height})
        for box in picture.boxes:
            x1, y1, x2, y2 = box.px
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[box.category],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                                "score": box.score})
    return {"info": {"description": "kosmos2 export", "version": "1.0"}, "images": images,
            "annotations": annotations, "categories": [{"id": i, "name": n, "supercategory": ""}
                                                       for n, i in ids.items()]}


def labelstudio(pictures: list[Picture], url_prefix: str = "") -> list[dict[str, Any]]:
    """Label Studio tasks with pre-annotations: `data.image` the picture's path, one prediction per task whose
    results are rectanglelabels in percent of the image, each with its score."""
    from kosmos2_cli import __version__

    tasks = []
    for picture in pictures:
        results = []
        for box in picture.boxes:
            x1, y1, x2, y2 = box.px
            results.append({
                "id": uuid.uuid4().hex[:10], "type": "rectanglelabels", "from_name": "label", "to_name": "image",
                "original_width": picture.width, "original_height": picture.height, "image_rotation": 0,
                "value": {"x": 100 * x1 / picture.width, "y": 100 * y1 / picture.height,
                          "width": 100 * (x2 - x1) / picture.width, "height": 100 * (y2 - y1) / picture.height,
                          "rotation": 0, "rectanglelabels": [box.category]},
                **({} if box.score is None else {"score": box.score}),
            })
        scores = [box.score for box in picture.boxes if box.score is not None]
        prediction: dict[str, Any] = {"model_version": f"kosmos2-cli {__version__}", "result": results}
        if scores:
            prediction["score"] = min(scores)
        tasks.append({"data": {"image": url_prefix + picture.image}, "predictions": [prediction]})
    return tasks


def labelstudio_config(names: Sequence[str]) -> str:
    """The labeling config these predictions fit (`from_name` label, `to_name` image)."""
    from xml.sax.saxutils import quoteattr

    labels = "\n".join(f"    <Label value={quoteattr(name)}/>" for name in names)
    return (f'<View>\n  <Image name="image" value="$image"/>\n  <RectangleLabels name="label" toName="image">\n'
            f"{labels}\n  </RectangleLabels>\n</View>\n")


def write_yolo(pictures: list[Picture], names: list[str], folder: Path, *, copy_images: bool = False) -> int:
    """A YOLO folder: labels/NAME.txt (class cx cy w h, normalized; empty for an image without boxes), data.yaml
    (class names) and, with `copy_images`, images/NAME.EXT beside labels/ so that it trains as is; without,
    images.txt lists the pictures' paths. Returns how many images were copied."""
    try:
        import yaml
    except ImportError as err:
        raise DatasetError("the yolo format needs PyYAML: pip install \"kosmos2-cli[datasets]\"") from err

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DatasetError(f"{folder}: exists and is not a folder (yolo writes a folder)")
    labels = folder / "labels"
    images = folder / "images"
    try:
        labels.mkdir(parents=True, exist_ok=True)
        if copy_images:
            images.mkdir(exist_ok=True)
    except OSError as err:
        raise DatasetError(f"{folder}: cannot create ({err.strerror or err})") from err
    ids = {name: number for number, name in enumerate(names)}
    stems = _unique_stems([picture.image for picture in pictures])
    copied = 0
    listed = []
    for picture, stem in zip(pictures, stems, strict=True):
        lines = []
        for box in picture.boxes:
            x1, y1, x2, y2 = box.px
            w, h = picture.width, picture.height
            lines.append(f"{ids[box.category]} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                         f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
        (labels / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
        if copy_images:
            source = Path(picture.image)
            try:
                shutil.copyfile(source, images / f"{stem}{source.suffix.lower()}")
            except OSError as err:
                raise DatasetError(f"{source}: cannot copy the image ({err.strerror or err})") from err
            copied += 1
        else:
            listed.append(os.path.abspath(picture.image))
    data: dict[str, Any] = {"path": str(folder.resolve()), "nc": len(names), "names": dict(enumerate(names))}
    if copy_images:
        data.update(train="images", val="images")
    else:
        (folder / "images.txt").write_text("".join(line + "\n" for line in listed))
    (folder / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return copied


def _unique_stems(paths: Sequence[str]) -> list[str]:
    """A file stem per image, unique in the folder (photo.jpg and other/photo.jpg: photo, photo_1)."""
    used: set[str] = set()
    out = []
    for path in paths:
        base = Path(path).stem or "image"
        stem, number = base, 0
        while stem.lower() in used:
            number += 1
            stem = f"{base}_{number}"
        used.add(stem.lower())
        out.append(stem)
    return out


def _write_json(path: Path, data: Any) -> None:
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path}: is a directory; give a file such as dataset.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(data, ensure_ascii=False, indent=1))
        os.replace(temp, path)
    except OSError as err:
        raise DatasetError(f"{path}: cannot write ({err.strerror or err})") from err
