"""The seed's transformers-style class: `Kosmos2ForConditionalGeneration.from_pretrained(...)` then `generate`.

It is the plain model (`kosmos2_cli.model`) plus what a user of the released model expects around it: start-up
work begun early while the weights load, the fast path on by default (every module keeps the plain maths while
gradients are recorded, so training and `save_pretrained` behave as before), and `generate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kosmos2_cli.fast import early
from kosmos2_cli.fast.fuse import fuse, unfuse
from kosmos2_cli.generation.generate import generate
from kosmos2_cli.generation.workspace import Workspace
from kosmos2_cli.model.config import Kosmos2Config
from kosmos2_cli.model.devices import resolve_device, resolve_dtype
from kosmos2_cli.model.hub import resolve_model_dir
from kosmos2_cli.model.kosmos2 import Kosmos2LanguageModel, Kosmos2Model

__all__ = ["Kosmos2ForConditionalGeneration", "Kosmos2Model"]


class Kosmos2ForConditionalGeneration(Kosmos2LanguageModel):
    """Kosmos-2 with its language-model head: logits, loss, and `generate` as the reference's."""

    def __init__(self, config: Kosmos2Config) -> None:
        super().__init__(config)
        self.workspace = Workspace()  # generation's decoders and graphs, kept between calls

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        revision: str | None = None,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = None,
        torch_dtype: str | torch.dtype | None = None,
        fast: bool = True,
        **_ignored: Any,
    ) -> Kosmos2ForConditionalGeneration:
        """Load a local folder or hub repo id (as `Kosmos2LanguageModel.from_pretrained`), on the fast path unless
        `fast=False` (`fuse_for_inference` / `unfuse` switch it later)."""
        early.start_cuda(device)  # the driver starts while the folder is found; `resolve_device` waits for it
        folder = resolve_model_dir(name_or_path, revision=revision)
        target = resolve_device(device)
        target_dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, target)
        if target.type == "cuda":
            early.start_kernels(target, target_dtype)  # Triton and cuBLAS warm up while the weights load
        model = super().from_pretrained(folder, device=target, dtype=target_dtype)
        if fast:
            model.fuse_for_inference()
        return model

    def fuse_for_inference(self) -> None:
        """The fast path (`kosmos2_cli.fast.fuse`): fused q/k/v, residual adds carried into the next LayerNorm,
        on CUDA the Triton kernels. Same maths; it applies only while no gradient is recorded."""
        fuse(self)

    def unfuse(self) -> None:
        """The plain modules again: every forward computes as the reference's code does."""
        unfuse(self)

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
        """Prompt + new tokens, as the reference's `generate` returns them; see `kosmos2_cli.generation`."""
        return generate(
            self,
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_embeds=image_embeds,
            image_embeds_position_mask=image_embeds_position_mask,
            **kwargs,
        )
