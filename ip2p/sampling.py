"""The edit loop: any diffusers scheduler driven by a denoiser callable (see ``guidance.two_scale_denoiser``)."""

from __future__ import annotations

import inspect
import logging
from typing import Callable

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from ip2p.conditioning import encode_source, encode_text, vae_scaling_factor
from ip2p.guidance import Denoiser, two_scale_denoiser

logger = logging.getLogger(__name__)

# Short names users pass on the command line; the paper sampled with Euler-ancestral.
SCHEDULERS: dict[str, type] = {
    "euler_a": EulerAncestralDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "pndm": PNDMScheduler,
    "lms": LMSDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "ddpm": DDPMScheduler,
}
DEFAULT_SCHEDULER = "euler_a"
DEFAULT_STEPS = 50
DEFAULT_TEXT_GUIDANCE = 7.5
DEFAULT_IMAGE_GUIDANCE = 1.5
# diffusers' Euler-ancestral and PNDM steps cannot take an x0 ("sample") prediction; models trained so use Euler.
NO_SAMPLE_PREDICTION = (EulerAncestralDiscreteScheduler, PNDMScheduler)
DEFAULT_SAMPLE_SCHEDULER = "euler"
# Samplers over continuous sigmas, which take any number of steps; the others index the training timesteps and fail
# (IndexError) or silently give NaN or noise from as many steps as the model has training timesteps.
ANY_STEPS = (EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler, HeunDiscreteScheduler)


def override_config(config: dict, **changes) -> dict:
    """``config`` (a diffusers config) with ``changes`` applied, kept by ``from_config``.

    diffusers lists the keys a loaded config left at their defaults under ``_use_default_values`` and drops them in
    ``from_config``: an override of such a key (SD 1.5's scheduler JSON has no ``prediction_type``) must leave that
    list.
    """
    out = dict(config, **changes)
    if "_use_default_values" in out:
        out["_use_default_values"] = [k for k in out["_use_default_values"] if k not in changes]
    return out


def trained_scheduler_config(config: dict, prediction_type: str | None, zero_terminal_snr: bool) -> dict:
    """The base model's scheduler ``config`` as a run with ``model.prediction_type`` and ``model.zero_terminal_snr``
    trained it: what sampling that run's UNet needs (rescaled betas with trailing timesteps, Lin et al. 2024)."""
    changes: dict = {}
    if prediction_type:
        changes["prediction_type"] = prediction_type
    if zero_terminal_snr:
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return override_config(config, **changes)


def default_scheduler(prediction_type: str | None) -> str:
    """The default sampler's short name for a model of ``prediction_type`` (Euler-ancestral where it can be used)."""
    return DEFAULT_SAMPLE_SCHEDULER if prediction_type == "sample" else DEFAULT_SCHEDULER


def unsupported(cls: type, config) -> str | None:
    """Why scheduler class ``cls`` cannot sample a model whose scheduler config is ``config``, or None if it can.

    Two model properties need support: x0 ("sample") prediction, and betas rescaled to zero terminal SNR (a
    scheduler without that option would silently sample with the original betas).
    """
    if config.get("prediction_type") == "sample" and issubclass(cls, NO_SAMPLE_PREDICTION):
        return "prediction_type='sample'"
    if config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in inspect.signature(cls).parameters:
        return "betas rescaled to zero terminal SNR"
    return None


def check_scheduler(scheduler, config=None) -> None:
    """Refuse a scheduler (a class or an instance) that cannot sample the model whose scheduler config is ``config``
    (default: the instance's own; see ``unsupported``), before any work is done."""
    cls = scheduler if isinstance(scheduler, type) else type(scheduler)
    config = scheduler.config if config is None else config
    reason = unsupported(cls, config)
    if reason:
        usable = ", ".join(n for n, c in SCHEDULERS.items() if not unsupported(c, config))
        raise ValueError(f"the {cls.__name__} sampler cannot use a model trained with {reason}; "
                         f"choose one of {usable}")


def make_scheduler(name: str | None, base_config) -> object:
    """A scheduler of the short ``name`` built from a pipeline's scheduler config (betas, prediction type).

    ``name=None`` picks ``default_scheduler`` for the config's prediction type.
    """
    if name is None:
        name = default_scheduler(base_config.get("prediction_type"))
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
    check_scheduler(SCHEDULERS[name], base_config)  # a class without an option drops it from the config: check first
    return SCHEDULERS[name].from_config(base_config)


