"""Raw (source, instruction, target) records from any dataset format, read without decoding images.

`open_records(path)` accepts:

- a hub dataset id (`owner/name`): `datasets.load_dataset(id, split=..., streaming=...)`; where that fails
  (offline), a copy in the local hub cache (`huggingface-cli download`) is read as a folder;
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`: `datasets.load_from_disk`;
- a folder of `.parquet` files (splits from file and folder names, as on the hub: `data/train-*.parquet`,
  `test.parquet`, ...), a glob of them, or one file;
- a `.jsonl` / `.json` or `.csv` file, folder or glob; image columns may hold paths relative to the file's folder
  (for a folder or a glob of several folders: relative to the folder given / the matches' common parent);
- an imagefolder: a folder with `metadata.jsonl` (or `.csv` / `.parquet`, in the split's subfolder or at the top)
  naming image files. Each `<name>_file_name` column becomes an image column `<name>` (`file_name`: `image`), as in
  datasets' imagefolder, e.g. `input_image_file_name` and `edited_image_file_name`; these and plain path columns
  are relative to the metadata file's folder (absolute paths and `..` are allowed). Without a metadata file at the
  top or in the split's subfolder, metadata files in subfolders (`shard-0/metadata.jsonl`, ...; split by their
  paths' words as on the hub) are read one after another in sorted order, each naming images beside it;
- the original InstructPix2Pix release: a folder with `seeds.json` = `[[dir, [seed, ...]], ...]`,
  `dir/prompt.json` (key `edit`) and images `dir/{seed}_0.jpg` (source), `dir/{seed}_1.jpg` (edited).

A single file, a glob and a single saved `Dataset` hold one split and are returned whatever `split` asks for:
the path itself says which data to use. Folders, `DatasetDict`s and hub ids hold named splits and `split`
picks one ("val", "valid" and "dev" also find "validation").

Records are raw: image values stay as stored (bytes, `{"bytes", "path"}` dicts, path strings, PIL images) and
are decoded by `ip2p.data.decode_image` only for the rows a process trains on. A record whose metadata is
already known to be unusable (e.g. an unreadable `prompt.json`) carries an `"error"` key with the reason.

Map-style versus streaming. Map-style records (`streaming=False`) support random access (`get`), which gives
exact shuffling and O(1) resume. `load_dataset` (hub ids, parquet, json, imagefolder) first converts the data
into an Arrow cache (`cache_dir`, default `~/.cache/huggingface/datasets`): a full copy on disk. For data
larger than the disk, use `streaming=True`: rows are read from the files (or the hub) as they are consumed and
never materialised. Saved datasets and `seeds.json` folders are read in place in both modes.

Cost of resume in streaming mode. Resuming at position P means finding record P of the stream:

- local parquet: whole files are skipped using the row counts in their footers; only the rows of the file
  holding P that come before it are read (and not decoded);
- save_to_disk folders and `seeds.json` folders: O(1) (the data is random access anyway);
- hub ids and json lines: the first P rows are read again (from disk, or downloaded again from the hub) and
  discarded without decoding their images; for a hub set this is network traffic proportional to P.

`EditBatches` adds the shuffle buffer's cost on top (it replays the current epoch from its start).
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import glob
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .columns import ColumnMap, resolve_columns

logger = logging.getLogger(__name__)

__all__ = ["ACCEPTED_FORMATS", "Records", "open_records"]

ACCEPTED_FORMATS = (
    "a hub dataset id (owner/name), a save_to_disk folder, a .parquet file, folder or glob, a .jsonl/.json/.csv "
    "file, folder or glob, an imagefolder with metadata.jsonl, an InstructPix2Pix folder with seeds.json, or the "
    "built-in 'synthetic' (synthetic:n=2000,size=64,seed=0)"
)

# Rows per Arrow batch read from a dataset: large enough to amortise Arrow -> Python conversion, small enough
# that a batch of undecoded images (~1 MB each in the clip-filtered set) stays modest in RAM.
_READ_BATCH = 32

_PARQUET_EXT = (".parquet",)
_JSON_EXT = (".jsonl", ".json")
_CSV_EXT = (".csv",)
_METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
# The original code's split fractions and its float expressions (SPEC section 5, orig edit_dataset.py).
_SEEDS_SPLITS = (0.9, 0.05, 0.05)


class Records:
    """Raw records of one split; images undecoded. Map-style when `streaming` is False.

    Attributes: `num_records` (None for a stream of unknown length), `streaming`, `columns` (the dataset
    columns read, for messages) and `description` (what was opened).
    """

    num_records: int | None
    streaming: bool
    columns: ColumnMap
    description: str

    def __init__(self, *, num_records: int | None, streaming: bool, columns: ColumnMap, description: str,
                 base_dir: str | None) -> None:
        self.num_records = num_records
        self.streaming = streaming
        self.columns = columns
        self.description = description
        self._base_dir = base_dir

    def __repr__(self) -> str:
        kind = "streaming" if self.streaming else "map-style"
        return f"Records({self.description}, {kind}, num_records={self.num_records})"

    def get(self, i: int) -> dict[str, Any]:
        """Record `i` as `{"source", "instruction", "target"}` (raw values); map-style records only."""
        raise TypeError(f"get() needs map-style records, but {self.description} is streaming; use iterate()")

    def iterate(self, start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position, raw record) pairs from position `start` on, in stored order; skipped rows are not decoded."""
        raise NotImplementedError

    def count(self) -> int:
        """The number of records; for a stream of unknown length, one pass over it that decodes nothing."""
        if self.num_records is None:
            self.num_records = sum(1 for _ in self.iterate(0))
        return self.num_records

    def _raw(self, row: dict[str, Any]) -> dict[str, Any]:
        columns = self.columns
        return {
            "source": self._resolve(row.get(columns.source)),
            "instruction": row.get(columns.instruction),
            "target": self._resolve(row.get(columns.target)),
        }

    def _resolve(self, value: Any) -> Any:
        """Make relative image paths absolute against the dataset's folder (json lines, plain metadata)."""
        if self._base_dir is None:
            return value
        if isinstance(value, str):
            return _join(self._base_dir, value)
        if isinstance(value, dict) and value.get("bytes") is None and isinstance(value.get("path"), str):
            return {**value, "path": _join(self._base_dir, value["path"])}
        return value


