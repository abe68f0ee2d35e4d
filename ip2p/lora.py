"""Low-rank adaptation (LoRA, Hu et al. 2021) of the UNet's linear layers, with the expanded ``conv_in`` trained whole.

``train.lora_rank=r`` freezes the UNet, wraps each linear layer whose name ends with one of ``train.lora_targets``
(by default the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0``) so that it computes
``W x + (alpha / r) B A x`` with ``A`` (r x in) random and ``B`` (out x r) zero, and trains ``A``, ``B`` and the whole
``conv_in`` (its new image channels must be learnt: an adapter of the old ones cannot add them). At step 0 the model is
exactly the base. The export merges ``B A`` into ``W``, so ``final/`` and ``final.safetensors`` are ordinary
checkpoints every tool loads; checkpoints keep the adapters apart, so a run resumes as it was.

No new dependency: a few lines of torch instead of peft.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DEFAULT_TARGETS", "LoRALinear", "add_lora", "merge_lora"]

DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


class LoRALinear(nn.Module):
    """``base(x) + scale * lora_B(lora_A(x))``; ``base`` frozen, ``lora_B`` starting at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own initialisation
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the wrapped layer (dtype, device, shape) still works
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale

    def merged(self) -> nn.Linear:
        """The equivalent plain linear layer, ``W + scale B A``."""
        layer = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                          device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scale
            layer.weight.copy_((self.base.weight.float() + delta).to(layer.weight.dtype))
            if self.base.bias is not None:
                layer.bias.copy_(self.base.bias)
        return layer


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None,
             targets: Sequence[str] = DEFAULT_TARGETS) -> int:
    """Freeze ``unet`` and wrap its matching linear layers in place; ``conv_in`` stays trainable. Returns how many
    layers were wrapped; a ``targets`` list that matches no linear layer raises ValueError."""
    if rank < 1:
        raise ValueError(f"train.lora_rank={rank} must be at least 1 (0 trains the whole UNet)")
    alpha = float(alpha) if alpha else float(rank)
    unet.requires_grad_(False)
    found = [(name, module) for name, module in unet.named_modules()
             if isinstance(module, nn.Linear) and _matches(name, targets)]
    if not found:
        raise ValueError(f"train.lora_targets={list(targets)} names no linear layer of the UNet; use names such as "
                         f"{list(DEFAULT_TARGETS)} (the ends of module names)")
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, LoRALinear(module, rank, alpha))
    unet.conv_in.requires_grad_(True)
    return len(found)


def merge_lora(unet: nn.Module) -> int:
    """Replace every ``LoRALinear`` of ``unet`` by its merged plain layer, in place; returns how many."""
    wrapped = [(name, module) for name, module in unet.named_modules() if isinstance(module, LoRALinear)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, module.merged())
    return len(wrapped)
