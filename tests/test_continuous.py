"""Continuous batching (`continuous.stream`): rows that end take the next prompt, and every answer is still
exactly the reference's (the tiny trained checkpoint's lessons, whose answers end at 1 to 47 tokens)."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import invoke

from kosmos2_cli.generation.continuous import Prompt, Sampling, stream
from kosmos2_cli.generation.generate import encode_images
from kosmos2_cli.model.cache import KVCache

trained = pytest.importorskip("trained")
pytestmark = pytest.mark.needs_shared


# On CUDA: bf16, the decode step replayed from CUDA graphs with the Triton kernels, flags read behind the steps.
DEVICES = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES, ids=lambda d: d[0])
def ours(request, trained_dir):
    from kosmos2_cli import Kosmos2ForConditionalGeneration

    device, dtype = request.param
    model = Kosmos2ForConditionalGeneration.from_pretrained(trained_dir, device=device, dtype=dtype)
    model.fuse_for_inference()
    return model


@pytest.fixture(scope="module")
def prompts(ours):
    """Every lesson as a Prompt tagged with its index (prompts of 70 to 80 tokens)."""
    made = []
    for index, lesson in enumerate(trained.LESSONS):
        inputs = trained.prompt_inputs(lesson)
        embeds = encode_images(ours, inputs["pixel_values"].to(ours.device)).clone()[0]
        made.append(Prompt(index, inputs["input_ids"][0].tolist(), inputs["image_embeds_position_mask"][0].tolist(),
                           embeds))
    return made


def _feeder(prompts, log=None):
    queue = list(prompts)

    def admit(count):
        nonlocal queue
        given, queue = queue[:count], queue[count:]
        if log is not None:
            log.append((count, len(given)))
        return given

    return admit


def _answers(model, prompts, rows, max_new_tokens=trained.MAX_NEW_TOKENS, log=None, **kwargs):
    eos = model.config.text_config.eos_token_id
    pad = model.config.text_config.pad_token_id
    return list(stream(model, _feeder(prompts, log), rows=rows, longest_prompt=max(len(p.ids) for p in prompts),
                       max_new_tokens=max_new_tokens, stops=[eos], pad=pad, **kwargs))


@pytest.mark.parametrize("rows, lookahead", [(1, 0), (3, 0), (5, 3), (24, 0), (32, 2), (6, None)])
def test_every_answer_is_the_references(ours, prompts, rows, lookahead):
    """With the host reading the rows' flags behind the steps too (`lookahead`, as on CUDA): a row refilled
    after its previous answer ended must not be taken for ended by that earlier step's flags."""
    log = []
    got = _answers(ours, prompts, rows, log=log, lookahead=lookahead)
    assert sorted(tag for tag, _ in got) == list(range(len(prompts)))  # each prompt answered once
    for tag, answer in got:
        assert answer == trained.expected(trained.LESSONS[tag]).answer_ids, trained.LESSONS[tag].key
    assert sum(given for _, given in log) == len(prompts)
    assert all(asked <= rows for asked, _ in log)
    if rows < len(prompts):
        assert len(log) > 2  # rows were refilled while others were running


def test_answers_come_as_they_end_not_in_order(ours, prompts):
    got = [tag for tag, _ in _answers(ours, prompts, rows=4)]
    lengths = [len(trained.expected(lesson).answer_ids) for lesson in trained.LESSONS]
    assert got != sorted(got)
    assert lengths[got[0]] == min(lengths[:4])  # the shortest of the first four rows ends first


def test_rows_refill_only_when_a_quarter_is_free(ours, prompts):
    log = []
    _answers(ours, prompts, rows=8, log=log)
    assert log[0] == (8, 8)
    assert all(asked >= 2 for asked, _ in log[1:])  # 8 x REFILL_SHARE


def test_max_new_tokens_cuts_every_answer(ours, prompts):
    for tag, answer in _answers(ours, prompts, rows=6, max_new_tokens=5):
        assert answer == trained.expected(trained.LESSONS[tag]).answer_ids[:5]


def test_each_prompt_may_cap_its_own_answer(ours, prompts):
    from dataclasses import replace

    capped = [replace(p, max_new_tokens=1 + p.tag % 7) for p in prompts]
    for tag, answer in _answers(ours, capped, rows=5):
        assert answer == trained.expected(trained.LESSONS[tag]).answer_ids[: 1 + tag % 7]


def test_refilling_only_when_every_row_is_free_is_static_batching(ours, prompts):
    log = []
    got = _answers(ours, prompts, rows=5, log=log, refill_share=1.0)
    assert [asked for asked, _ in log] == [5] * 5
    assert sorted(tag for tag, _ in got) == list(range(len(prompts)))


