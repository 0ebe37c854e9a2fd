"""A tiny Kosmos-2 that the reference (transformers) trains until it answers a handful of grounded prompts exactly.

The released weights (6.6 GB) can never be loaded here, so the end-to-end tests use this instead: a small
`Kosmos2ForConditionalGeneration` with the real 65,037-token vocabulary, the real 224/14 image geometry and the
real 64 image tokens, trained with the reference's own `forward(labels=...)` until the reference's greedy
`generate` answers every lesson of `LESSONS` exactly, with a clear margin between the best and second-best
logit at every answer step (so float32, bfloat16 or quantized weights of an equivalent implementation give the
same answers). It is saved in the hub's layout and cached under the system temp dir (see `trained_checkpoint_dir`).

Tests compare our outputs with `expected(lesson)`: the token ids, the raw text and the reference's
post-processing of what the reference generates for the lesson.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from oracle import (
    IMAGES,
    RELEASED_PREPROCESSOR_CONFIG,
    SP_MODEL,
    reference_processor,
    tiny_config,
    write_tokenizer_files,
)

# --------------------------------------------------------------------------------------------------------------
# The lessons
# --------------------------------------------------------------------------------------------------------------

CAPTION_PROMPT = "<grounding> An image of"
DETAILED_PROMPT = "<grounding> Describe this image in detail:"


def ground_prompt(phrase: str) -> str:
    return f"<grounding><phrase> {phrase}</phrase>"


def refer_prompt(ul: int, lr: int) -> str:
    return f"<grounding><phrase> It</phrase><object><patch_index_{ul:04d}><patch_index_{lr:04d}></object> is"


def ask_prompt(question: str) -> str:
    return f"<grounding> Question: {question} Answer:"


def cell_box(ul: int, lr: int) -> tuple[float, float, float, float]:
    """The normalized box (x1, y1, x2, y2) through the centres of two grid cells: the box the reference's
    post-processing gives for `<patch_index_ul><patch_index_lr>`, and one that `processor(bboxes=[box])` (or a
    pixel box rounded from it) turns back into the same two cells."""
    return ((ul % 32 + 0.5) / 32, (ul // 32 + 0.5) / 32, (lr % 32 + 0.5) / 32, (lr // 32 + 0.5) / 32)


TASKS = ("caption", "detailed", "ground", "refer", "ask")


@dataclass(frozen=True)
class Lesson:
    """One prompt on one image and the exact continuation the trained model answers (then EOS).

    - `image`: file name under `oracle.IMAGES`;
    - `task`: "caption", "detailed" (`caption --detailed`), "ground", "refer" or "ask" (DESIGN §4);
    - `prompt`: the prompt of DESIGN §4 for the task;
    - `target`: what the model writes after the prompt, in Kosmos-2's grounded format; "" means EOS at once;
    - `phrase` (ground), `question` (ask), `cells` (refer: the (ul, lr) grid cells of the box in the prompt):
      the command's argument.
    """

    image: str
    task: str
    prompt: str
    target: str
    phrase: str | None = None
    question: str | None = None
    cells: tuple[int, int] | None = None

    @property
    def path(self) -> Path:
        return IMAGES / self.image

    @property
    def raw(self) -> str:
        """The generated text with its tags, as `post_process_generation(..., cleanup_and_extract=False)` gives it."""
        return self.prompt + self.target

    @property
    def box(self) -> tuple[float, float, float, float] | None:
        """refer: the normalized box of the prompt (cell centres; see `cell_box`)."""
        return None if self.cells is None else cell_box(*self.cells)

    def box_px(self, width: int, height: int) -> tuple[int, int, int, int] | None:
        """refer: the prompt's box in whole pixels of a `width` x `height` image (what `kosmos2 refer --box`
        takes); divided by the size again, it falls in the same two cells."""
        if self.box is None:
            return None
        x1, y1, x2, y2 = self.box
        return round(x1 * width), round(y1 * height), round(x2 * width), round(y2 * height)

    @property
    def found(self) -> bool:
        """ground: whether the model places the phrase (writes an `<object>` right after it)."""
        return self.target.startswith("<object>")

    @property
    def key(self) -> str:
        return f"{self.image}|{self.prompt}"


def _caption(image: str, target: str) -> Lesson:
    return Lesson(image, "caption", CAPTION_PROMPT, target)


def _detailed(image: str, target: str) -> Lesson:
    return Lesson(image, "detailed", DETAILED_PROMPT, target)


def _ground(image: str, phrase: str, target: str) -> Lesson:
    return Lesson(image, "ground", ground_prompt(phrase), target, phrase=phrase)


def _refer(image: str, ul: int, lr: int, target: str) -> Lesson:
    return Lesson(image, "refer", refer_prompt(ul, lr), target, cells=(ul, lr))


def _ask(image: str, question: str, target: str) -> Lesson:
    return Lesson(image, "ask", ask_prompt(question), target, question=question)


# Boxes are grid cells (col, row) of the 32 x 32 grid over the whole image, patch index = row * 32 + col,
# chosen by eye on each picture. The snowman's are the released model's own answer (model card).
LESSONS: tuple[Lesson, ...] = (
    # snowman.png (1024 x 1024): snowman 0044-0863, fire 0005-0911, hat 0048-0250, scarf 0273-0573
    _caption(
        "snowman.png",
        "<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> warming himself by"
        "<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>.",
    ),
    _detailed(
        "snowman.png",
        " The image features<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>"
        " sitting by<phrase> a campfire</phrase><object><patch_index_0005><patch_index_0911></object> in the snow."
        " He wears<phrase> a hat</phrase><object><patch_index_0048><patch_index_0250></object> and"
        "<phrase> a scarf</phrase><object><patch_index_0273><patch_index_0573></object>.",
    ),
    _ground("snowman.png", "a snowman", "<object><patch_index_0044><patch_index_0863></object>"),
    _ground("snowman.png", "a fire", "<object><patch_index_0005><patch_index_0911></object>"),
    _ground("snowman.png", "a hat", "<object><patch_index_0048><patch_index_0250></object>"),
    _ground("snowman.png", "a cat", ""),  # not in the picture: EOS, no box
    _refer(
        "snowman.png", 5, 911,
        " a campfire burning next to<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863>"
        "</object>.",
    ),
    _ask(
        "snowman.png", "What is the snowman doing?",
        " Warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>.",
    ),
    # two_dogs.jpg (1200 x 602): left dog 0137-1008, right dog 0080-1016, flowers 0480-1023
    _caption(
        "two_dogs.jpg",
        "<phrase> two dogs</phrase><object><patch_index_0137><patch_index_1008></delimiter_of_multi_objects/>"
        "<patch_index_0080><patch_index_1016></object> sitting in<phrase> a field of flowers</phrase><object>"
        "<patch_index_0480><patch_index_1023></object>.",
    ),
    _ground(
        "two_dogs.jpg", "two dogs",
        "<object><patch_index_0137><patch_index_1008></delimiter_of_multi_objects/><patch_index_0080>"
        "<patch_index_1016></object>",
    ),
    _ask("two_dogs.jpg", "How many dogs are there?", " Two."),
    # man_ball.png (1000 x 670, RGBA): player 0259-0950, ball 0089-0122, glove 0371-0535
    _caption(
        "man_ball.png",
        "<phrase> a baseball player</phrase><object><patch_index_0259><patch_index_0950></object> diving to catch"
        "<phrase> a ball</phrase><object><patch_index_0089><patch_index_0122></object>.",
    ),
    _ground("man_ball.png", "a glove", "<object><patch_index_0371><patch_index_0535></object>"),
    # the phrase's box is the first <object> after it; the model goes on writing
    _ground(
        "man_ball.png", "a ball",
        "<object><patch_index_0089><patch_index_0122></object> caught by<phrase> a baseball player</phrase>"
        "<object><patch_index_0259><patch_index_0950></object>.",
    ),
    _ground("man_ball.png", "a snowman", ""),  # placed on snowman.png, not here
    _refer("man_ball.png", 89, 122, " a baseball flying through the air."),
    # six_planes.png (2247 x 1500): the formation 0261-0695, the sky 0000-1023
    _caption(
        "six_planes.png",
        "<phrase> six planes</phrase><object><patch_index_0261><patch_index_0695></object> flying in"
        "<phrase> the blue sky</phrase><object><patch_index_0000><patch_index_1023></object>.",
    ),
    _ask("six_planes.png", "How many planes are there?", " Six."),
    # corgi.jpg (2048 x 1365): corgi 0396-0731, grass 0352-1023, trees 0000-0383
    _caption(
        "corgi.jpg",
        "<phrase> a corgi</phrase><object><patch_index_0396><patch_index_0731></object> running on"
        "<phrase> the grass</phrase><object><patch_index_0352><patch_index_1023></object>.",
    ),
    _detailed(
        "corgi.jpg",
        " The image shows<phrase> a corgi dog</phrase><object><patch_index_0396><patch_index_0731></object>"
        " running across<phrase> a grassy field</phrase><object><patch_index_0352><patch_index_1023></object>"
        " with its tongue out. In the background there are<phrase> trees</phrase><object><patch_index_0000>"
        "<patch_index_0383></object>.",
    ),
    # quadrocopter.jpg (2250 x 1500): man 0176-0948, drone 0393-0461
    _caption(
        "quadrocopter.jpg",
        "<phrase> a man</phrase><object><patch_index_0176><patch_index_0948></object> flying"
        "<phrase> a drone</phrase><object><patch_index_0393><patch_index_0461></object> in a park.",
    ),
    _ground("quadrocopter.jpg", "a drone", "<object><patch_index_0393><patch_index_0461></object>"),
    # carnaby_street.jpg (2592 x 1944): sign 0355-0702, building 0002-1019
    _caption(
        "carnaby_street.jpg",
        "<phrase> a street sign</phrase><object><patch_index_0355><patch_index_0702></object> hanging over"
        "<phrase> a brick building</phrase><object><patch_index_0002><patch_index_1019></object>.",
    ),
    _ask("carnaby_street.jpg", "What does the sign say?", " Welcome to Carnaby Street."),
)

# --------------------------------------------------------------------------------------------------------------
# Model size, training, acceptance
# --------------------------------------------------------------------------------------------------------------

TEXT = dict(embed_dim=32, layers=2, ffn_dim=128, attention_heads=4)  # + tiny_config's real vocabulary
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)  # 224 px, 14 px
LATENT_QUERY_NUM = 64  # as released: a processor's default of 64 image tokens fits the checkpoint
SEED = 0
LR = 1e-2  # Adam; 2e-2 stalls, 5e-3 takes half as many steps again
BETAS = (0.9, 0.999)
CLIP = 1.0  # gradient norm
MAX_STEPS = 1000  # it passes at about 200
MARGIN = 3.0  # smallest top-1 minus top-2 logit at any answer step, under the reference's greedy generate
MAX_NEW_TOKENS = 64  # > the longest answer (46 tokens with EOS)
THREADS = 1  # see TRAINED.md: two threads on a busy two-core machine are many times slower
LOG_EVERY = 10


def trained_config():
    """The Kosmos2Config of the trained checkpoint."""
    return tiny_config(text=TEXT, vision=VISION, latent_query_num=LATENT_QUERY_NUM)


_TAG = re.compile(r"(<[^<>]+>)")


def target_ids(target: str, tokenizer=None) -> list[int]:
    """Token ids of a continuation (without EOS), as Kosmos-2 writes them: tags and patch indices are single
    tokens; the text between them is SentencePiece pieces, without the dummy `▁` that the tokenizer puts at
    the start of a piece of text that does not start with a space (Kosmos-2 writes `</object>.`, not
    `</object> .`)."""
    tokenizer = tokenizer or reference_processor().tokenizer
    ids: list[int] = []
    for part in _TAG.split(target):
        if not part:
            continue
        if _TAG.fullmatch(part):
            token_id = tokenizer.convert_tokens_to_ids(part)
            if token_id == tokenizer.unk_token_id:
                raise ValueError(f"unknown tag {part!r}")
            ids.append(token_id)
            continue
        piece_ids = tokenizer(part, add_special_tokens=False)["input_ids"]
        if not part[0].isspace():
            if tokenizer.convert_ids_to_tokens(piece_ids[0]) != "\u2581":
                raise ValueError(f"{part!r} does not start with a space and merges with the dummy prefix; reword it")
            piece_ids = piece_ids[1:]
        ids.extend(piece_ids)
    return ids


def prompt_inputs(lesson: Lesson) -> dict:
    """The reference processor's inputs for the lesson's prompt and image (batch of one; fresh tensors)."""
    return {name: value.clone() for name, value in _prompt_inputs(lesson).items()}


@cache
def _prompt_inputs(lesson: Lesson) -> dict:
    from PIL import Image

    with Image.open(lesson.path) as im:
        return dict(reference_processor()(text=lesson.prompt, images=im, return_tensors="pt"))


@dataclass(frozen=True)
class Expected:
    """What the reference generates for a lesson with the trained checkpoint (greedy)."""

    ids: list[int]  # prompt ids (image placeholders included) + answer ids + EOS: `generate`'s output
    answer_ids: list[int]  # the new tokens, EOS included
    raw: str  # the text with tags: `post_process_generation(decoded, cleanup_and_extract=False)`
    caption: str  # `post_process_generation(decoded)`: text without tags (prompt words included) ...
    entities: list  # ... and its entities [(phrase, (start, end), [(x1, y1, x2, y2), ...]), ...]


def expected(lesson: Lesson) -> Expected:
    """What the reference's greedy `generate` gives for `lesson` with the trained checkpoint (a fresh copy)."""
    return copy.deepcopy(_expected(lesson))


