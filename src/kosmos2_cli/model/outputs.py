"""What a forward pass returns: transformers-style output objects (attribute and key access), so the seed's code
that reads `out.logits`, `out["loss"]` or `out.image_embeds` runs unchanged."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

from kosmos2_cli.model.cache import KVCache


@dataclass
class ModelOutput:
    """Attribute and key access to a forward pass's results (None fields are absent from `keys()`)."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):
            return getattr(self, self.keys()[key])
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self.keys())


@dataclass
class Kosmos2VisionOutput(ModelOutput):
    """The image side of a forward pass, as the reference's `image_outputs` (BaseModelOutputWithPooling).

    `last_hidden_state`: the vision encoder's last layer, before `post_layernorm`; `pooler_output`: the image
    embeddings the decoder gets (the reference overwrites the pooled vector with them); `hidden_states` (with
    `output_hidden_states`): the encoder's input (after `pre_layrnorm`) and each layer's output, the last one not
    normed (as CLIP's).
    """

    last_hidden_state: Tensor | None = None
    pooler_output: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None


class _MultimodalOutput(ModelOutput):
    """Aliases shared by both outputs: transformers 5 names the cache `cache` and the image side `image_outputs`
    (older releases: `past_key_values`, `vision_model_output`)."""

    past_key_values: KVCache | None
    image_outputs: Kosmos2VisionOutput | None

    @property
    def cache(self) -> KVCache | None:
        return self.past_key_values

    @property
    def vision_model_output(self) -> Kosmos2VisionOutput | None:
        return self.image_outputs

    @property
    def vision_hidden_states(self) -> tuple[Tensor, ...] | None:
        return None if self.image_outputs is None else self.image_outputs.hidden_states


@dataclass
class Kosmos2ModelOutput(_MultimodalOutput):
    """`hidden_states` (with `output_hidden_states`): the decoder's input embeddings, then each layer's output,
    the last entry after the final LayerNorm (equal to `last_hidden_state`), as the reference's tuple.
    `image_embeds`: what the decoder got for the image (computed, or passed in); `image_outputs` only when the
    image encoder ran."""

    last_hidden_state: Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    image_embeds: Tensor | None = None
    image_outputs: Kosmos2VisionOutput | None = None


@dataclass
class Kosmos2CausalLMOutput(_MultimodalOutput):
    """As `Kosmos2ModelOutput`, with `logits` and (given `labels`) the next-token cross-entropy `loss`."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    image_embeds: Tensor | None = None
    image_outputs: Kosmos2VisionOutput | None = None
