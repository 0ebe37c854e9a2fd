"""How the next token is chosen: the argmax, or a draw after the reference's warpers (temperature, top-k, top-p,
in that order and with the same arithmetic), so the same weights and seed give the reference's tokens. Each
choice also gives the probability its distribution had (box scores)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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

    def pick(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(tokens, the log-probability of each under the distribution it was chosen from), float32: the
        softmax of the logits for the argmax, of the warped logits for a draw (what the reference's
        `output_scores` give). The same tokens as `choose`."""
        if not self.do_sample:
            return greedy_pick(logits)
        probs = warp_logits(logits.float(), self.temperature, self.top_k, self.top_p).softmax(dim=-1)
        tokens = torch.multinomial(probs, 1, generator=self.generator)
        return tokens.squeeze(1), probs.gather(1, tokens).squeeze(1).log()


def greedy_pick(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(argmax, its log-softmax) per row. On CUDA one Triton pass over the logits (no float32 copy of them)."""
    if logits.is_cuda:
        try:
            from kosmos2_cli.fast.kernels import argmax_log_softmax
        except ImportError:  # no Triton: PyTorch's operations below
            pass
        else:
            return argmax_log_softmax(logits)
    tokens = logits.argmax(dim=-1)
    wide = logits.float()
    return tokens, wide.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(wide, dim=-1)
