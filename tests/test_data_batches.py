"""ip2p.data.EditBatches: epoch order, world-size invariance, resume, streaming, bad records, DataLoader workers."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_data_support import (
    RES,
    collect,
    encode,
    image_dataset,
    image_rows,
    noise_image,
    pair,
    private_datasets_cache,  # noqa: F401 (autouse fixture)
    write_image_files,
    write_jsonl,
    write_parquet_dir,
    write_seeds_layout,
)

from ip2p.data import AugmentConfig, EditBatches, make_dataloader, open_records

N = 10
AUGMENT = AugmentConfig(resolution=RES, random_resize=(RES, 20))


@pytest.fixture(scope="module")
def parquet_root(tmp_path_factory):
    return write_parquet_dir(tmp_path_factory.mktemp("pq"), N, shards=3)


@pytest.fixture(scope="module")
def map_records(parquet_root, tmp_path_factory):
    return open_records(parquet_root, cache_dir=tmp_path_factory.mktemp("cache"))


def _records(parquet_root, map_records, kind: str):
    return map_records if kind == "map" else open_records(parquet_root, streaming=True)


def _batches(records, **kwargs) -> EditBatches:
    kwargs.setdefault("augment", AUGMENT)
    kwargs.setdefault("seed", 3)
    return EditBatches(records, **kwargs)


def _assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key in ("index", "record", "source", "target", "valid"):
        assert torch.equal(a[key], b[key]), key
    assert a["instruction"] == b["instruction"]
    assert (a["num_bad"], a["bad_reasons"]) == (b["num_bad"], b["bad_reasons"])


def _merge(parts: list[dict]) -> dict:
    merged = {"step": parts[0]["step"], "instruction": sum((p["instruction"] for p in parts), []),
              "num_bad": sum(p["num_bad"] for p in parts), "bad_reasons": sum((p["bad_reasons"] for p in parts), [])}
    for key in ("index", "record", "source", "target", "valid"):
        merged[key] = torch.cat([p[key] for p in parts])
    return merged


def _record_numbers(batches: list[dict]) -> list[int]:
    return [int(r) for batch in batches for r in batch["record"]]


# Order -------------------------------------------------------------------------------------------------------


def test_map_style_epochs_are_fresh_permutations_that_follow_without_a_gap(map_records):
    stream = _batches(map_records, batch_size=4, max_steps=5)  # 20 positions = 2 epochs; step 2 spans both
    batches = list(stream)
    assert [b["step"] for b in batches] == [0, 1, 2, 3, 4]
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(20))
    records = _record_numbers(batches)
    assert sorted(records[:N]) == list(range(N)) and sorted(records[N:]) == list(range(N))
    assert records[:N] != records[N:] and records[:N] != list(range(N))
    assert records == [stream.record_of(p) for p in range(20)]
    # Each slot holds its record's own instruction and pixels.
    first = batches[0]
    assert first["instruction"] == [f"edit {r}" for r in first["record"].tolist()]
    assert torch.all(first["valid"]) and first["source"].shape == (4, 3, RES, RES)
    ordered = _record_numbers(list(_batches(map_records, batch_size=4, shuffle=False, max_steps=5)))
    assert ordered == [p % N for p in range(20)]


def test_order_depends_on_the_seed_only(map_records):
    run = _record_numbers(list(_batches(map_records, batch_size=5, seed=1, max_steps=2)))
    again = _record_numbers(list(_batches(map_records, batch_size=5, seed=1, max_steps=2)))
    other = _record_numbers(list(_batches(map_records, batch_size=5, seed=2, max_steps=2)))
    assert run == again and run != other


# World size and resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["map", "stream", "stream+buffer"])
def test_one_and_two_processes_assemble_the_same_global_batches(parquet_root, map_records, kind):
    records = _records(parquet_root, map_records, kind)
    options = {"max_steps": 4, "shuffle_buffer": 4 if kind == "stream+buffer" else 0}
    single = list(_batches(records, batch_size=4, **options))
    ranks = [list(_batches(_records(parquet_root, map_records, kind), batch_size=2, rank=r, world_size=2, **options))
             for r in range(2)]
    assert len(single) == 4 and all(len(r) == 4 for r in ranks)
    for step, whole in enumerate(single):
        _assert_same(_merge([ranks[0][step], ranks[1][step]]), whole)
    assert torch.equal(ranks[1][0]["index"], torch.tensor([2, 3]))


@pytest.mark.parametrize("kind", ["map", "stream", "stream+buffer"])
def test_resume_reproduces_the_tail_of_an_uninterrupted_run(parquet_root, map_records, kind):
    options = {"batch_size": 3, "shuffle_buffer": 4 if kind == "stream+buffer" else 0}
    full = list(_batches(_records(parquet_root, map_records, kind), max_steps=8, **options))
    # Step 5 starts at position 15, in the second epoch of 10 records.
    resumed = list(_batches(_records(parquet_root, map_records, kind), start_step=5, max_steps=8, **options))
    assert [b["step"] for b in resumed] == [5, 6, 7]
    for a, b in zip(resumed, full[5:]):
        _assert_same(a, b)


def test_streaming_of_unknown_length_resumes_beyond_its_first_epoch(tmp_path):
    folder = tmp_path / "js"
    names = write_image_files(folder, 5)
    write_jsonl(folder / "train.jsonl", [
        {"input_image": s, "edit_prompt": f"edit {i}", "edited_image": t} for i, (s, t) in enumerate(names)
    ])
    full = list(_batches(open_records(folder / "train.jsonl", streaming=True), batch_size=2, shuffle=False,
                         max_steps=7))
    assert _record_numbers(full) == [p % 5 for p in range(14)]
    records = open_records(folder / "train.jsonl", streaming=True)
    assert records.num_records is None
    resumed = list(_batches(records, batch_size=2, shuffle=False, start_step=4, max_steps=7))  # position 8
    for a, b in zip(resumed, full[4:], strict=True):
        _assert_same(a, b)


def test_streaming_epochs_repeat_the_stream_and_the_buffer_shuffles_each_epoch(parquet_root):
    plain = list(_batches(open_records(parquet_root, streaming=True), batch_size=5, shuffle=False, max_steps=4))
    assert _record_numbers(plain) == [p % N for p in range(20)]
    shuffled = _record_numbers(list(_batches(open_records(parquet_root, streaming=True), batch_size=5,
                                             shuffle_buffer=4, max_steps=4)))
    epoch0, epoch1 = shuffled[:N], shuffled[N:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(N))
    assert epoch0 != list(range(N)) and epoch0 != epoch1


# Bad records -------------------------------------------------------------------------------------------------


def _bad_dataset(tmp_path):
    """12 rows: 0, 11 good; 1-6 bad in different ways; 7-10 odd but convertible images."""
    rows = image_rows(12)
    src = rows["input_image"]
    truncated = encode(noise_image(1, (30, 30)), "JPEG", quality=90)
    sixteen = Image.fromarray(np.full((20, 24), 40000, dtype=np.uint16))
    src[1] = {"bytes": b"not an image at all", "path": None}
    src[2] = {"bytes": truncated[: len(truncated) // 2], "path": None}
    src[3] = {"bytes": None, "path": str(tmp_path / "gone.png")}
    rows["edit_prompt"][4] = None
    src[5] = None
    src[6] = {"bytes": b"", "path": None}
    src[7] = {"bytes": encode(pair(7)[0].convert("L")), "path": None}
    src[8] = {"bytes": encode(pair(8)[0].convert("RGBA")), "path": None}
    src[9] = {"bytes": encode(pair(9)[0].convert("CMYK"), "JPEG"), "path": None}
    src[10] = {"bytes": encode(sixteen), "path": None}
    # Written with pyarrow: datasets' writers would embed (or fail on) the file the path names.
    pq.write_table(image_dataset(rows).data.table, tmp_path / "bad.parquet")
    return open_records(tmp_path / "bad.parquet", cache_dir=tmp_path / "cache")


BAD = {1: "source: cannot decode image", 2: "source: cannot decode image (OSError: image file is truncated",
       3: "source: image file not found", 4: "instruction: instruction is missing", 5: "source: image is missing",
       6: "source: image is zero-size"}


def test_bad_records_are_skipped_counted_and_the_stream_continues(tmp_path, caplog):
    records = _bad_dataset(tmp_path)
    loader = make_dataloader(_batches(records, batch_size=4, shuffle=False, max_steps=6))  # two epochs
    with caplog.at_level(logging.WARNING, logger="ip2p.data"):
        batches = list(loader)
    assert len(batches) == 6
    valid = torch.cat([b["valid"] for b in batches])
    expected_valid = torch.tensor([p % 12 not in BAD for p in range(24)])
    assert torch.equal(valid, expected_valid)
    reasons = [r for b in batches for r in b["bad_reasons"]]
    assert [b["num_bad"] for b in batches] == [3, 3, 0, 3, 3, 0]
    for position, reason in zip([p for p in range(24) if p % 12 in BAD], reasons, strict=True):
        assert reason.startswith(f"position {position} (record {position % 12}): {BAD[position % 12]}"), reason
    source = torch.cat([b["source"] for b in batches])
    instructions = [t for b in batches for t in b["instruction"]]
    for position in range(24):
        if expected_valid[position]:
            assert source[position].abs().sum() > 0 and instructions[position] == f"edit {position % 12}"
        else:
            assert torch.all(source[position] == 0) and instructions[position] == ""
    assert loader.bad_records.total == 12 and len(loader.bad_records.reasons) == 10
    assert "image file not found" in caplog.text and "skipped bad record" in caplog.text


def test_seeds_layout_batches_skip_a_prompt_without_prompt_json(tmp_path):
    folders = write_seeds_layout(tmp_path / "orig", 3, seeds_per_prompt=2)
    os.remove(tmp_path / "orig" / folders[1] / "prompt.json")
    records = open_records(tmp_path / "orig", split="train")  # floor(0.9 * 3) = 2 prompts, 4 pairs
    batch = next(iter(_batches(records, batch_size=4, shuffle=False)))
    assert batch["valid"].tolist() == [True, True, False, False]
    assert "prompt file not found" in batch["bad_reasons"][0]
    assert batch["instruction"][:2] == ["edit 0", "edit 0"]


# DataLoader workers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["map", "stream"])
def test_two_dataloader_workers_yield_the_same_batches_in_order(parquet_root, map_records, kind):
    options = {"batch_size": 3, "start_step": 1, "max_steps": 7, "num_workers": 2}
    in_process = list(_batches(_records(parquet_root, map_records, kind), **options))
    loader = make_dataloader(_batches(_records(parquet_root, map_records, kind), **options))
    assert loader.num_workers == 2 and loader.persistent_workers
    with_workers = list(loader)
    assert [b["step"] for b in with_workers] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(with_workers, in_process, strict=True):
        _assert_same(a, b)


def test_max_steps_and_argument_checks(map_records):
    assert len(list(_batches(map_records, batch_size=2, start_step=3, max_steps=5))) == 2
    assert collect(_batches(map_records, batch_size=2), 3)[-1]["step"] == 2  # None: endless
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, world_size=2\), got 2"):
        EditBatches(map_records, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        EditBatches(map_records, batch_size=0)


def test_every_worker_reads_the_whole_of_a_sharded_datasets_stream(monkeypatch):
    # datasets splits an IterableDataset's shards among DataLoader workers when iterated with iter(); our
    # workers must each see every row, or steps would silently lose records.
    from ip2p.data import records as records_module

    local = image_dataset(image_rows(N)).to_iterable_dataset(num_shards=2)
    monkeypatch.setattr(records_module, "_load_dataset", lambda *args, **kwargs: local)
    options = {"batch_size": 2, "max_steps": 6, "num_workers": 2, "shuffle": False}
    in_process = list(_batches(open_records("owner/sharded", streaming=True), **options))
    with_workers = list(make_dataloader(_batches(open_records("owner/sharded", streaming=True), **options)))
    assert _record_numbers(with_workers) == [p % N for p in range(12)]
    for a, b in zip(with_workers, in_process, strict=True):
        _assert_same(a, b)


def test_dataloader_workers_leave_sigterm_to_the_training_process(parquet_root, map_records):
    # Slurm and `timeout` signal the whole process group; a worker that died of it would crash the run before the
    # training process could save its checkpoint.
    import signal

    loader = make_dataloader(_batches(map_records, batch_size=2, max_steps=6, num_workers=1))
    batches = iter(loader)
    first = next(batches)
    for worker in loader._iterator._workers:  # persistent workers: the loader keeps its iterator
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert [first["step"]] + [b["step"] for b in batches] == [0, 1, 2, 3, 4, 5]


def test_cached_records_keep_their_instruction_and_skip_their_images(tmp_path):
    records = _bad_dataset(tmp_path)
    # 0 and 11 are good, 4 has no instruction, 1 an undecodable image: cached 0 and 4, 1 and 11 not.
    plain = next(iter(_batches(records, batch_size=12, shuffle=False)))
    cached = next(iter(_batches(records, batch_size=12, shuffle=False, cached_records={0, 1, 4})))
    assert cached["instruction"][0] == plain["instruction"][0] != ""
    assert not cached["source"][0].any() and not cached["target"][0].any() and plain["source"][0].any()
    assert torch.equal(cached["source"][11], plain["source"][11]) and cached["valid"][11]
    # A cached record's images are taken as good (the consumer holds them), its instruction is still checked.
    assert cached["valid"][0] and cached["valid"][1] and not plain["valid"][1]
    assert not cached["valid"][4] and any(r.startswith("position 4 (record 4): instruction") for r in
                                          cached["bad_reasons"])
