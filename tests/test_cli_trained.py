"""Exact answers end to end: the `kosmos2` commands on the tiny checkpoint the reference trained (trained.py).

For every lesson, the command's JSON line must carry the reference's own post-processing of the answer: the
text (prompt words cut off where DESIGN §5 says so), the spans, the normalized boxes, the pixel boxes and the raw
text; ground phrases the model does not place are reported as not found; the drawing has the boxes where the
JSON says; a batch over the demo images gives every caption exactly once.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
from cli_helpers import invoke, json_lines, quick  # noqa: F401  (fixture)
from PIL import Image

from kosmos2_cli.api.results import to_pixels
from kosmos2_cli.cli import palette

trained = pytest.importorskip("trained")
pytestmark = pytest.mark.usefixtures("quick")

LESSONS = trained.LESSONS


def _lessons(*tasks):
    return [lesson for lesson in LESSONS if lesson.task in tasks]


def _run(trained_dir, *args):
    result = invoke([*args, "--model", trained_dir, "--json", "--max-new-tokens", str(trained.MAX_NEW_TOKENS)])
    assert result.exit_code == 0, result.stderr
    return json_lines(result.stdout)


def _size(lesson) -> tuple[int, int]:
    with Image.open(lesson.path) as image:
        return image.size


SCORE_ATOL = 1e-5  # box scores against the reference's own output_scores, fp32


def _entities(expected_entities, width, height, shift=0, scores=None):
    """The JSON entities that the reference's (phrase, span, boxes) and box scores give, spans moved back by
    `shift`."""
    return [
        {"phrase": phrase, "span": [start - shift, end - shift], "boxes": [list(b) for b in boxes],
         "scores": pytest.approx(box_scores, abs=SCORE_ATOL),
         "boxes_px": [list(to_pixels(b, width, height)) for b in boxes]}
        for (phrase, (start, end), boxes), box_scores in zip(expected_entities, scores, strict=True)
    ]


@pytest.mark.parametrize("lesson", _lessons("caption", "detailed"), ids=lambda lesson: lesson.key)
def test_caption_exactly(trained_dir, lesson):
    args = ["caption", lesson.path] + (["--detailed"] if lesson.task == "detailed" else [])
    [record] = _run(trained_dir, *args)
    want = trained.expected(lesson)
    width, height = _size(lesson)
    assert record["prompt"] == lesson.prompt
    assert record["raw"] == want.raw == lesson.raw
    assert record["text"] == want.caption
    assert record["entities"] == _entities(want.entities, width, height, scores=trained.box_scores(lesson))
    assert (record["width"], record["height"]) == (width, height)


@pytest.mark.parametrize("lesson", _lessons("caption")[:2], ids=lambda lesson: lesson.key)
def test_beam_scores_are_the_returned_beams_probabilities(trained_dir, lesson):
    """With beams, a box's score is the product of its two tokens' probabilities along the returned beam: the
    reference's own transition scores for that beam (beam search's running sums play no part)."""
    ids, probs = trained.beam_box_scores(lesson, num_beams=3)
    [record] = _run(trained_dir, "caption", lesson.path, "--num-beams", "3")
    processor = trained.reference_processor()
    decoded = processor.batch_decode([ids], skip_special_tokens=True)[0]
    assert record["raw"] == processor.post_process_generation(decoded, cleanup_and_extract=False)  # same beam
    pairs = [a * b for a, b in zip(probs[0::2], probs[1::2], strict=True)]
    ours = [score for entity in record["entities"] for score in entity["scores"]]
    assert len(pairs) == len(ours) > 0
    assert ours == pytest.approx(pairs, abs=SCORE_ATOL)


def _answer_shift(caption: str, marker: str) -> int:
    """Where the answer starts in the reference's caption (after the prompt's words)."""
    cut = caption.index(marker) + len(marker)
    return cut + len(caption[cut:]) - len(caption[cut:].lstrip())


@pytest.mark.parametrize("lesson", _lessons("ask"), ids=lambda lesson: lesson.key)
def test_ask_exactly(trained_dir, lesson):
    [record] = _run(trained_dir, "ask", lesson.path, lesson.question)
    want = trained.expected(lesson)
    width, height = _size(lesson)
    shift = _answer_shift(want.caption, "Answer:")
    assert record["text"] == want.caption[shift:]
    assert record["entities"] == _entities(want.entities, width, height, shift, trained.box_scores(lesson))
    assert record["raw"] == want.raw and record["question"] == lesson.question


@pytest.mark.parametrize("lesson", _lessons("refer"), ids=lambda lesson: lesson.key)
@pytest.mark.parametrize("unit", ["normalized", "pixels"])
def test_refer_exactly(trained_dir, lesson, unit):
    width, height = _size(lesson)
    x1, y1, x2, y2 = lesson.box
    if unit == "normalized":
        args = ["--box", f"{x1},{y1},{x2},{y2}", "--normalized"]
    else:
        args = ["--box", ",".join(str(v) for v in (x1 * width, y1 * height, x2 * width, y2 * height))]
    [record] = _run(trained_dir, "refer", lesson.path, *args)
    want = trained.expected(lesson)
    assert record["prompt"] == lesson.prompt and record["cells"] == list(lesson.cells)
    shift = _answer_shift(want.caption, "It is")
    answer = [i for i, e in enumerate(want.entities) if e[1][0] >= shift]  # not the prompt's "It"
    scores = trained.box_scores(lesson)
    assert scores[0] == [1.0]  # the prompt's box
    assert record["text"] == want.caption[shift:]
    assert record["entities"] == _entities([want.entities[i] for i in answer], width, height, shift,
                                           [scores[i] for i in answer])
    assert record["raw"] == want.raw


def _ground_lessons_by_image():
    grouped = defaultdict(list)
    for lesson in _lessons("ground"):
        grouped[lesson.image].append(lesson)
    return sorted(grouped.items())


@pytest.mark.parametrize("image, lessons", _ground_lessons_by_image(), ids=lambda v: v if isinstance(v, str) else "")
def test_ground_exactly_with_not_found(trained_dir, image, lessons):
    args = ["ground", lessons[0].path]
    for lesson in lessons:
        args += ["--phrase", lesson.phrase]
    [record] = _run(trained_dir, *args)
    width, height = _size(lessons[0])
    phrases = [lesson.phrase for lesson in lessons]
    assert record["phrases"] == phrases
    assert record["found"] == {lesson.phrase: lesson.found for lesson in lessons}
    assert record["text"] == "; ".join(phrases)
    entities = []
    raws = []
    for lesson in lessons:
        start = record["text"].index(lesson.phrase)
        if lesson.found:
            first = lesson.target[: lesson.target.index("</object>") + len("</object>")]  # stops at its box
            _, _, boxes = trained.expected(lesson).entities[0]
            entities.append({"phrase": lesson.phrase, "span": [start, start + len(lesson.phrase)],
                             "boxes": [list(b) for b in boxes],
                             "scores": pytest.approx(trained.box_scores(lesson)[0], abs=SCORE_ATOL),
                             "boxes_px": [list(to_pixels(b, width, height)) for b in boxes]})
            raws.append(lesson.prompt + first)
        else:
            raws.append(lesson.prompt)
    assert record["entities"] == entities
    assert record["raw"].splitlines() == raws
    assert not [e for e in record["entities"] if e["phrase"] not in record["found"]]


def test_not_found_and_scores_in_the_terminal(trained_dir):
    lesson = next(lesson for lesson in _lessons("ground") if not lesson.found)
    placed = next(other for other in _lessons("ground") if other.found and other.image == lesson.image)
    result = invoke(["ground", lesson.path, "-p", placed.phrase, "-p", lesson.phrase, "--model", trained_dir])
    assert result.exit_code == 0
    row = next(line for line in result.stdout.splitlines() if lesson.phrase in line and "not found" in line)
    assert row
    box = to_pixels(trained.expected(placed).entities[0][2][0], *_size(placed))
    score = trained.box_scores(placed)[0][0]  # the reference's probability of the box's two tokens
    assert any(line.split()[-5:] == [*(str(v) for v in box), f"{score:.2f}"] for line in result.stdout.splitlines())


def test_drawn_boxes_are_where_the_json_says(trained_dir, tmp_path):
    lesson = next(lesson for lesson in _lessons("caption") if len(trained.expected(lesson).entities) >= 2)
    out = tmp_path / "drawn.png"
    [record] = _run(trained_dir, "caption", lesson.path, "--draw", out)
    drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
    original = np.asarray(Image.open(lesson.path).convert("RGB")).astype(int)
    assert drawn.shape == original.shape
    for index, entity in enumerate(record["entities"]):
        x1, y1, x2, y2 = entity["boxes_px"][0]
        color = np.array(palette.rgb(palette.color(index)))
        for x, y in ((x1, (y1 + y2) // 2), (x2, (y1 + y2) // 2), ((x1 + x2) // 2, y2)):
            x, y = min(x, drawn.shape[1] - 1), min(y, drawn.shape[0] - 1)
            assert np.abs(drawn[y, x] - color).max() < 40, (entity["phrase"], x, y, drawn[y, x])
    changed = np.abs(drawn - original).max(axis=2) > 0
    assert 0.001 < changed.mean() < 0.2  # boxes and labels, not a repainted picture


def test_batch_over_the_demo_images_gives_every_caption_once(trained_dir, tmp_path):
    captions = {lesson.image: lesson for lesson in _lessons("caption")}
    out = tmp_path / "captions.jsonl"
    inputs = [captions[name].path for name in sorted(captions)]
    result = invoke(["batch", *inputs, "-o", out, "-t", "caption", "--model", trained_dir, "--batch-size", "3",
                     "--max-new-tokens", str(trained.MAX_NEW_TOKENS)])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in records] == [str(p) for p in inputs]
    for record in records:
        lesson = captions[record["image"].rsplit("/", 1)[-1]]
        assert record["text"] == trained.expected(lesson).caption
        assert record["raw"] == lesson.raw
