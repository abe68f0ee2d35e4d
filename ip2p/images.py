"""Image I/O: user files -> model inputs, model outputs -> files and grids.

Everything that touches pixels on the way in or out lives here, so loaders, `infer.py`, evaluation and
training share one definition of "an RGB image in [-1, 1]" (the same numbers diffusers'
`VaeImageProcessor` produces for PIL input) and one way to survive odd files (EXIF rotation, palette,
16-bit, CMYK, truncated or huge images).
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import math
import os
import pathlib
import re
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from ip2p import atomic

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageError",
    "decode_image",
    "expand_image_paths",
    "image_to_tensor",
    "images_to_batch",
    "load_image",
    "make_grid",
    "open_image",
    "resize_for_model",
    "save_image",
    "target_size",
    "tensor_to_images",
    "to_rgb",
]

# 8192 x 8192: far beyond anything the model is run at, yet below PIL's own bomb limit (~89 MP), so a
# hostile header is refused by us with a clear message before PIL warns or allocates.
DEFAULT_MAX_PIXELS: int = 64 * 1024 * 1024

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})

_GLOB_CHARS = re.compile(r"[*?\[]")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and what to do about it."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.path = path


def _one_line(exc: BaseException) -> str:
    """Collapse an exception's text to one line (PIL messages sometimes span several)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def load_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file as a fully decoded RGB image, upright per its EXIF orientation.

    Raises `FileNotFoundError` for a missing file and `ImageError` (naming the file) for anything that is
    not a usable image: unreadable, not an image, empty, truncated, or more than `max_pixels` pixels.
    """
    _check_max_pixels(max_pixels)
    path = pathlib.Path(os.fspath(path))
    try:
        # We open the file ourselves so the handle is closed on every path, including PIL errors.
        handle = open(path, "rb")  # noqa: SIM115 - closed by the `with` below
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: '{path}'; check the path") from None
    except IsADirectoryError:
        raise ImageError(f"'{path}' is a folder, not an image file; pass an image file", path=path) from None
    except OSError as exc:
        raise ImageError(f"cannot read '{path}' ({_one_line(exc)}); check its permissions", path=path) from exc

    with handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise ImageError(f"'{path}' is empty (0 bytes); re-download or remove it", path=path)
        return _decode(handle, path, max_pixels)


def decode_image(data: bytes, *, name: str = "the image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`load_image` for an image held in memory (an upload); errors name it `name`."""
    _check_max_pixels(max_pixels)
    if not data:
        raise ImageError(f"'{name}' is empty (0 bytes); send an image file", path=name)
    return _decode(io.BytesIO(data), name, max_pixels)


def _check_max_pixels(max_pixels: object) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")


_PILLOW_LIMIT = threading.Lock()  # Image.MAX_IMAGE_PIXELS is Pillow's global: one opening at a time changes it


@contextlib.contextmanager
def _without_pillow_limit():
    """Lift Pillow's global size limit for the block, under the lock: our ``max_pixels`` decides instead."""
    with _PILLOW_LIMIT:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def open_image(handle: Any) -> Image.Image:
    """``Image.open`` with Pillow's own size check (a warning over ``Image.MAX_IMAGE_PIXELS``, about 89 MP, an error
    over twice that) left to ours: ``max_pixels`` is compared with the header right after, before any pixel is
    decoded, so a user who raises it can load a 200 MP photo and one who does not gets our message, not Pillow's."""
    with _without_pillow_limit():
        return Image.open(handle)


