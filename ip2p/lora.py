"""Low-rank adaptation (LoRA, Hu et al. 2021) of the UNet's linear layers, with the expanded ``conv_in`` trained whole.

``train.lora_rank=r`` freezes the UNet, wraps each linear layer whose name ends with one of ``train.lora_targets``
(by default the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0``) so that it computes
``W x + (alpha / r) B A x`` with ``A`` (r x in) random and ``B`` (out x r) zero, and trains ``A``, ``B`` and the whole
``conv_in`` (its new image channels must be learnt: an adapter of the old ones cannot add them). At step 0 the model is
exactly the base. The export merges ``B A`` into ``W``, so ``final/`` and ``final.safetensors`` are ordinary
checkpoints every tool loads; checkpoints keep the adapters apart, so a run resumes as it was. The export also writes
the adapters alone, ``final.lora.safetensors`` (the A/B matrices, the whole ``conv_in`` and what loading needs: rank,
alpha, targets, the trained scheduler config), megabytes where the model is gigabytes: ``infer.py --checkpoint BASE
--lora FILE`` (:func:`load_adapter`) rebuilds the merged model from the base it was trained on.

No new dependency: a few lines of torch instead of peft.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["ADAPTER_FORMAT", "DEFAULT_TARGETS", "LoRALinear", "add_lora", "load_adapter", "merge_lora", "save_adapter"]

DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_FORMAT = "ip2p-lora"


class LoRALinear(nn.Module):
    """``base(x) + scale * lora_B(lora_A(x))``; ``base`` frozen, ``lora_B`` starting at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
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


def save_adapter(unet: nn.Module, path: str | os.PathLike, *, base: str, scheduler_config: dict,
                 scale_source_latent: bool = False) -> Path:
    """Write the adapters of ``unet`` (not yet merged) and its whole ``conv_in`` to ``path`` (safetensors, atomic)."""
    from safetensors.torch import save_file

    from ip2p import atomic

    wrapped = {name: m for name, m in unet.named_modules() if isinstance(m, LoRALinear)}
    if not wrapped:
        raise ValueError("the UNet has no LoRA adapters to save")
    first = next(iter(wrapped.values()))
    tensors = {"conv_in.weight": unet.conv_in.weight, "conv_in.bias": unet.conv_in.bias}
    for name, m in wrapped.items():
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = m.lora_A.weight, m.lora_B.weight
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"format": ADAPTER_FORMAT, "rank": str(first.rank), "alpha": repr(float(first.alpha)),
                "base": str(base), "scheduler_config": json.dumps(dict(scheduler_config)),
                "scale_source_latent": json.dumps(bool(scale_source_latent))}
    with atomic.writing_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file; a one-line ValueError for anything else."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"--lora {str(path)!r} is a folder; pass the final.lora.safetensors file a LoRA run wrote "
                         "(beside its final/ folder)")
    if not path.is_file():
        raise FileNotFoundError(f"--lora {str(path)!r} does not exist; pass the final.lora.safetensors a LoRA run "
                                "wrote")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"--lora {str(path)!r} is not a readable safetensors file ({e})") from None
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"--lora {str(path)!r} is not an ip2p LoRA adapter (no format={ADAPTER_FORMAT!r} in its "
                         "header); pass the final.lora.safetensors a run with train.lora_rank wrote")
    return tensors, metadata


def load_adapter(unet: nn.Module, path: str | os.PathLike) -> dict:
    """Apply the adapter file at ``path`` to ``unet`` (the base it was trained on, ``conv_in`` already expanded) and
    merge it, in place; returns the file's settings (``scheduler_config``, ``scale_source_latent``, ``base``)."""
    tensors, meta = read_adapter(path)
    try:
        rank, alpha = int(meta["rank"]), float(meta["alpha"])
        settings = {"base": meta.get("base"), "scheduler_config": json.loads(meta.get("scheduler_config") or "{}"),
                    "scale_source_latent": json.loads(meta.get("scale_source_latent") or "false")}
        if not isinstance(settings["scheduler_config"], dict):
            raise ValueError
    except (KeyError, ValueError):
        raise ValueError(f"--lora {str(path)!r} has no valid rank, alpha, scheduler_config or scale_source_latent in "
                         "its header; re-export it") from None
    prefixes = sorted({k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")})
    modules = dict(unet.named_modules())

    def fits(name: str) -> bool:
        layer, a, b = modules.get(name), tensors[f"{name}.lora_A.weight"], tensors.get(f"{name}.lora_B.weight")
        return (isinstance(layer, nn.Linear) and b is not None and a.shape == (rank, layer.in_features)
                and b.shape == (layer.out_features, rank))

    missing = [p for p in prefixes if not fits(p)]
    conv, bias = tensors.get("conv_in.weight"), tensors.get("conv_in.bias")
    conv_fits = (conv is not None and bias is not None and conv.shape == unet.conv_in.weight.shape
                 and bias.shape == unet.conv_in.bias.shape)
    if missing or not prefixes or not conv_fits:
        what = (f"it adapts layers this UNet lacks or shapes otherwise (e.g. {missing[0]})" if missing else
                "it holds no adapters" if not prefixes else
                f"its conv_in is {tuple(conv.shape) if conv is not None else 'missing'} with bias "
                f"{tuple(bias.shape) if bias is not None else 'missing'}, this UNet's "
                f"{tuple(unet.conv_in.weight.shape)} with bias {tuple(unet.conv_in.bias.shape)}")
        raise ValueError(f"--lora {str(path)!r} does not fit this base model: {what}; it was trained on "
                         f"{meta.get('base')!r}: pass that as --checkpoint")
    add_lora(unet, rank, alpha, targets=prefixes)  # exactly the layers the file names
    with torch.no_grad():
        for p in prefixes:
            layer = unet.get_submodule(p)
            for part in ("lora_A", "lora_B"):
                weight = getattr(layer, part).weight
                weight.copy_(tensors[f"{p}.{part}.weight"].to(weight.dtype))
        unet.conv_in.weight.copy_(conv.to(unet.conv_in.weight.dtype))
        unet.conv_in.bias.copy_(bias.to(unet.conv_in.bias.dtype))
    merge_lora(unet)
    unet.requires_grad_(True)  # as from_pretrained leaves a model (see ip2p.models.load_editor)
    return settings
