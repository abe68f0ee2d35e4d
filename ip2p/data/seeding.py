"""Deterministic random streams keyed by (seed, global example position, purpose).

Every random choice made for one training example (its augmentation, its noise, its timestep, its condition
dropout) comes from its own generator, derived from the run seed and the example's global position in the
data order. The draws therefore do not depend on the number of processes, DataLoader workers, or where a run
was resumed: the same example at the same position always gets the same numbers.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum

import torch

__all__ = ["Purpose", "example_generator", "mix_seed"]

_SEED_MASK = (1 << 63) - 1


class Purpose(IntEnum):
    """Which random stream of an example a generator feeds; distinct purposes never share draws."""

    AUGMENT = 0
    NOISE = 1
    TIMESTEP = 2
    DROPOUT = 3
    ORDER = 4
    """Data order: the epoch permutation (map-style) or the shuffle buffer (streaming), keyed by epoch."""


def mix_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value and their order (BLAKE2b of their 128-bit encodings).

    Hashing, rather than e.g. `seed * K + index`, keeps (seed=1, index=0) and (seed=0, index=K) apart and makes
    nearby inputs give unrelated streams.
    """
    digest = hashlib.blake2b(digest_size=8, person=b"ip2p.seeds")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"seed parts must be integers, got {value!r} of type {type(value).__name__}")
        digest.update(int(value).to_bytes(16, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") & _SEED_MASK


def example_generator(
    seed: int, index: int, purpose: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A fresh `torch.Generator` on `device` seeded by (`seed`, global example `index`, `purpose`).

    Use one generator per example and purpose (`Purpose.AUGMENT`, `NOISE`, `TIMESTEP`, `DROPOUT`), so that an
    example's draws are the same whatever batch, process or worker it lands in.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(mix_seed(seed, index, int(purpose)))
    return generator
