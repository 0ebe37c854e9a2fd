"""The decoder's key/value cache: preallocated per layer, grown only when a caller overruns it.

Rows of a batch share slot numbers (prompts are left-aligned by padding), and `valid` marks which slots hold
real tokens, so one cache serves padded batches, beam search (rows reordered) and step-by-step decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kosmos2_cli.config import Kosmos2TextConfig


class KVCache:
    def __init__(
        self, layers: int, batch: int, heads: int, head_dim: int, capacity: int, device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (batch, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.real_tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0

    @classmethod
    def for_model(
        cls, config: Kosmos2TextConfig, batch: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        return cls(config.layers, batch, config.attention_heads, config.head_dim, capacity, device, dtype)

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def get_seq_length(self) -> int:
        return self.length

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        self.keys = [torch.cat([k, k.new_zeros(*k.shape[:2], extra, k.shape[3])], dim=2) for k in self.keys]
        self.values = [torch.cat([v, v.new_zeros(*v.shape[:2], extra, v.shape[3])], dim=2) for v in self.values]
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.valid.shape[0], extra)], dim=1)

    def append(self, valid: Tensor) -> None:
        """Reserve slots for `valid.shape[1]` new tokens; `valid` says which of them are real."""
        new = valid.shape[1]
        if self.length + new > self.capacity:
            self._grow(max(self.length + new, 2 * self.capacity))
        self.valid[:, self.length : self.length + new] = valid
        self.real_tokens += valid.sum(dim=1)
        self.length += new

    def update(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's keys and values; return all filled slots of the layer."""
        self.keys[layer].index_copy_(2, slots, k)
        self.values[layer].index_copy_(2, slots, v)
        return self.keys[layer][:, :, : self.length], self.values[layer][:, :, : self.length]

    def reorder(self, rows: Tensor) -> None:
        """Keep rows `rows` (beam search picks which hypotheses continue)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.valid = self.valid.index_select(0, rows)
        self.real_tokens = self.real_tokens.index_select(0, rows)
