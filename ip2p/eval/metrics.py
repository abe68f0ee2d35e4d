"""Metrics for edits with known targets: L1/PSNR, errors inside/outside the edit mask, CIE Lab colour naming and
per-edit-type success on :mod:`ip2p.synthetic` examples.

Images are (H, W, 3) numpy arrays, torch tensors or PIL images; uint8 values are divided by 255, float values are
taken as already in [0, 1]. All errors are mean absolute differences on that 0..1 scale, averaged over pixels and
channels.

Success of one edit (:func:`edit_success`) has two parts:

- ``edit_ok``: the edit did what was asked, judged by naming the mean colour of regions of the prediction with the
  nearest palette colour in Lab (Delta E 1976). recolour_object: the object's region is the requested colour;
  recolour_background: the background region is the requested colour; remove_object: the object's old region is the
  background colour; add_object: the new object's region is its colour; move_object: the new region is the object's
  colour and the old one the background colour; change_shape: the new shape's region is the object's colour, and the
  pixels the new shape adds (resp. the old shape's pixels outside the new one), if at least ``MIN_REGION_PIXELS``,
  are the object's colour (resp. the background colour).
- ``rest_ok``: the error outside the mask is at most ``out_threshold`` (default :data:`OUT_OF_MASK_THRESHOLD`), and
  every object the edit does not touch is still there: the mean colour of its pixels outside the mask is named as its
  colour (the ``kept`` checks). The mean error alone is not enough: it averages over the whole background, so an
  output that erased every other object (a few hundred of 4096 pixels) stayed under the threshold.

``success = edit_ok and rest_ok``. ``strict_success`` is pixel-level: the error inside the mask and the error on the
pixels the edit changes (source != target; a subset of the mask, smaller for change_shape, whose mask is the union of
both shapes) are at most ``in_threshold``, the error outside the mask is at most ``out_threshold``, and the ``kept``
checks pass. (Without the second term, leaving a shape unchanged would pass: its changed pixels are a small part of
the union.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ip2p.synthetic import (
    EDIT_TYPES,
    MIN_CHANGED_PIXELS,
    PALETTE,
    EditExample,
    Scene,
    background_mask,
    object_mask,
)

OUT_OF_MASK_THRESHOLD = 0.06
"""Largest mean abs error (0..1 scale) outside the edit mask for the rest of the image to count as unchanged."""
IN_MASK_THRESHOLD = 0.06
"""Largest mean abs error (0..1 scale) inside the edit mask for strict (pixel-level) success."""
PSNR_CAP_DB = 100.0
"""PSNR of identical images (and the upper bound of any PSNR), so averages and JSON stay finite."""
MIN_REGION_PIXELS = MIN_CHANGED_PIXELS
"""Smallest region whose colour a change_shape check judges (smaller slivers are skipped); the generator makes every
shape change add or remove at least this many pixels, so at least one such region is judged."""

_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_SRGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
_METRIC_KEYS = ("l1", "psnr", "err_in_mask", "err_out_mask", "err_changed")
_REQUIRED_KEYS = ("l1", "psnr", "err_in_mask", "err_out_mask")
_RANGE_SLACK = 0.01  # float images may overshoot [0, 1] a little (decoder outputs before clamping)


def to_float_image(image: Any, name: str = "image") -> np.ndarray:
    """Convert a (H, W, 3) array/tensor/PIL image to float64 (H, W, 3) in [0, 1] (uint8 is divided by 255)."""
    if hasattr(image, "detach"):  # torch.Tensor, without importing torch
        image = image.detach().cpu().numpy()
    elif not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name} has shape {tuple(image.shape)}; expected (H, W, 3)")
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"{name} has dtype {image.dtype}; expected uint8 (0..255) or float (0..1)")
    image = image.astype(np.float64)
    low, high = float(image.min(initial=0.0)), float(image.max(initial=1.0))
    if low < -_RANGE_SLACK or high > 1.0 + _RANGE_SLACK:  # e.g. a model output still in [-1, 1]
        raise ValueError(f"{name} has values in [{low:.3g}, {high:.3g}]; expected floats in [0, 1] or uint8")
    return image


def _pair(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = to_float_image(pred, "pred"), to_float_image(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred has shape {p.shape}; expected the target's shape {t.shape}")
    return p, t


def l1(pred: Any, target: Any) -> float:
    """Mean absolute error between two (H, W, 3) images, on the 0..1 scale."""
    p, t = _pair(pred, target)
    return float(np.abs(p - t).mean())


def psnr(pred: Any, target: Any, *, cap_db: float = PSNR_CAP_DB) -> float:
    """Peak signal-to-noise ratio in dB (peak 1.0) of two (H, W, 3) images, at most ``cap_db`` (identical images)."""
    p, t = _pair(pred, target)
    mse = float(((p - t) ** 2).mean())
    if mse == 0.0:
        return float(cap_db)
    return float(min(cap_db, -10.0 * math.log10(mse)))


def masked_errors(pred: Any, target: Any, mask: Any) -> tuple[float, float]:
    """Mean absolute error (0..1 scale) inside and outside ``mask`` ((H, W) bool); an empty region gives 0.0."""
    p, t = _pair(pred, target)
    m = np.asarray(mask).astype(bool)
    if m.shape != p.shape[:2]:
        raise ValueError(f"mask has shape {m.shape}; expected the image's (H, W) = {p.shape[:2]}")
    err = np.abs(p - t).mean(axis=-1)  # (H, W)
    inside = float(err[m].mean()) if m.any() else 0.0
    outside = float(err[~m].mean()) if (~m).any() else 0.0
    return inside, outside


def rgb_to_lab(rgb: Any) -> np.ndarray:
    """CIE L*a*b* (D65) of sRGB colours: (..., 3) in [0, 1] (float) or 0..255 (integer dtype) -> (..., 3) float64."""
    c = np.asarray(rgb)
    if c.shape[-1:] != (3,):
        raise ValueError(f"rgb has shape {c.shape}; expected (..., 3)")
    c = c.astype(np.float64) / 255.0 if np.issubdtype(c.dtype, np.integer) else c.astype(np.float64)
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _WHITE_D65
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def nearest_palette_colour(rgb_mean: Any, palette: Mapping[str, Sequence[int]] = PALETTE) -> str:
    """Name of the ``palette`` colour (name -> 0..255 sRGB) nearest in Lab to ``rgb_mean`` ((3,), as in
    :func:`rgb_to_lab`)."""
    if not palette:
        raise ValueError("palette is empty; expected a mapping of colour names to RGB triples")
    names = list(palette)
    palette_lab = rgb_to_lab(np.array([palette[n] for n in names], dtype=np.int64))  # (K, 3)
    distances = np.linalg.norm(palette_lab - rgb_to_lab(rgb_mean), axis=-1)
    return names[int(np.argmin(distances))]


def mean_colour(image: Any, region: np.ndarray) -> np.ndarray:
    """Mean RGB (3,) in [0, 1] of ``image`` over the (H, W) bool ``region``."""
    img = to_float_image(image)
    if img.shape[:2] != region.shape or not region.any():
        raise ValueError(
            f"region has shape {region.shape} and {int(region.sum())} pixels; expected {img.shape[:2]} and >= 1 pixel"
        )
    return img[region].mean(axis=0)


def _as_example(example: EditExample | Mapping[str, Any]) -> EditExample:
    return example if isinstance(example, EditExample) else EditExample.from_row(example)


def _colour_checks(example: EditExample) -> list[tuple[str, np.ndarray, str]]:
    """(check name, (H, W) bool region, expected palette colour) for each region the edit type judges."""
    meta = example.metadata
    size = int(meta["size"])
    source: Scene = example.source_scene
    target: Scene = example.target_scene
    expected = meta["expected_colour"]
    kind = example.edit_type
    if kind == "recolour_background":
        return [("background", background_mask(target), expected)]
    if kind == "remove_object":
        return [("removed", object_mask(source.objects[meta["subject"]], size), expected)]
    if kind in ("recolour_object", "add_object"):
        return [("object", object_mask(target.objects[meta["target_subject"]], size), expected)]
    if kind in ("move_object", "change_shape"):
        old = object_mask(source.objects[meta["subject"]], size)
        new = object_mask(target.objects[meta["target_subject"]], size)
        checks = [("object", new, expected)]
        if kind == "change_shape":
            checks.append(("added", new & ~old, expected))
        checks.append(("vacated", old & ~new, target.background))
        # Move boxes never overlap, so its regions are never small; shape changes can leave slivers.
        return [c for c in checks if c[0] == "object" or int(c[1].sum()) >= MIN_REGION_PIXELS]
    raise ValueError(f"edit_type={kind!r} is not supported; expected one of {EDIT_TYPES}")


def _kept_checks(example: EditExample) -> list[tuple[str, np.ndarray, str]]:
    """(check name, region, colour) for each object of the target scene that the edit does not touch: its pixels
    outside the edit mask (at least ``MIN_REGION_PIXELS`` of them) must keep the object's colour."""
    size = int(example.metadata["size"])
    edited = example.metadata.get("target_subject")
    checks = []
    for i, obj in enumerate(example.target_scene.objects):
        region = object_mask(obj, size) & ~np.asarray(example.mask, dtype=bool)
        if i != edited and int(region.sum()) >= MIN_REGION_PIXELS:
            checks.append((f"object {i} ({obj.colour} {obj.shape})", region, obj.colour))
    return checks


