"""Converters from the public grounding benchmarks' annotation files into `kosmos2 eval`'s JSON lines.

- RefCOCO, RefCOCO+, RefCOCOg: the refs (one per referred object: `image_id`, `ann_id`, `split`, `sentences`)
  and COCO's `instances.json` (images with file names, annotations with `bbox` [x, y, w, h]). The refs are
  distributed as a Python pickle (`refs(unc).p`, `refs(umd).p`...), which is never unpickled here: give them in
  their JSON form (a JSON array of refs, an object with a "refs" array, or one ref a line), as the widely used
  conversions of those files are. One item per sentence, the box of its ref's annotation.
- Flickr30k Entities: `Annotations/ID.xml` (the boxes of each entity id, VOC style) and `Sentences/ID.txt`
  (sentences with `[/EN#ID/type phrase words]` marks). One item per marked phrase whose entity has boxes (scene
  and non-visual entities have none); every box of the entity counts.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kosmos2_cli.datasets.records import DatasetError
from kosmos2_cli.runtime.textfiles import iter_lines, listed

DATASETS = ("refcoco", "refcoco+", "refcocog")


def _load_json(path: Path, what: str) -> Any:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the {what} ({err.strerror or err})") from err
    text = data.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if Path(path).suffix.lower() in (".p", ".pkl", ".pickle") or text[:1] not in ("[", "{"):
        raise DatasetError(f"{path}: the {what} must be JSON (a pickle such as refs(unc).p is never loaded: "
                           "convert it to JSON first)")
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:  # one object a line
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as err:
        raise DatasetError(f"{path}: the {what} are not valid JSON ({err})") from err


def refcoco_items(refs_path: Path, instances_path: Path, *, dataset: str = "refcoco",
                  splits: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """eval's items from RefCOCO-style refs (JSON) and COCO instances: one per sentence, `split` "DATASET/SPLIT"."""
    refs = _load_json(refs_path, "refs")
    if isinstance(refs, dict):
        refs = refs.get("refs")
    if not isinstance(refs, list):
        raise DatasetError(f"{refs_path}: refs are a JSON array of objects with image_id, ann_id, split, sentences")
    instances = _load_json(instances_path, "instances")
    if not isinstance(instances, dict) or "images" not in instances or "annotations" not in instances:
        raise DatasetError(f"{instances_path}: not a COCO instances file (images, annotations)")
    try:
        images = {image["id"]: image for image in instances["images"]}
        boxes = {ann["id"]: ann["bbox"] for ann in instances["annotations"]}
    except (KeyError, TypeError) as err:
        raise DatasetError(f"{instances_path}: images need id and file_name, annotations id and bbox") from err
    wanted = set(splits)
    for number, ref in enumerate(refs, 1):
        try:
            split, image_id, ann_id, sentences = ref["split"], ref["image_id"], ref["ann_id"], ref["sentences"]
        except (KeyError, TypeError) as err:
            raise DatasetError(f"{refs_path}: ref {number} needs image_id, ann_id, split and sentences") from err
        if wanted and split not in wanted:
            continue
        if image_id not in images or ann_id not in boxes:
            raise DatasetError(f"{refs_path}: ref {number} names image {image_id} / annotation {ann_id}, which "
                               f"{instances_path} does not have (the instances of the same COCO release?)")
        x, y, w, h = (float(v) for v in boxes[ann_id])
        for sentence in sentences:
            text = sentence.get("sent") or sentence.get("raw") if isinstance(sentence, dict) else None
            if not text or not str(text).split():
                continue
            yield {"image": images[image_id]["file_name"], "phrase": " ".join(str(text).split()),
                   "boxes": [[x, y, x + w, y + h]], "split": f"{dataset}/{split}", "ref_id": ref.get("ref_id"),
                   "sent_id": sentence.get("sent_id")}


_ENTITY = re.compile(r"\[/EN#(\d+)((?:/[^\s\]]+)*)\s+([^\]]*)\]")


