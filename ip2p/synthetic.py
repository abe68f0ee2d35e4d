"""Built-in synthetic edit task: procedurally drawn scenes, instructions and exact targets.

A scene is a background colour and 1-3 non-overlapping shapes (circle, square, triangle, star, diamond) with colours
from :data:`PALETTE`. An edit changes one thing (see :data:`EDIT_TYPES`); every example carries the source image, the
instruction, the target image drawn exactly, a mask, and structured metadata from which ``ip2p.eval.metrics`` scores
success.

Drawing. Shapes are rasterised in numpy by testing each pixel centre ``(x + 0.5, y + 0.5)`` against the shape, with no
anti-aliasing or supersampling: every pixel has exactly one palette colour, so masks are exact and targets are
pixel-identical to the source outside the edited region. PIL is used only to encode PNGs (never to draw, whose
rasteriser could change between Pillow versions). Objects' bounding boxes are kept 1 pixel apart, so object masks
never touch.

Masks (bool ``(H, W)``): the pixels the edit may change. ``recolour_object``/``remove_object``: the object's region;
``add_object``: the new object's region; ``move_object``/``change_shape``: the union of the old and new regions;
``recolour_background``: the background region. Every pixel that differs between source and target lies in the mask.

Positions (add, move). ``"top left"``, ``"top"``, ..., ``"centre"``, ..., ``"bottom right"`` name the cells of a 3x3
grid over the image, absolutely: "move the circle to the left" puts the circle's centre at the centre of the middle
left cell, wherever it was. Added objects have a fixed radius (``ADD_RADIUS * size``) so the target is determined by
source and instruction; moved objects keep their size and must leave their old bounding box entirely.

Objects are named by shape ("the circle"), or by colour and shape when the scene has two of that shape ("the red
circle"); colours are unique within a scene, so names are unambiguous.

Splits (deterministic from a seed; example ``i`` of a split depends only on ``(seed, split, i)``):

- ``train``: phrasings from :data:`TRAIN_TEMPLATES`; no combination in :func:`edit_combinations` is held out.
- ``test_heldout_combinations``: phrasings from :data:`TRAIN_TEMPLATES`; the :func:`target_combination` is held out.
- ``test_heldout_phrasings``: phrasings from :data:`HELDOUT_TEMPLATES` only; no combination is held out.

A *combination* is ``(shape, colour)``, with ``shape = "background"`` for the background. The combinations an edit
names or implies (:func:`edit_combinations`) are those of the edited object (or background) before and after the edit;
the *target* combination is the one after the edit: recolour: (shape, new colour); recolour background: ("background",
new colour); remove/add/move: (shape, colour) of the object; change shape: (new shape, colour). So a held-out
combination such as ``("circle", "blue")`` never appears in training as the subject of an edit (no blue circle is
recoloured, removed, added, moved, reshaped, made or referred to), though a blue circle may stand untouched in the
background of a training scene. :func:`verify_splits` checks all of this.

Dataset on disk (:func:`write_dataset`): parquet shards in the Hugging Face hub layout,
``OUT/data/{split}-{i:05d}-of-{n:05d}.parquet``, with a ``README.md`` dataset card that maps files to splits and a
``params.json`` written last. ``datasets.load_dataset(OUT)`` (or ``load_dataset("parquet", data_files=...)``, pandas,
pyarrow) reads it; the ``datasets`` feature types are stored in the parquet schema, so image columns decode to PIL
images. Columns: ``input_image``, ``edited_image``, ``mask`` (PNG, mask as mode ``L`` 0/255), ``edit_prompt``,
``edit_type``, ``metadata`` (JSON string, see :class:`EditExample`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ip2p import atomic

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
"""Bumped whenever generated content changes, so cached datasets are regenerated."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 230, 40),
    "green": (30, 160, 50),
    "cyan": (40, 210, 230),
    "blue": (20, 90, 230),
    "purple": (140, 30, 150),
    "pink": (245, 140, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
"""Named sRGB colours, pairwise at least 40 apart in CIE Lab (Delta E 1976)."""

COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
BACKGROUND = "background"
EDIT_TYPES: tuple[str, ...] = (
    "recolour_object",
    "recolour_background",
    "remove_object",
    "add_object",
    "move_object",
    "change_shape",
)
SPLITS: tuple[str, ...] = ("train", "test_heldout_combinations", "test_heldout_phrasings")
_SPLIT_INDEX = {name: i for i, name in enumerate(SPLITS)}
_SCENE_STREAM = 100  # seed-sequence slot for scene_images, away from the split indices

HELDOUT_COMBINATIONS: frozenset[tuple[str, str]] = frozenset(
    {
        ("circle", "blue"),
        ("circle", "orange"),
        ("square", "green"),
        ("square", "pink"),
        ("triangle", "yellow"),
        ("triangle", "purple"),
        ("star", "red"),
        ("star", "cyan"),
        ("diamond", "white"),
        ("diamond", "black"),
        (BACKGROUND, "orange"),
        (BACKGROUND, "blue"),
    }
)
"""Default held-out (shape, colour) pairs: each colour is held out for one shape and seen with the other four."""

MIN_SIZE = 32
MIN_RADIUS = 0.11  # object radius range, as a fraction of the image size
MAX_RADIUS = 0.16
ADD_RADIUS = 0.135  # radius of added objects, fraction of the image size
MAX_OBJECTS = 3  # objects in a source scene (at least 1)
MAX_OBJECTS_AFTER_ADD = 4
BOX_GAP = 1.0  # pixels between objects' bounding boxes
MIN_CHANGED_PIXELS = 4  # a shape change must add or remove at least this many pixels

_SQUARE_HALF_SIDE = 0.85  # squares look about as big as circles of the same radius
_TRIANGLE = ((0.0, -1.0), (1.0, 0.75), (-1.0, 0.75))
_STAR = tuple(
    (rho * math.cos(math.radians(-90 + 36 * k)), rho * math.sin(math.radians(-90 + 36 * k)))
    for k, rho in zip(range(10), (1.0, 0.5) * 5)
)

POSITIONS: dict[str, tuple[float, float]] = {
    f"{row} {col}".strip() if (row, col) != ("", "") else "centre": ((i + 0.5) / 3, (j + 0.5) / 3)
    for j, row in enumerate(("top", "", "bottom"))
    for i, col in enumerate(("left", "", "right"))
}
"""Cell name -> (x, y) of the cell centre as fractions of the image size, for a 3x3 grid."""

_WHERE_IN = {name: (f"in the {name} corner" if " " in name else f"in the {name}") for name in POSITIONS}
_WHERE_IN.update({"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right"})
_WHERE_TO = {name: (f"to the {name} corner" if " " in name else f"to the {name}") for name in POSITIONS}

TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour_object": (
        "make {obj} {colour}",
        "paint {obj} {colour}",
        "turn {obj} {colour}",
        "change the colour of {obj} to {colour}",
        "colour {obj} {colour}",
        "recolour {obj} {colour}",
        "{obj} should be {colour}",
    ),
    "recolour_background": (
        "make the background {colour}",
        "paint the background {colour}",
        "turn the background {colour}",
        "change the background to {colour}",
        "change the background colour to {colour}",
        "recolour the background {colour}",
        "the background should be {colour}",
    ),
    "remove_object": (
        "remove {obj}",
        "delete {obj}",
        "erase {obj}",
        "take away {obj}",
        "get rid of {obj}",
        "take out {obj}",
        "make {obj} disappear",
    ),
    "add_object": (
        "add {thing} {where_in}",
        "put {thing} {where_in}",
        "draw {thing} {where_in}",
        "place {thing} {where_in}",
        "insert {thing} {where_in}",
        "paint {thing} {where_in}",
        "there should be {thing} {where_in}",
    ),
    "move_object": (
        "move {obj} {where_to}",
        "shift {obj} {where_to}",
        "slide {obj} {where_to}",
        "drag {obj} {where_to}",
        "relocate {obj} {where_to}",
        "put {obj} {where_in}",
        "place {obj} {where_in}",
    ),
    "change_shape": (
        "turn {obj} into {a_shape}",
        "change {obj} into {a_shape}",
        "make {obj} {a_shape}",
        "transform {obj} into {a_shape}",
        "reshape {obj} into {a_shape}",
        "convert {obj} to {a_shape}",
        "replace {obj} with {thing}",
    ),
}
"""Phrasing templates used by ``train`` and ``test_heldout_combinations``."""

HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour_object": ("give {obj} a {colour} colour", "switch {obj} to {colour}"),
    "recolour_background": ("give it a {colour} background", "switch the background to {colour}"),
    "remove_object": ("wipe away {obj}", "leave out {obj}"),
    "add_object": ("include {thing} {where_in}", "sketch {thing} {where_in}"),
    "move_object": ("bring {obj} {where_to}", "push {obj} {where_to}"),
    "change_shape": ("morph {obj} into {a_shape}", "let {obj} become {a_shape}"),
}
"""Phrasing templates used only by ``test_heldout_phrasings``."""


_CAPTION_WORDS = ("and", "on", "empty")  # the words :func:`caption` adds to the instructions' ones


def vocabulary(captions: bool = False) -> list[str]:
    """Every word the training phrasings can produce (templates, colours, shapes, places), sorted: what a tokenizer
    fitted on the training instructions knows; with ``captions``, also every word of :func:`caption`. Words only in
    :data:`HELDOUT_TEMPLATES` are not in it."""
    words = set(COLOURS) | set(SHAPES) | {BACKGROUND, "a", "an", "the"} | (set(_CAPTION_WORDS) if captions else set())
    for templates in TRAIN_TEMPLATES.values():
        for template in templates:
            words.update(re.findall(r"[a-z]+", re.sub(r"\{[a-z_]+\}", " ", template)))
    for phrase in (*_WHERE_IN.values(), *_WHERE_TO.values()):
        words.update(phrase.split())
    return sorted(words)


_MAX_ATTEMPTS = 2000
_PLACEMENT_ATTEMPTS = 60


@dataclass(frozen=True)
class SceneObject:
    """One shape: centre ``(cx, cy)`` and radius ``r`` in pixels; it lies inside the box ``[cx - r, cx + r]^2``."""

    shape: str
    colour: str
    cx: float
    cy: float
    r: float

    def box(self) -> tuple[float, float, float, float]:
        """Bounding box ``(x0, y0, x1, y1)`` in pixels."""
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "cx": self.cx, "cy": self.cy, "r": self.r}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SceneObject:
        return cls(str(data["shape"]), str(data["colour"]), float(data["cx"]), float(data["cy"]), float(data["r"]))


