"""Deterministic, resumable, distributed batches of decoded and augmented (source, instruction, target) triples.

The data order is a function of global *positions* 0, 1, 2, ... only. Global step s trains on positions
[s*G, (s+1)*G), G = batch_size * world_size, and process `rank` takes [s*G + rank*B, s*G + (rank+1)*B). So any
number of processes (and DataLoader workers) assembles the same global batch, augments every example with the
generator of its position (`example_generator(seed, position, Purpose.AUGMENT)`), and a run resumed at step s
continues exactly where the uninterrupted run would be.

- Map-style records: position p is row `perm_e[p mod N]` of epoch e = p // N, where `perm_e` is a permutation
  drawn from `example_generator(seed, e, Purpose.ORDER)` (or the identity without shuffle). Epochs follow one
  another without a gap, so a global batch may span two epochs. Resume is O(1).
- Streaming records: positions follow the stream order, epoch after epoch. With `shuffle`, a shuffle buffer of
  `shuffle_buffer` raw (undecoded) records, driven by `example_generator(seed, epoch, Purpose.ORDER)`,
  reorders each epoch; it mixes only nearby records, so a stream stored in sorted order stays roughly sorted,
  and it holds `shuffle_buffer` undecoded records in RAM per process and worker (~1.4 MB each in the
  clip-filtered set: 256 -> ~360 MB).
  Every process and every DataLoader worker reads the whole stream and decodes only its own rows (reading is
  repeated world_size x num_workers times; decoding, the expensive part, is not).
  Resume cost: reaching position P reads (without decoding) the rows before it, as `Records.iterate(P)`
  describes (whole local parquet files are skipped); with the shuffle buffer the current epoch is replayed from
  its first row, since the buffer's state depends on every row before P. A stream of unknown length is counted
  once (one more pass) when a resume position lies beyond its first epoch.

A bad record (see `ip2p.data.decode`) never stops the stream: its slot holds zeros, `valid` is False, and the
batch carries `num_bad` and the reasons. `make_dataloader` logs a running count with the first reasons.
"""

from __future__ import annotations

import itertools
import logging
import signal
from collections.abc import Collection, Iterator
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ip2p.images import DEFAULT_MAX_PIXELS

from .augment import AugmentConfig, paired_augment, resized_size
from .decode import DEFAULT_MIN_SIDE, BadRecord, decode_image, decode_instruction
from .records import Records
from .seeding import Purpose, example_generator

logger = logging.getLogger(__name__)

__all__ = ["BadRecordTally", "EditBatches", "EditDataLoader", "make_dataloader"]

T = TypeVar("T")


def _positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _buffer_shuffle(items: Iterator[T], size: int, generator: torch.Generator) -> Iterator[T]:
    """Deterministic shuffle buffer: each arriving item replaces (and releases) a uniformly chosen slot."""
    buffer: list[T] = []
    draws: Iterator[int] = iter(())
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = next(draws, None)
        if slot is None:  # draw indices in chunks: one torch call per item would dominate the loop
            draws = iter(torch.randint(0, size, (1024,), generator=generator).tolist())
            slot = next(draws)
        yield buffer[slot]
        buffer[slot] = item
    for slot in torch.randperm(len(buffer), generator=generator).tolist():
        yield buffer[slot]


