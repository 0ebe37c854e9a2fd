"""int8 gives the same text and boxes as float32 on the checkpoint the reference trained (trained.py)."""

from __future__ import annotations

import pytest
import torch

from kosmos2_cli import Kosmos2ForConditionalGeneration
from kosmos2_cli.model import quant

trained = pytest.importorskip("trained")
pytestmark = pytest.mark.needs_shared


@pytest.fixture(scope="module")
def int8_model(trained_dir):
    model = Kosmos2ForConditionalGeneration.from_pretrained(trained_dir, device="cpu", dtype="int8")
    assert quant.is_quantized(model)
    return model


@pytest.mark.parametrize("lesson", trained.LESSONS, ids=lambda lesson: lesson.key)
def test_int8_answers_every_lesson_exactly(int8_model, lesson):
    from oracle import reference_processor

    processor = reference_processor()
    want = trained.expected(lesson)
    with torch.no_grad():
        ids = int8_model.generate(**trained.prompt_inputs(lesson), max_new_tokens=trained.MAX_NEW_TOKENS)
    assert ids[0].tolist() == want.ids
    decoded = processor.batch_decode(ids, skip_special_tokens=True)[0]
    assert processor.post_process_generation(decoded, cleanup_and_extract=False) == want.raw
    assert processor.post_process_generation(decoded) == (want.caption, want.entities)  # text and boxes


def test_cli_dtype_int8_gives_the_float32_record(trained_dir):
    """`kosmos2 caption --dtype int8`: the same JSON record (text, spans, boxes, pixels) as the default float32."""
    from cli_helpers import invoke, json_lines

    lesson = next(lesson for lesson in trained.LESSONS if lesson.task == "caption")
    records = []
    for dtype in ("float32", "int8"):
        result = invoke(["caption", lesson.path, "--model", trained_dir, "--json", "--device", "cpu", "--dtype", dtype,
                         "--max-new-tokens", str(trained.MAX_NEW_TOKENS)])
        assert result.exit_code == 0, result.stderr
        records.append(json_lines(result.stdout))
    scores = [[e.pop("scores") for e in r[0]["entities"]] for r in records]  # probabilities: int8 moves them
    assert records[0] == records[1]
    assert records[1][0]["raw"] == trained.expected(lesson).raw
    assert scores[1] == [pytest.approx(s, abs=0.05) for s in scores[0]]