def _judge(image: np.ndarray, regions: Sequence[tuple[str, np.ndarray, str]],
           palette: Mapping[str, Sequence[int]]) -> dict[str, dict[str, Any]]:
    """``{name: {"expected", "predicted", "ok"}}``: each region's mean colour in ``image``, named from ``palette``."""
    judged = {}
    for name, region, expected in regions:
        predicted = nearest_palette_colour(mean_colour(image, region), palette)
        judged[name] = {"expected": expected, "predicted": predicted, "ok": predicted == expected}
    return judged


def edit_success(
    pred: Any,
    example: EditExample | Mapping[str, Any],
    *,
    out_threshold: float = OUT_OF_MASK_THRESHOLD,
    in_threshold: float = IN_MASK_THRESHOLD,
    palette: Mapping[str, Sequence[int]] = PALETTE,
) -> dict[str, Any]:
    """Score one predicted edit ((H, W, 3) image) against a synthetic example (an EditExample or a dataset row).

    Returns ``{"edit_type", "success", "strict_success", "edit_ok", "rest_ok", "l1", "psnr", "err_in_mask",
    "err_out_mask", "err_changed", "expected_colour", "predicted_colour", "checks", "kept"}``; ``checks`` maps each
    judged region of the edit (see the module docstring) to ``{"expected", "predicted", "ok"}``, and ``kept`` each
    object the edit leaves alone (named by colour and shape) to the same.
    """
    ex = _as_example(example)
    pred_image, target = _pair(pred, ex.target)
    err_in, err_out = masked_errors(pred_image, target, ex.mask)
    err_changed, _ = masked_errors(pred_image, target, (ex.source != ex.target).any(axis=-1))
    checks = _judge(pred_image, _colour_checks(ex), palette)
    edit_ok = all(c["ok"] for c in checks.values())
    kept = _judge(pred_image, _kept_checks(ex), palette)
    objects_kept = all(c["ok"] for c in kept.values())
    rest_ok = err_out <= out_threshold and objects_kept
    main = next(iter(checks.values()))
    return {
        "edit_type": ex.edit_type,
        "success": bool(edit_ok and rest_ok),
        "strict_success": bool(max(err_in, err_changed) <= in_threshold and rest_ok),
        "edit_ok": bool(edit_ok),
        "rest_ok": bool(rest_ok),
        "l1": l1(pred_image, target),
        "psnr": psnr(pred_image, target),
        "err_in_mask": err_in,
        "err_out_mask": err_out,
        "err_changed": err_changed,
        "expected_colour": main["expected"],
        "predicted_colour": main["predicted"],
        "checks": checks,
        "kept": kept,
    }


