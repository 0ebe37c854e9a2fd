"""Post-processing against the reference's functions, on hand cases and on many random tag sequences."""

from __future__ import annotations

import random

import pytest

from kosmos2_cli.processing import postprocess as ours

SNOWMAN = (
    "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> "
    "warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."
)

HAND_CASES = [
    SNOWMAN,
    "",
    "   ",
    "no tags at all",
    "  leading and trailing  ",
    "<phrase>a</phrase><object><patch_index_0000><patch_index_1023></object>",
    "<object><patch_index_0010><patch_index_0020></object> box without phrase",
    "x <object><patch_index_0010><patch_index_0020></delimiter_of_multi_objects/><patch_index_0030>"
    "<patch_index_0040></object> two boxes, no phrase",
    "<phrase> two dogs</phrase><object><patch_index_0001><patch_index_0500></delimiter_of_multi_objects/>"
    "<patch_index_0600><patch_index_1023></object> play",
    "<phrase> unclosed phrase<object><patch_index_0001><patch_index_0002></object>",
    "<phrase> a</phrase> no object after it",
    "<phrase></phrase><object><patch_index_0001><patch_index_0002></object> empty phrase",
    "<phrase> a <b> c</phrase><object><patch_index_0001><patch_index_0002></object> < inside phrase",
    "<phrase> 日本の 雪だるま ☃️</phrase><object><patch_index_0100><patch_index_0200></object> unicode",
    "<phrase>  spaced  </phrase><object><patch_index_0100><patch_index_0200></object>",
    "<patch_index_0044> stray patch tokens <patch_index_0863>",
    "<object><patch_index_0044></object> one patch only",
    "<object><patch_index_0044><patch_index_0863><patch_index_0001></object> three patches",
    "<object><patch_index_5000><patch_index_9999></object> past the grid",
    "<object><patch_index_44><patch_index_863></object> unpadded",
    "<object><patch_index_٠٠٤٤><patch_index_٠٨٦٣></object> arabic-indic digits",
    "<phrase>a\nb</phrase><object><patch_index_0001><patch_index_0002></object> newline in phrase",
    "tag <on\ntwo lines> stays",
    "</image> after image <phrase> it</phrase><object><patch_index_0001><patch_index_0034></object> is",
    "<phrase>a</phrase><phrase>b</phrase><object><patch_index_0001><patch_index_0002></object>",
    "<object></object> empty object",
    "<phrase> x</phrase> <object><patch_index_0001><patch_index_0002></object> space between",
    "<grounding><phrase> It</phrase><object><patch_index_0044><patch_index_0863></object> is a snowman.",
]


def _reference():
    from transformers.models.kosmos2 import processing_kosmos2

    return processing_kosmos2


@pytest.fixture(scope="module")
def ref():
    return _reference()


def assert_all_functions_agree(ref, text: str) -> None:
    assert ours.extract_entities_with_patch_indices(text) == ref.extract_entities_with_patch_indices(text), text
    for n in (32, 16):
        assert ours.clean_text_and_extract_entities_with_bboxes(text, n) == (
            ref.clean_text_and_extract_entities_with_bboxes(text, n)
        ), text
    for name, span, _ in ref.extract_entities_with_patch_indices(text):
        assert ours.adjust_entity_positions((name, span), text) == ref.adjust_entity_positions((name, span), text)


@pytest.mark.parametrize("text", HAND_CASES)
def test_hand_cases(ref, text):
    assert_all_functions_agree(ref, text)


def test_snowman_example_from_design():
    caption, entities = ours.clean_text_and_extract_entities_with_bboxes(SNOWMAN)
    assert caption == "An image of a snowman warming himself by a fire."
    assert entities == [
        ("a snowman", (12, 21), [(0.390625, 0.046875, 0.984375, 0.828125)]),
        ("a fire", (41, 47), [(0.171875, 0.015625, 0.484375, 0.890625)]),
    ]
    assert ours.extract_entities_with_patch_indices(SNOWMAN) == [
        (" a snowman", (31, 41), [(44, 863)]),
        (" a fire", (130, 137), [(5, 911)]),
    ]


