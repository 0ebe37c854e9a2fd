"""The row scheduler (`generation.rows.stream`): rows that end take the next prompt, and every answer is still
exactly the reference's (the tiny trained checkpoint's lessons, whose answers end at 1 to 47 tokens), whatever
else shares the rows: other stops, other caps, other samplings, cancelled neighbours, prompts arriving late."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_helpers import invoke

from kosmos2_cli.generation.decoder import encode_images
from kosmos2_cli.generation.rows import Prompt, stream
from kosmos2_cli.generation.sampling import Sampling
from kosmos2_cli.model.cache import KVCache

trained = pytest.importorskip("trained")
pytestmark = pytest.mark.needs_shared


# On CUDA: bf16, the decode step replayed from CUDA graphs with the Triton kernels, flags read behind the steps.
DEVICES = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES, ids=lambda d: d[0])
def ours(request, trained_dir):
    from kosmos2_cli import Kosmos2ForConditionalGeneration

    device, dtype = request.param
    return Kosmos2ForConditionalGeneration.from_pretrained(trained_dir, device=device, dtype=dtype)


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

    def admit(count, wait):
        nonlocal queue
        if not queue:
            return None
        given, queue = queue[:count], queue[count:]
        if log is not None:
            log.append((count, len(given)))
        return given

    return admit


def _answers(model, prompts, rows, max_new_tokens=trained.MAX_NEW_TOKENS, log=None, admit=None, **kwargs):
    eos = model.config.text_config.eos_token_id
    pad = model.config.text_config.pad_token_id
    got = stream(model, admit or _feeder(prompts, log), rows=rows, longest_prompt=max(len(p.ids) for p in prompts),
                 max_new_tokens=max_new_tokens, stops=[eos], pad=pad, **kwargs)
    return [(answer.tag, answer.ids) for answer in got]


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


def _counting_decode(model, monkeypatch) -> list:
    calls = []
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    return calls


@pytest.mark.parametrize("lookahead", [0, 3])
def test_no_step_runs_past_answers_that_all_reach_their_caps(ours, prompts, monkeypatch, lookahead):
    """Every answer cut at 5 tokens (the prefill's and 4 steps'): a batch takes 4 steps however far behind the
    host reads the flags; the host knows the caps and does not run 3 more steps to learn from flags they ended."""
    steps = _counting_decode(ours, monkeypatch)
    got = _answers(ours, prompts[:8], rows=8, max_new_tokens=5, lookahead=lookahead)
    assert len(steps) == 4
    for tag, answer in got:
        assert answer == trained.expected(trained.LESSONS[tag]).answer_ids[:5]
    steps.clear()
    _answers(ours, prompts[:16], rows=8, max_new_tokens=5, lookahead=lookahead, refill_share=1.0)
    assert len(steps) == 8  # two batches of 4 steps


def test_a_batch_is_refilled_before_the_last_ones_answers_are_read(ours, prompts):
    """Static batches (refill share 1) of prompts that are ready: the next batch goes onto the rows, without
    waiting, before the previous batch's answers are handed out (the device works while they are read)."""
    queue, events = list(prompts[:10]), []

    def admit(count, wait):
        events.append(("admit", wait))
        given = queue[:count]
        del queue[:count]
        return given or None

    eos, pad = ours.config.text_config.eos_token_id, ours.config.text_config.pad_token_id
    for answer in stream(ours, admit, rows=5, longest_prompt=max(len(p.ids) for p in prompts), max_new_tokens=6,
                         stops=[eos], pad=pad, refill_share=1.0, lookahead=3):
        events.append(("answer", answer.tag))
        assert answer.ids == trained.expected(trained.LESSONS[answer.tag]).answer_ids[:6]
    assert events[0] == ("admit", True)  # nothing to hand out yet: waits for the first prompts
    second = events.index(("admit", False))
    assert all(kind == "admit" for kind, _ in events[:second])  # no answer read before the second batch
    assert sorted(tag for kind, tag in events if kind == "answer") == list(range(10))


