"""The pipeline's task logic: refer's box becomes the reference processor's patch tokens, answers are cut from
their prompts exactly, and a ground phrase is placed only by an `<object>` right after it."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from kosmos2_cli.api import prompts
from kosmos2_cli.api.pipeline import Job, Kosmos2


@pytest.fixture(scope="module")
def processor(shared_fixtures, tmp_path_factory):
    from oracle import write_tokenizer_files

    from kosmos2_cli.processing.processor import Kosmos2Processor

    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(folder)
    return Kosmos2Processor.from_pretrained(folder)


def _boxes(seed: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        width, height = rng.randint(1, 4000), rng.randint(1, 4000)
        x1, x2 = sorted(rng.sample(range(width + 1), 2)) if width > 1 else (0, 1)
        y1, y2 = sorted(rng.sample(range(height + 1), 2)) if height > 1 else (0, 1)
        yield (x1, y1, x2, y2), width, height


def test_refer_box_becomes_the_reference_processors_tokens(shared_fixtures):
    """Pixel boxes (and normalized ones) give the prompt ids the reference's processor makes from `bboxes=`."""
    from oracle import reference_processor

    reference = reference_processor()
    image = Image.new("RGB", (32, 32))
    cases = list(_boxes(0, 150)) + [((0, 0, 10, 10), 10, 10), ((0, 0, 1, 1), 1, 1), ((5, 5, 6, 6), 7, 9),
                                     ((99, 0, 100, 50), 100, 50), ((0, 31, 64, 32), 64, 32)]
    for box, width, height in cases:
        normalized = prompts.normalize_box(box, width, height)
        ours = prompts.refer_prompt(prompts.box_to_cells(normalized))
        theirs = reference(text="<grounding><phrase> It</phrase> is", images=image, bboxes=[[normalized]])
        mine = reference(text=ours, images=image)
        assert mine["input_ids"] == theirs["input_ids"], (box, width, height, ours)
        assert prompts.normalize_box(normalized, width, height, normalized=True) == normalized


def test_answer_is_cut_after_the_prompt_as_the_tokenizer_wrote_it(processor):
    kosmos = Kosmos2(None, processor)
    image = Image.new("RGB", (100, 50))
    job = Job(0, "ask", prompts.ask_prompt("What is ﬁxed  here?"), {})  # "ﬁ" is normalized to "fi"
    asked = "<image>x</image><grounding> Question: What is fixed here? Answer:"
    result = kosmos._result(job, "a.png", image, asked + " The<phrase> fence</phrase><object><patch_index_0000>"
                                                           "<patch_index_1023></object>.", asked)
    assert result.text == "The fence."
    assert [(e.phrase, e.span) for e in result.entities] == [("fence", (4, 9))]
    assert result.entities[0].boxes_px == [(2, 1, 98, 49)]  # cell centres, in pixels


def test_refer_text_is_the_description_alone(processor):
    kosmos = Kosmos2(None, processor)
    prompt = prompts.refer_prompt((33, 990))
    asked = "<image>x</image>" + prompt
    result = kosmos._result(Job(0, "refer", prompt, {}), "a.png", Image.new("RGB", (64, 64)),
                            asked + " a dog next to<phrase> a cat</phrase><object><patch_index_0001>"
                                    "<patch_index_0002></object>.", asked)
    assert result.text == "a dog next to a cat."
    assert [(e.phrase, result.text[slice(*e.span)]) for e in result.entities] == [("a cat", "a cat")]


@pytest.mark.parametrize("continuation, found", [
    ("<object><patch_index_0044><patch_index_0863></object>", True),
    (" <object><patch_index_0044><patch_index_0863></object>", True),
    ("<object><patch_index_0044><patch_index_0863></delimiter_of_multi_objects/><patch_index_0001>"
     "<patch_index_0002></object>", True),
    ("", False),  # end of text at once
    (" is not here<phrase> a dog</phrase><object><patch_index_0044><patch_index_0863></object>", False),
    ("<object><patch_index_0044></object>", False),  # malformed: one corner
])
def test_ground_places_a_phrase_only_right_after_it(processor, continuation, found):
    kosmos = Kosmos2(None, processor)
    prompt = prompts.ground_prompt("a cat")
    result = kosmos._ground_result(Job(0, "ground", prompt, {"phrase": "a cat"}), "a.png",
                                   Image.new("RGB", (1024, 1024)), prompt + continuation)
    assert result.extra["found"] is found
    assert bool(result.entities) is found
    if found:
        assert result.entities[0].boxes_px[0] == (400, 48, 1008, 848)
        assert result.text[slice(*result.entities[0].span)] == "a cat"
