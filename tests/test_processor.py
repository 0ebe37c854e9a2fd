"""The processor against the reference's Kosmos2Processor: inputs, bboxes, batches, errors, post-processing."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import fixture_images, reference_processor
from PIL import Image
from processor_helpers import assert_same_encoding, our_processor, plain, write_model_dir

from kosmos2_cli.processing.processor import BatchFeature, Kosmos2Processor, normalize_box

SNOWMAN_GENERATION = (
    "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> "
    "warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."
)


@pytest.fixture(scope="module")
def ref(shared_fixtures):
    return reference_processor()


@pytest.fixture(scope="module")
def ours(shared_fixtures):
    return our_processor()


@pytest.fixture(scope="module")
def photos(shared_fixtures):
    small = [Image.open(path) for path in fixture_images()[:3]]
    return [image.resize((image.width // 8, image.height // 8)) for image in small]


def both(ref, ours, **kwargs):
    want = ref(**kwargs)
    got = ours(**kwargs)
    assert_same_encoding(want, got)
    return want, got


# --- inputs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("return_tensors", [None, "pt", "np"])
def test_prompts_with_an_image(ref, ours, photos, return_tensors):
    for prompt in [
        "<grounding> An image of",
        "<grounding> Describe this image in detail:",
        "<grounding><phrase> a snowman</phrase>",
        "<grounding><phrase> It</phrase><object><patch_index_0044><patch_index_0863></object> is",
        "<grounding> Question: What is special about this image? Answer:",
        "  An image of  ",
        "",
    ]:
        both(ref, ours, images=photos[0], text=prompt, return_tensors=return_tensors)


@pytest.mark.parametrize("return_tensors", [None, "pt", "np"])
def test_text_only_and_image_only(ref, ours, photos, return_tensors):
    both(ref, ours, text="<grounding> An image of", return_tensors=return_tensors)
    both(ref, ours, text=["<grounding> a", "b c d e"], padding=True, return_tensors=return_tensors)
    both(ref, ours, images=photos, return_tensors=return_tensors)
    both(ref, ours, images=photos[1], return_tensors=return_tensors)
    if return_tensors is None:
        both(ref, ours, text=["<grounding> a", "b c d e"])


@pytest.mark.parametrize("return_tensors", [None, "pt", "np"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batches_of_images_and_texts(ref, ours, photos, return_tensors, padding_side):
    texts = ["<grounding> An image of", "<grounding> Describe this image in detail: a long one", "<grounding>"]
    old = ref.tokenizer.padding_side, ours.tokenizer.padding_side
    try:
        ref.tokenizer.padding_side = ours.tokenizer.padding_side = padding_side
        for padding in (False, True):
            both(ref, ours, images=photos, text=texts, padding=padding, return_tensors=return_tensors)
        both(ref, ours, text=texts, padding=True, return_tensors=return_tensors)
    finally:
        ref.tokenizer.padding_side, ours.tokenizer.padding_side = old


def test_padding_side_argument(ours, photos):
    texts = ["a", "b c d"]
    left = ours(images=photos[:2], text=texts, padding_side="left")
    assert left["attention_mask"][0][0] == 0 and left["image_embeds_position_mask"][0][:2] == [0, 0]
    right = ours(text=texts, padding=True, padding_side="right")
    assert right["attention_mask"][0][-1] == 0


@pytest.mark.parametrize("return_tensors", [None, "pt", "np"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_argument_against_the_reference(ref, ours, photos, return_tensors, side):
    texts = ["a", "b c d e f"]
    for padding in (True, "longest"):
        both(ref, ours, text=texts, padding=padding, padding_side=side, return_tensors=return_tensors)
    for options in ({}, {"add_eos_token": True}, {"num_image_tokens": 8, "padding": True}):
        want = ref(images=photos[:2], text=texts, padding_side=side, return_tensors=return_tensors, **options)
        got = ours(images=photos[:2], text=texts, padding_side=side, return_tensors=return_tensors, **options)
        if side == "right":
            assert_same_encoding(want, got)
            continue
        # A deliberate difference: with images the reference pads by its tokenizer's `padding_side` attribute
        # and ignores the argument (always right here); we honour the argument. Same rows, moved.
        assert plain(want["attention_mask"])[0][-1] == 0 and plain(got["attention_mask"])[0][0] == 0
        for key in ("input_ids", "attention_mask", "image_embeds_position_mask"):
            for a, b, mask in zip(plain(want[key]), plain(got[key]), plain(want["attention_mask"]), strict=True):
                assert b == a[sum(mask):] + a[: sum(mask)], key


@pytest.mark.parametrize(
    "options",
    [
        {"add_special_tokens": False},
        {"add_eos_token": True},
        {"add_special_tokens": False, "add_eos_token": True},
        {"num_image_tokens": 8},
        {"num_image_tokens": 8, "first_image_token_id": 100},
        {"num_image_tokens": 0},
    ],
)
def test_options(ref, ours, photos, options):
    both(ref, ours, images=photos[0], text="<grounding> An image of", **options)
    both(ref, ours, images=photos[:2], text=["<grounding> An image of", "x"], return_tensors="pt", **options)
    both(ref, ours, text="<grounding> An image of", **options)


BBOX_CASES = [
    ("<grounding><phrase> a snowman</phrase> is", [(44, 863)]),
    ("<grounding><phrase> a snowman</phrase> is", [(0.390625, 0.046875, 0.984375, 0.828125)]),
    ("<grounding><phrase> two dogs</phrase> play", [[(1, 500), (600, 1023)]]),
    ("<grounding><phrase> dogs</phrase> and<phrase> a ball</phrase>", [[(0.1, 0.2, 0.3, 0.4), (3, 4)], None]),
    ("<grounding><phrase> dogs</phrase> and<phrase> a ball</phrase>", [None, (0.0, 0.0, 1.0, 1.0)]),
    ("<grounding><phrase> It</phrase> is", [[]]),
    ("<grounding><phrase> It</phrase> is", []),
    ("<grounding><phrase> It</phrase> is", None),
    ("<phrase>a</phrase><phrase>b</phrase><phrase>c</phrase>", [(1, 2), (0.5, 0.5, 0.75, 0.9), [(7, 8)]]),
    ("<phrase> tiny</phrase>", [(0.5, 0.5, 0.5000001, 0.5000001)]),
    ("<phrase> edges</phrase>", [(0.03125, 0.0625, 0.96875, 1.0)]),
    ("<phrase> big index</phrase>", [(5000, 12)]),
]


@pytest.mark.parametrize(("text", "bboxes"), BBOX_CASES)
def test_bboxes(ref, ours, photos, text, bboxes):
    both(ref, ours, images=photos[0], text=text, bboxes=bboxes)
    both(ref, ours, text=text, bboxes=bboxes)
    assert ref.preprocess_examples(text, None, bboxes) == ours.preprocess_examples(text, None, bboxes)


def test_bboxes_in_a_batch(ref, ours, photos):
    texts = [text for text, _ in BBOX_CASES[:3]]
    boxes = [bboxes for _, bboxes in BBOX_CASES[:3]]
    both(ref, ours, images=photos, text=texts, bboxes=boxes, return_tensors="pt")
    both(ref, ours, images=photos, text=texts, bboxes=[None, boxes[1], None])


def _errors(ref, ours, **kwargs) -> tuple[str, str]:
    with pytest.raises(ValueError) as want:
        ref(**kwargs)
    with pytest.raises(ValueError) as got:
        ours(**kwargs)
    return str(want.value), str(got.value)


def test_validation_errors_like_the_reference(ref, ours, photos):
    """Same conditions, same messages; the box-format one names the offending box too."""
    same = [
        {},
        {"images": photos[:2], "text": "one text"},
        {"text": "<phrase>a</phrase>", "bboxes": [(1, 2), (3, 4)]},
        {"text": "<phrase>a</phrase>", "bboxes": (1, 2)},
        {"text": ["<phrase>a</phrase>", "b"], "bboxes": ([(1, 2)], None)},
        {"text": ["<phrase>a</phrase>", "b"], "bboxes": [[(1, 2)]]},
    ]
    for kwargs in same:
        want, got = _errors(ref, ours, **kwargs)
        assert got == want
    for bad in [[(1, 2, 3)], [(0, 0, 1, 1)], [[(1, 2), None]], [[1, 2]], [(1.0, 2.0)], [np.array([1, 2])]]:
        want, got = _errors(ref, ours, text="<phrase>a</phrase>", bboxes=bad)
        assert "tuple containing 2 integers or 4 float" in want and "tuple of 2 ints" in got and "got" in got
    want, got = _errors(ref, ours, text="<phrase>a</phrase>", bboxes=[(0.5, 0.5, 0.4, 0.6)])
    assert "x2 > x1" in want and "x2 > x1" in got


def test_batch_feature(ours, photos):
    inputs = ours(images=photos[0], text="<grounding> An image of", return_tensors="pt")
    assert isinstance(inputs, BatchFeature) and inputs.input_ids is inputs["input_ids"]
    with pytest.raises(AttributeError):
        _ = inputs.nothing
    half = inputs.to(torch.float16)
    assert half.pixel_values.dtype == torch.float16 and half.input_ids.dtype == torch.long
    assert inputs.to("cpu").attention_mask.device.type == "cpu"


# --- outputs ------------------------------------------------------------------------------------------------------


def _generated_ids(processor, photo) -> list[int]:
    """What `generate` returns for the snowman example: the prompt's ids, then the generated ones."""
    prompt = processor(images=photo, text="<grounding> An image of")["input_ids"]
    tail = SNOWMAN_GENERATION[len("<grounding> An image of") : -1]
    tokenizer = processor.tokenizer
    # The model writes the final "." as the piece "." (encoding text would start a new word: "▁.").
    return prompt + tokenizer.encode(tail, add_special_tokens=False) + tokenizer.convert_tokens_to_ids([".", "</s>"])