def test_a_slow_writer_does_not_stall_the_run(trained_dir, shared_fixtures):
    """The model waits for a writer that lags (at most `prefetch` records ahead) while no row runs; the writer
    must not wait for the model then (a run with a slow consumer used to hang there for good)."""
    import threading
    import time

    from kosmos2_cli.api.tasks import TaskSpec
    from kosmos2_cli.runtime.engine import PipelineEngine
    from kosmos2_cli.runtime.runner import Runner

    names = [str(lesson.path) for lesson in trained.LESSONS[:6]]
    runner = Runner(PipelineEngine(trained_dir, device="cpu"), TaskSpec.build("caption"), batch_size=2, prefetch=1)
    got: list = []

    def consume() -> None:
        for outcome, _ in runner.run(names):
            time.sleep(0.2)
            got.append(outcome)

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the run hung"
    assert [outcome.image for outcome in got] == names


def test_one_token_answers(ours, prompts):
    for tag, answer in _answers(ours, prompts, rows=3, max_new_tokens=1):
        assert answer == trained.expected(trained.LESSONS[tag]).answer_ids[:1]


def test_sampling_with_a_seed_repeats(ours, prompts):
    def run():
        generator = torch.Generator(device=ours.device).manual_seed(7)
        return _answers(ours, prompts[:10], rows=4, sampling=Sampling(True, 2.0, 50, 1.0, generator),
                        lookahead=2)

    first = run()
    assert first == run()
    assert any(answer != trained.expected(trained.LESSONS[tag]).answer_ids for tag, answer in first)


def test_a_prompt_longer_than_announced_is_refused(ours, prompts):
    eos = ours.config.text_config.eos_token_id
    with pytest.raises(ValueError, match="longer than"):
        list(stream(ours, _feeder(prompts), rows=2, longest_prompt=10, max_new_tokens=4, stops=[eos], pad=1))


def test_no_prompts_no_steps(ours):
    assert list(stream(ours, lambda count, wait: None, rows=4, longest_prompt=80, max_new_tokens=4, stops=[2],
                       pad=1)) == []


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
    """`kosmos2 batch` with rows refilled as they free (the default) writes what static batches (rows refilled
    only once all are free) write, line for line (ground: three phrases of different lengths per image, the rows
    of one image admitted apart)."""
    inputs = sorted({str(lesson.path) for lesson in trained.LESSONS})
    records = {}
    for share in ("0.25", "1"):
        monkeypatch.setenv("KOSMOS2_REFILL_SHARE", share)
        out = tmp_path / f"{share}.jsonl"
        result = invoke(["batch", *inputs, "-o", out, *task, "--model", trained_dir, "--batch-size", "4",
                         "--max-new-tokens", str(trained.MAX_NEW_TOKENS)])
        assert result.exit_code == 0, result.stderr
        records[share] = [json.loads(line) for line in out.read_text().splitlines()]
    scores = {share: [[e.pop("scores") for e in r["entities"]] for r in rs] for share, rs in records.items()}
    assert records["0.25"] == records["1"]
    assert [r["image"] for r in records["1"]] == inputs
    # Box scores: the same within float noise (rows of other batches change a product's summation order); on
    # CUDA the logits are bf16 (8 bits of mantissa), whose rounding moves a probability by up to a few hundredths.
    tolerance = 0.05 if torch.cuda.is_available() else 1e-5
    assert scores["0.25"] == [[pytest.approx(s, abs=tolerance) for s in r] for r in scores["1"]]


def test_stager_hands_images_in_order_and_stages_the_next_ones_ahead():
    import threading

    from kosmos2_cli.runtime.prepare import Prepared
    from kosmos2_cli.runtime.stager import Stager

    collated = []

    def collate(chunk):
        collated.append([item.name for item in chunk])
        return torch.tensor([int(item.name) for item in chunk])

    calm = threading.Event()
    calm.set()
    stager = Stager(collate, iter(Prepared(str(n), None, None) for n in range(10)), calm)
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


