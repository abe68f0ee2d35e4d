"""Builders of tiny on-disk datasets for the ip2p.data tests (no tests here; imported by tests/test_data_*.py)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

RES = 16
"""Training resolution used by the tests: images are 16..40 pixels."""


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """Keep datasets' cache (and the lock files streaming still writes) out of the user's ~/.cache."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def noise_image(seed: int, size: tuple[int, int] = (24, 20)) -> Image.Image:
    """An RGB image of seeded noise (width, height): asymmetric, so flips and crops change it."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pair(i: int, size: tuple[int, int] = (24, 20)) -> tuple[Image.Image, Image.Image]:
    """Record i's (source, target): distinct noise per record; the target is the colour-inverted source."""
    source = noise_image(1000 + i, size)
    target = Image.fromarray(255 - np.asarray(source), "RGB")
    return source, target


def image_rows(n: int, *, names: tuple[str, str, str] = ("input_image", "edit_prompt", "edited_image"),
               extra: dict[str, list[Any]] | None = None) -> dict[str, list[Any]]:
    """Columns of n records with PNG bytes in datasets' Image storage form ({"bytes", "path"})."""
    src, text, dst = names
    rows: dict[str, list[Any]] = {src: [], text: [], dst: []}
    for i in range(n):
        source, target = pair(i)
        rows[src].append({"bytes": encode(source), "path": None})
        rows[text].append(f"edit {i}")
        rows[dst].append({"bytes": encode(target), "path": None})
    rows.update(extra or {})
    return rows


def image_dataset(rows: dict[str, list[Any]]):
    """A datasets.Dataset whose *_image-like dict columns are typed as Image features."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    features = Features({
        name: ImageFeature() if values and isinstance(values[0], dict) else Value("string")
        for name, values in rows.items()
    })
    return Dataset.from_dict(rows, features=features)


def write_parquet_dir(root: Path, n: int, *, shards: int = 2, test_rows: int = 0) -> Path:
    """Hub-style layout: root/data/train-0000k-of-0000s.parquet (+ a test split)."""
    dataset = image_dataset(image_rows(n))
    (root / "data").mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for k in range(shards):
        part = dataset.select(range(bounds[k], bounds[k + 1]))
        part.to_parquet(str(root / "data" / f"train-{k:05d}-of-{shards:05d}.parquet"))
    if test_rows:
        test = image_dataset(image_rows(test_rows))
        test.to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root


def write_image_files(folder: Path, n: int) -> list[tuple[str, str]]:
    """Writes folder/img/{i}_src.png and {i}_dst.png; returns their paths relative to `folder`."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        source, target = pair(i)
        source.save(folder / "img" / f"{i}_src.png")
        target.save(folder / "img" / f"{i}_dst.png")
        names.append((f"img/{i}_src.png", f"img/{i}_dst.png"))
    return names


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_seeds_layout(root: Path, n_prompts: int, seeds_per_prompt: int = 2) -> list[str]:
    """The original release layout; folder names are written to seeds.json in reverse (unsorted) order."""
    folders = [f"{k:04d}_prompt" for k in range(n_prompts)]
    entries = []
    for k, folder in enumerate(folders):
        directory = root / folder
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "prompt.json").write_text(json.dumps({"input": "a", "edit": f"edit {k}", "output": "b"}))
        seeds = [str(1000 * k + s) for s in range(seeds_per_prompt)]
        for s, seed in enumerate(seeds):
            source, target = pair(k * seeds_per_prompt + s)
            source.convert("RGB").save(directory / f"{seed}_0.jpg", quality=95)
            target.convert("RGB").save(directory / f"{seed}_1.jpg", quality=95)
        entries.append([folder, seeds])
    (root / "seeds.json").write_text(json.dumps(entries[::-1]))
    return folders


def collect(batches, steps: int) -> list[dict[str, Any]]:
    """The first `steps` items of an iterable of batches."""
    out = []
    for batch in batches:
        out.append(batch)
        if len(out) == steps:
            break
    return out