def test_snowman_example_end_to_end(ref, ours, photos):
    ids = _generated_ids(ours, photos[0])
    assert ids == _generated_ids(ref, photos[0])
    for skip in (True, False):
        assert ours.batch_decode([ids], skip_special_tokens=skip) == ref.batch_decode([ids], skip_special_tokens=skip)
    text = ours.batch_decode(torch.tensor([ids]), skip_special_tokens=True)[0]
    assert ours.post_process_generation(text, cleanup_and_extract=False) == SNOWMAN_GENERATION
    caption, entities = ours.post_process_generation(text)
    assert caption == "An image of a snowman warming himself by a fire."
    assert entities == [
        ("a snowman", (12, 21), [(0.390625, 0.046875, 0.984375, 0.828125)]),
        ("a fire", (41, 47), [(0.171875, 0.015625, 0.484375, 0.890625)]),
    ]
    assert (caption, entities) == ref.post_process_generation(text)
    batch = torch.tensor([ids, ids])
    assert ours.post_process_image_text_to_text(batch) == ref.post_process_image_text_to_text(batch)
    assert ours.post_process_image_text_to_text(batch, skip_special_tokens=False) == (
        ref.post_process_image_text_to_text(batch, skip_special_tokens=False)
    )
    assert ours.decode(ids) == ref.decode(ids)


