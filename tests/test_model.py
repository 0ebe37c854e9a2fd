"""Our model against the reference on the same random weights: logits, cached decoding, greedy, beams, batches."""

from __future__ import annotations

import pytest
import torch
from oracle import IMAGES, fixture_images, reference_processor, save_reference_checkpoint, tiny_config
from PIL import Image

from kosmos2_cli import Kosmos2ForConditionalGeneration

# Odd widths, head counts and depths; latent_query_num must match the processor's num_image_tokens.
CONFIGS = {
    "w36h3l3": dict(text=dict(embed_dim=36, attention_heads=3, ffn_dim=70, layers=3), latent_query_num=8),
    "w50h5l2": dict(
        text=dict(embed_dim=50, attention_heads=5, ffn_dim=46, layers=2),
        vision=dict(hidden_size=30, num_attention_heads=2, intermediate_size=50, num_hidden_layers=3),
        latent_query_num=5,
    ),
    "w64h8l4": dict(
        text=dict(embed_dim=64, attention_heads=8, ffn_dim=128, layers=4),
        vision=dict(hidden_size=48, num_attention_heads=6, intermediate_size=64, num_hidden_layers=1),
        latent_query_num=12,
    ),
}


# The reference insists on an image input even when its cache already holds the image; it then ignores it.
IGNORED = torch.zeros(1)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory, shared_fixtures):
    """(reference model, our model loaded from the reference's saved checkpoint, latent_query_num)."""
    spec = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    ref = save_reference_checkpoint(folder, tiny_config(**spec), seed=len(request.param))
    ours = Kosmos2ForConditionalGeneration.from_pretrained(folder)
    return ref, ours, spec["latent_query_num"]


def inputs(text: str, image: str, queries: int, **kw):
    return reference_processor()(
        text=text, images=Image.open(IMAGES / image), return_tensors="pt", num_image_tokens=queries, **kw
    )


@torch.no_grad()
def test_prefill_and_cached_decode_logits_match(pair):
    ref, ours, queries = pair
    batch = inputs("<grounding> An image of<phrase> a snowman</phrase>", "snowman.png", queries)
    r = ref(**batch, use_cache=True)
    o = ours(**batch, use_cache=True)
    assert torch.allclose(o.logits, r.logits, atol=1e-4, rtol=0), (o.logits - r.logits).abs().max()
    mask = batch["attention_mask"]
    r_cache, o_cache = r.past_key_values, o.past_key_values
    token = r.logits[:, -1:].argmax(-1)
    for _ in range(6):  # cached decode steps, fed the reference's greedy tokens
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        r = ref(input_ids=token, attention_mask=mask, past_key_values=r_cache, use_cache=True, image_embeds=IGNORED)
        o = ours(input_ids=token, attention_mask=mask, past_key_values=o_cache, use_cache=True)
        assert torch.allclose(o.logits, r.logits, atol=1e-4, rtol=0), (o.logits - r.logits).abs().max()
        r_cache = r.past_key_values
        token = r.logits[:, -1:].argmax(-1)


@torch.no_grad()
def test_greedy_tokens_identical_on_fixture_images(pair):
    ref, ours, queries = pair
    outputs = set()
    for path in fixture_images()[:3]:
        batch = inputs("<grounding> An image of", path.name, queries)
        expected = ref.generate(**batch, max_new_tokens=34, do_sample=False, min_new_tokens=34)
        got = ours.generate(**batch, max_new_tokens=34, min_new_tokens=34)
        assert got.shape[1] - batch["input_ids"].shape[1] == 34
        assert torch.equal(got, expected), path.name
        outputs.add(tuple(got[0].tolist()))
    assert len(outputs) > 1, "the image should change the answer"


@torch.no_grad()
def test_beam_search_matches(pair):
    ref, ours, queries = pair
    batch = inputs("<grounding> An image of", "two_dogs.jpg", queries)
    expected = ref.generate(**batch, max_new_tokens=16, num_beams=3, do_sample=False)
    got = ours.generate(**batch, max_new_tokens=16, num_beams=3)
    assert torch.equal(got, expected)
    greedy = ours.generate(**batch, max_new_tokens=16)
    assert not torch.equal(got, greedy), "beam search should find something greedy does not"


