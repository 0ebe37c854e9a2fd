"""Kosmos-2 in plain PyTorch: a CLIP ViT image encoder, a latent-query resampler and a sub-LN decoder.

Module and parameter names follow the hub checkpoint (`text_model.model.layers.0.self_attn.q_proj.weight`, ...),
so the released safetensors load without renaming.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kosmos2_cli.fast import early
from kosmos2_cli.model.cache import KVCache
from kosmos2_cli.model.config import Kosmos2Config, Kosmos2TextConfig, Kosmos2VisionConfig


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _fast_quick_gelu(x: Tensor) -> Tensor:
    """The same in one Triton kernel on CUDA (what fuse_for_inference installs where Triton is present)."""
    if x.is_cuda:
        from kosmos2_cli.fast.kernels import quick_gelu

        return quick_gelu(x)
    return _quick_gelu(x)


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout in training only; in eval the input comes back untouched (no extra op for inference or graphs)."""
    return F.dropout(x, p, training=True) if training and p > 0 else x


def _activation(name: str):
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return _quick_gelu
    if name == "relu":
        return F.relu
    if name in ("silu", "swish"):
        return F.silu
    raise ValueError(f"unsupported activation function {name!r}")


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm; with `fast` on a CUDA input, a Triton kernel (same maths, one program per row)."""

    fast = False

    def forward(self, x: Tensor) -> Tensor:
        if self.fast and x.is_cuda:
            from kosmos2_cli.fast.kernels import layer_norm

            return layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


def _add_norm(x: Tensor, h: Tensor, norm: LayerNorm) -> tuple[Tensor, Tensor]:
    """(x + h, norm(x + h)): one Triton pass where the LayerNorm is fast, else the two operations."""
    if norm.fast and x.is_cuda:
        from kosmos2_cli.fast.kernels import add_layer_norm

        return add_layer_norm(x, h, norm)
    x = x + h
    return x, norm(x)


def _norm_l2(x: Tensor, norm: LayerNorm) -> Tensor:
    """F.normalize(norm(x)): one Triton pass where the LayerNorm is fast."""
    if norm.fast and x.is_cuda:
        from kosmos2_cli.fast.kernels import layer_norm

        return layer_norm(x, norm.weight, norm.bias, norm.eps, l2_normalize=True)
    return F.normalize(norm(x), dim=-1)


def _act_norm(h: Tensor, name: str, act, norm: LayerNorm) -> Tensor:
    """norm(act(h)); the decoder's exact GELU and its LayerNorm in one Triton pass where the LayerNorm is fast."""
    if norm.fast and h.is_cuda and name == "gelu":
        from kosmos2_cli.fast.kernels import gelu_layer_norm

        return gelu_layer_norm(h, norm)
    return norm(act(h))


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


# Passed as an attention mask: plain causal attention, for prompts without padding (SDPA's flash kernel).
CAUSAL = object()


# Up to this batch, attention without a padding mask on CUDA runs FlashAttention itself (see `attend`).
FLASH_MAX_BATCH = 16
_FLASH_DEVICES: dict[int, bool] = {}


def _flash_fits(q: Tensor, k: Tensor, mask: Tensor | None, dropout: float) -> bool:
    if not (q.is_cuda and q.shape[0] <= FLASH_MAX_BATCH and (mask is None or mask is CAUSAL) and dropout == 0.0
            and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and not q.requires_grad and torch.version.hip is None):
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if index not in _FLASH_DEVICES:
        _FLASH_DEVICES[index] = torch.cuda.get_device_capability(index) >= (8, 0)
    return _FLASH_DEVICES[index]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | object | None, dropout: float, scale: float) -> Tensor:
    """Scaled dot-product attention; `mask` is a boolean/additive mask, None, or CAUSAL.

    On Hopper PyTorch picks cuDNN's attention, which builds an execution plan for each shape on each thread: the
    first calls of a new process took 0.07-1 s apiece on an H100 (and again on each new thread), where
    FlashAttention starts in 0.03 s. Small batches (a caption, a few prompts: start-up dominates) therefore call
    FlashAttention directly; larger ones keep PyTorch's choice, ~5% faster there.
    """
    causal = mask is CAUSAL
    if _flash_fits(q, k, mask, dropout):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, dropout_p=dropout,
                                          is_causal=causal, scale=scale)


