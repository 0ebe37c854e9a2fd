"""The training loss: the reference's next-token cross-entropy, so fine-tuning here matches fine-tuning there."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


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