@cache
def _expected(lesson: Lesson) -> Expected:
    processor = reference_processor()
    tokenizer = processor.tokenizer
    prompt = prompt_inputs(lesson)["input_ids"][0].tolist()
    answer = target_ids(lesson.target, tokenizer) + [tokenizer.eos_token_id]
    decoded = processor.batch_decode([prompt + answer], skip_special_tokens=True)[0]
    raw = processor.post_process_generation(decoded, cleanup_and_extract=False)
    caption, entities = processor.post_process_generation(decoded)
    return Expected(ids=prompt + answer, answer_ids=answer, raw=raw, caption=caption, entities=entities)


def box_scores(lesson: Lesson) -> list[list[float]]:
    """For each entity of `expected(lesson).entities` (the prompt's too), for each of its boxes: the product of
    the probabilities the reference's own greedy `generate(..., output_scores=True)` gave the box's two location
    tokens (softmax of its scores at those steps); 1.0 for a box of the prompt."""
    return copy.deepcopy(_box_scores(lesson))


@cache
def _reference_model():
    folder = os.environ.get("KOSMOS2_TRAINED_DIR")
    return load_reference(Path(folder) if folder else None)


@cache
def _box_scores(lesson: Lesson) -> list[list[float]]:
    import torch

    inputs = prompt_inputs(lesson)
    with torch.no_grad():
        out = _reference_model().generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                                          output_scores=True, return_dict_in_generate=True)
    ids = out.sequences[0].tolist()
    assert ids == expected(lesson).ids, lesson.key
    prompt = inputs["input_ids"].shape[1]
    tokenizer = reference_processor().tokenizer
    patch = {tokenizer.convert_tokens_to_ids(f"<patch_index_{i:04d}>") for i in range(32 * 32)}
    probs = [1.0 if at < prompt else torch.softmax(out.scores[at - prompt][0].float(), dim=-1)[token].item()
             for at, token in enumerate(ids) if token in patch]
    pairs = iter(zip(probs[0::2], probs[1::2], strict=True))
    return [[a * b for a, b in (next(pairs) for _ in boxes)] for _, _, boxes in expected(lesson).entities]