class Attention(nn.Module):
    """Multi-head attention; the decoder's adds a LayerNorm on the heads' output (sub-LN) before `out_proj`."""

    def __init__(self, dim: int, heads: int, inner_norm_eps: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout  # on the attention probabilities, in training mode only
        self.head_dim = dim // heads
        if self.head_dim * heads != dim:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.scale = self.head_dim**-0.5
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = LayerNorm(dim, eps=inner_norm_eps) if inner_norm_eps is not None else None

        # Fused q/k/v (fuse_qkv): (weight, bias) of a float model, or one int8 layer (kosmos2_cli.model.quant).
        self.qkv: tuple[Tensor, Tensor] | nn.Module | None = None
        self.fast_decode = False  # a Triton kernel for one-query steps over a fixed-shape cache (CUDA)

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """One (3*dim, dim) projection instead of three, for inference; q/k/v_proj become views of it."""
        if hasattr(self.q_proj, "qweight"):
            from kosmos2_cli.model.quant import fuse_linears

            self.qkv = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
            return
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        replaced = [proj.weight for proj in (self.q_proj, self.k_proj, self.v_proj)]
        for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
            rows = slice(i * weight.shape[1], (i + 1) * weight.shape[1])
            proj.weight = nn.Parameter(weight[rows], requires_grad=False)
            proj.bias = nn.Parameter(bias[rows], requires_grad=False)
        self.qkv = (weight, bias)
        if weight.device.type == "cpu":
            from kosmos2_cli.model.safetensors_mmap import release_view

            for old in replaced:  # views of a memory-mapped checkpoint: hand their pages back (no double RSS)
                release_view(old)

    def decode_step(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache, layer: int, slots: Tensor) -> Tensor:
        """One Triton kernel writes this step's keys and values into the cache and attends over the row's slots."""
        from kosmos2_cli.fast.kernels import decode_attention_append

        keys, values = cache.keys[layer], cache.values[layer]
        return decode_attention_append(q.to(keys.dtype), k, v, keys, values, slots, cache.valid, cache.next_slot,
                                       self.scale, done=cache.done)

    def forward(
        self,
        x: Tensor,
        kv_source: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        slots: Tensor | None = None,
    ) -> Tensor:
        if self.qkv is not None and kv_source is None:
            fused = F.linear(x, *self.qkv) if isinstance(self.qkv, tuple) else self.qkv(x)
            q, k, v = (self._split(t) for t in fused.chunk(3, dim=-1))
        else:
            source = x if kv_source is None else kv_source
            q = self._split(self.q_proj(x))
            k = self._split(self.k_proj(source))
            v = self._split(self.v_proj(source))
        activations = q.dtype
        if self.fast_decode and cache is not None and cache.static and q.shape[2] == 1 and q.is_cuda:
            out = self.decode_step(q, k, v, cache, layer, slots)
        else:
            if cache is not None:
                k, v = cache.update(layer, slots, k, v)
            if k.dtype != activations:  # a cache narrower than the activations (int8 models): attend in its dtype
                q = q.to(k.dtype)
            out = attend(q, k, v, mask, self.dropout if self.training else 0.0, self.scale)
        out = out.to(activations).transpose(1, 2).flatten(2)
        if self.inner_attn_ln is not None:
            out = self.inner_attn_ln(out)
        return self.out_proj(out)


# ---------------------------------------------------------------------------------------------------------------
# Vision: CLIP ViT (pre-LN, quick_gelu, class token, learned positions)


class VisionEmbeddings(nn.Module):
    def __init__(self, config: Kosmos2VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.image_size = config.image_size
        dim = config.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, config.patch_size, config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, dim)
        self.patch_product = False  # on CUDA, the patch embedding as one matrix product (fuse_for_inference)

    def positions(self, height: int, width: int) -> Tensor:
        """Learned positions, bicubically resized for a grid other than the trained one (as the reference)."""
        table = self.position_embedding.weight
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        side = int((table.shape[0] - 1) ** 0.5)
        if grid_h == side and grid_w == side:
            return table.unsqueeze(0)
        patch = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([table[:1].unsqueeze(0), patch], dim=1)

    def _patch_product(self, pixels: Tensor) -> Tensor:
        """The strided convolution as a product over the unfolded patches: the same sums, without cuDNN (its
        kernel took 5.4 ms for 512 images on an H100 against 1.3 ms, and its first call in a process ~0.1 s)."""
        size = self.patch_size
        batch, channels = pixels.shape[:2]
        patches = pixels.unfold(2, size, size).unfold(3, size, size)  # batch, channels, rows, cols, size, size
        rows, cols = patches.shape[2:4]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, rows * cols, channels * size * size)
        weight = self.patch_embedding.weight
        return F.linear(patches, weight.reshape(weight.shape[0], -1))

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        batch, _, height, width = pixel_values.shape
        if not interpolate_pos_encoding and (height != self.image_size or width != self.image_size):
            raise ValueError(
                f"pixel_values are {height}x{width} but the model takes {self.image_size}x{self.image_size} "
                "(pass interpolate_pos_encoding=True for other sizes)"
            )
        weight = self.patch_embedding.weight
        pixel_values = pixel_values.to(weight.dtype)
        if self.patch_product and pixel_values.is_cuda:
            patches = self._patch_product(pixel_values)
        else:
            patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(batch, 1, -1)
        return torch.cat([cls, patches], dim=1) + self.positions(height, width)


