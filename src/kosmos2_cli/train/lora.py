"""LoRA (Hu et al., 2021): a trainable low-rank update beside each frozen linear layer of the decoder.

A small module of our own rather than PEFT: PEFT imports transformers (and accelerate) when it is imported, and
the runtime has no transformers (DESIGN §1). `LoRALinear` is an `nn.Linear` whose weight and bias stay frozen,
so its state keeps the checkpoint's names (`...q_proj.weight`) and the low-rank factors sit beside them
(`...q_proj.lora_A`, `...q_proj.lora_B`). B starts at zero: before the first step the model is the base model.
A checkpoint holds the merged weights, W + (alpha / rank) B A, so it loads as any model does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The decoder's linear layers: attention projections and the feed-forward pair (not the vision tower, not the
# tied embedding/head).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PREFIX = "text_model.model.layers."
FACTORS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / rank) dropout(x) A^T B^T, with W and b frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = dropout
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise A

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return out + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling

    def merged_weight(self) -> Tensor:
        """W + (alpha / rank) B A, in the weight's dtype (computed in float32)."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return (self.weight.float() + delta).to(self.weight.dtype)


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
               targets: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    """Freeze every parameter of `model` and put a LoRA beside each target linear layer of the decoder; returns
    the wrapped modules' names. `alpha` defaults to `rank` (a scaling of 1)."""
    if rank < 1:
        raise ValueError(f"the LoRA rank must be 1 or more (got {rank})")
    targets = tuple(targets)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if not name.startswith(PREFIX) or name.rpartition(".")[2] not in targets:
            continue
        if type(module) is not nn.Linear:
            raise TypeError(f"{name}: LoRA wraps plain nn.Linear layers, not {type(module).__name__} (load the model "
                            "without the fast path)")
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, LoRALinear(module, rank, float(alpha or rank), dropout))
        wrapped.append(name)
    if not wrapped:
        raise ValueError("no layer to put a LoRA beside")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The LoRA factors alone (what a LoRA run trains), by parameter name."""
    return {f"{name}.{factor}": getattr(module, factor).detach()
            for name, module in lora_modules(model).items() for factor in FACTORS}


def merged_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state with every LoRA merged into its weight: the checkpoint's names, no LoRA factor."""
    state = model.state_dict()
    for name, module in lora_modules(model).items():
        for factor in FACTORS:
            state.pop(f"{name}.{factor}", None)
        state[f"{name}.weight"] = module.merged_weight().detach()
    return state
