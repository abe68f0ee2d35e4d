"""Guidance sweeps (SPEC section 7, paper Fig. 8/10): consistency with the input versus edit strength.

Two one-dimensional sweeps over the two-scale guidance of :mod:`ip2p.guidance`: the image scale ``s_I`` over
:data:`IMAGE_SCALES` (1.0 .. 2.2 in steps of 0.2) at a fixed text scale ``s_T``, and ``s_T`` over :data:`TEXT_SCALES` at
a fixed ``s_I``. Every setting edits the same examples from the same noise and is scored by
:func:`ip2p.eval.evaluate.score_edits`. Each row of the table holds the setting and

- consistency: ``l1_to_source`` (mean |output - input|, lower is more consistent), ``err_out_mask`` (error outside the
  edit mask, where the target equals the input), and ``clip_sim_image`` with a CLIP model;
- edit strength: ``success`` / ``strict_success`` / ``edit_ok`` (the edit did what was asked), ``err_in_mask`` (error
  to the target inside the mask), and ``clip_sim_dir`` with a CLIP model.

:func:`plot_sweep` draws consistency (x) against edit strength (y), one curve per sweep, each point labelled with its
scale: raising ``s_I`` should move points towards consistency and away from strength, raising ``s_T`` the other way.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ip2p.eval.evaluate import _as_model, run_edits, score_edits
from ip2p.synthetic import EditExample

logger = logging.getLogger(__name__)

IMAGE_SCALES: tuple[float, ...] = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2)
TEXT_SCALES: tuple[float, ...] = (1.0, 1.5, 3.0, 5.0, 7.5)
ROW_KEYS: tuple[str, ...] = ("sweep", "text_guidance", "image_guidance", "success", "strict_success", "edit_ok",
                             "rest_ok", "err_in_mask", "err_out_mask", "l1_to_source", "l1", "psnr")
"""Columns of every sweep row; ``clip_sim_image`` and ``clip_sim_dir`` follow when a CLIP model was given."""


def guidance_sweep(model: Any, examples: Sequence[EditExample], *, text_guidance: float = 7.5,
                   image_guidance: float = 1.5, image_scales: Sequence[float] = IMAGE_SCALES,
                   text_scales: Sequence[float] = TEXT_SCALES, steps: int = 20, scheduler: Any = None,
                   seed: int = 0, batch_size: int = 32, clip: Any = None, progress: bool = True) -> list[dict]:
    """Sweep ``s_I`` over ``image_scales`` at ``s_T = text_guidance``, then ``s_T`` over ``text_scales`` at
    ``s_I = image_guidance``; returns one row per setting (keys :data:`ROW_KEYS`, plus CLIP keys with ``clip``)."""
    from tqdm.auto import tqdm

    from ip2p.eval.evaluate import clip_scorer

    if not examples:
        raise ValueError("examples is empty; expected at least one example to sweep over")
    model = _as_model(model)
    scorer = clip_scorer(clip)  # loaded once for all settings
    settings = [("image", float(text_guidance), float(s)) for s in image_scales]
    settings += [("text", float(s), float(image_guidance)) for s in text_scales]
    rows = []
    done: dict[tuple[float, float], dict] = {}  # the point both sweeps pass through edits the same: run it once
    for sweep, s_t, s_i in tqdm(settings, desc="guidance sweep", unit="setting", disable=not progress):
        if (s_t, s_i) not in done:
            outputs = run_edits(model, examples, steps=steps, text_guidance=s_t, image_guidance=s_i,
                                scheduler=scheduler, seed=seed, batch_size=batch_size, progress=False)
            done[s_t, s_i] = score_edits(examples, outputs, clip=scorer)
        summary = done[s_t, s_i]
        row = {"sweep": sweep, "text_guidance": s_t, "image_guidance": s_i}
        row.update({key: summary[key] for key in ROW_KEYS[3:]})
        row.update({key: summary[key] for key in ("clip_sim_image", "clip_sim_dir") if key in summary})
        rows.append(row)
        logger.info("s_T=%g s_I=%g: success %.2f (strict %.2f), L1 to input %.4f, error outside mask %.4f", s_t, s_i,
                    row["success"], row["strict_success"], row["l1_to_source"], row["err_out_mask"])
    return rows


def write_table(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write sweep rows as CSV (columns in :data:`ROW_KEYS` order, then any others); returns the path."""
    from ip2p import atomic

    path = Path(path)
    columns = list(ROW_KEYS) + sorted({k for row in rows for k in row} - set(ROW_KEYS))
    with atomic.writing_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


_PANELS = (
    ("l1_to_source", "consistency: mean |output - input| (lower = closer to input)", "success",
     "edit strength: success rate"),
    ("err_out_mask", "consistency: error outside the edit mask", "err_in_mask",
     "edit strength: error inside the mask (lower = stronger)"),
    ("clip_sim_image", "consistency: CLIP image similarity", "clip_sim_dir",
     "edit strength: CLIP directional similarity"),
)


def plot_sweep(rows: Sequence[dict], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Plot consistency (x) against edit strength (y) for each sweep, as a PNG; returns the path.

    Panels: L1 to input vs success; error outside vs inside the mask; and CLIP image vs directional similarity when
    the rows have CLIP scores. Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("rows is empty; expected the rows of guidance_sweep")
    panels = [p for p in _PANELS if all(p[0] in r and p[2] in r for r in rows)]
    fig = Figure(figsize=(5.2 * len(panels), 4.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    styles = {"image": ("tab:blue", "o", "s_I sweep (s_T={s_T:g})", "image_guidance", "s_I"),
              "text": ("tab:orange", "s", "s_T sweep (s_I={s_I:g})", "text_guidance", "s_T")}
    for k, (x_key, x_label, y_key, y_label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for sweep, (colour, marker, label, scale_key, short) in styles.items():
            part = [r for r in rows if r["sweep"] == sweep]
            if not part:
                continue
            xs, ys = [r[x_key] for r in part], [r[y_key] for r in part]
            ax.plot(xs, ys, color=colour, marker=marker, label=label.format(s_T=part[0]["text_guidance"],
                                                                             s_I=part[0]["image_guidance"]))
            for r, x, y in zip(part, xs, ys):
                ax.annotate(f"{short}={r[scale_key]:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=colour)
        if x_key in ("l1_to_source", "err_out_mask"):
            ax.invert_xaxis()  # right = more consistent, as for CLIP image similarity
        if y_key == "err_in_mask":
            ax.invert_yaxis()  # up = stronger edit
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    from ip2p import atomic

    path = Path(path)
    with atomic.writing_file(path) as tmp:  # a kill never leaves a cut-off PNG in place of the last one
        fig.savefig(tmp, format="png")
    return path