class VisionLayer(nn.Module):
    def __init__(self, config: Kosmos2VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.self_attn = Attention(dim, config.num_attention_heads, dropout=config.attention_dropout)
        self.layer_norm1 = LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, config.intermediate_size)
        self.mlp.fc2 = nn.Linear(config.intermediate_size, dim)
        self.layer_norm2 = LayerNorm(dim, eps=config.layer_norm_eps)
        self.act = _activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))

    def carried(self, x: Tensor, pending: Tensor | None) -> tuple[Tensor, Tensor]:
        """`forward` with the residual adds moved into the LayerNorms that read them (inference): the input is
        x + pending, and the output (x, pending) leaves the last add to the next layer."""
        x, h = (x, self.layer_norm1(x)) if pending is None else _add_norm(x, pending, self.layer_norm1)
        x, h = _add_norm(x, self.self_attn(h), self.layer_norm2)
        return x, self.mlp.fc2(self.act(self.mlp.fc1(h)))


class VisionTransformer(nn.Module):
    def __init__(self, config: Kosmos2VisionConfig) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.carry = False  # layers hand their last residual add to the next one (fuse_for_inference)

    def forward(
        self, pixel_values: Tensor, interpolate_pos_encoding: bool = False, hidden_states: list | None = None
    ) -> Tensor:
        x = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
        if self.carry and not self.training and hidden_states is None:
            pending = None
            for layer in self.encoder.layers:
                x, pending = layer.carried(x, pending)
            return x + pending
        if hidden_states is not None:
            hidden_states.append(x)
        for layer in self.encoder.layers:
            x = layer(x)
            if hidden_states is not None:
                hidden_states.append(x)
        return x


class VisionModel(nn.Module):
    def __init__(self, config: Kosmos2VisionConfig) -> None:
        super().__init__()
        self.model = VisionTransformer(config)


class ImageToTextProjection(nn.Module):
    """The resampler: `latent_query_num` learned queries attend over [image features; queries]."""

    def __init__(self, config: Kosmos2Config) -> None:
        super().__init__()
        dim = config.text_config.embed_dim
        self.dense = nn.Linear(config.vision_config.hidden_size, dim)
        self.latent_query = nn.Parameter(torch.zeros(config.latent_query_num, dim))
        self.x_attn = Attention(dim, config.text_config.attention_heads, dropout=config.text_config.attention_dropout)

    def forward(self, features: Tensor) -> Tensor:
        hidden = self.dense(features)
        queries = self.latent_query.to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
        return self.x_attn(queries, kv_source=torch.cat([hidden, queries], dim=1))


