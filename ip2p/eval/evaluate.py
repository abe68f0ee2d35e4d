"""Evaluate an editor on data with known targets (the :mod:`ip2p.synthetic` test splits, or any rows in that format).

:func:`evaluate` edits every example with the editor and scores it with :mod:`ip2p.eval.metrics` (L1/PSNR to the
target, errors inside/outside the edit mask, per-edit-type success and strict success), plus the mean L1 to the
*source* (how much the editor changed at all) and, given a CLIP model, the CLIP image and directional similarities
of SPEC section 7 (captions are written from the scenes' metadata, e.g. "a red circle and a blue square on a white
background"). :func:`run_edits` and :func:`score_edits` are its two halves, for callers that also want the images.

Reproducibility: example ``i`` starts from noise drawn by its own generator (seeded from ``seed`` and ``i``), so its
initial latent does not depend on the batch size; ancestral samplers also draw noise at every step from one generator
per batch (seeded from ``seed`` and the batch's first index), which does depend on how examples are batched.
"""

from __future__ import annotations

import glob
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ip2p.eval.metrics import edit_success, l1, summarise
from ip2p.synthetic import EditExample

logger = logging.getLogger(__name__)

DEFAULT_SPLITS = ("test_heldout_combinations", "test_heldout_phrasings")
CLIP_KEYS = ("clip_sim_image", "clip_sim_dir")


# --------------------------------------------------------------------------------------------------------------- data


def _parquet_files(path: str, split: str) -> list[str]:
    """The parquet files of ``split`` under a write_dataset folder, a parquet folder, a glob or one file."""
    from ip2p.synthetic import dataset_files

    local = os.path.expanduser(path)
    if os.path.isdir(local):
        try:
            files = dataset_files(local)
        except FileNotFoundError:
            files = None
        if files is not None:
            if split not in files:
                raise ValueError(f"split={split!r} is not in {path}; expected one of {sorted(files)}")
            return [str(f) for f in files[split]]
        found = sorted(glob.glob(os.path.join(local, "**", f"{split}-*.parquet"), recursive=True))
        found += sorted(glob.glob(os.path.join(local, "**", f"{split}.parquet"), recursive=True))
        if not found:
            raise FileNotFoundError(f"data={path!r} has no {split}-*.parquet files; expected a folder written by "
                                    "ip2p.synthetic.write_dataset, a parquet file or a glob")
        return found
    if glob.has_magic(local):
        found = sorted(glob.glob(local, recursive=True))
        if not found:
            raise FileNotFoundError(f"data={path!r} matches no files")
        return found
    if os.path.isfile(local):
        return [local]
    raise FileNotFoundError(f"data={path!r} does not exist; expected a synthetic dataset folder, a parquet file or "
                            "a glob")


def load_examples(data: str | os.PathLike | Iterable[EditExample | Mapping[str, Any]], *,
                  split: str = DEFAULT_SPLITS[0], limit: int | None = None) -> list[EditExample]:
    """Examples with targets, masks and metadata: from a dataset path (``split`` of a ``write_dataset`` folder, or
    parquet files with its columns) or from EditExamples / dataset rows. ``limit`` keeps the first ``limit``
    (the synthetic splits cycle through the edit types, so a prefix stays balanced)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit!r} must be at least 1 (or None for all examples)")
    if isinstance(data, (str, os.PathLike)):
        import pyarrow.parquet as pq

        examples: list[EditExample] = []
        path = os.fspath(data)
        # Files named by a glob or one path hold rows of any split: keep those of ``split`` (their metadata says).
        chosen = glob.has_magic(path) or os.path.isfile(os.path.expanduser(path))
        other_splits: set[str] = set()
        for file in _parquet_files(path, split):
            try:
                table = pq.read_table(file)
            except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
                raise ValueError(f"{file} cannot be read as parquet ({' '.join(str(error).split())}); expected "
                                 "files written by ip2p.synthetic.write_dataset") from None
            missing = {"input_image", "edited_image", "mask", "edit_prompt", "edit_type", "metadata"} - set(
                table.column_names)
            if missing:
                raise ValueError(f"{file} lacks the columns {sorted(missing)}; expected rows written by "
                                 "ip2p.synthetic.write_dataset")
            for index, row in enumerate(table.to_pylist()):
                try:
                    example = EditExample.from_row(row)
                    if chosen and example.metadata.get("split", split) != split:
                        other_splits.add(str(example.metadata.get("split")))
                        continue
                    # Scoring reads the scenes, subjects and colours of the metadata: check them before any edit.
                    edit_success(example.target, example)
                except (KeyError, TypeError, ValueError, IndexError) as error:
                    raise ValueError(f"{file}: row {index} is not an edit example with a target image, a mask and "
                                     f"scene metadata ({type(error).__name__}: {error}); expected rows written by "
                                     "ip2p.synthetic.write_dataset") from None
                examples.append(example)
                if limit is not None and len(examples) >= limit:
                    return examples
        if not examples and other_splits:
            raise ValueError(f"data={path!r} has no rows of split {split!r}, only of {sorted(other_splits)}; "
                             "choose one of those with --split")
        return examples
    examples = [e if isinstance(e, EditExample) else EditExample.from_row(e) for e in data]
    return examples[:limit] if limit is not None else examples


def scene_caption(scene: Mapping[str, Any]) -> str:
    """A caption of a synthetic scene's metadata, e.g. "a red circle and a blue star on a white background"."""
    from ip2p.synthetic import _thing, list_caption

    return list_caption([_thing(o["shape"], o["colour"]) for o in scene["objects"]], scene["background"])


