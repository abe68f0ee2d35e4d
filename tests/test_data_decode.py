"""ip2p.data decoding (odd images converted, bad ones refused), paired augmentation and per-example seeding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_support import RES, encode, noise_image

from ip2p.data import (
    AugmentConfig,
    BadRecord,
    Purpose,
    decode_image,
    decode_instruction,
    example_generator,
    paired_augment,
)

# Decoding ----------------------------------------------------------------------------------------------------


def test_decode_accepts_bytes_dicts_paths_and_pil(tmp_path):
    image = noise_image(0)
    path = tmp_path / "a.png"
    image.save(path)
    expected = np.asarray(image)
    for value in (encode(image), {"bytes": encode(image), "path": None}, {"bytes": None, "path": str(path)},
                  str(path), path, image):
        decoded = decode_image(value)
        assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), expected), type(value)


def test_decode_applies_exif_rotation():
    image = noise_image(1, (24, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert decoded.size == (16, 24)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P", "LA"])
def test_decode_converts_odd_modes_instead_of_skipping(mode):
    if mode == "I;16":
        # 16-bit data: 65535 must become white, not be clipped, and 32896 mid-grey (scaled, not clipped at 255).
        array = np.full((20, 24), 32896, dtype=np.uint16)
        array[0, 0] = 65535
        image = Image.fromarray(array)
        assert image.mode == "I;16"
        data = encode(image)
    elif mode == "CMYK":
        data = encode(Image.new("CMYK", (24, 20), (0, 255, 255, 0)), "JPEG", quality=95)  # red
    elif mode == "RGBA":
        data = encode(Image.new("RGBA", (24, 20), (255, 0, 0, 0)))  # fully transparent red
    elif mode == "LA":
        data = encode(Image.new("LA", (24, 20), (0, 255)))
    elif mode == "P":
        data = encode(Image.new("RGB", (24, 20), (0, 0, 255)).convert("P"))
    else:
        data = encode(Image.new("L", (24, 20), 77))
    decoded = decode_image(data)
    pixel = decoded.getpixel((5, 5))
    assert decoded.mode == "RGB" and decoded.size == (24, 20)
    expected = {"L": (77, 77, 77), "RGBA": (255, 255, 255), "CMYK": (255, 0, 0), "I;16": (128, 128, 128),
                "P": (0, 0, 255), "LA": (0, 0, 0)}[mode]
    assert np.allclose(pixel, expected, atol=3), (mode, pixel)
    if mode == "I;16":
        assert decoded.getpixel((0, 0)) == (255, 255, 255)


def _truncated_jpeg() -> bytes:
    data = encode(noise_image(2, (30, 30)), "JPEG", quality=90)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "missing"),
        ({"bytes": None, "path": None}, "missing"),
        (b"", "zero-size"),
        (b"definitely not an image", "cannot decode"),
        ("TRUNCATED", "truncated"),
        ("/nonexistent/dir/x.png", "not found"),
        ("EMPTYFILE", "empty"),
        ("TINY", "smaller than the minimum side"),
        ("HUGE", "over the limit"),
        (12345, "type int"),
    ],
)
def test_decode_refuses_bad_values_with_a_reason(value, reason, tmp_path):
    if value == "TRUNCATED":
        value = _truncated_jpeg()
    elif value == "EMPTYFILE":
        (tmp_path / "empty.png").write_bytes(b"")
        value = str(tmp_path / "empty.png")
    elif value == "TINY":
        value = encode(Image.new("RGB", (4, 30)))
    elif value == "HUGE":
        value = encode(Image.new("RGB", (40, 40)))
    with pytest.raises(BadRecord, match=reason):
        decode_image(value, max_pixels=1000)


def test_data_max_pixels_not_pillows_own_limit_decides(monkeypatch):
    # Pillow refuses images over twice Image.MAX_IMAGE_PIXELS whatever data.max_pixels allows (lowered here to 4).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4)
    assert decode_image(encode(Image.new("RGB", (8, 8))), max_pixels=64).size == (8, 8)
    with pytest.raises(BadRecord, match="over the limit of 63 pixels"):
        decode_image(encode(Image.new("RGB", (8, 8))), max_pixels=63)


def test_decode_instruction():
    assert decode_instruction("make it snow") == "make it snow"
    assert decode_instruction("make it snow".encode()) == "make it snow"
    with pytest.raises(BadRecord, match="missing"):
        decode_instruction(None)
    with pytest.raises(BadRecord, match="type list"):
        decode_instruction(["a"])


# Augmentation ------------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1


def test_augment_same_image_gives_identical_outputs():
    cfg = AugmentConfig(resolution=RES, random_resize=(RES, 24))
    image = noise_image(3, (40, 30))
    for seed in range(8):
        source, target = paired_augment(image, image.copy(), cfg, _gen(seed))
        assert source.shape == (3, RES, RES) and source.dtype == torch.float32
        assert source.min() >= -1 and source.max() <= 1
        assert torch.equal(source, target)


def test_augment_pairs_stay_aligned_through_crop_and_flip():
    # Without resampling (no resize), target = inverted source must stay exactly the inverse.
    cfg = AugmentConfig(resolution=RES, random_resize=(RES, RES))
    source = noise_image(4, (30, RES))
    target = Image.fromarray(255 - np.asarray(source))
    for seed in range(8):
        out_source, out_target = paired_augment(source, target, cfg, _gen(seed))
        assert torch.allclose(out_target, -out_source, atol=1e-6)


def test_augment_is_deterministic_per_generator_and_varies_across_seeds():
    cfg = AugmentConfig(resolution=RES, random_resize=(RES, 24))
    image = noise_image(5, (40, 30))
    first = paired_augment(image, image, cfg, _gen(7))[0]
    assert torch.equal(first, paired_augment(image, image, cfg, _gen(7))[0])
    outputs = {paired_augment(image, image, cfg, _gen(seed))[0].numpy().tobytes() for seed in range(12)}
    assert len(outputs) > 6


def test_augment_flip_happens_about_half_the_time():
    cfg = AugmentConfig(resolution=RES, random_resize=(RES, RES), random_crop=False, random_flip=True)
    image = noise_image(6, (RES, RES))
    plain = _tensor(image)
    flips = 0
    for seed in range(40):
        out = paired_augment(image, image, cfg, _gen(seed))[0]
        if torch.equal(out, plain.flip(-1)):
            flips += 1
        else:
            assert torch.equal(out, plain)
    assert 10 <= flips <= 30


def test_augment_random_crop_takes_real_crops_at_varying_offsets():
    cfg = AugmentConfig(resolution=RES, random_resize=(24, 24), random_crop=True, random_flip=False)
    image = noise_image(7, (40, 24))  # short side already 24: no resampling, so crops are exact slices
    full = _tensor(image)  # (3, 24, 40)
    offsets = set()
    for seed in range(20):
        out = paired_augment(image, image, cfg, _gen(seed))[0]
        matches = [(top, left) for top in range(24 - RES + 1) for left in range(40 - RES + 1)
                   if torch.equal(out, full[:, top:top + RES, left:left + RES])]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) >= 10
    centre = paired_augment(image, image, AugmentConfig(RES, (24, 24), False, False), _gen(0))[0]
    assert torch.equal(centre, full[:, 4:4 + RES, 12:12 + RES])


def test_augment_random_resize_varies_the_scale():
    cfg = AugmentConfig(resolution=RES, random_resize=(RES, 32), random_crop=False, random_flip=False)
    image = noise_image(8, (40, 40))
    outputs = {paired_augment(image, image, cfg, _gen(seed))[0].numpy().tobytes() for seed in range(12)}
    assert len(outputs) >= 4  # only the resize is random here


def test_augment_resizes_a_differently_sized_target_to_the_source():
    cfg = AugmentConfig(resolution=RES, random_resize=(RES, RES), random_crop=False, random_flip=False)
    source = Image.new("RGB", (20, 20), (200, 10, 10))
    target = Image.new("RGB", (40, 40), (10, 200, 10))
    out_source, out_target = paired_augment(source, target, cfg, _gen(0))
    assert out_target.shape == out_source.shape == (3, RES, RES)
    assert torch.allclose(out_target[:, 0, 0], torch.tensor([10, 200, 10]) / 127.5 - 1, atol=0.02)


def test_augment_config_validation():
    assert AugmentConfig(resolution=RES, random_resize=[RES, 20]).random_resize == (RES, 20)  # YAML lists
    with pytest.raises(ValueError, match=r"data\.random_resize.*resolution \(256\) <= lo <= hi.*\(200, 300\)"):
        AugmentConfig(random_resize=(200, 300))
    with pytest.raises(ValueError, match=r"data\.resolution"):
        AugmentConfig(resolution=0)


# Seeding -----------------------------------------------------------------------------------------------------


def test_example_generator_is_keyed_by_seed_index_and_purpose():
    def draw(*key):
        return torch.rand(4, generator=example_generator(*key)).tolist()

    assert draw(0, 5, Purpose.NOISE) == draw(0, 5, Purpose.NOISE)
    keys = [(0, 5, Purpose.NOISE), (1, 5, Purpose.NOISE), (0, 6, Purpose.NOISE), (0, 5, Purpose.DROPOUT),
            (0, 5, Purpose.AUGMENT), (5, 0, Purpose.NOISE)]
    assert len({tuple(draw(*key)) for key in keys}) == len(keys)
    with pytest.raises(ValueError, match="integers"):
        example_generator(0, 1.5, Purpose.NOISE)


def test_lazily_opened_pil_image_decodes():
    # Image.open only reads the header; decode_image must finish decoding it.
    lazy = Image.open(io.BytesIO(encode(noise_image(9))))
    assert decode_image(lazy).size == (24, 20)
