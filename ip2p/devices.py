"""Device names from the command line (torch only, so that light commands need not import diffusers)."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """Pick the device: ``auto`` takes PyTorch's current accelerator (a GPU, MPS, XPU) if any, else the CPU; an
    explicit one that is missing here (another kind, or an index past the devices PyTorch sees) is a clear error."""
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if name == "auto":
        return torch.device(accelerator.type) if accelerator is not None else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name; use auto, cpu, or e.g. cuda, cuda:1, mps") from None
    if device.type == "cpu":
        return device
    # Checked here: moving a model to a missing device fails only after it has loaded, with a traceback.
    count = torch.accelerator.device_count() if accelerator is not None and accelerator.type == device.type else 0
    if (device.index or 0) >= count:
        found = ("no accelerator" if accelerator is None else f"only {accelerator.type}" if not count
                 else f"{count} {accelerator.type} device(s)")
        raise ValueError(f"--device {name}: PyTorch sees {found} on this machine; use --device auto, or cpu (slow)")
    return device
