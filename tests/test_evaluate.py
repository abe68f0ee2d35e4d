"""Evaluation driver, guidance sweep and the `python -m ip2p.eval` CLI on synthetic examples (ip2p.eval)."""

import json

import numpy as np
import pytest
import torch

from ip2p import sampling, synthetic, tiny
from ip2p.eval import evaluate as ev
from ip2p.eval import sweep as sw
from ip2p.models import load_editor

STEPS = 2


@pytest.fixture(scope="module")
def examples():
    """Two examples of every edit type (the split cycles through the types)."""
    return synthetic.generate_split("test_heldout_combinations", 2 * len(synthetic.EDIT_TYPES), seed=0)


@pytest.fixture(scope="module")
def editor(tiny_editor_dir):
    return load_editor(tiny_editor_dir, expand=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("synthetic") / "data", n_train=6, n_test=6, seed=0)


def _patch_edit(monkeypatch, examples, pick):
    """Replace the sampler by a function of each example: ``pick(example)`` -> (H, W, 3) uint8 image."""
    by_source = {(e.source.tobytes(), e.instruction): e for e in examples}

    def fake_edit(model, images, instructions, **kwargs):
        sources = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
        chosen = [pick(by_source[(s.tobytes(), i)]) for s, i in zip(sources, instructions)]
        return torch.from_numpy(np.stack(chosen)).permute(0, 3, 1, 2).float() / 255

    monkeypatch.setattr(sampling, "edit", fake_edit)


def test_evaluate_reports_every_metric_and_type(editor, examples):
    summary = ev.evaluate(editor, examples, steps=STEPS, text_guidance=1.5, image_guidance=1.2, batch_size=5,
                          progress=False)
    for key in ("n", "success", "strict_success", "edit_ok", "rest_ok", "l1", "psnr", "err_in_mask", "err_out_mask",
                "err_changed", "l1_to_source", "by_type", "settings"):
        assert key in summary, key
    assert summary["n"] == len(examples)
    assert list(summary["by_type"]) == list(synthetic.EDIT_TYPES)
    assert all(entry["n"] == 2 and 0.0 <= entry["success"] <= 1.0 for entry in summary["by_type"].values())
    assert summary["settings"] == {"steps": STEPS, "text_guidance": 1.5, "image_guidance": 1.2,
                                   "scheduler": "euler_a", "seed": 0}
    json.dumps(summary)  # JSON-ready


def test_edits_are_reproducible_and_independent_of_batch_size(editor, examples):
    kwargs = dict(steps=STEPS, text_guidance=1.5, image_guidance=1.2, scheduler="euler", seed=3, progress=False)
    whole = ev.run_edits(editor, examples[:4], batch_size=4, **kwargs)
    split = ev.run_edits(editor, examples[:4], batch_size=3, **kwargs)
    assert all(out.dtype == np.uint8 and out.shape == (64, 64, 3) for out in whole)
    # Deterministic sampler + per-example initial noise: batching does not change the pictures (up to float rounding).
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(whole, split))


def test_any_seed_edits_and_a_negative_one_keeps_its_noise(editor, examples):
    kwargs = dict(steps=1, text_guidance=1.5, image_guidance=1.2, scheduler="euler", batch_size=2, progress=False)
    # seed * 1_000_003 + i past 2**64 was "Overflow when unpacking long long", after the model had loaded.
    assert len(ev.run_edits(editor, examples[:2], seed=10**14, **kwargs)) == 2
    # A negative seed draws the noise it drew before (manual_seed maps s < 0 to s + 2**64 as the modulo does).
    latents = ev._initial_latents(editor, [0, 1], -3, 64, 64)
    expected = torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(-3 * 1_000_003 + 1))
    assert torch.equal(latents[1], expected.to(latents.dtype))


def test_oracle_editor_succeeds_everywhere_and_identity_nowhere(editor, examples, monkeypatch):
    _patch_edit(monkeypatch, examples, lambda e: e.target)
    oracle = ev.evaluate(editor, examples, steps=STEPS, progress=False)
    assert oracle["success"] == 1.0 and oracle["strict_success"] == 1.0
    assert all(entry["success"] == 1.0 for entry in oracle["by_type"].values())
    assert oracle["l1"] == 0.0 and oracle["err_out_mask"] == 0.0

    _patch_edit(monkeypatch, examples, lambda e: e.source)
    identity = ev.evaluate(editor, examples, steps=STEPS, progress=False)
    assert identity["l1_to_source"] == 0.0 and identity["rest_ok"] == 1.0
    assert identity["success"] == 0.0  # leaving the image unchanged never does what was asked


