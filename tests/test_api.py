"""The model API beyond generation, against the reference on the same weights: Kosmos2Model's outputs and hidden
states, cached image embeddings, incremental decoding, the training loss and its gradients, dropout in training
mode, a fine-tuning step, interpolated position encodings, the released config's shapes, and saving."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from oracle import IMAGES, RELEASED_PREPROCESSOR_CONFIG, reference_processor, save_reference_checkpoint, tiny_config
from PIL import Image
from processor_helpers import our_processor

from kosmos2_cli import Kosmos2Config, Kosmos2ForConditionalGeneration, Kosmos2Model
from kosmos2_cli.model.outputs import Kosmos2VisionOutput

QUERIES = 8
# Dropout everywhere the reference has it, so that training mode is tested too (eval outputs ignore it).
SPEC = dict(
    text=dict(embed_dim=48, attention_heads=4, ffn_dim=80, layers=3, dropout=0.1, attention_dropout=0.1,
              activation_dropout=0.05),
    vision=dict(hidden_size=40, num_attention_heads=4, intermediate_size=72, num_hidden_layers=2,
                attention_dropout=0.1),
    latent_query_num=QUERIES,
)
SNOWMAN = (
    "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863>"
    "</object> warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>"
)
TEXTS = [SNOWMAN, "<grounding> Describe this image in detail:"]
# The reference insists on an image input even when its cache already holds the image; it then ignores it.
IGNORED = torch.zeros(1)

HS_ATOL = 1e-4
LOSS_ATOL = 1e-5
GRAD_ATOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("api")
    # Moderate weights: varied outputs and gradients of a useful size in every part (x1 leaves the vision
    # encoder's gradients near 1e-6, where any tolerance passes).
    save_reference_checkpoint(path, tiny_config(**SPEC), text_scale=5, vision_scale=5, projection_scale=5)
    return path


@pytest.fixture(scope="module")
def models(folder):
    """(reference Kosmos2Model, ours, reference Kosmos2ForConditionalGeneration, ours), in eval mode."""
    import transformers

    return (
        transformers.Kosmos2Model.from_pretrained(str(folder)).eval(),
        Kosmos2Model.from_pretrained(folder),
        transformers.Kosmos2ForConditionalGeneration.from_pretrained(str(folder)).eval(),
        Kosmos2ForConditionalGeneration.from_pretrained(folder),
    )


def encode(texts=TEXTS, images=("snowman.png", "two_dogs.jpg"), **kwargs):
    """Our processor's tensors (the processor tests prove them equal to the reference's)."""
    pictures = [Image.open(IMAGES / name) for name in images]
    single = isinstance(texts, str)
    return dict(our_processor()(
        text=texts, images=pictures[0] if single else pictures[: len(texts)], return_tensors="pt",
        num_image_tokens=QUERIES, **kwargs,
    ))


def labels_for(batch: dict) -> torch.Tensor:
    """The input ids as labels, -100 on padding, `<s>` and the image slots: where there is nothing to predict.

    `<s>` matters in a left-padded row: it would be predicted from a padding position, whose state is not
    defined alike (see `close`)."""
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[batch["input_ids"] == 0] = -100
    labels[batch["image_embeds_position_mask"] == 1] = -100
    return labels


def close(got: torch.Tensor, want: torch.Tensor, atol: float, where: torch.Tensor | None = None) -> None:
    """Within `atol`; `where` (batch, length) limits the comparison to real tokens (padding states are not
    defined alike: the reference lets a padding query attend to nothing, we let it see itself)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    if where is not None:
        got, want = got[where.bool()], want[where.bool()]
    diff = (got - want).abs().max().item()
    assert diff <= atol, diff


