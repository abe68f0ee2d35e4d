"""Write generated pairs as a training-ready dataset, resumably and from several processes at once.

Formats (``formats``):

- ``parquet``: ``<out>/data/train-<shard tag>-<n>.parquet``, columns :data:`COLUMNS`. The image columns are
  Hugging Face ``Image`` structs ``{bytes, path}`` with the ``datasets`` feature metadata in the schema, so
  ``datasets.load_dataset("parquet", data_files=...)`` decodes them as images and ``train.py`` (``data.path=<out>``)
  reads the folder directly; ``input_image``/``edit_prompt``/``edited_image`` are the names it detects.
- ``seeds``: the original release's layout: ``<out>/seeds.json`` = ``[[dir, [seed, ...]], ...]``, and per caption pair
  ``<out>/<id:07d>/prompt.json`` (``input``, ``edit``, ``output``), ``{seed}_0.jpg`` (input), ``{seed}_1.jpg``
  (edited) and ``metadata.jsonl`` (seed, p2p_threshold, cfg_scale and the CLIP scores, as the orig wrote it).

Resuming. The unit of work is a caption pair (all its samples). Each process (shard) keeps a manifest
``<out>/_progress/<shard tag>.json`` listing the pairs it finished and the parquet files holding them. Rows are
buffered and committed in two atomic steps: the parquet file is written to a temporary name and ``os.replace``d into
place, then the manifest is replaced. The manifest is the commit point: on restart, a parquet file of this shard that
the manifest does not list (written just before a kill) is deleted and its pairs are generated again, so each pair
ends up in exactly one committed file. Pairs are never split across files. The manifest also keeps a short digest of
each finished pair's captions (``digests``, in the order of ``done``): a run resumed from a prompts file whose pair
of the same id says something else is refused (:meth:`DatasetWriter.check_pairs`) instead of mixing two captions
sets in one dataset; a prompts file that only grew resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ip2p import atomic
from ip2p.datagen.shards import Shard, output_errors

logger = logging.getLogger(__name__)

__all__ = ["COLUMNS", "FORMATS", "DatasetWriter", "Pair", "Sample", "encode_image", "read_manifests"]

FORMATS = ("parquet", "seeds", "both")
SCORE_COLUMNS = ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")
COLUMNS = ("input_image", "edit_prompt", "edited_image", "input_prompt", "edited_prompt", "pair_id", "seed",
           "p2p_threshold", "cfg_scale", *SCORE_COLUMNS)
"""Parquet columns. Caption columns avoid the names the data layer probes for images/instructions (``input``,
``output``, ``edit``), so column detection stays unambiguous."""
PROGRESS_DIR = "_progress"
DATA_DIR = "data"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Pair:
    """One caption pair from the text stage; ``id`` is unique in the dataset (it names folders and shards work)."""

    id: int
    input: str
    edit: str
    output: str


@dataclass
class Sample:
    """One generated (input image, edited image) sample of a pair. Images: (H, W, 3) uint8 arrays."""

    pair: Pair
    seed: int
    p2p_threshold: float
    cfg_scale: float
    image_in: np.ndarray
    image_out: np.ndarray
    scores: dict[str, float] = field(default_factory=dict)


def encode_image(image: np.ndarray, fmt: str = "png") -> bytes:
    """(H, W, 3) uint8 -> PNG (lossless, default) or JPEG (quality 95) bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    pil = Image.fromarray(np.ascontiguousarray(image))
    if fmt == "png":
        pil.save(buffer, format="PNG")
    elif fmt in ("jpg", "jpeg"):
        pil.save(buffer, format="JPEG", quality=95)
    else:
        raise ValueError(f"image_format={fmt!r} is unknown; expected png or jpg")
    return buffer.getvalue()


