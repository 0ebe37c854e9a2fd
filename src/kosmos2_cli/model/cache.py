"""The decoder's key/value cache: preallocated per layer, with a write position per row.

`valid` marks the slots that hold real tokens (padding never does), `next_slot` is where each row's next token
goes and `real_tokens` counts each row's real tokens (its next position). Rows are independent, so one cache
serves padded batches, beam search (rows reordered), rows that restart with a new prompt (continuous batching)
and step-by-step decoding; all updates are tensor operations, so a decode step can be captured as a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kosmos2_cli.model.config import Kosmos2TextConfig


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
        self.next_slot = torch.zeros(batch, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)  # finished rows: the decode kernel skips them
        self.length = 0  # slots in use by the longest row: attention looks no further (unless `static`)
        self.appended = 0  # tokens appended per row since the reset (a bound of every row's position, on the host)
        self.static = False  # fixed shapes for CUDA graphs: attention reads the first `window` slots
        self.window = capacity
        self.from_start = False  # the last append filled an empty cache: every row's slots are 0, 1, ...

    @classmethod
    def for_model(
        cls, config: Kosmos2TextConfig, batch: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        return cls(config.layers, batch, config.attention_heads, config.head_dim, capacity, device, dtype)

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def get_seq_length(self) -> int:
        return self.length

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        self.keys = [torch.cat([k, k.new_zeros(*k.shape[:2], extra, k.shape[3])], dim=2) for k in self.keys]
        self.values = [torch.cat([v, v.new_zeros(*v.shape[:2], extra, v.shape[3])], dim=2) for v in self.values]
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.valid.shape[0], extra)], dim=1)

    def append(self, valid: Tensor) -> Tensor:
        """Reserve the next `valid.shape[1]` slots of every row; `valid` says which new tokens are real.

        Returns the slots, (batch, new). Growing (for callers that overrun the capacity) is not possible while
        `static`.
        """
        new = valid.shape[1]
        if not self.static and self.length + new > self.capacity:
            self._grow(max(self.length + new, 2 * self.capacity))
        self.from_start = self.length == 0 and not self.static
        slots = self.next_slot[:, None] + torch.arange(new, device=valid.device)
        if self.static:
            slots = slots.clamp_(max=self.capacity - 1)  # rows that are done keep stepping in place
        self.valid.scatter_(1, slots, valid)
        self.real_tokens += valid.sum(dim=1)
        self.next_slot += new
        # A row holds at most `capacity` tokens when static (rows that stay in place for continuous batching
        # count none), so the bound stays small however long the run.
        self.appended = min(self.appended + new, self.capacity) if self.static else self.appended + new
        self.length = min(self.length + new, self.capacity)
        return slots

    def update(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's keys and values at each row's slots; return the slots attention reads."""
        if self.from_start:  # a prompt: one strided copy (a scatter by index was a tenth of a large prefill)
            _copy(self.keys[layer][:, :, : k.shape[2]], k)
            _copy(self.values[layer][:, :, : v.shape[2]], v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.keys[layer][rows, :, slots] = k.transpose(1, 2).to(self.keys[layer].dtype)
            self.values[layer][rows, :, slots] = v.transpose(1, 2).to(self.values[layer].dtype)
        seen = self.window if self.static else self.length
        return self.keys[layer][:, :, :seen], self.values[layer][:, :, :seen]

    def visible_valid(self) -> Tensor:
        return self.valid[:, : self.window if self.static else self.length]

    def state(self) -> tuple[Tensor, ...]:
        """A copy of the bookkeeping a step changes (not the keys and values: a step only adds to those)."""
        return tuple(t.clone() for t in (self.valid, self.real_tokens, self.next_slot))

    def set_state(self, state: tuple[Tensor, ...]) -> None:
        for live, saved in zip((self.valid, self.real_tokens, self.next_slot), state, strict=True):
            live.copy_(saved)

    def reset(self) -> None:
        self.done.zero_()
        self.valid.zero_()
        self.real_tokens.zero_()
        self.next_slot.zero_()
        self.length = 0
        self.appended = 0

    def reorder(self, rows: Tensor) -> None:
        """Keep rows `rows` (beam search picks which hypotheses continue), in place."""
        for tensors in (self.keys, self.values):
            for t in tensors:
                t.copy_(t.index_select(0, rows))
        for t in (self.valid, self.real_tokens, self.next_slot):
            t.copy_(t.index_select(0, rows))

    def head(self, rows: int) -> KVCache:
        """A cache over this one's first `rows` rows (the same memory): prompts of any count prefill into one
        buffer."""
        return self.block(0, rows)

    def block(self, start: int, stop: int) -> KVCache:
        """A cache over rows `start` to `stop` of this one (the same memory), not `static`: after its `reset`,
        prompts prefill straight into a block of free rows, with no copy afterwards. The caller then updates this
        cache's `length` and `appended` (`reach`)."""
        view = KVCache.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.keys = [k[start:stop] for k in self.keys]
        view.values = [v[start:stop] for v in self.values]
        for name in ("valid", "real_tokens", "next_slot", "done"):
            setattr(view, name, getattr(self, name)[start:stop])
        view.static, view.window = False, view.capacity
        return view

    def reach(self, prompts: KVCache) -> None:
        """`prompts` (prefilled) are now in this cache's rows: attention must reach as far as they go."""
        self.length = max(self.length, prompts.length)
        self.appended = max(self.appended, prompts.appended)

    def load_rows(self, rows: Tensor, other: KVCache) -> None:
        """Put `other`'s rows (freshly prefilled prompts) into rows `rows` of this cache."""
        width = other.length
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for a, b in zip(mine, theirs, strict=True):
                a, b = _words(a, b)
                a[rows, :, :width] = b[:, :, :width]
        self.valid.index_fill_(0, rows, False)  # `[rows] = False` would copy the scalar over, waiting
        self.valid[rows, :width] = other.valid[:, :width]
        self.real_tokens[rows] = other.real_tokens
        self.next_slot[rows] = other.next_slot
        self.reach(other)


def _words(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Same-dtype `tensors` (..., head_dim) seen as 8-byte words along their last dimension, where all of them can
    be (else as they are): a copy between strided views then moves a quarter of the elements in bf16, where the
    element-wise one moves 2 bytes per thread (~half the bandwidth on a large prefill, and ~2.5% of the GPU's time in
    `kosmos2 batch` when refills were copied into the rows)."""
    ratio = 8 // tensors[0].element_size()
    if ratio > 1 and len({t.dtype for t in tensors}) == 1 and all(
            t.stride(-1) == 1 and t.shape[-1] % ratio == 0 and t.storage_offset() % ratio == 0
            and all(s % ratio == 0 for s in t.stride()[:-1]) for t in tensors):
        return tuple(t.view(torch.int64) for t in tensors)
    return tensors


def _copy(dst: Tensor, src: Tensor) -> None:
    """dst[...] = src, as 8-byte words where it can be (`_words`)."""
    dst, src = _words(dst, src)
    dst.copy_(src)