# --- Kosmos2Model: outputs and hidden states ------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("case", ["snowman_eos", "padded_left", "padded_right"])
def test_model_hidden_states_match_reference(models, shared_fixtures, case):
    ref, ours, _, _ = models
    if case == "snowman_eos":
        batch = encode(SNOWMAN, add_eos_token=True)
    else:
        batch = encode(padding_side=case.split("_")[1])
        assert batch["attention_mask"].min() == 0
    want = ref(**batch, output_hidden_states=True)
    got = ours(**batch, output_hidden_states=True)
    real = batch["attention_mask"]

    close(got.last_hidden_state, want.last_hidden_state, HS_ATOL, real)
    layers = ours.config.text_config.layers
    assert len(got.hidden_states) == len(want.hidden_states) == layers + 1
    for mine, theirs in zip(got.hidden_states, want.hidden_states, strict=True):
        close(mine, theirs, HS_ATOL, real)
    # The convention: the embeddings first, the last entry after the final LayerNorm.
    assert got.hidden_states[-1] is got.last_hidden_state
    assert not torch.allclose(got.hidden_states[-2], got.hidden_states[-1])

    image = got.image_outputs
    assert isinstance(image, Kosmos2VisionOutput) and got.vision_model_output is image
    close(image.last_hidden_state, want.image_outputs.last_hidden_state, HS_ATOL)
    close(image.pooler_output, want.image_outputs.pooler_output, HS_ATOL)
    assert got.image_embeds is image.pooler_output
    vision_layers = ours.config.vision_config.num_hidden_layers
    assert len(image.hidden_states) == len(want.image_outputs.hidden_states) == vision_layers + 1
    for mine, theirs in zip(image.hidden_states, want.image_outputs.hidden_states, strict=True):
        close(mine, theirs, HS_ATOL)
    assert image.hidden_states[-1] is image.last_hidden_state  # the vision tuple's last entry is not normed


@torch.no_grad()
def test_causal_lm_hidden_states_and_logits_match_reference(models, shared_fixtures):
    _, _, ref, ours = models
    batch = encode(SNOWMAN, add_eos_token=True)
    want = ref(**batch, output_hidden_states=True)
    got = ours(**batch, output_hidden_states=True)
    close(got.logits, want.logits, HS_ATOL)
    assert len(got.hidden_states) == len(want.hidden_states)
    for mine, theirs in zip(got.hidden_states, want.hidden_states, strict=True):
        close(mine, theirs, HS_ATOL)
    for mine, theirs in zip(got.image_outputs.hidden_states, want.image_outputs.hidden_states, strict=True):
        close(mine, theirs, HS_ATOL)
    plain = ours(**batch)
    assert plain.hidden_states is None and plain.image_outputs.hidden_states is None


@torch.no_grad()
def test_outputs_access_and_defaults(models, shared_fixtures):
    _, ours, _, _ = models
    batch = encode(SNOWMAN)
    out = ours(**batch)
    # use_cache defaults to the config's (True), as the reference's; the cache has both names.
    assert out.past_key_values is not None and out.cache is out.past_key_values
    assert out.keys() == ["last_hidden_state", "past_key_values", "image_embeds", "image_outputs"]
    assert out[0] is out["last_hidden_state"] is out.last_hidden_state
    assert "hidden_states" not in out and out.vision_hidden_states is None
    assert ours(**batch, use_cache=False).past_key_values is None
    as_tuple = ours(**batch, use_cache=False, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)
    ours.config.extra["output_hidden_states"] = True  # the config's flag is the default, as in the reference
    try:
        assert len(ours(**batch).hidden_states) == ours.config.text_config.layers + 1
    finally:
        del ours.config.extra["output_hidden_states"]
    with pytest.raises(ValueError, match="pixel_values or image_embeds"):
        ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(TypeError, match="KVCache"):
        ours(**batch, past_key_values=((torch.zeros(1), torch.zeros(1)),))


# --- image embeddings computed once ---------------------------------------------------------------------------


