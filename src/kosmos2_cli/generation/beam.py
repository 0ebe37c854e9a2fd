"""Beam search as the reference's vectorised one: 2 x beams candidates a step, finished hypotheses kept apart and
ranked length-normalised, the same early-stopping rules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kosmos2_cli.generation.decoder import Decoder
from kosmos2_cli.generation.sampling import warp_logits


def beam_search(model, image_embeds, input_ids, valid, image_mask, unpadded: bool, num_beams: int,
                 max_new_tokens: int, stops: Tensor, pad: int, length_penalty: float, early_stopping: bool | str,
                 do_sample: bool, temperature: float, top_k: int | None, top_p: float, generator,
                 no_eos) -> Tensor:
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
