"""Evaluation of instruction-following editors on data with targets: metrics, the evaluation driver, guidance sweeps.

``python -m ip2p.eval --checkpoint DIR --data PATH [--sweep] [--clip PATH] --output DIR`` runs them from the shell.
"""

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
# The driver function `evaluate` stays in its module (ip2p.eval.evaluate.evaluate): re-exporting it here would
# shadow the submodule of the same name.
from ip2p.eval.evaluate import load_examples, run_edits, scene_caption, score_edits
from ip2p.eval.sweep import IMAGE_SCALES, TEXT_SCALES, guidance_sweep, plot_sweep, write_table

__all__ = [
    "IMAGE_SCALES",
    "IN_MASK_THRESHOLD",
    "MIN_REGION_PIXELS",
    "OUT_OF_MASK_THRESHOLD",
    "PSNR_CAP_DB",
    "TEXT_SCALES",
    "edit_success",
    "guidance_sweep",
    "l1",
    "load_examples",
    "masked_errors",
    "mean_colour",
    "nearest_palette_colour",
    "plot_sweep",
    "psnr",
    "rgb_to_lab",
    "run_edits",
    "scene_caption",
    "score_edits",
    "summarise",
    "to_float_image",
    "write_table",
]
