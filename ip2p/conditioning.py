"""Conditioning inputs: instruction embeddings, source/target latents, and condition dropout (SPEC section 2)."""

from __future__ import annotations

import torch

DROPOUT_P = 0.05


def _tokenize(tokenizer, prompts: list[str]):
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's max length (77 for CLIP). Returns (B, L) int64."""
    return _tokenize(tokenizer, prompts).input_ids


@torch.no_grad()
def encode_text(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """CLIP last hidden state for each prompt, as Stable Diffusion conditions on it. Returns (B, L, D)."""
    device = text_encoder.device
    positions = getattr(text_encoder.config, "max_position_embeddings", None)
    if positions is not None and tokenizer.model_max_length > positions:
        # Caught here: transformers fails deep inside (or, for a tokenizer saved without a length, overflows).
        raise ValueError(f"the tokenizer pads to model_max_length={tokenizer.model_max_length} tokens but the text "
                         f"encoder has {positions} positions; set model_max_length to {positions} in "
                         "tokenizer/tokenizer_config.json")
    tokens = _tokenize(tokenizer, prompts)
    mask = None
    # Some SD text encoders (e.g. converted ones) were trained with an attention mask; diffusers honours this flag with
    # the tokenizer's own mask, which keeps the end-of-text token even where the padding token is the same one (CLIP).
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(device)
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


def vae_scaling_factor(vae) -> float:
    return float(getattr(vae.config, "scaling_factor", 0.18215))


@torch.no_grad()
def encode_source(vae, images: torch.Tensor, *, scale: bool = False) -> torch.Tensor:
    """Source-image latent: the posterior mode, unscaled by default.

    images: (B, 3, H, W) in [-1, 1]. Returns (B, C, H/f, W/f). The paper's code skipped the VAE scaling factor here and
    every released checkpoint depends on that; CosXL-style models scale it (``scale=True``).
    """
    vae_dtype = next(vae.parameters()).dtype
    latents = vae.encode(images.to(device=vae.device, dtype=vae_dtype)).latent_dist.mode()
    return latents * vae_scaling_factor(vae) if scale else latents


@torch.no_grad()
def encode_posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE posterior, unscaled. images: (B, 3, H, W) in [-1, 1]."""
    vae_dtype = next(vae.parameters()).dtype
    dist = vae.encode(images.to(device=vae.device, dtype=vae_dtype)).latent_dist
    return dist.mean, dist.std


def sample_posterior(vae, mean: torch.Tensor, std: torch.Tensor,
                     generators: list[torch.Generator] | torch.Generator | None = None) -> torch.Tensor:
    """A posterior sample times the VAE scaling factor; row i drawn from ``generators[i]`` when a list is given."""
    noise = per_example_randn(mean.shape, generators, mean.device, mean.dtype)
    return (mean + std * noise) * vae_scaling_factor(vae)


@torch.no_grad()
def encode_target(vae, images: torch.Tensor, generators: list[torch.Generator] | torch.Generator | None = None
                  ) -> torch.Tensor:
    """Target latent: a posterior sample times the scaling factor. images: (B, 3, H, W) in [-1, 1].

    With one generator per example the draw of each example depends only on its own generator, so a batch split over
    processes gives the same latents as the whole batch on one process.
    """
    mean, std = encode_posterior(vae, images)
    return sample_posterior(vae, mean, std, generators)


def per_example_randn(shape: tuple[int, ...] | torch.Size, generators: list[torch.Generator] | torch.Generator | None,
                      device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of ``shape`` drawn on the CPU, row i from ``generators[i]`` when a list is given."""
    if isinstance(generators, (list, tuple)):
        if len(generators) != shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}; pass one per example")
        rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32) for g in generators]
        out = torch.stack(rows)
    else:
        out = torch.randn(tuple(shape), generator=generators, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


def dropout_masks(r: torch.Tensor, p: float = DROPOUT_P) -> tuple[torch.Tensor, torch.Tensor]:
    """Condition-dropout masks from one uniform draw per example (SPEC section 2).

    r < p drops the text only; p <= r < 2p drops both; 2p <= r < 3p drops the image only. So each of text and image is
    dropped with probability 2p, and both together with probability p. r: (B,) in [0, 1).
    Returns (drop_text, drop_image), each (B,) bool.
    """
    if not 0.0 <= p <= 1.0 / 3.0:
        raise ValueError(f"condition dropout p={p} must be in [0, 1/3] (three disjoint bands of width p)")
    drop_text = r < 2 * p
    drop_image = (r >= p) & (r < 3 * p)
    return drop_text, drop_image


def draw_dropout(batch_size: int, p: float = DROPOUT_P, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw condition-dropout masks for a batch from ``generator`` (CPU). Returns (drop_text, drop_image), (B,) bool."""
    return dropout_masks(torch.rand(batch_size, generator=generator), p)


def apply_dropout(text_embeds: torch.Tensor, null_text_embeds: torch.Tensor, source_latents: torch.Tensor,
                  drop_text: torch.Tensor, drop_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace dropped texts by the embedding of "" and dropped images by zeros.

    text_embeds (B, L, D); null_text_embeds (1, L, D) or (B, L, D); source_latents (B, C, h, w); masks (B,) bool.
    """
    drop_text = drop_text.to(text_embeds.device).view(-1, 1, 1)
    drop_image = drop_image.to(source_latents.device).view(-1, 1, 1, 1)
    text = torch.where(drop_text, null_text_embeds.to(text_embeds.dtype).expand_as(text_embeds), text_embeds)
    image = torch.where(drop_image, torch.zeros_like(source_latents), source_latents)
    return text, image
