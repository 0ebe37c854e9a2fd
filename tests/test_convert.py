"""`kosmos2 convert` on small files written exactly as the public benchmarks ship them: RefCOCO's refs (in their
JSON form: the released refs(*).p pickle is refused, never loaded) with COCO's instances.json, and Flickr30k
Entities' Annotations/*.xml with Sentences/*.txt. Then convert -> eval on the trained checkpoint."""

from __future__ import annotations

import json
import pickle

import pytest
from cli_helpers import invoke, json_lines, quick  # noqa: F401  (fixture)

# refs(unc).p as `json.dump(pickle.load(...))` writes it: one dict per referred object
REFS = [
    {"sent_ids": [0, 1], "file_name": "COCO_train2014_000000581857_16.jpg", "ann_id": 1719310, "ref_id": 0,
     "image_id": 581857, "split": "testA", "category_id": 1,
     "sentences": [{"tokens": ["the", "lady", "with", "the", "blue", "shirt"], "raw": "THE  LADY WITH THE BLUE SHIRT",
                    "sent_id": 0, "sent": "the lady with the blue shirt"},
                   {"tokens": ["lady", "w", "back", "to", "us"], "raw": "lady w back to us", "sent_id": 1,
                    "sent": "lady w back to us"}]},
    {"sent_ids": [2], "file_name": "COCO_train2014_000000581857_17.jpg", "ann_id": 1719311, "ref_id": 1,
     "image_id": 581857, "split": "val", "category_id": 18,
     "sentences": [{"tokens": ["dog"], "raw": "Dog", "sent_id": 2, "sent": "dog"}]},
]
INSTANCES = {
    "info": {"description": "This is stable 1.0 version of the 2014 MS COCO dataset.", "version": "1.0"},
    "images": [{"license": 1, "file_name": "COCO_train2014_000000581857.jpg", "coco_url": "", "height": 640,
                "width": 427, "date_captured": "2013-11-16 00:00:00", "flickr_url": "", "id": 581857}],
    "licenses": [{"url": "", "id": 1, "name": "Attribution-NonCommercial-ShareAlike License"}],
    "annotations": [
        {"segmentation": [[103.93, 299.99, 238.15, 299.99, 238.15, 477.41]], "area": 14107.27, "iscrowd": 0,
         "image_id": 581857, "bbox": [103.93, 299.99, 134.22, 177.42], "category_id": 1, "id": 1719310},
        {"segmentation": [[10.0, 20.0, 60.0, 20.0, 60.0, 90.0]], "area": 1750.0, "iscrowd": 0,
         "image_id": 581857, "bbox": [10.0, 20.0, 50.0, 70.0], "category_id": 18, "id": 1719311},
    ],
    "categories": [{"supercategory": "person", "id": 1, "name": "person"},
                   {"supercategory": "animal", "id": 18, "name": "dog"}],
}

FLICKR_XML = """<annotation>
  <filename>1000092795.jpg</filename>
  <size>
    <width>500</width>
    <height>375</height>
    <depth>3</depth>
  </size>
  <segmented>0</segmented>
  <object>
    <name>136</name>
    <bndbox>
      <xmin>1</xmin>
      <ymin>30</ymin>
      <xmax>210</xmax>
      <ymax>375</ymax>
    </bndbox>
  </object>
  <object>
    <name>136</name>
    <bndbox>
      <xmin>220</xmin>
      <ymin>10</ymin>
      <xmax>450</xmax>
      <ymax>370</ymax>
    </bndbox>
  </object>
  <object>
    <name>137</name>
    <name>140</name>
    <bndbox>
      <xmin>50</xmin>
      <ymin>40</ymin>
      <xmax>120</xmax>
      <ymax>100</ymax>
    </bndbox>
  </object>
  <object>
    <name>138</name>
    <nobndbox>1</nobndbox>
  </object>
  <object>
    <name>139</name>
    <scene>1</scene>
  </object>
</annotation>
"""
FLICKR_SENTENCES = (
    "[/EN#136/people Two young guys] with [/EN#137/bodyparts shaggy hair] look at [/EN#138/bodyparts their hands]"
    " while hanging out in [/EN#139/scene the yard] .\n"
    "[/EN#136/people Two friends] enjoy time spent together with [/EN#0/notvisual nothing] and"
    " [/EN#140/clothing/other a  hat] .\n"
)


def test_refcoco_refs_and_instances(tmp_path):
    (tmp_path / "refs.json").write_text(json.dumps(REFS))
    (tmp_path / "instances.json").write_text(json.dumps(INSTANCES))
    result = invoke(["convert", "refcoco", "--refs", tmp_path / "refs.json", "--instances",
                     tmp_path / "instances.json", "-o", tmp_path / "out.jsonl", "--dataset", "refcoco+"])
    assert result.exit_code == 0, result.stderr
    items = json_lines((tmp_path / "out.jsonl").read_text())
    box = [103.93, 299.99, 103.93 + 134.22, 299.99 + 177.42]
    assert [(i["image"], i["phrase"], i["split"]) for i in items] == [
        ("COCO_train2014_000000581857.jpg", "the lady with the blue shirt", "refcoco+/testA"),
        ("COCO_train2014_000000581857.jpg", "lady w back to us", "refcoco+/testA"),
        ("COCO_train2014_000000581857.jpg", "dog", "refcoco+/val"),
    ]
    assert items[0]["boxes"] == [pytest.approx(box)] and items[2]["boxes"] == [[10.0, 20.0, 60.0, 90.0]]
    assert [i["sent_id"] for i in items] == [0, 1, 2]
    # --split, and refs as one JSON object a line
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REFS))
    result = invoke(["convert", "refcoco", "--refs", tmp_path / "refs.jsonl", "--instances",
                     tmp_path / "instances.json", "-o", tmp_path / "val.jsonl", "--split", "val"])
    assert result.exit_code == 0, result.stderr
    assert [i["phrase"] for i in json_lines((tmp_path / "val.jsonl").read_text())] == ["dog"]