def test_stager_stages_on_demand_when_a_refill_finds_nothing_staged():
    """A refill clears `calm` and then takes: staging ahead that had not started before the refill must not
    wait for `calm` (set again only after this take), or the model's thread waits for it forever."""
    import threading

    from kosmos2_cli.runtime.prepare import Prepared
    from kosmos2_cli.runtime.stager import Stager

    calm = threading.Event()  # cleared: a refill is in progress the whole time
    stager = Stager(lambda chunk: torch.tensor([int(i.name) for i in chunk]),
                    iter(Prepared(str(n), None, None) for n in range(6)), calm)
    taken = []
    worker = threading.Thread(target=lambda: taken.extend(stager.take(2) + stager.take(2)), daemon=True)
    worker.start()
    worker.join(timeout=10)
    try:
        assert not worker.is_alive(), "the second take waited for calm"
        assert [i.name for chunk, _ in taken for i in chunk] == ["0", "1", "2", "3"]
    finally:
        calm.set()
        stager.close()


def test_each_prompt_stops_at_its_own_stops(ours, prompts, trained_dir):
    """Rows that stop at `</object>` (ground) beside rows that do not: each answer is its lesson's, cut after
    its first `</object>` where the prompt asks for that."""
    from dataclasses import replace

    from kosmos2_cli import Kosmos2Processor

    end = Kosmos2Processor.from_pretrained(trained_dir).tokenizer.convert_tokens_to_ids("</object>")
    mixed = [replace(p, stops=(end,)) if p.tag % 2 else p for p in prompts]
    cut = 0
    for tag, answer in _answers(ours, mixed, rows=5):
        want = trained.expected(trained.LESSONS[tag]).answer_ids
        if tag % 2 and end in want:
            want = want[: want.index(end) + 1]
            cut += 1
        assert answer == want, trained.LESSONS[tag].key
    assert cut >= 3


def test_a_prompt_may_sample_its_own_way_beside_greedy_rows(ours, prompts):
    """One prompt draws with its own seeded generator; the greedy rows beside it are unchanged, and its own
    draws repeat whatever shares the rows."""
    from dataclasses import replace

    def run(rows, neighbours):
        generator = torch.Generator(device=ours.device).manual_seed(5)
        sampled = replace(prompts[0], sampling=Sampling(True, 1.5, 0, 1.0, generator))
        got = dict(_answers(ours, [sampled, *prompts[1: 1 + neighbours]], rows=rows))
        for tag in range(1, 1 + neighbours):
            assert got[tag] == trained.expected(trained.LESSONS[tag]).answer_ids
        return got[0]

    alone = run(1, 0)
    assert run(4, 9) == alone
    assert alone != trained.expected(trained.LESSONS[0]).answer_ids


def test_log_probabilities_are_the_models(ours, prompts):
    """Each answer token's log-probability is the log-softmax of the model's logits there (teacher forcing)."""
    eos, pad = ours.config.text_config.eos_token_id, ours.config.text_config.pad_token_id
    answers = list(stream(ours, _feeder(prompts[:6]), rows=3, longest_prompt=max(len(p.ids) for p in prompts),
                          max_new_tokens=trained.MAX_NEW_TOKENS, stops=[eos], pad=pad))
    for answer in answers:
        inputs = trained.prompt_inputs(trained.LESSONS[answer.tag])
        ids = torch.tensor([inputs["input_ids"][0].tolist() + answer.ids[:-1]], device=ours.device)
        mask = torch.zeros_like(ids)
        mask[:, : inputs["image_embeds_position_mask"].shape[1]] = inputs["image_embeds_position_mask"]
        with torch.no_grad():
            logits = ours(pixel_values=inputs["pixel_values"].to(ours.device), input_ids=ids,
                          image_embeds_position_mask=mask.to(ours.device)).logits[0].float()
        start = inputs["input_ids"].shape[1] - 1
        want = logits[start:].log_softmax(-1).gather(1, torch.tensor(answer.ids, device=ours.device)[:, None])
        tolerance = 5e-4 if ours.device.type == "cpu" else 5e-2  # cached steps against one full pass
        torch.testing.assert_close(torch.tensor(answer.logprobs), want.squeeze(1).cpu(), atol=tolerance, rtol=0)


