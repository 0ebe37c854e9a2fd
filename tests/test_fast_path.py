"""The fast inference path gives the eager path's answers on the trained checkpoint, token for token.

Fast = fused q/k/v projections, fixed-shape decoding over the whole cache (what a CUDA graph replays) and, on a
GPU, the graphs themselves with the Triton kernels and bf16. The answers are the reference's (trained.py).
"""

from __future__ import annotations

import pytest
import torch

import kosmos2_cli.generation.decoder as generation
from kosmos2_cli import Kosmos2ForConditionalGeneration
from kosmos2_cli.fast.modules import FastAttention, FastDecoderLayer, FastVisionEmbeddings, patches_as_product

trained = pytest.importorskip("trained")

DEVICES = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES, ids=lambda d: f"{d[0]}-{str(d[1]).split('.')[-1]}")
def models(request, trained_dir):
    device, dtype = request.param
    plain = Kosmos2ForConditionalGeneration.from_pretrained(trained_dir, device=device, dtype=dtype, fast=False)
    fast = Kosmos2ForConditionalGeneration.from_pretrained(trained_dir, device=device, dtype=dtype)
    # On CUDA every layer decodes one row through the fused one-row kernels; on the CPU none does.
    assert [isinstance(layer, FastDecoderLayer) and layer.one_row for layer in fast.text_model.model.layers] == [
        device == "cuda"] * len(fast.text_model.model.layers)
    assert not any(isinstance(module, FastAttention) for module in plain.modules())
    return plain, fast


@pytest.fixture
def fixed_shape(monkeypatch):
    """On the CPU, make decoders attend over their whole fixed-size cache, as a CUDA graph does."""
    original = generation.Decoder.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.static = True

    monkeypatch.setattr(generation.Decoder, "__init__", init)


def _answers(model, lessons):
    out = []
    for lesson in lessons:
        inputs = trained.prompt_inputs(lesson)
        ids = model.generate(**inputs, max_new_tokens=trained.MAX_NEW_TOKENS)
        out.append(ids[0].tolist())
    return out


@torch.no_grad()
def test_fast_path_answers_every_lesson_like_the_eager_path(models, fixed_shape):
    plain, fast = models
    fast.workspace.clear()
    want = [trained.expected(lesson).ids for lesson in trained.LESSONS]
    assert _answers(plain, trained.LESSONS) == want
    assert _answers(fast, trained.LESSONS) == want
    decoders = fast.workspace.decoders
    assert decoders and all(d.static for d in decoders.values())


@torch.no_grad()
def test_fast_path_batches_lessons_of_different_lengths(models, fixed_shape, trained_dir):
    """Several prompts at once (left-aligned, padding masked): each row answers as it does alone."""
    from PIL import Image

    from kosmos2_cli import Kosmos2Processor

    _, fast = models
    lessons = [lesson for lesson in trained.LESSONS if lesson.task in ("ground", "ask")][:6]
    processor = Kosmos2Processor.from_pretrained(trained_dir)
    batch = processor(text=[lesson.prompt for lesson in lessons], images=[Image.open(lesson.path) for lesson in
                                                                          lessons], return_tensors="pt")
    ids = fast.generate(**batch, max_new_tokens=trained.MAX_NEW_TOKENS)
    prompt = batch["input_ids"].shape[1]
    for row, lesson in zip(ids.tolist(), lessons, strict=True):
        answer = [t for t in row[prompt:] if t != 1]
        assert answer == trained.expected(lesson).answer_ids, lesson.key
    # The last step was taken for the longest answers only: the others were flagged done (on CUDA their
    # attention was skipped, and the answers above are still every lesson's).
    lengths = [len(trained.expected(lesson).answer_ids) for lesson in lessons]
    (decoder,) = [d for (rows, *_), d in fast.workspace.decoders.items() if rows == len(lessons)]
    flags = decoder.cache.done.tolist()
    assert 0 < sum(n < max(lengths) for n in lengths) < len(lessons)
    assert all(flag for flag, n in zip(flags, lengths, strict=True) if n < max(lengths))
    if fast.device.type == "cpu":  # CUDA learns that every row is done a few steps late (it does not wait)
        assert not any(flag for flag, n in zip(flags, lengths, strict=True) if n == max(lengths))