def _schema():
    """Arrow schema with datasets' feature metadata, so load_dataset decodes the image columns as images."""
    import datasets

    features = datasets.Features({
        "input_image": datasets.Image(), "edit_prompt": datasets.Value("string"),
        "edited_image": datasets.Image(), "input_prompt": datasets.Value("string"),
        "edited_prompt": datasets.Value("string"), "pair_id": datasets.Value("int64"),
        "seed": datasets.Value("int64"), "p2p_threshold": datasets.Value("float32"),
        "cfg_scale": datasets.Value("float32"),
        **{name: datasets.Value("float32") for name in SCORE_COLUMNS},
    })
    return features.arrow_schema


def read_manifests(out_dir: str | os.PathLike) -> list[dict]:
    """Every shard manifest under ``out_dir/_progress`` (any shard count), for the done set and seeds.json."""
    folder = Path(out_dir) / PROGRESS_DIR
    return [_read_manifest(path) for path in (sorted(folder.glob("*.json")) if folder.is_dir() else [])]


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        # Manifests are replaced atomically, so a broken one was edited by hand or the disk failed.
        raise ValueError(f"{path} is not valid JSON ({e}); restore it or delete it to redo its pairs") from None


def pair_digest(pair: Pair) -> str:
    """A short digest of a pair's three captions, recorded per finished pair so a resume can tell them apart."""
    return hashlib.sha1("\n".join((pair.input, pair.edit, pair.output)).encode()).hexdigest()[:10]


