"""The row scheduler: a fixed set of decoder rows, each taking the next prompt as soon as its answer ends.

Every answer the pipeline makes with one beam goes through here: a batch of images (static batches are the case
where rows refill only once all are free), a folder streamed through `kosmos2 batch`, and requests arriving at
`kosmos2 serve`. Real answers end at different lengths; a static batch steps until its longest answer is done,
while here the slots of finished rows in the key/value cache are refilled with new prompts (prefilled in place when
the rows are side by side, else apart and then copied in), so each decode step carries up to `rows` answers. A row
attends only over its own slots and its positions count its own tokens, so each answer is what its prompt gets
alone. Each prompt brings its own cap, its own stop tokens (`ground` stops at `</object>`) and, if it likes, its
own way of choosing tokens.

On CUDA the host learns which rows ended from flags copied back behind each step. It reads each step's flags as
soon as they have arrived and waits for them only `lookahead` steps back: the GPU keeps up to ROWS_LOOKAHEAD_CUDA
steps queued (~50 ms), enough to cover the host launching a large refill. A run that draws tokens reads the
flags of exactly the step `lookahead` back instead: its schedule (which prompt takes which row, when) then does
not depend on timing, so sampling with a seed repeats. Nothing else waits for the device: tables go over
queued (`_to`), answers come back into page-locked memory behind an event (tests/test_no_sync.py). Greedy
steps (the decoder, the choice, each row's bookkeeping) replay as one CUDA graph: launched one by one, their ~30
small kernels each waited for Python's lock while `kosmos2 batch`'s other threads ran, and a step took longer on
the host than on the GPU.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kosmos2_cli.fast.graphs import Graphed
from kosmos2_cli.fast.marks import mark
from kosmos2_cli.generation.decoder import WINDOW, Decoder, image_block, left_align
from kosmos2_cli.generation.sampling import Sampling
from kosmos2_cli.model.cache import KVCache

# In a long run, rows are refilled once this share of them is free (or none runs): prefilling a handful of
# prompts at a time leaves a GPU mostly idle, while a quarter of a large batch prefills at nearly full efficiency.
REFILL_SHARE = 0.25
NO_TOKEN = -1  # fills the per-row stop table where a row has fewer extra stops
OWN_STOPS = 2  # room for each row's extra stops from the start (a wider table means a new step graph)
ROWS_LOOKAHEAD_CUDA = 8  # steps the host may run ahead of the GPU; flags that arrive earlier are read earlier


@dataclass
class Prompt:
    """One prompt to answer: token ids, where the image goes, the image's embeddings; `tag` comes back with
    the answer. `stops` end this answer beside the run's; `sampling` (None: the run's) chooses its tokens."""

    tag: object
    ids: list[int]
    image_mask: list[int]
    embeds: Tensor  # (image tokens, width) on the model's device
    max_new_tokens: int | None = None  # this prompt's own cap, at most the run's
    stops: tuple[int, ...] = ()
    sampling: Sampling | None = None


@dataclass
class Answer:
    tag: object
    ids: list[int]  # the new tokens, the stop token included
    logprobs: list[float]  # of each, under the distribution it was chosen from


# admit(n, wait): up to n new prompts; [] when none is ready (wait=False), None when there will be no more.
Admit = Callable[[int, bool], "list[Prompt] | None"]


@torch.no_grad()
def stream(model, admit: Admit, *, rows: int, longest_prompt: int, max_new_tokens: int, stops: Sequence[int],
           pad: int, sampling: Sampling | None = None, lookahead: int | None = None,
           refill_share: float = REFILL_SHARE, calm: threading.Event | None = None,
           cancelled: set | None = None) -> Iterator[Answer]:
    """An Answer for every prompt `admit` hands over, in the order the answers end.

    No prompt may be longer than `longest_prompt`; an answer ends with one of `stops` or of its prompt's own
    (kept), or after its cap. `admit` is asked for prompts when rows are free (`refill_share` of them; 1: only
    when all are, i.e. static batches), with `wait=True` when no row is busy. `lookahead`: steps the host reads
    the flags behind at the latest (default: ROWS_LOOKAHEAD_CUDA on CUDA, 0 elsewhere). `calm` is cleared while a
    refill is admitted and launched (hundreds of kernels, each launch holding the GIL): threads that wait for it
    keep out of the way then. Tags put into `cancelled` (by any thread) stop their rows at the next step; no
    answer comes for them.
    """
    if rows < 1 or max_new_tokens < 1:
        raise ValueError("rows and max_new_tokens must be at least 1")
    refill_at = refill_size(rows, refill_share)
    run = _Rows.for_model(model, rows, longest_prompt, max_new_tokens, stops, pad)
    mark("rows: run ready", rows)
    run.begin(sampling or Sampling(), lookahead, refill_at, calm or threading.Event(),
              cancelled if cancelled is not None else set())
    try:
        yield from run.loop(admit)
    finally:
        run.busy = False


def refill_size(rows: int, refill_share: float = REFILL_SHARE) -> int:
    """The free rows that make a refill worth launching while other rows decode (at least 1, at most `rows`)."""
    return max(1, min(rows, int(rows * refill_share)))


def _key(model, rows: int, longest_prompt: int, max_new_tokens: int, stops: Sequence[int], pad: int) -> tuple:
    return rows, longest_prompt, max_new_tokens, tuple(sorted(set(stops))), pad, model.device, model.cache_dtype


class _Rows:
    """The state of one run: device tensors per row, and the host's view of which row holds what.

    Kept in the model's workspace and reused by the next run of the same shape, so that its step graph is
    captured once per process, not once per `Kosmos2.caption` call."""

    def __init__(self, model, rows: int, longest_prompt: int, max_new_tokens: int, stops: Sequence[int],
                 pad: int) -> None:
        device = model.device
        self.model, self.rows, self.pad = model, rows, pad
        self.max_new, self.longest = max_new_tokens, longest_prompt
        self.key = _key(model, rows, longest_prompt, max_new_tokens, stops, pad)
        # The KV cache is the workspace decoder's of this shape (its graphs unused here): `generate` and the rows
        # share one cache budget, two shapes at most, rather than each keeping its own.
        self.decoder = Decoder.for_model(model, rows, longest_prompt + max_new_tokens, device)
        self.cache = self.decoder.cache
        self._scratch: KVCache | None = None  # where refills of scattered rows prefill (made when first needed)
        self.stops = _to(torch.tensor(sorted(set(stops)), dtype=torch.long), device)
        self.own_stops = torch.full((rows, OWN_STOPS), NO_TOKEN, dtype=torch.long, device=device)  # each row's
        self.tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
        self.logprobs = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
        self.count = torch.zeros(rows, dtype=torch.long, device=device)  # tokens generated per row
        self.limit = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)  # each row's cap
        self.running = torch.zeros(rows, dtype=torch.bool, device=device)
        self.last = torch.full((rows,), pad, dtype=torch.long, device=device)  # each row's next input token
        self.flags = torch.zeros(rows, dtype=torch.bool, device=device)  # which rows still run after a step
        self.at_rows = torch.arange(rows, device=device)
        self.cuda = device.type == "cuda"
        self.graph: Graphed | None = None  # the greedy step as one CUDA graph (built on the first step)
        self.ring: list[Tensor] = []
        self.busy = False

    @property
    def scratch(self) -> KVCache:
        """A cache as wide as the longest prompt, for refills of rows that are not side by side (they prefill
        apart, then are copied in). It takes GBs at 256 rows, so it is made when the first such refill comes."""
        if self._scratch is None:
            width = -(-self.longest // WINDOW) * WINDOW
            self._scratch = KVCache.for_model(self.model.config.text_config, self.rows, width, self.tokens.device,
                                              self.model.cache_dtype)
        return self._scratch

    @classmethod
    def for_model(cls, model, rows: int, longest_prompt: int, max_new_tokens: int, stops: Sequence[int],
                  pad: int) -> _Rows:
        """The model's kept run of this shape while its decoder is still the model's, else a new one (kept)."""
        space = model.workspace
        kept = space.rows_run
        if (kept is None or kept.busy or kept.key != _key(model, rows, longest_prompt, max_new_tokens, stops, pad)
                or kept.decoder not in space.decoders.values()):
            kept = cls(model, rows, longest_prompt, max_new_tokens, stops, pad)
            if space.rows_run is None or not space.rows_run.busy:
                space.rows_run = kept
        else:
            Decoder.for_model(model, rows, longest_prompt + max_new_tokens, model.device)  # most recently used
        kept.busy = True
        return kept

    def begin(self, sampling: Sampling, lookahead: int | None, refill_at: int, calm: threading.Event,
              cancelled: set) -> None:
        """A new run: every row free, nothing pending."""
        self.sampling, self.refill_at, self.calm, self.cancelled = sampling, refill_at, calm, cancelled
        self.cache.reset()
        self.cache.static = True  # fixed capacity: finished rows step in place until they are refilled
        self.cache.window = self.cache.capacity  # attention reads every slot (masked): no row's own slot is cut
        self.own_stops.fill_(NO_TOKEN)
        self.tokens.fill_(self.pad)
        self.logprobs.zero_()
        self.count.zero_()
        self.limit.fill_(self.max_new)
        self.running.zero_()
        self.last.fill_(self.pad)
        self.lookahead = (ROWS_LOOKAHEAD_CUDA if self.cuda else 0) if lookahead is None else lookahead
        self.early = self.cuda and not sampling.do_sample  # flags read as they arrive (the schedule may vary)
        # Each step's flags (which rows run) are copied into a ring of host buffers, read `lookahead` steps later
        # at the latest.
        ring = self.lookahead + 2
        if len(self.ring) != ring:
            self.ring = [torch.empty(self.rows, dtype=torch.bool, pin_memory=self.cuda) for _ in range(ring)]
        self.events: list[torch.cuda.Event | None] = [None] * ring
        self.steps = 0  # decode steps launched
        self.read = 0  # steps whose flags the host has read
        # The host's view: the tag each row answers (None: free), the first step whose flags speak for it, and
        # the sampling of rows that choose their own way (by row).
        self.tags: list[object | None] = [None] * self.rows
        self.since = [0] * self.rows
        self.capped = [0] * self.rows  # the step count by which each row's cap has surely ended its answer
        self.samplings: dict[int, Sampling] = {}
        self.groups: list[tuple[Sampling, Tensor]] | None = []  # rows by their own sampling (None: to rebuild)
        self.harvests: deque[tuple[list[object], Tensor, Tensor, Tensor, torch.cuda.Event | None]] = deque()

    def loop(self, admit: Admit) -> Iterator[Answer]:
        exhausted = False
        while True:
            self._drop_cancelled()
            free = [r for r in range(self.rows) if self.tags[r] is None]
            busy = self.rows - len(free)
            if not exhausted and free and (busy == 0 or len(free) >= self.refill_at):
                # With every row free and answers still to hand out, prompts that are ready already go onto the
                # rows first (the device works on them while the answers are read); only with nothing ready are
                # the answers handed out before waiting for more.
                wait = busy == 0 and not self.harvests
                prompts = self._admit(admit, free, wait)
                if prompts == [] and busy == 0 and not wait:
                    yield from self._delivered(wait=True)
                    prompts = self._admit(admit, free, True)
                exhausted = prompts is None
                busy += len(prompts or ())
            if busy == 0:  # every answer out before ending (or asking again)
                yield from self._delivered(wait=True)
                if exhausted:
                    break
                continue
            self._step()
            self._free_capped()
            self._read_flags(self.steps - 1 - self.lookahead)
            if exhausted or any(tag is not None for tag in self.tags):  # else the refill goes first (above)
                yield from self._delivered(wait=False)

    def _admit(self, admit: Admit, free: list[int], wait: bool) -> list[Prompt] | None:
        """Ask for prompts for the `free` rows and launch their refill. `calm` is cleared while that launches, not
        while `admit` waits: the threads that wait for `calm` may be the ones that `admit` waits for."""
        if not wait:
            self.calm.clear()  # a prompt that is ready may come with its image's encoding launched
        prompts = admit(len(free), wait)
        self.calm.clear()
        try:
            if prompts:
                self._refill(free[: len(prompts)], prompts)
                mark("first refill launched", len(prompts))
        finally:
            self.calm.set()
        return prompts

    def _refill(self, rows: list[int], prompts: list[Prompt]) -> None:
        """Prefill `prompts` apart, copy their keys and values into `rows`, and choose their first tokens."""
        device = self.tokens.device
        longest = max(len(p.ids) for p in prompts)
        if longest > self.longest:
            raise ValueError(f"a prompt of {longest} tokens is longer than the {self.longest} this run allows")
        # Whole tables filled in NumPy, then one tensor each: a row at a time was ~2,000 PyTorch calls for a refill
        # of 256, each giving up Python's lock to the threads that prepare images and write records, and
        # `torch.tensor` of nested lists took ~3x NumPy's time (2.3 against 0.8 ms for 256 prompts, CPU).
        ids_table = np.full((len(prompts), longest), self.pad, dtype=np.int64)
        mask_table = np.zeros((len(prompts), longest), dtype=np.bool_)
        for i, p in enumerate(prompts):
            ids_table[i, : len(p.ids)] = p.ids
            mask_table[i, : len(p.image_mask)] = p.image_mask
        ids, mask = torch.from_numpy(ids_table), torch.from_numpy(mask_table)
        valid = torch.arange(longest)[None, :] < torch.tensor([len(p.ids) for p in prompts])[:, None]
        embeds = torch.stack([p.embeds for p in prompts])
        unpadded = bool(valid.all())
        image_start = image_block(mask, embeds.shape[1]) if unpadded else None
        if not unpadded:
            ids, mask, valid = left_align(valid, ids, mask, valid)
        # Checked here, on the host: the model would read the mask back from the device to check it
        one_image = bool((mask.sum(1) == embeds.shape[1]).all())
        # Rows side by side (every row of a static batch, and of each refill of a run whose answers end together)
        # take their prompts straight into the cache; others prefill apart and are copied in.
        block = rows == list(range(rows[0], rows[0] + len(rows)))
        target = self.cache.block(rows[0], rows[0] + len(rows)) if block else self.scratch.head(len(prompts))
        target.reset()
        logits = self.model.prefill(_to(ids, device), target, attention_mask=_to(valid, device),
                                    image_embeds=embeds, image_embeds_position_mask=_to(mask, device),
                                    unpadded=unpadded, image_start=image_start, one_image_per_row=one_image)
        mark("rows: first prefill launched")
        index = _to(torch.tensor(rows), device)
        if block:
            self.cache.reach(target)
        else:
            self.cache.load_rows(index, target)
        extra = max((len(p.stops) for p in prompts), default=0)
        if extra > self.own_stops.shape[1]:
            wider = torch.full((self.rows, extra), NO_TOKEN, dtype=torch.long, device=device)
            wider[:, : self.own_stops.shape[1]] = self.own_stops
            self.own_stops = wider
            self.graph = None  # it read the old table
        width = self.own_stops.shape[1]
        table = torch.tensor([[*p.stops] + [NO_TOKEN] * (width - len(p.stops)) for p in prompts], dtype=torch.long)
        self.own_stops[index] = _to(table, device)
        for row, prompt in zip(rows, prompts, strict=True):
            self.tags[row], self.since[row] = prompt.tag, self.steps
            if prompt.sampling is not None or row in self.samplings:
                self.groups = None
            if prompt.sampling is not None:
                self.samplings[row] = prompt.sampling
            else:
                self.samplings.pop(row, None)
        first, logprob = self._pick(logits, index)
        self.tokens.index_fill_(0, index, self.pad)
        self.tokens[index, 0] = first
        self.logprobs[index, 0] = logprob
        self.count.index_fill_(0, index, 1)
        limits = [min(p.max_new_tokens or self.max_new, self.max_new) for p in prompts]
        for row, limit in zip(rows, limits, strict=True):
            self.capped[row] = self.steps + limit - 1  # the first token is the prefill's, then one a step
        self.limit[index] = _to(torch.tensor(limits), device)
        self.running[index] = ~self._ends(first, index) & (self.limit[index] > 1)
        self.last[index] = first

    def _pick(self, logits: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Tokens and log-probabilities for `logits` of `rows` (all rows when None): the run's sampling, then
        each row group with a sampling of its own."""
        tokens, logprobs = self.sampling.pick(logits)
        if not self.samplings:
            return tokens, logprobs
        for sampling, members in self._groups():
            if rows is not None:  # positions within `rows` of the group's members
                members = (rows[:, None] == members[None, :]).any(1).nonzero().flatten()
                if members.numel() == 0:
                    continue
            own, own_logprobs = sampling.pick(logits.index_select(0, members))
            tokens, logprobs = tokens.index_copy(0, members, own), logprobs.index_copy(0, members, own_logprobs)
        return tokens, logprobs

    def _groups(self) -> list[tuple[Sampling, Tensor]]:
        if self.groups is None:
            by: dict[int, tuple[Sampling, list[int]]] = {}
            for row, sampling in self.samplings.items():
                by.setdefault(id(sampling), (sampling, []))[1].append(row)
            device = self.tokens.device
            self.groups = [(s, _to(torch.tensor(members), device)) for s, members in by.values()]
        return self.groups

    def _ends(self, chosen: Tensor, rows: Tensor | None = None) -> Tensor:
        own = self.own_stops if rows is None else self.own_stops[rows]
        return torch.isin(chosen, self.stops) | (chosen[:, None] == own).any(1)

    def _step(self) -> None:
        if self._graphable():
            if self.graph is None:
                self.graph = Graphed(self._advance, self._save, self._restore, max_graphs=1)
            flags = self.graph()
        else:  # draws (a generator's state) and mixed samplings run eagerly
            flags = self._advance()
        mark("rows: first step launched")
        slot = self.steps % len(self.ring)
        self.ring[slot].copy_(flags, non_blocking=self.cuda)
        if self.cuda:
            self.events[slot] = torch.cuda.Event()
            self.events[slot].record()
        self.steps += 1

    def _graphable(self) -> bool:
        return self.cuda and not self.samplings and not self.sampling.do_sample

    def _advance(self) -> Tensor:
        """One decode step for every row, in place (fixed addresses: it may be a graph); which rows run after."""
        self.cache.done.copy_(~self.running)  # the decode kernel skips finished rows' attention
        logits = self.model.decode(self.last, self.cache)
        picked, logprob = self._pick(logits)
        chosen = torch.where(self.running, picked, self.pad)
        rows = self.at_rows
        at = self.count.clamp(max=self.max_new - 1)  # a row that used its last token keeps it there
        self.tokens[rows, at] = torch.where(self.running, chosen, self.tokens[rows, at])
        self.logprobs[rows, at] = torch.where(self.running, logprob, self.logprobs[rows, at])
        self.count += self.running
        self.running &= ~self._ends(chosen) & (self.count < self.limit)
        self.last.copy_(chosen)
        self.flags.copy_(self.running)
        return self.flags

    def _save(self) -> tuple:
        """What a step changes, for the graph's warm-up and capture to leave as it found it."""
        mine = tuple(t.clone() for t in (self.tokens, self.logprobs, self.count, self.running, self.last,
                                         self.cache.done))
        return self.cache.state(), mine, (self.cache.length, self.cache.appended)

    def _restore(self, saved: tuple) -> None:
        cache_state, mine, (self.cache.length, self.cache.appended) = saved
        self.cache.set_state(cache_state)
        for live, kept in zip((self.tokens, self.logprobs, self.count, self.running, self.last, self.cache.done),
                              mine, strict=True):
            live.copy_(kept)

    def _drop_cancelled(self) -> None:
        """Rows whose tags were cancelled stop now and are free; their answers are never delivered."""
        if not self.cancelled:
            return
        gone = [r for r, tag in enumerate(self.tags) if tag is not None and tag in self.cancelled]
        if gone:
            self.running.index_fill_(0, _to(torch.tensor(gone), self.running.device), False)
            for r in gone:
                self.cancelled.discard(self.tags[r])
                self.tags[r] = None

    def _free_capped(self) -> None:
        """Rows whose caps have ended their answers by the last step launched are free now, without waiting for
        that step's flags: the host knows, so no steps run past the end of a batch whose answers all reach
        their caps, and its refill is launched behind its last step."""
        ended = [r for r in range(self.rows) if self.tags[r] is not None and self.capped[r] <= self.steps]
        if ended:
            self._harvest(ended)

    def _read_flags(self, upto: int) -> None:
        """Learn which rows had ended by step `upto` (and later, where those flags have arrived and the run may
        read them early), free them, and start copying their answers back."""
        while self.read <= upto or (self.early and self._arrived(self.read)):
            slot = self.read % len(self.ring)
            if self.events[slot] is not None:
                self.events[slot].synchronize()
            running = self.ring[slot].tolist()
            ended = [r for r in range(self.rows)
                     if not running[r] and self.tags[r] is not None and self.since[r] <= self.read]
            if ended:
                self._harvest(ended)
            self.read += 1

    def _arrived(self, step: int) -> bool:
        """Has step `step` been launched and have its flags reached the host (CUDA: its event has passed)?"""
        return step < self.steps and self.events[step % len(self.ring)].query()

    def _harvest(self, ended: list[int]) -> None:
        """Copy the ended rows' answers to the host behind the queued steps (a refill of the rows comes after)."""
        index = _to(torch.tensor(ended), self.tokens.device)
        answers, logprobs = self.tokens.index_select(0, index), self.logprobs.index_select(0, index)
        lengths = self.count.index_select(0, index)
        event = None
        if self.cuda:
            answers, logprobs, lengths = (_to_host(t) for t in (answers, logprobs, lengths))
            event = torch.cuda.Event()
            event.record()
        self.harvests.append(([self.tags[r] for r in ended], lengths, answers, logprobs, event))
        for r in ended:
            self.tags[r] = None

    def _delivered(self, wait: bool) -> Iterator[Answer]:
        while self.harvests and (wait or self.harvests[0][4] is None or self.harvests[0][4].query()):
            tags, lengths, answers, logprobs, event = self.harvests.popleft()
            if event is not None:
                event.synchronize()
            mark("first answers read")
            for tag, length, row, scores in zip(tags, lengths.tolist(), answers.tolist(), logprobs.tolist(),
                                                strict=True):
                yield Answer(tag, row[:length], scores[:length])


def _to(tensor: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on `device`, queued: a plain `.to(device)` waits for all the device's queued work to end
    first, so the GPU ran dry while the host went on (a refill or a harvest drained the steps queued ahead). From
    pageable memory CUDA stages the bytes before returning, so the host tensor may go at once."""
    return tensor.to(device, non_blocking=True)


def _to_host(tensor: Tensor) -> Tensor:
    """A page-locked copy of `tensor`, queued behind the work on the device (wait for an event before reading)."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