def test_load_examples_from_dataset_folder_and_glob(dataset):
    rows = ev.load_examples(dataset, split="test_heldout_phrasings")
    assert len(rows) == 6 and all(isinstance(r, synthetic.EditExample) for r in rows)
    assert rows[0].instruction == next(synthetic.iter_split("test_heldout_phrasings", 1, 0)).instruction
    assert np.array_equal(rows[0].target, next(synthetic.iter_split("test_heldout_phrasings", 1, 0)).target)
    assert len(ev.load_examples(str(dataset / "data" / "test_heldout_combinations-*.parquet"), limit=4)) == 4
    with pytest.raises(ValueError, match="split="):
        ev.load_examples(dataset, split="validation")
    with pytest.raises(FileNotFoundError):
        ev.load_examples(dataset / "missing")


def test_a_glob_over_every_split_keeps_the_rows_of_the_split_asked(dataset):
    everything = str(dataset / "data" / "*.parquet")
    for split in ("test_heldout_phrasings", "test_heldout_combinations"):
        rows = ev.load_examples(everything, split=split)
        assert rows and {r.metadata["split"] for r in rows} == {split}
        assert [r.instruction for r in rows] == [r.instruction for r in ev.load_examples(dataset, split=split)]
    one_split = str(dataset / "data" / "test_heldout_phrasings-*.parquet")
    with pytest.raises(ValueError, match=r"no rows of split 'test_heldout_combinations', only of "
                                         r"\['test_heldout_phrasings'\]"):
        ev.load_examples(one_split, split="test_heldout_combinations")


def test_scene_caption():
    scene = {"background": "white", "objects": [{"shape": "circle", "colour": "red"},
                                                {"shape": "star", "colour": "orange"}]}
    assert ev.scene_caption(scene) == "a red circle and an orange star on a white background"
    assert ev.scene_caption({"background": "blue", "objects": []}) == "an empty blue background"


def test_clip_similarities_with_a_tiny_clip(editor, examples, tmp_path, monkeypatch):
    clip_dir = tiny.save_tiny_clip(tmp_path / "clip")
    _patch_edit(monkeypatch, examples, lambda e: e.target)
    summary = ev.evaluate(editor, examples[:6], clip=str(clip_dir), progress=False)
    for key in ("clip_sim_image", "clip_sim_dir"):
        assert -1.0 <= summary[key] <= 1.0
        assert key in summary["by_type"]["recolour_object"]