@torch.no_grad()
def test_image_embeds_skip_the_image_encoder(models, shared_fixtures, monkeypatch):
    ref, ours, _, ours_lm = models
    batch = encode()
    embeds = ours.get_image_features(batch["pixel_values"])
    close(embeds, ref.get_image_features(batch["pixel_values"]).pooler_output, HS_ATOL)
    as_output = ours.get_image_features(batch["pixel_values"], return_dict=True)
    assert torch.equal(as_output.pooler_output, embeds) and as_output.last_hidden_state.shape[1] == 257
    direct = ours(**batch)
    text_only = {k: v for k, v in batch.items() if k != "pixel_values"}

    def no_encoder(*args, **kwargs):
        raise AssertionError("the image encoder ran although image_embeds were given")

    monkeypatch.setattr(ours.vision_model.model, "forward", no_encoder)
    monkeypatch.setattr(ours_lm.vision_model.model, "forward", no_encoder)
    cached = ours(**text_only, image_embeds=embeds)
    assert torch.equal(cached.last_hidden_state, direct.last_hidden_state)
    assert cached.image_outputs is None and cached.image_embeds is embeds
    # Many prompts, one encoding: each prompt's rows take the image's embeddings.
    for text in ["<grounding> An image of", "<grounding><phrase> a fire</phrase>"]:
        prompt = encode(text)
        want = ref(**prompt).last_hidden_state
        got = ours(**{k: v for k, v in prompt.items() if k != "pixel_values"}, image_embeds=embeds[:1])
        close(got.last_hidden_state, want, HS_ATOL)
    lm_embeds = embeds  # the same weights in both models
    logits = ours_lm(**text_only, image_embeds=lm_embeds).logits
    monkeypatch.undo()
    close(logits, ours_lm(**batch).logits, 0.0)


# --- incremental decoding through forward ------------------------------------------------------------------------


@torch.no_grad()
def test_model_cached_decoding_matches_reference(models, shared_fixtures):
    """Kosmos2Model prefill with use_cache, then one token at a time with the returned cache (either name).

    tests/test_model.py does the same for the logits of Kosmos2ForConditionalGeneration. One row: in a padded
    batch the reference shifts the positions of the padded rows' new tokens (see README), we do not."""
    ref, ours, _, _ = models
    batch = encode(SNOWMAN)
    want = ref(**batch, use_cache=True)
    got = ours(**batch, use_cache=True)
    close(got.last_hidden_state, want.last_hidden_state, HS_ATOL)
    mask = batch["attention_mask"]
    ref_cache, our_cache = want.cache, got.past_key_values
    for step, token in enumerate([10, 64010, 2]):
        ids = torch.tensor([[token]])
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        want = ref(input_ids=ids, attention_mask=mask, cache=ref_cache, image_embeds=IGNORED,
                   output_hidden_states=True)
        name = "cache" if step % 2 else "past_key_values"
        got = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True, **{name: our_cache})
        assert got.image_outputs is None, "the cache holds the image: no encoder run"
        close(got.last_hidden_state, want.last_hidden_state, HS_ATOL)
        for mine, theirs in zip(got.hidden_states, want.hidden_states, strict=True):
            close(mine, theirs, HS_ATOL)
        ref_cache, our_cache = want.cache, got.cache
    assert our_cache.length == batch["input_ids"].shape[1] + 3


# --- loss, gradients, training -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["single", "padded_left", "padded_right"])
def test_loss_matches_reference(models, shared_fixtures, case):
    _, _, ref, ours = models
    batch = encode(SNOWMAN, add_eos_token=True) if case == "single" else encode(padding_side=case.split("_")[1])
    labels = labels_for(batch)
    with torch.no_grad():
        want = ref(**batch, labels=labels)
        got = ours(**batch, labels=labels)
        assert got.past_key_values is None, "labels turn the cache off"
        assert abs(got.loss.item() - want.loss.item()) <= LOSS_ATOL, (got.loss.item(), want.loss.item())
        close(got.logits, want.logits, HS_ATOL, batch["attention_mask"])
        # The same by hand: position t predicts label t+1, -100 ignored, mean over counted tokens.
        logits, target = got.logits[:, :-1], labels[:, 1:]
        counted = target != -100
        manual = torch.nn.functional.cross_entropy(logits[counted], target[counted])
        assert abs(manual.item() - got.loss.item()) <= LOSS_ATOL
        # Gradient accumulation's sum over a token count, and labels shifted by the caller.
        items = torch.tensor(int(counted.sum()) + 5)
        want = ref(**batch, labels=labels, num_items_in_batch=items).loss
        got = ours(**batch, labels=labels, num_items_in_batch=items).loss
        assert abs(got.item() - want.item()) <= LOSS_ATOL
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        assert abs(ours(**batch, shift_labels=shifted).loss.item() - ours(**batch, labels=labels).loss.item()) < 1e-6


def _fresh_pair(folder):
    import transformers

    ref = transformers.Kosmos2ForConditionalGeneration.from_pretrained(str(folder))
    ours = Kosmos2ForConditionalGeneration.from_pretrained(folder)
    return ref, ours


