"""infer.py end to end: same picture as diffusers, many inputs, sweeps, sidecars, clear errors."""

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from PIL import Image

import infer
from ip2p.export import save_single_file
from ip2p.models import load_editor


def test_infer_gives_the_same_picture_as_diffusers(tiny_editor_dir, photo, tmp_path):
    out = tmp_path / "out.png"
    rc = infer.main(["--checkpoint", str(tiny_editor_dir), "--image", str(photo), "--instruction", "make it winter",
                     "--output", str(out), "--seed", "0", "--steps", "10", "--scheduler", "euler_a",
                     "--resolution", "32", "--quiet"])
    assert rc == 0
    from ip2p.sampling import make_scheduler

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_editor_dir)
    pipe.scheduler = make_scheduler("euler_a", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    want = pipe("make it winter", image=Image.open(photo).convert("RGB"), num_inference_steps=10,
                generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["seed"] == 0 and record["steps"] == 10 and record["scheduler"] == "euler_a"
    assert record["text_guidance"] == 7.5 and record["image_guidance"] == 1.5
    assert record["instruction"] == "make it winter" and record["input_size"] == [32, 24]


def test_infer_many_images_and_instructions_to_a_folder(tiny_editor_dir, photo, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        Image.open(photo).save(folder / name)
    (tmp_path / "ins.txt").write_text("make it winter\n\nadd a hat\n")
    rc = infer.main(["--checkpoint", str(tiny_editor_dir), "--image", str(folder), "--instructions-file",
                     str(tmp_path / "ins.txt"), "--output", str(tmp_path / "edits"), "--steps", "2",
                     "--num-images", "2", "--resolution", "32", "--keep-size", "--quiet"])
    assert rc == 0
    pngs = sorted(p.name for p in (tmp_path / "edits").glob("*.png"))
    assert len(pngs) == 2 * 2 * 2  # images x instructions x outputs
    sidecars = [json.loads(p.read_text()) for p in (tmp_path / "edits").glob("*.json")]
    assert len({s["seed"] for s in sidecars}) == 1  # one random seed, reported for reproduction
    assert {s["instruction"] for s in sidecars} == {"make it winter", "add a hat"}
    assert Image.open(next((tmp_path / "edits").glob("*.png"))).size == (32, 24)


def test_infer_sweep_writes_a_grid(tiny_editor_dir, photo, tmp_path):
    out = tmp_path / "sweep.png"
    rc = infer.main(["--checkpoint", str(tiny_editor_dir), "--image", str(photo), "--instruction", "x",
                     "--output", str(out), "--steps", "1", "--sweep", "--sweep-text", "1,7.5",
                     "--sweep-image", "1,1.5,2", "--resolution", "32", "--seed", "1", "--quiet"])
    assert rc == 0
    grid = Image.open(out)
    assert grid.width > 3 * 32 and grid.height > 2 * 24
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["sweep_text"] == [1.0, 7.5] and record["sweep_image"] == [1.0, 1.5, 2.0]


def test_infer_randomize_cfg_gives_each_output_scales_its_sidecar_reproduces(tiny_editor_dir, photo, tmp_path):
    common = ["--checkpoint", str(tiny_editor_dir), "--image", str(photo), "--instruction", "make it winter",
              "--steps", "2", "--resolution", "32", "--quiet"]
    folder = tmp_path / "random"
    assert infer.main(common + ["--output", str(folder), "--seed", "5", "--num-images", "3", "--randomize-cfg"]) == 0
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    assert len(records) == 3 and [r["seed"] for r in records] == [5, 6, 7] and all(r["randomize_cfg"] for r in records)
    assert all(6.0 <= r["text_guidance"] <= 9.0 and 1.2 <= r["image_guidance"] <= 1.8 for r in records)
    assert len({(r["text_guidance"], r["image_guidance"]) for r in records}) == 3
    # A plain run with an output's recorded seed and scales makes exactly its image.
    first = sorted(folder.glob("*.png"))[1]
    record = json.loads(first.with_suffix(".json").read_text())
    again = tmp_path / "again.png"
    assert infer.main(common + ["--output", str(again), "--seed", str(record["seed"]), "--text-guidance",
                                str(record["text_guidance"]), "--image-guidance", str(record["image_guidance"])]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
    # The same command draws the same scales.
    folder2 = tmp_path / "random2"
    assert infer.main(common + ["--output", str(folder2), "--seed", "5", "--num-images", "3", "--randomize-cfg"]) == 0
    assert [json.loads(p.read_text())["text_guidance"] for p in sorted(folder2.glob("*.json"))] == \
        [r["text_guidance"] for r in records]


def test_a_keep_size_sidecar_says_so_and_reproduces_its_image(tiny_editor_dir, photo, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ip2p.inference")
    common = ["--checkpoint", str(tiny_editor_dir), "--image", str(photo), "--instruction", "x", "--steps", "1",
              "--resolution", "16", "--quiet"]
    assert infer.main(common + ["--output", str(tmp_path / "r"), "--seed", "3", "--num-images", "2",
                                "--randomize-cfg", "--keep-size"]) == 0
    assert f"wrote 2 file(s): {tmp_path / 'r'}\n" in caplog.text  # the folder, not its first file
    first = sorted((tmp_path / "r").glob("*.png"))[0]
    record = json.loads(first.with_suffix(".json").read_text())
    assert record["keep_size"] is True and record["model_size"] == [16, 12]
    again = tmp_path / "again.png"
    assert infer.main(common + ["--output", str(again), "--seed", str(record["seed"]), "--text-guidance",
                                str(record["text_guidance"]), "--image-guidance", str(record["image_guidance"]),
                                *(["--keep-size"] if record["keep_size"] else [])]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))


def test_infer_randomize_cfg_with_sweep_is_a_one_line_error(photo, tmp_path, caplog):
    assert infer.main(["--image", str(photo), "--instruction", "x", "--output", str(tmp_path / "o.png"), "--sweep",
                       "--randomize-cfg"]) == 2
    assert "--randomize-cfg and --sweep both choose the guidance scales" in caplog.text


def test_low_memory_edits_as_the_batched_path_and_as_diffusers_with_a_tiled_vae(tiny_editor_dir, tmp_path):
    from ip2p.sampling import edit

    # Branches one at a time: the same edit as one batched forward, up to float rounding.
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    common = dict(steps=3, text_guidance=5.0, image_guidance=1.4, scheduler=None)
    batched = edit(load_editor(tiny_editor_dir, expand=False), images, ["a", "b"],
                   generator=torch.Generator().manual_seed(0), progress=False, **common)
    model = load_editor(tiny_editor_dir, expand=False).low_memory()
    assert model.unet_batch == 1 and model.vae.use_slicing and model.vae.use_tiling
    sliced = edit(model, images, ["a", "b"], generator=torch.Generator().manual_seed(0), progress=False, **common)
    torch.testing.assert_close(sliced, batched, atol=1e-5, rtol=0)
    # Above the VAE's native size (64 px here) it encodes and decodes in tiles, as diffusers' pipeline does with its
    # VAE's tiling and slicing enabled.
    rng = np.random.default_rng(3)
    big = tmp_path / "big.png"
    Image.fromarray((rng.random((80, 112, 3)) * 255).astype("uint8")).save(big)
    out = tmp_path / "low.png"
    assert infer.main(["--checkpoint", str(tiny_editor_dir), "--image", str(big), "--instruction", "make it winter",
                       "--output", str(out), "--seed", "0", "--steps", "3", "--resolution", "0", "--low-memory",
                       "--quiet"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["low_memory"] is True
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_editor_dir)
    pipe.vae.enable_tiling()
    pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    from ip2p.sampling import make_scheduler

    pipe.scheduler = make_scheduler("euler_a", pipe.scheduler.config)
    want = pipe("make it winter", image=Image.open(big).convert("RGB"), num_inference_steps=3,
                generator=torch.Generator().manual_seed(0)).images[0]
    got = np.asarray(Image.open(out)).astype(int)
    assert got.shape == np.asarray(want).shape == (80, 112, 3)
    assert np.abs(got - np.asarray(want).astype(int)).max() <= 1
    plain = tmp_path / "plain.png"
    assert infer.main(["--checkpoint", str(tiny_editor_dir), "--image", str(big), "--instruction", "make it winter",
                       "--output", str(plain), "--seed", "0", "--steps", "3", "--resolution", "0", "--quiet"]) == 0
    assert not np.array_equal(np.asarray(Image.open(plain)), got)  # the tiles are really there


def test_infer_reads_a_single_file_checkpoint(tiny_sd_editor_dir, photo, tmp_path):
    model = load_editor(tiny_sd_editor_dir, expand=False)
    single = save_single_file(model, tmp_path / "model.safetensors")
    args = ["--image", str(photo), "--instruction", "x", "--steps", "2", "--seed", "3", "--resolution", "32",
            "--quiet"]
    assert infer.main(["--checkpoint", str(single), "--config-dir", str(tiny_sd_editor_dir),
                       "--output", str(tmp_path / "a.png"), *args]) == 0
    assert infer.main(["--checkpoint", str(tiny_sd_editor_dir), "--output", str(tmp_path / "b.png"), *args]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_infer_script_keeps_the_matmul_precision_diffusers_runs_with(monkeypatch):
    """TF32 matmuls would make fp32 edits on a GPU differ from diffusers' pipeline, which leaves PyTorch's default."""
    import runpy

    import ip2p.inference

    seen = []
    monkeypatch.setattr(ip2p.inference, "main", lambda argv=None: seen.append(torch.backends.cuda.matmul.allow_tf32))
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        with pytest.raises(SystemExit):
            runpy.run_path(infer.__file__, run_name="__main__")
        assert seen == [before]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("extra, message", [
    ({"--image": "missing.png"}, "missing.png"),
    ({"--instruction": " "}, "--instruction is empty"),
    ({"--instruction": "a\udcffb"}, "--instruction 'a\\udcffb' is not valid UTF-8 text"),  # argv bytes b"a\xffb"
    ({"--device": "cuda"}, "--device cuda: PyTorch sees"),
    ({"--device": "gpu"}, "'gpu' is not a device name"),
    ({"--steps": "0"}, "--steps 0"),
    ({"--sweep": None, "--sweep-text": "a,b"}, "--sweep-text"),
    ({"--text-guidance": "nan"}, "--text-guidance nan must be a finite number"),
    ({"--sweep": None, "--sweep-image": "1,inf"}, "--sweep-image='1,inf' must hold finite numbers"),
    ({"--sweep-text": "2,4"}, "set the values of a --sweep grid; add --sweep"),
    ({"--sweep": None, "--sweep-text": ""}, "--sweep-text is empty"),  # not the default grid in silence
    ({"--sweep-image": ""}, "set the values of a --sweep grid; add --sweep"),
    ({"--seed": str(2**64)}, "--seed 18446744073709551616 must be between 0 and 2**64 - 1"),
    ({"--resolution": "100000"}, "100000x75000 = 7500000000 pixels, over the limit"),
    ({"--text-guidance": "1e300", "--steps": "2"}, "the edit came out as NaN (s_T=1e+300, s_I=1.5, float32)"),
])
def test_infer_errors_are_one_line(tiny_editor_dir, photo, tmp_path, caplog, extra, message):
    if extra.get("--device") == "cuda" and torch.accelerator.is_available():
        pytest.skip("an accelerator is present")
    args = {"--checkpoint": str(tiny_editor_dir), "--image": str(photo), "--instruction": "x",
            "--output": str(tmp_path / "o.png"), "--quiet": None, **extra}
    argv = [a for k, v in args.items() for a in ([k] if v is None else [k, v])]
    assert infer.main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors and message in errors[-1] and "\n" not in errors[-1]
    assert not (tmp_path / "o.png").exists()


def test_infer_refuses_a_corrupt_image(tiny_editor_dir, tmp_path, caplog):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rc = infer.main(["--checkpoint", str(tiny_editor_dir), "--image", str(bad), "--instruction", "x", "--quiet",
                     "--output", str(tmp_path / "o.png")])
    assert rc == 2
    assert any("bad.png" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_infer_refuses_a_base_model(tiny_base_dir, photo, tmp_path, caplog):
    rc = infer.main(["--checkpoint", str(tiny_base_dir), "--image", str(photo), "--instruction", "x", "--quiet",
                     "--output", str(tmp_path / "o.png")])
    assert rc == 2
    assert any("fine-tune it" in r.getMessage() for r in caplog.records)


def test_resolution_0_keeps_the_input_size_like_diffusers(tiny_editor_dir, tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "odd.png"
    Image.fromarray((rng.random((27, 45, 3)) * 255).astype("uint8")).save(path)  # not a multiple of 8
    out = tmp_path / "o.png"
    assert infer.main(["--checkpoint", str(tiny_editor_dir), "--image", str(path), "--instruction", "add snow",
                       "--output", str(out), "--seed", "0", "--steps", "3", "--resolution", "0", "--quiet"]) == 0
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_editor_dir)
    from ip2p.sampling import make_scheduler

    pipe.scheduler = make_scheduler("euler_a", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    want = pipe("add snow", image=Image.open(path).convert("RGB"), num_inference_steps=3,
                generator=torch.Generator().manual_seed(0)).images[0]
    assert want.size == (44, 26)  # floored to the VAE factor (2 for this tiny model, 8 for SD)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))


def test_infer_unwritable_output_is_a_one_line_error_before_loading(photo, tmp_path, caplog):
    rc = infer.main(["--checkpoint", str(tmp_path / "never-loaded"), "--image", str(photo), "--instruction", "x",
                     "--output", str(photo / "o.png"), "--quiet"])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors and "--output: cannot create the folder" in errors[-1] and str(photo) in errors[-1]


def test_infer_inputs_with_the_same_stem_get_distinct_outputs(tiny_editor_dir, photo, tmp_path):
    (tmp_path / "in").mkdir()
    Image.open(photo).save(tmp_path / "in" / "cat.png")
    Image.open(photo).save(tmp_path / "in" / "cat.jpg")
    Image.open(photo).save(tmp_path / "in" / "cat-1.png")  # a real stem the numbering must not reuse
    assert infer.main(["--checkpoint", str(tiny_editor_dir), "--image", str(tmp_path / "in"), "--instruction", "x",
                       "--output", str(tmp_path / "edits"), "--steps", "1", "--resolution", "16", "--quiet"]) == 0
    pngs = sorted(p.name for p in (tmp_path / "edits").glob("*.png"))
    assert len(pngs) == 3
    sources = {json.loads(p.read_text())["image"] for p in (tmp_path / "edits").glob("*.json")}
    assert sources == {str(tmp_path / "in" / n) for n in ("cat.png", "cat.jpg", "cat-1.png")}


def test_infer_refuses_a_damaged_checkpoint_folder(tiny_editor_dir, photo, tmp_path, caplog):
    import shutil

    damaged = shutil.copytree(tiny_editor_dir, tmp_path / "damaged")
    weights = damaged / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rc = infer.main(["--checkpoint", str(damaged), "--image", str(photo), "--instruction", "x", "--quiet",
                     "--output", str(tmp_path / "o.png")])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors and "'" + str(damaged) + "' is incomplete or damaged" in errors[-1] and "\n" not in errors[-1]


@pytest.mark.parametrize("component", ["unet", "text_encoder", "tokenizer.json", "tokenizer_config.json"])
def test_infer_refuses_weights_that_do_not_fit_their_config(tiny_editor_dir, photo, tmp_path, caplog, component):
    """diffusers raises ValueError and transformers RuntimeError for them, and ValueError or TypeError for a damaged
    tokenizer file, none naming the folder."""
    import shutil

    damaged = shutil.copytree(tiny_editor_dir, tmp_path / "damaged")
    if component.startswith("tokenizer"):
        (damaged / "tokenizer" / component).write_text("{broken" if component == "tokenizer.json" else "[1]")
    else:
        config_path = damaged / component / "config.json"
        config = json.loads(config_path.read_text())
        if component == "unet":
            config["block_out_channels"] = [32, 32]
        else:
            config["hidden_size"] = 64
        config_path.write_text(json.dumps(config))
    rc = infer.main(["--checkpoint", str(damaged), "--image", str(photo), "--instruction", "x", "--quiet",
                     "--output", str(tmp_path / "o.png")])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors and "'" + str(damaged) + "' is incomplete or damaged" in errors[-1] and "\n" not in errors[-1]


def test_infer_instructions_file_that_is_not_text_names_the_file(photo, tmp_path, caplog):
    bad = tmp_path / "ins.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8")
    rc = infer.main(["--checkpoint", str(tmp_path / "never-loaded"), "--image", str(photo), "--instructions-file",
                     str(bad), "--quiet"])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors and f"--instructions-file {bad} is not UTF-8 text" in errors[-1]


def test_infer_skips_an_unreadable_input_among_several_and_says_so(tiny_editor_dir, photo, tmp_path, caplog):
    (tmp_path / "in").mkdir()
    Image.open(photo).save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "b.png").write_bytes(Image.open(photo).tobytes()[:100])  # not an image file
    Image.open(photo).save(tmp_path / "in" / "c.png")
    rc = infer.main(["--checkpoint", str(tiny_editor_dir), "--image", str(tmp_path / "in"), "--instruction", "x",
                     "--output", str(tmp_path / "edits"), "--steps", "1", "--resolution", "16", "--quiet"])
    assert rc == 2  # scripts notice, and the good inputs' edits are there
    assert sorted(p.name for p in (tmp_path / "edits").glob("*.png")) == ["a_000_0.png", "c_000_0.png"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(str(tmp_path / "in" / "b.png") in e and "skipped 1 of 3" in e for e in errors)


def test_infer_warns_that_fp16_on_the_cpu_is_slow(tiny_editor_dir, photo, tmp_path, caplog):
    args = ["--checkpoint", str(tiny_editor_dir), "--image", str(photo), "--instruction", "make it winter",
            "--steps", "1", "--resolution", "32", "--device", "cpu", "--quiet"]
    assert infer.main([*args, "--output", str(tmp_path / "a.png")]) == 0
    assert "slower than fp32" not in caplog.text  # auto is fp32 on the CPU
    assert infer.main([*args, "--output", str(tmp_path / "b.png"), "--dtype", "fp16"]) == 0
    assert "--dtype fp16 on the CPU is many times slower than fp32" in caplog.text
    assert json.loads((tmp_path / "b.json").read_text())["dtype"] == "float16"


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_infer_in_half_precision_gives_the_same_picture_as_diffusers(tiny_editor_dir, photo, tmp_path, dtype,
                                                                      torch_dtype):
    """fp16 is the default on GPUs: pixels must round as diffusers rounds them there too, not only in fp32."""
    out = tmp_path / "out.png"
    assert infer.main(["--checkpoint", str(tiny_editor_dir), "--image", str(photo), "--instruction", "make it winter",
                       "--output", str(out), "--seed", "0", "--steps", "3", "--resolution", "32", "--dtype", dtype,
                       "--device", "cpu", "--quiet"]) == 0
    from ip2p.sampling import make_scheduler

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_editor_dir, dtype=torch_dtype)
    pipe.scheduler = make_scheduler("euler_a", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    want = pipe("make it winter", image=Image.open(photo).convert("RGB"), num_inference_steps=3,
                generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))


def test_infer_flag_errors_over_several_inputs_name_the_flag_not_the_images(tiny_editor_dir, photo, tmp_path,
                                                                             caplog):
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        Image.open(photo).save(tmp_path / "in" / name)
    args = ["--checkpoint", str(tiny_editor_dir), "--image", str(tmp_path / "in"), "--instruction", "x",
            "--output", str(tmp_path / "edits"), "--steps", "1", "--quiet"]
    for extra, message in ((["--max-pixels", "0"], "--max-pixels 0 must be at least 1"),
                           (["--resolution", "1"], "--resolution 1 is below --multiple 2"),
                           (["--multiple", "-8"], "--multiple -8 must be a positive multiple")):
        caplog.clear()
        assert infer.main([*args, *extra]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert errors == [f"error: {errors[-1].removeprefix('error: ')}"] and message in errors[-1]  # no "skipped"
    assert not list((tmp_path / "edits").glob("*.png"))


def test_infer_writes_any_image_format_its_output_suffix_names(tiny_editor_dir, photo, tmp_path):
    for suffix, fmt in ((".bmp", "BMP"), (".tif", "TIFF")):
        out = tmp_path / f"out{suffix}"
        assert infer.main(["--checkpoint", str(tiny_editor_dir), "--image", str(photo), "--instruction", "x",
                           "--output", str(out), "--steps", "1", "--resolution", "16", "--quiet"]) == 0
        assert out.is_file() and Image.open(out).format == fmt  # not a folder named out.bmp
        assert out.with_suffix(".json").is_file()


def test_infer_output_that_is_an_existing_folder_fails_before_loading(photo, tmp_path, caplog):
    (tmp_path / "taken.png").mkdir()
    rc = infer.main(["--checkpoint", str(tmp_path / "never-loaded"), "--image", str(photo), "--instruction", "x",
                     "--output", str(tmp_path / "taken.png"), "--quiet"])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors and "is an existing folder, not an image file" in errors[-1]


def test_infer_sidecar_is_written_atomically(tiny_editor_dir, photo, tmp_path, monkeypatch, caplog):
    import pathlib

    out = tmp_path / "out.png"
    args = ["--checkpoint", str(tiny_editor_dir), "--image", str(photo), "--instruction", "x", "--output", str(out),
            "--steps", "1", "--resolution", "16", "--seed", "5", "--quiet"]
    assert infer.main(args) == 0
    before = out.with_suffix(".json").read_text()
    real_open = pathlib.Path.open

    class HalfWritten:
        """A file that takes half of what is written to it, then reports a full disk."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            self.handle.write(text[: len(text) // 2])
            raise OSError(28, "No space left on device")

    def disk_full(self, mode="r", *args, **kwargs):  # Path.write_text opens through Path.open
        handle = real_open(self, mode, *args, **kwargs)
        return HalfWritten(handle) if "out.json" in self.name and "w" in mode else handle

    monkeypatch.setattr(pathlib.Path, "open", disk_full)
    assert infer.main(args) == 2
    monkeypatch.undo()
    assert out.with_suffix(".json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.png"]
    assert any("No space left on device" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_infer_refuses_a_checkpoint_whose_tokenizer_lost_its_vocabulary(tiny_editor_dir, photo, tmp_path, caplog):
    """transformers builds an empty tokenizer from such a folder without a word; every instruction would then edit
    as the same unknown tokens."""
    import shutil

    damaged = shutil.copytree(tiny_editor_dir, tmp_path / "damaged")
    (damaged / "tokenizer" / "tokenizer.json").unlink()
    rc = infer.main(["--checkpoint", str(damaged), "--image", str(photo), "--instruction", "x", "--quiet",
                     "--steps", "1", "--resolution", "16", "--output", str(tmp_path / "o.png")])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors and f"checkpoint '{damaged}' has a tokenizer without a vocabulary" in errors[-1]
    assert not (tmp_path / "o.png").exists()


def test_infer_refuses_ip2p_metadata_that_is_not_an_object(tiny_editor_dir, photo, tmp_path, caplog):
    import shutil

    damaged = shutil.copytree(tiny_editor_dir, tmp_path / "damaged")
    (damaged / "ip2p.json").write_text("[1, 2]\n")
    rc = infer.main(["--checkpoint", str(damaged), "--image", str(photo), "--instruction", "x", "--quiet",
                     "--steps", "1", "--resolution", "16", "--output", str(tmp_path / "o.png")])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors and "ip2p.json holds a JSON list, expected an object" in errors[-1]


def test_infer_refuses_a_scale_source_latent_that_is_neither_true_nor_false(tiny_editor_dir, photo, tmp_path, caplog):
    import shutil

    damaged = shutil.copytree(tiny_editor_dir, tmp_path / "damaged")
    (damaged / "ip2p.json").write_text('{"scale_source_latent": "maybe"}\n')
    args = ["--checkpoint", str(damaged), "--image", str(photo), "--instruction", "x", "--quiet", "--steps", "1",
            "--resolution", "16", "--output", str(tmp_path / "o.png")]
    assert infer.main(args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors and "scale_source_latent='maybe', which is neither true nor false" in errors[-1]
    assert infer.main([*args, "--scale-source-latent", "no"]) == 0  # the flag overrides what the file says


def test_infer_names_an_inpainting_unet_as_such(photo, tmp_path, caplog):
    from ip2p import tiny

    folder = tiny.save_tiny_pipeline(tmp_path / "inpaint", layout="small", in_channels=9)
    rc = infer.main(["--checkpoint", str(folder), "--image", str(photo), "--instruction", "x", "--quiet",
                     "--steps", "1", "--resolution", "16", "--output", str(tmp_path / "o.png")])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors and "unet has 9 input channels" in errors[-1] and "inpainting-style" in errors[-1]
    assert "fine-tune it" not in errors[-1]  # not a base text-to-image model


def test_infer_skips_an_input_deleted_after_listing(tiny_editor_dir, photo, tmp_path, monkeypatch, caplog):
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        Image.open(photo).save(tmp_path / "in" / name)
    from ip2p import images

    listed = images.expand_image_paths(tmp_path / "in")
    monkeypatch.setattr(images, "expand_image_paths", lambda spec: [*listed, tmp_path / "in" / "gone.png"])
    rc = infer.main(["--checkpoint", str(tiny_editor_dir), "--image", str(tmp_path / "in"), "--instruction", "x",
                     "--output", str(tmp_path / "edits"), "--steps", "1", "--resolution", "16", "--quiet"])
    assert rc == 2
    assert sorted(p.name for p in (tmp_path / "edits").glob("*.png")) == ["a_000_0.png", "b_000_0.png"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("gone.png" in e and "skipped 1 of 3" in e for e in errors)


def test_infer_unreadable_instructions_file_is_a_one_line_error(photo, tmp_path, monkeypatch, caplog):
    import pathlib

    ins = tmp_path / "ins.txt"
    ins.write_text("make it winter\n")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "read_text", denied)
    rc = infer.main(["--checkpoint", str(tmp_path / "never-loaded"), "--image", str(photo), "--instructions-file",
                     str(ins), "--quiet"])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors and f"--instructions-file {ins} cannot be read (Permission denied)" in errors[-1]


def test_a_scheduler_this_diffusers_lacks_falls_back_to_pndm_with_a_warning(tiny_editor_dir, tmp_path, caplog):
    import shutil

    from ip2p.models import load_components

    odd = shutil.copytree(tiny_editor_dir, tmp_path / "odd")
    path = odd / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "_class_name": "FutureScheduler"}))
    components, _ = load_components(str(odd))
    assert type(components["scheduler"]).__name__ == "PNDMScheduler"
    assert any("'FutureScheduler' is not in this diffusers version" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING")


def test_config_dir_beside_a_folder_checkpoint_is_said_to_be_unused(tiny_editor_dir, tmp_path, caplog):
    from ip2p.models import load_components

    load_components(str(tiny_editor_dir), config_dir=str(tmp_path))
    assert any("is not used" in r.getMessage() and "single-file" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING")


def test_infer_a_broken_lone_input_fails_before_the_model_loads(tmp_path, caplog):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rc = infer.main(["--checkpoint", str(tmp_path / "no-such-model"), "--image", str(bad), "--instruction", "x",
                     "--quiet", "--output", str(tmp_path / "o.png")])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors and "bad.png" in errors[-1] and "no-such-model" not in errors[-1]


@pytest.mark.parametrize("kind", ["folder", "pipe"])
def test_instructions_file_that_is_a_folder_or_a_pipe(tmp_path, kind):
    import argparse
    import os

    from ip2p.inference import read_instructions

    path = tmp_path / "instructions"
    if kind == "folder":
        path.mkdir()
        with pytest.raises(ValueError, match="is a folder; give a text file"):
            read_instructions(argparse.Namespace(instruction=None, instructions_file=str(path)))
        return
    import threading

    os.mkfifo(path)

    def write() -> None:  # the other end of the pipe, as a shell's process substitution would be
        with open(path, "w") as handle:
            handle.write("make it winter\n\nturn the cat black\n")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        assert read_instructions(argparse.Namespace(instruction=None, instructions_file=str(path))) == [
            "make it winter", "turn the cat black"]
    finally:
        writer.join(timeout=10)


def test_a_device_index_past_those_pytorch_sees_is_refused(monkeypatch):
    from ip2p.devices import resolve_device

    # One GPU: cuda and cuda:0 are it, cuda:1 is not there (it failed only after the model had loaded).
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0") and resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match="--device cuda:1: PyTorch sees 1 cuda device"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="--device mps: PyTorch sees only cuda"):
        resolve_device("mps")


def test_an_instruction_longer_than_the_text_encoder_reads_is_edited_with_a_warning(tiny_editor_dir, photo, tmp_path,
                                                                                    caplog, capfd):
    long = "make it winter " + "and snowy " * 60
    out = tmp_path / "o.png"
    assert infer.main(["--checkpoint", str(tiny_editor_dir), "--image", str(photo), "--instruction", long, "--quiet",
                       "--steps", "1", "--resolution", "16", "--output", str(out)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "tokens;" in r.getMessage()]
    assert len(warnings) == 1 and "reads only the first 77" in warnings[0] and out.exists()
    # not also transformers' "will result in indexing errors", which the cut at 77 tokens prevents
    assert "indexing errors" not in caplog.text + capfd.readouterr().err
    caplog.clear()
    assert infer.main(["--checkpoint", str(tiny_editor_dir), "--image", str(photo), "--instruction", "make it winter",
                       "--quiet", "--steps", "1", "--resolution", "16", "--output", str(out)]) == 0
    assert not [r for r in caplog.records if "tokens;" in r.getMessage()]


def test_steps_the_sampler_cannot_take_are_one_line_error_over_several_inputs(tiny_editor_dir, tmp_path, caplog):
    for k in range(2):
        Image.new("RGB", (16, 16), (k * 200, 0, 0)).save(tmp_path / f"{k}.png")
    rc = infer.main(["--checkpoint", str(tiny_editor_dir), "--image", str(tmp_path / "*.png"), "--instruction", "x",
                     "--quiet", "--scheduler", "ddim", "--steps", "1000", "--output", str(tmp_path / "out")])
    assert rc == 2 and "steps=1000 is too many for the DDIMScheduler sampler" in caplog.text
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize("dtype, advice", [(torch.float32, "lower --text-guidance/--image-guidance$"),
                                           (torch.float16, "overflows in half precision; .* or use --dtype fp32$")])
def test_a_nan_edit_suggests_fp32_only_when_it_ran_in_half_precision(dtype, advice):
    from ip2p.inference import check_finite

    check_finite(torch.zeros(1, 3, 2, 2), 7.5, 1.5, dtype)  # a finite edit passes
    with pytest.raises(ValueError, match=advice):
        check_finite(torch.full((1, 3, 2, 2), float("nan")), 7.5, 1.5, dtype)
