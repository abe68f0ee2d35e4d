"""Evaluation of instruction-following editors (metrics on data with targets)."""

from ip2p.eval.metrics import (
    IN_MASK_THRESHOLD,
    MIN_REGION_PIXELS,
    OUT_OF_MASK_THRESHOLD,
    PSNR_CAP_DB,
    edit_success,
    l1,
    masked_errors,
    mean_colour,
    nearest_palette_colour,
    psnr,
    rgb_to_lab,
    summarise,
    to_float_image,
)

__all__ = [
    "IN_MASK_THRESHOLD",
    "MIN_REGION_PIXELS",
    "OUT_OF_MASK_THRESHOLD",
    "PSNR_CAP_DB",
    "edit_success",
    "l1",
    "masked_errors",
    "mean_colour",
    "nearest_palette_colour",
    "psnr",
    "rgb_to_lab",
    "summarise",
    "to_float_image",
]