def _join(base: str, path: str) -> str:
    if not path or "://" in path or os.path.isabs(path):
        return path
    return os.path.join(base, path)


class _TableRecords(Records):
    """Records over an in-place Arrow table (a map-style `datasets.Dataset`); random access, O(1) skips."""

    def __init__(self, dataset: Any, *, columns: ColumnMap, streaming: bool, description: str,
                 base_dir: str | None) -> None:
        super().__init__(num_records=len(dataset), streaming=streaming, columns=columns,
                         description=description, base_dir=base_dir)
        # Arrow formatting returns rows exactly as stored: no Image-feature decoding, no copies of other columns.
        self._rows = dataset.select_columns(_unique(columns)).with_format("arrow")

    def get(self, i: int) -> dict[str, Any]:
        if self.streaming:
            return super().get(i)
        if not 0 <= i < self.num_records:
            raise IndexError(f"record index {i} is out of range for {self.num_records} records")
        return self._raw(_pylist(self._rows[i])[0])

    def iterate(self, start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        for first in range(max(0, start), self.num_records, _READ_BATCH):
            for offset, row in enumerate(_pylist(self._rows[first:first + _READ_BATCH])):
                yield first + offset, self._raw(row)


class _DatasetStream:
    """Arrow batches of a `datasets.IterableDataset` from row `start` on (datasets' skip reads, not decodes)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __call__(self, start: int) -> Iterable[pa.Table]:
        dataset = self.dataset.skip(start) if start > 0 else self.dataset
        # `.iter()`, unlike `iter(dataset)`, does not split shards among DataLoader workers: every worker must
        # see the whole stream so it can pick its own steps' rows (EditBatches).
        return dataset.iter(batch_size=_READ_BATCH)


class _ParquetStream:
    """Arrow batches of local parquet files from row `start` on, skipping whole files by their footer counts."""

    def __init__(self, files: list[str], row_counts: list[int], column_names: list[str],
                 cache_dir: str | None) -> None:
        self.files = files
        self.starts = [0]
        for count in row_counts:
            self.starts.append(self.starts[-1] + count)
        self.column_names = column_names
        self.cache_dir = cache_dir

    def __call__(self, start: int) -> Iterable[pa.Table]:
        first = bisect.bisect_right(self.starts, max(0, start)) - 1
        if first >= len(self.files):
            return iter(())
        dataset = _load_dataset("parquet", data_files={"train": self.files[first:]}, split="train",
                                streaming=True, columns=self.column_names, cache_dir=self.cache_dir)
        return _DatasetStream(dataset.with_format("arrow"))(start - self.starts[first])


class _StreamRecords(Records):
    """Records read in order from a stream opener: `opener(start)` yields Arrow tables from row `start` on."""

    def __init__(self, opener: Any, *, num_records: int | None, columns: ColumnMap, description: str,
                 base_dir: str | None) -> None:
        super().__init__(num_records=num_records, streaming=True, columns=columns, description=description,
                         base_dir=base_dir)
        self._opener = opener

    def iterate(self, start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        position = max(0, start)
        with _reading(self.description):
            for table in self._opener(position):
                for row in _pylist(table):
                    yield position, self._raw(row)
                    position += 1
        if self.num_records is None and position > max(0, start):
            self.num_records = position  # the stream ended: its length is now known

    def count(self) -> int:
        if self.num_records is None:
            # Count Arrow rows without converting them to Python objects.
            self.num_records = sum(table.num_rows for table in self._opener(0))
        return self.num_records


class _SeedsRecords(Records):
    """The original InstructPix2Pix layout; one record per (prompt folder, seed) pair.

    The original code draws one seed at random per prompt folder each time a folder is visited, so its epoch
    is one image pair per prompt; here every pair is a record (as in the hub copy of the dataset, 313,010 rows),
    which keeps records deterministic. The split is by prompt folder, so no prompt is in two splits.
    """

    def __init__(self, root: str, *, split: str, streaming: bool) -> None:
        seeds_path = os.path.join(root, "seeds.json")
        try:
            with open(seeds_path, encoding="utf-8") as handle:
                entries = json.load(handle)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {seeds_path} ({exc}); expected JSON [[folder, [seed, ...]], ...]") from exc
        if not isinstance(entries, list):
            raise ValueError(f"{seeds_path} holds a {type(entries).__name__}; expected [[folder, [seed, ...]], ...]")
        for i, entry in enumerate(entries):
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
                    and isinstance(entry[1], (list, tuple))):
                raise ValueError(f"{seeds_path} entry {i} is {entry!r}; expected [folder, [seed, ...]]")
        split_name = _SPLIT_ALIASES.get(split, split)
        train, val, _ = _SEEDS_SPLITS
        bounds = {"train": (0.0, train), "validation": (train, train + val), "test": (train + val, 1.0)}
        if split_name not in bounds:
            raise ValueError(
                f"split={split!r} is not a split of the InstructPix2Pix folder {root}; "
                "expected 'train', 'validation' (or 'val') or 'test'"
            )
        # Sorted by folder name, as the original prepare_dataset.py writes seeds.json; then the original's
        # floor(fraction * number of prompts) boundaries.
        entries = sorted(entries, key=lambda entry: entry[0])
        lo, hi = bounds[split_name]
        chosen = entries[math.floor(lo * len(entries)):math.floor(hi * len(entries))]
        self._pairs = [(folder, str(seed)) for folder, seeds in chosen for seed in seeds]
        self._root = root
        self._prompt_cache: tuple[str, dict[str, Any]] | None = None
        super().__init__(num_records=len(self._pairs), streaming=streaming,
                         columns=ColumnMap("{seed}_0.jpg", "prompt.json:edit", "{seed}_1.jpg"),
                         description=f"InstructPix2Pix folder {root} (split {split_name!r}, "
                                     f"{len(chosen)} prompts)",
                         base_dir=None)

    def _prompt(self, folder: str) -> dict[str, Any]:
        """{"instruction": ...} or {"error": ...}; the last folder is cached since pairs are grouped by folder."""
        if self._prompt_cache is not None and self._prompt_cache[0] == folder:
            return self._prompt_cache[1]
        path = os.path.join(self._root, folder, "prompt.json")
        try:
            with open(path, encoding="utf-8") as handle:
                prompt = json.load(handle)
            result = ({"instruction": prompt["edit"]} if isinstance(prompt, dict) and "edit" in prompt
                      else {"error": f"{path} has no 'edit' key"})
        except FileNotFoundError:
            result = {"error": f"prompt file not found: {path}"}
        except (OSError, ValueError) as exc:
            result = {"error": f"cannot read {path} ({' '.join(str(exc).split())})"}
        self._prompt_cache = (folder, result)
        return result

    def get(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self._pairs):
            raise IndexError(f"record index {i} is out of range for {len(self._pairs)} records")
        folder, seed = self._pairs[i]
        directory = os.path.join(self._root, folder)
        record = {
            "source": os.path.join(directory, f"{seed}_0.jpg"),
            "instruction": None,
            "target": os.path.join(directory, f"{seed}_1.jpg"),
        }
        record.update(self._prompt(folder))
        return record

    def iterate(self, start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in range(max(0, start), len(self._pairs)):
            yield i, self.get(i)


class _ChainRecords(Records):
    """Several records of the same columns one after another (imagefolder metadata files, each with its folder)."""

    def __init__(self, parts: list[Records], *, description: str) -> None:
        for part in parts[1:]:
            if part.columns != parts[0].columns:
                raise ValueError(f"{part.description} has the columns {part.columns}, but {parts[0].description} "
                                 f"has {parts[0].columns}; every part of {description} needs the same columns")
        lengths = [part.num_records for part in parts]
        super().__init__(num_records=None if None in lengths else sum(lengths), streaming=parts[0].streaming,
                         columns=parts[0].columns, description=description, base_dir=None)
        self._parts = parts

    def get(self, i: int) -> dict[str, Any]:
        if self.streaming:
            return super().get(i)
        if not 0 <= i < self.num_records:
            raise IndexError(f"record index {i} is out of range for {self.num_records} records")
        for part in self._parts:
            if i < part.num_records:
                return part.get(i)
            i -= part.num_records
        raise AssertionError("unreachable: the parts' lengths sum to num_records")

    def iterate(self, start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        offset = 0
        for part in self._parts:
            if part.num_records is None or offset + part.num_records > start:
                for position, raw in part.iterate(max(0, start - offset)):
                    yield offset + position, raw
            offset += part.count()  # known by now, unless `start` lay beyond this part (then one more pass)
        self.num_records = offset


def _pylist(table: pa.Table) -> list[dict[str, Any]]:
    """The table's rows as dicts, with JSON-typed columns decoded.

    datasets stores a column whose values mix types (e.g. instructions that are strings in some JSON lines and
    numbers in others) as JSON text (its `Json` feature); read raw, every string would keep its quotes.
    """
    rows = table.to_pylist()
    encoded = [field.name for field in table.schema if getattr(field.type, "extension_name", None) == "arrow.json"]
    for row in rows:
        for name in encoded:
            if row[name] is not None:
                row[name] = json.loads(row[name])
    return rows


def _unique(columns: ColumnMap) -> list[str]:
    return list(dict.fromkeys([columns.source, columns.instruction, columns.target]))


def _load_dataset(*args: Any, **kwargs: Any) -> Any:
    import datasets  # imported lazily: it is slow to import and only needed when data is opened

    return datasets.load_dataset(*args, **kwargs)


@contextlib.contextmanager
def _reading(description: str) -> Iterator[None]:
    """Turn the errors datasets and Arrow raise for damaged or empty files into a one-line ValueError naming them."""
    import datasets

    try:
        yield
    except StopIteration:  # datasets' json reader, on a file with no rows
        raise ValueError(f"{description} has no records; check data.path and data.split") from None
    except (datasets.exceptions.DatasetGenerationError, pa.ArrowException, ValueError) as exc:
        cause = exc
        while cause.__cause__ is not None:  # DatasetGenerationError says only "an error occurred"
            cause = cause.__cause__
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())
        raise ValueError(f"cannot read {description} ({reason}); check that its files are complete and "
                         "well-formed") from exc


def _saved_without_data(root: str) -> bool:
    """Whether a `save_to_disk` folder of one `Dataset` holds no data files (datasets cannot load it)."""
    try:
        with open(os.path.join(root, "state.json"), encoding="utf-8") as handle:
            return json.load(handle).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def _pick_split(split: str, available: Iterable[str], where: str) -> str:
    available = sorted(available)
    for name in (split, _SPLIT_ALIASES.get(split)):
        if name in available:
            return name
    raise ValueError(f"split={split!r} is not a split of {where}; its splits are {available}")


def _dataset_records(dataset: Any, *, columns: ColumnMap, streaming: bool, description: str,
                     base_dir: str | None, num_records: int | None = None) -> Records:
    """Records over a `datasets.Dataset` (map-style, or streamed from its table) or `IterableDataset`."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        resolved = resolve_columns(columns, dataset.column_names, description)
        return _TableRecords(dataset, columns=resolved, streaming=streaming, description=description,
                             base_dir=base_dir)
    names = dataset.column_names
    if names is None:  # json streams learn their columns from the data: peek at the first rows
        first = next(iter(dataset.with_format("arrow").iter(batch_size=1)), None)
        if first is None:
            raise ValueError(f"{description} has no records")
        names = first.column_names
    resolved = resolve_columns(columns, names, description)
    stream = _DatasetStream(dataset.select_columns(_unique(resolved)).with_format("arrow"))
    return _StreamRecords(stream, num_records=num_records, columns=resolved, description=description,
                          base_dir=base_dir)


def _parquet_records(files: list[str], *, columns: ColumnMap, streaming: bool, description: str,
                     base_dir: str | None, cache_dir: str | None) -> Records:
    # Every footer is read up front, so a damaged shard or one without the columns is an error naming it now
    # rather than mid-run (streaming reaches it hours later), and row-less files are left out (datasets' parquet
    # reader fails on them; their schema, maybe an old one, says nothing).
    footers = []
    for path in files:
        try:
            footer = pq.ParquetFile(path)
            footers.append((path, footer.metadata.num_rows, footer.schema_arrow.names))
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(f"cannot read the parquet file {path} ({exc})") from exc
    footers = [footer for footer in footers if footer[1]]
    if not footers:
        raise ValueError(f"{description} has no records; check data.path and data.split")
    resolved = resolve_columns(columns, footers[0][2], description)
    needed = _unique(resolved)
    for path, _, names in footers[1:]:
        missing = [name for name in needed if name not in names]
        if missing:
            raise ValueError(f"the parquet file {path} has no column {missing[0]!r}, which {footers[0][0]} has; "
                             f"every file of {description} needs the columns {needed}: its columns are {names}")
    files, counts = [path for path, _, _ in footers], [count for _, count, _ in footers]
    if streaming:
        stream = _ParquetStream(files, counts, needed, cache_dir)
        return _StreamRecords(stream, num_records=sum(counts), columns=resolved, description=description,
                              base_dir=base_dir)
    with _reading(description):
        dataset = _load_dataset("parquet", data_files={"train": files}, split="train", columns=needed,
                                cache_dir=cache_dir)
    return _TableRecords(dataset, columns=resolved, streaming=False, description=description, base_dir=base_dir)


def _json_records(files: list[str], *, columns: ColumnMap, streaming: bool, description: str,
                  base_dir: str | None, cache_dir: str | None, builder: str = "json",
                  renames: dict[str, str] | None = None) -> Records:
    files = [path for path in files if os.path.getsize(path) > 0]  # datasets' json reader fails on empty files
    if not files:
        raise ValueError(f"{description} has no records; check data.path and data.split")
    with _reading(description):
        dataset = _load_dataset(builder, data_files={"train": files}, split="train", streaming=streaming,
                                cache_dir=cache_dir)
        if renames:
            dataset = dataset.rename_columns(renames)
    return _dataset_records(dataset, columns=columns, streaming=streaming, description=description,
                            base_dir=base_dir)


def _file_records(files: list[str], label: str, *, split: str, columns: ColumnMap, streaming: bool,
                  cache_dir: str | None) -> Records:
    """Records of an explicit file list (one file or a glob): one split, whatever `split` asks for."""
    files = sorted(path for path in files if os.path.isfile(path))
    if not files:
        raise FileNotFoundError(f"data.path={label!r} matches no files; {ACCEPTED_FORMATS}")
    if split != "train":
        logger.info("%s names files, not splits: using them for split=%r", label, split)
    kinds = {_kind(path) for path in files}
    if None in kinds or len(kinds) != 1:
        extensions = sorted({os.path.splitext(path)[1] or "(none)" for path in files})
        raise ValueError(
            f"data.path={label!r} matches files with extensions {extensions}; expected only .parquet, only "
            ".jsonl/.json or only .csv files"
        )
    base_dir = os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path in files])
    description = f"{label} ({len(files)} file{'s' if len(files) > 1 else ''})"
    if kinds == {"parquet"}:
        return _parquet_records(files, columns=columns, streaming=streaming, description=description,
                                base_dir=base_dir, cache_dir=cache_dir)
    return _json_records(files, columns=columns, streaming=streaming, description=description,
                         base_dir=base_dir, cache_dir=cache_dir, builder=kinds.pop())