def test_cancelled_rows_stop_and_never_answer(ours, prompts):
    cancelled = set()
    log = []

    def admit(count, wait):
        given = _feeder_queue[:count]
        del _feeder_queue[:count]
        if given and not log:
            cancelled.update({1, 2})  # two of the first rows go away after they are admitted
        log.append(len(given))
        return given or None

    _feeder_queue = list(prompts[:8])
    got = _answers(ours, prompts[:8], rows=4, admit=admit, cancelled=cancelled)
    assert sorted(tag for tag, _ in got) == [0, 3, 4, 5, 6, 7]
    for tag, answer in got:
        assert answer == trained.expected(trained.LESSONS[tag]).answer_ids
    assert not cancelled  # each cancelled tag was seen and dropped


def test_prompts_may_arrive_while_rows_run(ours, prompts):
    """A source that has nothing ready at times (a server between requests): rows keep going, late prompts
    join them (`refill_share` 0: any free row takes one), and with no row running the source is asked to wait."""
    schedule = [prompts[:2], [], [], prompts[2:3], [], [], prompts[3:6]]
    arrived: list = []
    waits = []

    def admit(count, wait):
        waits.append(wait)
        if schedule:
            arrived.extend(schedule.pop(0))
        if not arrived and not schedule:
            return None
        given = arrived[:count]
        del arrived[:count]
        return given

    got = _answers(ours, prompts[:6], rows=3, admit=admit, refill_share=0.0)
    assert sorted(tag for tag, _ in got) == list(range(6))
    for tag, answer in got:
        assert answer == trained.expected(trained.LESSONS[tag]).answer_ids
    assert waits[0] and not all(waits)


class _GraphLike:
    """What a CUDA graph does with `_Rows._advance`, on the CPU: the warm-up really runs (its effects undone by
    restore), the capture runs nothing, and each replay runs the same kernels on the same memory. A step that
    rebinds a tensor the graph would have read, or leaves the warm-up's effects behind, gives wrong answers here
    as it would on CUDA."""

    captures = 0

    def __init__(self, fn, save, restore, max_graphs=1):
        self.fn, self.save, self.restore = fn, save, restore
        self.run = None

    def __call__(self):
        if self.run is None:
            type(self).captures += 1
            owner = self.fn.__self__
            state = self.save()
            self.fn()
            self.restore(state)
            self.run = {name: t.data_ptr() for name, t in vars(owner).items() if isinstance(t, torch.Tensor)}
            self.output = self.fn()
            return self.output
        owner = self.fn.__self__
        now = {name: t.data_ptr() for name, t in vars(owner).items() if isinstance(t, torch.Tensor)}
        assert now == self.run, "a replayed step would read tensors that were replaced"
        assert self.fn() is self.output
        return self.output


def test_a_step_replayed_as_a_graph_gives_every_answer(ours, prompts, monkeypatch):
    """The greedy step is one CUDA graph: in place, same memory every step, warm-up undone; and the run (its
    buffers and its graph) is kept for the next run of the same shape."""
    import kosmos2_cli.generation.rows as rows_module

    monkeypatch.setattr(rows_module, "Graphed", _GraphLike)
    monkeypatch.setattr(rows_module._Rows, "_graphable",
                        lambda self: not self.samplings and not self.sampling.do_sample)
    ours.workspace.rows_run = None
    _GraphLike.captures = 0
    for _ in range(2):
        got = _answers(ours, prompts, rows=5, lookahead=2)
        assert sorted(tag for tag, _ in got) == list(range(len(prompts)))
        for tag, answer in got:
            assert answer == trained.expected(trained.LESSONS[tag]).answer_ids, trained.LESSONS[tag].key
    assert _GraphLike.captures == 1  # the second run reused the first one's step
    _answers(ours, prompts, rows=4)
    assert _GraphLike.captures == 2  # another shape, another run


