"""ip2p.data sources: every dataset format, splits, column detection, streaming reads and resume positions."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from test_data_support import (  # noqa: E402
    encode,
    image_dataset,
    image_rows,
    pair,
    private_datasets_cache,  # noqa: F401 (autouse fixture)
    write_image_files,
    write_jsonl,
    write_parquet_dir,
    write_seeds_layout,
)

from ip2p.data import ColumnMap, Records, decode_image, open_records  # noqa: E402
from ip2p.data import records as records_module  # noqa: E402


def _instructions(records: Records) -> list[str]:
    return [raw["instruction"] for _, raw in records.iterate()]


def _same_pixels(value, expected) -> bool:
    return np.array_equal(np.asarray(decode_image(value)), np.asarray(expected))


# Formats -----------------------------------------------------------------------------------------------------


def test_parquet_folder_uses_hub_split_names(tmp_path):
    root = write_parquet_dir(tmp_path / "pq", 6, shards=2, test_rows=2)
    train = open_records(root, cache_dir=tmp_path / "cache")
    assert (train.num_records, train.streaming) == (6, False)
    assert _instructions(train) == [f"edit {i}" for i in range(6)]
    raw = train.get(4)
    assert set(raw) == {"source", "instruction", "target"}
    assert isinstance(raw["source"], dict) and raw["source"]["bytes"]  # undecoded bytes
    assert _same_pixels(raw["source"], pair(4)[0]) and _same_pixels(raw["target"], pair(4)[1])
    assert open_records(root, split="test", cache_dir=tmp_path / "cache").num_records == 2
    with pytest.raises(ValueError, match=r"split='validation'.*\['test', 'train'\]"):
        open_records(root, split="validation", cache_dir=tmp_path / "cache")


def test_parquet_glob_and_single_file(tmp_path):
    root = write_parquet_dir(tmp_path / "pq", 6, shards=3)
    records = open_records(str(root / "data" / "train-*.parquet"), cache_dir=tmp_path / "cache")
    assert records.num_records == 6
    assert _instructions(records) == [f"edit {i}" for i in range(6)]  # files in sorted order
    single = open_records(root / "data" / "train-00001-of-00003.parquet", cache_dir=tmp_path / "cache")
    assert _instructions(single) == ["edit 2", "edit 3"]
    with pytest.raises(FileNotFoundError, match="matches no files"):
        open_records(str(root / "nothing-*.parquet"))


def test_jsonl_with_paths_relative_to_its_folder(tmp_path):
    folder = tmp_path / "js"
    names = write_image_files(folder, 3)
    rows = [{"input_image": s, "edit_prompt": f"edit {i}", "edited_image": t} for i, (s, t) in enumerate(names)]
    path = write_jsonl(folder / "train.jsonl", rows)
    records = open_records(path, cache_dir=tmp_path / "cache")
    raw = records.get(2)
    assert raw["source"] == str(folder / "img" / "2_src.png")  # made absolute against the file's folder
    assert _same_pixels(raw["source"], pair(2)[0]) and _same_pixels(raw["target"], pair(2)[1])
    # The same file as a folder, and through a glob, from another working directory.
    assert _instructions(open_records(folder, cache_dir=tmp_path / "cache")) == ["edit 0", "edit 1", "edit 2"]
    streamed = open_records(str(folder / "*.jsonl"), streaming=True)
    assert streamed.num_records is None  # json lines: unknown until read
    assert [p for p, _ in streamed.iterate()] == [0, 1, 2] and streamed.num_records == 3
    assert _same_pixels(dict(streamed.iterate(1))[1]["target"], pair(1)[1])


def test_imagefolder_with_two_file_name_columns(tmp_path):
    folder = tmp_path / "imf"
    names = write_image_files(folder, 3)
    write_jsonl(folder / "metadata.jsonl", [
        {"input_image_file_name": s, "edited_image_file_name": t, "edit_prompt": f"edit {i}"}
        for i, (s, t) in enumerate(names)
    ])
    for streaming in (False, True):
        records = open_records(folder, streaming=streaming, cache_dir=tmp_path / "cache")
        assert (records.columns.source, records.columns.target) == ("input_image", "edited_image")
        rows = dict(records.iterate())
        assert [rows[i]["instruction"] for i in range(3)] == ["edit 0", "edit 1", "edit 2"]
        assert _same_pixels(rows[1]["source"], pair(1)[0]) and _same_pixels(rows[1]["target"], pair(1)[1])


def test_imagefolder_metadata_with_plain_relative_paths(tmp_path):
    folder = tmp_path / "imf"
    names = write_image_files(folder, 2)
    write_jsonl(folder / "metadata.jsonl", [
        {"original_image": s, "instruction": f"edit {i}", "output_image": t} for i, (s, t) in enumerate(names)
    ])
    records = open_records(folder, cache_dir=tmp_path / "cache")
    assert records.num_records == 2
    assert _same_pixels(records.get(1)["target"], pair(1)[1])


def test_imagefolder_with_top_level_metadata_only_says_so_when_another_split_is_asked(tmp_path, caplog):
    folder = tmp_path / "imf"
    names = write_image_files(folder, 2)
    write_jsonl(folder / "metadata.jsonl", [
        {"original_image": s, "instruction": f"edit {i}", "output_image": t} for i, (s, t) in enumerate(names)
    ])
    with caplog.at_level("INFO", logger="ip2p.data.records"):
        assert open_records(folder, split="train", cache_dir=tmp_path / "cache").num_records == 2
        assert "top-level" not in caplog.text
        assert open_records(folder, split="test", cache_dir=tmp_path / "cache").num_records == 2
    assert "has no test/ subfolder with metadata: using its top-level metadata.jsonl for split='test'" in caplog.text


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    from datasets import DatasetDict

    dataset = image_dataset(image_rows(4))
    dataset.save_to_disk(str(tmp_path / "one"))
    records = open_records(tmp_path / "one")
    assert records.num_records == 4 and _same_pixels(records.get(3)["target"], pair(3)[1])
    DatasetDict({"train": dataset, "validation": dataset.select([2, 3])}).save_to_disk(str(tmp_path / "dict"))
    assert _instructions(open_records(tmp_path / "dict", split="val")) == ["edit 2", "edit 3"]
    with pytest.raises(ValueError, match=r"split='test'.*\['train', 'validation'\]"):
        open_records(tmp_path / "dict", split="test")
    streamed = open_records(tmp_path / "one", streaming=True)
    assert streamed.streaming and [p for p, _ in streamed.iterate(2)] == [2, 3]
    with pytest.raises(TypeError, match="streaming"):
        streamed.get(0)


def test_seeds_json_layout_splits_90_5_5_by_sorted_folder(tmp_path):
    folders = write_seeds_layout(tmp_path / "orig", 20, seeds_per_prompt=2)  # seeds.json written unsorted
    train = open_records(tmp_path / "orig")
    val = open_records(tmp_path / "orig", split="validation")
    test = open_records(tmp_path / "orig" / "seeds.json", split="test")
    # floor(0.9 * 20) = 18 prompts for train, then 1 and 1; every (prompt, seed) pair is a record.
    assert (train.num_records, val.num_records, test.num_records) == (36, 2, 2)
    assert open_records(tmp_path / "orig", split="val").num_records == 2
    assert _instructions(val) == ["edit 18", "edit 18"] and _instructions(test) == ["edit 19", "edit 19"]
    first = train.get(1)
    assert first["instruction"] == "edit 0"
    assert first["source"].endswith(os.path.join(folders[0], "1_0.jpg"))
    assert first["target"].endswith(os.path.join(folders[0], "1_1.jpg"))
    assert decode_image(first["source"]).size == (24, 20)
    with pytest.raises(ValueError, match="split='dev2'"):
        open_records(tmp_path / "orig", split="dev2")


def test_seeds_json_missing_prompt_is_a_bad_record_not_an_error(tmp_path):
    folders = write_seeds_layout(tmp_path / "orig", 3, seeds_per_prompt=1)
    os.remove(tmp_path / "orig" / folders[0] / "prompt.json")
    (tmp_path / "orig" / folders[1] / "prompt.json").write_text(json.dumps({"input": "no edit key"}))
    records = open_records(tmp_path / "orig")
    assert "prompt file not found" in records.get(0)["error"]
    assert "no 'edit' key" in records.get(1)["error"]


def test_streaming_parquet_reads_in_order_and_resumes_by_skipping_files(tmp_path, monkeypatch):
    root = write_parquet_dir(tmp_path / "pq", 7, shards=3)  # files of 2, 2 and 3 rows
    streamed = open_records(root, streaming=True)
    assert streamed.streaming and streamed.num_records == 7  # from the parquet footers, nothing read
    mapped = open_records(root, cache_dir=tmp_path / "cache")
    assert [r["instruction"] for _, r in streamed.iterate()] == _instructions(mapped)
    # Resuming at row 5 must not open the first two files at all.
    opened = []
    real = records_module._load_dataset

    def spy(*args, **kwargs):
        opened.append(kwargs.get("data_files"))
        return real(*args, **kwargs)

    monkeypatch.setattr(records_module, "_load_dataset", spy)
    tail = list(streamed.iterate(5))
    assert [(p, r["instruction"]) for p, r in tail] == [(5, "edit 5"), (6, "edit 6")]
    assert len(opened) == 1 and [os.path.basename(f) for f in opened[0]["train"]] == ["train-00002-of-00003.parquet"]
    assert _same_pixels(tail[0][1]["source"], pair(5)[0])
    with pytest.raises(TypeError, match="streaming"):
        streamed.get(0)


def test_hub_id_goes_through_load_dataset(tmp_path, monkeypatch):
    calls = []
    local = image_dataset(image_rows(3))

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return local.to_iterable_dataset() if kwargs.get("streaming") else local

    monkeypatch.setattr(records_module, "_load_dataset", fake_load_dataset)
    records = open_records("fusing/instructpix2pix-1000-samples", split="train")
    assert calls[0][0] == "fusing/instructpix2pix-1000-samples"
    assert calls[0][1]["split"] == "train" and calls[0][1]["streaming"] is False
    assert records.num_records == 3 and records.get(2)["instruction"] == "edit 2"
    streamed = open_records("fusing/instructpix2pix-1000-samples", streaming=True)
    assert calls[1][1]["streaming"] is True and streamed.num_records is None
    assert [r["instruction"] for _, r in streamed.iterate(1)] == ["edit 1", "edit 2"]


def test_unknown_paths_raise_file_not_found_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere/at-all.*save_to_disk folder.*seeds.json"):
        open_records("nowhere/at-all")  # looks like a hub id: offline here, so unreachable
    with pytest.raises(FileNotFoundError, match=r"does not exist.*parquet"):
        open_records(str(tmp_path / "missing.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no dataset in a known layout"):
        open_records(tmp_path / "empty")


# Columns -----------------------------------------------------------------------------------------------------


def test_columns_detected_among_extra_columns(tmp_path):
    # The clip-filtered set's columns: only one candidate per field despite the look-alike prompt columns.
    rows = image_rows(2, names=("original_image", "edit_prompt", "edited_image"),
                      extra={"original_prompt": ["a", "b"], "edited_prompt": ["c", "d"]})
    image_dataset(rows).save_to_disk(str(tmp_path / "d"))
    records = open_records(tmp_path / "d")
    assert records.columns == ColumnMap("original_image", "edit_prompt", "edited_image")
    assert records.get(1)["instruction"] == "edit 1"


def test_ambiguous_and_missing_columns_name_the_columns_and_config_key(tmp_path):
    rows = image_rows(1, extra={"image": [{"bytes": encode(pair(0)[0]), "path": None}]})
    image_dataset(rows).save_to_disk(str(tmp_path / "ambiguous"))
    with pytest.raises(ValueError, match=r"ambiguous source.*\['input_image', 'image'\].*data\.source_column"):
        open_records(tmp_path / "ambiguous")
    rows = image_rows(1, names=("input_image", "caption", "edited_image"))
    image_dataset(rows).save_to_disk(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"instruction column.*'caption'.*data\.instruction_column"):
        open_records(tmp_path / "missing")


def test_custom_column_names(tmp_path):
    rows = image_rows(2, names=("before", "caption", "after"))
    image_dataset(rows).save_to_disk(str(tmp_path / "d"))
    records = open_records(tmp_path / "d", columns=ColumnMap(source="before", instruction="caption", target="after"))
    assert records.get(1)["instruction"] == "edit 1" and _same_pixels(records.get(1)["target"], pair(1)[1])
    with pytest.raises(ValueError, match=r"data\.target_column='afterr' is not a column.*'after'"):
        open_records(tmp_path / "d", columns=ColumnMap("before", "caption", "afterr"))


# Damaged and empty data --------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_empty_datasets_are_one_line_errors(tmp_path, streaming):
    empty_parquet = write_parquet_dir(tmp_path / "pq", 2, shards=1)
    table = empty_parquet / "data" / "train-00000-of-00001.parquet"
    image_dataset(image_rows(2)).select([]).to_parquet(str(table))
    (tmp_path / "empty.jsonl").write_text("")
    image_dataset(image_rows(2)).select([]).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "imgf").mkdir()
    (tmp_path / "imgf" / "metadata.jsonl").write_text("")
    for path in (empty_parquet, tmp_path / "empty.jsonl", tmp_path / "saved", tmp_path / "imgf"):
        with pytest.raises(ValueError, match="has no records"):
            open_records(path, streaming=streaming, cache_dir=tmp_path / "cache")


def test_a_row_less_shard_among_others_is_left_out(tmp_path):
    root = write_parquet_dir(tmp_path / "pq", 4, shards=2)
    image_dataset(image_rows(1)).select([]).to_parquet(str(root / "data" / "train-00002-of-00003.parquet"))
    for streaming in (False, True):
        records = open_records(root, streaming=streaming, cache_dir=tmp_path / "cache")
        assert _instructions(records) == [f"edit {i}" for i in range(4)]


def test_damaged_files_are_errors_naming_them(tmp_path):
    root = write_parquet_dir(tmp_path / "pq", 4, shards=2)
    shard = root / "data" / "train-00001-of-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated second shard: map-style once failed inside datasets
    with pytest.raises(ValueError, match="train-00001-of-00002.parquet"):
        open_records(root, cache_dir=tmp_path / "cache")
    folder = tmp_path / "js"
    names = write_image_files(folder, 2)
    lines = [json.dumps({"input_image": s, "edit_prompt": "e", "edited_image": t}) for s, t in names]
    (folder / "train.jsonl").write_text(lines[0] + '\n{"input_image": \n' + lines[1] + "\n")
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"cannot read .*js.*well-formed"):
            list(open_records(folder, streaming=streaming, cache_dir=tmp_path / "cache").iterate())
    image_dataset(image_rows(3)).save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:400])
    with pytest.raises(ValueError, match=r"cannot read saved dataset .*saved"):
        open_records(tmp_path / "saved")


def test_csv_file_folder_and_glob(tmp_path):
    folder = tmp_path / "csv"
    names = write_image_files(folder, 3)
    (folder / "pairs.csv").write_text("input_image,edit_prompt,edited_image\n"
                                      + "".join(f"{s},edit {i},{t}\n" for i, (s, t) in enumerate(names)))
    for path in (folder / "pairs.csv", folder, str(folder / "*.csv")):
        records = open_records(path, cache_dir=tmp_path / "cache")
        assert _instructions(records) == ["edit 0", "edit 1", "edit 2"]
        assert _same_pixels(records.get(1)["target"], pair(1)[1])


@pytest.mark.parametrize("name, content", [("metadata.jsonl", b"not json\n"), ("metadata.parquet", b"PAR1garbage"),
                                           ("metadata.csv", b"\xff\xfe,\x00\n")])
def test_an_unreadable_metadata_file_is_an_error_naming_it(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"cannot read the metadata file .*{name}"):
        open_records(tmp_path, cache_dir=tmp_path / "cache")
