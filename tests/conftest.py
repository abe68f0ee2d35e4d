"""Shared fixtures: tiny seeded components, built offline (SPEC section 9)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from ip2p import tiny  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_editor_dir(tmp_path_factory):
    """A diffusers InstructPix2Pix folder (small layout, 8 channels) written by diffusers' save_pretrained."""
    return tiny.save_tiny_pipeline(tmp_path_factory.mktemp("tiny_editor"), layout="small", in_channels=8)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A diffusers Stable Diffusion folder (small layout, 4 channels): a base model to fine-tune."""
    return tiny.save_tiny_pipeline(tmp_path_factory.mktemp("tiny_base"), layout="small", in_channels=4)


@pytest.fixture(scope="session")
def tiny_sd_editor_dir(tmp_path_factory):
    """An SD-shaped 8-channel pipeline folder (single-file layout tests)."""
    return tiny.save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd_editor"), layout="sd", in_channels=8)


@pytest.fixture(scope="session")
def photo(tmp_path_factory):
    """A small random RGB image file (24 x 32) to edit."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "in.png"
    Image.fromarray((rng.random((24, 32, 3)) * 255).astype("uint8")).save(path)
    return path