def _random_tagged_text(rng: random.Random) -> str:
    words = ["a", " snowman", " fire", "  ", " ", "\n", "日本", "é", "<", ">", "x<y", "😀", ".", ",", "\t"]
    tags = ["<phrase>", "</phrase>", "<object>", "</object>", "</delimiter_of_multi_objects/>", "<grounding>",
            "</image>", "<image>", "<s>", "</s>"]

    def patch() -> str:
        return f"<patch_index_{rng.choice([rng.randint(0, 1023), rng.randint(0, 99), rng.randint(1024, 9999)]):04d}>"

    def well_formed_entity() -> str:
        boxes = "</delimiter_of_multi_objects/>".join(patch() + patch() for _ in range(rng.randint(1, 3)))
        phrase = "".join(rng.choice(words) for _ in range(rng.randint(0, 3)))
        head = f"<phrase>{phrase}</phrase>" if rng.random() < 0.8 else ""
        return f"{head}<object>{boxes}</object>"

    parts = []
    for _ in range(rng.randint(0, 12)):
        r = rng.random()
        if r < 0.35:
            parts.append(rng.choice(words))
        elif r < 0.6:
            parts.append(well_formed_entity())
        elif r < 0.85:
            parts.append(rng.choice(tags))
        else:
            parts.append(patch())
    return "".join(parts)


def test_fuzz_random_tag_sequences(ref):
    rng = random.Random(20230626)
    texts = [_random_tagged_text(rng) for _ in range(600)]
    assert sum(bool(ref.extract_entities_with_patch_indices(t)) for t in texts) > 200  # the fuzz does reach entities
    for text in texts:
        assert_all_functions_agree(ref, text)


def test_patch_index_to_coordinate_all_corners(ref):
    rng = random.Random(7)
    pairs = [(i, i) for i in range(1024)] + [(rng.randrange(1024), rng.randrange(1024)) for _ in range(20000)]
    pairs += [(0, 1023), (1023, 0), (31, 992), (5000, 7)]
    for n in (32, 16):
        for a, b in pairs:
            assert ours.patch_index_to_coordinate(a, b, n) == ref.patch_index_to_coordinate(a, b, n)


def test_coordinate_to_patch_index_matches(ref):
    rng = random.Random(8)
    boxes = [(0.0, 0.0, 1.0, 1.0), (0.5, 0.5, 0.5000001, 0.6), (0.03125, 0.03125, 0.0625, 0.0625)]
    for _ in range(5000):
        x1, x2 = sorted(rng.random() for _ in range(2))
        y1, y2 = sorted(rng.random() for _ in range(2))
        if x2 > x1 and y2 > y1:
            boxes.append((x1, y1, x2, y2))
    boxes += [(k / 32, k / 32, (k + 1) / 32, (k + 2) / 32) for k in range(30)]
    for box in boxes:
        assert ours.coordinate_to_patch_index(box, 32) == ref.coordinate_to_patch_index(box, 32)
    for bad in [(0.5, 0.1, 0.5, 0.2), (0.1, 0.5, 0.2, 0.4)]:
        with pytest.raises(ValueError, match="x2 > x1"):
            ours.coordinate_to_patch_index(bad, 32)


def test_box_to_patches_and_back():
    """Cells in one row or column come back as the cells' outer edges, others as the cells' centres."""
    one_row = (3 / 32, 5 / 32, 10 / 32, 6 / 32)
    assert ours.coordinate_to_patch_index(one_row, 32) == (5 * 32 + 3, 5 * 32 + 9)
    assert ours.patch_index_to_coordinate(5 * 32 + 3, 5 * 32 + 9, 32) == one_row
    assert ours.coordinate_to_patch_index((0.0, 0.0, 1.0, 1.0), 32) == (0, 1023)
    assert ours.patch_index_to_coordinate(0, 1023, 32) == (1 / 64, 1 / 64, 63 / 64, 63 / 64)
