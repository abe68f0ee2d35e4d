"""Tests for ip2p.images: loading odd files, mode conversion, sizing, tensors, paths, saving, grids."""

from __future__ import annotations

import gc
import io
import logging
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ip2p.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    decode_image,
    expand_image_paths,
    image_to_tensor,
    images_to_batch,
    load_image,
    make_grid,
    resize_for_model,
    save_image,
    target_size,
    tensor_to_images,
    to_rgb,
)

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` but holds no pixel data (cheap stand-in for a huge file)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def _quadrants(width: int = 64, height: int = 32) -> np.ndarray:
    """(H, W, 3) uint8 with four solid quadrants, so any rotation or flip is distinguishable."""
    array = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    array[:h, :w], array[:h, w:], array[h:, :w], array[h:, w:] = RED, GREEN, BLUE, YELLOW
    return array


def _quadrant_centres(array: np.ndarray) -> list[np.ndarray]:
    h, w = array.shape[:2]
    return [array[y, x].astype(int) for y in (h // 4, 3 * h // 4) for x in (w // 4, 3 * w // 4)]


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------- load_image: EXIF


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        (6, lambda a: np.rot90(a, k=-1)),  # stored rotated; display = 90 degrees clockwise
        (8, lambda a: np.rot90(a, k=1)),  # 90 degrees counter-clockwise
        (3, lambda a: np.rot90(a, k=2)),  # 180 degrees
    ],
)
def test_load_image_applies_exif_orientation(tmp_path: Path, orientation: int, expected) -> None:
    stored = _quadrants()
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation tag
    path = tmp_path / f"photo_{orientation}.jpg"
    Image.fromarray(stored).save(path, "JPEG", quality=95, exif=exif)

    loaded = np.array(load_image(path))
    want = expected(stored)
    assert loaded.shape == want.shape
    for got_px, want_px in zip(_quadrant_centres(loaded), _quadrant_centres(want)):
        assert np.abs(got_px - want_px).max() < 40  # JPEG noise, far below the 255 gap between quadrants


def test_load_image_without_exif_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.fromarray(_quadrants()).save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(np.array(loaded), _quadrants())


# ---------------------------------------------------------------- to_rgb: modes


def _px(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    assert image.mode == "RGB"
    return tuple(image.getpixel(xy))


def test_to_rgb_passes_rgb_through() -> None:
    image = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(image) is image


def test_to_rgb_rgba_composited_over_background() -> None:
    image = Image.new("RGBA", (2, 1), (255, 0, 0, 128))
    image.putpixel((1, 0), (0, 255, 0, 0))  # fully transparent -> background
    white = to_rgb(image)
    assert all(abs(a - b) <= 1 for a, b in zip(_px(white), (255, 127, 127)))
    assert _px(white, (1, 0)) == (255, 255, 255)
    black = to_rgb(image, background=(0, 0, 0))
    assert all(abs(a - b) <= 1 for a, b in zip(_px(black), (128, 0, 0)))
    assert _px(black, (1, 0)) == (0, 0, 0)


def test_to_rgb_la() -> None:
    image = Image.new("LA", (2, 1), (0, 0))
    image.putpixel((1, 0), (0, 255))
    rgb = to_rgb(image)
    assert _px(rgb, (0, 0)) == (255, 255, 255)  # transparent black -> white background
    assert _px(rgb, (1, 0)) == (0, 0, 0)


def test_to_rgb_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0  # palette index 0 (black) is transparent
    rgb = to_rgb(image)
    assert _px(rgb, (0, 0)) == (255, 255, 255)
    assert _px(rgb, (1, 0)) == BLUE
    # The same through a PNG file, which is how users meet it.
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    loaded = load_image(path)
    assert _px(loaded, (0, 0)) == (255, 255, 255) and _px(loaded, (1, 0)) == BLUE


def test_to_rgb_palette_without_transparency() -> None:
    image = Image.new("P", (1, 1), 0)
    image.putpalette([10, 20, 30] + [0] * 765)
    assert _px(to_rgb(image)) == (10, 20, 30)


def test_to_rgb_cmyk_l_1() -> None:
    assert _px(to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0)))) == RED
    assert _px(to_rgb(Image.new("L", (1, 1), 100))) == (100, 100, 100)
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    assert _px(to_rgb(bilevel), (0, 0)) == (0, 0, 0)
    assert _px(to_rgb(bilevel), (1, 0)) == (255, 255, 255)


def test_to_rgb_other_colour_spaces() -> None:
    assert _px(to_rgb(Image.new("HSV", (1, 1), (0, 255, 255)))) == RED
    lab_white = _px(to_rgb(Image.new("LAB", (1, 1), (255, 128, 128))))
    assert min(lab_white) >= 250
    ycbcr_grey = _px(to_rgb(Image.new("YCbCr", (1, 1), (128, 128, 128))))
    assert all(abs(v - 128) <= 1 for v in ycbcr_grey)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_to_rgb_16_bit_scaled_not_clipped(mode: str) -> None:
    values = np.array([[0, 128 * 257, 65535, 1000]], np.uint16)
    image = Image.new(mode, (4, 1))
    for x, v in enumerate(values[0]):
        image.putpixel((x, 0), int(v))
    rgb = np.array(to_rgb(image))
    # 1000 / 257 = 3.89 -> 4; PIL's own convert would clip 1000 and 32896 to 255.
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 128, 255, 4])
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_load_16_bit_png(tmp_path: Path) -> None:
    path = tmp_path / "depth16.png"
    Image.fromarray(np.full((2, 2), 200 * 257, np.uint16)).save(path)
    assert _px(load_image(path)) == (200, 200, 200)


def test_to_rgb_32_bit_int() -> None:
    image = Image.new("I", (2, 1), 65535)  # 16-bit data widened, as PIL decodes 16-bit PGM
    image.putpixel((1, 0), 257 * 50)
    rgb = to_rgb(image)
    assert _px(rgb, (0, 0)) == (255, 255, 255) and _px(rgb, (1, 0)) == (50, 50, 50)
    wide = Image.new("I", (2, 1), -1000)  # outside 16 bits: rescaled by its range, not wrapped
    wide.putpixel((1, 0), 1_000_000)
    assert _px(to_rgb(wide), (0, 0)) == (0, 0, 0) and _px(to_rgb(wide), (1, 0)) == (255, 255, 255)


def test_to_rgb_float() -> None:
    unit = Image.new("F", (2, 1), 0.5)  # 0..1 convention
    unit.putpixel((1, 0), 1.0)
    assert _px(to_rgb(unit), (0, 0)) == (128, 128, 128) and _px(to_rgb(unit), (1, 0)) == (255, 255, 255)
    byte_range = Image.new("F", (2, 1), 200.0)  # 0..255 convention (PIL's convert('F'))
    byte_range.putpixel((1, 0), 10.0)
    assert _px(to_rgb(byte_range), (0, 0)) == (200, 200, 200) and _px(to_rgb(byte_range), (1, 0)) == (10, 10, 10)


def test_to_rgb_rejects_bad_background() -> None:
    with pytest.raises(ValueError, match="background"):
        to_rgb(Image.new("RGBA", (1, 1)), background=(0, 0))


# ---------------------------------------------------------------- target_size / resize


@pytest.mark.parametrize(
    ("size", "kwargs", "expected"),
    [
        ((512, 512), {}, (512, 512)),
        ((640, 480), {}, (512, 384)),
        ((480, 640), {}, (384, 512)),
        ((1000, 300), {"multiple": 64}, (512, 128)),  # 153.6 -> nearest multiple of 64
        ((1000, 700), {"multiple": 64}, (512, 384)),  # 358.4 -> 384 (nearest, not floor)
        ((10, 10), {}, (512, 512)),  # tiny images are scaled up
        ((10, 5), {}, (512, 256)),
        ((10000, 10), {}, (512, 8)),  # never below one multiple
        ((300, 200), {"resolution": 256}, (256, 168)),  # 170.7 -> 168
    ],
)
def test_target_size(size: tuple[int, int], kwargs: dict, expected: tuple[int, int]) -> None:
    assert target_size(*size, **kwargs) == expected


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((0, 10), "width"),
        ((10, -1), "height"),
        ((10.5, 10), "width"),
        ((True, 10), "width"),
        ((10, 10, 0), "resolution"),
        ((10, 10, 512, 0), "multiple"),
        ((10, 10, 32, 64), "resolution"),
    ],
)
def test_target_size_validation(args: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        target_size(*args)


def test_resize_for_model() -> None:
    image = _noise(640, 480)
    resized = resize_for_model(image)
    assert resized.size == (512, 384) and resized.mode == "RGB"
    already = _noise(512, 384)
    assert resize_for_model(already) is already  # no resampling when the size already fits
    assert resize_for_model(Image.new("RGBA", (64, 64)), resolution=64).mode == "RGB"


def test_resize_for_model_refuses_a_huge_resolution_before_allocating() -> None:
    image = _noise(32, 24)
    with pytest.raises(ValueError, match=r"resolution 100000 makes .* 100000x75000 .* over the limit of 67108864"):
        resize_for_model(image, 100_000, max_pixels=DEFAULT_MAX_PIXELS)
    assert resize_for_model(image, 64, max_pixels=64 * 48).size == (64, 48)


# ---------------------------------------------------------------- load_image: errors


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    _noise(64, 64).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("garbage.png", b"this is not an image at all" * 10, "not an image"),
        ("cut.png", _encoded("PNG")[:-200], "truncated"),
        ("cut.jpg", _encoded("JPEG")[:1500], "truncated"),
        ("empty.jpg", b"", "empty"),
        ("zero_size.png", _png_header_only(0, 0), "zero_size.png"),
        ("too_big.png", _png_header_only(9000, 8000), "over the limit"),  # 72 MP > 64 MP default
        ("bomb.png", _png_header_only(100_000, 100_000), "over the limit"),  # ours, not PIL's own bomb error
    ],
)
def test_load_image_bad_files_raise_image_error(tmp_path: Path, name: str, data: bytes, match: str) -> None:
    path = _write(tmp_path / name, data)
    with pytest.raises(ImageError, match=match) as info:
        load_image(path, max_pixels=DEFAULT_MAX_PIXELS)
    message = str(info.value)
    assert name in message and "\n" not in message
    assert info.value.path == path



def test_load_image_max_pixels_checked_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    _noise(4, 4).save(path)
    with pytest.raises(ImageError, match="over the limit") as info:
        load_image(path, max_pixels=1)
    assert "small.png" in str(info.value)
    assert load_image(path, max_pixels=16).size == (4, 4)  # the limit is inclusive


def test_max_pixels_not_pillows_own_limit_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow warns over Image.MAX_IMAGE_PIXELS (~89 MP) and refuses over twice that, whatever max_pixels says: a
    # 200 MP photo could not be loaded with max_pixels raised. Here Pillow's limit is lowered to 4 pixels instead.
    path = tmp_path / "photo.png"
    _noise(8, 8).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        assert load_image(path, max_pixels=64).size == (8, 8)
        assert decode_image(path.read_bytes(), max_pixels=64).size == (8, 8)
    with pytest.raises(ImageError, match="over the limit of 63; downscale it or raise max_pixels"):
        load_image(path, max_pixels=63)
    assert Image.MAX_IMAGE_PIXELS == 4  # Pillow's global is left as it was


def test_load_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        load_image(tmp_path / "nowhere.png")


def test_load_image_folder_is_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)


def test_load_image_rejects_bad_max_pixels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(tmp_path / "x.png", max_pixels=0)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count file descriptors")
def test_load_image_closes_files(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    _noise(8, 8).save(good)
    bad = _write(tmp_path / "bad.jpg", _encoded("JPEG")[:300])
    big = _write(tmp_path / "big.png", _png_header_only(9000, 8000))
    before = _open_fds()
    kept = []  # errors kept alive (as a loader that counts bad records might), with their tracebacks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(3):
            kept.append(load_image(good))
            for path in (bad, big):
                with pytest.raises(ImageError) as info:
                    load_image(path)
                kept.append(info.value)
        assert _open_fds() == before
        del kept
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


# ---------------------------------------------------------------- tensors


def test_image_to_tensor_matches_diffusers_exactly() -> None:
    from diffusers.image_processor import VaeImageProcessor

    image = _noise(64, 48, seed=1)
    ours = image_to_tensor(image)
    theirs = VaeImageProcessor().preprocess(image)
    assert ours.shape == (3, 48, 64) and ours.dtype == torch.float32
    assert torch.equal(ours, theirs[0])
    assert ours.min() >= -1 and ours.max() <= 1

    batch = [image, _noise(64, 48, seed=2)]
    assert torch.equal(images_to_batch(batch), VaeImageProcessor().preprocess(batch))


def test_image_to_tensor_converts_non_rgb() -> None:
    tensor = image_to_tensor(Image.new("L", (8, 8), 255))
    assert tensor.shape == (3, 8, 8) and torch.equal(tensor, torch.ones(3, 8, 8))


def test_images_to_batch_rejects_mixed_sizes() -> None:
    with pytest.raises(ValueError, match=r"images\[1\] is 16x8"):
        images_to_batch([_noise(8, 8), _noise(16, 8)])
    with pytest.raises(ValueError, match="empty"):
        images_to_batch([])


def test_tensor_to_images_round_trip_and_matches_diffusers() -> None:
    from diffusers.image_processor import VaeImageProcessor

    originals = [_noise(24, 16, seed=s) for s in (3, 4)]
    normalised = images_to_batch(originals)  # (2, 3, 16, 24) in [-1, 1]
    restored = tensor_to_images(normalised / 2 + 0.5)
    assert [im.size for im in restored] == [(24, 16), (24, 16)]
    for original, image in zip(originals, restored):
        np.testing.assert_array_equal(np.array(image), np.array(original))

    # Off-grid values: our rounding must equal diffusers' postprocess, not just survive the round trip.
    sample = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = tensor_to_images(sample / 2 + 0.5)
    theirs = VaeImageProcessor().postprocess(sample, output_type="pil")
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_tensor_to_images_clamps_and_validates() -> None:
    image = tensor_to_images(torch.tensor([[[[1.5]], [[-0.5]], [[0.5]]]]))[0]
    assert image.getpixel((0, 0)) == (255, 0, 128)
    with pytest.raises(ValueError, match="shape"):
        tensor_to_images(torch.zeros(1, 4, 2, 2))


# ---------------------------------------------------------------- expand_image_paths


def test_expand_image_paths(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("b.png", "a.JPG", "c.webp", ".hidden.png", "notes.txt", "anim.gif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.png").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a folder with an image suffix is not an image

    # folder: image extensions only, case-insensitive, sorted, not recursive, no hidden files
    with caplog.at_level(logging.INFO, logger="ip2p.images"):
        assert expand_image_paths(str(tmp_path)) == [tmp_path / "a.JPG", tmp_path / "b.png", tmp_path / "c.webp"]
    # ... and says which visible files it left out (not the hidden one, not the sub-folders)
    assert "skipped 2 file(s) of folder" in caplog.text and "e.g. anim.gif, notes.txt" in caplog.text
    # single file, even without an image suffix (the user named it)
    assert expand_image_paths(str(tmp_path / "notes.txt")) == [tmp_path / "notes.txt"]
    # glob, sorted
    assert expand_image_paths(str(tmp_path / "*.png")) == [tmp_path / "b.png"]
    assert expand_image_paths(str(tmp_path / "**" / "*.png")) == [tmp_path / "b.png", tmp_path / "sub" / "d.png"]


def test_expand_image_paths_nothing_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for spec in (tmp_path / "missing.png", tmp_path / "empty", tmp_path / "*.tiff"):
        with pytest.raises(FileNotFoundError) as info:
            expand_image_paths(str(spec))
        assert str(spec) in str(info.value)


# ---------------------------------------------------------------- save_image


def test_save_image_round_trip_creates_parents(tmp_path: Path) -> None:
    image = _noise(16, 8)
    path = tmp_path / "out" / "nested" / "edit.png"
    save_image(image, path)
    np.testing.assert_array_equal(np.array(Image.open(path)), np.array(image))
    assert os.listdir(path.parent) == ["edit.png"]  # no temp file left behind


def test_save_image_format_from_suffix(tmp_path: Path) -> None:
    save_image(Image.new("RGBA", (8, 8), (255, 0, 0, 255)), tmp_path / "a.JPEG")  # alpha dropped for JPEG
    save_image(_noise(8, 8), tmp_path / "b.webp")
    with Image.open(tmp_path / "a.JPEG") as a, Image.open(tmp_path / "b.webp") as b:
        assert (a.format, a.mode, b.format) == ("JPEG", "RGB", "WEBP")
    with pytest.raises(ValueError, match="suffix"):
        save_image(_noise(8, 8), tmp_path / "c.unknown")


def test_save_image_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "result.png"
    save_image(Image.new("RGB", (4, 4), RED), path)
    before = path.read_bytes()

    def crash_mid_write(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise KeyboardInterrupt  # as if killed while writing

    monkeypatch.setattr(Image.Image, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_image(Image.new("RGB", (4, 4), BLUE), path)
    assert path.read_bytes() == before  # old file intact
    assert os.listdir(tmp_path) == ["result.png"]  # partial temp file removed


def test_save_image_respects_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        save_image(_noise(4, 4), tmp_path / "perm.png")
    finally:
        os.umask(old)
    assert (tmp_path / "perm.png").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------- make_grid


def _solid(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


COLOURS = [[(200, 30, 30), (30, 200, 30), (30, 30, 200)], [(200, 200, 30), (30, 200, 200), (200, 30, 200)]]


def _colour_count(image: Image.Image, colour: tuple[int, int, int]) -> int:
    return int((np.array(image) == colour).all(axis=-1).sum())


def test_make_grid_places_every_image() -> None:
    cells = [[_solid(c) for c in row] for row in COLOURS]
    plain = make_grid(cells)
    assert plain.mode == "RGB"
    assert 3 * 40 <= plain.width <= 3 * 40 + 20 and 2 * 30 <= plain.height <= 2 * 30 + 20
    for colour in sum(COLOURS, []):
        assert _colour_count(plain, colour) == 40 * 30  # each image pasted whole, none overlapping

    labelled = make_grid(
        cells, row_labels=["s_I=1.0", "s_I=1.5"], col_labels=["s_T=3", "s_T=7.5", "s_T=12"], title="sweep"
    )
    assert labelled.width > plain.width and labelled.height > plain.height
    for colour in sum(COLOURS, []):
        assert _colour_count(labelled, colour) == 40 * 30
    top = np.array(labelled)[: labelled.height - plain.height]
    assert (top.max(axis=-1) < 128).any()  # some dark text drawn above the images


def test_make_grid_wraps_long_text() -> None:
    cells = [[_solid(c) for c in COLOURS[0]]]
    short = make_grid(cells, title="edit")
    long = make_grid(cells, title="turn the sky into a dramatic sunset over the mountains " * 4)
    assert long.width == short.width  # wrapped, not widened
    assert long.height > short.height
    wrapped_col = make_grid(cells, col_labels=["make it winter with snow everywhere", "b", "c"])
    assert wrapped_col.width == make_grid(cells, col_labels=["a", "b", "c"]).width


def test_make_grid_mixed_sizes_and_ragged_rows() -> None:
    grid = make_grid([[_solid(RED, (40, 30)), _solid(GREEN, (20, 10))], [_solid(BLUE, (40, 30))]])
    assert _colour_count(grid, RED) == 1200 and _colour_count(grid, GREEN) == 200 and _colour_count(grid, BLUE) == 1200


def test_make_grid_validation() -> None:
    cells = [[_solid(RED), _solid(GREEN)]]
    with pytest.raises(ValueError, match="row_labels"):
        make_grid(cells, row_labels=["a", "b"])
    with pytest.raises(ValueError, match="col_labels"):
        make_grid(cells, col_labels=["a"])
    with pytest.raises(ValueError, match="non-empty"):
        make_grid([])


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "GIF"])
def test_max_pixels_decides_for_formats_that_check_pillows_limit_while_decoding(fmt, monkeypatch) -> None:
    # TIFF checks Image.MAX_IMAGE_PIXELS again in load(), after the header: a 200 MP TIFF was refused with
    # "too large to decode safely; downscale it" although max_pixels allowed it. Pillow's limit lowered to 4 here.
    from ip2p.data.decode import _decode_bytes

    buffer = io.BytesIO()
    _noise(8, 8).save(buffer, format=fmt)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(buffer.getvalue(), max_pixels=64).size == (8, 8)
        assert _decode_bytes(buffer.getvalue(), 64).size == (8, 8)
    assert Image.MAX_IMAGE_PIXELS == 4