@torch.no_grad()
def test_sampling_with_seed_matches_reference_rng(pair):
    ref, ours, queries = pair
    batch = inputs("<grounding> Describe this image in detail:", "corgi.jpg", queries)
    torch.manual_seed(1234)
    expected = ref.generate(**batch, max_new_tokens=20, do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    got = ours.generate(**batch, max_new_tokens=20, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=1234)
    assert torch.equal(got, expected[:, : got.shape[1]])
    again = ours.generate(**batch, max_new_tokens=20, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=1234)
    assert torch.equal(got, again)


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_alone(pair, side):
    ref, ours, queries = pair
    texts = ["<grounding> An image of", "<grounding> Question: What is the dog doing in the picture? Answer:"]
    images = ["two_dogs.jpg", "snowman.png"]
    processor = reference_processor()
    processor.tokenizer.padding_side = side
    try:
        batch = processor(
            text=texts, images=[Image.open(IMAGES / name) for name in images], return_tensors="pt",
            num_image_tokens=queries, padding=True,
        )
    finally:
        processor.tokenizer.padding_side = "right"
    assert batch["attention_mask"].min() == 0, "the prompts should differ in length"
    together = ours.generate(**batch, max_new_tokens=20)
    prompt = batch["input_ids"].shape[1]
    for row, (text, image) in enumerate(zip(texts, images, strict=True)):
        alone = inputs(text, image, queries)
        expected = ref.generate(**alone, max_new_tokens=20, do_sample=False)[0, alone["input_ids"].shape[1]:]
        new = together[row, prompt:]
        assert torch.equal(new[: len(expected)], expected)
        assert (new[len(expected):] == 1).all(), "a finished row is filled with padding"


@torch.no_grad()
def test_stop_token_ends_a_row(pair):
    _, ours, queries = pair
    batch = inputs("<grounding> An image of", "snowman.png", queries)
    free = ours.generate(**batch, max_new_tokens=12)[0, batch["input_ids"].shape[1]:]
    stop = int(free[3])
    first = free.tolist().index(stop)
    stopped = ours.generate(**batch, max_new_tokens=12, stop_token_ids=[stop])[0, batch["input_ids"].shape[1]:]
    assert stopped.tolist() == free[: first + 1].tolist()


@torch.no_grad()
def test_image_embeds_instead_of_pixels(pair):
    _, ours, queries = pair
    batch = inputs("<grounding> An image of", "six_planes.png", queries)
    embeds = ours.get_image_features(batch["pixel_values"])
    direct = ours.generate(**batch, max_new_tokens=10)
    cached = ours.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_embeds=embeds,
        image_embeds_position_mask=batch["image_embeds_position_mask"], max_new_tokens=10,
    )
    assert torch.equal(direct, cached)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_reference_and_stays_close(dtype, tmp_path, shared_fixtures):
    from transformers import Kosmos2ForConditionalGeneration as Reference

    # A moderate init: the x50 weights of the other tests make the net chaotic, so any rounding is amplified.
    config = tiny_config(**CONFIGS["w36h3l3"])
    save_reference_checkpoint(tmp_path, config, text_scale=5, projection_scale=5, vision_scale=5)
    full = Kosmos2ForConditionalGeneration.from_pretrained(tmp_path)
    half = Kosmos2ForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype)
    ref_half = Reference.from_pretrained(str(tmp_path), dtype=dtype).eval()
    assert half.dtype == dtype and half.device.type == "cpu"
    batch = inputs("<grounding> An image of", "snowman.png", 8)
    want = full(**batch).logits[0, -1]
    got = half(**batch).logits[0, -1].float()
    ref_got = ref_half(**batch).logits[0, -1].float()
    assert (got - want).norm() / want.norm() < 0.03
    assert (got - ref_got).norm() / ref_got.norm() < 1e-2
    tokens = half.generate(**batch, max_new_tokens=8)
    assert tokens.shape[1] > batch["input_ids"].shape[1]


@torch.no_grad()
def test_fixed_shape_decoding_and_fused_projections_change_nothing(pair, monkeypatch):
    """What the CUDA graph replays (attention over the whole fixed-size cache) and fused q/k/v, run on CPU."""
    import kosmos2_cli.generation.generate as generation
    from kosmos2_cli.fast.modules import FastAttention

    _, ours, queries = pair
    ours.unfuse()  # from_pretrained puts it on the fast path: start from the plain modules
    batch = inputs("<grounding> An image of", "snowman.png", queries)
    plain = ours.generate(**batch, max_new_tokens=24)
    plain_beams = ours.generate(**batch, max_new_tokens=10, num_beams=3)
    original = generation.Decoder.__init__

    def fixed_shape(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.static = True

    monkeypatch.setattr(generation.Decoder, "__init__", fixed_shape)
    ours.workspace.clear()
    assert torch.equal(ours.generate(**batch, max_new_tokens=24), plain)
    assert torch.equal(ours.generate(**batch, max_new_tokens=10, num_beams=3), plain_beams)
    decoder = next(iter(ours.workspace.decoders.values()))
    assert decoder.cache.static
    monkeypatch.undo()
    ours.workspace.clear()
    logits = ours(**batch).logits
    ours.fuse_for_inference()
    attention = ours.text_model.model.layers[0].self_attn
    assert isinstance(attention, FastAttention) and attention.fused is not None
    assert torch.allclose(ours(**batch).logits, logits, atol=1e-4, rtol=1e-5)
    assert torch.equal(ours.generate(**batch, max_new_tokens=24), plain)