GRAD_PARAMETERS = [
    "text_model.model.embed_tokens.weight",  # tied to the head: both uses add up, as in the reference
    "text_model.model.layers.0.ffn.fc1.weight",
    "text_model.model.layers.2.self_attn.inner_attn_ln.weight",
    "image_to_text_projection.latent_query",
    "image_to_text_projection.x_attn.k_proj.weight",
    "vision_model.model.encoder.layers.0.self_attn.q_proj.weight",
    "vision_model.model.embeddings.patch_embedding.weight",
]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_gradients_match_reference(folder, shared_fixtures, mode):
    """loss.backward() in both models: the same gradients. In training mode, with dropout active everywhere the
    reference has it, the same seed drops the same units (the random draws come in the same order)."""
    ref, ours = _fresh_pair(folder)
    ref.train(mode == "train")
    ours.train(mode == "train")
    batch = encode(padding_side="left")
    labels = labels_for(batch)
    torch.manual_seed(7)
    want = ref(**batch, labels=labels).loss
    torch.manual_seed(7)
    got = ours(**batch, labels=labels).loss
    assert abs(got.item() - want.item()) <= LOSS_ATOL
    want.backward()
    got.backward()
    theirs, mine = dict(ref.named_parameters()), dict(ours.named_parameters())
    for name in GRAD_PARAMETERS:
        a, b = theirs[name].grad, mine[name].grad
        assert b is not None, f"no gradient reached {name}"
        assert a.norm() > 1e-3, f"{name}: gradient too small to test anything"
        diff = (a - b).abs().max().item()
        assert diff <= GRAD_ATOL, (name, diff)
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


@torch.no_grad()
def test_dropout_in_training_mode_only(folder, shared_fixtures, tmp_path):
    ref, ours = _fresh_pair(folder)
    batch = encode(SNOWMAN)
    ref.eval()
    evaluated = ours(**batch).logits
    assert torch.equal(ours(**batch).logits, evaluated), "eval is deterministic"
    close(evaluated, ref(**batch).logits, HS_ATOL)
    ours.train()
    ref.train()
    torch.manual_seed(3)
    first = ours(**batch).logits
    torch.manual_seed(3)
    close(first, ref(**batch).logits, HS_ATOL)
    second = ours(**batch).logits
    assert (first - second).abs().max() > 1e-2, "dropout should change training-mode outputs"
    assert (first - evaluated).abs().max() > 1e-2
    ours.eval()
    assert torch.equal(ours(**batch).logits, evaluated), "back in eval mode, dropout is off again"

    # layerdrop skips whole decoder layers in training, drawing one number per layer as the reference does.
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(layerdrop=0.5, layers=3)
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    ref, ours = _fresh_pair(tmp_path)
    ref.train()
    ours.train()
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        want = ref(**batch).logits
        torch.manual_seed(seed)
        got = ours(**batch).logits
        close(got, want, HS_ATOL)
        seen.add(round(got.sum().item(), 2))
    assert len(seen) > 2