@dataclass(frozen=True)
class Scene:
    """A background colour and non-overlapping objects on a ``size`` x ``size`` canvas."""

    background: str
    objects: tuple[SceneObject, ...]
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], size: int) -> Scene:
        return cls(str(data["background"]), tuple(SceneObject.from_dict(o) for o in data["objects"]), int(size))


@dataclass
class EditExample:
    """One edit. ``source``/``target``: (H, W, 3) uint8; ``mask``: (H, W) bool, the pixels the edit may change.

    ``metadata`` (JSON-ready) holds: ``version``, ``size``, ``split``, ``edit_type``, ``template``, ``source`` and
    ``target`` scenes (``{"background", "objects": [{"shape", "colour", "cx", "cy", "r"}]}``), ``subject`` (index of
    the edited object in the source scene; None for background and add), ``target_subject`` (its index in the target
    scene; None for background and remove), ``expected_colour`` and ``expected_rgb`` (the colour the edited region must
    have afterwards: the new colour, the object's colour, or the background colour for remove), ``combination`` and
    ``combinations`` (see the module docstring), ``position`` (add/move cell name, else None), ``new_shape``
    (change_shape, else None), ``bbox_before``/``bbox_after`` (pixel box ``[x0, y0, x1, y1)`` of the edited object's
    mask before/after; None where there is none).
    """

    source: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    instruction: str
    edit_type: str
    metadata: dict[str, Any]

    @property
    def source_scene(self) -> Scene:
        return Scene.from_dict(self.metadata["source"], self.metadata["size"])

    @property
    def target_scene(self) -> Scene:
        return Scene.from_dict(self.metadata["target"], self.metadata["size"])

    def to_row(self) -> dict[str, Any]:
        """Dataset row: images as ``{"bytes": PNG, "path": None}``, metadata as a JSON string."""
        return {
            "input_image": {"bytes": _png(self.source), "path": None},
            "edit_prompt": self.instruction,
            "edited_image": {"bytes": _png(self.target), "path": None},
            "mask": {"bytes": _png(self.mask.astype(np.uint8) * 255), "path": None},
            "edit_type": self.edit_type,
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> EditExample:
        """Inverse of :meth:`to_row`; images may be PIL images, ``{"bytes": ...}`` dicts or arrays."""
        metadata = row["metadata"]
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        return cls(
            source=_as_rgb_array(row["input_image"]),
            target=_as_rgb_array(row["edited_image"]),
            mask=_as_mask_array(row["mask"]),
            instruction=str(row["edit_prompt"]),
            edit_type=str(row["edit_type"]),
            metadata=dict(metadata),
        )


# ----------------------------------------------------------------------------------------------------------- drawing


def _polygon_mask(vertices: Sequence[tuple[float, float]], px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Even-odd crossing test of pixel centres against a closed polygon; returns (H, W) bool."""
    inside = np.zeros(np.broadcast_shapes(px.shape, py.shape), dtype=bool)
    n = len(vertices)
    for k in range(n):
        x1, y1 = vertices[k]
        x2, y2 = vertices[(k + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > py) != (y2 > py)
        x_cross = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < x_cross)
    return inside


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Aliased (H, W) = (size, size) bool mask of ``shape`` centred at ``(cx, cy)`` with radius ``r`` (pixels)."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not supported; expected one of {SHAPES}")
    mask = np.zeros((size, size), dtype=bool)
    # Every shape lies in its box [cx - r, cx + r]^2, so only that window of pixel centres is tested.
    x0, x1 = max(0, math.floor(cx - r)), min(size, math.ceil(cx + r) + 1)
    y0, y1 = max(0, math.floor(cy - r)), min(size, math.ceil(cy + r) + 1)
    if x0 >= x1 or y0 >= y1:
        return mask
    px = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5  # (1, w)
    py = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5  # (h, 1)
    dx, dy = px - cx, py - cy
    if shape == "circle":
        window = dx * dx + dy * dy <= r * r
    elif shape == "square":
        window = (np.abs(dx) <= _SQUARE_HALF_SIDE * r) & (np.abs(dy) <= _SQUARE_HALF_SIDE * r)
    elif shape == "diamond":
        window = np.abs(dx) + np.abs(dy) <= r
    else:
        unit = _TRIANGLE if shape == "triangle" else _STAR
        window = _polygon_mask([(cx + r * ux, cy + r * uy) for ux, uy in unit], px, py)
    mask[y0:y1, x0:x1] = window
    return mask


def object_mask(obj: SceneObject | Mapping[str, Any], size: int) -> np.ndarray:
    """(size, size) bool mask of one object (a :class:`SceneObject` or its dict)."""
    if not isinstance(obj, SceneObject):
        obj = SceneObject.from_dict(obj)
    return shape_mask(obj.shape, obj.cx, obj.cy, obj.r, size)


def background_mask(scene: Scene) -> np.ndarray:
    """(H, W) bool: pixels covered by no object."""
    covered = np.zeros((scene.size, scene.size), dtype=bool)
    for obj in scene.objects:
        covered |= object_mask(obj, scene.size)
    return ~covered


def render_scene(scene: Scene) -> np.ndarray:
    """Draw ``scene`` as a (H, W, 3) uint8 image, one palette colour per pixel."""
    image = np.empty((scene.size, scene.size, 3), dtype=np.uint8)
    image[:] = PALETTE[scene.background]
    for obj in scene.objects:
        image[object_mask(obj, scene.size)] = PALETTE[obj.colour]
    return image


def mask_bbox(mask: np.ndarray) -> list[int] | None:
    """Pixel box ``[x0, y0, x1, y1)`` of the True pixels of a (H, W) mask, or None if it is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


# ---------------------------------------------------------------------------------------------------- scene sampling


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _quarter(value: float) -> float:
    # Quarter-pixel values are exact binary fractions, so JSON round trips and redraws are bit-identical.
    return round(value * 4) / 4


def _box_fits(box: tuple[float, float, float, float], others: Iterable[SceneObject], size: int) -> bool:
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 > size or y1 > size:
        return False
    for other in others:
        ox0, oy0, ox1, oy1 = other.box()
        if x0 < ox1 + BOX_GAP and ox0 < x1 + BOX_GAP and y0 < oy1 + BOX_GAP and oy0 < y1 + BOX_GAP:
            return False
    return True


def _random_scene(rng: np.random.Generator, size: int, min_objects: int = 1, max_objects: int = MAX_OBJECTS) -> Scene:
    background = _pick(rng, COLOURS)
    n_objects = int(rng.integers(min_objects, max_objects + 1))
    objects: list[SceneObject] = []
    used = {background}
    for _ in range(n_objects):
        for _ in range(_PLACEMENT_ATTEMPTS):
            r = _quarter(rng.uniform(MIN_RADIUS, MAX_RADIUS) * size)
            cx = _quarter(rng.uniform(r, size - r))
            cy = _quarter(rng.uniform(r, size - r))
            if _box_fits((cx - r, cy - r, cx + r, cy + r), objects, size):
                break
        else:
            break  # crowded: keep fewer objects
        colour = _pick(rng, [c for c in COLOURS if c not in used])
        used.add(colour)
        objects.append(SceneObject(_pick(rng, SHAPES), colour, cx, cy, r))
    return Scene(background, tuple(objects), size)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _name(obj: SceneObject, scene: Scene) -> str:
    same_shape = sum(o.shape == obj.shape for o in scene.objects)
    return f"the {obj.shape}" if same_shape == 1 else f"the {obj.colour} {obj.shape}"


def _thing(shape: str, colour: str) -> str:
    return f"{_article(colour)} {colour} {shape}"


@dataclass(frozen=True)
class _Edit:
    target: Scene
    mask: np.ndarray
    subject: int | None
    target_subject: int | None
    expected_colour: str
    combination: tuple[str, str]
    combinations: frozenset[tuple[str, str]]
    fields: dict[str, str]
    position: str | None = None
    new_shape: str | None = None


def _free_colours(scene: Scene) -> list[str]:
    used = {scene.background, *(o.colour for o in scene.objects)}
    return [c for c in COLOURS if c not in used]


def _edit_recolour_object(rng: np.random.Generator, scene: Scene) -> _Edit | None:
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    colour = _pick(rng, _free_colours(scene))
    objects = list(scene.objects)
    objects[i] = replace(obj, colour=colour)
    return _Edit(
        target=replace(scene, objects=tuple(objects)),
        mask=object_mask(obj, scene.size),
        subject=i,
        target_subject=i,
        expected_colour=colour,
        combination=(obj.shape, colour),
        combinations=frozenset({(obj.shape, obj.colour), (obj.shape, colour)}),
        fields={"obj": _name(obj, scene), "colour": colour},
    )


def _edit_recolour_background(rng: np.random.Generator, scene: Scene) -> _Edit | None:
    colour = _pick(rng, _free_colours(scene))
    return _Edit(
        target=replace(scene, background=colour),
        mask=background_mask(scene),
        subject=None,
        target_subject=None,
        expected_colour=colour,
        combination=(BACKGROUND, colour),
        combinations=frozenset({(BACKGROUND, scene.background), (BACKGROUND, colour)}),
        fields={"colour": colour},
    )


def _edit_remove_object(rng: np.random.Generator, scene: Scene) -> _Edit | None:
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    return _Edit(
        target=replace(scene, objects=scene.objects[:i] + scene.objects[i + 1 :]),
        mask=object_mask(obj, scene.size),
        subject=i,
        target_subject=None,
        expected_colour=scene.background,
        combination=(obj.shape, obj.colour),
        combinations=frozenset({(obj.shape, obj.colour)}),
        fields={"obj": _name(obj, scene)},
    )


def _edit_add_object(rng: np.random.Generator, scene: Scene) -> _Edit | None:
    if len(scene.objects) >= MAX_OBJECTS_AFTER_ADD:
        return None
    r = _quarter(ADD_RADIUS * scene.size)
    cells = []
    for name, (fx, fy) in POSITIONS.items():
        cx, cy = _quarter(fx * scene.size), _quarter(fy * scene.size)
        if _box_fits((cx - r, cy - r, cx + r, cy + r), scene.objects, scene.size):
            cells.append((name, cx, cy))
    if not cells:
        return None
    name, cx, cy = _pick(rng, cells)
    shape, colour = _pick(rng, SHAPES), _pick(rng, _free_colours(scene))
    new = SceneObject(shape, colour, cx, cy, r)
    return _Edit(
        target=replace(scene, objects=scene.objects + (new,)),
        mask=object_mask(new, scene.size),
        subject=None,
        target_subject=len(scene.objects),
        expected_colour=colour,
        combination=(shape, colour),
        combinations=frozenset({(shape, colour)}),
        fields={"thing": _thing(shape, colour), "where_in": _WHERE_IN[name]},
        position=name,
    )


def _edit_move_object(rng: np.random.Generator, scene: Scene) -> _Edit | None:
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    cells = []
    for name, (fx, fy) in POSITIONS.items():
        cx, cy = _quarter(fx * scene.size), _quarter(fy * scene.size)
        # The other objects and the object's own old box must all be clear: the object leaves its place entirely.
        if _box_fits((cx - obj.r, cy - obj.r, cx + obj.r, cy + obj.r), scene.objects, scene.size):
            cells.append((name, cx, cy))
    if not cells:
        return None
    name, cx, cy = _pick(rng, cells)
    moved = replace(obj, cx=cx, cy=cy)
    objects = list(scene.objects)
    objects[i] = moved
    return _Edit(
        target=replace(scene, objects=tuple(objects)),
        mask=object_mask(obj, scene.size) | object_mask(moved, scene.size),
        subject=i,
        target_subject=i,
        expected_colour=obj.colour,
        combination=(obj.shape, obj.colour),
        combinations=frozenset({(obj.shape, obj.colour)}),
        fields={"obj": _name(obj, scene), "where_to": _WHERE_TO[name], "where_in": _WHERE_IN[name]},
        position=name,
    )


def _edit_change_shape(rng: np.random.Generator, scene: Scene) -> _Edit | None:
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    old = object_mask(obj, scene.size)
    options = []
    for shape in SHAPES:
        if shape == obj.shape:
            continue
        new = shape_mask(shape, obj.cx, obj.cy, obj.r, scene.size)
        if max(int((new & ~old).sum()), int((old & ~new).sum())) >= MIN_CHANGED_PIXELS:
            options.append((shape, new))
    if not options:
        return None
    shape, new = _pick(rng, options)
    objects = list(scene.objects)
    objects[i] = replace(obj, shape=shape)
    return _Edit(
        target=replace(scene, objects=tuple(objects)),
        mask=old | new,
        subject=i,
        target_subject=i,
        expected_colour=obj.colour,
        combination=(shape, obj.colour),
        combinations=frozenset({(obj.shape, obj.colour), (shape, obj.colour)}),
        fields={"obj": _name(obj, scene), "a_shape": f"{_article(shape)} {shape}", "thing": _thing(shape, obj.colour)},
        new_shape=shape,
    )


_EDITS = {
    "recolour_object": _edit_recolour_object,
    "recolour_background": _edit_recolour_background,
    "remove_object": _edit_remove_object,
    "add_object": _edit_add_object,
    "move_object": _edit_move_object,
    "change_shape": _edit_change_shape,
}


# ------------------------------------------------------------------------------------------------- examples, splits


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {tuple(choices)}")


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size={size!r} is too small; expected an int >= {MIN_SIZE}")


def _normalise_heldout(heldout: Iterable[Sequence[str]] | None) -> frozenset[tuple[str, str]]:
    if heldout is None:
        return HELDOUT_COMBINATIONS
    pairs = frozenset((str(s), str(c)) for s, c in heldout)
    for shape, colour in pairs:
        _check_choice("heldout_combinations shape", shape, SHAPES + (BACKGROUND,))
        _check_choice("heldout_combinations colour", colour, COLOURS)
    return pairs


def edit_combinations(example: EditExample | Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    """The (shape, colour) combinations an example's edit names or implies (its subject before and after).

    ``example`` is an :class:`EditExample` or its ``metadata`` dict.
    """
    meta = example.metadata if isinstance(example, EditExample) else example
    return frozenset((str(s), str(c)) for s, c in meta["combinations"])


def target_combination(example: EditExample | Mapping[str, Any]) -> tuple[str, str]:
    """The (shape, colour) of the edit's subject after the edit (``("background", c)`` for the background)."""
    meta = example.metadata if isinstance(example, EditExample) else example
    shape, colour = meta["combination"]
    return (str(shape), str(colour))


def generate_example(
    rng: np.random.Generator,
    split: str = "train",
    *,
    edit_type: str | None = None,
    size: int = 64,
    heldout_combinations: Iterable[Sequence[str]] | None = None,
) -> EditExample:
    """Draw one example of ``split`` (see the module docstring) from ``rng``; ``edit_type=None`` picks one at random.

    ``heldout_combinations`` defaults to :data:`HELDOUT_COMBINATIONS`. Returns images of shape (size, size, 3).
    """
    _check_choice("split", split, SPLITS)
    _check_size(size)
    if edit_type is None:
        edit_type = _pick(rng, EDIT_TYPES)
    _check_choice("edit_type", edit_type, EDIT_TYPES)
    heldout = _normalise_heldout(heldout_combinations)
    if split == "test_heldout_combinations":
        wanted_background = edit_type == "recolour_background"
        if not any((s == BACKGROUND) == wanted_background for s, _ in heldout):
            raise ValueError(
                f"heldout_combinations={sorted(heldout)!r} has no pair for edit_type={edit_type!r}; expected a "
                f"{'(background, colour)' if wanted_background else '(shape, colour)'} pair"
            )
    for _ in range(_MAX_ATTEMPTS):
        scene = _random_scene(rng, size)
        edit = _EDITS[edit_type](rng, scene)
        if edit is None:
            continue
        if split == "test_heldout_combinations":
            if edit.combination in heldout:
                break
        elif not edit.combinations & heldout:
            break
    else:
        raise RuntimeError(f"no {edit_type} example for split={split!r} after {_MAX_ATTEMPTS} scenes")
    templates = HELDOUT_TEMPLATES if split == "test_heldout_phrasings" else TRAIN_TEMPLATES
    template = _pick(rng, templates[edit_type])
    source_mask = None if edit.subject is None else object_mask(scene.objects[edit.subject], size)
    target_mask = None if edit.target_subject is None else object_mask(edit.target.objects[edit.target_subject], size)
    metadata = {
        "version": GENERATOR_VERSION,
        "size": size,
        "split": split,
        "edit_type": edit_type,
        "template": template,
        "source": scene.to_dict(),
        "target": edit.target.to_dict(),
        "subject": edit.subject,
        "target_subject": edit.target_subject,
        "expected_colour": edit.expected_colour,
        "expected_rgb": list(PALETTE[edit.expected_colour]),
        "combination": list(edit.combination),
        "combinations": sorted(list(c) for c in edit.combinations),
        "position": edit.position,
        "new_shape": edit.new_shape,
        "bbox_before": mask_bbox(source_mask) if source_mask is not None else None,
        "bbox_after": mask_bbox(target_mask) if target_mask is not None else None,
    }
    return EditExample(
        source=render_scene(scene),
        target=render_scene(edit.target),
        mask=edit.mask,
        instruction=template.format(**edit.fields),
        edit_type=edit_type,
        metadata=metadata,
    )


def _example_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} is invalid; expected an int >= 0")


def iter_split(
    split: str,
    n: int,
    seed: int,
    *,
    size: int = 64,
    edit_types: Sequence[str] = EDIT_TYPES,
    heldout_combinations: Iterable[Sequence[str]] | None = None,
) -> Iterator[EditExample]:
    """Yield ``n`` examples of ``split``; edit types cycle through ``edit_types``; example ``i`` depends only on
    ``(seed, split, i)``."""
    _check_choice("split", split, SPLITS)
    _check_count("n", n)
    _check_count("seed", seed)
    if not edit_types:
        raise ValueError(f"edit_types={edit_types!r} is empty; expected a subset of {EDIT_TYPES}")
    for edit_type in edit_types:
        _check_choice("edit_types item", edit_type, EDIT_TYPES)
    heldout = _normalise_heldout(heldout_combinations)
    for i in range(n):
        yield generate_example(
            _example_rng(seed, _SPLIT_INDEX[split], i),
            split,
            edit_type=edit_types[i % len(edit_types)],
            size=size,
            heldout_combinations=heldout,
        )


def generate_split(
    split: str,
    n: int,
    seed: int,
    *,
    size: int = 64,
    edit_types: Sequence[str] = EDIT_TYPES,
    heldout_combinations: Iterable[Sequence[str]] | None = None,
) -> list[EditExample]:
    """List form of :func:`iter_split` (keeps every image in memory: use :func:`iter_split` for large ``n``)."""
    return list(
        iter_split(split, n, seed, size=size, edit_types=edit_types, heldout_combinations=heldout_combinations)
    )


def scene_images(n: int, seed: int, size: int = 64) -> np.ndarray:
    """``n`` varied scenes with 0-4 objects as a (n, size, size, 3) uint8 array (e.g. to train an autoencoder).

    They come from their own random stream, not from any split's examples.
    """
    _check_count("n", n)
    _check_count("seed", seed)
    _check_size(size)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        images[i] = render_scene(random_scene(seed, i, size))
    return images


def random_scene(seed: int, index: int, size: int = 64) -> Scene:
    """Scene ``index`` of :func:`scene_images`' stream ``seed`` (0-4 objects), e.g. to caption it."""
    for name, value in (("seed", seed), ("index", index)):
        _check_count(name, value)
    _check_size(size)
    rng = _example_rng(seed, _SCENE_STREAM, index)
    return _random_scene(rng, size, min_objects=0, max_objects=MAX_OBJECTS_AFTER_ADD)


def nearest_cell(obj: SceneObject, size: int) -> str:
    """The name of the 3x3 grid cell (:data:`POSITIONS`) whose centre is nearest the object's centre."""
    return min(POSITIONS, key=lambda name: (POSITIONS[name][0] * size - obj.cx) ** 2
               + (POSITIONS[name][1] * size - obj.cy) ** 2)


def caption(scene: Scene, positions: bool = False) -> str:
    """A caption of ``scene``: "a red circle and a blue star on a white background"; with ``positions`` each object
    is followed by its grid cell: "a red circle top left and a blue star centre on a white background"."""
    things = [_thing(o.shape, o.colour) + (f" {nearest_cell(o, scene.size)}" if positions else "")
              for o in scene.objects]
    return list_caption(things, scene.background)


def list_caption(things: Sequence[str], background: str) -> str:
    """ "a, b and c on a <background> background", or "an empty <background> background"."""
    if not things:
        return f"an empty {background} background"
    listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    return f"{listed} on {_article(background)} {background} background"


def _scene_key(meta: Mapping[str, Any]) -> str:
    text = json.dumps([meta["size"], meta["source"], meta["target"]], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()


def split_violations(
    splits: Mapping[str, Iterable[EditExample | Mapping[str, Any]]],
    heldout_combinations: Iterable[Sequence[str]] | None = None,
) -> list[str]:
    """Check the split rules of the module docstring; returns one line per violation (empty: all good).

    ``splits`` maps split names to examples or their ``metadata`` dicts. Also checks that no (source, target) scene
    pair occurs in two splits.
    """
    heldout = _normalise_heldout(heldout_combinations)
    problems: list[str] = []
    owner: dict[str, str] = {}
    for split, examples in splits.items():
        _check_choice("splits key", split, SPLITS)
        for i, example in enumerate(examples):
            meta = example.metadata if isinstance(example, EditExample) else example
            where = f"{split}[{i}]"
            template = meta["template"]
            edit_type = meta["edit_type"]
            if split == "test_heldout_phrasings":
                if template not in HELDOUT_TEMPLATES[edit_type]:
                    problems.append(f"{where}: template {template!r} is not a held-out phrasing")
            elif template not in TRAIN_TEMPLATES[edit_type]:
                problems.append(f"{where}: template {template!r} is not a training phrasing")
            if split == "test_heldout_combinations":
                if target_combination(meta) not in heldout:
                    problems.append(f"{where}: target combination {target_combination(meta)} is not held out")
            else:
                leaked = sorted(edit_combinations(meta) & heldout)
                if leaked:
                    problems.append(f"{where}: edit uses held-out combinations {leaked}")
            key = _scene_key(meta)
            if owner.setdefault(key, split) != split:
                problems.append(f"{where}: same scenes as an example of {owner[key]}")
    return problems


def verify_splits(
    splits: Mapping[str, Iterable[EditExample | Mapping[str, Any]]],
    heldout_combinations: Iterable[Sequence[str]] | None = None,
) -> None:
    """Raise ValueError naming the first violations found by :func:`split_violations`."""
    problems = split_violations(splits, heldout_combinations)
    if problems:
        raise ValueError(f"splits violate the held-out rules ({len(problems)} problems); first: {problems[:3]}")


# ------------------------------------------------------------------------------------------------------------ writer


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _as_pil(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, Mapping) and value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    return Image.fromarray(np.asarray(value))


def _as_rgb_array(value: Any) -> np.ndarray:
    return np.asarray(_as_pil(value).convert("RGB"), dtype=np.uint8)


def _as_mask_array(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.dtype == bool:
        return value
    return np.asarray(_as_pil(value).convert("L")) > 127


def _features() -> Any:
    import datasets

    return datasets.Features(
        {
            "input_image": datasets.Image(),
            "edit_prompt": datasets.Value("string"),
            "edited_image": datasets.Image(),
            "mask": datasets.Image(),
            "edit_type": datasets.Value("string"),
            "metadata": datasets.Value("string"),
        }
    )


PARAMS_FILE = "params.json"
_FORMAT = "ip2p-synthetic-edits"


def _dataset_params(
    n_train: int, n_test: int, seed: int, size: int, heldout: frozenset[tuple[str, str]], rows_per_shard: int
) -> dict[str, Any]:
    params = {
        "format": _FORMAT,
        "generator_version": GENERATOR_VERSION,
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "size": size,
        "heldout_combinations": sorted(list(p) for p in heldout),
        "edit_types": list(EDIT_TYPES),
        "rows_per_shard": rows_per_shard,
    }
    return json.loads(json.dumps(params))


def _read_info(out_dir: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((out_dir / PARAMS_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    if not isinstance(info, dict) or info.get("params", {}).get("format") != _FORMAT:
        return None
    return info


def dataset_files(out_dir: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """Split name -> parquet shard paths of a dataset written by :func:`write_dataset`."""
    out = Path(out_dir)
    info = _read_info(out)
    if info is None:
        raise FileNotFoundError(f"out_dir={str(out)!r} has no readable {PARAMS_FILE}; expected a write_dataset folder")
    return {split: [out / f for f in files] for split, files in info["files"].items()}


def _is_complete(out_dir: Path, params: Mapping[str, Any]) -> bool:
    info = _read_info(out_dir)
    if info is None or info["params"] != params:
        return False
    return all((out_dir / f).is_file() for files in info["files"].values() for f in files)


def _dataset_card(files: Mapping[str, Sequence[str]], params: Mapping[str, Any]) -> str:
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in files:
        lines += [f"  - split: {split}", f"    path: data/{split}-*.parquet"]
    lines += [
        "---",
        "# ip2p synthetic edits",
        "",
        "Written by `ip2p.synthetic.write_dataset`; see that module's docstring for scenes, edits, masks and splits.",
        f"Parameters: `{json.dumps(params, sort_keys=True)}`.",
        "",
    ]
    return "\n".join(lines)


def write_dataset(
    out_dir: str | os.PathLike[str],
    n_train: int,
    n_test: int,
    seed: int,
    size: int = 64,
    *,
    heldout_combinations: Iterable[Sequence[str]] | None = None,
    rows_per_shard: int = 2000,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``train`` (``n_train`` >= 1 rows) and both test splits (``n_test`` >= 1 rows each) as parquet shards under
    ``out_dir`` (layout in the module docstring) and return ``out_dir``.

    The data is written to a temporary sibling folder and renamed into place, so ``out_dir`` is never half written.
    If ``out_dir`` already holds a complete dataset with the same parameters it is kept as is (unless ``force``); one
    with other parameters is replaced. A non-empty ``out_dir`` that is not such a dataset raises FileExistsError.
    """
    # Every split gets rows: `datasets` cannot read an empty parquet shard.
    for name, value in (("n_train", n_train), ("n_test", n_test), ("rows_per_shard", rows_per_shard)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid; expected an int >= 1")
    _check_count("seed", seed)
    _check_size(size)
    heldout = _normalise_heldout(heldout_combinations)
    params = _dataset_params(n_train, n_test, seed, size, heldout, rows_per_shard)
    out = Path(out_dir)
    atomic.remove_stale(out)
    if out.exists():
        if not out.is_dir() or (_read_info(out) is None and any(out.iterdir())):
            raise FileExistsError(
                f"out_dir={str(out)!r} exists and is not an ip2p synthetic dataset; expected a new or empty folder"
            )
        if not force and _is_complete(out, params):
            logger.info("synthetic dataset with the same parameters found in %s; not regenerating", out)
            return out

    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    features = _features()
    counts = {"train": n_train, "test_heldout_combinations": n_test, "test_heldout_phrasings": n_test}
    tmp = atomic.sibling(out)
    try:
        (tmp / "data").mkdir(parents=True)
        files: dict[str, list[str]] = {}
        with tqdm(total=sum(counts.values()), desc="synthetic edits", unit="ex", disable=not progress) as bar:
            for split, n in counts.items():
                n_shards = max(1, math.ceil(n / rows_per_shard))
                files[split] = []
                examples = iter_split(split, n, seed, size=size, heldout_combinations=heldout)
                for shard in range(n_shards):
                    rows = []
                    for _ in range(min(rows_per_shard, n - shard * rows_per_shard)):
                        rows.append(next(examples).to_row())
                        bar.update(1)
                    columns = {name: [row[name] for row in rows] for name in features}
                    name = f"data/{split}-{shard:05d}-of-{n_shards:05d}.parquet"
                    # The schema carries the `datasets` features, so readers decode the image columns.
                    table = pa.Table.from_pydict(features.encode_batch(columns), schema=features.arrow_schema)
                    pq.write_table(table, str(tmp / name))
                    files[split].append(name)
        (tmp / "README.md").write_text(_dataset_card(files, params))
        info = {"params": params, "num_rows": counts, "files": files}
        (tmp / PARAMS_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")  # last: marks completion
        atomic.fsync_tree(tmp)  # a crash after the rename must not leave empty shards under a complete params.json
        _install(tmp, out, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote synthetic dataset to %s (%s)", out, counts)
    return out


def _install(tmp: Path, out: Path, params: Mapping[str, Any]) -> None:
    """Move the finished ``tmp`` folder to ``out``; ``out`` is at every moment absent, old and whole, or new and
    whole."""
    old = None
    if out.exists() and any(out.iterdir()):
        old = atomic.sibling(out, "old")
        os.rename(out, old)
    try:
        os.rename(tmp, out)  # an empty ``out`` folder is replaced too (POSIX rename semantics)
    except OSError:
        if not _is_complete(out, params):  # a concurrent writer of the same parameters may have won the race
            if old is not None and not os.path.lexists(out):
                os.rename(old, out)  # the previous dataset goes back: a failed write loses nothing
                old = None
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ip2p.synthetic OUT --n-train N --n-test M --seed S [--size 64]``."""
    parser = argparse.ArgumentParser(prog="python -m ip2p.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output folder (parquet shards per split + params.json)")
    parser.add_argument("--n-train", type=int, default=20000, help="training examples (default 20000)")
    parser.add_argument("--n-test", type=int, default=300, help="examples in each test split (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help=f"image side in pixels (>= {MIN_SIZE}, default 64)")
    parser.add_argument("--rows-per-shard", type=int, default=2000)
    parser.add_argument("--force", action="store_true", help="regenerate even if an identical dataset exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = write_dataset(
            args.out,
            args.n_train,
            args.n_test,
            args.seed,
            args.size,
            rows_per_shard=args.rows_per_shard,
            force=args.force,
            progress=True,
        )
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    except OSError as error:  # e.g. OUT below a file, or on a read-only or full disk
        parser.error(f"cannot write the dataset to {args.out!r}: {error.strerror or error}; pass a folder you can "
                     "write to")
    logger.info("dataset: %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


BUILTIN_PREFIX = "synthetic"


def cache_root() -> Path:
    """Where built-in datasets are materialised: ``$IP2P_CACHE`` or ``~/.cache/ip2p``."""
    return Path(os.environ.get("IP2P_CACHE", Path.home() / ".cache" / "ip2p"))


def builtin_dataset(spec: str) -> Path:
    """Materialise the built-in dataset named by ``spec`` (once) and return its folder.

    ``spec`` is ``synthetic`` or ``synthetic:n=2000,size=64,seed=0`` (keys optional; ``n`` training rows, a tenth as
    many in each test split). Lets a config say ``data.path: synthetic`` with nothing to download or prepare.
    """
    name, _, args = spec.partition(":")
    if name != BUILTIN_PREFIX:
        raise ValueError(f"{spec!r} is not a built-in dataset; expected 'synthetic' or 'synthetic:n=...,size=...'")
    params = {"n": 2000, "size": 64, "seed": 0}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, _, value = item.partition("=")
        if key not in params or not value.strip().isdigit():
            raise ValueError(f"{spec!r}: bad option {item!r}; expected n=INT, size=INT or seed=INT")
        params[key] = int(value)
    folder = cache_root() / f"synthetic-n{params['n']}-s{params['size']}-seed{params['seed']}-v{GENERATOR_VERSION}"
    return write_dataset(folder, n_train=params["n"], n_test=max(1, params["n"] // 10), seed=params["seed"],
                         size=params["size"])
