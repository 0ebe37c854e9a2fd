"""Kosmos-2 in plain PyTorch: the image encoder, the resampler and the sub-LN decoder put together.

Module and parameter names follow the hub checkpoint (`text_model.model.layers.0.self_attn.q_proj.weight`, ...),
so the released safetensors load without renaming. `vision.py` and `text.py` hold the towers, `layers.py` what
they share; loading is `loading.py`, the outputs `outputs.py`, the loss `loss.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kosmos2_cli.model.cache import KVCache
from kosmos2_cli.model.config import Kosmos2Config
from kosmos2_cli.model.layers import CAUSAL
from kosmos2_cli.model.loss import causal_lm_loss
from kosmos2_cli.model.outputs import Kosmos2CausalLMOutput, Kosmos2ModelOutput, Kosmos2VisionOutput
from kosmos2_cli.model.text import TextForCausalLM, TextModel
from kosmos2_cli.model.vision import ImageToTextProjection, VisionModel


def real_tokens(
    input_ids: Tensor | None, attention_mask: Tensor | None, shape: tuple[int, int], device: torch.device,
    padding_idx: int,
) -> Tensor:
    """Which tokens are real: the id is not padding and the attention mask (if any) keeps it."""
    valid = torch.ones(shape, dtype=torch.bool, device=device)
    if input_ids is not None:
        valid &= input_ids.ne(padding_idx)
    if attention_mask is not None:
        valid &= attention_mask[:, -shape[1]:].to(device=device, dtype=torch.bool)
    return valid


def positions_for(valid: Tensor, before: Tensor | None, padding_idx: int) -> Tensor:
    """Position ids counting real tokens only (padding keeps `padding_idx`, whose sinusoid is zero).

    A left-padded row thus gets the positions it would have alone; `before` counts each row's earlier tokens.
    """
    counts = torch.cumsum(valid.long(), dim=1)
    if before is not None:
        counts = counts + before[:, None]
    return counts * valid + padding_idx


def attention_mask_for(valid_keys: Tensor, query_slots: Tensor) -> Tensor:
    """Boolean (batch, 1, queries, keys) mask: causal over real keys, plus each query's own slot.

    The own-slot term keeps rows of padding queries from being fully masked (NaN in SDPA); no real token ever
    attends to a padding slot.
    """
    key_slots = torch.arange(valid_keys.shape[1], device=valid_keys.device)
    causal = key_slots <= query_slots[..., None]
    own = key_slots == query_slots[..., None]
    return ((valid_keys[:, None, :] & causal) | own)[:, None]


class Kosmos2PreTrainedModel(nn.Module):
    """Loading and saving shared by both model classes (hub layout, safetensors only)."""

    def __init__(self, config: Kosmos2Config) -> None:
        super().__init__()
        self.config = config
        self.kv_dtype: torch.dtype | None = None  # the cache's dtype when not the activations' (`cache_dtype`)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        revision: str | None = None,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = None,
        torch_dtype: str | torch.dtype | None = None,
        **_ignored: Any,
    ):
        """Load a local folder or hub repo id; weights go straight to `device` in `dtype` (default: the file's).

        `dtype="int8"` (CPU only): weight-only int8 with per-channel scales, quantized while loading; see `quant`.
        """
        from kosmos2_cli.model.loading import load_pretrained

        return load_pretrained(cls, name_or_path, revision=revision, device=device,
                               dtype=dtype if dtype is not None else torch_dtype)

    def save_pretrained(self, folder: str | Path) -> None:
        """config.json and model.safetensors in the hub's layout (transformers reads them, and we read its)."""
        from kosmos2_cli.model.weights import save_weights

        self.config.save_pretrained(folder)
        save_weights(self, Path(folder))

    @property
    def device(self) -> torch.device:
        return self.text_model.model.layer_norm.weight.device

    @property
    def cache_dtype(self) -> torch.dtype:
        """The key/value cache's dtype: the activations' unless set (int8 models keep a bf16 cache: half the
        memory, and bf16 keys and values change the logits far less than the int8 weights do)."""
        return self.kv_dtype or self.dtype

    @cache_dtype.setter
    def cache_dtype(self, dtype: torch.dtype | None) -> None:
        self.kv_dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (an int8 model computes in float32 between its int8 matrix products)."""
        return self.text_model.model.layer_norm.weight.dtype

    def get_image_features(
        self,
        pixel_values: Tensor,
        interpolate_pos_encoding: bool = False,
        vision_hidden_states: list | None = None,
        *,
        return_dict: bool = False,
    ) -> Tensor | Kosmos2VisionOutput:
        """Image embeddings for the decoder: (batch, latent_query_num, embed_dim); encode an image once, pass them
        as `image_embeds` to many prompts.

        A tensor (as transformers 4 returns); `return_dict=True` gives a `Kosmos2VisionOutput` whose
        `pooler_output` holds them (as transformers 5 returns).
        """
        vision = self.vision_model.model
        last = vision(pixel_values, interpolate_pos_encoding, vision_hidden_states)
        features = vision.post_layernorm.norm_l2(last)
        embeds = self.image_to_text_projection(features)
        if not return_dict:
            return embeds
        states = tuple(vision_hidden_states) if vision_hidden_states else None
        return Kosmos2VisionOutput(last_hidden_state=last, pooler_output=embeds, hidden_states=states)

    def decoder_states(
        self,
        input_ids: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        image_embeds: Tensor | None = None,
        image_embeds_position_mask: Tensor | None = None,
        cache: KVCache | None = None,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        use_cache: bool = True,
        hidden_states: list | None = None,
        unpadded: bool = False,
        image_start: int | None = None,
        one_image_per_row: bool = False,
    ) -> tuple[Tensor, KVCache | None]:
        """(the decoder's final states, the cache) for these tokens after what `cache` already holds.

        `unpadded` promises no padding in a fresh prompt (plain causal attention); `image_start`, that every
        row's image slots are the one block from there (placed by slicing; see `TextTransformer.embed`);
        `one_image_per_row`, that every row has as many image slots as `image_embeds` has rows (not read back);
        `hidden_states` collects the reference's per-layer tuple.
        """
        text = self.text_model.model
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        if cache is None and use_cache:
            cache = KVCache.for_model(self.config.text_config, batch, length, reference.device, self.cache_dtype)
        if cache is not None and cache.length > 0:
            image_embeds = None  # already in the cache
        valid = real_tokens(input_ids, attention_mask, (batch, length), reference.device, text.padding_idx)
        positions = position_ids
        bound = None
        if positions is None:
            positions = positions_for(valid, cache.real_tokens if cache is not None else None, text.padding_idx)
            # A position counts real tokens: at most every token appended to the cache so far, and this call's.
            bound = text.padding_idx + (cache.appended if cache is not None else 0) + length
        x = text.embed(input_ids, positions, image_embeds, image_embeds_position_mask, inputs_embeds,
                       image_start=image_start, max_position=bound, one_image_per_row=one_image_per_row)
        fresh = cache is None or cache.length == 0
        if cache is not None:
            slots = cache.append(valid)
            mask = CAUSAL if unpadded and fresh else attention_mask_for(cache.visible_valid(), slots)
        else:
            slots = None
            mask = CAUSAL if unpadded else attention_mask_for(valid, torch.arange(length, device=x.device).expand(
                batch, length))
        return text(x, mask, cache, slots, hidden_states), cache

    def _prepare(
        self,
        pixel_values: Tensor | None,
        image_embeds: Tensor | None,
        past_key_values: Any,
        cache: Any,
        use_cache: bool | None,
        output_hidden_states: bool | None,
        interpolate_pos_encoding: bool,
    ) -> tuple[KVCache | None, bool, list | None, Tensor | None, Kosmos2VisionOutput | None]:
        """What both forwards share before the decoder: the cache argument (either name), the reference's defaults
        for `use_cache` / `output_hidden_states` (from the config), and the image encoder's run (skipped when
        `image_embeds` are given or the cache already holds the image)."""
        if past_key_values is None:
            past_key_values = cache
        if past_key_values is not None and not isinstance(past_key_values, KVCache):
            raise TypeError(
                f"past_key_values must be the KVCache this model returned (use_cache=True), not "
                f"{type(past_key_values).__name__}"
            )
        if use_cache is None:  # the reference's default is config.use_cache; a cache is for decoding, not training
            use_cache = bool(self.config.text_config.use_cache) and not self.training
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.extra.get("output_hidden_states", False))
        text_states = [] if output_hidden_states else None
        image_outputs = None
        if past_key_values is None or past_key_values.length == 0:
            if image_embeds is None:
                if pixel_values is None:
                    raise ValueError("pass either pixel_values or image_embeds")
                image_outputs = self.get_image_features(
                    pixel_values, interpolate_pos_encoding, [] if output_hidden_states else None, return_dict=True
                )
                image_embeds = image_outputs.pooler_output
        else:
            image_embeds = None  # already in the cache
        return past_key_values, use_cache, text_states, image_embeds, image_outputs


class Kosmos2Model(Kosmos2PreTrainedModel):
    """Image encoder, resampler and decoder without the language-model head: hidden states out."""

    def __init__(self, config: Kosmos2Config) -> None:
        super().__init__(config)
        self.text_model = TextModel(config.text_config)
        self.vision_model = VisionModel(config.vision_config)
        self.image_to_text_projection = ImageToTextProjection(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.model.embed_tokens

    def forward(
        self,
        pixel_values: Tensor | None = None,
        input_ids: Tensor | None = None,
        image_embeds_position_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: KVCache | None = None,
        image_embeds: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool = True,
        cache: KVCache | None = None,
        **_ignored: Any,
    ) -> Kosmos2ModelOutput | tuple:
        """The decoder's final (normed) states for a prompt with its image; see `Kosmos2ModelOutput`.

        `image_embeds` (from `get_image_features`) instead of `pixel_values` skips the image encoder.
        `past_key_values` (or `cache`, its transformers 5 name) continues from a returned cache. `use_cache`
        defaults to the config's (off in training mode).
        """
        past_key_values, use_cache, text_states, image_embeds, image_outputs = self._prepare(
            pixel_values, image_embeds, past_key_values, cache, use_cache, output_hidden_states,
            interpolate_pos_encoding,
        )
        hidden, kv = self.decoder_states(
            input_ids, attention_mask=attention_mask, image_embeds=image_embeds,
            image_embeds_position_mask=image_embeds_position_mask, cache=past_key_values,
            inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=use_cache, hidden_states=text_states,
        )
        out = Kosmos2ModelOutput(
            last_hidden_state=hidden,
            past_key_values=kv,
            hidden_states=tuple(text_states) if text_states is not None else None,
            image_embeds=image_embeds,
            image_outputs=image_outputs,
        )
        return out if return_dict else out.to_tuple()


class Kosmos2LanguageModel(Kosmos2PreTrainedModel):
    """Kosmos-2 with its language-model head (tied to the token embeddings): logits and loss.

    Generation and the fast path live above this class (`kosmos2_cli.api.models.Kosmos2ForConditionalGeneration`,
    the seed's class), so that this one stays a plain PyTorch model: what trains, saves and loads.
    """

    def __init__(self, config: Kosmos2Config) -> None:
        super().__init__(config)
        self.text_model = TextForCausalLM(config.text_config)
        self.vision_model = VisionModel(config.vision_config)
        self.image_to_text_projection = ImageToTextProjection(config)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.text_config.tie_word_embeddings:
            head, embed = self.text_model.lm_head, self.text_model.model.embed_tokens
            if hasattr(head, "share_weight"):
                head.share_weight(embed)  # int8: one set of rows and scales for both
            else:
                head.weight = embed.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.text_model.lm_head

    def logits(self, hidden: Tensor) -> Tensor:
        """Next-token scores, (..., vocab), in the model's dtype."""
        return self.text_model.lm_head(hidden)

    def prefill(self, input_ids: Tensor, cache: KVCache, *, attention_mask: Tensor | None = None,
                image_embeds: Tensor | None = None, image_embeds_position_mask: Tensor | None = None,
                unpadded: bool = False, image_start: int | None = None, one_image_per_row: bool = False) -> Tensor:
        """A prompt into an empty `cache`: the logits at each row's last token, (batch, vocab).

        `unpadded`, `image_start`, `one_image_per_row`: what the caller knows of the prompt (see
        `decoder_states`).
        """
        hidden, _ = self.decoder_states(input_ids, attention_mask=attention_mask, image_embeds=image_embeds,
                                        image_embeds_position_mask=image_embeds_position_mask, cache=cache,
                                        unpadded=unpadded, image_start=image_start,
                                        one_image_per_row=one_image_per_row)
        return self.logits(hidden[:, -1])

    def decode(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """One more token per row, (batch,): the logits after it, (batch, vocab)."""
        hidden, _ = self.decoder_states(tokens[:, None], cache=cache)
        return self.logits(hidden[:, -1])

    def forward(
        self,
        pixel_values: Tensor | None = None,
        input_ids: Tensor | None = None,
        image_embeds_position_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: KVCache | None = None,
        image_embeds: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        logits_to_keep: int = 0,
        return_dict: bool = True,
        cache: KVCache | None = None,
        num_items_in_batch: int | Tensor | None = None,
        shift_labels: Tensor | None = None,
        ignore_index: int = -100,
        **_ignored: Any,
    ) -> Kosmos2CausalLMOutput | tuple:
        """Logits, and with `labels` the loss; arguments as `Kosmos2Model.forward`.

        `labels` (batch, length), usually the `input_ids` with -100 where no loss is wanted (padding, image
        slots, the prompt): the loss is the reference's next-token cross-entropy (see `causal_lm_loss`).
        Labels turn the cache off.
        """
        if labels is not None or shift_labels is not None:
            use_cache = False
        past_key_values, use_cache, text_states, image_embeds, image_outputs = self._prepare(
            pixel_values, image_embeds, past_key_values, cache, use_cache, output_hidden_states,
            interpolate_pos_encoding,
        )
        hidden, kv = self.decoder_states(
            input_ids, attention_mask=attention_mask, image_embeds=image_embeds,
            image_embeds_position_mask=image_embeds_position_mask, cache=past_key_values,
            inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=use_cache, hidden_states=text_states,
        )
        logits = self.logits(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None or shift_labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch, ignore_index, shift_labels)
        out = Kosmos2CausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=kv,
            hidden_states=tuple(text_states) if text_states is not None else None,
            image_embeds=image_embeds,
            image_outputs=image_outputs,
        )
        return out if return_dict else out.to_tuple()
