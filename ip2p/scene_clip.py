"""A tiny CLIP trained on captioned synthetic scenes; its text tower becomes the built-in task's text encoder.

Stable Diffusion conditions on CLIP's text encoder, which learnt what words look like from image-caption pairs
before SD was trained. The built-in task (docs/demo.md) can do the same offline: :func:`pretrain_text_encoder` trains
the base's tiny ``CLIPTextModel`` contrastively (InfoNCE, as CLIP) against a small convolutional image tower on
scenes captioned by :func:`ip2p.synthetic.caption` with positions, so that e.g. the token "blue" gets an embedding
that means blue. The image tower is thrown away; the text model is saved with its spec and a report
(:func:`save_text_encoder`) and used frozen, like SD's. ``python -m ip2p.base text`` runs it (minutes on a CPU)
and writes ``ip2p/assets/demo_text_encoder.safetensors``, the shipped run of the default settings.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

TEXT_SEED_BASE = 600_000  # scene stream of the text pretraining scenes: TEXT_SEED_BASE + seed
HELDOUT_SCENES = 1024  # the last scenes of the stream, kept out of training, for the retrieval report


@dataclass(frozen=True)
class TextPretraining:
    """How :func:`pretrain_text_encoder` trains: AdamW with warm-up and cosine decay, InfoNCE over the batch."""

    steps: int = 1000
    batch_size: int = 256
    lr: float = 2e-3
    scenes: int = 40_000
    embed_dim: int = 64
    seed: int = 0


class ImageTower(nn.Module):
    """Four stride-2 convolutions and a linear layer over the flattened map (positions matter in the captions)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        widths = (3, 32, 64, 128, 128)
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.GELU()]
        self.convs = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1] * (size // 16) ** 2, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(images).flatten(1))


def pooled_text(text_encoder, ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Mean of the text model's last hidden states over the tokens up to and including the first end token."""
    states = text_encoder(ids)[0]
    first_eos = (ids == eos_token_id).int().argmax(-1)
    keep = torch.arange(ids.shape[1], device=ids.device)[None] <= first_eos[:, None]
    return (states * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)


class _Towers(nn.Module):
    def __init__(self, text_encoder, size: int, dim: int):
        super().__init__()
        self.text = text_encoder
        self.text_proj = nn.Linear(text_encoder.config.hidden_size, dim)
        self.image = ImageTower(size, dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def embed(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.text_proj(pooled_text(self.text, ids, self.text.config.eos_token_id))
        return F.normalize(self.image(images), dim=-1), F.normalize(text, dim=-1)


@torch.no_grad()
def retrieval_accuracy(towers: _Towers, images: np.ndarray, ids: torch.Tensor, batch_size: int = 256) -> float:
    """Share of captions whose own image is the most similar among the ``batch_size`` images of its batch."""
    from ip2p.base import to_model_range

    towers.eval()
    device = ids.device
    right = 0
    for i in range(0, len(images), batch_size):
        img, txt = towers.embed(to_model_range(images[i:i + batch_size], device), ids[i:i + batch_size])
        right += int(((txt @ img.T).argmax(-1) == torch.arange(len(txt), device=device)).sum())
    towers.train()
    return right / len(images)


def pretrain_text_encoder(text_encoder, images: np.ndarray, ids: np.ndarray, training: TextPretraining, *,
                          device: torch.device | str = "cpu", progress: bool = True, heldout: int = HELDOUT_SCENES):
    """Train ``text_encoder`` (a ``CLIPTextModel``) contrastively on ``images`` (N, H, W, 3) uint8 and their caption
    token ids (N, L); the last ``heldout`` are held out. Returns ``(text_encoder, report)``: the model frozen on the
    CPU, and the held-out retrieval accuracy before and after, the final loss and the times."""
    from tqdm.auto import tqdm

    from ip2p.base import _lr_scale, to_model_range

    if len(images) <= heldout or len(images) != len(ids):
        raise ValueError(f"need more than {heldout} scenes with one caption each; got {len(images)} images "
                         f"and {len(ids)} captions")
    device = torch.device(device)
    torch.manual_seed(training.seed)
    towers = _Towers(text_encoder.train().requires_grad_(True), images.shape[1], training.embed_dim).to(device)
    ids = torch.from_numpy(np.asarray(ids)).long().to(device)
    n = len(images) - heldout
    kept = (images[n:], ids[n:])
    before = retrieval_accuracy(towers, *kept)
    optimizer = torch.optim.AdamW(towers.parameters(), lr=training.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(training.seed)
    warmup = min(200, training.steps // 10)
    started = time.perf_counter()
    bar = tqdm(range(training.steps), desc="text encoder", disable=not progress, dynamic_ncols=True)
    loss_value = float("nan")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = training.lr * _lr_scale(step, training.steps, warmup)
        index = torch.randperm(n, generator=generator)[:training.batch_size]
        img, txt = towers.embed(to_model_range(images[index.numpy()], device), ids[index.to(device)])
        logits = towers.logit_scale.exp().clamp(max=100) * txt @ img.T
        labels = torch.arange(len(index), device=device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == training.steps - 1:
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.close()
    report = {"steps": training.steps, "device": str(device), "train_seconds": round(time.perf_counter() - started, 1),
              "loss_last": loss_value, "retrieval_before": before, "retrieval": retrieval_accuracy(towers, *kept),
              "retrieval_batch": 256, "heldout_scenes": heldout}
    logger.info("text encoder pretrained: held-out retrieval accuracy %.3f (%.3f before), %d steps in %.0f s",
                report["retrieval"], before, training.steps, report["train_seconds"])
    return text_encoder.cpu().eval().requires_grad_(False), report


def save_text_encoder(text_encoder, path: str | os.PathLike, *, key: dict[str, Any], report: dict) -> Path:
    """Write the text model (float32) to one safetensors file; its header holds its config, ``key`` (what it was
    trained for) and the report."""
    from ip2p.base import _save_weights

    return _save_weights(text_encoder, path, {"config": text_encoder.config.to_dict(), "key": key,
                                              "report": report})


def read_text_encoder_header(path: str | os.PathLike) -> dict[str, Any]:
    from ip2p.base import _read_header

    return _read_header(path, ("config", "key", "report"), "scene_clip.save_text_encoder")


def load_text_encoder(path: str | os.PathLike):
    """Load a text model written by :func:`save_text_encoder`; returns ``(text_encoder, header)``, frozen."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    header = read_text_encoder_header(path)
    model = CLIPTextModel(CLIPTextConfig.from_dict(header["config"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False), header


def matches(path: Path, key: dict[str, Any]) -> bool:
    try:
        return read_text_encoder_header(path)["key"] == json.loads(json.dumps(key))
    except (OSError, ValueError, json.JSONDecodeError):
        return False