@torch.no_grad()
def test_image_encoder_graphs_give_the_eager_embeddings_at_large_batches(models):
    """A batch size above the prompt's graph limit, and not a power of two: the first call runs eagerly, the
    second captures, later ones replay, all at the padded size; each gives the eager encoder's embeddings of its
    own pixels padded with blank pictures, bit for bit (the replay reads the new input), and the unpadded
    batch's within bf16's rounding."""
    _, fast = models
    if fast.device.type != "cuda":
        pytest.skip("image encoder graphs are captured on CUDA only")
    assert generation.GRAPHED_ENCODER_BATCH > generation.GRAPHED_PREFILL_BATCH
    rows = generation.GRAPHED_PREFILL_BATCH + 4
    padded = generation.encoder_batch(rows)
    assert padded == 32
    for seed in range(3):
        pixels = torch.randn(rows, 3, 224, 224, generator=torch.Generator().manual_seed(seed)).to("cuda")
        blank = torch.zeros(padded - rows, 3, 224, 224, device="cuda")
        want = fast.get_image_features(torch.cat([pixels, blank]).to(fast.dtype))[:rows]
        got = generation.encode_images(fast, pixels).clone()
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        alone = fast.get_image_features(pixels.to(fast.dtype))
        torch.testing.assert_close(got.float(), alone.float(), atol=2e-2, rtol=2e-2)
    graphs = fast.workspace.vision_graph.graphs  # by the input's (shape, dtype); None: the capture failed
    assert graphs.get(((torch.Size([padded, 3, 224, 224]), fast.dtype),)) is not None, list(graphs)


@torch.no_grad()
def test_image_encoder_graphs_are_few_whatever_the_batch_sizes(models, monkeypatch):
    """`kosmos2 serve` encodes takes of every size: they share one graph per power of two, each captured once
    (at its second use), and each size's embeddings are its own images'."""
    from kosmos2_cli.fast.graphs import Graphed

    _, fast = models
    if fast.device.type != "cuda":
        pytest.skip("image encoder graphs are captured on CUDA only")
    captured = []
    capture = Graphed._capture

    def counting(self, tensors):
        captured.append(tensors[0].shape[0])
        return capture(self, tensors)

    monkeypatch.setattr(Graphed, "_capture", counting)
    fast.workspace.vision_graph = None
    for size in [3, 5, 6, 7, 3, 5, 6, 7, 9, 12, 3, 33, 40, 1, 2, 1, 12, 40, 7]:
        pixels = torch.randn(size, 3, 224, 224, generator=torch.Generator().manual_seed(size)).to("cuda")
        got = generation.encode_images(fast, pixels).clone()
        assert got.shape[0] == size
        padded = generation.encoder_batch(size)
        blank = torch.zeros(padded - size, 3, 224, 224, device="cuda")
        want = fast.get_image_features(torch.cat([pixels, blank]).to(fast.dtype))[:size]
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert captured == [8, 4, 16, 64, 1]  # in order of second use; 2 came once (eagerly)
    assert all(graph is not None for graph in fast.workspace.vision_graph.graphs.values())


def test_encoder_batches_are_powers_of_two_and_images_are_encoded_apart(trained_dir):
    """The sizes the encoder's graphs run at, and why padding is sound: an image's embeddings do not depend on
    the other pictures of its batch (blank ones added after it)."""
    assert [generation.encoder_batch(n) for n in (1, 2, 3, 4, 5, 16, 17, 200, 256, 257, 1024)] == [
        1, 2, 4, 4, 8, 16, 32, 256, 256, 512, 1024]
    assert generation.encoder_batch(5000) == generation.GRAPHED_ENCODER_BATCH  # larger batches run eagerly
    model = Kosmos2ForConditionalGeneration.from_pretrained(trained_dir)
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = model.get_image_features(pixels)
        padded = model.get_image_features(torch.cat([pixels, torch.zeros(5, 3, 224, 224)]))[:3]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_patch_embedding_as_a_product_equals_the_convolution(trained_dir):
    """On CUDA the fast path embeds patches with one matrix product over the unfolded image (no cuDNN); the same
    sums as the strided convolution, for the trained size and for an interpolated one (leftover pixels dropped)."""
    model = Kosmos2ForConditionalGeneration.from_pretrained(trained_dir, fast=False)
    embeddings = model.vision_model.model.embeddings
    torch.manual_seed(0)
    for shape in ((2, 3, 224, 224), (1, 3, 238, 253)):
        pixels = torch.randn(shape)
        want = embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
        got = patches_as_product(embeddings, pixels)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    model.fuse_for_inference()
    assert isinstance(embeddings, FastVisionEmbeddings)  # which takes the product where the pixels are on CUDA


