"""Set-up shared by the datagen tests (no tests here; imported by tests/test_datagen*.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def small(steps: int = 3) -> list[str]:
    """Image-stage flags for a fast run of the tiny model: 16x16 pixels, ``steps`` steps, no progress bars."""
    return ["--steps", str(steps), "--height", "16", "--width", "16", "--quiet"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two cores are shared with other jobs; more threads than cores makes tiny models orders of magnitude slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a ``python -m ip2p.datagen`` child process: offline, one thread, this checkout first."""
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


def write_prompts(path: Path, n: int) -> None:
    """A text-stage output of ``n`` caption pairs, ids 0..n-1."""
    path.write_text("".join(json.dumps({"input": f"a photo of thing {i}", "edit": f"make it {i}",
                                        "output": f"a painting of thing {i}"}) + "\n" for i in range(n)))