def test_guidance_sweep_table_and_plot(editor, examples, tmp_path):
    rows = sw.guidance_sweep(editor, examples[:3], text_guidance=1.5, image_guidance=1.2, image_scales=(1.0, 1.6, 2.2),
                             text_scales=(1.0, 3.0), steps=1, batch_size=3, progress=False)
    assert [(r["sweep"], r["text_guidance"], r["image_guidance"]) for r in rows] == [
        ("image", 1.5, 1.0), ("image", 1.5, 1.6), ("image", 1.5, 2.2), ("text", 1.0, 1.2), ("text", 3.0, 1.2)]
    assert all(set(sw.ROW_KEYS) <= set(r) for r in rows)
    png = sw.plot_sweep(rows, tmp_path / "sweep.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = sw.write_table(rows, tmp_path / "sweep.csv").read_text().splitlines()
    assert len(table) == 1 + len(rows) and table[0].startswith("sweep,text_guidance,image_guidance,success")


def test_the_point_both_sweeps_share_is_edited_once(editor, examples, monkeypatch):
    # The demo sweeps s_I at s_T = 1.5 and s_T at s_I = 1.2: (1.5, 1.2) is on both lines; it used to be edited twice.
    calls = []
    real = sw.run_edits

    def counting(model, examples, **kwargs):
        calls.append((kwargs["text_guidance"], kwargs["image_guidance"]))
        return real(model, examples, **kwargs)

    monkeypatch.setattr(sw, "run_edits", counting)
    rows = sw.guidance_sweep(editor, examples[:2], text_guidance=1.5, image_guidance=1.2, image_scales=(1.0, 1.2),
                             text_scales=(1.0, 1.5), steps=1, batch_size=2, progress=False)
    assert [(r["sweep"], r["text_guidance"], r["image_guidance"]) for r in rows] == [
        ("image", 1.5, 1.0), ("image", 1.5, 1.2), ("text", 1.0, 1.2), ("text", 1.5, 1.2)]
    assert sorted(calls) == [(1.0, 1.2), (1.5, 1.0), (1.5, 1.2)]
    assert {k: v for k, v in rows[1].items() if k != "sweep"} == {k: v for k, v in rows[3].items() if k != "sweep"}


def test_sweep_table_and_plot_failing_mid_write_keep_the_previous_files(tmp_path, monkeypatch):
    import csv

    from matplotlib.figure import Figure

    rows = [dict(sweep="image", text_guidance=1.5, image_guidance=g, **{k: 0.5 for k in sw.ROW_KEYS[3:]})
            for g in (1.0, 2.0)]
    table, png = sw.write_table(rows, tmp_path / "sweep.csv"), sw.plot_sweep(rows, tmp_path / "sweep.png")
    before = table.read_bytes(), png.read_bytes()

    def torn_row(self, row):
        raise OSError(28, "No space left on device")

    def torn_png(self, fname, **kwargs):
        open(fname, "wb").write(b"\x89PNG")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerow", torn_row)
    monkeypatch.setattr(Figure, "savefig", torn_png)
    with pytest.raises(OSError):
        sw.write_table(rows, table)
    with pytest.raises(OSError):
        sw.plot_sweep(rows, png)
    assert (table.read_bytes(), png.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv", "sweep.png"]


def test_cli_writes_metrics_and_sweep(tiny_editor_dir, dataset, tmp_path):
    from ip2p.eval.__main__ import main

    out = tmp_path / "eval"
    code = main(["--checkpoint", str(tiny_editor_dir), "--data", str(dataset), "--output", str(out), "--limit", "2",
                 "--steps", "1", "--sweep", "--sweep-limit", "2", "--image-scales", "1.0,2.0", "--text-scales", "1.0"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"test_heldout_combinations", "test_heldout_phrasings"}
    assert metrics["test_heldout_combinations"]["n"] == 2
    assert metrics["test_heldout_phrasings"]["settings"] == {
        "checkpoint": str(tiny_editor_dir), "lora": None, "data": str(dataset), "limit": 2, "steps": 1,
        "text_guidance": 7.5, "image_guidance": 1.5, "scheduler": "euler_a", "seed": 0}
    assert len(json.loads((out / "sweep.json").read_text())) == 3
    assert (out / "sweep.png").is_file() and (out / "sweep.csv").is_file()
    assert main(["--checkpoint", str(tiny_editor_dir), "--data", str(tmp_path / "none"), "--output", str(out)]) == 2
    assert main(["--checkpoint", str(tiny_editor_dir), "--data", str(dataset), "--output", str(out),
                 "--device", "banana"]) == 2


@pytest.mark.parametrize("flags, image_scales, text_scales", [
    ([], "IMAGE_SCALES", "TEXT_SCALES"),
    (["--image-scales", "1,2.5"], [1.0, 2.5], "TEXT_SCALES"),
    (["--text-scales", "3"], "IMAGE_SCALES", [3.0]),
])
def test_cli_sweep_takes_each_scale_list_given_and_the_default_of_the_other(tiny_editor_dir, dataset, tmp_path,
                                                                             monkeypatch, flags, image_scales,
                                                                             text_scales):
    from ip2p.eval import sweep
    from ip2p.eval.__main__ import main

    class Stop(Exception):
        pass

    def record(model, examples, *, image_scales, text_scales, **kwargs):
        seen.update(image=list(image_scales), text=list(text_scales))
        raise Stop

    seen = {}
    monkeypatch.setattr(sweep, "guidance_sweep", record)
    with pytest.raises(Stop):
        main(["--checkpoint", str(tiny_editor_dir), "--data", str(dataset), "--output", str(tmp_path / "eval"),
              "--limit", "1", "--steps", "1", "--sweep", "--sweep-limit", "1", *flags])
    assert seen["image"] == (list(sweep.IMAGE_SCALES) if image_scales == "IMAGE_SCALES" else image_scales)
    assert seen["text"] == (list(sweep.TEXT_SCALES) if text_scales == "TEXT_SCALES" else text_scales)


def test_cli_stopped_in_the_sweep_leaves_no_older_sweep_beside_its_metrics(tiny_editor_dir, dataset, tmp_path,
                                                                            monkeypatch):
    from ip2p.eval.__main__ import main

    out = tmp_path / "eval"
    out.mkdir()
    for name in ("metrics.json", "sweep.json", "sweep.csv", "sweep.png"):
        (out / name).write_text("an earlier run's")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sw, "guidance_sweep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["--checkpoint", str(tiny_editor_dir), "--data", str(dataset), "--output", str(out), "--limit", "1",
              "--steps", "1", "--sweep", "--sweep-limit", "1"])
    # This run's metrics are written; the earlier run's sweep files, of another model or data, were left beside them.
    assert set(json.loads((out / "metrics.json").read_text())) == {"test_heldout_combinations",
                                                                     "test_heldout_phrasings"}
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]