def beam_box_scores(lesson: Lesson, num_beams: int) -> tuple[list[int], list[float]]:
    """The reference's beam search on `lesson`'s prompt: the returned sequence's ids, and for each location token
    of its answer (in order) the probability along the returned beam (`compute_transition_scores` of its own
    `output_scores`: each step's log-softmax given the beam's earlier tokens)."""
    import torch

    inputs = prompt_inputs(lesson)
    model = _reference_model()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=num_beams,
                             output_scores=True, return_dict_in_generate=True)
        steps = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
    ids = out.sequences[0].tolist()
    prompt = inputs["input_ids"].shape[1]
    tokenizer = reference_processor().tokenizer
    patch = {tokenizer.convert_tokens_to_ids(f"<patch_index_{i:04d}>") for i in range(32 * 32)}
    probs = [float(torch.exp(steps[0, at - prompt].float())) for at, token in enumerate(ids)
             if at >= prompt and token in patch]
    return ids, probs


def _batch(lessons):
    """Left-padded inputs for `lessons`, labels on the answers only. Left padding puts every answer at the end,
    so the loss needs the logits of the last `keep` positions only (`logits_to_keep`, labels cut to match)."""
    import torch

    tokenizer = reference_processor().tokenizer
    rows = []
    for lesson in lessons:
        inputs = prompt_inputs(lesson)
        prompt = inputs["input_ids"][0].tolist()
        answer = expected(lesson).answer_ids
        mask = inputs["image_embeds_position_mask"][0].tolist() + [0] * len(answer)
        rows.append((prompt + answer, [-100] * len(prompt) + answer, mask))
    length = max(len(ids) for ids, _, _ in rows)
    keep = max(len(expected(lesson).answer_ids) for lesson in lessons) + 1
    pad = tokenizer.pad_token_id

    def left(values, fill):
        return [[fill] * (length - len(v)) + v for v in values]

    return dict(
        input_ids=torch.tensor(left([r[0] for r in rows], pad)),
        attention_mask=torch.tensor(left([[1] * len(r[0]) for r in rows], 0)),
        image_embeds_position_mask=torch.tensor(left([r[2] for r in rows], 0)),
        labels=torch.tensor(left([r[1] for r in rows], -100))[:, -keep:],
        pixel_values=torch.cat([_prompt_inputs(lesson)["pixel_values"] for lesson in lessons]),
        logits_to_keep=keep,
    )