def load_pixels(opened: Image.Image) -> None:
    """``opened.load()`` for an image ``max_pixels`` has already let through: some decoders (TIFF, GIF frames) check
    Pillow's own limit again as they allocate, so over it the limit is lifted for the load too (under the lock)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or opened.width * opened.height <= limit:
        opened.load()
        return
    with _without_pillow_limit():
        opened.load()


def _decode(handle: Any, path: str | os.PathLike, max_pixels: int) -> Image.Image:
    """Decode an open image file; every way it can be unusable is an `ImageError` naming `path`."""
    try:
        with open_image(handle) as opened:
            # Image.open only parses the header, so the size is known before any pixels are decoded.
            width, height = opened.size
            if width <= 0 or height <= 0:
                raise ImageError(f"'{path}' has zero size ({width}x{height}); remove it", path=path)
            if width * height > max_pixels:
                raise ImageError(
                    f"'{path}' is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; "
                    "downscale it or raise max_pixels (--max-pixels)",
                    path=path,
                )
            # Decode now so a truncated file fails here rather than later inside a resize or a batch.
            load_pixels(opened)
            try:
                upright = ImageOps.exif_transpose(opened)  # always a new image, independent of the file
            except Exception as exc:  # a broken EXIF block should not cost us a good picture
                logger.warning("ignoring unreadable EXIF orientation in '%s': %s", path, _one_line(exc))
                upright = opened.copy()
    except ImageError:
        raise
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"'{path}' is too large to decode safely ({_one_line(exc)}); downscale it", path=path
        ) from exc
    except UnidentifiedImageError as exc:  # its message names a file object, not the path
        raise ImageError(
            f"'{path}' is not an image PIL can read; check it is a PNG/JPEG/WebP/BMP/TIFF image or remove it",
            path=path,
        ) from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for bad data
        raise ImageError(
            f"'{path}' is not a readable image ({_one_line(exc)}); check the file is a complete "
            "PNG/JPEG/WebP/BMP/TIFF image or remove it",
            path=path,
        ) from exc
    try:
        return to_rgb(upright)
    except ValueError as exc:
        raise ImageError(f"'{path}': {_one_line(exc)}; convert it to RGB first", path=path) from exc


def _check_background(background: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(background)
    if len(values) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
        raise ValueError(f"background must be three integers in 0..255, got {background!r}")
    return values  # type: ignore[return-value]


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float grayscale image to 8-bit 'L'.

    PIL's own conversion clips (65535 -> 255, 0.5 -> 0), which turns real 16-bit or float data into garbage.
    """
    array = np.asarray(image)
    if image.mode in _INT_MODES:
        values = array.astype(np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low >= 0 and high <= 65535:
            # 16-bit data: 'I;16*' always, and 'I' is how PIL decodes 16-bit PGM and older 16-bit PNGs.
            scaled = values / 257.0
        else:
            logger.debug("mode %s values span %s..%s; rescaling to 0..255", image.mode, low, high)
            scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    else:  # 'F'
        values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low >= 0 and high <= 1:
            scaled = values * 255.0  # the usual float-image convention
        elif low >= 0 and high <= 255:
            scaled = values  # what PIL's convert('F') of an 8-bit image gives
        else:
            logger.debug("mode F values span %s..%s; rescaling to 0..255", low, high)
            scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image, *, background: Sequence[int] = (255, 255, 255)) -> Image.Image:
    """Return `image` as 8-bit RGB; transparency is composited over `background`, RGB input is returned as is."""
    if image.mode == "RGB":
        return image
    bg = _check_background(background)
    mode = image.mode
    if mode in _INT_MODES or mode == "F":
        return _high_depth_to_8bit(image).convert("RGB")
    if mode == "La":  # PIL has no direct La -> RGB(A) conversion; premultiplied -> straight alpha first
        image, mode = image.convert("LA"), "LA"
    if mode in _ALPHA_MODES or (mode in {"P", "L", "1"} and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*bg, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"cannot convert image mode {mode!r} to RGB ({_one_line(exc)})") from exc


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def target_size(width: int, height: int, resolution: int = 512, multiple: int = 8) -> tuple[int, int]:
    """(width, height) with the aspect ratio kept, the long side ~= `resolution`, both multiples of `multiple`.

    Sides are rounded to the nearest multiple (at least one `multiple`); small images are scaled up.
    """
    _check_positive_int("width", width)
    _check_positive_int("height", height)
    _check_positive_int("resolution", resolution)
    _check_positive_int("multiple", multiple)
    if resolution < multiple:
        raise ValueError(f"resolution must be at least multiple ({multiple}), got {resolution}")
    scale = resolution / max(width, height)

    def snap(side: int) -> int:
        # floor(x + 0.5), not round(): Python's round() goes to even, which would make 4 -> 0 but 12 -> 16.
        return max(multiple, int(math.floor(side * scale / multiple + 0.5)) * multiple)

    return snap(width), snap(height)