@torch.no_grad()
def test_small_batches_on_cuda_attend_with_flash_attention(models, monkeypatch):
    """Batch-1 attention without a padding mask calls FlashAttention directly on CUDA (no cuDNN plans to build
    at start-up); on the CPU it never does. The answers stay the lessons'."""
    import kosmos2_cli.model.layers as layers

    plain, fast = models
    picked = []
    original = layers._flash_fits

    def spy(*args):
        picked.append(original(*args))
        return picked[-1]

    monkeypatch.setattr(layers, "_flash_fits", spy)
    lesson = trained.LESSONS[0]
    inputs = {k: v.to(fast.device) for k, v in trained.prompt_inputs(lesson).items()}
    fast(**inputs)  # a plain forward pass (generate may replay captured graphs, which call no Python)
    assert picked and any(picked) == (fast.device.type == "cuda")
    assert _answers(fast, [lesson]) == [trained.expected(lesson).ids]


@torch.no_grad()
def test_causal_prompts_of_any_batch_attend_with_flash_attention(models, monkeypatch):
    """A prompt of 20 rows without padding (a service's refill: a new batch size, a new shape) attends with
    FlashAttention on CUDA, while the image encoder at that batch keeps PyTorch's choice; each row's logits are
    those of its prompt alone (within bf16 rounding) and choose the same token."""
    import kosmos2_cli.model.layers as layers
    from kosmos2_cli.model.cache import KVCache

    _, fast = models
    if fast.device.type != "cuda":
        pytest.skip("FlashAttention is called on CUDA only")
    picked = []
    original = layers._flash_fits

    def spy(q, k, mask, dropout):
        picked.append((q.shape[0], mask is layers.CAUSAL, original(q, k, mask, dropout)))
        return picked[-1][2]

    monkeypatch.setattr(layers, "_flash_fits", spy)
    inputs = {k: v.to(fast.device) for k, v in trained.prompt_inputs(trained.LESSONS[0]).items()}
    logits = []
    for rows in (1, 20):
        batch = {name: value.repeat(rows, *[1] * (value.dim() - 1)) for name, value in inputs.items()}
        embeds = fast.get_image_features(batch["pixel_values"].to(fast.dtype))
        ids = batch["input_ids"]
        cache = KVCache.for_model(fast.config.text_config, rows, ids.shape[1], fast.device, fast.cache_dtype)
        logits.append(fast.prefill(ids, cache, attention_mask=batch["attention_mask"], image_embeds=embeds,
                                   image_embeds_position_mask=batch["image_embeds_position_mask"], unpadded=True))
    assert {(causal, flash) for size, causal, flash in picked if size == 20} == {(True, True), (False, False)}
    torch.testing.assert_close(logits[1].float(), logits[0].float().expand(20, -1), atol=5e-2, rtol=5e-2)
    assert (logits[1].argmax(-1) == logits[0].argmax(-1)).all()