@pytest.mark.parametrize(
    "text",
    [
        SNOWMAN_GENERATION,
        "no image part " + SNOWMAN_GENERATION,
        "<image>x</image><image>y</image> two images" + SNOWMAN_GENERATION,
        "</image>",
        "",
    ],
)
def test_post_process_generation(ref, ours, text):
    assert ours.post_process_generation(text) == ref.post_process_generation(text)
    assert ours.post_process_generation(text, cleanup_and_extract=False) == (
        ref.post_process_generation(text, cleanup_and_extract=False)
    )


# --- boxes for `refer` --------------------------------------------------------------------------------------------


def test_pixel_box_to_patch_tokens(ref, ours):
    cases = [((0, 0, 800, 600), (800, 600)), ((100, 20, 700, 500), (800, 600)), ((0, 0, 1, 1), (1, 1)),
             ((10.5, 3.25, 11, 4), (1200, 602)), ((799, 599, 800, 600), (800, 600))]
    for box, size in cases:
        normalized = tuple(v / size[i % 2] for i, v in enumerate(box))
        want = ref._convert_bbox_to_patch_index_tokens(tuple(float(v) for v in normalized))
        assert ours.box_to_patch_index_tokens(box, size) == want
        assert ours.box_to_patch_index_tokens(normalized) == want
        assert ours.object_tokens(box, size) == f"<object>{want[0]}{want[1]}</object>"
    assert ours.box_to_patch_index_tokens((0.390625, 0.046875, 0.984375, 0.828125)) == (
        "<patch_index_0044>", "<patch_index_0863>",
    )