def test_prepared_bytes_encode_exactly_as_the_float_pixels(trained_dir):
    """`kosmos2 batch` and the service prepare each picture as its resized bytes (what crosses processes and goes
    to the device); the model side looks up their values, and the image embeddings are those of the float path,
    bit for bit."""
    from kosmos2_cli.api.tasks import TaskSpec
    from kosmos2_cli.processing.images import load_image
    from kosmos2_cli.runtime.engine import PipelineEngine

    engine = PipelineEngine(trained_dir, device="cpu", dtype="float32")
    names = sorted({str(lesson.path) for lesson in trained.LESSONS})[:3]
    prepared = [engine.prepare(name, TaskSpec.build("caption")) for name in names]
    assert all(item.inputs.dtype == np.uint8 for item in prepared)
    collated = engine.collate(prepared)
    assert collated.dtype == torch.uint8
    floats = engine.kosmos.preprocess([load_image(name) for name in names])
    assert torch.equal(engine.kosmos._values(collated), floats)
    assert torch.equal(engine.kosmos.encode_pixels(collated), engine.kosmos.encode_pixels(floats))


class _Arrival:
    """A stand-in for a step's CUDA event: `query` says whether the step's flags have reached the host."""

    def __init__(self, arrived: bool) -> None:
        self.arrived, self.waited = arrived, False

    def query(self) -> bool:
        return self.arrived

    def synchronize(self) -> None:
        self.waited = True


@pytest.mark.parametrize("early", [True, False])
def test_flags_that_have_arrived_are_read_early_and_the_rest_waited_for_only_lookahead_back(early):
    """On CUDA (here: events stood in for) a greedy run reads every step's flags that have arrived, in order, up to
    the first that has not; it waits only for those `lookahead` steps back. A sampling run reads exactly those."""
    from kosmos2_cli.generation.rows import _Rows

    run = _Rows.__new__(_Rows)
    run.rows, run.early, run.read, run.steps = 2, early, 0, 6
    run.tags, run.since = ["a", "b"], [0, 0]
    # Row 1 ended at step 3 (its flag false from then on); steps 0-3 have arrived, 4 and 5 not yet.
    run.ring = [torch.tensor([True, step < 3]) for step in range(8)]
    run.events = [_Arrival(step <= 3) for step in range(6)] + [None, None]
    harvested = []
    run._harvest = lambda ended: harvested.append((run.read, ended))
    run._read_flags(1)  # as after launching step 5 with lookahead 4: wait for steps 0 and 1
    assert [event.waited for event in run.events[:2]] == [True, True]
    if early:
        assert run.read == 4 and harvested == [(3, [1])]
    else:
        assert run.read == 2 and harvested == []
    assert not run.events[4].waited and not run.events[5].waited


def test_cache_block_is_rows_of_the_cache():
    """A refill of rows side by side prefills straight into them: the block is those rows' memory, empty of
    its own accord and not static (a prompt attends over its own length)."""
    cache = KVCache(2, 4, 2, 8, 16, torch.device("cpu"), torch.float32)
    cache.static = True
    block = cache.block(1, 3)
    block.keys[1][0, 1, 5, 0] = 7.0
    block.next_slot[1] = 9
    assert cache.keys[1][1, 1, 5, 0] == 7.0 and cache.next_slot[2] == 9
    assert block.batch == 2 and block.capacity == 16 and not block.static and cache.static
    block.reset()
    block.append(torch.ones(2, 5, dtype=torch.bool))
    cache.reach(block)
    assert cache.length == 5 and cache.valid[1:3, :5].all() and not cache.valid[[0, 3]].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_load_rows_puts_each_prompt_in_its_row(dtype):
    """Copied as 8-byte words (bf16) or element by element (float64 already is one), each prefilled row lands
    whole in its row, nothing else."""
    cache = KVCache(2, 5, 3, 8, 16, torch.device("cpu"), dtype)
    other = KVCache(2, 2, 3, 8, 8, torch.device("cpu"), dtype)
    for t in other.keys + other.values:
        t.copy_(torch.randn(t.shape))
    other.append(torch.tensor([[True] * 6, [False, True, True, True, True, True]]))
    rows = torch.tensor([4, 1])
    cache.load_rows(rows, other)
    for mine, theirs in zip(cache.keys + cache.values, other.keys + other.values, strict=True):
        assert torch.equal(mine[rows, :, :6], theirs[:, :, :6])
        assert not mine[[0, 2, 3]].any() and not mine[:, :, 6:].any()
    assert cache.valid[1].tolist()[:6] == [False] + [True] * 5 and cache.next_slot[[4, 1]].tolist() == [6, 6]
