"""`kosmos2 export` end to end on the trained tiny checkpoint: `batch --task ground --phrases-file` labels real
pictures (one image encoding each, the lessons' boxes), then each format is read back by its own tooling.

- COCO: pycocotools loads the file (`COCO`, `getAnnIds`, `loadAnns`) and its results form (`loadRes`), and gives
  the records' pixel boxes, categories and scores;
- YOLO (`--copy-images`): supervision's `DetectionDataset.from_yolo` reads the folder back to the same boxes;
- Label Studio: the tasks validate against a JSON schema of its pre-annotation format (written from its docs,
  "Import pre-annotated data" and the RectangleLabels results), and the percent boxes give the pixels back;
- `--min-score`, `--classes`, error records and bad input.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from cli_helpers import invoke, json_lines, not_an_image, quick  # noqa: F401  (fixture)
from PIL import Image

from kosmos2_cli.api.results import to_pixels

trained = pytest.importorskip("trained")
pytestmark = pytest.mark.usefixtures("quick")

IMAGES = ("snowman.png", "man_ball.png", "two_dogs.jpg")
PHRASES = ["a snowman", "a fire", "a glove", "two dogs", "A  Snowman"]  # the last: the first's category
PHRASES_FILE = "a snowman\na fire\n# a comment, and a blank line\n\na glove\ntwo dogs\nA  Snowman\n"


def lesson_boxes(image: str, phrase: str) -> list[list[int]] | None:
    """The pixel boxes the trained model gives `phrase` on `image` (a ground lesson), [] when it places none,
    None when no lesson says."""
    for lesson in trained.LESSONS:
        if lesson.task == "ground" and lesson.image == image and lesson.phrase == phrase:
            first = lesson.target.split("</object>")[0]
            cells = [int(v) for v in re.findall(r"patch_index_(\d+)", first)]
            with Image.open(lesson.path) as picture:
                size = picture.size
            return [list(to_pixels(trained.cell_box(a, b), *size)) for a, b in
                    zip(cells[0::2], cells[1::2], strict=True)]
    return None


@pytest.fixture(scope="module")
def labelled(trained_dir, tmp_path_factory):
    """A folder with three pictures and a broken one, labelled by `kosmos2 batch --task ground --phrases-file`;
    (folder, records, number of images the model encoded)."""
    from kosmos2_cli.api.pipeline import Kosmos2

    folder = tmp_path_factory.mktemp("labelled")
    (folder / "photos").mkdir()
    for name in IMAGES:
        shutil.copy(trained.IMAGES / name, folder / "photos" / name)
    not_an_image(folder / "photos" / "broken.jpg")
    (folder / "classes.txt").write_text(PHRASES_FILE)
    encoded = []
    original = Kosmos2.encode_pixels
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setattr(Kosmos2, "encode_pixels", lambda self, pixels: encoded.append(len(pixels)) or original(
            self, pixels))
        result = invoke(["batch", "photos", "--task", "ground", "--phrases-file", "classes.txt", "-o",
                         "labels.jsonl", "--model", trained_dir, "--max-new-tokens", trained.MAX_NEW_TOKENS])
    assert result.exit_code == 1, result.stderr  # the broken picture
    return folder, json_lines((folder / "labels.jsonl").read_text()), sum(encoded)


def _export(folder, *args):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        return invoke(["export", "labels.jsonl", *args])


def _good(records):
    return [r for r in records if "error" not in r]


def _boxes(record):
    """(category, pixel box, score) of a record, categories normalized."""
    return [(" ".join(e["phrase"].split()).lower(), box, score) for e in record["entities"]
            for box, score in zip(e["boxes_px"], e["scores"], strict=True)]


def test_phrases_file_grounds_every_phrase_with_one_encoding_per_image(labelled):
    folder, records, encoded = labelled
    good = _good(records)
    assert encoded == len(IMAGES)  # five phrases each, one image encoding each
    assert len(good) == len(IMAGES) and len(records) == len(IMAGES) + 1
    for record in good:
        assert record["phrases"] == [" ".join(p.split()) for p in PHRASES]  # whitespace collapsed
        name = record["image"].split("/")[-1]
        for phrase in PHRASES:
            want = lesson_boxes(name, phrase)
            if want is None:
                continue
            got = [box for e in record["entities"] if e["phrase"] == phrase for box in e["boxes_px"]]
            assert got == want, (name, phrase)
            assert record["found"][phrase] == bool(want)


def test_coco_reads_back_with_pycocotools(labelled):
    from pycocotools.coco import COCO

    folder, records, _ = labelled
    result = _export(folder, "--format", "coco", "-o", "out/dataset.json")
    assert result.exit_code == 0, result.stderr
    assert "skipped 1 error record(s)" in result.stderr
    coco = COCO(str(folder / "out" / "dataset.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert sorted(names) == list(range(1, len(names) + 1))
    # categories: the phrases lower-cased and whitespace-collapsed, first seen first ("A  Snowman" is "a snowman")
    assert list(names.values()) == list(dict.fromkeys(c for r in _good(records) for c, _, _ in _boxes(r)))
    assert "a snowman" in names.values() and not any(n != n.lower() for n in names.values())
    by_file = {img["file_name"]: img for img in coco.loadImgs(coco.getImgIds())}
    for record in _good(records):
        image = by_file[record["image"]]
        assert (image["width"], image["height"]) == (record["width"], record["height"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        got = [(names[a["category_id"]], [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                           a["bbox"][1] + a["bbox"][3]], a["score"]) for a in anns]
        assert got == _boxes(record)
    # the same annotations as detection results (what COCOeval scores)
    detections = coco.loadRes(json.loads((folder / "out" / "dataset.json").read_text())["annotations"])
    assert len(detections.getAnnIds()) == sum(len(_boxes(r)) for r in _good(records))


def test_yolo_folder_reads_back_with_supervision(labelled):
    import supervision as sv
    import yaml

    folder, records, _ = labelled
    result = _export(folder, "--format", "yolo", "-o", "yolo", "--copy-images")
    assert result.exit_code == 0, result.stderr
    out = folder / "yolo"
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["train"] == "images" and data["nc"] == len(data["names"])
    dataset = sv.DetectionDataset.from_yolo(images_directory_path=str(out / "images"),
                                            annotations_directory_path=str(out / "labels"),
                                            data_yaml_path=str(out / "data.yaml"))
    assert list(dataset.classes) == [data["names"][i] for i in range(data["nc"])]
    read = {path.split("/")[-1]: detections for path, _, detections in dataset}
    assert sorted(read) == sorted(IMAGES)
    for record in _good(records):
        detections = read[record["image"].split("/")[-1]]
        want = _boxes(record)
        assert [dataset.classes[c] for c in detections.class_id] == [w[0] for w in want]
        np.testing.assert_allclose(detections.xyxy, [w[1] for w in want], atol=0.01)


LABEL_STUDIO_SCHEMA = {  # https://labelstud.io/guide/predictions, https://labelstud.io/tags/rectanglelabels
    "type": "array",
    "items": {
        "type": "object",
        "required": ["data", "predictions"],
        "properties": {
            "data": {"type": "object", "required": ["image"], "properties": {"image": {"type": "string"}}},
            "predictions": {"type": "array", "items": {
                "type": "object",
                "required": ["result"],
                "properties": {
                    "model_version": {"type": "string"},
                    "score": {"type": "number"},
                    "result": {"type": "array", "items": {
                        "type": "object",
                        "required": ["type", "from_name", "to_name", "value", "original_width", "original_height"],
                        "properties": {
                            "id": {"type": "string"},
                            "type": {"const": "rectanglelabels"},
                            "from_name": {"type": "string"}, "to_name": {"type": "string"},
                            "original_width": {"type": "integer", "minimum": 1},
                            "original_height": {"type": "integer", "minimum": 1},
                            "image_rotation": {"type": "number"},
                            "score": {"type": "number", "minimum": 0, "maximum": 1},
                            "value": {
                                "type": "object",
                                "required": ["x", "y", "width", "height", "rectanglelabels"],
                                "properties": {
                                    **{k: {"type": "number", "minimum": 0, "maximum": 100}
                                       for k in ("x", "y", "width", "height")},
                                    "rotation": {"type": "number"},
                                    "rectanglelabels": {"type": "array", "items": {"type": "string"},
                                                        "minItems": 1},
                                },
                            },
                        },
                    }},
                },
            }},
        },
    },
}


def test_label_studio_predictions_follow_its_schema(labelled):
    import jsonschema

    folder, records, _ = labelled
    result = _export(folder, "--format", "labelstudio", "-o", "tasks.json", "--url-prefix", "/data/local-files/?d=")
    assert result.exit_code == 0, result.stderr
    tasks = json.loads((folder / "tasks.json").read_text())
    jsonschema.validate(tasks, LABEL_STUDIO_SCHEMA)
    config = (folder / "tasks.xml").read_text()
    for record, task in zip(_good(records), tasks, strict=True):
        assert task["data"]["image"] == "/data/local-files/?d=" + record["image"]
        got = []
        for r in task["predictions"][0]["result"]:
            v, w, h = r["value"], r["original_width"], r["original_height"]
            assert (r["from_name"], r["to_name"]) == ("label", "image")
            got.append((v["rectanglelabels"][0], [round(v["x"] * w / 100), round(v["y"] * h / 100),
                                                  round((v["x"] + v["width"]) * w / 100),
                                                  round((v["y"] + v["height"]) * h / 100)], r["score"]))
            assert f'<Label value="{v["rectanglelabels"][0]}"/>' in config
        assert got == _boxes(record)
    assert '<RectangleLabels name="label" toName="image">' in config and 'value="$image"' in config


def test_min_score_and_classes(labelled):
    from pycocotools.coco import COCO

    folder, records, _ = labelled
    every = [b for r in _good(records) for b in _boxes(r)]
    scores = sorted(s for _, _, s in every)
    cut = scores[len(scores) // 2]
    (folder / "keep.txt").write_text("two dogs\nA Fire\nnot in any record\n")
    result = _export(folder, "-f", "coco", "-o", "cut.json", "--min-score", str(cut), "--classes", "keep.txt")
    assert result.exit_code == 0, result.stderr
    coco = COCO(str(folder / "cut.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["two dogs", "a fire", "not in any record"]
    kept = [b for b in every if b[2] >= cut and b[0] in ("two dogs", "a fire")]
    got = sorted((coco.cats[a["category_id"]]["name"], a["score"]) for a in coco.dataset["annotations"])
    assert got == sorted((c, s) for c, _, s in kept) and kept
    below = sum(s < cut for _, _, s in every)
    other = sum(s >= cut and c not in ("two dogs", "a fire") for c, _, s in every)
    assert f"{below} box(es) under --min-score" in result.stderr
    assert f"{other} box(es) of phrases not in --classes" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["-f", "coco", "-o", "x.json", "--copy-images"], "applies to the yolo format"),
    (["-f", "coco", "-o", "x.json", "--classes", "missing.txt"], "cannot read the class list"),
    (["-f", "bmp", "-o", "x.json"], "'bmp' is not one of"),
])
def test_bad_export_arguments_are_one_line(labelled, args, message):
    folder, _, _ = labelled
    result = _export(folder, *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2


def test_a_file_that_is_not_records_is_one_line(tmp_path):
    (tmp_path / "notes.jsonl").write_text("just some text\nmore\n")
    result = invoke(["export", tmp_path / "notes.jsonl", "-f", "coco", "-o", tmp_path / "x.json"])
    assert result.exit_code == 2 and "line 1 is not a JSON object" in result.stderr
    (tmp_path / "other.jsonl").write_text('{"image": "a.jpg", "entities": []}\n')
    result = invoke(["export", tmp_path / "other.jsonl", "-f", "yolo", "-o", tmp_path / "y"])
    assert result.exit_code == 2 and "line 1 is not a kosmos2 record" in result.stderr