# -------------------------------------------------------------------------------------------------------------- edits


def _as_model(model: Any) -> Any:
    if isinstance(model, (str, os.PathLike)):
        from ip2p.models import load_editor

        return load_editor(model, expand=False)
    return model


def _as_scheduler(model: Any, scheduler: Any) -> Any:
    if scheduler is None or isinstance(scheduler, str):
        from ip2p.sampling import make_scheduler

        return make_scheduler(scheduler, model.scheduler.config)
    return scheduler


def _generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for example ``index`` of a run seeded with ``seed`` (any int: taken modulo 2**64, the range
    ``manual_seed`` accepts, which maps a negative seed s to s + 2**64 itself)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**64)


def _initial_latents(model: Any, indices: Sequence[int], seed: int, height: int, width: int) -> torch.Tensor:
    f = model.vae_scale_factor
    shape = (model.latent_channels, height // f, width // f)
    rows = [torch.randn(shape, generator=_generator(seed, i)) for i in indices]
    return torch.stack(rows).to(device=model.device, dtype=model.dtype)  # (B, C, h, w)


def run_edits(model: Any, examples: Sequence[EditExample], *, steps: int = 20, text_guidance: float = 7.5,
              image_guidance: float = 1.5, scheduler: Any = None, seed: int = 0, batch_size: int = 32,
              progress: bool = True) -> list[np.ndarray]:
    """Edit each example's source with its instruction; returns (H, W, 3) uint8 images (rounded as a PNG would be).

    ``model``: an ``EditorModel`` or a checkpoint path; ``scheduler``: a short name (``ip2p.sampling.SCHEDULERS``),
    a scheduler object, or None for ``ip2p.sampling.default_scheduler`` of the model's prediction type.
    """
    from tqdm.auto import tqdm

    from ip2p.sampling import edit

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be at least 1")
    for name, value in (("text_guidance", text_guidance), ("image_guidance", image_guidance)):
        if not math.isfinite(value):
            raise ValueError(f"{name}={value!r} must be a finite number, e.g. 1.5")
    model = _as_model(model)
    sched = _as_scheduler(model, scheduler)
    outputs: list[np.ndarray] = []
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc=f"editing (s_T={text_guidance:g}, s_I={image_guidance:g})", unit="batch",
                      disable=not progress, leave=False):
        chunk = examples[start:start + batch_size]
        sources = torch.from_numpy(np.stack([e.source for e in chunk])).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        images = sources.float().div(127.5).sub(1.0)
        latents = _initial_latents(model, range(start, start + len(chunk)), seed, *images.shape[-2:])
        out = edit(model, images, [e.instruction for e in chunk], steps=steps, text_guidance=text_guidance,
                   image_guidance=image_guidance, scheduler=sched, latents=latents,
                   generator=_generator(seed, start), progress=False)
        array = (out.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        outputs.extend(array)
    return outputs


# ------------------------------------------------------------------------------------------------------------ scoring


def clip_scorer(clip: Any) -> Any:
    """A ClipScorer from a path (None when ``ip2p.eval.clip`` is unavailable), or ``clip`` itself."""
    if clip is None or not isinstance(clip, (str, os.PathLike)):
        return clip
    try:
        from ip2p.eval.clip import ClipScorer
    except ImportError as error:
        logger.warning("CLIP scores skipped: ip2p.eval.clip is not available (%s)", error)
        return None
    return ClipScorer(clip)


def clip_scores(scorer: Any, examples: Sequence[EditExample], outputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-example CLIP image similarity (source vs output) and directional similarity (caption change vs image
    change), each an (N,) array. Images go to CLIP in [0, 1], as it expects."""
    sources = [e.source for e in examples]
    captions_in = [scene_caption(e.metadata["source"]) for e in examples]
    captions_out = [scene_caption(e.metadata["target"]) for e in examples]
    scores = scorer.scores(sources, list(outputs), captions_in, captions_out)
    return {key: scores[key].numpy() for key in CLIP_KEYS}


def score_edits(examples: Sequence[EditExample], outputs: Sequence[Any], *, clip: Any = None) -> dict[str, Any]:
    """Summarise edited ``outputs`` against ``examples``: ``metrics.summarise`` (overall and ``by_type``) plus
    ``l1_to_source`` and, with ``clip`` (a CLIP model path or a ``ClipScorer``), ``clip_sim_image``/``clip_sim_dir``.
    """
    if len(outputs) != len(examples):
        raise ValueError(f"got {len(outputs)} outputs for {len(examples)} examples; pass one per example")
    if not examples:
        raise ValueError("examples is empty; expected at least one example to score")
    results = [edit_success(out, ex) for out, ex in zip(outputs, examples)]
    extra = {"l1_to_source": np.array([l1(out, ex.source) for out, ex in zip(outputs, examples)])}
    scorer = clip_scorer(clip)
    if scorer is not None:
        extra.update(clip_scores(scorer, examples, outputs))
    summary = summarise(results)
    types = np.array([r["edit_type"] for r in results])
    for key, values in extra.items():
        summary[key] = float(values.mean())
        for kind, entry in summary["by_type"].items():
            entry[key] = float(values[types == kind].mean())
    return summary


def evaluate(model: Any, data: str | os.PathLike | Iterable[EditExample | Mapping[str, Any]], *,
             split: str = DEFAULT_SPLITS[0], limit: int | None = None, steps: int = 20, text_guidance: float = 7.5,
             image_guidance: float = 1.5, scheduler: Any = None, seed: int = 0, batch_size: int = 32,
             clip: Any = None, progress: bool = True) -> dict[str, Any]:
    """Edit the examples of ``data`` (see :func:`load_examples`) and score them (see :func:`score_edits`).

    Returns the summary with ``settings`` (the sampling settings used) added; JSON-ready.
    """
    examples = load_examples(data, split=split, limit=limit)
    if not examples:
        raise ValueError(f"no examples in {data!r} (split {split!r}); expected at least one")
    model = _as_model(model)
    if scheduler is None:
        from ip2p.sampling import default_scheduler

        scheduler = default_scheduler(model.scheduler.config.get("prediction_type"))
    outputs = run_edits(model, examples, steps=steps, text_guidance=text_guidance, image_guidance=image_guidance,
                        scheduler=scheduler, seed=seed, batch_size=batch_size, progress=progress)
    summary = score_edits(examples, outputs, clip=clip)
    summary["settings"] = sampling_settings(steps=steps, text_guidance=text_guidance, image_guidance=image_guidance,
                                            scheduler=scheduler, seed=seed)
    return summary


def sampling_settings(*, steps: int, text_guidance: float, image_guidance: float, scheduler: Any,
                      seed: int) -> dict[str, Any]:
    """The sampling settings as a JSON-ready dict (a scheduler object is named by its class)."""
    name = scheduler if isinstance(scheduler, str) or scheduler is None else type(scheduler).__name__
    return {"steps": steps, "text_guidance": text_guidance, "image_guidance": image_guidance, "scheduler": name,
            "seed": seed}


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON atomically; returns the path."""
    from ip2p import atomic

    return atomic.write_json(path, data, indent=2, sort_keys=False)
