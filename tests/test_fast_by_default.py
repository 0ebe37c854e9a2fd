"""The fast path without asking: `from_pretrained` then `generate` is the fast path (no other call), and the same
object still trains exactly and saves the hub layout unchanged.

(The reference's own gradients on a fast-by-default model are checked in test_api.py's gradient tests, which
load through the same `from_pretrained`.)
"""

from __future__ import annotations

import pytest
import torch

from kosmos2_cli import Kosmos2ForConditionalGeneration
from kosmos2_cli.fast.modules import FastAttention

trained = pytest.importorskip("trained")


def _is_fast(model) -> bool:
    attentions = [m for m in model.modules() if hasattr(m, "q_proj")]
    return model.text_model.model.carry and all(isinstance(m, FastAttention) and m.fused is not None
                                                for m in attentions)


@torch.no_grad()
def test_from_pretrained_then_generate_is_the_fast_path_and_answers_every_lesson(trained_dir):
    model = Kosmos2ForConditionalGeneration.from_pretrained(trained_dir)
    assert _is_fast(model)
    for lesson in trained.LESSONS:
        ids = model.generate(**trained.prompt_inputs(lesson), max_new_tokens=trained.MAX_NEW_TOKENS)
        assert ids[0].tolist() == trained.expected(lesson).ids, lesson.key
    plain = Kosmos2ForConditionalGeneration.from_pretrained(trained_dir, fast=False)
    assert not any(isinstance(m, FastAttention) for m in plain.modules())
    model.unfuse()
    assert not any(isinstance(m, FastAttention) for m in model.modules()) and not model.text_model.model.carry


def _loss(model, lesson):
    inputs = trained.prompt_inputs(lesson)
    ids = torch.tensor([trained.expected(lesson).ids])
    mask = torch.cat([inputs["image_embeds_position_mask"],
                      torch.zeros(1, ids.shape[1] - inputs["input_ids"].shape[1], dtype=torch.long)], dim=1)
    labels = ids.masked_fill(mask.bool(), -100)
    return model(pixel_values=inputs["pixel_values"], input_ids=ids, image_embeds_position_mask=mask,
                 attention_mask=torch.ones_like(ids), labels=labels).loss


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_training_the_fast_model_gives_the_plain_models_gradients_and_steps(trained_dir, mode):
    """With autograd on, every fast module computes as the plain one: the same loss and gradients bit for bit
    (q/k/v included, which the fast path made views of one block), and an optimizer step keeps that block and
    its views one tensor, so inference after training uses the trained weights."""
    fast = Kosmos2ForConditionalGeneration.from_pretrained(trained_dir)
    plain = Kosmos2ForConditionalGeneration.from_pretrained(trained_dir, fast=False)
    fast.train(mode == "train")
    plain.train(mode == "train")
    lesson = trained.LESSONS[0]
    torch.manual_seed(3)
    got = _loss(fast, lesson)
    torch.manual_seed(3)
    want = _loss(plain, lesson)
    assert torch.equal(got, want)
    got.backward()
    want.backward()
    theirs = dict(plain.named_parameters())
    for name, param in fast.named_parameters():
        assert param.grad is not None, name
        assert torch.equal(param.grad, theirs[name].grad), name
    for model in (fast, plain):
        torch.optim.SGD(model.parameters(), lr=0.5).step()
    fast.eval()
    plain.eval()
    attention = fast.text_model.model.layers[0].self_attn
    width = attention.q_proj.weight.shape[0]
    assert torch.equal(attention.fused[0][width: 2 * width], attention.k_proj.weight)
    with torch.no_grad():
        inputs = trained.prompt_inputs(lesson)
        torch.testing.assert_close(fast(**inputs).logits, plain(**inputs).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_saving_the_fast_model_writes_the_plain_checkpoint(trained_dir, tmp_path):
    from safetensors.torch import load_file

    fast = Kosmos2ForConditionalGeneration.from_pretrained(trained_dir)
    fast.save_pretrained(tmp_path)
    saved, original = load_file(tmp_path / "model.safetensors"), load_file(trained_dir / "model.safetensors")
    assert saved.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(saved[key], tensor), key
    again = Kosmos2ForConditionalGeneration.from_pretrained(tmp_path)
    lesson = trained.LESSONS[1]
    ids = again.generate(**trained.prompt_inputs(lesson), max_new_tokens=trained.MAX_NEW_TOKENS)
    assert ids[0].tolist() == trained.expected(lesson).ids
