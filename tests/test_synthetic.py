"""The built-in synthetic edit task: exact targets and masks, determinism, disjoint splits, the dataset writer."""

import itertools
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from ip2p import synthetic as syn
from ip2p.eval.metrics import rgb_to_lab

SEEDS = (0, 1, 2)
N_PER_SPLIT = 36  # 6 of each edit type per split and seed


@pytest.fixture(scope="module")
def examples():
    """{(split, seed): [EditExample]} for every split and a few seeds."""
    return {(split, seed): syn.generate_split(split, N_PER_SPLIT, seed) for split in syn.SPLITS for seed in SEEDS}


def _all(examples):
    return list(itertools.chain.from_iterable(examples.values()))


def _colour_pixels(image, region, colour):
    return bool((image[region] == np.array(syn.PALETTE[colour], dtype=np.uint8)).all())


def test_palette_is_well_separated_in_lab():
    lab = {name: rgb_to_lab(np.array(rgb, dtype=np.uint8)) for name, rgb in syn.PALETTE.items()}
    smallest = min(np.linalg.norm(lab[a] - lab[b]) for a, b in itertools.combinations(lab, 2))
    assert len(syn.PALETTE) >= 8 and smallest >= 40.0


def test_every_changed_pixel_is_in_the_mask_and_outside_is_identical(examples):
    for ex in _all(examples):
        changed = (ex.source != ex.target).any(axis=-1)
        assert ex.mask.dtype == bool and ex.mask.shape == ex.source.shape[:2]
        assert not (changed & ~ex.mask).any(), (ex.edit_type, ex.instruction)
        assert (ex.source[~ex.mask] == ex.target[~ex.mask]).all()
        assert changed.any(), ex.instruction


def test_targets_are_drawn_exactly_for_each_edit_type(examples):
    seen = set()
    for ex in _all(examples):
        meta, size = ex.metadata, ex.metadata["size"]
        source, target = ex.source_scene, ex.target_scene
        changed = (ex.source != ex.target).any(axis=-1)
        # The stored scenes redraw both images bit for bit.
        assert (syn.render_scene(source) == ex.source).all() and (syn.render_scene(target) == ex.target).all()
        kind = ex.edit_type
        seen.add(kind)
        old = None if meta["subject"] is None else syn.object_mask(source.objects[meta["subject"]], size)
        new = None if meta["target_subject"] is None else syn.object_mask(target.objects[meta["target_subject"]], size)
        if kind == "recolour_object":
            assert (ex.mask == old).all() and (changed == ex.mask).all()
            assert _colour_pixels(ex.target, ex.mask, meta["expected_colour"])
            assert target.objects[meta["target_subject"]].shape == source.objects[meta["subject"]].shape
        elif kind == "recolour_background":
            assert (ex.mask == syn.background_mask(source)).all() and (changed == ex.mask).all()
            assert _colour_pixels(ex.target, ex.mask, meta["expected_colour"])
            assert target.background == meta["expected_colour"] != source.background
        elif kind == "remove_object":
            # Removing restores the background exactly.
            assert (ex.mask == old).all() and (changed == ex.mask).all()
            assert _colour_pixels(ex.target, ex.mask, source.background)
            assert len(target.objects) == len(source.objects) - 1
        elif kind == "add_object":
            assert (ex.mask == new).all() and (changed == ex.mask).all()
            assert _colour_pixels(ex.source, ex.mask, source.background)
            assert _colour_pixels(ex.target, ex.mask, meta["expected_colour"])
            assert len(target.objects) == len(source.objects) + 1
        elif kind == "move_object":
            assert not (old & new).any() and (ex.mask == (old | new)).all() and (changed == ex.mask).all()
            assert _colour_pixels(ex.target, new, meta["expected_colour"])
            assert _colour_pixels(ex.target, old, source.background)
            fx, fy = syn.POSITIONS[meta["position"]]
            moved = target.objects[meta["target_subject"]]
            assert (moved.cx, moved.cy) == (syn._quarter(fx * size), syn._quarter(fy * size))
        elif kind == "change_shape":
            assert (ex.mask == (old | new)).all() and (changed == (old ^ new)).all()
            assert int(changed.sum()) >= syn.MIN_CHANGED_PIXELS
            assert _colour_pixels(ex.target, new, meta["expected_colour"])
            new_shape = target.objects[meta["target_subject"]].shape
            assert new_shape == meta["new_shape"] != source.objects[meta["subject"]].shape
        if old is not None:
            assert meta["bbox_before"] == syn.mask_bbox(old)
        if new is not None:
            assert meta["bbox_after"] == syn.mask_bbox(new)
    assert seen == set(syn.EDIT_TYPES)