def _aggregate(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "n": len(results),
        "success": float(np.mean([bool(r["success"]) for r in results])),
        "strict_success": float(np.mean([bool(r["strict_success"]) for r in results])),
    }
    for flag in ("edit_ok", "rest_ok"):  # optional, so hand-built results with the documented keys also work
        if all(flag in r for r in results):
            summary[flag] = float(np.mean([bool(r[flag]) for r in results]))
    for key in _METRIC_KEYS:
        if key in _REQUIRED_KEYS or all(key in r for r in results):
            summary[key] = float(np.mean([float(r[key]) for r in results]))
    if all("kept" in r for r in results):
        kept = [bool(c["ok"]) for r in results for c in r["kept"].values()]
        summary["objects_kept"] = float(np.mean(kept)) if kept else 1.0
    return summary


def summarise(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Average :func:`edit_success` results, overall and per edit type; JSON-ready (floats, ints, str keys).

    Returns ``{"n", "success", "strict_success", "edit_ok", "rest_ok", "objects_kept", "l1", "psnr", "err_in_mask",
    "err_out_mask", "err_changed", "by_type": {edit_type: {same keys}}}`` (``edit_ok``/``rest_ok``/``objects_kept``/
    ``err_changed`` only when every result has them); rates are fractions in [0, 1] (``objects_kept``: of all the
    objects the edits leave alone, the share still in their colour), PSNR is the mean of capped per-example values.
    """
    if not results:
        raise ValueError("results is empty; expected at least one edit_success result")
    summary = _aggregate(results)
    seen = {r["edit_type"] for r in results}
    kinds = [k for k in EDIT_TYPES if k in seen] + sorted(seen - set(EDIT_TYPES))
    summary["by_type"] = {k: _aggregate([r for r in results if r["edit_type"] == k]) for k in kinds}
    return summary