# ---------------------------------------------------------------------------------------------------------------
# Text decoder


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
        self.act = _activation(config.activation_function)
        self.activation_name = config.activation_function
        self.one_row = False  # batch-1 decode steps as four fused Triton matrix-vector kernels (CUDA, inference)

    def _one_row_step(self, x: Tensor, cache: KVCache, layer: int, slots: Tensor) -> Tensor:
        """The layer for one token of one row: what `forward` computes, each LayerNorm, bias, activation and
        residual fused into the matrix-vector product next to it (`kernels.linear_row`)."""
        from kosmos2_cli.fast.kernels import linear_row

        attn, ffn = self.self_attn, self.ffn
        qkv = linear_row(x, *attn.qkv, norm=self.self_attn_layer_norm)
        q, k, v = (attn._split(t) for t in qkv.chunk(3, dim=-1))
        out = attn.decode_step(q, k, v, cache, layer, slots).view(x.shape)
        x = linear_row(out, attn.out_proj.weight, attn.out_proj.bias, norm=attn.inner_attn_ln, residual=x)
        h = linear_row(x, ffn.fc1.weight, ffn.fc1.bias, norm=self.final_layer_norm,
                       activation=self.activation_name)
        return linear_row(h, ffn.fc2.weight, ffn.fc2.bias, norm=ffn.ffn_layernorm, residual=x)

    def takes_one_row(self, x: Tensor, cache: KVCache | None) -> bool:
        return (self.one_row and not self.training and x.shape[0] * x.shape[1] == 1 and cache is not None
                and cache.static and x.is_cuda)

    def carried(self, x: Tensor, pending: Tensor | None, mask: Tensor | None, cache: KVCache | None, layer: int,
                slots: Tensor | None) -> tuple[Tensor, Tensor]:
        """`forward` with each residual add done by the LayerNorm that reads it (inference): the input is
        x + pending, and the output (x, pending) leaves the last add to the next layer."""
        x, h = (x, self.self_attn_layer_norm(x)) if pending is None else _add_norm(x, pending,
                                                                                   self.self_attn_layer_norm)
        h = self.self_attn(h, mask=mask, cache=cache, layer=layer, slots=slots)
        x, h = _add_norm(x, h, self.final_layer_norm)
        ffn = self.ffn
        return x, ffn.fc2(_act_norm(ffn.fc1(h), self.activation_name, self.act, ffn.ffn_layernorm))

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int, slots: Tensor | None):
        if self.takes_one_row(x, cache):
            return self._one_row_step(x, cache, layer, slots)
        h = self.self_attn(self.self_attn_layer_norm(x), mask=mask, cache=cache, layer=layer, slots=slots)
        x = x + _dropout(h, self.dropout, self.training)
        h = _dropout(self.act(self.ffn.fc1(self.final_layer_norm(x))), self.activation_dropout, self.training)
        return x + _dropout(self.ffn.fc2(self.ffn.ffn_layernorm(h)), self.dropout, self.training)


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
        self.carry = False  # layers hand their last residual add to the next one (fuse_for_inference)

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
    ) -> Tensor:
        """Token embeddings with the image's rows placed, plus positions. `image_start`: the caller knows that
        every row's image slots are the one block from there (placed by slicing, no reads of the mask);
        `max_position`: an upper bound of `position_ids` known on the host (no read-back)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        # No host reads of data while a CUDA graph is captured, nor on the meta device (shape inference).
        capturing = inputs_embeds.is_meta or (inputs_embeds.is_cuda and torch.cuda.is_current_stream_capturing())
        if image_embeds is not None and image_embeds_position_mask is not None:
            inputs_embeds = place_image(inputs_embeds, image_embeds, image_embeds_position_mask.to(torch.bool),
                                        checked=not capturing, start=image_start)
        x = inputs_embeds * self.embed_scale
        x = x + self.position_embeddings(position_ids, x.dtype, check=not capturing, bound=max_position)
        # The reference applies embedding dropout twice (in forward_embedding and again before the layers).
        p = self.config.dropout
        return _dropout(_dropout(x, p, self.training), p, self.training)

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
        if (self.carry and not self.training and hidden_states is None
                and not self.layers[0].takes_one_row(hidden, cache)):
            pending = None
            for i, layer in enumerate(self.layers):
                hidden, pending = layer.carried(hidden, pending, mask, cache, i, slots)
            return _add_norm(hidden, pending, self.layer_norm)[1]
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


# ---------------------------------------------------------------------------------------------------------------
# Whole models


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


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor | None,
    num_items_in_batch: int | Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
) -> Tensor:
    """The reference's `ForCausalLMLoss`: position t predicts label t+1 (`shift_labels` given: already shifted),
    `ignore_index` skipped, computed in fp32; the mean over counted tokens, or the sum over `num_items_in_batch`
    (gradient accumulation over batches of uneven token counts)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat = logits.float().reshape(-1, logits.shape[-1])
    target = shift_labels.reshape(-1).to(flat.device)
    if num_items_in_batch is None:
        return F.cross_entropy(flat, target, ignore_index=ignore_index)
    total = F.cross_entropy(flat, target, ignore_index=ignore_index, reduction="sum")
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


