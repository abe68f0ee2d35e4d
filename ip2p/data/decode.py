"""Raw record values -> RGB images and instruction strings, or `BadRecord` with a one-line reason.

Every failure a data file can produce while training (corrupt or truncated bytes, zero-size or missing files,
missing fields, tiny or huge images, unconvertible modes) becomes `BadRecord`, which the batch builder turns
into a skipped slot rather than a crashed run. Odd but usable images (grayscale, palette, RGBA, CMYK, 16-bit,
EXIF-rotated) are converted, not skipped, through `ip2p.images`, the one definition of "an RGB image" that
inference and evaluation share.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from ip2p.images import DEFAULT_MAX_PIXELS, ImageError, load_image, load_pixels, open_image, to_rgb

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MIN_SIDE", "BadRecord", "decode_image", "decode_instruction"]

DEFAULT_MIN_SIDE: int = 8
"""Images with a side shorter than this carry too little to upscale to a training crop; they are skipped."""


class BadRecord(Exception):
    """A record that cannot be trained on; `str(error)` is the one-line reason."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_remote(url: str) -> bytes:
    """Bytes of a remote image (e.g. hf:// paths of a streamed imagefolder); fsspec comes with `datasets`."""
    import fsspec

    try:
        with fsspec.open(url, "rb") as handle:
            return handle.read()
    except Exception as exc:  # fsspec backends raise their own error types for missing or unreachable files
        raise BadRecord(f"cannot read image {url} ({_one_line(exc)})") from exc


def _decode_bytes(data: bytes, max_pixels: int) -> Image.Image:
    """Decode encoded image bytes fully (so truncation fails here), upright per EXIF, as RGB."""
    if len(data) == 0:
        raise BadRecord("image is zero-size (0 bytes)")
    try:
        with open_image(io.BytesIO(data)) as opened:  # max_pixels, not Pillow's own limit, decides
            width, height = opened.size  # header only: refuse huge images before decoding any pixels
            if width * height > max_pixels:
                raise BadRecord(f"image is {width}x{height}, over the limit of {max_pixels} pixels")
            load_pixels(opened)
            try:
                upright = ImageOps.exif_transpose(opened)
            except Exception as exc:  # a broken EXIF block should not cost us a good picture
                logger.debug("ignoring unreadable EXIF orientation (%s)", _one_line(exc))
                upright = opened.copy()
    except BadRecord:
        raise
    except MemoryError:
        raise
    except UnidentifiedImageError:  # its message names a BytesIO object, which says nothing
        raise BadRecord("cannot decode image (the bytes are not a PNG/JPEG/WebP/BMP/TIFF image)") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for bad data
        raise BadRecord(f"cannot decode image ({_one_line(exc)})") from exc
    return upright


def _from_path(path: str, max_pixels: int) -> Image.Image:
    if "://" in path:
        return _decode_bytes(_read_remote(path), max_pixels)
    try:
        return load_image(path, max_pixels=max_pixels)
    except FileNotFoundError:
        raise BadRecord(f"image file not found: {path}") from None
    except ImageError as exc:
        raise BadRecord(" ".join(str(exc).split())) from exc


def decode_image(
    value: Any, *, min_side: int = DEFAULT_MIN_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """A raw image value -> an upright RGB `PIL.Image`, or `BadRecord` saying why not.

    `value` may be encoded bytes, a datasets Image dict `{"bytes", "path"}` (bytes win when both are set), a
    path (str or os.PathLike; "scheme://" paths are read through fsspec) or a PIL image. Any mode is converted
    to RGB; transparency is composited over white.
    """
    if value is None:
        raise BadRecord("image is missing (None)")
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            raise BadRecord("image is missing (no bytes and no path)")
        value = data if data is not None else path
    if isinstance(value, (bytes, bytearray, memoryview)):
        image = _decode_bytes(bytes(value), max_pixels)
    elif isinstance(value, (str, os.PathLike)):
        image = _from_path(os.fspath(value), max_pixels)
    elif isinstance(value, Image.Image):
        if value.width * value.height > max_pixels:
            raise BadRecord(f"image is {value.width}x{value.height}, over the limit of {max_pixels} pixels")
        try:
            value.load()
            image = ImageOps.exif_transpose(value)
        except Exception as exc:  # a lazily opened PIL image can still fail to decode here
            raise BadRecord(f"cannot decode image ({_one_line(exc)})") from exc
    else:
        raise BadRecord(f"image value has type {type(value).__name__}, expected bytes, dict, path or PIL image")
    if min(image.size) < min_side:
        raise BadRecord(f"image is {image.width}x{image.height}, smaller than the minimum side of {min_side}")
    try:
        return to_rgb(image)
    except ValueError as exc:
        raise BadRecord(f"cannot convert image mode {image.mode!r} to RGB ({_one_line(exc)})") from exc


def decode_instruction(value: Any) -> str:
    """A raw instruction value -> str (bytes are UTF-8 decoded), or `BadRecord` when missing, empty or not text.

    An empty or blank instruction is missing, as an empty CSV cell already is: trained on, it would teach the
    model to edit under the dropped-text condition ("") that guidance relies on to mean "no instruction".
    """
    if value is None:
        raise BadRecord("instruction is missing (None)")
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRecord(f"instruction is not valid UTF-8 ({_one_line(exc)})") from exc
    if not isinstance(value, str):
        raise BadRecord(f"instruction has type {type(value).__name__}, expected str")
    if not value.strip():
        raise BadRecord(f"instruction is empty ({value!r})")
    return value
