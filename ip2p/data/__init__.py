"""The training data layer: (source image, instruction, edited image) triples from any source to batches.

- `records`: `open_records(path)` reads raw, undecoded records from a hub id, a save_to_disk folder, parquet,
  json lines, an imagefolder or the original InstructPix2Pix `seeds.json` layout, map-style or streaming.
- `columns`: `ColumnMap`, configurable column names with detection.
- `decode`: `decode_image` / `decode_instruction`, raising `BadRecord` for anything unusable.
- `augment`: `paired_augment`, one random resize / crop / flip applied identically to source and target.
- `seeding`: `example_generator(seed, index, purpose)`, the per-example random streams.
- `batches`: `EditBatches`, the deterministic, resumable, distributed batch stream, and `make_dataloader`.
"""

from .augment import AugmentConfig, paired_augment
from .batches import BadRecordTally, EditBatches, EditDataLoader, make_dataloader
from .columns import INSTRUCTION_CANDIDATES, SOURCE_CANDIDATES, TARGET_CANDIDATES, ColumnMap, resolve_columns
from .decode import BadRecord, decode_image, decode_instruction
from .records import ACCEPTED_FORMATS, Records, open_records
from .seeding import Purpose, example_generator, mix_seed

__all__ = [
    "ACCEPTED_FORMATS",
    "INSTRUCTION_CANDIDATES",
    "SOURCE_CANDIDATES",
    "TARGET_CANDIDATES",
    "AugmentConfig",
    "BadRecord",
    "BadRecordTally",
    "ColumnMap",
    "EditBatches",
    "EditDataLoader",
    "Purpose",
    "Records",
    "decode_image",
    "decode_instruction",
    "example_generator",
    "make_dataloader",
    "mix_seed",
    "open_records",
    "paired_augment",
    "resolve_columns",
]