def resize_for_model(image: Image.Image, resolution: int = 512, multiple: int = 8, *,
                     max_pixels: int | None = None) -> Image.Image:
    """Convert to RGB and Lanczos-resize to `target_size`; no resampling when the size already matches.

    `resolution=0` keeps the input's size, each side floored to a multiple of `multiple`: what diffusers'
    pipeline does with an image, so results can be compared with it on any input. A result of more than
    `max_pixels` pixels is refused before anything is allocated.
    """
    if resolution == 0:
        multiple = _check_positive_int("multiple", multiple)
        size = (max(multiple, image.width // multiple * multiple), max(multiple, image.height // multiple * multiple))
    else:
        size = target_size(image.width, image.height, resolution, multiple)
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise ValueError(
            f"resolution {resolution} makes this {image.width}x{image.height} image {size[0]}x{size[1]} = "
            f"{size[0] * size[1]} pixels, over the limit of {max_pixels}; lower the resolution or raise max_pixels "
            "(--max-pixels)"
        )
    image = to_rgb(image)
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1], bit-identical to diffusers' `VaeImageProcessor.preprocess` for PIL input."""
    if image.mode != "RGB":
        image = to_rgb(image)
    # Same expressions, in the same order and dtype, as diffusers' pil_to_numpy + normalize.
    array = np.array(image).astype(np.float32) / 255.0  # (H, W, 3)
    tensor = torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W)
    return 2.0 * tensor - 1.0


def images_to_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) float32 in [-1, 1]; all images must already share one size."""
    if len(images) == 0:
        raise ValueError("images must contain at least one image, got an empty list")
    first = images[0].size
    for index, image in enumerate(images):
        if image.size != first:
            raise ValueError(
                f"images[{index}] is {image.width}x{image.height} but images[0] is {first[0]}x{first[1]}; "
                "resize them to one size (resize_for_model) before batching"
            )
    # Built as diffusers builds it: an (B, H, W, 3) array permuted to (B, 3, H, W), i.e. channels-last memory. The
    # VAE's convolutions round differently for another memory layout (~1e-6), so this keeps our edits bit-identical
    # to diffusers' pipeline for the same weights and seed.
    array = np.stack([np.array(im if im.mode == "RGB" else to_rgb(im)).astype(np.float32) / 255.0 for im in images])
    return 2.0 * torch.from_numpy(array).permute(0, 3, 1, 2) - 1.0


def tensor_to_images(batch: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] (already denormalised) -> RGB images, rounded as diffusers' `numpy_to_pil`."""
    if batch.ndim == 3:
        batch = batch.unsqueeze(0)
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"batch must have shape (B, 3, H, W), got {tuple(batch.shape)}")
    # Clamping is a no-op for diffusers' (already clamped) outputs and keeps stray values from wrapping in uint8.
    values = torch.nan_to_num(batch.detach().float(), nan=0.0).clamp(0, 1)
    array = values.cpu().permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    array = (array * 255).round().astype("uint8")
    return [Image.fromarray(item) for item in array]


def _log_skipped(candidates: Iterable[pathlib.Path], found: list[pathlib.Path], where: str) -> None:
    """Say which visible files of a folder or glob were left out for their extension (a .gif, a .heic, ...)."""
    kept = set(found)
    skipped = sorted(p.name for p in candidates
                     if p not in kept and not p.name.startswith(".") and p.is_file())
    if skipped:
        logger.info("skipped %d file(s) of %s without an image extension (%s), e.g. %s", len(skipped), where,
                    ", ".join(sorted(IMAGE_EXTENSIONS)), ", ".join(skipped[:3]))


def expand_image_paths(spec: str | os.PathLike) -> list[pathlib.Path]:
    """Image paths named by `spec`: a file, a folder's image files (non-recursive) or a glob, sorted.

    Folders and globs keep only files with an image extension (case-insensitive) and skip hidden files
    (e.g. macOS `._IMG.jpg` resource forks); a file named explicitly is returned as is.
    """
    text = os.fspath(spec)
    path = pathlib.Path(text).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if _is_image_file(p))
        _log_skipped(path.iterdir(), found, f"folder '{text}'")
        if not found:
            raise FileNotFoundError(
                f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder '{text}'"
            )
        logger.debug("%d image files in folder %s", len(found), path)
        return found
    if _GLOB_CHARS.search(text):
        matches = [pathlib.Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True)]
        found = sorted(p for p in matches if _is_image_file(p))
        _log_skipped(matches, found, f"the pattern '{text}'")
        if not found:
            raise FileNotFoundError(
                f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) match the pattern '{text}'"
            )
        logger.debug("%d image files match %s", len(found), text)
        return found
    raise FileNotFoundError(f"'{text}' is not an image file, a folder or a glob pattern; check the path")