def test_refcoco_pickle_is_refused_unread(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'ran')!r}, 'w').write('unpickled')",))

    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([Boom()]))
    (tmp_path / "instances.json").write_text(json.dumps(INSTANCES))
    result = invoke(["convert", "refcoco", "--refs", tmp_path / "refs(unc).p", "--instances",
                     tmp_path / "instances.json", "-o", tmp_path / "out.jsonl"])
    assert result.exit_code == 2 and "a pickle such as refs(unc).p is never loaded" in result.stderr
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out.jsonl").exists()


def test_refcoco_ref_of_another_release_is_one_line(tmp_path):
    (tmp_path / "refs.json").write_text(json.dumps([{**REFS[0], "ann_id": 5}]))
    (tmp_path / "instances.json").write_text(json.dumps(INSTANCES))
    result = invoke(["convert", "refcoco", "--refs", tmp_path / "refs.json", "--instances",
                     tmp_path / "instances.json", "-o", tmp_path / "out.jsonl"])
    assert result.exit_code == 2 and "does not have" in result.stderr


def _flickr(root):
    (root / "Annotations").mkdir(parents=True)
    (root / "Sentences").mkdir()
    (root / "Annotations" / "1000092795.xml").write_text(FLICKR_XML)
    (root / "Sentences" / "1000092795.txt").write_text(FLICKR_SENTENCES)
    (root / "Annotations" / "2.xml").write_text(FLICKR_XML.replace("1000092795", "2"))
    (root / "Sentences" / "2.txt").write_text("[/EN#137/bodyparts Hair] .\n")
    (root / "test.txt").write_text("1000092795\n")


def test_flickr30k_entities(tmp_path):
    _flickr(tmp_path / "f30k")
    result = invoke(["convert", "flickr30k", tmp_path / "f30k", "--ids", tmp_path / "f30k" / "test.txt",
                     "-o", tmp_path / "out.jsonl"])
    assert result.exit_code == 0, result.stderr
    items = json_lines((tmp_path / "out.jsonl").read_text())
    guys = [[1, 30, 210, 375], [220, 10, 450, 370]]
    hair = [[50, 40, 120, 100]]
    # no-box (138), scene (139) and non-visual (0) entities give no item; one box may carry two entity ids
    assert [(i["image"], i["phrase"], i["boxes"], i["split"], i["type"]) for i in items] == [
        ("1000092795.jpg", "Two young guys", guys, "flickr30k/test", "people"),
        ("1000092795.jpg", "shaggy hair", hair, "flickr30k/test", "bodyparts"),
        ("1000092795.jpg", "Two friends", guys, "flickr30k/test", "people"),
        ("1000092795.jpg", "a hat", hair, "flickr30k/test", "clothing"),
    ]
    result = invoke(["convert", "flickr30k", tmp_path / "f30k", "-o", tmp_path / "all.jsonl"])
    assert [i["image"] for i in json_lines((tmp_path / "all.jsonl").read_text())] == ["1000092795.jpg"] * 4 + [
        "2.jpg"]


def test_flickr30k_wrong_folder_is_one_line(tmp_path):
    result = invoke(["convert", "flickr30k", tmp_path, "-o", tmp_path / "out.jsonl"])
    assert result.exit_code == 2 and "no Annotations/ folder" in result.stderr


@pytest.mark.usefixtures("quick")
def test_convert_then_eval(trained_dir, tmp_path):
    """RefCOCO-format files for a fixture picture, converted, then evaluated: the lesson's box is right."""
    import shutil

    import trained

    shutil.copy(trained.IMAGES / "snowman.png", tmp_path / "snowman.png")
    x1, y1, x2, y2 = (v * 1024 for v in trained.cell_box(44, 863))  # the trained answer for "a snowman"
    refs = [{"ref_id": 0, "ann_id": 7, "image_id": 1, "split": "val", "category_id": 1, "file_name": "snowman_7.png",
             "sent_ids": [0, 1], "sentences": [{"sent_id": 0, "sent": "a snowman", "raw": "A snowman", "tokens": []},
                                               {"sent_id": 1, "sent": "a cat", "raw": "a cat", "tokens": []}]}]
    instances = {"images": [{"id": 1, "file_name": "snowman.png", "width": 1024, "height": 1024}],
                 "annotations": [{"id": 7, "image_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": 1}],
                 "categories": [{"id": 1, "name": "snowman"}]}
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    assert invoke(["convert", "refcoco", "--refs", tmp_path / "refs.json", "--instances", tmp_path / "instances.json",
                   "-o", tmp_path / "val.jsonl"]).exit_code == 0
    result = invoke(["eval", tmp_path / "val.jsonl", "--images", tmp_path, "--model", trained_dir, "--json"])
    assert result.exit_code == 0, result.stderr
    [report] = json_lines(result.stdout)
    assert (report["n"], report["found"], report["correct"]) == (2, 1, 1)
    assert report["mean_iou"] == pytest.approx(0.5) and report["splits"]["refcoco/val"]["accuracy"] == 0.5
