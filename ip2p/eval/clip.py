"""CLIP similarities shared by the data-generation filter and evaluation (SPEC sections 6 and 7).

One implementation of the paper's four CLIP numbers (orig ``metrics/clip_similarity.py``):

- ``clip_sim_0`` / ``clip_sim_1``: cosine between the input (resp. edited) image and its caption;
- ``clip_sim_image``: cosine between the two images (consistency with the input);
- ``clip_sim_dir``: cosine between the image change and the caption change,
  ``cos(E_img(out) - E_img(in), E_txt(out caption) - E_txt(in caption))``.

Any ``CLIPModel`` that transformers loads works (a folder or a hub id, e.g. ``openai/clip-vit-large-patch14``, the
paper's ViT-L/14). Images are preprocessed here, on tensors: the shortest side is resized (bicubic, antialiased) to the
model's image size, the centre is cropped, and the [0, 1] pixels are normalised with the model's mean/std. This is what
CLIP was trained on; the original code fed images in [-1, 1] before normalising, which shifts every score. We do not
call ``CLIPImageProcessor``: transformers 5 routes it through torchvision, which ip2p does not require.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "SCORE_KEYS", "ClipScorer", "clip_scores_from_embeds",
           "to_unit_tensor"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SCORE_KEYS = ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")
"""The four scores, named as in the original release's metadata."""


def to_unit_tensor(images: torch.Tensor | Sequence) -> torch.Tensor:
    """Images as a float (B, 3, H, W) tensor in [0, 1].

    Accepts a (B, 3, H, W) float tensor already in [0, 1], a uint8 tensor, or a sequence of PIL images / (H, W, 3)
    uint8 arrays of one size.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W); got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            return images.float() / 255.0
        return images.float()
    arrays = [np.asarray(image.convert("RGB") if hasattr(image, "convert") else image) for image in images]
    if not arrays:
        raise ValueError("images is empty; pass at least one image")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images have different sizes {sorted(shapes)}; pass images of one size or a tensor")
    stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return stacked.float() / 255.0 if stacked.dtype == torch.uint8 else stacked.float()


def clip_scores_from_embeds(img_in: torch.Tensor, img_out: torch.Tensor, txt_in: torch.Tensor,
                            txt_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four similarities from embeddings, each (B, D) (normalised here). Returns a dict of (B,) tensors."""
    img_in, img_out = F.normalize(img_in.float(), dim=-1), F.normalize(img_out.float(), dim=-1)
    txt_in, txt_out = F.normalize(txt_in.float(), dim=-1), F.normalize(txt_out.float(), dim=-1)
    return {
        "clip_sim_0": F.cosine_similarity(img_in, txt_in, dim=-1),
        "clip_sim_1": F.cosine_similarity(img_out, txt_out, dim=-1),
        # Differences of unit vectors, as the orig; a zero difference (identical images) scores 0, not NaN.
        "clip_sim_dir": F.cosine_similarity(img_out - img_in, txt_out - txt_in, dim=-1),
        "clip_sim_image": F.cosine_similarity(img_in, img_out, dim=-1),
    }