def _is_image_file(path: pathlib.Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def save_image(image: Image.Image, path: str | os.PathLike) -> None:
    """Write `image` to `path` atomically, in the format its suffix names, creating parent folders."""
    path = pathlib.Path(os.fspath(path))
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"cannot tell the image format of '{path}' from its suffix {path.suffix!r}; "
            "use e.g. .png, .jpg or .webp"
        )
    options: dict[str, object] = {}
    if fmt == "JPEG":
        if image.mode not in {"RGB", "L", "CMYK"}:
            image = to_rgb(image)  # JPEG has no alpha / palette / 16-bit
        options["quality"] = 95  # PIL's default 75 visibly damages edits
    elif fmt == "WEBP":
        options["quality"] = 95
    # The temporary file is hidden, so readers scanning the folder (expand_image_paths) never see it. No clean-up
    # of killed writers' files: infer.py writes thousands of images into one folder, each once.
    with atomic.writing_file(path, clean=False) as tmp, open(tmp, "wb") as handle:
        image.save(handle, format=fmt, **options)
    logger.debug("saved %s (%dx%d %s)", path, image.width, image.height, fmt)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled font (no downloads), scaled when FreeType is available."""
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _printable(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    # The bitmap fallback font only encodes Latin-1; anything else would raise while drawing.
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    """Greedy word wrap to `max_width` pixels; words longer than a line are split between characters."""
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    width = lambda s: draw.textlength(s, font=font)  # noqa: E731
    lines: list[str] = []
    for paragraph in _printable(text, font).splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if width(candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and width(word) > max_width:
                cut = 1
                while cut < len(word) and width(word[: cut + 1]) <= max_width:
                    cut += 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def make_grid(
    images: Sequence[Sequence[Image.Image]],
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Image.Image:
    """A labelled RGB grid: `images[row][col]`, optional row/column labels and a title, text wrapped to fit.

    Cells are the size of the largest image; smaller images are centred, short rows leave blank cells.
    """
    if len(images) == 0 or any(len(row) == 0 for row in images):
        raise ValueError("images must be a non-empty list of non-empty rows of images")
    n_rows, n_cols = len(images), max(len(row) for row in images)
    if row_labels is not None and len(row_labels) != n_rows:
        raise ValueError(f"row_labels has {len(row_labels)} labels but there are {n_rows} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"col_labels has {len(col_labels)} labels but there are {n_cols} columns")
    cell_w = max(image.width for row in images for image in row)
    cell_h = max(image.height for row in images for image in row)

    font_size = max(10, round(min(cell_w, cell_h) / 28))
    font = _font(font_size)
    line_h = font.getbbox("Ag")[3] + max(2, font_size // 4)
    pad = max(4, font_size // 2)
    gap = max(2, min(cell_w, cell_h) // 64)

    row_lines = [_wrap(str(label), font, max(64, cell_w // 2) - 2 * pad) for label in row_labels or []]
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    label_w = 0
    if row_labels is not None:
        widest = max((measure.textlength(line, font=font) for lines in row_lines for line in lines), default=0)
        label_w = math.ceil(widest) + 2 * pad
    col_lines = [_wrap(str(label), font, cell_w - 2 * pad) for label in col_labels or []]
    header_h = max((len(lines) for lines in col_lines), default=0) * line_h + 2 * pad if col_labels else 0
    row_hs = [max(cell_h, len(row_lines[r]) * line_h + 2 * pad if row_labels else 0) for r in range(n_rows)]

    grid_w = label_w + n_cols * cell_w + (n_cols - 1) * gap
    title_lines = _wrap(title, font, grid_w - 2 * pad) if title else []
    title_h = len(title_lines) * line_h + 2 * pad if title else 0
    grid_h = title_h + header_h + sum(row_hs) + (n_rows - 1) * gap

    canvas = Image.new("RGB", (grid_w, grid_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    ink = (0, 0, 0)
    for i, line in enumerate(title_lines):
        draw.text((pad, pad + i * line_h), line, font=font, fill=ink)
    for c, lines in enumerate(col_lines):
        x0 = label_w + c * (cell_w + gap)
        for i, line in enumerate(lines):
            x = x0 + (cell_w - measure.textlength(line, font=font)) / 2
            draw.text((x, title_h + pad + i * line_h), line, font=font, fill=ink)
    y0 = title_h + header_h
    for r, row in enumerate(images):
        if row_labels is not None:
            block = len(row_lines[r]) * line_h
            for i, line in enumerate(row_lines[r]):
                draw.text((pad, y0 + (row_hs[r] - block) / 2 + i * line_h), line, font=font, fill=ink)
        for c, image in enumerate(row):
            x = label_w + c * (cell_w + gap) + (cell_w - image.width) // 2
            y = y0 + (row_hs[r] - image.height) // 2
            canvas.paste(to_rgb(image), (x, y))
        y0 += row_hs[r] + gap
    return canvas