class DatasetWriter:
    """Collects the kept samples of finished pairs and commits them in batches (see the module docstring).

    ``settings``: what produced the data (model, steps, thresholds, ...); a resumed run must pass the same, so one
    folder never mixes two configurations. ``rows_per_file``: parquet rows per file (the hub set has ~1,200);
    ``commit_every_s``: commit at least this often, bounding the work a kill can lose.
    """

    def __init__(self, out_dir: str | os.PathLike, *, shard: Shard = Shard(), formats: str = "parquet",
                 settings: dict | None = None, rows_per_file: int = 1000, commit_every_s: float = 600.0,
                 image_format: str = "png") -> None:
        if formats not in FORMATS:
            raise ValueError(f"format={formats!r} is unknown; expected one of {', '.join(FORMATS)}")
        if rows_per_file < 1:
            raise ValueError(f"rows_per_file={rows_per_file} must be at least 1")
        encode_image(np.zeros((1, 1, 3), np.uint8), image_format)  # fail now on a bad format, not at the first commit
        self.out = Path(out_dir)
        self.shard = shard
        self.parquet = formats in ("parquet", "both")
        self.seeds = formats in ("seeds", "both")
        self.rows_per_file = rows_per_file
        self.commit_every_s = commit_every_s
        self.image_format = image_format
        self.settings = json.loads(json.dumps(dict(settings or {}, format=formats, image_format=image_format)))
        self.manifest_path = self.out / PROGRESS_DIR / f"{shard.tag}.json"
        self._rows: list[Sample] = []
        self._pending: list[tuple[Pair, int, list[Sample]]] = []
        self._last_commit = time.monotonic()
        self.manifest = self._open()
        self.done_ids = self._all_done()

    # -- state -------------------------------------------------------------------------------------------------
    def _open(self) -> dict:
        fresh = {"version": MANIFEST_VERSION, "shard": [self.shard.index, self.shard.count],
                 "settings": self.settings, "done": [], "files": [], "seeds": [], "tried": 0, "kept": 0}
        if not self.manifest_path.is_file():
            self._clean_orphans()
            return fresh
        manifest = _read_manifest(self.manifest_path)
        if manifest.get("settings") != self.settings:
            old, new = manifest.get("settings", {}), self.settings
            diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)]
            raise ValueError(f"{self.out} holds a run with other settings ({'; '.join(diff)}); resume with the same "
                             "settings or write to a new output folder")
        self._clean_orphans()
        return manifest

    def _clean_orphans(self) -> None:
        """Delete the parquet files (and temporary files) no manifest lists, of this shard and of the shards of any
        other shard count that wrote a manifest here: a run resumed with other ``--num-shards`` redoes the pairs of
        such a file, which would otherwise be in the dataset twice. Files of the other shards of this run are theirs to
        clean (they may be running); files named otherwise (a hub download's ``train-00000-of-00002-<hash>``) are not
        ours."""
        data = self.out / DATA_DIR
        if not data.is_dir():
            return
        manifests = read_manifests(self.out)
        listed = {name for manifest in manifests for name in manifest.get("files", [])}
        counts = {manifest.get("shard", [0, 0])[1] for manifest in manifests} - {self.shard.count}
        for path in data.iterdir():
            name = re.fullmatch(r"\.?train-(\d{5})-of-(\d{5})-\d{5}\.parquet(\.tmp-.*)?", path.name)
            if name is None or path.name in listed:
                continue
            index, count = int(name.group(1)), int(name.group(2))
            if (index, count) == (self.shard.index, self.shard.count) or count in counts:
                logger.info("removing %s: written after the last commit of an interrupted run", path)
                with output_errors(path):
                    path.unlink()

    def _all_done(self) -> set[int]:
        done = set(self.manifest["done"])
        for manifest in read_manifests(self.out):
            if manifest.get("shard") != [self.shard.index, self.shard.count]:
                done.update(manifest.get("done", []))
        return done

    def check_pairs(self, pairs: Iterable[Pair]) -> None:
        """Refuse ``pairs`` if one has the id of a pair already finished here (by any shard) with other captions."""
        known: dict[int, str] = {}
        manifests = [m for m in read_manifests(self.out) if m.get("shard") != [self.shard.index, self.shard.count]]
        for manifest in [self.manifest, *manifests]:
            known.update((i, d) for i, d in zip(manifest.get("done", []), manifest.get("digests", [])) if d)
        if not known:
            return
        differ = [pair for pair in pairs if pair.id in known and known[pair.id] != pair_digest(pair)]
        if differ:
            first = differ[0]
            raise ValueError(f"{self.out} already holds pair id {first.id} made from other captions or another "
                             f"instruction than {first.input!r} -> {first.output!r} with {first.edit!r} "
                             f"({len(differ)} such pairs); resume with the "
                             "prompts file this folder was made from, or write to a new output folder")

    @property
    def tried(self) -> int:
        return self.manifest["tried"] + sum(tried for _, tried, _ in self._pending)

    @property
    def kept(self) -> int:
        return self.manifest["kept"] + sum(len(samples) for _, _, samples in self._pending)

    # -- writing -----------------------------------------------------------------------------------------------
    def add_pair(self, pair: Pair, samples: Sequence[Sample], tried: int) -> None:
        """Record a finished pair: its kept ``samples`` (possibly none) out of ``tried`` generated."""
        if pair.id in self.done_ids:
            raise ValueError(f"pair id {pair.id} is already in {self.out}; pair ids must be unique")
        samples = list(samples)
        if self.seeds:
            with output_errors(self.out / _pair_dir(pair)):
                self._write_pair_folder(pair, samples)
        self._pending.append((pair, tried, samples))
        self._rows.extend(samples)
        self.done_ids.add(pair.id)
        if len(self._rows) >= self.rows_per_file or time.monotonic() - self._last_commit >= self.commit_every_s:
            self.commit()

    def commit(self) -> None:
        """Make every added pair durable: write the buffered rows to a new parquet file, then the manifest."""
        if not self._pending:
            return
        manifest = dict(self.manifest)
        if self.parquet and self._rows:
            name = f"train-{self.shard.tag}-{len(manifest['files']):05d}.parquet"
            data = self._parquet_bytes(self._rows)
            with output_errors(self.out / DATA_DIR / name):
                atomic.write_bytes(self.out / DATA_DIR / name, data)
            manifest["files"] = manifest["files"] + [name]
        # Manifests written before the digests existed have none for their pairs (null: not checked on resume).
        digests = manifest.get("digests", [None] * len(manifest["done"]))
        manifest["digests"] = digests + [pair_digest(pair) for pair, _, _ in self._pending]
        manifest["done"] = manifest["done"] + [pair.id for pair, _, _ in self._pending]
        manifest["tried"] = self.tried
        manifest["kept"] = self.kept
        if self.seeds:
            manifest["seeds"] = manifest["seeds"] + [[_pair_dir(pair), [s.seed for s in samples]]
                                                     for pair, _, samples in self._pending if samples]
        with output_errors(self.manifest_path):
            atomic.write_json(self.manifest_path, manifest, ensure_ascii=False)
        self.manifest = manifest
        self._pending, self._rows = [], []
        self._last_commit = time.monotonic()

    def close(self) -> None:
        """Commit what is left; with the seeds layout, rebuild ``seeds.json`` from every shard's manifest."""
        self.commit()
        if self.seeds:
            self._write_seeds_json()

    def _parquet_bytes(self, rows: Iterable[Sample]) -> bytes:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = list(rows)
        fmt = self.image_format

        def nan(sample: Sample, key: str) -> float:
            return float(sample.scores.get(key, math.nan))

        columns = {
            "input_image": [{"bytes": encode_image(s.image_in, fmt), "path": None} for s in rows],
            "edit_prompt": [s.pair.edit for s in rows],
            "edited_image": [{"bytes": encode_image(s.image_out, fmt), "path": None} for s in rows],
            "input_prompt": [s.pair.input for s in rows],
            "edited_prompt": [s.pair.output for s in rows],
            "pair_id": [s.pair.id for s in rows],
            "seed": [s.seed for s in rows],
            "p2p_threshold": [s.p2p_threshold for s in rows],
            "cfg_scale": [s.cfg_scale for s in rows],
            **{key: [nan(s, key) for s in rows] for key in SCORE_COLUMNS},
        }
        buffer = io.BytesIO()
        pq.write_table(pa.table(columns, schema=_schema()), buffer)
        return buffer.getvalue()

    def _write_pair_folder(self, pair: Pair, samples: list[Sample]) -> None:
        folder = self.out / _pair_dir(pair)
        if folder.exists():  # left by a run killed before it committed this pair
            shutil.rmtree(folder)
        if not samples:
            return
        folder.mkdir(parents=True)
        (folder / "prompt.json").write_text(json.dumps(
            {"input": pair.input, "edit": pair.edit, "output": pair.output}, ensure_ascii=False))
        lines = []
        for s in samples:
            (folder / f"{s.seed}_0.jpg").write_bytes(_jpeg(s.image_in))
            (folder / f"{s.seed}_1.jpg").write_bytes(_jpeg(s.image_out))
            lines.append(json.dumps({"seed": s.seed, "p2p_threshold": s.p2p_threshold, "cfg_scale": s.cfg_scale,
                                     **{k: float(v) for k, v in s.scores.items()}}))
        (folder / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))

    def _write_seeds_json(self) -> None:
        """seeds.json from all manifests, under a lock: whichever shard finishes last writes the complete list."""
        with output_errors(self.out / "seeds.json"), _locked(self.out / PROGRESS_DIR / "seeds.lock"):
            entries = sorted(tuple(entry) for m in read_manifests(self.out) for entry in m.get("seeds", []))
            atomic.write_json(self.out / "seeds.json", [[folder, list(seeds)] for folder, seeds in entries],
                              ensure_ascii=False)


def _pair_dir(pair: Pair) -> str:
    return f"{pair.id:07d}"


def _jpeg(image: np.ndarray) -> bytes:
    """The orig saved JPEG at quality 100; the seeds layout readers expect .jpg."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=100)
    return buffer.getvalue()


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock (POSIX flock) on ``path``, held for the block."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