@torch.no_grad()
def test_carried_residual_adds_give_the_layers_numbers(models, monkeypatch):
    """After fuse_for_inference each layer leaves its last residual add to the LayerNorm of the next (one Triton
    pass on CUDA). The image embeddings and logits are those of the same model with the adds done apart: bit for
    bit on the CPU (the same operations), within bf16 rounding on CUDA, with the same next token."""
    from kosmos2_cli.model.text import DecoderLayer
    from kosmos2_cli.model.vision import VisionLayer

    _, fast = models
    calls = []
    for cls in (VisionLayer, DecoderLayer):
        original = cls.carried

        def spy(self, *args, original=original):
            calls.append(type(self).__name__)
            return original(self, *args)

        monkeypatch.setattr(cls, "carried", spy)
    inputs = {k: v.to(fast.device) for k, v in trained.prompt_inputs(trained.LESSONS[0]).items()}
    got = fast(**inputs)
    assert len(calls) == len(fast.text_model.model.layers) + len(fast.vision_model.model.encoder.layers)
    transformers = (fast.text_model.model, fast.vision_model.model)
    for module in transformers:
        monkeypatch.setattr(module, "carry", False)
    want = fast(**inputs)
    for a, b in ((got.image_embeds, want.image_embeds), (got.logits, want.logits)):
        if fast.device.type == "cpu":
            assert torch.equal(a, b)
        else:
            assert float((a.float() - b.float()).norm() / b.float().norm()) < 5e-3
    assert torch.equal(got.logits[:, -1].argmax(-1), want.logits[:, -1].argmax(-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA only")
def test_fused_norm_kernels_equal_the_separate_operations():
    """add_layer_norm and gelu_layer_norm round where the separate kernels round: the sum bit for bit, the normed
    rows within one bf16 step of PyTorch's LayerNorm."""
    kernels = pytest.importorskip("kosmos2_cli.fast.kernels")
    torch.manual_seed(0)
    for width, rows in ((1024, 3 * 257), (2048, 5), (8192, 7)):
        norm = torch.nn.LayerNorm(width, device="cuda", dtype=torch.bfloat16)
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
        x, h = (torch.randn(rows, width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        total, normed = kernels.add_layer_norm(x, h, norm)
        assert torch.equal(total, x + h)
        torch.testing.assert_close(normed, norm(x + h), atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(kernels.gelu_layer_norm(x, norm), norm(torch.nn.functional.gelu(x)), atol=2e-2,
                                   rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA only")
def test_decode_attention_skips_finished_rows():
    """Rows flagged done give zeros and read nothing; the others attend exactly as without flags."""
    kernels = pytest.importorskip("kosmos2_cli.fast.kernels")
    torch.manual_seed(0)
    q, k_new, v_new = (torch.randn(4, 8, 1, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    keys, values = (torch.randn(4, 8, 40, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    used = torch.tensor([40, 25, 3, 40], device="cuda")
    valid = torch.ones(4, 40, dtype=torch.bool, device="cuda")
    done = torch.tensor([False, True, False, True], device="cuda")
    args = (q, k_new, v_new, keys, values, (used - 1)[:, None], valid, used, 0.125)
    want = kernels.decode_attention_append(*args)
    got = kernels.decode_attention_append(*args, done=done)
    assert torch.equal(got[~done], want[~done])
    assert not got[done].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA only")
def test_layer_norm_kernel_with_l2_normalize_equals_pytorch():
    """The image features' post-LayerNorm and F.normalize in one Triton pass: within one bf16 step of PyTorch."""
    kernels = pytest.importorskip("kosmos2_cli.fast.kernels")
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(1024, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 257, 1024, device="cuda", dtype=torch.bfloat16) * 3
    want = torch.nn.functional.normalize(norm(x), dim=-1)
    got = kernels.layer_norm(x, norm.weight, norm.bias, norm.eps, l2_normalize=True)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA only")
def test_argmax_log_softmax_kernel_equals_pytorch():
    """Greedy picks with their log-probability in one pass: PyTorch's argmax (the first of equal maxima) and
    log_softmax of the float32 logits at it, for bf16 and fp32 logits, ties and a vocabulary not a multiple of
    the block."""
    kernels = pytest.importorskip("kosmos2_cli.fast.kernels")
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        logits = (torch.randn(37, 65037, device="cuda") * 4).to(dtype)
        logits[3, 100] = logits[3, 60000] = logits[3].max() + 1  # a tie: the first index wins
        tokens, logprobs = kernels.argmax_log_softmax(logits)
        assert torch.equal(tokens, logits.argmax(-1))
        want = logits.float().log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        torch.testing.assert_close(logprobs, want, atol=1e-5, rtol=1e-5)
