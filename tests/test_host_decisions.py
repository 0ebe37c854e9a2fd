"""What `generate` decides from the caller's tensors on the host instead of reading the GPU back (each such read
stops the host and, in a new process, starts another CUDA kernel): whether prompts are padded, where the image's
slots are, and how far positions can reach. Each shortcut must give what the general way gives."""

from __future__ import annotations

import pytest
import torch

import kosmos2_cli.model.kosmos2 as model_module
import kosmos2_cli.model.text as text_module
from kosmos2_cli import Kosmos2ForConditionalGeneration
from kosmos2_cli.generation.generate import image_block

trained = pytest.importorskip("trained")


def test_image_block_finds_the_one_block_every_row_shares():
    mask = torch.zeros(3, 10, dtype=torch.long)
    mask[:, 2:6] = 1
    assert image_block(mask, 4) == 2
    assert image_block(mask, 3) is None  # not the image's size
    shifted = mask.clone()
    shifted[1] = torch.roll(mask[1], 1)
    assert image_block(shifted, 4) is None  # rows differ (left padding)
    gap = mask.clone()
    gap[:, 4] = 0
    gap[:, 7] = 1
    assert image_block(gap, 4) is None  # not contiguous
    assert image_block(None, 4) is None


@pytest.fixture(scope="module")
def model(trained_dir):
    return Kosmos2ForConditionalGeneration.from_pretrained(trained_dir)


@torch.no_grad()
def test_image_placed_by_slicing_equals_the_general_placement(model):
    inputs = trained.prompt_inputs(trained.LESSONS[0])
    ids, mask = inputs["input_ids"].repeat(2, 1), inputs["image_embeds_position_mask"].repeat(2, 1)
    image = torch.randn(2, model.config.latent_query_num, model.config.text_config.embed_dim)
    text = model.text_model.model
    positions = model_module.positions_for(ids.ne(1), None, text.padding_idx)
    start = image_block(mask, image.shape[1])
    assert start is not None
    want = text.embed(ids, positions, image, mask)
    got = text.embed(ids, positions, image, mask, image_start=start, max_position=text.padding_idx + ids.shape[1])
    assert torch.equal(got, want)


@torch.no_grad()
def test_generate_never_reads_positions_back(model, monkeypatch, trained_dir):
    """Every position lookup of a generate call (prompt and steps, padded or not) comes with a host-side bound
    that covers the positions it looks up; an unpadded prompt's image is placed by slicing; the answers stay the
    lessons'."""
    from PIL import Image

    from kosmos2_cli import Kosmos2Processor

    seen = []
    original = text_module.TextTransformer.position_embeddings

    def spy(self, position_ids, dtype, check=True, bound=None):
        seen.append((bound, int(position_ids.max())))
        return original(self, position_ids, dtype, check, bound)

    monkeypatch.setattr(text_module.TextTransformer, "position_embeddings", spy)
    placed = []  # the block start each placement was given (None: the general placement, from the mask)
    general = text_module.place_image
    monkeypatch.setattr(text_module, "place_image", lambda *a, **k: placed.append(k.get("start")) or general(*a,
                                                                                                            **k))
    lessons = [lesson for lesson in trained.LESSONS if lesson.task in ("ground", "ask")][:6]
    processor = Kosmos2Processor.from_pretrained(trained_dir)
    batch = processor(text=[lesson.prompt for lesson in lessons], images=[Image.open(lesson.path) for lesson in
                                                                          lessons], return_tensors="pt")
    assert not bool(batch["attention_mask"].all())  # padded: the general placement, the same bound
    ids = model.generate(**batch, max_new_tokens=trained.MAX_NEW_TOKENS)
    prompt = batch["input_ids"].shape[1]
    for row, lesson in zip(ids.tolist(), lessons, strict=True):
        assert [t for t in row[prompt:] if t != 1] == trained.expected(lesson).answer_ids
    assert placed and all(start is None for start in placed)  # the padded batch: the general placement
    placed.clear()
    lesson = trained.LESSONS[0]
    assert model.generate(**trained.prompt_inputs(lesson), max_new_tokens=trained.MAX_NEW_TOKENS)[0].tolist() == (
        trained.expected(lesson).ids)
    assert placed and all(start is not None for start in placed)  # one unpadded prompt: sliced in
    assert seen and all(bound is not None and bound >= largest for bound, largest in seen)
