"""Text generation for Kosmos-2: greedy, sampling and beam search over a key/value cache.

Each mode makes the same choices as the reference's `generate` (same argmax, same warpers in the same order,
the same beam bookkeeping), so the same weights give the same tokens. Prompts of different lengths are
left-aligned internally, with positions counted over real tokens only, so every row of a batch gets exactly
what it would get alone, whichever side the caller padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kosmos2_cli.fast.graphs import Graphed
from kosmos2_cli.fast.modules import FastAttention
from kosmos2_cli.model.cache import KVCache

DEFAULT_MAX_NEW_TOKENS = 128


def left_align(valid: Tensor, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Move each row's padding to its start (a stable reorder of columns); `valid` marks real tokens."""
    order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)
    return tuple(None if t is None else torch.gather(t, 1, order) for t in tensors)


def warp_logits(scores: Tensor, temperature: float, top_k: int | None, top_p: float, keep: int = 1) -> Tensor:
    """Temperature, then top-k, then top-p filtering: the reference's order and arithmetic."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        k = min(max(top_k, keep), scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -keep:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores


@dataclass
class Sampling:
    """How the next token is chosen: the argmax, or a draw after the reference's warpers."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def choose(self, logits: Tensor) -> Tensor:
        if not self.do_sample:
            return logits.argmax(dim=-1)
        probs = warp_logits(logits.float(), self.temperature, self.top_k, self.top_p).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


WINDOW = 64  # decode steps attend over the cache in windows of this many slots (one graph per window)
GRAPHED_PREFILL_BATCH = 16  # up to this batch the prompt is bound by kernel launches: it replays a graph
# The image encoder replays a graph at any batch up to this: in `kosmos2 batch` the model thread launches it while
# the runner's thread finishes the previous batch, and each launch waiting for Python's lock left an H100 idle
# ~25 ms of a 256-image encoder's ~90.
GRAPHED_ENCODER_BATCH = 1024
# On CUDA the host learns whether every row is done from a flag copied back without waiting; it waits only when
# it runs this many steps ahead of the GPU. So the GPU always has queued steps, and at most this many are extra.
LOOKAHEAD_CUDA = 3


