"""CLIP filter: keep generated samples whose edit is consistent and follows the captions (paper section 3.1.2).

A sample passes when (orig defaults; the paper's text says 0.75 for the image threshold, its code used 0.7)

- ``clip_sim_image >= 0.7``  the edited image still looks like the input,
- ``clip_sim_dir >= 0.2``    the image change points the way the caption change does,
- ``clip_sim_0 >= 0.2`` and ``clip_sim_1 >= 0.2``  each image matches its caption;

of the passing samples of one caption pair the ``k = 4`` with the highest directional similarity are kept.
The scores come from :class:`ip2p.eval.clip.ClipScorer`, the implementation evaluation uses.

``filter_dataset`` re-filters a dataset the image stage wrote unfiltered (``--no-filter``), scoring rows that have no
scores yet; the image stage normally filters as it goes (``select``), storing only kept samples.
"""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from ip2p.datagen.config import FilterConfig
from ip2p.datagen.shards import Shard

logger = logging.getLogger(__name__)

__all__ = ["FilterConfig", "filter_dataset", "passes", "select"]


def passes(scores: dict[str, torch.Tensor], config: FilterConfig = FilterConfig()) -> torch.Tensor:
    """Which samples meet every threshold. scores: the four (N,) tensors of ``ClipScorer.scores``. Returns (N,) bool.

    A NaN score (not computed) fails, so unscored samples never slip through.
    """
    missing = [k for k in ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image") if k not in scores]
    if missing:
        raise ValueError(f"scores lack {', '.join(missing)}; pass the dict ClipScorer.scores returns")
    # Compare at the scores' own precision, so a float32 score equal to float32(threshold) passes.
    s = {k: torch.as_tensor(v) for k, v in scores.items()}
    s = {k: v if v.is_floating_point() else v.double() for k, v in s.items()}

    def at_least(key: str, threshold: float) -> torch.Tensor:
        return s[key] >= torch.tensor(threshold, dtype=s[key].dtype)

    return (at_least("clip_sim_image", config.min_image_sim) & at_least("clip_sim_dir", config.min_dir_sim)
            & at_least("clip_sim_0", config.min_caption_sim) & at_least("clip_sim_1", config.min_caption_sim))


def select(scores: dict[str, torch.Tensor], config: FilterConfig = FilterConfig()) -> list[int]:
    """Indices of the kept samples of one caption pair: passing ones, best directional similarity first, at most k.

    Ties keep the earlier sample (stable order), so the choice is deterministic.
    """
    ok = passes(scores, config)
    direction = torch.as_tensor(scores["clip_sim_dir"], dtype=torch.float64)
    candidates = [i for i in range(ok.shape[0]) if bool(ok[i])]
    candidates.sort(key=lambda i: -float(direction[i]))
    return candidates[:config.keep_top]


def _decode(cell: dict | bytes) -> np.ndarray:
    from PIL import Image

    data = cell["bytes"] if isinstance(cell, dict) else cell
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def filter_dataset(in_dir: str | os.PathLike, writer, scorer=None, config: FilterConfig = FilterConfig(), *,
                   shard: Shard = Shard(), progress: bool = True) -> None:
    """Filter the parquet dataset ``in_dir`` (image-stage output) pair by pair into ``writer`` (a ``DatasetWriter``).

    Rows with NaN scores are scored with ``scorer`` (a ``ClipScorer``); rows already scored keep their scores, so
    re-filtering with other thresholds needs no model. Resumes and shards like the image stage (by pair id). Reads
    the files the shard manifests of ``in_dir`` list (every parquet file of a folder without manifests), never one an
    interrupted run wrote but did not commit.
    """
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from ip2p.datagen.writer import COLUMNS, DATA_DIR, PROGRESS_DIR, Pair, Sample, read_manifests

    files = sorted((Path(in_dir) / DATA_DIR).glob("*.parquet"))
    manifests = read_manifests(in_dir)
    if manifests:  # only committed files: a killed, not yet resumed run leaves one its manifest does not list
        listed = {name for manifest in manifests for name in manifest.get("files", [])}
        missing = sorted(listed - {path.name for path in files})
        if missing:
            raise FileNotFoundError(f"{Path(in_dir) / DATA_DIR} lacks {', '.join(missing)}, which the manifests in "
                                    f"{Path(in_dir) / PROGRESS_DIR} list as written; restore them from a copy, or "
                                    "pass a complete images-stage folder")
        skipped = [path.name for path in files if path.name not in listed]
        if skipped:
            logger.info("not reading %s: no manifest lists them (written by an interrupted run)", ", ".join(skipped))
        files = [path for path in files if path.name in listed]
    if not files:
        raise FileNotFoundError(f"no parquet files in {Path(in_dir) / DATA_DIR}; pass the output folder of the "
                                "images stage")
    for path in files:  # before any work: another dataset's files would fail at their first row
        missing = [name for name in COLUMNS if name not in pq.read_schema(path).names]
        if missing:
            raise ValueError(f"{path} lacks the columns {', '.join(missing)}; pass the output folder of the images "
                             "stage (filter re-filters what `images --no-filter` wrote)")
    bar = tqdm(total=len(files), desc="filtering files", unit="file", disable=not progress)
    for path in files:
        table = pq.read_table(path)
        ids = table.column("pair_id").to_pylist()
        for pair_id in dict.fromkeys(ids):  # the writer never splits a pair over files
            if not shard.owns(pair_id) or pair_id in writer.done_ids:
                continue
            rows = table.filter(np.asarray(ids) == pair_id).to_pylist()
            first = rows[0]
            pair = Pair(pair_id, first["input_prompt"], first["edit_prompt"], first["edited_prompt"])
            samples = [Sample(pair, r["seed"], r["p2p_threshold"], r["cfg_scale"], _decode(r["input_image"]),
                              _decode(r["edited_image"]),
                              {k: r[k] for k in ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")})
                       for r in rows]
            unscored = [s for s in samples if any(v is None or math.isnan(v) for v in s.scores.values())]
            if unscored:
                if scorer is None:
                    raise ValueError(f"{path} has unscored rows (pair {pair_id}); pass a CLIP model (--clip)")
                new = scorer.scores(torch.from_numpy(np.stack([s.image_in for s in unscored])).permute(0, 3, 1, 2),
                                    torch.from_numpy(np.stack([s.image_out for s in unscored])).permute(0, 3, 1, 2),
                                    pair.input, pair.output)
                for i, s in enumerate(unscored):
                    s.scores = {k: float(v[i]) for k, v in new.items()}
            scores = {k: torch.tensor([s.scores[k] for s in samples]) for k in samples[0].scores}
            writer.add_pair(pair, [samples[i] for i in select(scores, config)], tried=len(samples))
        bar.update(1)
        bar.set_postfix(kept=writer.kept, tried=writer.tried)
    bar.close()
    writer.close()
