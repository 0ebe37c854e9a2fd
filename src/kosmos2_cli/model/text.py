"""The text side of Kosmos-2: a decoder with sub-LayerNorm (a LayerNorm inside attention and inside the FFN),
sinusoidal positions that count real tokens only, and the image's embeddings placed in the prompt."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kosmos2_cli.model.cache import KVCache
from kosmos2_cli.model.config import Kosmos2TextConfig
from kosmos2_cli.model.layers import Attention, LayerNorm, activation, dropout


def sinusoidal_table(num_positions: int, dim: int, padding_idx: int) -> Tensor:
    """fairseq/tensor2tensor sinusoids (sin half then cos half); the padding row is zero."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.int64).float() * -step)
    angles = torch.arange(num_positions, dtype=torch.int64).float().unsqueeze(1) * freqs.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    table[padding_idx] = 0
    return table


def place_image(embeds: Tensor, image: Tensor, where: Tensor, checked: bool = True,
                start: int | None = None) -> Tensor:
    """Put the image's rows where `where` is set, in order, one image per prompt row.

    The same result as the reference's `embeds[where] = image.view(-1, dim)` when every row holds one image's
    slots, without reading the mask back to the host (so it can run inside a CUDA graph). Other layouts take
    the reference's way. `start`: the caller knows every row's slots are the one block from there (by slicing).
    """
    image = image.to(embeds)
    if start is not None:
        return torch.cat([embeds[:, :start], image, embeds[:, start + image.shape[1]:]], dim=1)
    if checked and (image.shape[0] != embeds.shape[0] or bool((where.sum(1) != image.shape[1]).any())):
        embeds = embeds.clone()
        embeds[where] = image.reshape(-1, image.shape[-1])
        return embeds
    order = (torch.cumsum(where.long(), dim=1) - 1).clamp_(min=0)
    placed = torch.take_along_dim(image, order[..., None], dim=1)
    return torch.where(where[..., None], placed, embeds)


class DecoderLayer(nn.Module):
    def __init__(self, config: Kosmos2TextConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.self_attn = Attention(
            dim, config.attention_heads, inner_norm_eps=config.layer_norm_eps, dropout=config.attention_dropout
        )
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.self_attn_layer_norm = LayerNorm(dim, eps=config.layer_norm_eps)
        self.ffn = nn.Module()
        self.ffn.fc1 = nn.Linear(dim, config.ffn_dim)
        self.ffn.fc2 = nn.Linear(config.ffn_dim, dim)
        self.ffn.ffn_layernorm = LayerNorm(config.ffn_dim, eps=config.layer_norm_eps)
        self.final_layer_norm = LayerNorm(dim, eps=config.layer_norm_eps)
        self.act = activation(config.activation_function)
        self.activation_name = config.activation_function

    def takes_one_row(self, x: Tensor, cache: KVCache | None) -> bool:
        """Whether `forward` has a faster way for this one-token step (the fast path's layer has)."""
        return False

    def carried(self, x: Tensor, pending: Tensor | None, mask: Tensor | None, cache: KVCache | None, layer: int,
                slots: Tensor | None) -> tuple[Tensor, Tensor]:
        """`forward` with each residual add done by the LayerNorm that reads it (inference): the input is
        x + pending, and the output (x, pending) leaves the last add to the next layer."""
        norm = self.self_attn_layer_norm
        x, h = (x, norm(x)) if pending is None else norm.add_norm(x, pending)
        h = self.self_attn(h, mask=mask, cache=cache, layer=layer, slots=slots)
        x, h = self.final_layer_norm.add_norm(x, h)
        ffn = self.ffn
        return x, ffn.fc2(ffn.ffn_layernorm.act_norm(ffn.fc1(h), self.activation_name, self.act))

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int, slots: Tensor | None):
        h = self.self_attn(self.self_attn_layer_norm(x), mask=mask, cache=cache, layer=layer, slots=slots)
        x = x + dropout(h, self.dropout, self.training)
        h = dropout(self.act(self.ffn.fc1(self.final_layer_norm(x))), self.activation_dropout, self.training)
        return x + dropout(self.ffn.fc2(self.ffn.ffn_layernorm(h)), self.dropout, self.training)