def check_steps(scheduler, steps: int) -> None:
    """Refuse a number of ``steps`` that ``scheduler`` cannot take (see ``ANY_STEPS``), before any work is done."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    limit = scheduler.config.get("num_train_timesteps")
    if limit and steps >= limit and not isinstance(scheduler, ANY_STEPS):
        usable = ", ".join(n for n, c in SCHEDULERS.items() if issubclass(c, ANY_STEPS))
        raise ValueError(f"steps={steps} is too many for the {type(scheduler).__name__} sampler: it takes at most "
                         f"{limit - 1} (the model has {limit} training timesteps); use fewer steps, or one of {usable}")


def _step_kwargs(scheduler, generator: torch.Generator | None, eta: float) -> dict:
    """Pass ``generator``/``eta`` only to schedulers whose ``step`` takes them (ancestral, DDIM)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "generator" in params:
        kwargs["generator"] = generator
    if "eta" in params:
        kwargs["eta"] = eta
    return kwargs


def sample(denoiser: Denoiser, scheduler, latents: torch.Tensor, *, steps: int,
           generator: torch.Generator | None = None, eta: float = 0.0, progress: bool = True,
           callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run ``scheduler`` for ``steps`` from initial noise ``latents`` (B, C, h, w), unscaled N(0, 1)."""
    check_steps(scheduler, steps)
    check_scheduler(scheduler)
    scheduler.set_timesteps(steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    kwargs = _step_kwargs(scheduler, generator, eta)
    timesteps = scheduler.timesteps
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="editing", leave=False)):
        eps = denoiser(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(eps, t, latents, **kwargs, return_dict=False)[0]
        if callback is not None:
            callback(i, latents)
    return latents


@torch.no_grad()
def edit(model, images: torch.Tensor, instructions: list[str], *, steps: int = DEFAULT_STEPS,
         text_guidance: float = DEFAULT_TEXT_GUIDANCE, image_guidance: float = DEFAULT_IMAGE_GUIDANCE,
         generator: torch.Generator | None = None, num_images_per_input: int = 1, scheduler=None,
         latents: torch.Tensor | None = None, eta: float = 0.0, progress: bool = True,
         output: str = "image") -> torch.Tensor:
    """Edit ``images`` (B, 3, H, W) in [-1, 1] following ``instructions`` (B strings).

    Returns (B * num_images_per_input, 3, H, W) in [0, 1] (outputs of one input are adjacent), or the final latents
    when ``output="latent"``. ``model`` is an ``EditorModel``; ``scheduler`` defaults to ``model.scheduler``.
    Noise is drawn with ``generator`` on its own device (use a CPU generator for device-independent results).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W); got shape {tuple(images.shape)}")
    if len(instructions) != images.shape[0]:
        raise ValueError(f"got {len(instructions)} instructions for {images.shape[0]} images; pass one per image")
    if num_images_per_input < 1:
        raise ValueError(f"num_images_per_input={num_images_per_input} must be at least 1")
    f = model.vae_scale_factor
    if images.shape[-2] % f or images.shape[-1] % f:
        raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of {f} (the VAE's downsampling)")
    scheduler = scheduler if scheduler is not None else model.scheduler
    device, dtype = model.device, model.dtype  # the UNet's: encoders may run in another precision
    n = num_images_per_input

    text = encode_text(model.text_encoder, model.tokenizer, list(instructions)).to(dtype).repeat_interleave(n, 0)
    null_text = encode_text(model.text_encoder, model.tokenizer, [""]).to(dtype).expand_as(text)
    source = encode_source(model.vae, images.to(device), scale=model.scale_source_latent)
    source = source.to(dtype).repeat_interleave(n, 0)  # (B*n, C, h, w)

    shape = (source.shape[0], model.latent_channels, *source.shape[-2:])
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape}")
    denoiser = two_scale_denoiser(model.unet, text, null_text, source, text_guidance, image_guidance,
                                  max_batch=getattr(model, "unet_batch", None))
    latents = sample(denoiser, scheduler, latents.to(device=device, dtype=dtype), steps=steps,
                     generator=generator, eta=eta, progress=progress)
    if output == "latent":
        return latents
    vae_dtype = next(model.vae.parameters()).dtype
    decoded = model.vae.decode(latents.to(vae_dtype) / vae_scaling_factor(model.vae), return_dict=False)[0]
    # Denormalised in the VAE's precision before the cast, as diffusers' VaeImageProcessor does: an fp16/bf16 model's
    # pixels then round to the same 8-bit values as diffusers' pipeline gives.
    return (decoded / 2 + 0.5).clamp(0, 1).float()
