"""Which items a process owns, and where and how it writes them.

Work is split by item id: item ``i`` belongs to shard ``i % count``. The split depends only on the ids, so every
process computes it alone (no communication), and two runs with the same shard count agree on it. Files are written
with ``ip2p.atomic``, so a kill never leaves a half-written one, and a failed write (a full disk, a read-only folder)
is one line naming the file (:func:`output_errors`).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RESUME", "Shard", "output_errors", "shard_from_env", "sharded_path"]

RESUME = "rerun the same command: it continues from the last commit"


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: owns the items whose id is ``index`` modulo ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"num_shards={self.count} must be at least 1")
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard_index={self.index} must be in [0, {self.count}) for num_shards={self.count}")

    def owns(self, item_id: int) -> bool:
        return item_id % self.count == self.index

    @property
    def tag(self) -> str:
        """A file-name tag, ``00001-of-00004``, that sorts and names this shard."""
        return f"{self.index:05d}-of-{self.count:05d}"


def shard_from_env(num_shards: int | None = None, shard_index: int | None = None) -> Shard:
    """The shard of this process: explicit values win, else ``RANK``/``WORLD_SIZE`` (torchrun, accelerate launch).

    Each process of ``accelerate launch`` / ``torchrun`` gets its rank in the environment, so the same command line
    splits the work without flags.
    """
    if num_shards is None and shard_index is None:
        world = os.environ.get("WORLD_SIZE")
        rank = os.environ.get("RANK")
        if world is None or rank is None:
            return Shard()
        try:
            return Shard(int(rank), int(world))
        except ValueError as e:
            raise ValueError(f"RANK={rank!r}, WORLD_SIZE={world!r} from the environment are not a valid shard "
                             f"({e}); unset them or pass --num-shards/--shard-index") from None
    if num_shards is None or shard_index is None:
        raise ValueError(f"got num_shards={num_shards} and shard_index={shard_index}; pass both or neither")
    return Shard(shard_index, num_shards)


def sharded_path(path: str | os.PathLike, shard: Shard) -> Path:
    """``out.jsonl`` for one shard, ``out.shard-00001-of-00004.jsonl`` when there are several."""
    path = Path(path)
    if shard.count == 1:
        return path
    return path.with_name(f"{path.stem}.shard-{shard.tag}{path.suffix}")


@contextlib.contextmanager
def output_errors(path: str | os.PathLike, then: str = RESUME) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into a one-line ValueError naming it, the OS's reason and the fix.

    ``then``: what to do once it is fixed. The stages commit atomically, so what was committed before stays.
    """
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free space on its disk"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = "make its folder writable"
        else:
            fix = "fix that"
        raise ValueError(f"cannot write {str(path)!r} ({e.strerror or e}); {fix} and {then}") from e