def test_fine_tuning_step_lowers_the_loss(folder, shared_fixtures):
    _, ours = _fresh_pair(folder)
    batch = encode(padding_side="right")
    labels = labels_for(batch)
    with torch.no_grad():
        before = ours(**batch, labels=labels).loss.item()
    ours.train()
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        loss = ours(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
    ours.eval()
    with torch.no_grad():
        after = ours(**batch, labels=labels).loss.item()
    assert after < before - 0.1, (before, after)
    # The head stays tied to the token embeddings through training.
    assert ours.text_model.lm_head.weight is ours.text_model.model.embed_tokens.weight


# --- interpolate_pos_encoding --------------------------------------------------------------------------------------


def resized_pixels(height: int, width: int) -> torch.Tensor:
    """The snowman resized to height x width without cropping, normalized as the released preprocessing does."""
    image = Image.open(IMAGES / "snowman.png").convert("RGB").resize((width, height), Image.BICUBIC)
    mean = np.array(RELEASED_PREPROCESSOR_CONFIG["image_mean"], dtype=np.float32)
    std = np.array(RELEASED_PREPROCESSOR_CONFIG["image_std"], dtype=np.float32)
    array = (np.asarray(image, dtype=np.float32) / 255.0 - mean) / std
    return torch.from_numpy(array.transpose(2, 0, 1)).unsqueeze(0)


@torch.no_grad()
@pytest.mark.parametrize("size", [(320, 320), (280, 224)])
def test_interpolate_pos_encoding_matches_reference(models, shared_fixtures, size):
    ref, ours, ref_lm, ours_lm = models
    batch = encode(SNOWMAN)
    batch["pixel_values"] = resized_pixels(*size)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        ours(**batch)
    want = ref(**batch, interpolate_pos_encoding=True, output_hidden_states=True)
    got = ours(**batch, interpolate_pos_encoding=True, output_hidden_states=True)
    patches = (size[0] // 14) * (size[1] // 14)
    assert got.image_outputs.last_hidden_state.shape[1] == patches + 1
    for mine, theirs in zip(got.image_outputs.hidden_states, want.image_outputs.hidden_states, strict=True):
        close(mine, theirs, HS_ATOL)
    close(got.image_embeds, want.image_outputs.pooler_output, HS_ATOL)
    close(got.last_hidden_state, want.last_hidden_state, HS_ATOL)
    close(ours_lm(**batch, interpolate_pos_encoding=True).logits,
          ref_lm(**batch, interpolate_pos_encoding=True).logits, HS_ATOL)
    embeds = ours.get_image_features(batch["pixel_values"], interpolate_pos_encoding=True)
    close(embeds, ref.get_image_features(batch["pixel_values"], interpolate_pos_encoding=True).pooler_output,
          HS_ATOL)


# --- the released configuration --------------------------------------------------------------------------------


@torch.no_grad()
def test_released_config_gives_the_documented_shape_without_allocating(shared_fixtures):
    """The seed's example: the snowman text, two grounded phrases, add_eos_token=True -> [1, 91, 2048].

    The full-size model (1.66 B parameters) is built on the meta device: shapes only, no memory."""
    image = Image.open(IMAGES / "snowman.png")
    inputs = our_processor()(text=SNOWMAN, images=image, return_tensors="pt", add_eos_token=True)
    reference = reference_processor()(text=SNOWMAN, images=image, return_tensors="pt", add_eos_token=True)
    assert inputs["input_ids"].shape == reference["input_ids"].shape == (1, 91)
    assert torch.equal(inputs["input_ids"], reference["input_ids"])
    config = Kosmos2Config()
    with torch.device("meta"):
        model = Kosmos2Model(config).eval()
        lm = Kosmos2ForConditionalGeneration(config).eval()
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in lm.parameters()) == 1_664_485_376
    meta = {k: v.to("meta") for k, v in inputs.items()}
    out = model(
        pixel_values=meta["pixel_values"], input_ids=meta["input_ids"], attention_mask=meta["attention_mask"],
        image_embeds_position_mask=meta["image_embeds_position_mask"], output_hidden_states=True,
    )
    assert list(out.last_hidden_state.shape) == [1, 91, 2048]
    assert len(out.hidden_states) == 25 and all(h.shape == (1, 91, 2048) for h in out.hidden_states)
    assert out.image_embeds.shape == (1, 64, 2048)
    assert out.image_outputs.last_hidden_state.shape == (1, 257, 1024)
    assert lm(**meta).logits.shape == (1, 91, 65037)


# --- saving ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_saved_models_load_in_the_reference(models, shared_fixtures, tmp_path):
    import transformers

    _, ours, _, ours_lm = models
    batch = encode(SNOWMAN)
    for model, ref_cls, name in ((ours, transformers.Kosmos2Model, "base"),
                                 (ours_lm, transformers.Kosmos2ForConditionalGeneration, "lm")):
        model.save_pretrained(tmp_path / name)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["config.json", "model.safetensors"]
        ref = ref_cls.from_pretrained(str(tmp_path / name)).eval()
        want, got = ref(**batch), model(**batch)
        if name == "base":
            close(got.last_hidden_state, want.last_hidden_state, HS_ATOL)
        else:
            close(got.logits, want.logits, HS_ATOL)
        again = type(model).from_pretrained(tmp_path / name)
        assert again.config == model.config