@contextmanager
def _no_init():
    """Build modules without initialising their weights: the checkpoint overwrites them anyway, and on the meta
    device PyTorch's init functions go through its decompositions, which import torch._dynamo (seconds)."""
    classes = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.Conv2d)
    saved = [cls.reset_parameters for cls in classes]
    for cls in classes:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, reset in zip(classes, saved, strict=True):
            cls.reset_parameters = reset


class Kosmos2PreTrainedModel(nn.Module):
    """Loading and saving shared by both model classes (hub layout, safetensors only)."""

    config: Kosmos2Config

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
        from kosmos2_cli.model.devices import resolve_device, resolve_dtype
        from kosmos2_cli.model.hub import resolve_model_dir
        from kosmos2_cli.model.weights import load_weights

        folder = resolve_model_dir(name_or_path, revision=revision)
        early.start_cuda(device)  # the driver starts while the model is built; `resolve_device` waits for it
        config = Kosmos2Config.from_json_file(folder / "config.json")
        with torch.device("meta"), _no_init():
            model = cls(config)
        target = resolve_device(device)
        target_dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, target)
        quantized = target_dtype == torch.int8
        if target.type == "cuda":
            early.start_kernels(target, target_dtype)  # ready for fuse_for_inference and the first image
        if quantized:
            from kosmos2_cli.model.quant import allocate, quantize_modules

            with torch.device("meta"), _no_init():
                quantize_modules(model)  # int8 weights, quantized as they are read; the rest in float32
            allocate(model, target)  # one block for all int8 weights, q/k/v side by side
        load_weights(model, folder, device=target, dtype=torch.float32 if quantized else target_dtype)
        if quantized:
            for module in model.modules():
                if isinstance(module, Attention):
                    module.fuse_qkv()  # one int8 layer for q/k/v: fewer, larger kernel calls per step
            model.cache_dtype = torch.bfloat16
            from kosmos2_cli.model.quant import free_scratch

            free_scratch("quantize")
        return model.eval()

    def save_pretrained(self, folder: str | Path) -> None:
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
        return self.__dict__.get("_cache_dtype") or self.dtype

    @cache_dtype.setter
    def cache_dtype(self, dtype: torch.dtype | None) -> None:
        self.__dict__["_cache_dtype"] = dtype
        self.__dict__.pop("_decoders", None)  # decoders hold caches of the old dtype

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
        features = _norm_l2(last, vision.post_layernorm)
        embeds = self.image_to_text_projection(features)
        if not return_dict:
            return embeds
        states = tuple(vision_hidden_states) if vision_hidden_states else None
        return Kosmos2VisionOutput(last_hidden_state=last, pooler_output=embeds, hidden_states=states)

    def _decode_hidden(
        self,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        image_embeds: Tensor | None,
        image_embeds_position_mask: Tensor | None,
        past_key_values: KVCache | None,
        inputs_embeds: Tensor | None,
        position_ids: Tensor | None,
        use_cache: bool,
        hidden_states: list | None,
        unpadded: bool = False,
        image_start: int | None = None,
    ) -> tuple[Tensor, KVCache | None]:
        """Decoder hidden states; `unpadded` promises no padding in a fresh prompt (plain causal attention),
        `image_start` that every row's image slots are the one block from there (see `embed`)."""
        text = self.text_model.model
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        cache = past_key_values
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
                       image_start=image_start, max_position=bound)
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
        super().__init__()
        self.config = config
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
        hidden, kv = self._decode_hidden(
            input_ids, attention_mask, image_embeds, image_embeds_position_mask, past_key_values, inputs_embeds,
            position_ids, use_cache, text_states,
        )
        out = Kosmos2ModelOutput(
            last_hidden_state=hidden,
            past_key_values=kv,
            hidden_states=tuple(text_states) if text_states is not None else None,
            image_embeds=image_embeds,
            image_outputs=image_outputs,
        )
        return out if return_dict else out.to_tuple()