def test_objects_do_not_overlap_and_have_unique_colours(examples):
    for ex in _all(examples):
        for scene in (ex.source_scene, ex.target_scene):
            masks = [syn.object_mask(o, scene.size) for o in scene.objects]
            assert not any((a & b).any() for a, b in itertools.combinations(masks, 2))
            colours = [scene.background] + [o.colour for o in scene.objects]
            assert len(set(colours)) == len(colours)
            assert all(m.any() for m in masks)


def test_instructions_name_the_subject_unambiguously(examples):
    for ex in _all(examples):
        meta = ex.metadata
        if meta["subject"] is None:
            continue
        scene = ex.source_scene
        subject = scene.objects[meta["subject"]]
        twins = sum(o.shape == subject.shape for o in scene.objects)
        name = f"the {subject.shape}" if twins == 1 else f"the {subject.colour} {subject.shape}"
        assert name in ex.instruction, (ex.instruction, name)
        colour = meta["expected_colour"]
        assert ex.instruction == meta["template"].format(
            obj=name,
            colour=colour,
            thing=f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {meta['new_shape']}",
            a_shape=f"a {meta['new_shape']}",
            where_in=syn._WHERE_IN.get(meta["position"], ""),
            where_to=syn._WHERE_TO.get(meta["position"], ""),
        )


def test_phrasing_templates():
    for kind in syn.EDIT_TYPES:
        train, heldout = syn.TRAIN_TEMPLATES[kind], syn.HELDOUT_TEMPLATES[kind]
        assert len(set(train)) >= 5 and len(set(heldout)) >= 1
        assert not set(train) & set(heldout)


def test_same_seed_same_examples_and_examples_do_not_depend_on_n():
    a = syn.generate_split("train", 8, seed=11)
    b = syn.generate_split("train", 5, seed=11)
    c = syn.generate_split("train", 8, seed=12)
    for x, y in zip(a, b):
        assert (x.source == y.source).all() and (x.target == y.target).all() and (x.mask == y.mask).all()
        assert x.instruction == y.instruction and x.metadata == y.metadata
    assert any(x.metadata != z.metadata for x, z in zip(a, c))
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    first, second = syn.generate_example(rng_a, size=48), syn.generate_example(rng_b, size=48)
    assert first.source.shape == (48, 48, 3) and (first.target == second.target).all()
    assert [e.edit_type for e in a[:6]] == list(syn.EDIT_TYPES)


def test_splits_follow_the_held_out_rules(examples):
    heldout = syn.HELDOUT_COMBINATIONS
    for seed in SEEDS:
        splits = {split: examples[split, seed] for split in syn.SPLITS}
        syn.verify_splits(splits)
        for ex in splits["train"]:
            assert not syn.edit_combinations(ex) & heldout
            assert ex.metadata["template"] in syn.TRAIN_TEMPLATES[ex.edit_type]
        for ex in splits["test_heldout_combinations"]:
            assert syn.target_combination(ex) in heldout
            assert ex.metadata["template"] in syn.TRAIN_TEMPLATES[ex.edit_type]
        for ex in splits["test_heldout_phrasings"]:
            assert ex.metadata["template"] in syn.HELDOUT_TEMPLATES[ex.edit_type]
            assert not syn.edit_combinations(ex) & heldout
    # Held-out combinations are tested for every edit type.
    kinds = {ex.edit_type for ex in examples["test_heldout_combinations", 0]}
    assert kinds == set(syn.EDIT_TYPES)


