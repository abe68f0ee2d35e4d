"""ip2p.data against awkward inputs: mixed-type columns, inconsistent shards, odd column maps, extreme images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_support import (
    RES,
    encode,
    image_dataset,
    image_rows,
    noise_image,
    pair,
    private_datasets_cache,  # noqa: F401 (autouse fixture)
    write_image_files,
    write_jsonl,
    write_parquet_dir,
)

from ip2p.data import (
    AugmentConfig,
    BadRecord,
    ColumnMap,
    EditBatches,
    decode_image,
    decode_instruction,
    make_dataloader,
    open_records,
)

AUGMENT = AugmentConfig(resolution=RES, random_resize=(RES, 20))


@pytest.mark.parametrize("streaming", [False, True])
def test_json_columns_of_mixed_types_are_read_as_values_not_json_text(tmp_path, streaming):
    # datasets stores a column whose JSON values mix types as JSON text; its strings must not keep their quotes.
    folder = tmp_path / "js"
    names = write_image_files(folder, 4)
    rows = [{"input_image": s, "edit_prompt": f"edit {i}", "edited_image": t} for i, (s, t) in enumerate(names)]
    rows[1]["edit_prompt"] = 5
    rows[2]["input_image"] = {"bytes": None, "path": names[2][0]}  # an image dict among path strings
    records = open_records(write_jsonl(folder / "train.jsonl", rows), streaming=streaming,
                           cache_dir=tmp_path / "cache")
    raws = dict(records.iterate())
    assert [raws[i]["instruction"] for i in range(4)] == ["edit 0", 5, "edit 2", "edit 3"]
    assert np.array_equal(np.asarray(decode_image(raws[2]["source"])), np.asarray(pair(2)[0]))
    batch = next(iter(EditBatches(records, batch_size=4, augment=AUGMENT, shuffle=False, max_steps=1)))
    assert batch["instruction"] == ["edit 0", "", "edit 2", "edit 3"]
    assert batch["valid"].tolist() == [True, False, True, True]
    assert batch["bad_reasons"] == ["position 1 (record 1): instruction: instruction has type int, expected str"]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_parquet_shard_without_the_columns_is_an_error_naming_it_at_open(tmp_path, streaming):
    # Streaming used to fail only on reaching the shard, mid-run.
    root = tmp_path / "pq"
    (root / "data").mkdir(parents=True)
    image_dataset(image_rows(3)).to_parquet(str(root / "data" / "train-00000-of-00002.parquet"))
    renamed = image_rows(3, names=("input_image", "instruction", "edited_image"))
    image_dataset(renamed).to_parquet(str(root / "data" / "train-00001-of-00002.parquet"))
    with pytest.raises(ValueError, match=r"train-00001-of-00002\.parquet has no column 'edit_prompt'.*"
                                         r"\['input_image', 'instruction', 'edited_image'\]"):
        open_records(root, streaming=streaming, cache_dir=tmp_path / "cache")


def test_an_empty_or_blank_instruction_is_a_bad_record_in_every_format(tmp_path):
    # An empty CSV cell was already skipped (read as missing); "" in JSON lines or parquet was trained on as if the
    # text had been dropped.
    folder = tmp_path / "js"
    names = write_image_files(folder, 4)
    texts = ["edit 0", "", "  \n", "edit 3"]
    rows = [{"input_image": s, "edit_prompt": text, "edited_image": t} for text, (s, t) in zip(texts, names)]
    write_jsonl(folder / "train.jsonl", rows)
    (folder / "train.csv").write_text("input_image,edit_prompt,edited_image\n" + "".join(
        f"{s},{text.strip()},{t}\n" for text, (s, t) in zip(texts, names)))
    for path in (folder / "train.jsonl", folder / "train.csv"):
        records = open_records(path, cache_dir=tmp_path / "cache")
        batch = next(iter(EditBatches(records, batch_size=4, augment=AUGMENT, shuffle=False, max_steps=1)))
        assert batch["valid"].tolist() == [True, False, False, True], path
        assert all("instruction" in reason for reason in batch["bad_reasons"])
    with pytest.raises(BadRecord, match="empty"):
        decode_instruction(b" ")


def test_one_column_named_for_two_fields_is_an_error(tmp_path):
    root = tmp_path / "pq"
    (root / "data").mkdir(parents=True)
    image_dataset(image_rows(2)).to_parquet(str(root / "data" / "train.parquet"))
    with pytest.raises(ValueError, match=r"data\.source_column and data\.target_column both name the column "
                                         r"'input_image'"):
        open_records(root, columns=ColumnMap(target="input_image"), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"data\.instruction_column and data\.target_column both name"):
        open_records(root, columns=ColumnMap(instruction="edited_image"), streaming=True)


def _imagefolder(folder: Path, n: int, first: int = 0, images: str = "img") -> None:
    names = write_image_files(folder, n)
    if images != "img":
        (folder / "img").rename(folder / images)
    write_jsonl(folder / "metadata.jsonl", [
        {"input_image_file_name": s.replace("img/", f"{images}/"), "edit_prompt": f"edit {first + i}",
         "edited_image_file_name": t.replace("img/", f"{images}/")} for i, (s, t) in enumerate(names)
    ])


@pytest.mark.parametrize("streaming", [False, True])
def test_imagefolder_images_in_a_folder_named_like_a_split(tmp_path, streaming):
    # datasets split the folder's files by the words in their paths: "test_images/" hid the metadata of "train".
    _imagefolder(tmp_path / "imf", 2, images="test_images")
    records = open_records(tmp_path / "imf", streaming=streaming, cache_dir=tmp_path / "cache")
    raws = dict(records.iterate())
    assert [raws[i]["instruction"] for i in range(2)] == ["edit 0", "edit 1"]
    assert np.array_equal(np.asarray(decode_image(raws[1]["target"])), np.asarray(pair(1)[1]))


@pytest.mark.parametrize("streaming", [False, True])
def test_imagefolder_sharded_into_subfolders_reads_them_in_sorted_order(tmp_path, streaming):
    # Metadata only in subfolders was read as plain JSON (no image columns); and datasets keeps several metadata
    # files in a set, whose order follows the process's hash seed: ranks and resumed runs numbered records apart.
    for k in range(4):
        _imagefolder(tmp_path / "imf" / f"shard-{k}", 1, first=k)
    records = open_records(tmp_path / "imf", streaming=streaming, cache_dir=tmp_path / "cache")
    assert (records.columns.source, records.columns.target) == ("input_image", "edited_image")
    assert [raw["instruction"] for _, raw in records.iterate()] == [f"edit {k}" for k in range(4)]


def test_a_thin_strip_is_a_bad_record_not_a_huge_resize(tmp_path):
    # 8 x 6000 pixels passes the size checks, but its short side resized to the crop's scale makes it 20 x 15000.
    rows = image_rows(2)
    rows["input_image"][1] = {"bytes": encode(noise_image(0, (8, 6000))), "path": None}
    image_dataset(rows).to_parquet(str(tmp_path / "train.parquet"))
    records = open_records(tmp_path / "train.parquet", cache_dir=tmp_path / "cache")
    batches = EditBatches(records, batch_size=2, augment=AUGMENT, shuffle=False, max_steps=1, max_image_pixels=100_000)
    batch = next(iter(batches))
    assert batch["valid"].tolist() == [True, False]
    assert batch["bad_reasons"] == [("position 1 (record 1): source: image is 8x6000, whose resize to 20x15000 for "
                                     "the crop is over the limit of 100000 pixels")]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_hub_id_offline_reads_its_copy_in_the_hub_cache(tmp_path, monkeypatch, streaming):
    # The layout `huggingface-cli download --repo-type dataset me/pairs` writes; datasets offline did not look there.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "datasets--me--pairs"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    write_parquet_dir(repo / "snapshots" / ("a" * 40), 3, shards=1)
    records = open_records("me/pairs", streaming=streaming, cache_dir=tmp_path / "cache")
    assert [raw["instruction"] for _, raw in records.iterate()] == ["edit 0", "edit 1", "edit 2"]
    with pytest.raises(FileNotFoundError, match="me/other.*could not be loaded from the hub"):
        open_records("me/other", streaming=streaming, cache_dir=tmp_path / "cache")


def test_a_hub_dataset_subset_is_its_configuration(tmp_path, monkeypatch):
    from ip2p.data import records as records_mod

    calls = []

    def load_dataset(path, **kwargs):
        subset = kwargs.get("name")
        calls.append((path, subset))
        if subset not in (None, "clean"):
            raise ValueError(f"BuilderConfig '{subset}' not found. Available: ['default', 'clean']")
        return image_dataset(image_rows(2))

    monkeypatch.setattr(records_mod, "_load_dataset", load_dataset)
    records = open_records("me/pairs", subset="clean", cache_dir=tmp_path / "cache")
    assert calls == [("me/pairs", "clean")] and "subset 'clean'" in records.description
    assert [raw["instruction"] for _, raw in records.iterate()] == ["edit 0", "edit 1"]
    with pytest.raises(ValueError, match=r"data.subset='dirty' could not be loaded from hub dataset me/pairs "
                                         r"\(BuilderConfig 'dirty' not found. Available: \['default', 'clean'\]\)"):
        open_records("me/pairs", subset="dirty")
    # A local dataset has no configurations to pick from: said at once, not ignored.
    write_parquet_dir(tmp_path / "local", 2, shards=1)
    with pytest.raises(ValueError, match="data.subset='clean' names a configuration of a hub dataset"):
        open_records(tmp_path / "local", subset="clean")


def test_a_split_subfolder_metadata_wins_over_the_top_level_one(tmp_path):
    _imagefolder(tmp_path / "imf", 2)  # the training rows, at the top
    _imagefolder(tmp_path / "imf" / "validation", 1, first=7)
    assert [raw["instruction"] for _, raw in open_records(tmp_path / "imf", split="val").iterate()] == ["edit 7"]
    assert [raw["instruction"] for _, raw in open_records(tmp_path / "imf").iterate()] == ["edit 0", "edit 1"]


@pytest.mark.parametrize("streaming", [False, True])
def test_imagefolder_file_names_may_be_absolute_or_leave_the_folder(tmp_path, streaming):
    # datasets' imagefolder refused the whole set for one such name (a stream: when it reached the row, mid-run).
    folder = tmp_path / "imf"
    names = write_image_files(folder, 3)
    sources = [names[0][0], str(folder / names[1][0]), f"../imf/{names[2][0]}"]
    write_jsonl(folder / "metadata.jsonl", [  # a plain path column beside the file names: also relative to the file
        {"input_image_file_name": source, "edit_prompt": f"edit {i}", "edited_image": names[i][1]}
        for i, source in enumerate(sources)
    ])
    records = open_records(folder, streaming=streaming, cache_dir=tmp_path / "cache")
    batch = next(iter(EditBatches(records, batch_size=3, augment=AUGMENT, shuffle=False, max_steps=1)))
    assert batch["valid"].tolist() == [True, True, True], batch["bad_reasons"]
    raws = dict(records.iterate())
    assert np.array_equal(np.asarray(decode_image(raws[2]["source"])), np.asarray(pair(2)[0]))
    assert np.array_equal(np.asarray(decode_image(raws[1]["target"])), np.asarray(pair(1)[1]))


def test_imagefolder_shards_resume_and_spread_over_workers_as_one_dataset(tmp_path):
    for k, n in enumerate((3, 1, 2)):
        _imagefolder(tmp_path / "imf" / f"shard-{k}", n, first=10 * k)
    expected = ["edit 0", "edit 1", "edit 2", "edit 10", "edit 20", "edit 21"]
    for streaming in (False, True):
        records = open_records(tmp_path / "imf", streaming=streaming, cache_dir=tmp_path / "cache")
        assert [(p, raw["instruction"]) for p, raw in records.iterate(2)] == list(enumerate(expected))[2:]
        assert records.count() == 6
        whole = list(EditBatches(records, batch_size=4, augment=AUGMENT, seed=1, max_steps=5))
        fresh = open_records(tmp_path / "imf", streaming=streaming, cache_dir=tmp_path / "cache")
        resumed = list(make_dataloader(EditBatches(fresh, batch_size=4, augment=AUGMENT, seed=1, start_step=2,
                                                   max_steps=5), num_workers=2))
        for a, b in zip(whole[2:], resumed, strict=True):
            assert a["instruction"] == b["instruction"] and torch.equal(a["source"], b["source"])


@pytest.mark.parametrize("name", ["metadata.jsonl", "metadata.csv"])
def test_metadata_with_a_byte_order_mark(tmp_path, name):
    # Windows editors start UTF-8 files with a BOM; datasets reads them, our look at the columns refused them.
    folder = tmp_path / "imf"
    names = write_image_files(folder, 2)
    if name.endswith(".csv"):
        text = "input_image_file_name,edit_prompt,edited_image_file_name\n" + "".join(
            f"{s},edit {i},{t}\n" for i, (s, t) in enumerate(names))
    else:
        text = "".join(json.dumps({"input_image_file_name": s, "edit_prompt": f"edit {i}", "edited_image_file_name": t})
                       + "\n" for i, (s, t) in enumerate(names))
    (folder / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    records = open_records(folder, cache_dir=tmp_path / "cache")
    assert [raw["instruction"] for _, raw in records.iterate()] == ["edit 0", "edit 1"]
    assert np.array_equal(np.asarray(decode_image(records.get(1)["target"])), np.asarray(pair(1)[1]))


def test_an_empty_imagefolder_shard_among_others_is_left_out(tmp_path):
    for k in range(2):
        _imagefolder(tmp_path / "imf" / f"shard-{k}", 2, first=10 * k)
    (tmp_path / "imf" / "shard-2").mkdir()
    (tmp_path / "imf" / "shard-2" / "metadata.jsonl").write_text("")
    for streaming in (False, True):
        records = open_records(tmp_path / "imf", streaming=streaming, cache_dir=tmp_path / "cache")
        assert [raw["instruction"] for _, raw in records.iterate()] == ["edit 0", "edit 1", "edit 10", "edit 11"]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_file_name_column_beside_the_column_it_becomes_is_an_error(tmp_path, streaming):
    folder = tmp_path / "imf"
    names = write_image_files(folder, 1)
    write_jsonl(folder / "metadata.jsonl", [{"file_name": names[0][0], "image": "x", "edit_prompt": "edit 0",
                                            "edited_image": names[0][1]}])
    with pytest.raises(ValueError, match=r"metadata.jsonl has the columns 'file_name' and 'image'"):
        open_records(folder, streaming=streaming, cache_dir=tmp_path / "cache")


def test_a_row_less_first_shard_with_other_columns_does_not_decide_them(tmp_path):
    root = tmp_path / "pq"
    (root / "data").mkdir(parents=True)
    old = image_rows(1, names=("input_image", "instruction", "edited_image"))
    image_dataset(old).select([]).to_parquet(str(root / "data" / "train-00000-of-00002.parquet"))
    image_dataset(image_rows(2)).to_parquet(str(root / "data" / "train-00001-of-00002.parquet"))
    for streaming in (False, True):
        records = open_records(root, streaming=streaming, cache_dir=tmp_path / "cache")
        assert [raw["instruction"] for _, raw in records.iterate()] == ["edit 0", "edit 1"]
