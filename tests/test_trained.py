"""The tiny trained checkpoint: its lessons are well formed, the reference answers every one exactly with clear
margins, and the cache builds once, atomically."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest
import trained
from trained import LESSONS, MARGIN, TASKS, cached_dir, expected, target_ids

pytestmark = pytest.mark.needs_shared


# --------------------------------------------------------------------------------------------------------------
# The lessons (cheap: tokenizer only)
# --------------------------------------------------------------------------------------------------------------


def test_lessons_cover_every_task_and_several_images(shared_fixtures):
    assert set(TASKS) == {lesson.task for lesson in LESSONS}
    assert len({lesson.key for lesson in LESSONS}) == len(LESSONS)
    captions = [lesson for lesson in LESSONS if lesson.task == "caption"]
    assert len({lesson.image for lesson in captions}) >= 4
    assert len({lesson.target for lesson in captions}) == len(captions)  # the image decides the answer
    for lesson in LESSONS:
        assert lesson.path.is_file()
    ground = [lesson for lesson in LESSONS if lesson.task == "ground"]
    assert any(not lesson.found for lesson in ground)  # "not found"
    assert any("</delimiter_of_multi_objects/>" in lesson.target for lesson in ground)  # two boxes
    # one phrase, placed on one image and not on another
    by_phrase = Counter((lesson.phrase, lesson.found) for lesson in ground)
    assert any((phrase, not found) in by_phrase for phrase, found in by_phrase)
    for lesson in LESSONS:
        assert lesson.phrase is not None or lesson.task != "ground"
        assert lesson.question is not None or lesson.task != "ask"
        assert lesson.cells is not None or lesson.task != "refer"


def test_expected_answers_round_trip_through_the_reference_tokenizer(shared_fixtures):
    from oracle import reference_processor

    processor = reference_processor()
    eos = processor.tokenizer.eos_token_id
    for lesson in LESSONS:
        want = expected(lesson)
        assert want.raw == lesson.raw
        assert want.answer_ids[-1] == eos and eos not in want.answer_ids[:-1]
        assert want.ids[-len(want.answer_ids):] == want.answer_ids
        # the answer decodes back to the target text, tags and all
        decoded = processor.batch_decode([want.ids], skip_special_tokens=True)[0]
        assert processor.post_process_generation(decoded, cleanup_and_extract=False) == lesson.prompt + lesson.target
        caption, entities = processor.post_process_generation(decoded)
        assert (caption, entities) == (want.caption, want.entities)
        if lesson.task == "ground":
            assert bool(entities) == lesson.found
            if lesson.found:
                assert entities[0][0] == lesson.phrase
    assert target_ids("</object>.") == [processor.tokenizer.convert_tokens_to_ids("</object>"), 4]
    with pytest.raises(ValueError, match="reword"):
        target_ids("<phrase>ing</phrase>")


def test_refer_boxes_give_the_prompts_cells(shared_fixtures):
    """`processor(bboxes=[lesson.box])` writes the same prompt as the lesson's (the CLI's `--box` path), and so
    does the pixel box `lesson.box_px(...)` divided by the image size."""
    from oracle import reference_processor
    from PIL import Image

    processor = reference_processor()
    for lesson in (lesson for lesson in LESSONS if lesson.task == "refer"):
        want = processor(text=lesson.prompt)["input_ids"]
        assert processor(text="<grounding><phrase> It</phrase> is", bboxes=[lesson.box])["input_ids"] == want
        with Image.open(lesson.path) as im:
            width, height = im.size
        x1, y1, x2, y2 = lesson.box_px(width, height)
        box = (x1 / width, y1 / height, x2 / width, y2 / height)
        assert processor(text="<grounding><phrase> It</phrase> is", bboxes=[box])["input_ids"] == want


# --------------------------------------------------------------------------------------------------------------
# The checkpoint (trains on a cold cache: a few minutes)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_checkpoint_is_in_the_hub_layout_and_small(trained_dir):
    for name in ("config.json", "model.safetensors", "sentencepiece.bpe.model", "preprocessor_config.json",
                 "tokenizer_config.json", "training.json"):
        assert (trained_dir / name).is_file(), name
    assert (trained_dir / "model.safetensors").stat().st_size < 10_000_000
    config = json.loads((trained_dir / "config.json").read_text())
    assert config["model_type"] == "kosmos-2"
    assert config["latent_query_num"] == 64
    assert config["text_config"]["vocab_size"] == 65037
    assert (config["vision_config"]["image_size"], config["vision_config"]["patch_size"]) == (224, 14)


@pytest.mark.slow
def test_reference_answers_every_lesson_exactly_with_clear_margins(trained_dir):
    model = trained.load_reference(trained_dir)
    reports = trained.check(model, max_new_tokens=128)  # room to run on past a missing EOS
    for report in reports:
        assert report["ok"], report
        assert report["margin"] >= MARGIN, report
    recorded = json.loads((trained_dir / "training.json").read_text())
    assert recorded["min_margin"] == pytest.approx(min(r["margin"] for r in reports), abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["bfloat16", "int8-rounded weights"])
def test_answers_survive_lower_precision(trained_dir, variant):
    """The margins are wide enough that bf16 compute, or weights rounded to int8 per row, change no answer."""
    import torch

    model = trained.load_reference(trained_dir)
    if variant == "bfloat16":
        model = model.to(torch.bfloat16)
    else:
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if weight.dim() == 2 and "position" not in name:
                    scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
                    weight.copy_(torch.round(weight / scale).clamp(-127, 127) * scale)
    for report in trained.check(model):
        assert report["ok"], report
        assert report["margin"] > 2.0, report


@pytest.mark.slow
def test_a_second_call_reuses_the_cache(trained_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(trained, "train_checkpoint", boom)
    weights = trained_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert trained.trained_checkpoint_dir() == trained_dir
    assert weights.stat().st_mtime_ns == before


# --------------------------------------------------------------------------------------------------------------
# The cache's building (cheap: fake builds)
# --------------------------------------------------------------------------------------------------------------


def test_cached_dir_builds_once_and_an_interrupted_build_leaves_nothing(tmp_path):
    def interrupted(folder):
        (folder / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_dir("thing", interrupted, root=tmp_path)
    assert not (tmp_path / "thing").exists()
    assert not list(tmp_path.glob(".thing.building-*"))

    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "whole").write_text("x")

    assert cached_dir("thing", build, root=tmp_path) == tmp_path / "thing"
    assert cached_dir("thing", build, root=tmp_path) == tmp_path / "thing"
    assert len(calls) == 1 and (tmp_path / "thing" / "whole").is_file()


def test_cached_dir_racing_callers_share_one_build(tmp_path):
    calls = []
    barrier = threading.Barrier(4)

    def build(folder):
        calls.append(folder)
        (folder / "whole").write_text("x")

    def racer(results):
        barrier.wait()
        results.append(cached_dir("raced", build, root=tmp_path))

    results: list = []
    threads = [threading.Thread(target=racer, args=(results,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / "raced"] * 4
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raced", "raced.lock"]