def test_split_check_catches_violations(examples):
    train = examples["train", 0]
    heldout_combo = examples["test_heldout_combinations", 0]
    heldout_phrase = examples["test_heldout_phrasings", 0]
    assert syn.split_violations({"train": train, "test_heldout_combinations": heldout_combo}) == []
    problems = syn.split_violations({"train": train + heldout_combo[:1]})
    assert len(problems) == 1 and "held-out combinations" in problems[0]
    problems = syn.split_violations({"train": train + heldout_phrase[:1]})
    assert len(problems) == 1 and "not a training phrasing" in problems[0]
    with pytest.raises(ValueError, match="held-out"):
        syn.verify_splits({"train": train, "test_heldout_phrasings": heldout_phrase + train[:1]})
    problems = syn.split_violations({"train": train, "test_heldout_phrasings": [m.metadata for m in train[:1]]})
    assert any("same scenes" in p for p in problems)


def test_custom_heldout_combinations():
    custom = [("square", "red"), ("background", "green")]
    test = syn.generate_split("test_heldout_combinations", 6, 3, heldout_combinations=custom)
    assert {syn.target_combination(e) for e in test} <= set(custom)
    train = syn.generate_split("train", 12, 3, heldout_combinations=custom)
    syn.verify_splits({"train": train, "test_heldout_combinations": test}, heldout_combinations=custom)
    with pytest.raises(ValueError, match="heldout_combinations="):
        syn.generate_split("test_heldout_combinations", 2, 0, heldout_combinations=[("circle", "red")])


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"split='val'"):
        syn.generate_split("val", 1, 0)
    with pytest.raises(ValueError, match=r"size=16"):
        syn.generate_example(np.random.default_rng(0), size=16)
    with pytest.raises(ValueError, match=r"edit_type='blur'"):
        syn.generate_example(np.random.default_rng(0), edit_type="blur")
    with pytest.raises(ValueError, match=r"shape='hexagon'"):
        syn.shape_mask("hexagon", 10, 10, 5, 32)
    with pytest.raises(ValueError, match=r"n_train=-1"):
        syn.write_dataset("unused", -1, 1, 0)
    with pytest.raises(ValueError, match=r"n_test=0 is invalid; expected an int >= 1"):
        syn.write_dataset("unused", 1, 0, 0)


def test_scene_images():
    images = syn.scene_images(12, seed=4, size=40)
    assert images.shape == (12, 40, 40, 3) and images.dtype == np.uint8
    assert (images == syn.scene_images(12, seed=4, size=40)).all()
    assert len({img.tobytes() for img in images}) == 12
    palette = {tuple(c) for c in syn.PALETTE.values()}
    assert {tuple(p) for p in images.reshape(-1, 3)} <= palette  # aliased: palette colours only


# ------------------------------------------------------------------------------------------------------------ writer


def _write(out, **kwargs):
    args = dict(n_train=7, n_test=4, seed=3, size=32, rows_per_shard=3)
    args.update(kwargs)
    return syn.write_dataset(out, **args)


def test_writer_round_trip_through_datasets(tmp_path):
    import datasets

    out = _write(tmp_path / "syn")
    files = syn.dataset_files(out)
    assert set(files) == set(syn.SPLITS) and len(files["train"]) == 3  # ceil(7 / 3) shards
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert set(loaded) == set(syn.SPLITS)
    columns = {"input_image", "edit_prompt", "edited_image", "mask", "edit_type", "metadata"}
    for split, n in (("train", 7), ("test_heldout_combinations", 4), ("test_heldout_phrasings", 4)):
        ds = loaded[split]
        assert set(ds.column_names) == columns and ds.num_rows == n
        assert isinstance(ds.features["input_image"], datasets.Image)
        expected = syn.generate_split(split, n, 3, size=32)
        for row, ex in zip(ds, expected):
            back = syn.EditExample.from_row(row)
            assert (back.source == ex.source).all() and (back.target == ex.target).all()
            assert (back.mask == ex.mask).all() and back.instruction == ex.instruction
            assert back.edit_type == ex.edit_type == row["edit_type"] and back.metadata == ex.metadata
    plain = datasets.load_dataset(
        "parquet", data_files={"x": [str(f) for f in files["train"]]}, split="x", cache_dir=str(tmp_path / "cache")
    )
    assert plain.num_rows == 7 and isinstance(plain.features["mask"], datasets.Image)
    syn.verify_splits({split: [json.loads(m) for m in loaded[split]["metadata"]] for split in syn.SPLITS})


