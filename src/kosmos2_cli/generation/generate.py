"""Text generation for Kosmos-2: greedy, sampling and beam search over a key/value cache.

Each mode makes the same choices as the reference's `generate` (same argmax, same warpers in the same order,
the same beam bookkeeping), so the same weights give the same tokens. Prompts of different lengths are
left-aligned internally, with positions counted over real tokens only, so every row of a batch gets exactly
what it would get alone, whichever side the caller padded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kosmos2_cli.generation.beam import beam_search
from kosmos2_cli.generation.decoder import LOOKAHEAD_CUDA, Decoder, encode_images, image_block, left_align
from kosmos2_cli.generation.sampling import Sampling

DEFAULT_MAX_NEW_TOKENS = 128


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
        new = beam_search(model, image_embeds, aligned_ids, aligned_valid, aligned_image_mask, unpadded, num_beams,
                           max_new_tokens, stops, pad, length_penalty, early_stopping, do_sample, temperature,
                           top_k, top_p, generator, no_eos)
    else:
        decoder = Decoder.for_model(model, batch, prompt_len + max_new_tokens, device)
        logits = decoder.prefill(aligned_ids, aligned_valid, image_embeds, aligned_image_mask, unpadded,
                                 image_start)
        new = _sample(decoder, logits, max_new_tokens, stops, pad, Sampling(do_sample, temperature, top_k, top_p,
                                                                            generator), no_eos)
    return torch.cat([input_ids, new.to(input_ids.dtype)], dim=1)


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