def _batches(lessons) -> tuple[list[dict], list[Lesson]]:
    """The lessons in a few batches of similar answer lengths (the logits over the 65,037-token vocabulary are
    most of the work: short answers should not pay for the longest), and the lessons in the batches' order."""
    buckets: dict[int, list] = {}
    for lesson in lessons:
        size = 8
        while size < len(expected(lesson).answer_ids) + 1:
            size *= 2
        buckets.setdefault(size, []).append(lesson)
    groups = [group for _, group in sorted(buckets.items())]
    return [_batch(group) for group in groups], [lesson for group in groups for lesson in group]


def _teacher_forced(logits, labels):
    """Per lesson of a batch: (all answer tokens right, smallest top-1 minus top-2 margin), from the training
    forward's logits (teacher forcing: with every earlier token right, greedy decoding sees the same)."""
    import torch

    logits, labels = logits[:, :-1].detach(), labels[:, 1:]
    top2 = torch.topk(logits, 2, dim=-1)
    on = labels != -100
    right = ((top2.indices[..., 0] == labels) | ~on).all(dim=1)
    margin = torch.where(on, top2.values[..., 0] - top2.values[..., 1], torch.inf).amin(dim=1)
    return right.tolist(), margin.tolist()


@contextlib.contextmanager
def _torch_threads(count: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check(model, lessons=LESSONS, max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """Greedy `generate` of the reference for every lesson: one report per lesson with `lesson` (its key), `ok`
    (exactly the expected ids and text), `margin` (smallest top-1 minus top-2 logit over the answer steps) and
    `got` (the raw text generated)."""
    with _torch_threads(THREADS):
        return [_check_one(model, lesson, max_new_tokens) for lesson in lessons]


def _check_one(model, lesson: Lesson, max_new_tokens: int) -> dict:
    import torch

    processor = reference_processor()
    want = expected(lesson)
    with torch.no_grad():
        out = model.generate(
            **prompt_inputs(lesson), do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, use_cache=True,
            output_logits=True, return_dict_in_generate=True,
        )
    ids = out.sequences[0].tolist()
    decoded = processor.batch_decode([ids], skip_special_tokens=True)[0]
    got = processor.post_process_generation(decoded, cleanup_and_extract=False)
    top2 = torch.topk(torch.cat(out.logits).float(), 2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    return dict(lesson=lesson.key, ok=ids == want.ids and got == want.raw, margin=margin, got=got)


def train_checkpoint(folder: Path, *, seed: int = SEED, log=None) -> Path:
    """Train the tiny checkpoint with the reference and save it in the hub's layout into `folder`.

    Full-batch Adam on the reference's own `forward(labels=...)` (loss on the answer tokens and EOS only) until
    the reference's greedy `generate` answers every lesson exactly with a margin of at least MARGIN at every
    answer step; writes `training.json` (steps, time, loss, margins) beside the weights. Raises if MAX_STEPS is
    not enough. `log`: a callable given a progress line every LOG_EVERY steps.
    """
    import torch
    import transformers
    from transformers import Kosmos2ForConditionalGeneration

    folder = Path(folder)
    start, start_cpu = time.perf_counter(), time.process_time()
    with _torch_threads(THREADS):
        batches, order = _batches(LESSONS)
        counts = [int((batch["labels"] != -100).sum()) for batch in batches]
        total = sum(counts)
        torch.manual_seed(seed)
        model = Kosmos2ForConditionalGeneration(trained_config())
        optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS)
        reports = None
        for step in range(1, MAX_STEPS + 1):
            model.train()
            loss, right, margins = 0.0, [], []
            for batch, count in zip(batches, counts, strict=True):
                out = model(**batch)
                (out.loss * (count / total)).backward()
                loss += float(out.loss.detach()) * count / total
                batch_right, batch_margins = _teacher_forced(out.logits, batch["labels"])
                right += batch_right
                margins += batch_margins
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if log and step % LOG_EVERY == 0:
                wrong = [lesson.key for lesson, ok in zip(order, right, strict=True) if not ok]
                log(f"step {step}: loss {loss:.4f}, margin {min(margins):.2f}, {len(wrong)} wrong {wrong[:4]}")
            # teacher forcing (before this step's update) says when the real test is worth running
            if all(right) and min(margins) > MARGIN:
                model.eval()
                reports = check(model)
                if log:
                    log(f"step {step}: generate: {sum(r['ok'] for r in reports)} of {len(reports)} right, "
                        f"margin {min(r['margin'] for r in reports):.2f}")
                if all(r["ok"] and r["margin"] >= MARGIN for r in reports):
                    break
                reports = None
        if reports is None:
            raise RuntimeError(f"the tiny Kosmos-2 did not learn its lessons in {MAX_STEPS} steps")
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(folder))
        write_tokenizer_files(folder)
        (folder / "training.json").write_text(json.dumps(dict(
            steps=step, seconds=round(seconds, 1), cpu_seconds=round(cpu_seconds, 1), final_loss=loss,
            min_margin=min(r["margin"] for r in reports), margins={r["lesson"]: r["margin"] for r in reports},
            seed=seed, lr=LR, threads=THREADS, torch=torch.__version__, transformers=transformers.__version__,
        ), indent=2) + "\n")
        return folder


# --------------------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """`$KOSMOS2_CLI_TEST_CACHE`, or `kosmos2-cli-test-cache` under the system temp dir."""
    return Path(os.environ.get("KOSMOS2_CLI_TEST_CACHE") or Path(tempfile.gettempdir()) / "kosmos2-cli-test-cache")


def checkpoint_key(seed: int = SEED) -> str:
    """Hash of everything the checkpoint depends on: this file (lessons, sizes, training code), the oracle
    helpers (config, tokenizer files), the seed, the tokenizer model and images, the torch and transformers
    versions."""
    import torch
    import transformers

    h = hashlib.sha256()
    for path in (Path(__file__), Path(__file__).with_name("oracle.py"), SP_MODEL):
        h.update(path.read_bytes())
    for image in sorted({lesson.image for lesson in LESSONS}):
        h.update((IMAGES / image).read_bytes())
    h.update(trained_config().to_json_string().encode())
    h.update(json.dumps([seed, RELEASED_PREPROCESSOR_CONFIG, torch.__version__, transformers.__version__]).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` (a no-op where fcntl is absent: the build stays atomic, only not exclusive)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_dir(name: str, build, root: Path | None = None) -> Path:
    """`root/name`, built by `build(folder)` if missing. Atomic: the build goes to a temp sibling that is renamed
    into place once complete, so an interrupted build never leaves a half folder; concurrent callers wait for
    each other on a lock file (and would anyway only ever see a complete folder)."""
    root = Path(root) if root is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if final.is_dir():
        return final
    with _locked(root / f"{name}.lock"):
        if final.is_dir():
            return final
        for stale in root.glob(f".{name}.building-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=root))
        try:
            build(temp)
            try:
                os.rename(temp, final)
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)
    return final


def trained_checkpoint_dir(seed: int = SEED) -> Path:
    """The trained checkpoint's folder (hub layout + training.json), built on first use and cached."""
    return cached_dir(f"trained-{checkpoint_key(seed)}", lambda folder: train_checkpoint(folder, seed=seed))


def load_reference(folder: Path | None = None):
    """The reference model loaded from the (cached) trained checkpoint, in eval mode."""
    from transformers import Kosmos2ForConditionalGeneration

    return Kosmos2ForConditionalGeneration.from_pretrained(str(folder or trained_checkpoint_dir())).eval()


if __name__ == "__main__":  # python tests/trained.py OUT_DIR: train with a log, without the cache
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="kosmos2-trained-"))
    t0 = time.perf_counter()
    train_checkpoint(out, log=lambda line: print(line, flush=True))
    print(f"{out}: {time.perf_counter() - t0:.1f} s", (out / "training.json").read_text())