class EditBatches(IterableDataset):
    """Per-process batches for training; iterate directly or through `make_dataloader`.

    Each item is a dict (B = batch_size, R = augment.resolution):
      "step" int: the global step this batch is for
      "index" LongTensor (B,): global positions (key per-example noise / dropout generators with them)
      "record" LongTensor (B,): record numbers (map-style: dataset row; streaming: row of the stream)
      "source", "target" float32 (B, 3, R, R) in [-1, 1]; zeros in bad slots
      "instruction" list[str] of length B; "" in bad slots
      "valid" BoolTensor (B,); "num_bad" int; "bad_reasons" list[str] (one per bad slot)

    `start_step` resumes: the first batch is for that step. `max_steps` (exclusive) ends the iteration; None
    iterates forever, epoch after epoch. With DataLoader workers, worker w of n produces the steps
    start_step + w, start_step + w + n, ..., so `DataLoader(batch_size=None)` returns them in order.
    `num_workers` is the default for `make_dataloader`; the split follows the actual DataLoader.
    `shuffle_buffer` (streaming with `shuffle` only; 0 or 1 disables it) is the shuffle buffer's size in records.
    Images with a side under `min_image_side` or more than `max_image_pixels` pixels, as stored or once resized for
    the crop (a thin strip), are bad records.
    `cached_records`: record numbers whose images the consumer already holds in another form (the trainer's VAE
    latent cache): only their instructions are decoded, their images are zeros, and they count as valid.
    """

    def __init__(
        self,
        records: Records,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        augment: AugmentConfig = AugmentConfig(),
        shuffle: bool = True,
        start_step: int = 0,
        num_workers: int = 0,
        max_steps: int | None = None,
        shuffle_buffer: int = 256,
        min_image_side: int = DEFAULT_MIN_SIDE,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        cached_records: Collection[int] = frozenset(),
    ) -> None:
        super().__init__()
        self.cached_records = frozenset(cached_records)
        self.batch_size = _positive("batch_size", batch_size)
        self.world_size = _positive("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
        self.rank = rank
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self.start_step = _positive("start_step", start_step, 0)
        self.num_workers = _positive("num_workers", num_workers, 0)
        if max_steps is not None:
            _positive("max_steps", max_steps, 0)
        self.max_steps = max_steps
        self.shuffle_buffer = _positive("shuffle_buffer", shuffle_buffer, 0)
        self.min_image_side = _positive("min_image_side", min_image_side)
        self.max_image_pixels = _positive("max_image_pixels", max_image_pixels)
        if not isinstance(augment, AugmentConfig):
            raise ValueError(f"augment must be an AugmentConfig, got {type(augment).__name__}")
        self.augment = augment
        self.shuffle = bool(shuffle)
        if records.num_records == 0:
            raise ValueError(f"{records.description} has no records; check data.path and data.split")
        self.records = records
        self._order_cache: tuple[int, torch.Tensor] | None = None

    @property
    def global_batch_size(self) -> int:
        """G = batch_size x world_size: examples per global step."""
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> float | None:
        """Records / G (an epoch need not end on a step boundary); None for a stream of unknown length."""
        n = self.records.num_records
        return None if n is None else n / self.global_batch_size

    def positions(self, step: int) -> range:
        """This process's global positions at `step`."""
        first = step * self.global_batch_size + self.rank * self.batch_size
        return range(first, first + self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        stop = self.max_steps
        steps = itertools.count(self.start_step + worker, workers)
        if stop is not None:
            steps = itertools.takewhile(lambda step: step < stop, steps)
        if self.records.streaming:
            if info is not None:
                _reset_fsspec_lock()
            yield from self._stream_batches(steps)
        else:
            yield from self._map_batches(steps)

    # Map-style -------------------------------------------------------------------------------------------

    def _order(self, epoch: int) -> torch.Tensor:
        """(N,) record indices in epoch `epoch`'s order; the last epoch's is cached."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = self.records.num_records
            if self.shuffle:
                order = torch.randperm(n, generator=example_generator(self.seed, epoch, Purpose.ORDER))
            else:
                order = torch.arange(n)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def record_of(self, position: int) -> int:
        """The record index at a global position (map-style records)."""
        epoch, offset = divmod(position, self.records.num_records)
        return int(self._order(epoch)[offset])

    def _map_batches(self, steps: Iterator[int]) -> Iterator[dict[str, Any]]:
        for step in steps:
            slots = []
            for position in self.positions(step):
                row = self.record_of(position)
                # Read errors (a vanished disk, a broken shard) are not bad records: they propagate.
                slots.append((position, row, self.records.get(row)))
            yield self._collate(step, slots)

    # Streaming -------------------------------------------------------------------------------------------

    def _epoch_rows(self, epoch: int, offset: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(offset in epoch, stream row, raw record) of epoch `epoch` from `offset` on."""
        if not self.shuffle or self.shuffle_buffer <= 1:
            for row, raw in self.records.iterate(offset):
                yield row, row, raw
            return
        generator = example_generator(self.seed, epoch, Purpose.ORDER)
        shuffled = _buffer_shuffle(self.records.iterate(0), self.shuffle_buffer, generator)
        for k, (row, raw) in enumerate(shuffled):
            if k >= offset:
                yield k, row, raw

    def _stream_rows(self, start: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(global position, stream row, raw record) from global position `start` on, epoch after epoch."""
        length = self.records.num_records
        epoch, offset = divmod(start, length) if length else (0, start)
        while True:
            produced = False
            for offset_in_epoch, row, raw in self._epoch_rows(epoch, offset):
                produced = True
                yield epoch * (length or 0) + offset_in_epoch, row, raw
            if length is None:
                # The pass that just ended usually told the records their length; count() reads again only
                # when `start` lay beyond the end of the first epoch.
                length = self.records.count()
                if length == 0:
                    raise ValueError(f"{self.records.description} has no records; check data.path and data.split")
                if not produced and offset >= length:
                    epoch, offset = divmod(start, length)
                    continue
            elif not produced and offset == 0:
                # A whole epoch gave nothing (files gone since opening?): fail rather than spin forever.
                raise ValueError(f"{self.records.description} yielded no records although it reported {length}")
            epoch, offset = epoch + 1, 0

    def _stream_batches(self, steps: Iterator[int]) -> Iterator[dict[str, Any]]:
        step = next(steps, None)
        if step is None:
            return
        rows = self._stream_rows(self.positions(step).start)
        g, b = self.global_batch_size, self.batch_size
        slots: list[tuple[int, int, dict[str, Any]]] = []
        for position, row, raw in rows:
            owner_step, within = divmod(position, g)
            # Rows of other processes' slots and other workers' steps are read but never decoded.
            if owner_step != step or within // b != self.rank:
                continue
            slots.append((position, row, raw))
            if len(slots) == b:
                yield self._collate(step, slots)
                slots = []
                step = next(steps, None)
                if step is None:
                    return

    # Decoding --------------------------------------------------------------------------------------------

    @staticmethod
    def _instruction(raw: dict[str, Any]) -> str:
        if raw.get("error"):
            raise BadRecord(str(raw["error"]))
        try:
            return decode_instruction(raw.get("instruction"))
        except BadRecord as exc:
            raise BadRecord(f"instruction: {exc}") from exc

    def _example(self, position: int, raw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Decoded and augmented (source (3, R, R), target (3, R, R), instruction), or BadRecord."""
        instruction = self._instruction(raw)
        images = []
        for field in ("source", "target"):
            try:
                images.append(decode_image(raw.get(field), min_side=self.min_image_side,
                                           max_pixels=self.max_image_pixels))
            except BadRecord as exc:
                raise BadRecord(f"{field}: {exc}") from exc
        # A thin strip (8 x 60000 pixels passes the checks above) would be resized to gigabytes before the crop.
        width, height = resized_size(*images[0].size, self.augment.random_resize[1])
        if width * height > self.max_image_pixels:
            raise BadRecord(f"source: image is {images[0].width}x{images[0].height}, whose resize to {width}x{height} "
                            f"for the crop is over the limit of {self.max_image_pixels} pixels")
        generator = example_generator(self.seed, position, Purpose.AUGMENT)
        source, target = paired_augment(images[0], images[1], self.augment, generator)
        return source, target, instruction

    def _collate(self, step: int, slots: list[tuple[int, int, dict[str, Any]]]) -> dict[str, Any]:
        size, res = len(slots), self.augment.resolution
        source = torch.zeros(size, 3, res, res)
        target = torch.zeros(size, 3, res, res)
        valid = torch.zeros(size, dtype=torch.bool)
        instructions = [""] * size
        reasons: list[str] = []
        for k, (position, row, raw) in enumerate(slots):
            try:
                if row in self.cached_records:  # the consumer has these images: decoding them would be wasted
                    instructions[k] = self._instruction(raw)
                else:
                    source[k], target[k], instructions[k] = self._example(position, raw)
            except BadRecord as exc:
                reasons.append(f"position {position} (record {row}): {exc}")
                continue
            valid[k] = True
        return {
            "step": step,
            "index": torch.tensor([slot[0] for slot in slots], dtype=torch.long),
            "record": torch.tensor([slot[1] for slot in slots], dtype=torch.long),
            "source": source,
            "target": target,
            "instruction": instructions,
            "valid": valid,
            "num_bad": len(reasons),
            "bad_reasons": reasons,
        }


def _reset_fsspec_lock() -> None:
    """A forked DataLoader worker inherits fsspec's event-loop lock; reset it (as datasets does) or remote
    streams can hang."""
    try:
        import fsspec.asyn

        fsspec.asyn.reset_lock()
    except (ImportError, AttributeError):
        pass


def _ignore_sigterm(worker_id: int) -> None:
    """Leave SIGTERM to the training process, which saves a checkpoint before it exits: Slurm and `timeout` signal
    the whole process group, and a worker killed by it would crash the run first. Workers still exit with it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class BadRecordTally:
    """Running count of one process's skipped records and their first reasons, logged as batches arrive.

    The first `keep` reasons are logged one by one; after that the count is logged each time it passes a power
    of two, so a broken dataset cannot flood the log.
    """

    def __init__(self, *, rank: int = 0, keep: int = 10) -> None:
        self.rank = rank
        self.keep = keep
        self.total = 0
        self.reasons: list[str] = []

    def update(self, batch: dict[str, Any]) -> None:
        """Add a batch's bad records (its "num_bad" and "bad_reasons")."""
        count = int(batch["num_bad"])
        if count == 0:
            return
        before = self.total
        self.total += count
        for i, reason in enumerate(batch["bad_reasons"]):
            if len(self.reasons) < self.keep:
                self.reasons.append(reason)
                logger.warning("rank %d: skipped bad record #%d: %s", self.rank, before + i + 1, reason)
        if before >= self.keep and self.total.bit_length() > before.bit_length():
            logger.warning("rank %d: %d bad records skipped so far; the first: %s", self.rank, self.total,
                           "; ".join(self.reasons[:3]))


class EditDataLoader(DataLoader):
    """A DataLoader over `EditBatches` that tallies and logs bad records in the consuming process.

    `bad_records` (a `BadRecordTally`) holds this process's running count and first reasons.
    """

    def __init__(self, batches: EditBatches, **kwargs: Any) -> None:
        super().__init__(batches, batch_size=None, **kwargs)
        self.bad_records = BadRecordTally(rank=batches.rank)

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        for batch in super().__iter__():
            self.bad_records.update(batch)
            yield batch


def make_dataloader(batches: EditBatches, num_workers: int | None = None, *, pin_memory: bool = False,
                    prefetch_factor: int | None = None) -> EditDataLoader:
    """A DataLoader yielding `batches`' items in step order; `num_workers` None uses `batches.num_workers`.

    Workers are persistent (they keep the decoded-record state and opened files across epochs of the loop).
    """
    workers = batches.num_workers if num_workers is None else _positive("num_workers", num_workers, 0)
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor or 2,
                 "worker_init_fn": _ignore_sigterm}
    return EditDataLoader(batches, num_workers=workers, pin_memory=pin_memory, **extra)