def flickr_phrases(sentence: str) -> list[tuple[str, str, list[str]]]:
    """(entity id, phrase, types) for each `[/EN#ID/type words]` mark of a Flickr30k Entities sentence."""
    return [(m.group(1), " ".join(m.group(3).split()), [t for t in m.group(2).split("/") if t])
            for m in _ENTITY.finditer(sentence)]


def _caption(sentence: str) -> str:
    """The sentence without its marks ("[/EN#1/people Two guys] sit ." -> "Two guys sit .")."""
    return " ".join(_ENTITY.sub(lambda m: m.group(3), sentence).split())


def flickr_boxes(xml_path: Path) -> tuple[str, dict[str, list[list[float]]]]:
    """(image file name, boxes by entity id) from one Annotations/ID.xml."""
    try:
        root = ElementTree.parse(xml_path).getroot()
    except (OSError, ElementTree.ParseError) as err:
        raise DatasetError(f"{xml_path}: not a Flickr30k Entities annotation ({err})") from err
    filename = (root.findtext("filename") or f"{Path(xml_path).stem}.jpg").strip()
    boxes: dict[str, list[list[float]]] = {}
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue  # nobndbox / scene
        try:
            coords = [float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError) as err:
            raise DatasetError(f"{xml_path}: a bndbox needs xmin, ymin, xmax, ymax") from err
        for name in obj.findall("name"):
            boxes.setdefault((name.text or "").strip(), []).append(coords)
    return filename, boxes


def flickr30k_items(root: Path, *, ids: Iterable[str] | None = None, split: str = "flickr30k"
                    ) -> Iterator[dict[str, Any]]:
    """eval's items from a Flickr30k Entities folder (Annotations/, Sentences/), for `ids` (default: every
    annotation file), in id order."""
    root = Path(root)
    annotations, sentences = root / "Annotations", root / "Sentences"
    for folder in (annotations, sentences):
        if not folder.is_dir():
            raise DatasetError(f"{root}: no {folder.name}/ folder (a Flickr30k Entities folder has Annotations/ "
                               "and Sentences/)")
    names = sorted(ids) if ids is not None else sorted(p.stem for p in annotations.glob("*.xml"))
    for name in names:
        xml, txt = annotations / f"{name}.xml", sentences / f"{name}.txt"
        if not xml.is_file() or not txt.is_file():
            raise DatasetError(f"{root}: image {name} has no {'Annotations' if not xml.is_file() else 'Sentences'}"
                               f"/{name}.{'xml' if not xml.is_file() else 'txt'}")
        filename, boxes = flickr_boxes(xml)
        lines = [line.rstrip("\n") for line in iter_lines(txt, "a Sentences file", DatasetError)]
        for number, sentence in enumerate(lines):
            for entity, phrase, types in flickr_phrases(sentence):
                if entity == "0" or "notvisual" in types or not boxes.get(entity) or not phrase:
                    continue
                yield {"image": filename, "phrase": phrase, "boxes": boxes[entity], "split": split,
                       "entity": entity, "sentence": number, "caption": _caption(sentence),
                       "type": types[0] if types else None}


def read_ids(path: Path) -> list[str]:
    """Image ids, one a line (Flickr30k Entities' train.txt, val.txt, test.txt)."""
    return list(listed(path, "the id list", DatasetError))


def write_items(items: Iterable[dict[str, Any]], output: Path) -> int:
    """Write eval's JSON lines (atomically; nothing when there are none); the number of items."""
    import os

    output = Path(output)
    if output.is_dir():
        raise DatasetError(f"{output}: is a directory; give a file such as refcoco_val.jsonl")
    count = 0
    temp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "w", encoding="utf-8") as handle:
            for item in items:
                handle.write(json.dumps(item, ensure_ascii=False) + "\n")
                count += 1
        if count:  # nothing matched: leave no empty file behind
            os.replace(temp, output)
    except OSError as err:
        raise DatasetError(f"{output}: cannot write ({err.strerror or err})") from err
    finally:
        if temp.exists():
            temp.unlink()
    return count