def _read_preprocessor_config(source: str) -> dict:
    """The model's ``preprocessor_config.json`` ({} when it has none), from a folder or the hub cache."""
    local = Path(source)
    if local.is_dir():
        path = local / "preprocessor_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    from transformers.utils import cached_file

    try:
        path = cached_file(source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    except OSError:
        return {}
    return json.loads(Path(path).read_text()) if path else {}


def _side(value: object, default: int) -> int:
    """A size entry of a preprocessor config: an int, or a dict with shortest_edge / height."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in ("shortest_edge", "height"):
            if isinstance(value.get(key), int):
                return value[key]
    return default


class ClipScorer:
    """A transformers CLIP model with its own tensor preprocessing; embeddings are L2-normalised.

    ``model_path_or_id``: a folder with ``CLIPModel`` weights and a tokenizer, or a hub id. ``device`` defaults to the
    CPU; the model runs in float32 (scores are thresholded at 0.2 / 0.7, so half precision is not worth its noise).
    """

    def __init__(self, model_path_or_id: str | os.PathLike, device: torch.device | str | None = None,
                 batch_size: int = 64) -> None:
        from transformers import AutoConfig, CLIPModel, CLIPTokenizer

        source = str(model_path_or_id)
        fix = "pass a folder with a CLIPModel and its tokenizer, or a hub id available offline (e.g. " \
              "openai/clip-vit-large-patch14)"
        try:
            kind = getattr(AutoConfig.from_pretrained(source), "model_type", None)
        except (OSError, ValueError) as e:  # no config.json, or one without a model_type
            raise FileNotFoundError(f"clip model {source!r} could not be loaded ({type(e).__name__}); {fix}") from e
        try:
            if kind != "clip":
                # CLIPModel would load it anyway, with random weights for every tensor it lacks, and score nonsense.
                raise ValueError(f"clip model {source!r} is a {kind or 'non-CLIP'} model, not a CLIP (text and "
                                 f"image) model; {fix}")
            model, info = CLIPModel.from_pretrained(source, output_loading_info=True)
            if info.get("missing_keys"):
                raise ValueError(f"clip model {source!r} lacks {len(info['missing_keys'])} of CLIP's weights (e.g. "
                                 f"{sorted(info['missing_keys'])[0]}); {fix}")
            self.model = model.eval().requires_grad_(False)
            self.tokenizer = CLIPTokenizer.from_pretrained(source)
        except OSError as e:
            raise FileNotFoundError(f"clip model {source!r} could not be loaded ({type(e).__name__}); {fix}") from e
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model.to(self.device)
        self.batch_size = batch_size
        config = _read_preprocessor_config(source)
        image_size = int(self.model.config.vision_config.image_size)
        self.crop_size = _side(config.get("crop_size"), image_size)
        self.resize_to = _side(config.get("size"), self.crop_size)
        self.mean = torch.tensor(config.get("image_mean", OPENAI_CLIP_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(config.get("image_std", OPENAI_CLIP_STD), dtype=torch.float32).view(1, 3, 1, 1)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def preprocess(self, images: torch.Tensor | Sequence) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] (or PIL / uint8) -> CLIP pixel values (B, 3, S, S), S the crop size."""
        x = to_unit_tensor(images).to(self.device)
        h, w = x.shape[-2:]
        scale = self.resize_to / min(h, w)
        size = (max(self.crop_size, round(h * scale)), max(self.crop_size, round(w * scale)))
        if size != (h, w):
            # Bicubic with antialiasing, like CLIP's PIL resize; clamp the overshoot PIL's uint8 output would clip.
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top = (size[0] - self.crop_size) // 2
        left = (size[1] - self.crop_size) // 2
        x = x[..., top:top + self.crop_size, left:left + self.crop_size]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor | Sequence) -> torch.Tensor:
        """Unit-norm image embeddings (B, D) of images (B, 3, H, W) in [0, 1]."""
        x = to_unit_tensor(images)
        out = [self._project(self.model.get_image_features(pixel_values=self.preprocess(x[i:i + self.batch_size])))
               for i in range(0, x.shape[0], self.batch_size)]
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings (B, D); captions longer than the text tower are truncated."""
        texts = list(texts)
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            out.append(self._project(self.model.get_text_features(input_ids=tokens.input_ids,
                                                                  attention_mask=tokens.attention_mask)))
        return F.normalize(torch.cat(out), dim=-1)

    @staticmethod
    def _project(output: object) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output holds the projection; 4.x returned the tensor.
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def scores(self, src_images: torch.Tensor | Sequence, out_images: torch.Tensor | Sequence,
               src_captions: Sequence[str], out_captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """The four similarities (each (B,) float32 on the CPU) for B (input, edited) image and caption pairs.

        ``src_images``/``out_images``: (B, 3, H, W) in [0, 1] (or PIL / uint8); a single caption is repeated over B.
        """
        img_in, img_out = self.image_embeds(src_images), self.image_embeds(out_images)
        b = img_in.shape[0]
        src_captions = _repeat(src_captions, b, "src_captions")
        out_captions = _repeat(out_captions, b, "out_captions")
        if img_out.shape[0] != b:
            raise ValueError(f"got {b} source images and {img_out.shape[0]} edited images; pass one of each per pair")
        txt = self.text_embeds(list(src_captions) + list(out_captions))
        scores = clip_scores_from_embeds(img_in, img_out, txt[:b], txt[b:])
        return {key: value.cpu() for key, value in scores.items()}


def _repeat(captions: Sequence[str] | str, n: int, name: str) -> list[str]:
    captions = [captions] if isinstance(captions, str) else list(captions)
    if len(captions) == 1 and n > 1:
        return captions * n
    if len(captions) != n:
        raise ValueError(f"{name} has {len(captions)} captions for {n} images; pass one per image (or one for all)")
    return captions