def test_one_token_answers(ours, prompts):
    for tag, answer in _answers(ours, prompts, rows=3, max_new_tokens=1):
        assert answer == trained.expected(trained.LESSONS[tag]).answer_ids[:1]


def test_sampling_with_a_seed_repeats(ours, prompts):
    def run():
        generator = torch.Generator(device=ours.device).manual_seed(7)
        return _answers(ours, prompts[:10], rows=4, sampling=Sampling(True, 1.3, 50, 0.95, generator),
                        lookahead=2)

    first = run()
    assert first == run()
    assert any(answer != trained.expected(trained.LESSONS[tag]).answer_ids for tag, answer in first)


def test_a_prompt_longer_than_announced_is_refused(ours, prompts):
    eos = ours.config.text_config.eos_token_id
    with pytest.raises(ValueError, match="longer than"):
        list(stream(ours, _feeder(prompts), rows=2, longest_prompt=10, max_new_tokens=4, stops=[eos], pad=1))


def test_no_prompts_no_steps(ours):
    assert list(stream(ours, lambda count: [], rows=4, longest_prompt=80, max_new_tokens=4, stops=[2], pad=1)) == []


def test_cache_head_shares_the_rows():
    cache = KVCache(2, 4, 2, 8, 16, torch.device("cpu"), torch.float32)
    head = cache.head(3)
    head.keys[1][2, 1, 5, 0] = 7.0
    head.next_slot[2] = 9
    assert cache.keys[1][2, 1, 5, 0] == 7.0 and cache.next_slot[2] == 9
    assert head.batch == 3 and head.capacity == 16


def test_static_appended_stays_a_small_bound():
    """Rows that step in place for a long continuous run must not grow the position bound (the sinusoid table
    would be rebuilt larger on every eager step)."""
    cache = KVCache(1, 2, 1, 4, 8, torch.device("cpu"), torch.float32)
    cache.static = True
    for _ in range(20):
        cache.append(torch.ones(2, 1, dtype=torch.bool))
    assert cache.appended == 8


@pytest.mark.parametrize("task", [["-t", "ground", "-p", "a snowman", "-p", "a fire", "-p", "a cat"],
                                  ["-t", "caption"]])
def test_batch_records_match_static_batches(trained_dir, tmp_path, monkeypatch, task):
    """`kosmos2 batch` with continuous batching (KOSMOS2_CONTINUOUS=on) writes what static batches write, line for line
    (ground: three phrases of different lengths per image, the rows of one image admitted apart)."""
    inputs = sorted({str(lesson.path) for lesson in trained.LESSONS})
    records = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("KOSMOS2_CONTINUOUS", mode)
        out = tmp_path / f"{mode}.jsonl"
        result = invoke(["batch", *inputs, "-o", out, *task, "--model", trained_dir, "--batch-size", "4",
                         "--max-new-tokens", str(trained.MAX_NEW_TOKENS)])
        assert result.exit_code == 0, result.stderr
        records[mode] = [json.loads(line) for line in out.read_text().splitlines()]
    assert records["on"] == records["off"]
    assert [r["image"] for r in records["on"]] == inputs


def test_stager_hands_images_in_order_and_stages_the_next_ones_ahead():
    import threading

    from kosmos2_cli.runtime.engine import Prepared, _Stager

    collated = []

    def collate(chunk):
        collated.append([item.name for item in chunk])
        return torch.tensor([int(item.name) for item in chunk])

    calm = threading.Event()
    calm.set()
    stager = _Stager(collate, iter(Prepared(str(n), None, None) for n in range(10)), calm)
    try:
        parts = stager.take(4)
        assert [[i.name for i in chunk] for chunk, _ in parts] == [["0", "1", "2", "3"]]
        assert parts[0][1].tolist() == [0, 1, 2, 3]
        parts = stager.take(2)  # the four staged ahead: two now, two kept
        assert [[i.name for i in chunk] for chunk, _ in parts] == [["4", "5"]]
        assert parts[0][1].tolist() == [4, 5]
        parts = stager.take(5)  # the two kept, the two staged after them, and one more
        names = [i.name for chunk, _ in parts for i in chunk]
        assert names == ["6", "7", "8", "9"]  # only four were left
        assert torch.cat([pixels for _, pixels in parts]).tolist() == [6, 7, 8, 9]
        assert stager.take(3) == []
    finally:
        stager.close()
    assert collated[:2] == [["0", "1", "2", "3"], ["4", "5", "6", "7"]]
