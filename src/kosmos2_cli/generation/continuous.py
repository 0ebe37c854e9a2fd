"""Continuous batching: a fixed set of decoder rows, each taking the next prompt as soon as its answer ends.

Real captions end at different lengths. A static batch steps until its longest answer is done, its finished rows
riding along; here the slots of finished rows in the key/value cache are refilled with new prompts (prefilled
apart, then copied in), so every decode step carries up to `rows` answers in flight. A row attends only over
its own slots and its positions count its own tokens, so each answer is what the same prompt gets alone.

On CUDA the host learns which rows ended from flags copied back behind each step, and reads those of the step
LOOKAHEAD_CUDA steps back: the GPU always has queued work, and the schedule (which prompt takes which row,
when) does not depend on timing, so sampling with a seed repeats.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kosmos2_cli.generation.generate import LOOKAHEAD_CUDA, WINDOW, Decoder, Sampling, image_block, left_align
from kosmos2_cli.model.cache import KVCache

# Rows are refilled once this share of them is free (or none runs): prefilling a handful of prompts at a time
# leaves a GPU mostly idle, while a quarter of a large batch prefills at nearly full efficiency.
REFILL_SHARE = 0.25


@dataclass
class Prompt:
    """One prompt to answer: token ids, where the image goes, the image's embeddings; `tag` comes back with
    the answer."""

    tag: object
    ids: list[int]
    image_mask: list[int]
    embeds: Tensor  # (image tokens, width) on the model's device
    max_new_tokens: int | None = None  # this prompt's own cap, below the run's


@torch.no_grad()
def stream(model, admit: Callable[[int], list[Prompt]], *, rows: int, longest_prompt: int, max_new_tokens: int,
           stops: Sequence[int], pad: int, sampling: Sampling | None = None, lookahead: int | None = None,
           refill_share: float = REFILL_SHARE, calm: threading.Event | None = None,
           ) -> Iterator[tuple[object, list[int]]]:
    """(tag, answer ids) for every prompt `admit` hands over, in the order the answers end.

    `admit(n)` returns up to `n` new prompts, fewer only when there are no more; none is longer than
    `longest_prompt`. An answer ends with a token of `stops` (kept) or after `max_new_tokens`.
    `lookahead`: steps the host reads the flags behind (default: LOOKAHEAD_CUDA on CUDA, 0 elsewhere).
    `refill_share`: refill once this share of the rows is free (1: only when all are, i.e. static batches).
    `calm` is cleared while a refill is admitted and launched (hundreds of kernels, each launch holding the GIL):
    threads that wait for it to be set keep out of the way then, and the device does not wait for the launches.
    """
    if rows < 1 or max_new_tokens < 1:
        raise ValueError("rows and max_new_tokens must be at least 1")
    refill_at = max(1, min(rows, int(rows * refill_share)))
    run = _Rows(model, rows, longest_prompt, max_new_tokens, stops, pad, sampling or Sampling(), lookahead,
                refill_at, calm or threading.Event())
    yield from run.loop(admit)


class _Rows:
    """The state of one continuous run: device tensors per row, and the host's view of which row holds what."""

    def __init__(self, model, rows: int, longest_prompt: int, max_new_tokens: int, stops: Sequence[int], pad: int,
                 sampling: Sampling, lookahead: int | None, refill_at: int, calm: threading.Event) -> None:
        device = model.device
        self.model, self.rows, self.pad, self.sampling = model, rows, pad, sampling
        self.max_new, self.longest = max_new_tokens, longest_prompt
        self.refill_at, self.calm = refill_at, calm
        self.decoder = Decoder.for_model(model, rows, longest_prompt + max_new_tokens, device)
        self.cache = self.decoder.cache
        self.cache.reset()
        self.cache.static = True  # fixed capacity: finished rows step in place until they are refilled
        self.decoder.filled = self.cache.capacity  # attention reads every slot (masked): no row's own slot is cut
        width = -(-longest_prompt // WINDOW) * WINDOW
        self.scratch = KVCache.for_model(model.config.text_config, rows, width, device, model.cache_dtype)
        self.stops = torch.tensor(sorted(set(stops)), dtype=torch.long, device=device)
        self.tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
        self.count = torch.zeros(rows, dtype=torch.long, device=device)  # tokens generated per row
        self.limit = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)  # each row's cap
        self.running = torch.zeros(rows, dtype=torch.bool, device=device)
        self.last = torch.full((rows,), pad, dtype=torch.long, device=device)  # each row's next input token
        self.cuda = device.type == "cuda"
        self.lookahead = (LOOKAHEAD_CUDA if self.cuda else 0) if lookahead is None else lookahead
        # Each step's flags (running, count) are copied into a ring of host buffers, read `lookahead` steps later.
        ring = self.lookahead + 2
        pinned = self.cuda
        self.ring = [(torch.empty(rows, dtype=torch.bool, pin_memory=pinned),
                      torch.empty(rows, dtype=torch.long, pin_memory=pinned)) for _ in range(ring)]
        self.events: list[torch.cuda.Event | None] = [None] * ring
        self.steps = 0  # decode steps launched
        self.read = 0  # steps whose flags the host has read
        # The host's view: the tag each row answers (None: free), and the first step whose flags speak for it.
        self.tags: list[object | None] = [None] * rows
        self.since = [0] * rows
        self.harvests: deque[tuple[list[object], list[int], Tensor, torch.cuda.Event | None]] = deque()

    def loop(self, admit: Callable[[int], list[Prompt]]) -> Iterator[tuple[object, list[int]]]:
        more = True
        while True:
            free = [r for r in range(self.rows) if self.tags[r] is None]
            busy = self.rows - len(free)
            if more and free and (busy == 0 or len(free) >= self.refill_at):
                self.calm.clear()
                try:
                    prompts = admit(len(free))
                    more = len(prompts) == len(free)
                    if prompts:
                        self._refill(free[: len(prompts)], prompts)
                        busy += len(prompts)
                finally:
                    self.calm.set()
            if busy == 0:
                break
            self._step()
            self._read_flags(self.steps - 1 - self.lookahead)
            yield from self._delivered(wait=False)
        yield from self._delivered(wait=True)

    def _refill(self, rows: list[int], prompts: list[Prompt]) -> None:
        """Prefill `prompts` apart, copy their keys and values into `rows`, and choose their first tokens."""
        device = self.tokens.device
        longest = max(len(p.ids) for p in prompts)
        if longest > self.longest:
            raise ValueError(f"a prompt of {longest} tokens is longer than the {self.longest} this run allows")
        ids = torch.full((len(prompts), longest), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.bool)
        valid = torch.zeros((len(prompts), longest), dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, : len(p.ids)] = torch.tensor(p.ids)
            mask[i, : len(p.image_mask)] = torch.tensor(p.image_mask, dtype=torch.bool)
            valid[i, : len(p.ids)] = True
        embeds = torch.stack([p.embeds for p in prompts])
        unpadded = bool(valid.all())
        image_start = image_block(mask, embeds.shape[1]) if unpadded else None
        if not unpadded:
            ids, mask, valid = left_align(valid, ids, mask, valid)
        scratch = self.scratch.head(len(prompts))
        scratch.reset()
        logits = self.model.prefill(ids.to(device), scratch, attention_mask=valid.to(device), image_embeds=embeds,
                                    image_embeds_position_mask=mask.to(device), unpadded=unpadded,
                                    image_start=image_start)
        first = self.sampling.choose(logits)
        index = torch.tensor(rows, device=device)
        self.cache.load_rows(index, scratch)
        self.tokens.index_fill_(0, index, self.pad)
        self.tokens[index, 0] = first
        self.count.index_fill_(0, index, 1)
        limits = [min(p.max_new_tokens or self.max_new, self.max_new) for p in prompts]
        self.limit[index] = torch.tensor(limits, device=device)
        self.running[index] = ~torch.isin(first, self.stops) & (self.limit[index] > 1)
        self.last[index] = first
        for row, prompt in zip(rows, prompts, strict=True):
            self.tags[row], self.since[row] = prompt.tag, self.steps

    def _step(self) -> None:
        logits = self.decoder.step(self.last, ~self.running)
        chosen = torch.where(self.running, self.sampling.choose(logits), self.pad)
        rows = torch.arange(self.rows, device=chosen.device)
        at = self.count.clamp(max=self.max_new - 1)  # a row that used its last token keeps it there
        self.tokens[rows, at] = torch.where(self.running, chosen, self.tokens[rows, at])
        self.count += self.running
        self.running &= ~torch.isin(chosen, self.stops) & (self.count < self.limit)
        self.last = chosen
        slot = self.steps % len(self.ring)
        running, count = self.ring[slot]
        running.copy_(self.running, non_blocking=self.cuda)
        count.copy_(self.count, non_blocking=self.cuda)
        if self.cuda:
            self.events[slot] = torch.cuda.Event()
            self.events[slot].record()
        self.steps += 1

    def _read_flags(self, upto: int) -> None:
        """Learn which rows had ended by step `upto`, free them, and start copying their answers back."""
        while self.read <= upto:
            slot = self.read % len(self.ring)
            if self.events[slot] is not None:
                self.events[slot].synchronize()
            running, count = (flags.tolist() for flags in self.ring[slot])
            ended = [r for r in range(self.rows)
                     if not running[r] and self.tags[r] is not None and self.since[r] <= self.read]
            if ended:
                self._harvest(ended, [count[r] for r in ended])
            self.read += 1

    def _harvest(self, ended: list[int], lengths: list[int]) -> None:
        """Copy the ended rows' answers to the host behind the queued steps (a refill of the rows comes after)."""
        answers = self.tokens.index_select(0, torch.tensor(ended, device=self.tokens.device))
        event = None
        if self.cuda:
            host = torch.empty(answers.shape, dtype=answers.dtype, pin_memory=True)
            host.copy_(answers, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            answers = host
        self.harvests.append(([self.tags[r] for r in ended], lengths, answers, event))
        for r in ended:
            self.tags[r] = None

    def _delivered(self, wait: bool) -> Iterator[tuple[object, list[int]]]:
        while self.harvests and (wait or self.harvests[0][3] is None or self.harvests[0][3].query()):
            tags, lengths, answers, event = self.harvests.popleft()
            if event is not None:
                event.synchronize()
            for tag, length, row in zip(tags, lengths, answers.tolist(), strict=True):
                yield tag, row[:length]