def _kind(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith(_PARQUET_EXT):
        return "parquet"
    if lower.endswith(_JSON_EXT):
        return "json"
    if lower.endswith(_CSV_EXT):
        return "csv"
    return None


def _split_files(root: str, kind: str, split: str) -> list[str] | None:
    """Files of `kind` for `split` under `root`, split by name as datasets does; None if there are none at all."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(root)
    except FileNotFoundError:  # datasets' EmptyDatasetError: no data files at all
        return None
    resolved = DataFilesDict.from_patterns(patterns, base_path=root)
    per_split = {name: [path for path in paths if _kind(path) == kind] for name, paths in resolved.items()}
    per_split = {name: paths for name, paths in per_split.items() if paths}
    if not per_split:
        return None
    return list(per_split[_pick_split(split, per_split, f"the {kind} files in {root}")])


def _metadata_file(root: str, split: str) -> str | None:
    """The imagefolder metadata file in `root`'s split subfolder or else at `root`, if any."""
    # The split's own subfolder first: with metadata at the top for training and in test/ for testing, split
    # "test" must not get the training rows.
    for folder in (os.path.join(root, split), os.path.join(root, _SPLIT_ALIASES.get(split, split)), root):
        for name in _METADATA_NAMES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def _metadata_columns(path: str) -> list[str]:
    try:
        if path.endswith(".parquet"):
            return pq.read_schema(path).names
        with open(path, encoding="utf-8-sig", newline="") as handle:  # -sig: a BOM (Windows editors) is no column
            if path.endswith(".csv"):
                return next(csv.reader(handle), [])
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    return list(row) if isinstance(row, dict) else []
    except (OSError, ValueError, csv.Error, pa.ArrowException) as exc:  # ValueError: JSON and UTF-8 errors too
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ValueError(f"cannot read the metadata file {path} ({reason}); check that it is complete and "
                         "well-formed") from exc
    return []


def _imagefolder_records(metadata: list[str], label: str, *, split: str, columns: ColumnMap, streaming: bool,
                         cache_dir: str | None) -> Records:
    """Records of imagefolder metadata files, in the given order; each names images relative to its own folder.

    The files are read as plain rows, with each `<name>_file_name` column renamed `<name>` (`file_name`: `image`),
    rather than through datasets' imagefolder builder: that builder splits a folder's files by the words in their
    paths (images under `test_images/` hid the metadata of split "train"), keeps several metadata files in a set
    whose order follows the process's hash seed (ranks and resumed runs numbered records apart), and refuses a
    whole dataset, or a stream when it reaches the row, for one absolute or `..` file name.
    """
    parts = []
    # An empty shard among others is left out, as a row-less parquet shard is; alone, it is an error naming it.
    for path in [path for path in metadata if os.path.getsize(path) > 0] or metadata[:1]:
        names = _metadata_columns(path)
        renames = {name: name[:-len("_file_name")] or "image" for name in names
                   if name == "file_name" or name.endswith("_file_name")}
        for name, image in renames.items():
            if image in names:
                raise ValueError(f"the metadata file {path} has the columns {name!r} and {image!r}, but {name!r} "
                                 f"names the images of the column {image!r}; rename one of them")
        builder = {".csv": "csv", ".parquet": "parquet"}.get(os.path.splitext(path)[1], "json")
        parts.append(_json_records([path], columns=columns, streaming=streaming, description=f"metadata {path}",
                                   base_dir=os.path.dirname(path), cache_dir=cache_dir, builder=builder,
                                   renames=renames))
    if len(parts) == 1:
        return parts[0]
    return _ChainRecords(parts, description=f"imagefolder {label} (split {split!r}, {len(parts)} metadata files)")


def _folder_records(root: str, label: str, *, split: str, columns: ColumnMap, streaming: bool,
                    cache_dir: str | None) -> Records:
    import datasets

    if os.path.isfile(os.path.join(root, "seeds.json")):
        return _SeedsRecords(root, split=split, streaming=streaming)

    if os.path.isfile(os.path.join(root, "dataset_dict.json")) or os.path.isfile(os.path.join(root, "state.json")):
        if _saved_without_data(root):
            raise ValueError(f"saved dataset {label} has no records; check data.path")
        with _reading(f"saved dataset {label}"):
            loaded = datasets.load_from_disk(root)
        if isinstance(loaded, datasets.DatasetDict):
            name = _pick_split(split, loaded.keys(), f"the saved dataset {label}")
            loaded, description = loaded[name], f"saved dataset {label} (split {name!r})"
        else:
            description = f"saved dataset {label}"
        # Saved Arrow files are memory-mapped, so even "streaming" reads them in place, with O(1) skips.
        return _dataset_records(loaded, columns=columns, streaming=streaming, description=description,
                                base_dir=root)

    metadata = _metadata_file(root, split)
    if metadata is not None:
        if split != "train" and os.path.dirname(metadata) == root.rstrip("/\\"):
            logger.info("%s has no %s/ subfolder with metadata: using its top-level %s for split=%r", label, split,
                        os.path.basename(metadata), split)
        return _imagefolder_records([metadata], label, split=split, columns=columns, streaming=streaming,
                                    cache_dir=cache_dir)

    for kind in ("parquet", "json", "csv"):
        files = _split_files(root, kind, split)
        if files:
            # Metadata files in subfolders (shard-0/metadata.jsonl, ...): each names images beside it.
            if all(os.path.basename(path) in _METADATA_NAMES for path in files):
                return _imagefolder_records(files, label, split=split, columns=columns, streaming=streaming,
                                            cache_dir=cache_dir)
            description = f"{kind} folder {label} (split {split!r}, {len(files)} files)"
            if kind == "parquet":
                return _parquet_records(files, columns=columns, streaming=streaming, description=description,
                                        base_dir=root, cache_dir=cache_dir)
            return _json_records(files, columns=columns, streaming=streaming, description=description,
                                 base_dir=root, cache_dir=cache_dir, builder=kind)
    raise FileNotFoundError(f"data.path={label!r} is a folder with no dataset in a known layout; {ACCEPTED_FORMATS}")


def _hub_snapshot(name: str) -> str | None:
    """The folder of the newest copy of hub dataset `name` in the local hub cache, if there is one."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, repo_type="dataset", local_files_only=True)
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or not a valid repo id
        return None


def _hub_records(name: str, *, split: str, columns: ColumnMap, streaming: bool, cache_dir: str | None,
                 subset: str | None = None) -> Records:
    try:
        config = {} if subset is None else {"name": subset}  # load_dataset(path, name=...): the configuration
        dataset = _load_dataset(name, split=split, streaming=streaming, cache_dir=cache_dir, **config)
    except ValueError as exc:  # e.g. "BuilderConfig 'x' not found. Available: [...]"
        if subset is None:
            raise
        reason = " ".join(str(exc).split())
        raise ValueError(f"data.subset={subset!r} could not be loaded from hub dataset {name} ({reason})") from None
    except OSError as exc:  # ConnectionError, datasets' DatasetNotFoundError, offline mode without a cache
        reason = " ".join(str(exc).split())
        # Offline, datasets finds only what it prepared itself, not a copy that `huggingface-cli download` or
        # `snapshot_download` put in the hub cache: read that copy as the local folder it is (a whole-repo copy:
        # the layout of a subset is the dataset card's to say, so not with data.subset).
        snapshot = _hub_snapshot(name) if subset is None else None
        if snapshot is not None:
            logger.warning("%s could not be loaded from the hub (%s); reading its copy in the hub cache, %s", name,
                           reason, snapshot)
            return _folder_records(snapshot, name, split=split, columns=columns, streaming=streaming,
                                   cache_dir=cache_dir)
        raise FileNotFoundError(
            f"data.path={name!r} is not a local path and could not be loaded from the hub ({reason}); "
            f"{ACCEPTED_FORMATS}"
        ) from exc
    label = name if subset is None else f"{name} (subset {subset!r})"
    return _dataset_records(dataset, columns=columns, streaming=streaming,
                            description=f"hub dataset {label} (split {split!r})", base_dir=None)


def open_records(path: str | os.PathLike, *, split: str = "train", columns: ColumnMap = ColumnMap(),
                 streaming: bool = False, cache_dir: str | os.PathLike | None = None,
                 subset: str | None = None) -> Records:
    """Open the records of one split of the dataset at `path` (any format in the module docstring).

    `columns` names the dataset columns (None fields are detected); `streaming` reads rows as consumed instead
    of preparing an Arrow cache; `cache_dir` is where `load_dataset` keeps that cache; `subset` names a hub
    dataset's configuration (``load_dataset(path, subset)``; hub ids only). Raises
    `FileNotFoundError` for a path that is neither an existing dataset nor a reachable hub id, and `ValueError`
    for an unknown split or undetectable columns.
    """
    text = os.fspath(path)
    if not text:
        raise FileNotFoundError(f"data.path is empty; {ACCEPTED_FORMATS}")
    cache = os.fspath(cache_dir) if cache_dir is not None else None
    if text == "synthetic" or text.startswith("synthetic:"):
        # The built-in edit task: generated locally once, then read like any parquet dataset.
        from ip2p.synthetic import builtin_dataset

        text = os.fspath(builtin_dataset(text))
    local = os.path.expanduser(text)
    from ip2p.models import looks_like_hub_id

    hub = not os.path.exists(local) and not glob.has_magic(local) and _kind(text) is None and looks_like_hub_id(text)
    if subset is not None and not hub:
        raise ValueError(f"data.subset={subset!r} names a configuration of a hub dataset, but "
                         f"data.path={os.fspath(path)!r} is local; drop data.subset, or point data.path at the "
                         "subset's own files")
    if glob.has_magic(local):
        return _file_records(glob.glob(local, recursive=True), text, split=split, columns=columns,
                             streaming=streaming, cache_dir=cache)
    if os.path.isfile(local):
        if os.path.basename(local) == "seeds.json":
            return _SeedsRecords(os.path.dirname(os.path.abspath(local)), split=split, streaming=streaming)
        return _file_records([local], text, split=split, columns=columns, streaming=streaming, cache_dir=cache)
    if os.path.isdir(local):
        return _folder_records(os.path.abspath(local), text, split=split, columns=columns, streaming=streaming,
                               cache_dir=cache)
    if hub:
        return _hub_records(text, split=split, columns=columns, streaming=streaming, cache_dir=cache, subset=subset)
    raise FileNotFoundError(f"data.path={text!r} does not exist; {ACCEPTED_FORMATS}")
