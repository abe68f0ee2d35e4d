"""Paired augmentation: one random draw, applied identically to the source and the edited image.

The paper recipe (SPEC section 3): resize the short side to a random size in [256, 288], take a random
256x256 crop and flip horizontally with probability 1/2, with the *same* choices for both images, so the
pair still shows one edit (the diffusers example script flipped them independently, twice).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = ["AugmentConfig", "paired_augment", "resized_size"]

logger = logging.getLogger(__name__)

_warned_size_mismatch = False


@dataclass
class AugmentConfig:
    """How a (source, target) pair becomes two (3, R, R) tensors; the field names match the data.* config keys."""

    resolution: int = 256
    """R: side of the square crop."""
    random_resize: tuple[int, int] = (256, 288)
    """The short side is resized to a uniform integer in [lo, hi] (lo >= resolution); (R, R) = fixed size."""
    random_crop: bool = True
    """Random crop offsets; False takes the centre crop."""
    random_flip: bool = True
    """Horizontal flip with probability 1/2."""

    def __post_init__(self) -> None:
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 8:
            raise ValueError(f"data.resolution must be an integer >= 8, got {self.resolution!r}")
        spec = self.random_resize
        if (
            not isinstance(spec, Sequence)
            or len(spec) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in spec)
            or not self.resolution <= spec[0] <= spec[1]
        ):
            raise ValueError(
                f"data.random_resize must be [lo, hi] with resolution ({self.resolution}) <= lo <= hi, got {spec!r}"
            )
        # YAML gives lists; a tuple keeps the config hashable and comparable.
        self.random_resize = (int(spec[0]), int(spec[1]))


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) with the short side = `short` and the aspect ratio kept (long side rounded)."""
    if width <= height:
        return short, max(short, round(height * short / width))
    return max(short, round(width * short / height)), short


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def paired_augment(
    source: Image.Image, target: Image.Image, cfg: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize, crop and flip `source` and `target` with one draw from `generator`; both must be RGB.

    Returns two (3, R, R) float32 tensors in [-1, 1], R = `cfg.resolution`. The draws, in order: short side
    (if lo < hi), crop top and left (if `random_crop`), flip (if `random_flip`). A target whose size differs
    from the source's is first resized to the source's size, so the crop covers the same content in both.
    """
    global _warned_size_mismatch
    if target.size != source.size:
        if not _warned_size_mismatch:
            _warned_size_mismatch = True
            logger.warning(
                "source and edited images differ in size (%dx%d vs %dx%d); resizing edited images to the source "
                "size (logged once)", *source.size, *target.size,
            )
        target = target.resize(source.size, Image.Resampling.LANCZOS)

    lo, hi = cfg.random_resize
    short = int(torch.randint(lo, hi + 1, (), generator=generator)) if hi > lo else lo
    size = resized_size(source.width, source.height, short)
    if size != source.size:
        # Lanczos, as the original code; PIL filters with a support scaled to the reduction, so no aliasing.
        source = source.resize(size, Image.Resampling.LANCZOS)
        target = target.resize(size, Image.Resampling.LANCZOS)

    res = cfg.resolution
    width, height = size
    if cfg.random_crop:
        top = int(torch.randint(0, height - res + 1, (), generator=generator))
        left = int(torch.randint(0, width - res + 1, (), generator=generator))
    else:
        top, left = (height - res) // 2, (width - res) // 2
    flip = cfg.random_flip and bool(torch.rand((), generator=generator) < 0.5)

    box = (left, top, left + res, top + res)
    out = []
    for image in (source, target):
        tensor = _to_tensor(image.crop(box))  # (3, R, R)
        out.append(tensor.flip(-1) if flip else tensor)
    return out[0], out[1]
