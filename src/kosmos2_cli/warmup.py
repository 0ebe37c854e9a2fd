"""CUDA's one-time start-up costs, paid on a background thread while the weights load.

A new process's first image encoding on an H100 took ~1 s longer than its second, and its first prompt ~0.4 s
longer: CUDA loads each library kernel on first use (cuBLAS, the attention and sort kernels) and Triton loads
its compiled kernels. None of that needs the weights. So `from_pretrained` runs a
one-layer copy of the model (same widths, random weights) through an image, a prompt and a decode step on this
thread, while its reader threads copy the checkpoint; the real model then finds everything loaded.
KOSMOS2_WARMUP=0 turns it off. A failure here only means the first call pays those costs itself.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import torch
from torch import nn

PROMPT_TOKENS = 7  # text tokens around the image in a typical prompt: <s>, <image>, </image>, "<grounding> An image of"


def small_config(config):
    """`config` with one vision and one decoder layer: every kernel shape of the full model, little memory."""
    from kosmos2_cli.config import Kosmos2Config

    return Kosmos2Config(text_config=dataclasses.replace(config.text_config, layers=1),
                         vision_config=dataclasses.replace(config.vision_config, num_hidden_layers=1),
                         latent_query_num=config.latent_query_num, tie_word_embeddings=config.tie_word_embeddings)


def wanted(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("KOSMOS2_WARMUP", "1").strip() != "0"


def start(model: nn.Module, device: torch.device, dtype: torch.dtype) -> threading.Thread:
    """Run `model` (built on the meta device from `small_config`) on a thread; join the thread before timing."""
    thread = threading.Thread(target=_run, args=(model, device, dtype), daemon=True, name="kosmos2-warmup")
    thread.start()
    return thread


def _run(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    try:
        with torch.no_grad(), torch.cuda.device(device):
            stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                _exercise(_materialize(model, device, dtype), device, dtype)
            stream.synchronize()
    except Exception:  # noqa: BLE001 - a warm-up that fails costs nothing but the time it would have saved
        pass


def _materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from kosmos2_cli.weights import rebuild_buffers

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                value = torch.randn(param.shape, device=device, dtype=dtype) * 0.02
                module._parameters[name] = nn.Parameter(value, requires_grad=False)
    model.tie_weights()
    rebuild_buffers(model, device)
    model.eval()
    model.fuse_for_inference()
    return model


def _exercise(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """`generate` for one token (its first calls of a shape run uncaptured), a padded prompt's reordering, and a
    decode step, all eagerly: no graph capture while the loader's threads use CUDA."""
    from kosmos2_cli.generate import Decoder, left_align

    config = model.config
    size = config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, device=device, dtype=dtype)
    images = config.latent_query_num
    ids = torch.full((1, images + PROMPT_TOKENS), 5, dtype=torch.long, device=device)
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[:, 2 : 2 + images] = True
    model.generate(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=where, max_new_tokens=1)
    left_align(where, ids)  # prompts of different lengths: the sort kernels' first call took 0.13 s
    decoder = Decoder(model, 1, ids.shape[1] + 64, device, graphs=False)
    decoder.static = True  # the decode step's fixed-shape kernels, as under a graph
    logits = decoder.prefill(ids, torch.ones_like(where), model.get_image_features(pixels), where, unpadded=True)
    decoder.step(logits.argmax(dim=-1))