def test_writer_skips_identical_and_replaces_different(tmp_path, monkeypatch):
    out = _write(tmp_path / "syn")
    marker = out / syn.PARAMS_FILE
    before = marker.read_text()

    def boom(*args, **kwargs):
        raise AssertionError("regenerated")

    with monkeypatch.context() as patch:
        patch.setattr(syn, "iter_split", boom)
        assert _write(tmp_path / "syn") == out  # same parameters: nothing regenerated
    assert marker.read_text() == before
    _write(tmp_path / "syn", seed=4)
    assert json.loads(marker.read_text())["params"]["seed"] == 4
    calls = []
    original = syn.iter_split
    with monkeypatch.context() as patch:
        patch.setattr(syn, "iter_split", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
        _write(tmp_path / "syn", seed=4, force=True)
    assert calls == list(syn.SPLITS)
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]


def test_writer_is_atomic_when_killed(tmp_path, monkeypatch):
    out = tmp_path / "syn"
    calls = {"n": 0}
    original = syn.EditExample.to_row

    def dies_midway(self):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(syn.EditExample, "to_row", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        _write(out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(syn.EditExample, "to_row", original)
    _write(out)
    old_params = (out / syn.PARAMS_FILE).read_text()
    calls["n"] = 0
    monkeypatch.setattr(syn.EditExample, "to_row", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        _write(out, seed=9)  # a failed regeneration leaves the old dataset whole
    assert (out / syn.PARAMS_FILE).read_text() == old_params
    assert all(f.is_file() for fs in syn.dataset_files(out).values() for f in fs)
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]


def test_every_file_reaches_the_disk_before_the_dataset_is_renamed_into_place(tmp_path, monkeypatch):
    from ip2p import atomic

    synced, renamed = [], []
    real_fsync, real_rename = atomic.fsync_file, os.rename
    monkeypatch.setattr(atomic, "fsync_file", lambda path: synced.append(Path(path).name) or real_fsync(path))
    monkeypatch.setattr(syn.os, "rename", lambda src, dst: renamed.append(set(synced)) or real_rename(src, dst))
    out = _write(tmp_path / "syn")
    # A crash (not just a kill) after the rename would otherwise leave empty shards that params.json calls complete.
    files = {p.name for p in out.rglob("*") if p.is_file()}
    assert len(renamed) == 1 and renamed[0] >= files


def test_a_failed_install_puts_the_previous_dataset_back(tmp_path, monkeypatch):
    out = tmp_path / "syn"
    _write(out)
    old_params = (out / syn.PARAMS_FILE).read_text()
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".syn.tmp-"):  # the old dataset is already aside; the new one fails to move in
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(syn.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        _write(out, seed=9)
    monkeypatch.undo()
    assert (out / syn.PARAMS_FILE).read_text() == old_params
    assert all(f.is_file() for fs in syn.dataset_files(out).values() for f in fs)
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]


def test_writer_cleans_stale_temporaries_and_refuses_foreign_folders(tmp_path):
    stale = tmp_path / ".syn.tmp-999999999-abc"  # no such process
    (stale / "data").mkdir(parents=True)
    _write(tmp_path / "syn")
    assert not stale.exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an ip2p synthetic dataset"):
        _write(foreign)
    assert (foreign / "notes.txt").read_text() == "keep"


def test_cli_writes_a_dataset(tmp_path):
    out = tmp_path / "cli"
    assert syn.main([str(out), "--n-train", "4", "--n-test", "2", "--seed", "1", "--size", "32"]) == 0
    info = json.loads((out / syn.PARAMS_FILE).read_text())
    assert info["num_rows"] == {"train": 4, "test_heldout_combinations": 2, "test_heldout_phrasings": 2}
    assert re.search(r"split: test_heldout_phrasings", (out / "README.md").read_text())
    assert os.path.isfile(out / info["files"]["train"][0])


def test_cli_unwritable_output_is_a_one_line_error(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        syn.main([str(a_file / "data"), "--n-train", "2", "--n-test", "1", "--size", "32"])
    assert exit_info.value.code == 2
    assert "cannot write the dataset to" in capsys.readouterr().err
    assert a_file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
