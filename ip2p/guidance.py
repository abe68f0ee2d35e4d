"""Two-scale classifier-free guidance for instruction editing (InstructPix2Pix, Brooks et al. 2022, eq. 3).

    eps = eps_none + s_I * (eps_image - eps_none) + s_T * (eps_full - eps_image)

``eps_full`` is conditioned on (instruction, source image), ``eps_image`` on ("", source image) and ``eps_none`` on
("", zero image). Rewritten as weights on the branches, ``eps = s_T*eps_full + (s_I - s_T)*eps_image +
(1 - s_I)*eps_none``: a branch whose weight is zero is not computed, so s_I = 1 costs two UNet rows, s_T = s_I = 1 one.
"""

from __future__ import annotations

from typing import Callable

import torch

BRANCHES = ("full", "image", "none")

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def branch_weights(text_scale: float, image_scale: float) -> dict[str, float]:
    """Weights of the three branches in the guided prediction; they always sum to 1."""
    return {"full": text_scale, "image": image_scale - text_scale, "none": 1.0 - image_scale}


def needed_branches(text_scale: float, image_scale: float) -> tuple[str, ...]:
    """The branches with a non-zero weight, in the fixed batch order (full, image, none)."""
    weights = branch_weights(text_scale, image_scale)
    return tuple(b for b in BRANCHES if weights[b] != 0.0)


def combine(eps: dict[str, torch.Tensor], text_scale: float, image_scale: float) -> torch.Tensor:
    """Guided prediction from the branches present in ``eps`` (the ones ``needed_branches`` names)."""
    if len(eps) == 3:
        # The paper's formula with its terms summed in the order diffusers' pipeline sums them, so results are
        # bit-identical to it rather than equal to float rounding.
        return (eps["none"] + text_scale * (eps["full"] - eps["image"])
                + image_scale * (eps["image"] - eps["none"]))
    weights = branch_weights(text_scale, image_scale)
    names = [b for b in BRANCHES if b in eps]
    # Weights sum to 1, so anchor on one branch and add weighted differences: exact when only one branch is left.
    base = eps[names[-1]]
    out = base
    for name in names[:-1]:
        out = out + weights[name] * (eps[name] - base)
    return out


def two_scale_denoiser(
    unet: torch.nn.Module,
    text_embeds: torch.Tensor,
    null_text_embeds: torch.Tensor,
    source_latents: torch.Tensor,
    text_scale: float,
    image_scale: float,
    max_batch: int | None = None,
) -> Denoiser:
    """Wrap an 8-channel UNet into ``denoiser(x, t) -> eps`` with two-scale guidance, one batched forward per call.

    text_embeds, null_text_embeds: (B, L, D); source_latents: (B, C, h, w), already scaled as the model expects.
    ``x`` passed to the denoiser is the scheduler-scaled latent (B, C, h, w); the source latent is concatenated after
    ``scale_model_input``, as the reference implementations do. ``max_batch`` splits that forward into forwards of at
    most so many rows (less memory, more time; the same result up to float rounding).
    """
    branches = needed_branches(text_scale, image_scale)
    zeros = torch.zeros_like(source_latents)
    text_rows = {"full": text_embeds, "image": null_text_embeds, "none": null_text_embeds}
    image_rows = {"full": source_latents, "image": source_latents, "none": zeros}
    context = torch.cat([text_rows[b] for b in branches])  # (nB, L, D)
    image = torch.cat([image_rows[b] for b in branches])  # (nB, C, h, w)
    n = len(branches)

    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        model_in = torch.cat([torch.cat([x] * n), image], dim=1)  # (nB, 2C, h, w)
        if max_batch is None or max_batch >= len(model_in):
            out = unet(model_in, t, encoder_hidden_states=context, return_dict=False)[0]
        else:
            out = torch.cat([unet(rows, t, encoder_hidden_states=ctx, return_dict=False)[0]
                             for rows, ctx in zip(model_in.split(max_batch), context.split(max_batch))])
        return combine(dict(zip(branches, out.chunk(n))), text_scale, image_scale)

    return denoiser