class Decoder:
    """Runs the model over a cache: a prompt once (prefill), then one token per row per step.

    A decoder is kept per (batch, capacity) and reused across `generate` calls. On CUDA the decode step runs as
    CUDA graphs over the fixed-shape cache, one per attention window (a step reads only the first multiple of
    WINDOW slots that holds every row's tokens), and so does the prefill of small batches.
    """

    def __init__(self, model, batch: int, capacity: int, device: torch.device, graphs: bool) -> None:
        self.model = model
        self.cache = KVCache.for_model(model.config.text_config, batch, capacity, device, model.cache_dtype)
        self.graphs = graphs
        self.static = graphs  # fixed-shape attention (what a graph needs); tests force it on the CPU
        self.filled = 0  # slots used by the longest row
        self.unpadded = False  # the current prompts have no padding: plain causal attention in prefill
        self.image_start = None  # where every row's image slots begin, when the caller knows (see prefill)
        if graphs:
            model.text_model.model.ensure_positions(capacity + 2)
            self._step = Graphed(self._step_logits, self.cache.state, self.cache.set_state)
            self._prefill = Graphed(self._prefill_logits, max_graphs=4, capture_after=1)

    @classmethod
    def for_model(cls, model, batch: int, needed: int, device: torch.device) -> Decoder:
        """The model's decoder for this shape (capacity rounded up so nearby lengths share one)."""
        capacity = -(-needed // WINDOW) * WINDOW
        graphs = device.type == "cuda"
        decoders = model.workspace.decoders
        key = (batch, capacity, device, model.cache_dtype, graphs)
        if key not in decoders:
            while len(decoders) >= 2:  # each holds a KV cache: keep the two most recent shapes
                decoders.pop(next(iter(decoders)))
            decoders[key] = cls(model, batch, capacity, device, graphs)
        decoders[key] = decoders.pop(key)  # most recently used last
        return decoders[key]

    def prefill(self, input_ids: Tensor, valid: Tensor, image_embeds: Tensor | None,
                image_mask: Tensor | None, unpadded: bool = False, image_start: int | None = None) -> Tensor:
        """The prompts' logits at their last token; `unpadded` (no padding anywhere) allows plain causal attention,
        `image_start` says that every row's image slots are the one block from there (`image_block`)."""
        self.cache.reset()
        self.cache.static = False  # the prompt attends over its own length only
        self.unpadded = unpadded
        self.image_start = image_start
        small = input_ids.shape[0] <= GRAPHED_PREFILL_BATCH
        if self.graphs and small and image_embeds is not None and image_mask is not None:
            logits = self._prefill(input_ids, valid, image_embeds, image_mask, key=(unpadded, image_start))
            self.cache.length = input_ids.shape[1]
        else:
            logits = self._prefill_logits(input_ids, valid, image_embeds, image_mask)
        self.filled = input_ids.shape[1]
        self.cache.static = self.static
        return logits

    def step(self, tokens: Tensor, done: Tensor | None = None) -> Tensor:
        """Logits after one more token per row; rows flagged in `done` have finished (their logits are ignored),
        so the CUDA decode kernel skips their attention: a batch gets cheaper as its captions end."""
        if done is not None:
            self.cache.done.copy_(done)
        self.filled = min(self.filled + 1, self.cache.capacity)
        # The Triton decode kernel reads each row's length on the device: one window (graph) serves all steps.
        attention = self.model.text_model.model.layers[0].self_attn
        whole = isinstance(attention, FastAttention) and attention.decode_kernel
        self.cache.window = self.cache.capacity if whole else min(-(-self.filled // WINDOW) * WINDOW,
                                                                  self.cache.capacity)
        if self.graphs:
            return self._step(tokens, key=(self.cache.window,))
        return self._step_logits(tokens)

    def _prefill_logits(self, ids: Tensor, valid: Tensor, image_embeds, image_mask) -> Tensor:
        self.cache.reset()
        return self.model.prefill(ids, self.cache, attention_mask=valid, image_embeds=image_embeds,
                                  image_embeds_position_mask=image_mask, unpadded=self.unpadded,
                                  image_start=self.image_start)

    def _step_logits(self, tokens: Tensor) -> Tensor:
        return self.model.decode(tokens, self.cache)  # in the model's dtype: greedy picks from it as from fp32

    def reorder(self, rows: Tensor) -> None:
        self.cache.reorder(rows)


def encode_images(model, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
    """Image embeddings; on CUDA a batch size seen before replays a graph (its output is overwritten by the next
    call)."""
    if pixel_values.is_cuda and pixel_values.shape[0] <= GRAPHED_ENCODER_BATCH and not interpolate_pos_encoding:
        space = model.workspace
        if space.vision_graph is None:
            space.vision_graph = Graphed(model.get_image_features, max_graphs=4, capture_after=1)
        return space.vision_graph(pixel_values.to(model.dtype))
    return model.get_image_features(pixel_values, interpolate_pos_encoding)


@torch.no_grad()
def generate(
    model,
    pixel_values: Tensor | None = None,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    image_embeds: Tensor | None = None,
    image_embeds_position_mask: Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    num_beams: int = 1,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_token_ids: Sequence[int] = (),
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    interpolate_pos_encoding: bool = False,
    use_cache: bool = True,
    **_ignored,
) -> Tensor:
    """Prompt + generated tokens, shape (batch, prompt + steps); rows that stop early are filled with padding.

    `stop_token_ids` end a row like EOS does (the stop token is kept): `kosmos2 ground` stops at `</object>`.
    Until `min_new_tokens` are generated, EOS is ruled out (as the reference's min-new-tokens processor does).
    `seed` (or `generator`) makes sampling repeatable; with the same seed it draws what
    `torch.manual_seed(seed)` + the reference draw.
    """
    if input_ids is None:
        raise ValueError("generate needs input_ids (use the processor to build them)")
    text_config = model.config.text_config
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [text_config.eos_token_id])
    pad = text_config.pad_token_id if pad_token_id is None else pad_token_id
    device = model.device
    # Decided on the host, from the caller's tensors or copies of them: reductions on the GPU would each start
    # another CUDA kernel in a new process (15-60 ms apiece on an H100) and read back anyway.
    host_valid = input_ids.cpu().ne(pad)
    if attention_mask is not None:
        host_valid &= attention_mask.cpu().to(torch.bool)
    unpadded = bool(host_valid.all())  # then the prompt may use plain causal attention
    host_mask = None if image_embeds_position_mask is None else image_embeds_position_mask.cpu()
    input_ids = input_ids.to(device)
    batch, prompt_len = input_ids.shape
    if max_new_tokens is None:
        max_new_tokens = max_length - prompt_len if max_length is not None else DEFAULT_MAX_NEW_TOKENS
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    if seed is not None and generator is None:
        generator = torch.Generator(device=device).manual_seed(seed)

    if image_embeds is None and pixel_values is not None:
        image_embeds = encode_images(model, pixel_values.to(device), interpolate_pos_encoding)
    valid = host_valid.to(device)
    image_mask = None if image_embeds_position_mask is None else image_embeds_position_mask.to(device)
    if image_embeds is not None and image_mask is None:
        raise ValueError("image_embeds_position_mask is needed to place the image in the prompt")
    image_start = None
    if unpadded and image_embeds is not None and image_embeds.shape[0] == batch:
        image_start = image_block(host_mask, image_embeds.shape[1])
    aligned_ids, aligned_valid, aligned_image_mask = (
        (input_ids, valid, image_mask) if unpadded else left_align(valid, input_ids, valid, image_mask))
    stops = torch.tensor(sorted(set(eos) | set(stop_token_ids)), device=device)
    no_eos = _EosBlocker(torch.tensor(eos, device=device), min_new_tokens)
    if num_beams > 1:
        new = _beam_search(model, image_embeds, aligned_ids, aligned_valid, aligned_image_mask, unpadded, num_beams,
                           max_new_tokens, stops, pad, length_penalty, early_stopping, do_sample, temperature,
                           top_k, top_p, generator, no_eos)
    else:
        decoder = Decoder.for_model(model, batch, prompt_len + max_new_tokens, device)
        logits = decoder.prefill(aligned_ids, aligned_valid, image_embeds, aligned_image_mask, unpadded,
                                 image_start)
        new = _sample(decoder, logits, max_new_tokens, stops, pad, Sampling(do_sample, temperature, top_k, top_p,
                                                                            generator), no_eos)
    return torch.cat([input_ids, new.to(input_ids.dtype)], dim=1)


def image_block(mask: Tensor | None, size: int) -> int | None:
    """Where the image's slots begin when every row's are the same `size` contiguous slots (what the processor
    builds for unpadded prompts); None when that is not so."""
    if mask is None or mask.dim() != 2:
        return None
    rows = mask.to(torch.bool)
    slots = rows[0].nonzero().flatten()
    if len(slots) != size or not bool((rows == rows[0]).all()):
        return None
    start = int(slots[0])
    return start if int(slots[-1]) == start + size - 1 else None


class _EosBlocker:
    """Sets EOS scores to -inf while fewer than `minimum` tokens are generated."""

    def __init__(self, eos: Tensor, minimum: int) -> None:
        self.eos, self.minimum = eos, minimum

    def __call__(self, scores: Tensor, step: int) -> Tensor:
        if step < self.minimum:  # index_fill_ takes the value as an argument: no host-to-device copy, no sync
            scores = scores.clone().index_fill_(1, self.eos, -float("inf"))
        return scores


def _sample(decoder: Decoder, logits: Tensor, max_new_tokens: int, stops: Tensor, pad: int, sampling: Sampling,
            no_eos: _EosBlocker) -> Tensor:
    running = torch.ones(logits.shape[0], dtype=torch.bool, device=stops.device)
    tokens: list[Tensor] = []
    alive: list[Tensor] = []
    watch = _DoneWatch(max_new_tokens) if logits.is_cuda else None
    for step in range(max_new_tokens):
        chosen = torch.where(running, sampling.choose(no_eos(logits, step)), pad)
        tokens.append(chosen)
        running = running & ~torch.isin(chosen, stops)
        alive.append(running.any())
        if step + 1 == max_new_tokens or (watch.all_done(alive[-1]) if watch else not bool(alive[-1])):
            break
        logits = decoder.step(chosen, ~running)
    done = (~torch.stack(alive)).nonzero()
    steps = int(done[0]) + 1 if len(done) else len(tokens)
    return torch.stack(tokens[:steps], dim=1)


class _DoneWatch:
    """Whether every row was done a few steps ago, learnt without stopping the GPU's queue.

    Each step's "any row still running" flag is copied to pinned host memory behind the step's work; the host
    reads the flags that have arrived and waits only for one LOOKAHEAD_CUDA steps old. (A blocking read every
    few steps left the GPU idle while the host launched the next step: ~8% of a batch-1 caption.)
    """

    def __init__(self, steps: int) -> None:
        self.flags = torch.ones(steps, dtype=torch.bool, pin_memory=True)
        self.events: list[torch.cuda.Event] = []
        self.checked = 0

    def all_done(self, alive: Tensor) -> bool:
        step = len(self.events)
        self.flags[step].copy_(alive, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.events.append(event)
        while self.checked <= step and (step - self.checked >= LOOKAHEAD_CUDA or self.events[self.checked].query()):
            self.events[self.checked].synchronize()
            if not self.flags[self.checked]:
                return True
            self.checked += 1
        return False


def _beam_search(model, image_embeds, input_ids, valid, image_mask, unpadded: bool, num_beams: int,
                 max_new_tokens: int, stops: Tensor, pad: int, length_penalty: float, early_stopping: bool | str,
                 do_sample: bool, temperature: float, top_k: int | None, top_p: float, generator,
                 no_eos: _EosBlocker) -> Tensor:
    """The reference's vectorised beam search (keep 2*beams candidates, finished hypotheses kept apart)."""
    batch, prompt_len = input_ids.shape
    beams = num_beams
    device = input_ids.device
    max_len = prompt_len + max_new_tokens
    keep = max(2, 1 + len(stops)) * beams

    def expand(t):
        return None if t is None else t.repeat_interleave(beams, dim=0)

    decoder = Decoder.for_model(model, batch * beams, max_len, device)
    logits = decoder.prefill(expand(input_ids), expand(valid), expand(image_embeds), expand(image_mask), unpadded)
    running = torch.full((batch, beams, max_len), pad, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = input_ids[:, None]
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = -1e9
    finished = running.clone()
    finished_scores = torch.full((batch, beams), -1e9, device=device)
    finished_lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    top_beams = torch.arange(keep, device=device) < beams
    row_offset = torch.arange(batch, device=device)[:, None] * beams

    cur = prompt_len
    while True:
        log_probs = no_eos(F.log_softmax(logits.float(), dim=-1), cur - prompt_len)
        if do_sample:
            log_probs = warp_logits(log_probs, temperature, top_k, top_p, keep=1 + len(stops))
        vocab = log_probs.shape[-1]
        scores = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, -1)
        if do_sample:
            picked = torch.multinomial(scores.softmax(dim=-1), keep, generator=generator)
            cand_scores, order = torch.gather(scores, 1, picked).sort(dim=-1, descending=True)
            cand_index = picked.gather(1, order)
        else:
            cand_scores, cand_index = torch.topk(scores, keep)
        source_beam = cand_index // vocab
        cand_tokens = cand_index % vocab
        candidates = torch.take_along_dim(running, source_beam[:, :, None], dim=1)
        candidates[:, :, cur] = cand_tokens
        hits = torch.isin(cand_tokens, stops) | (cur + 1 >= max_len)

        # Hypotheses that go on: the best `beams` candidates that did not stop.
        live_scores = cand_scores + hits.float() * -1e9
        live = torch.topk(live_scores, beams)[1]
        running = torch.take_along_dim(candidates, live[:, :, None], dim=1)
        running_scores = torch.gather(live_scores, 1, live)
        rows = (torch.gather(source_beam, 1, live) + row_offset).flatten()

        # Hypotheses that end here compete with those that ended before, length-normalised.
        just_done = hits & top_beams[None, :]
        done_scores = cand_scores / ((cur + 1 - prompt_len) ** length_penalty)
        full = torch.all(is_finished, dim=-1, keepdim=True) & (early_stopping is True)
        done_scores = done_scores + full.float() * -1e9 + (~improvable).float() * -1e9 + (~just_done) * -1e9
        merged = torch.cat([finished_scores, done_scores], dim=1)
        best = torch.topk(merged, beams)[1]
        finished = torch.take_along_dim(torch.cat([finished, candidates], dim=1), best[:, :, None], dim=1)
        finished_scores = torch.gather(merged, 1, best)
        lengths = torch.full_like(cand_scores, cur + 1 - prompt_len, dtype=torch.long)
        finished_lengths = torch.gather(torch.cat([finished_lengths, lengths], dim=1), 1, best)
        is_finished = torch.gather(torch.cat([is_finished, just_done], dim=1), 1, best)

        cur += 1
        if early_stopping == "never" and length_penalty > 0.0:
            best_length = max_len - prompt_len
        else:
            best_length = cur - prompt_len
        best_running = running_scores[:, :1] / (best_length**length_penalty)
        worst_done = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & torch.any(best_running > worst_done, dim=-1, keepdim=True)
        go_on = bool(improvable.any()) and not (bool(is_finished.all()) and early_stopping is True)
        if not go_on or bool(hits.all()):
            break
        decoder.reorder(rows)
        logits = decoder.step(running[:, :, cur - 1].flatten())

    length = int(finished_lengths[:, 0].max())
    return finished[:, 0, prompt_len : prompt_len + length]