def test_cli_bad_inputs_fail_in_one_line_before_any_edit(tiny_editor_dir, dataset, tmp_path, caplog, monkeypatch):
    from ip2p.eval.__main__ import main

    def no_edit(*args, **kwargs):
        raise AssertionError("a bad input must fail before any edit")

    monkeypatch.setattr(sampling, "edit", no_edit)
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    from safetensors.torch import load_file, save_file

    half_clip = tiny.save_tiny_clip(tmp_path / "half-clip")  # a CLIP folder whose weights lack the vision tower
    weights = load_file(half_clip / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("vision_model.")}, half_clip / "model.safetensors")
    common = ["--checkpoint", str(tiny_editor_dir), "--data", str(dataset), "--limit", "1", "--steps", "1"]
    cases = [
        (["--output", str(a_file)], "is a file; pass a folder"),
        (["--output", str(a_file / "sub")], "cannot be created"),
        (["--output", str(tmp_path / "o"), "--text-guidance", "nan"], "--text-guidance nan must be a finite number"),
        (["--output", str(tmp_path / "o"), "--sweep", "--image-scales", "1,inf"],
         "--image-scales='1,inf' must hold finite numbers"),
        (["--output", str(tmp_path / "o"), "--sweep", "--image-scales", "1,x"],
         "--image-scales='1,x' must be comma-separated numbers"),
        (["--output", str(tmp_path / "o"), "--clip", str(dataset)], "could not be loaded"),
        # A CLIP text encoder alone (or any other model) loaded as CLIPModel with random weights and scored nonsense.
        (["--output", str(tmp_path / "o"), "--clip", str(tiny_editor_dir / "text_encoder")],
         "is a clip_text_model model, not a CLIP (text and image) model"),
        (["--output", str(tmp_path / "o"), "--clip", str(half_clip)], "lacks"),
        (["--output", str(tmp_path / "o"), "--sweep", "--sweep-limit", "0"], "--sweep-limit 0 must be at least 1"),
        (["--output", str(tmp_path / "o"), "--split", "nope"], "split='nope' is not in"),
        (["--output", str(tmp_path / "o"), "--steps", "0"], "--steps 0 must be at least 1"),
        (["--output", str(tmp_path / "o"), "--limit", "0"], "--limit 0 must be at least 1"),
        (["--output", str(tmp_path / "o"), "--text-scales", "1,3"], "set the guidance sweep; add --sweep"),
        (["--output", str(tmp_path / "o"), "--batch-size", "-2"], "--batch-size -2 must be at least 1"),
    ]
    for extra, message in cases:
        caplog.clear()
        assert main(common + extra) == 2, extra
        assert message in caplog.text, (extra, caplog.text)
    assert a_file.read_text() == "keep me"
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_run_edits_refuses_non_finite_guidance(editor, examples):
    for kwargs in (dict(text_guidance=float("nan")), dict(image_guidance=float("inf"))):
        with pytest.raises(ValueError, match="must be a finite number"):
            ev.run_edits(editor, examples[:1], steps=1, progress=False, **kwargs)


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    notes = tmp_path / "notes.parquet"
    notes.write_text("not a table")
    with pytest.raises(ValueError, match=r"notes.parquet cannot be read as parquet .*ip2p.synthetic.write_dataset"):
        ev.load_examples(notes)


def test_rows_without_a_target_or_scene_metadata_are_named_before_any_edit(dataset, tmp_path):
    # A null target image or mask raised a TypeError from PIL at load; metadata without the scene raised a KeyError
    # from the metrics after every example had been edited.
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((dataset / "data").glob("test_heldout_combinations-*.parquet"))[0])
    for column, value, reason in (("edited_image", None, "TypeError"), ("mask", None, "TypeError"),
                                  ("metadata", None, "TypeError"), ("metadata", "{}", "KeyError: 'size'")):
        field = table.schema.field(column)
        bad = table.set_column(table.column_names.index(column), field,
                               pa.array([value] * table.num_rows, type=field.type))
        path = tmp_path / f"{column}.parquet"
        pq.write_table(bad, path)
        with pytest.raises(ValueError, match=rf"{column}.parquet: row 0 is not an edit example with a target image, "
                                             rf"a mask and scene metadata \({reason}"):
            ev.load_examples(path)


def test_cli_help_gives_the_defaults_and_the_demo_settings(capsys):
    # `python -m ip2p.eval` with the demo's guidance but the default 20 steps is not the demo's evaluation (10 steps);
    # the help used to show neither default.
    from ip2p.eval.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("default 20; the demo evaluates with 10", "default 7.5; the demo evaluates with 1.5",
                   "default 1.5; the demo evaluates with 1.2", "default 32", "seed of the edits' noise (default 0)"):
        assert phrase in text, phrase
