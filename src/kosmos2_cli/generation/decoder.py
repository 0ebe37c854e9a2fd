"""The decoder's run over a key/value cache: a prompt once (prefill), then one token per row per step; on CUDA
replayed from CUDA graphs. Also the image encoder's graphs, and the host-side facts about prompts (left
alignment, where the image block is) that spare the GPU a read-back."""

from __future__ import annotations

import torch
from torch import Tensor

from kosmos2_cli.fast.graphs import Graphed
from kosmos2_cli.fast.modules import FastAttention
from kosmos2_cli.model.cache import KVCache


def left_align(valid: Tensor, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Move each row's padding to its start (a stable reorder of columns); `valid` marks real tokens."""
    order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)
    return tuple(None if t is None else torch.gather(t, 1, order) for t in tensors)


WINDOW = 64  # decode steps attend over the cache in windows of this many slots (one graph per window)
GRAPHED_PREFILL_BATCH = 16  # up to this batch the prompt is bound by kernel launches: it replays a graph
# The image encoder replays a graph at any batch up to this: in `kosmos2 batch` the model thread launches it while
# the runner's thread finishes the previous batch, and each launch waiting for Python's lock left an H100 idle
# ~25 ms of a 256-image encoder's ~90.
GRAPHED_ENCODER_BATCH = 1024
ENCODER_GRAPHS = GRAPHED_ENCODER_BATCH.bit_length()  # one per power of two up to it
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


def encoder_batch(images: int) -> int:
    """The batch the image encoder's graph runs for `images`: the next power of two, at most
    GRAPHED_ENCODER_BATCH. `kosmos2 serve` encodes takes of any size; a graph for each size meant a capture (a
    device-wide wait, the caches emptied) whenever a size came back after four others, so sizes share
    ENCODER_GRAPHS graphs and pad the rest with blank pictures (each image is encoded apart from the others)."""
    return min(1 << max(0, images - 1).bit_length(), GRAPHED_ENCODER_BATCH)


def encode_images(model, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
    """Image embeddings; on CUDA the batch replays a graph of `encoder_batch`'s size (its output is overwritten by
    the next call)."""
    images = pixel_values.shape[0]
    if pixel_values.is_cuda and images <= GRAPHED_ENCODER_BATCH and not interpolate_pos_encoding:
        space = model.workspace
        if space.vision_graph is None:
            space.vision_graph = Graphed(model.get_image_features, max_graphs=ENCODER_GRAPHS, capture_after=1)
        pixels = pixel_values.to(model.dtype)
        padded = encoder_batch(images)
        if padded != images:
            pixels = torch.cat([pixels, pixels.new_zeros(padded - images, *pixels.shape[1:])])
        return space.vision_graph(pixels)[:images]
    return model.get_image_features(pixel_values, interpolate_pos_encoding)


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