class TextTransformer(nn.Module):
    def __init__(self, config: Kosmos2TextConfig) -> None:
        super().__init__()
        if config.add_cross_attention:
            raise ValueError("add_cross_attention=True (decoder cross-attention layers) is not supported: Kosmos-2 "
                             "has none")
        self.config = config
        self.embed_scale = math.sqrt(config.embed_dim) if config.scale_embedding else 1.0
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.pad_token_id)
        rows = config.max_position_embeddings + 2
        if torch.empty(0).is_meta:  # built for loading: the table is made on the target device afterwards
            table = torch.empty(rows, config.embed_dim)
        else:
            table = sinusoidal_table(rows, config.embed_dim, config.pad_token_id)
        self.register_buffer("embed_positions", table, persistent=False)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.layers))
        self.layer_norm = LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.carry = False  # inference: layers hand their last residual add to the next one (`fast.fuse`)

    def ensure_positions(self, count: int) -> None:
        """Make the sinusoid table cover positions below `count` (it is rebuilt larger when a prompt overruns)."""
        if count > self.embed_positions.shape[0]:
            table = sinusoidal_table(count + 2, self.config.embed_dim, self.padding_idx)
            self.embed_positions = table.to(self.embed_positions)

    def position_embeddings(self, position_ids: Tensor, dtype: torch.dtype, check: bool = True,
                            bound: int | None = None) -> Tensor:
        """Rows of the sinusoid table; `check` grows it to cover the positions (not while a CUDA graph is
        captured), from `bound` (a largest possible position known on the host) or else by reading the largest
        position back."""
        if check:
            self.ensure_positions((bound if bound is not None else int(position_ids.max())) + 1)
        return self.embed_positions[position_ids].to(dtype)

    def embed(
        self,
        input_ids: Tensor | None,
        position_ids: Tensor,
        image_embeds: Tensor | None = None,
        image_embeds_position_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        image_start: int | None = None,
        max_position: int | None = None,
        one_image_per_row: bool = False,
    ) -> Tensor:
        """Token embeddings with the image's rows placed, plus positions. `image_start`: the caller knows that
        every row's image slots are the one block from there (placed by slicing, no reads of the mask);
        `max_position`: an upper bound of `position_ids` known on the host (no read-back); `one_image_per_row`:
        the caller checked that each row has one image's slots (no read-back of the mask)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        # No host reads of data while a CUDA graph is captured, nor on the meta device (shape inference).
        capturing = inputs_embeds.is_meta or (inputs_embeds.is_cuda and torch.cuda.is_current_stream_capturing())
        if image_embeds is not None and image_embeds_position_mask is not None:
            inputs_embeds = place_image(inputs_embeds, image_embeds, image_embeds_position_mask.to(torch.bool),
                                        checked=not (capturing or one_image_per_row), start=image_start)
        x = inputs_embeds * self.embed_scale
        x = x + self.position_embeddings(position_ids, x.dtype, check=not capturing, bound=max_position)
        # The reference applies embedding dropout twice (in forward_embedding and again before the layers).
        p = self.config.dropout
        return dropout(dropout(x, p, self.training), p, self.training)

    def forward(
        self,
        hidden: Tensor,
        mask: Tensor | None,
        cache: KVCache | None = None,
        slots: Tensor | None = None,
        hidden_states: list | None = None,
    ) -> Tensor:
        """The final-normed last state; `hidden_states` gets the reference's tuple: the layers' input, each layer's
        output, the last one replaced by the normed final state (layers skipped by layerdrop add nothing)."""
        if (self.carry and not self.training and hidden_states is None and not torch.is_grad_enabled()
                and not self.layers[0].takes_one_row(hidden, cache)):
            pending = None
            for i, layer in enumerate(self.layers):
                hidden, pending = layer.carried(hidden, pending, mask, cache, i, slots)
            return self.layer_norm.add_norm(hidden, pending)[1]
        if hidden_states is not None:
            hidden_states.append(hidden)
        layerdrop = self.config.layerdrop if self.training else 0.0
        for i, layer in enumerate(self.layers):
            if layerdrop > 0 and torch.rand([]) < layerdrop:
                continue
            hidden = layer(hidden, mask, cache, i, slots)
            if hidden_states is not None:
                hidden_states.append(hidden)
        hidden = self.layer_norm(hidden)
        if hidden_states is not None:
            hidden_states[-1] = hidden
        return hidden


class TextModel(nn.Module):
    def __init__(self, config: Kosmos2TextConfig) -> None:
        super().__init__()
        self.model = TextTransformer(config)


class TextForCausalLM(TextModel):
    def __init__(self, config: Kosmos2TextConfig) -> None:
        super().__init__(config)
        self.lm_head = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