@pytest.mark.parametrize(
    ("box", "size", "match"),
    [
        ((10, 10, 5, 20), (100, 100), "x2 > x1"),
        ((10, 10, 20, 10), (100, 100), "y2 > y1"),
        ((10, 10, 120, 20), (100, 100), "outside the 100x100 image"),
        ((-1, 10, 20, 20), (100, 100), "outside"),
        ((0.1, 0.1, 1.5, 0.2), None, "outside 0..1"),
        ((1, 2, 3), (100, 100), "4 numbers"),
        (("a", 2, 3, 4), (100, 100), "4 numbers"),
        ((float("nan"), 2, 3, 4), (100, 100), "finite"),
        ((1, 2, 3, 4), (0, 100), "positive"),
    ],
)
def test_bad_boxes(box, size, match):
    with pytest.raises(ValueError, match=match):
        normalize_box(box, size)


# --- loading ------------------------------------------------------------------------------------------------------


def test_from_pretrained_folder(tmp_path, ref, photos):
    folder = write_model_dir(tmp_path / "model", {"processor_class": "Kosmos2Processor", "use_square_size": True})
    processor = Kosmos2Processor.from_pretrained(folder)
    assert processor.num_patch_index_tokens == 1024 and len(processor.tokenizer) == 65037
    assert_same_encoding(ref(images=photos[0], text="a"), processor(images=photos[0], text="a"))
    bare = Kosmos2Processor.from_pretrained(write_model_dir(tmp_path / "bare"))
    assert_same_encoding(ref(images=photos[0], text="a"), bare(images=photos[0], text="a"))


def test_from_pretrained_repo_id_goes_through_the_hub(tmp_path, monkeypatch, shared_fixtures):
    folder = write_model_dir(tmp_path / "cache")
    calls = []

    def resolve_model_dir(name_or_path, revision=None):
        calls.append((name_or_path, revision))
        return folder

    monkeypatch.setitem(sys.modules, "kosmos2_cli.model.hub",
                        types.SimpleNamespace(resolve_model_dir=resolve_model_dir))
    processor = Kosmos2Processor.from_pretrained("microsoft/kosmos-2-patch14-224", revision="abc")
    assert calls == [("microsoft/kosmos-2-patch14-224", "abc")]
    assert len(processor.tokenizer) == 65037


def test_importing_the_processor_does_not_import_transformers():
    code = (
        "import sys, kosmos2_cli.processing.processor, kosmos2_cli.processing.images, "
        "kosmos2_cli.processing.postprocess; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'tokenizers')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    src = Path(__file__).resolve().parents[1] / "src"
    result = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(src)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_model_input_names(ref, ours):
    assert ours.model_input_names == list(ref.model_input_names)
    assert plain(ours(text="a")["input_ids"]) == [0, 10]
