"""Log-probabilities of given answers under the model (teacher forcing): what beam search's returned beams scored
at each step, where the search itself keeps only the beams' sums."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def answer_logprobs(model, sequences: Tensor, prompt: dict, image_embeds: Tensor,
                    wanted: frozenset[int]) -> list[list[float]]:
    """For each row of `sequences` (prompt + answer, as `generate` returns them), the log-softmax of each answer
    token given what precedes it; computed for tokens in `wanted` only (0.0 for the others)."""
    pad = model.config.text_config.pad_token_id
    length = prompt["input_ids"].shape[1]
    device = model.device
    ids = sequences.to(device)
    valid = prompt["attention_mask"].to(device).bool()
    valid = torch.cat([valid, ids[:, length:].ne(pad)], dim=1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, :length] = prompt["image_embeds_position_mask"].to(device).bool()
    hidden, _ = model.decoder_states(ids, attention_mask=valid, image_embeds=image_embeds,
                                     image_embeds_position_mask=mask, use_cache=False)
    out = [[0.0] * (ids.shape[1] - length) for _ in range(ids.shape[0])]
    places = [(row, at) for row, tokens in enumerate(ids[:, length:].tolist()) for at, token in enumerate(tokens)
              if token in wanted]
    if places:
        rows = torch.tensor([row for row, _ in places], device=device)
        steps = torch.tensor([length + at - 1 for _, at in places], device=device)
        logits = model.logits(hidden[rows, steps]).float().log_softmax(dim=-1)
        targets = ids[rows, steps + 1]
        for (row, at), value in zip(places, logits.gather(1, targets[:, None]).squeeze(1).tolist(), strict=True):
            out[row][at] = value
    return out
