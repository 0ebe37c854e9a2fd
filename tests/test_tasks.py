"""TaskSpec: argument checks before anything loads, the pipeline jobs, one ground record per image, resume keys."""

from __future__ import annotations

import json

import pytest

from kosmos2_cli.api.prompts import PromptError
from kosmos2_cli.api.results import Entity, Failure, Result
from kosmos2_cli.api.tasks import TaskSpec, merge_ground, record_key, spec_key


def test_prompts_of_the_model_card():
    assert TaskSpec.build("caption").prompt_texts == ("<grounding> An image of",)
    assert TaskSpec.build("caption", detailed=True).prompt_texts == ("<grounding> Describe this image in detail:",)
    assert TaskSpec.build("ask", question=" What  is it? ").prompt_texts == (
        "<grounding> Question: What is it? Answer:",)
    spec = TaskSpec.build("ground", phrases=["a dog", "  a   red car "])
    assert spec.phrases == ("a dog", "a red car")
    assert spec.prompt_texts == ("<grounding><phrase> a dog</phrase>", "<grounding><phrase> a red car</phrase>")


def test_repeated_phrases_are_asked_once():
    assert TaskSpec.build("ground", phrases=["a dog", "a  dog", "a cat"]).phrases == ("a dog", "a cat")


@pytest.mark.parametrize("args, message", [
    (dict(task="ground", phrases=[]), "at least one phrase$"),
    (dict(task="ground", phrases=["a dog", "  "]), "phrase is empty"),
    (dict(task="ground", phrases=["<phrase>x</phrase>"]), "must not contain tags"),
    (dict(task="ask", question=""), "question is empty"),
    (dict(task="refer"), "needs a box x1,y1,x2,y2$"),
    (dict(task="refer", box="1,2,3"), "four numbers"),
    (dict(task="refer", box="a,b,c,d"), "four numbers"),
    (dict(task="refer", box="1,2,3,nan"), "four numbers"),
    (dict(task="refer", box="10,10,5,20"), "x1 < x2"),
    (dict(task="refer", box="10,10,20,10"), "y1 < y2"),
    (dict(task="refer", box="-1,0,5,5"), "not inside"),
    (dict(task="refer", box="0.1,0.1,1.5,0.5", normalized=True), "not inside 0..1"),
    (dict(task="draw"), "unknown task"),
])
def test_bad_arguments_fail_before_any_image(args, message):
    with pytest.raises(PromptError, match=message) as caught:
        TaskSpec.build(args.pop("task"), **args)
    assert "--" not in str(caught.value)  # the API's words: the CLI adds its flags (cli/errors.py ADVICE)


def test_box_is_checked_against_each_image():
    spec = TaskSpec.build("refer", box="10, 20, 300 400")  # commas or spaces
    assert spec.box == (10.0, 20.0, 300.0, 400.0)
    spec.check_image(300, 400)
    with pytest.raises(PromptError, match="not inside the 299x400 image"):
        spec.check_image(299, 400)
    TaskSpec.build("refer", box="0,0,1,1", normalized=True).check_image(5, 5)


def _ground_result(phrase: str, boxes: list) -> Result:
    entities = [Entity(phrase, (0, len(phrase)), boxes, [(1, 2, 3, 4)] * len(boxes))] if boxes else []
    return Result("a.png", 10, 20, "ground", f"<grounding><phrase> {phrase}</phrase>", phrase, entities,
                  f"<grounding><phrase> {phrase}</phrase>", {"phrase": phrase, "found": bool(boxes)})


def test_merge_ground_one_record_with_spans_into_text():
    merged = merge_ground([_ground_result("a dog", [(0.1, 0.2, 0.3, 0.4)]), _ground_result("a cat", []),
                           _ground_result("two birds", [(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)])])
    assert merged.text == "a dog; a cat; two birds"
    assert merged.extra == {"found": {"a dog": True, "a cat": False, "two birds": True}}
    assert [e.phrase for e in merged.entities] == ["a dog", "two birds"]
    for entity in merged.entities:
        start, end = entity.span
        assert merged.text[start:end] == entity.phrase
    assert len(merged.entities[1].boxes) == 2
    assert merged.prompt.splitlines() == ["<grounding><phrase> a dog</phrase>", "<grounding><phrase> a cat</phrase>",
                                          "<grounding><phrase> two birds</phrase>"]
    assert len(merged.raw.splitlines()) == 3


def test_record_carries_the_task_arguments():
    spec = TaskSpec.build("ground", phrases=["a cat"])
    record = spec.record([_ground_result("a cat", [])]).to_dict()
    assert record["found"] == {"a cat": False} and record["entities"] == []
    assert record["phrases"] == ["a cat"]
    failure = spec.failure_record(Failure("b.png", "b.png: no such file", "ground"))
    assert failure == {"image": "b.png", "error": "b.png: no such file", "task": "ground", "phrases": ["a cat"]}


@pytest.mark.parametrize("spec", [
    TaskSpec.build("caption"), TaskSpec.build("caption", detailed=True), TaskSpec.build("ask", question="Why?"),
    TaskSpec.build("ground", phrases=["a", "b"]), TaskSpec.build("refer", box="1,2,3,4"),
    TaskSpec.build("refer", box="0.1,0.2,0.3,0.4", normalized=True),
])
def test_resume_key_survives_the_json_round_trip(spec):
    record = json.loads(json.dumps(spec.failure_record(Failure("x/y.png", "boom", spec.task))))
    assert record_key(record) == spec_key(spec, "x/y.png")


def test_resume_key_tells_queries_apart():
    keys = {spec_key(spec, "a.png") for spec in [
        TaskSpec.build("caption"), TaskSpec.build("caption", detailed=True), TaskSpec.build("ask", question="Why?"),
        TaskSpec.build("ask", question="How?"), TaskSpec.build("ground", phrases=["a"]),
        TaskSpec.build("ground", phrases=["a", "b"]), TaskSpec.build("refer", box="1,2,3,4"),
        TaskSpec.build("refer", box="0.1,0.2,0.3,0.4", normalized=True),
    ]}
    assert len(keys) == 8
    assert spec_key(TaskSpec.build("caption"), "a.png") != spec_key(TaskSpec.build("caption"), "b.png")
    assert record_key({"image": "a.png"}) is None and record_key({"task": "caption"}) is None
