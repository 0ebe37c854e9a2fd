"""`kosmos2 eval` end to end on the trained tiny checkpoint: exact accuracy, found and mean IoU on an annotation
file where some answers are right and some wrong (expected values from the lessons' known answers, with an IoU
written here), per split; a phrase not placed counts as wrong with IoU 0; any listed box counts; the first box
is the prediction; a missing picture is counted as failed, not scored; a SIGKILLed run resumes to the same
totals with no item written twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from cli_helpers import invoke, json_lines, kosmos2_command, quick, subprocess_env  # noqa: F401  (fixture)
from PIL import Image

trained = pytest.importorskip("trained")
pytestmark = pytest.mark.usefixtures("quick")


def _iou(a, b):
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def predicted(image: str, phrase: str):
    """The first box the trained model gives `phrase` on `image` (pixels, floats), None when it places none."""
    [lesson] = [x for x in trained.LESSONS if x.task == "ground" and x.image == image and x.phrase == phrase]
    if not lesson.found:
        return None
    cells = lesson.target.split("<patch_index_")[1:3]
    first, last = (int(c[:4]) for c in cells)
    with Image.open(lesson.path) as picture:
        width, height = picture.size
    x1, y1, x2, y2 = trained.cell_box(first, last)
    return [x1 * width, y1 * height, x2 * width, y2 * height]


def _shift(box, dx):
    return [box[0] + dx, box[1], box[2] + dx, box[3]]


def _grow(box, factor):
    cx, cy, w, h = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]
    return [cx - w * factor / 2, cy - h * factor / 2, cx + w * factor / 2, cy + h * factor / 2]


def annotation_items():
    """(image, phrase, boxes, split): right and wrong answers of every kind."""
    snowman = predicted("snowman.png", "a snowman")
    fire = predicted("snowman.png", "a fire")
    glove = predicted("man_ball.png", "a glove")
    drone = predicted("quadrocopter.jpg", "a drone")
    right_dog = [v * s for v, s in zip(trained.cell_box(80, 1016), (1200, 602, 1200, 602), strict=True)]
    return [
        ("snowman.png", "a snowman", [snowman], "s1"),  # exact: IoU 1
        ("snowman.png", "a fire", [_shift(fire, 48)], "s1"),  # IoU ~0.74: right
        ("snowman.png", "a hat", [[0, 0, 10, 10]], "s1"),  # placed, far away: wrong
        ("snowman.png", "a cat", [[0, 0, 500, 500]], "s1"),  # not placed: wrong, IoU 0
        ("snowman.png", "a snowman", [[0, 0, 64, 64]], "s1"),  # the same question, another answer key: wrong
        ("man_ball.png", "a glove", [[0, 0, 5, 5], glove], "s2"),  # any listed box counts: right
        ("man_ball.png", "a snowman", [[0, 0, 100, 100]], "s2"),  # not placed
        ("two_dogs.jpg", "two dogs", [right_dog], "s2"),  # the prediction is the first box (the left dog)
        ("quadrocopter.jpg", "a drone", [_grow(drone, 2.0)], "s2"),  # IoU 0.25: wrong
    ]


def expected_scores(items, threshold=0.5):
    out = {}
    for image, phrase, boxes, split in items:
        box = predicted(image, phrase)
        best = 0.0 if box is None else max(_iou(box, b) for b in boxes)
        for name in ("all", split):
            s = out.setdefault(name, {"n": 0, "found": 0, "correct": 0, "iou": 0.0})
            s["n"] += 1
            s["found"] += box is not None
            s["correct"] += box is not None and best >= threshold
            s["iou"] += best
    return out


def _write(path, items):
    path.write_text("".join(json.dumps({"image": i, "phrase": p, "boxes": b, "split": s}) + "\n"
                            for i, p, b, s in items))


def _check(report, want, failed=0):
    for name, got in [("all", report), *report["splits"].items()]:
        w = want[name]
        assert (got["n"], got["found"], got["correct"]) == (w["n"], w["found"], w["correct"]), name
        assert got["accuracy"] == pytest.approx(w["correct"] / w["n"], abs=1e-12)
        assert got["mean_iou"] == pytest.approx(w["iou"] / w["n"], abs=1e-9)
    assert report["failed"] == failed


def test_eval_gives_the_exact_accuracy_and_mean_iou(trained_dir, tmp_path):
    (tmp_path / "pics").mkdir()
    for name in ("snowman.png", "man_ball.png", "two_dogs.jpg", "quadrocopter.jpg"):
        shutil.copy(trained.IMAGES / name, tmp_path / "pics" / name)
    items = annotation_items()
    want = expected_scores(items)
    assert 0 < want["all"]["correct"] < want["all"]["found"] < want["all"]["n"]  # right, wrong and not placed
    _write(tmp_path / "ann.jsonl", [*items, ("nowhere.png", "a dog", [[0, 0, 1, 1]], "s2")])
    args = ["eval", tmp_path / "ann.jsonl", "--images", tmp_path / "pics", "--model", trained_dir,
            "--max-new-tokens", trained.MAX_NEW_TOKENS, "--predictions", tmp_path / "pred.jsonl"]
    result = invoke([*args, "--json"])
    assert result.exit_code == 1, result.stderr  # one picture is missing
    assert "1 item(s) not scored" in result.stderr
    [report] = json_lines(result.stdout)
    _check(report, want, failed=1)
    assert set(report["splits"]) == {"s1", "s2"} and report["splits"]["s2"]["failed"] == 1
    records = json_lines((tmp_path / "pred.jsonl").read_text())
    assert [r["item"] for r in records] == list(range(len(items) + 1))
    assert records[0]["box"] == pytest.approx(items[0][2][0]) and records[0]["score"] > 0
    assert records[3]["box"] is None
    # rerun: everything is in the predictions file, so no model work; a stricter threshold rescores it
    result = invoke([*args[:-2], "--predictions", tmp_path / "pred.jsonl", "--iou", "0.8", "--json",
                     "--model", tmp_path / "no-model-needed"])
    [strict] = json_lines(result.stdout)
    _check(strict, expected_scores(items, 0.8), failed=1)
    # the table
    result = invoke(args)
    assert "grounding accuracy" in result.stdout
    assert f"{100 * want['all']['correct'] / want['all']['n']:.1f}%" in result.stdout


def test_a_killed_eval_resumes_to_the_same_totals(trained_dir, tmp_path):
    copies = 60
    (tmp_path / "pics").mkdir()
    items = []
    for i in range(copies):
        os.symlink(trained.IMAGES / "snowman.png", tmp_path / "pics" / f"s{i:02d}.png")
        items += [(f"s{i:02d}.png", "a snowman", [predicted("snowman.png", "a snowman")], "a"),
                  (f"s{i:02d}.png", "a cat", [[0, 0, 100, 100]], "b")]
    _write(tmp_path / "ann.jsonl", items)
    pred = tmp_path / "pred.jsonl"
    args = ["eval", tmp_path / "ann.jsonl", "--images", tmp_path / "pics", "--model", trained_dir,
            "--max-new-tokens", trained.MAX_NEW_TOKENS, "--predictions", pred, "--batch-size", "1"]
    process = subprocess.Popen([*kosmos2_command(), *map(str, args), "--quiet"], env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if pred.exists() and pred.read_bytes().count(b"\n") >= 6:
            break
        time.sleep(0.01)
    assert process.poll() is None, process.stderr.read().decode()  # still running: killed mid-run
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = pred.read_bytes().count(b"\n")
    assert 6 <= written < len(items)
    result = subprocess.run([*kosmos2_command(), *map(str, args), "--json", "--debug"], env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"resuming: {written} of {len(items)} items" in result.stderr
    [report] = json_lines(result.stdout)
    _check(report, expected_scores([("snowman.png", *item[1:]) for item in items]))  # copies of it
    keys = [(r["item"], r["image"], r["phrase"]) for r in json_lines(pred.read_text())]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == len(items)


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.jpg", "phrase": "a dog"}', 'needs "boxes"'),
    ('{"image": "a.jpg", "phrase": " ", "boxes": [[0, 0, 1, 1]]}', 'needs "phrase"'),
    ('{"image": "a.jpg", "phrase": "a dog", "boxes": [[5, 0, 1, 1]]}', "needs x1 < x2"),
    ('{"image": "a.jpg", "phrase": "a dog", "boxes": [[0, 0, 1]]}', "a box is four numbers"),
    ("not json", "line 1 is not a JSON object"),
])
def test_bad_annotations_are_one_line(tmp_path, line, message):
    (tmp_path / "ann.jsonl").write_text(line + "\n")
    result = invoke(["eval", tmp_path / "ann.jsonl", "--model", tmp_path])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
