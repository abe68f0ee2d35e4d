"""Which dataset columns hold the source image, the instruction and the edited image.

Column names are configurable (`data.source_column`, `data.instruction_column`, `data.target_column`); left
unset they are detected from a short list of names used by the public InstructPix2Pix-style datasets
(`timbrooks/instructpix2pix-clip-filtered`: original_image / edit_prompt / edited_image,
`fusing/instructpix2pix-1000-samples`: input_image / edit_prompt / edited_image).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "INSTRUCTION_CANDIDATES",
    "SOURCE_CANDIDATES",
    "TARGET_CANDIDATES",
    "ColumnMap",
    "resolve_columns",
]

SOURCE_CANDIDATES: tuple[str, ...] = ("input_image", "original_image", "source_image", "image", "input")
INSTRUCTION_CANDIDATES: tuple[str, ...] = ("edit_prompt", "instruction", "edit", "prompt", "text")
TARGET_CANDIDATES: tuple[str, ...] = ("edited_image", "output_image", "target_image", "edited", "output")


@dataclass(frozen=True)
class ColumnMap:
    """Dataset column names of the three fields; None means detect from the candidate names."""

    source: str | None = None
    instruction: str | None = None
    target: str | None = None


# (field, what it holds, config key, candidates)
_FIELDS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("source", "source image", "data.source_column", SOURCE_CANDIDATES),
    ("instruction", "instruction", "data.instruction_column", INSTRUCTION_CANDIDATES),
    ("target", "edited image", "data.target_column", TARGET_CANDIDATES),
)


def resolve_columns(columns: ColumnMap, available: Sequence[str], where: str) -> ColumnMap:
    """Return `columns` with every field set to a column of `available`; `where` names the dataset in errors.

    An explicitly named column must exist; an unset one is detected when exactly one candidate is present.
    Raises `ValueError` listing the dataset's columns and the config key to set.
    """
    available = list(available)
    resolved: dict[str, str] = {}
    for name, meaning, key, candidates in _FIELDS:
        chosen = getattr(columns, name)
        if chosen is not None:
            if chosen not in available:
                raise ValueError(
                    f"{key}={chosen!r} is not a column of {where}; its columns are {available}"
                )
            resolved[name] = chosen
            continue
        found = [column for column in candidates if column in available]
        if len(found) == 1:
            resolved[name] = found[0]
        elif not found:
            raise ValueError(
                f"cannot find the {meaning} column of {where}: none of {list(candidates)} among its columns "
                f"{available}; set {key}"
            )
        else:
            raise ValueError(
                f"ambiguous {meaning} column of {where}: {found} all match; its columns are {available}; "
                f"set {key}"
            )
    # One column for two fields would train every record to copy its source (or to read an image as text).
    for (first, _, first_key, _), (second, _, second_key, _) in itertools.combinations(_FIELDS, 2):
        if resolved[first] == resolved[second]:
            raise ValueError(
                f"{first_key} and {second_key} both name the column {resolved[first]!r} of {where}; each field "
                f"needs its own column; its columns are {available}"
            )
    return ColumnMap(**resolved)
