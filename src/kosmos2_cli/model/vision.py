"""The image side of Kosmos-2: a CLIP ViT (pre-LN, quick_gelu, class token, learned positions) and the resampler
whose learned queries turn its features into the decoder's image embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kosmos2_cli.model.config import Kosmos2Config, Kosmos2VisionConfig
from kosmos2_cli.model.layers import Attention, LayerNorm, activation


class VisionEmbeddings(nn.Module):
    def __init__(self, config: Kosmos2VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.image_size = config.image_size
        dim = config.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, config.patch_size, config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, dim)

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

    def patches(self, pixels: Tensor) -> Tensor:
        """(batch, patches, dim): the strided convolution over the image."""
        return self.patch_embedding(pixels).flatten(2).transpose(1, 2)

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        batch, _, height, width = pixel_values.shape
        if not interpolate_pos_encoding and (height != self.image_size or width != self.image_size):
            raise ValueError(
                f"pixel_values are {height}x{width} but the model takes {self.image_size}x{self.image_size} "
                "(pass interpolate_pos_encoding=True for other sizes)"
            )
        weight = self.patch_embedding.weight
        pixel_values = pixel_values.to(weight.dtype)
        patches = self.patches(pixel_values)
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
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))

    def carried(self, x: Tensor, pending: Tensor | None) -> tuple[Tensor, Tensor]:
        """`forward` with the residual adds moved into the LayerNorms that read them (inference): the input is
        x + pending, and the output (x, pending) leaves the last add to the next layer."""
        x, h = (x, self.layer_norm1(x)) if pending is None else self.layer_norm1.add_norm(x, pending)
        x, h = self.layer_norm2.add_norm(x, self.self_attn(h))
        return x, self.mlp.fc2(self.act(self.mlp.fc1(h)))


class VisionTransformer(nn.Module):
    def __init__(self, config: Kosmos2VisionConfig) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.carry = False  # inference: layers hand their last residual add to the next one (`fast.fuse`)

    def forward(
        self, pixel_values: Tensor, interpolate_pos_encoding: bool = False, hidden_states: list | None = None
    ) -> Tensor:
        x = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
        if self.carry and not self.training and hidden_states is None and not torch.is_grad_enabled():
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