class Kosmos2ForConditionalGeneration(Kosmos2PreTrainedModel):
    """Kosmos-2 with its language-model head (tied to the token embeddings): logits, loss and `generate`."""

    def __init__(self, config: Kosmos2Config) -> None:
        super().__init__()
        self.config = config
        self.text_model = TextForCausalLM(config.text_config)
        self.vision_model = VisionModel(config.vision_config)
        self.image_to_text_projection = ImageToTextProjection(config)
        self.tie_weights()

    def fuse_for_inference(self) -> None:
        """Inference-only speed-ups with the same maths: fused q/k/v projections, residual adds done by the
        LayerNorm after them, the patch embedding as a matrix product on CUDA, and on CUDA with Triton the decode
        kernels (`kernels`). Parameters stop requiring gradients."""
        try:
            import triton  # noqa: F401

            fast_norm = self.device.type == "cuda"
        except ImportError:
            fast_norm = False
        fused_activations = ()
        if fast_norm:
            from kosmos2_cli.fast.kernels import ACTIVATIONS as fused_activations
        for module in self.modules():
            if isinstance(module, Attention):
                if module.qkv is None:
                    module.fuse_qkv()
                module.fast_decode = fast_norm
            elif isinstance(module, LayerNorm):
                module.fast = fast_norm
            elif isinstance(module, VisionEmbeddings):
                module.patch_product = True
            if isinstance(module, (VisionLayer, DecoderLayer)) and fast_norm and module.act is _quick_gelu:
                module.act = _fast_quick_gelu
        self.text_model.model.carry = self.vision_model.model.carry = True
        for layer in self.text_model.model.layers:  # after the loop above has fused every q/k/v
            layer.one_row = (fast_norm and isinstance(layer.self_attn.qkv, tuple)
                             and layer.self_attn.inner_attn_ln is not None
                             and layer.activation_name in fused_activations)
        self._one_row_head = fast_norm and self.text_model.lm_head.weight.is_contiguous()
        if fast_norm:
            # cuBLAS falls back to a slow kernel for 65,037 output rows; a copy padded to a multiple of 64 is fast.
            weight = self.text_model.lm_head.weight
            rows = -(-weight.shape[0] // 64) * 64
            self._padded_head = torch.cat([weight.detach(), weight.new_zeros(rows - weight.shape[0], weight.shape[1])])

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
        if self.__dict__.get("_one_row_head") and hidden.is_cuda and hidden.numel() == hidden.shape[-1]:
            from kosmos2_cli.fast.kernels import linear_row

            return linear_row(hidden, self.text_model.lm_head.weight, None)  # 2.9 TB/s against cuBLAS's 1.7
        padded = self.__dict__.get("_padded_head")
        if padded is not None and hidden.device == padded.device:
            return F.linear(hidden, padded)[..., : self.config.text_config.vocab_size]
        return self.text_model.lm_head(hidden)

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
        hidden, kv = self._decode_hidden(
            input_ids, attention_mask, image_embeds, image_embeds_position_mask, past_key_values, inputs_embeds,
            position_ids, use_cache, text_states,
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

    @torch.no_grad()
    def generate(
        self,
        pixel_values: Tensor | None = None,
        image_embeds_position_mask: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Prompt + new tokens, as the reference's `generate` returns them; see `kosmos2_cli.generation.generate`."""
        from kosmos2_cli.generation.generate import generate

        return generate(
            self,
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_embeds=image_embeds,
            image_embeds_position_mask=image_embeds_position_mask,
            **kwargs,
        )
