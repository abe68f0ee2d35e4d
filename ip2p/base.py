"""The built-in task's base model: a tiny Stable Diffusion built from scratch for :mod:`ip2p.synthetic` scenes.

A user fine-tunes InstructPix2Pix from a pretrained Stable Diffusion; here nothing can be downloaded, so the base is
made locally and written as an ordinary diffusers ``StableDiffusionPipeline`` folder that ``train.py`` reads like any
other (``model.pretrained=<folder>``):

- VAE: an ``AutoencoderKL`` trained by :func:`train_vae` on ``synthetic.scene_images`` (fresh scenes every step), with
  an L1 + MSE reconstruction loss and a tiny KL weight. It downsamples by 4 into 16 channels (64x64x3 -> 16x16x16):
  the UNet then works on 16x16 latents, which a 2-core CPU trains on in minutes, and the 16 channels keep enough
  detail for exact palette colours and aliased edges. Its ``scaling_factor`` is 1 / the std of its latents, as SD's.
  The trained weights ship in ``ip2p/assets/demo_vae.safetensors`` (reproduce: ``python -m ip2p.base vae``).
- UNet: a randomly initialised text-to-image UNet (``in_channels = out_channels = latent channels``); fine-tuning
  expands its ``conv_in`` as for SD. Or (``BaseSpec.unet_pretraining``) one pretrained as a text-to-image model on
  captioned scenes by :func:`pretrain_unet` (``python -m ip2p.base unet``, on a GPU), as SD's was; measured in
  docs/demo.md, not the default.
- Text encoder: a seeded, random, frozen tiny CLIP text model (32 positions) over a CLIP BPE tokenizer in which
  every word of the training phrasings is one token and other words are characters (:mod:`ip2p.tiny`,
  :func:`ip2p.synthetic.vocabulary`): what the framework trains with (only the UNet learns). It has no knowledge of
  language, so an instruction phrased with words it never saw in training is only understood through the words it
  shares with the training phrasings (see docs/demo.md).
- Scheduler: Stable Diffusion v1's settings (``configs/demo.yaml`` fine-tunes with x0 prediction on them, rescaled to
  zero terminal SNR), or with ``BaseSpec.noise_shift`` a shifted cosine schedule (measured in docs/demo.md).

``python -m ip2p.base vae`` trains and writes the VAE asset; ``python -m ip2p.base unet`` pretrains a UNet;
``python -m ip2p.base build OUT`` writes a base folder (``--help`` lists the architecture and schedule options).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ip2p import atomic
from ip2p.scene_clip import TextPretraining

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
VAE_ASSET = ASSETS / "demo_vae.safetensors"
TEXT_ASSET = ASSETS / "demo_text_encoder.safetensors"
BASE_META_FILE = "ip2p_base.json"
PSNR_EVAL_IMAGES = 512
PSNR_EVAL_SEED = 1_000_003  # scene_images seed of the held-out images
_TRAIN_SEED_BASE = 2_000_000  # scene_images seeds of training batches: _TRAIN_SEED_BASE + 1e6 * seed + step
ORACLE_EXAMPLES = 120  # edits per test split whose exact targets vae_report round-trips through the VAE


@dataclass(frozen=True)
class VaeSpec:
    """Architecture of the base VAE (an ``AutoencoderKL``); downsampling is ``2 ** (levels - 1)``."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 16
    layers_per_block: int = 1
    norm_num_groups: int = 16
    size: int = 64


@dataclass(frozen=True)
class VaeTraining:
    """How :func:`train_vae` trains: Adam, cosine decay to 0, a fresh batch of scenes every step."""

    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-6
    seed: int = 0


@dataclass(frozen=True)
class UNetSpec:
    """Architecture of the base UNet; ``attention[i]`` puts cross-attention (and self-attention) on level ``i``."""

    block_out_channels: tuple[int, ...] = (48, 96, 128)
    layers_per_block: int = 2
    attention: tuple[bool, ...] = (False, True, True)
    attention_heads: int = 4
    norm_num_groups: int = 16
    pooled_text: bool = False
    """Also add the attention-pooled instruction to the timestep embedding (diffusers' ``addition_embed_type="text"``),
    so every ResNet block sees it; SD has cross-attention only. With it the UNet learns to use the colour word of
    background recolours within a hundred steps where cross-attention alone barely does (docs/demo-experiments.md,
    2e)."""
    scale_shift: bool = False
    """Timestep (and pooled-text) conditioning as a per-channel scale and shift of the ResNets' normalised features
    (``resnet_time_scale_shift="scale_shift"``, LDM's ``use_scale_shift_norm``) instead of SD's added bias."""


@dataclass(frozen=True)
class UNetPretraining:
    """How :func:`pretrain_unet` trains the base UNet as a text-to-image model, as Stable Diffusion was, before any
    editing: on captioned synthetic scenes (:func:`ip2p.synthetic.caption` with positions), predicting x0 on SD's
    betas rescaled to zero terminal SNR (the demo's fine-tuning settings), AdamW with warm-up and cosine decay, EMA."""

    steps: int = 12000
    batch_size: int = 256
    lr: float = 1e-3
    scenes: int = 300_000
    """Distinct scenes, drawn and VAE-encoded once, then sampled with fresh noise every step."""
    caption_dropout: float = 0.1
    """Share of captions replaced by the empty one (as SD does, so classifier-free guidance works)."""
    ema_decay: float = 0.999
    seed: int = 0


@dataclass(frozen=True)
class BaseSpec:
    """Everything that determines a base folder."""

    vae: VaeSpec = field(default_factory=VaeSpec)
    vae_training: VaeTraining = field(default_factory=VaeTraining)
    unet: UNetSpec = field(default_factory=UNetSpec)
    text_hidden_size: int = 32
    text_words: bool = True
    """Tokenizer: whole-word tokens for the training instructions' words (characters otherwise), as a BPE fitted on
    them would give; False: characters only."""
    text_max_length: int = 32
    text_layers: int = 3
    """Transformer layers of the random text encoder; 0 keeps each token's embedding unmixed (see docs/demo.md)."""
    noise_shift: float | None = None
    """None: Stable Diffusion v1's betas. A number k: the cosine schedule with its log-SNR lowered by 2 ln k
    (:func:`shifted_cosine_betas`), for images whose flat regions show through more noise than SD's schedule assumes."""
    text_pretraining: TextPretraining | None = None
    """None: a random frozen text encoder. Else one trained as the text tower of a tiny CLIP on captioned scenes
    (:func:`ensure_text_encoder`: the shipped asset when it matches, else a cached or new run, minutes on a CPU)."""
    unet_pretraining: UNetPretraining | None = None
    """None: a randomly initialised UNet. Else the UNet is pretrained as a text-to-image model (:func:`ensure_unet`:
    the shipped asset when it matches the whole spec, else a cached or new run, which wants a GPU)."""
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseSpec:
        unet = dict(data.get("unet", {}))
        for key in ("block_out_channels", "attention"):
            if key in unet:
                unet[key] = tuple(unet[key])
        vae = dict(data.get("vae", {}))
        if "block_out_channels" in vae:
            vae["block_out_channels"] = tuple(vae["block_out_channels"])
        pretraining, text = data.get("unet_pretraining"), data.get("text_pretraining")
        return cls(vae=VaeSpec(**vae), vae_training=VaeTraining(**data.get("vae_training", {})),
                   unet=UNetSpec(**unet),
                   unet_pretraining=None if pretraining is None else UNetPretraining(**pretraining),
                   text_pretraining=None if text is None else TextPretraining(**text),
                   **{k: v for k, v in data.items()
                      if k not in ("vae", "vae_training", "unet", "unet_pretraining", "text_pretraining")})


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------- VAE


def make_vae(spec: VaeSpec, seed: int = 0):
    """A randomly initialised ``AutoencoderKL`` of ``spec``."""
    from diffusers import AutoencoderKL

    levels = len(spec.block_out_channels)
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(spec.block_out_channels),
        layers_per_block=spec.layers_per_block,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.norm_num_groups,
        sample_size=spec.size,
    )


def to_model_range(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images (N, H, W, 3) as a (N, 3, H, W) float tensor in [-1, 1] on ``device``, as the VAE takes them."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _scene_batch(n: int, seed: int, size: int, device: torch.device) -> torch.Tensor:
    """``n`` synthetic scenes as a (n, 3, size, size) float tensor in [-1, 1]."""
    from ip2p.synthetic import scene_images

    return to_model_range(scene_images(n, seed, size), device)


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Decode the posterior mode of ``images`` (B, 3, H, W) in [-1, 1]; returns (B, 3, H, W) in [0, 1]."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size]
        z = vae.encode(x).latent_dist.mode()
        out.append((vae.decode(z).sample / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


@torch.no_grad()
def vae_report(vae, n: int = PSNR_EVAL_IMAGES, seed: int = PSNR_EVAL_SEED) -> dict[str, float]:
    """Held-out reconstruction quality on ``n`` fresh scenes: mean PSNR (dB, per image), L1 and worst-image PSNR.

    Images are rounded to uint8 first, as an edit written to a PNG would be.
    """
    device = next(vae.parameters()).device
    vae_mode = vae.training
    vae.eval()
    images = _scene_batch(n, seed, int(vae.config.sample_size), device)
    recon = (reconstruct(vae, images) * 255).round() / 255
    truth = images / 2 + 0.5
    mse = ((recon - truth) ** 2).flatten(1).mean(1).clamp_min(1e-10)  # (n,)
    psnr = -10 * torch.log10(mse)
    report = {
        "psnr": float(psnr.mean()),
        "psnr_min": float(psnr.min()),
        "l1": float((recon - truth).abs().mean()),
        "images": n,
        **oracle_success(vae),
    }
    vae.train(vae_mode)
    return report


@torch.no_grad()
def oracle_success(vae, n: int = ORACLE_EXAMPLES, seed: int = 0) -> dict[str, float]:
    """Success and strict success (``ip2p.eval.metrics``) of the VAE's reconstruction of the *exact* targets of ``n``
    held-out-combination edits: the best any editor working in this VAE's latent space could score."""
    from ip2p.eval.metrics import edit_success, summarise
    from ip2p.synthetic import generate_split

    device = next(vae.parameters()).device
    examples = generate_split("test_heldout_combinations", n, seed, size=int(vae.config.sample_size))
    recon = reconstruct(vae, to_model_range(np.stack([e.target for e in examples]), device))
    recon = (recon * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    summary = summarise([edit_success(r, e) for r, e in zip(recon, examples)])
    return {"oracle_success": summary["success"], "oracle_strict_success": summary["strict_success"]}


@torch.no_grad()
def latent_std(vae, n: int = 256, seed: int = PSNR_EVAL_SEED + 1) -> float:
    """Std of the posterior means of ``n`` scenes: SD-style ``scaling_factor`` is its inverse."""
    device = next(vae.parameters()).device
    images = _scene_batch(n, seed, int(vae.config.sample_size), device)
    return float(torch.cat([vae.encode(images[i:i + 64]).latent_dist.mean for i in range(0, n, 64)]).std())


def train_vae(spec: VaeSpec = VaeSpec(), training: VaeTraining = VaeTraining(), *,
              device: torch.device | str = "cpu", progress: bool = True):
    """Train a VAE of ``spec`` on fresh synthetic scenes; returns ``(vae, report)``, the VAE on the CPU in eval mode.

    Loss per step: ``L1 + MSE`` of the reconstruction of a posterior sample (in [-1, 1]) plus ``kl_weight`` times the
    per-element KL to N(0, 1). Every step draws fresh scenes (``scene_images`` seeds from ``_TRAIN_SEED_BASE`` on),
    so nothing repeats and the held-out images are never seen. ``report``: see :func:`vae_report`.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    vae = make_vae(spec, seed=training.seed).to(device).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=training.lr)
    warmup = min(200, training.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, training.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator(device="cpu").manual_seed(training.seed)
    started = time.perf_counter()
    bar = tqdm(range(training.steps), desc="VAE", disable=not progress, dynamic_ncols=True)
    for step in bar:
        x = _scene_batch(training.batch_size, _TRAIN_SEED_BASE + training.seed * 1_000_000 + step, spec.size, device)
        dist = vae.encode(x).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(device)
        recon = vae.decode(dist.mean + dist.std * noise).sample
        kl = dist.kl().mean() / (spec.latent_channels * (spec.size // 2 ** (len(spec.block_out_channels) - 1)) ** 2)
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + training.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    vae.eval()
    std = latent_std(vae)
    vae.register_to_config(scaling_factor=1.0 / std)
    report = {"train_seconds": round(time.perf_counter() - started, 1), "device": str(device), "latent_std": std,
              **vae_report(vae)}
    logger.info("VAE trained in %.0f s: held-out PSNR %.2f dB (worst image %.2f dB)", report["train_seconds"],
                report["psnr"], report["psnr_min"])
    return vae.cpu(), report


def _save_weights(module: torch.nn.Module, path: str | os.PathLike, header: dict[str, Any],
                  dtype: torch.dtype = torch.float32) -> Path:
    """Write ``module``'s weights (as ``dtype``) to one safetensors file, atomically; ``header`` values are JSON."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype).cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic.writing_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: json.dumps(v, default=list) for k, v in header.items()})
    return path


def _read_header(path: str | os.PathLike, keys: Sequence[str], writer: str) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    missing = [k for k in keys if k not in raw]
    if missing:
        raise ValueError(f"{path} lacks {missing} in its header; expected a file written by ip2p.base.{writer}")
    return {k: json.loads(raw[k]) for k in keys}


def _load_weights(cls: type, path: str | os.PathLike, header: dict[str, Any]):
    """``cls.from_config(header["config"])`` with the file's weights (cast to the model's float32), in eval mode."""
    from safetensors.torch import load_file

    config = {k: v for k, v in header["config"].items() if not k.startswith("_")}
    model = cls.from_config(config)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


_VAE_HEADER = ("config", "spec", "training", "report")


def save_vae(vae, path: str | os.PathLike, *, spec: VaeSpec, training: VaeTraining, report: dict) -> Path:
    """Write the VAE weights (float32) to one safetensors file; its header holds config, spec, training and report."""
    return _save_weights(vae, path, {"config": dict(vae.config), "spec": dataclasses.asdict(spec),
                                     "training": dataclasses.asdict(training), "report": report})


def read_vae_header(path: str | os.PathLike) -> dict[str, Any]:
    """``{"config", "spec", "training", "report"}`` of a file written by :func:`save_vae`."""
    return _read_header(path, _VAE_HEADER, "save_vae")


def load_vae(path: str | os.PathLike):
    """Load a VAE written by :func:`save_vae`; returns ``(vae, header)``."""
    from diffusers import AutoencoderKL

    header = read_vae_header(path)
    return _load_weights(AutoencoderKL, path, header), header


def _vae_matches(path: Path, spec: VaeSpec, training: VaeTraining) -> bool:
    try:
        header = read_vae_header(path)
    except (OSError, ValueError, json.JSONDecodeError):
        return False
    return header["spec"] == json.loads(json.dumps(dataclasses.asdict(spec))) and \
        header["training"] == dataclasses.asdict(training)


def ensure_vae(spec: VaeSpec, training: VaeTraining, cache_dir: str | os.PathLike, *,
               device: torch.device | str = "cpu", progress: bool = True):
    """The trained VAE of ``spec``/``training``: the shipped asset if it matches, else a cached or new training run.

    Returns ``(vae, header)``. A run is cached in ``cache_dir/vae-<digest>.safetensors``.
    """
    if _vae_matches(VAE_ASSET, spec, training):
        return load_vae(VAE_ASSET)
    digest = _digest([dataclasses.asdict(spec), dataclasses.asdict(training)])
    cached = Path(cache_dir) / f"vae-{digest}.safetensors"
    if _vae_matches(cached, spec, training):
        return load_vae(cached)
    logger.info("no trained VAE for this spec in %s or %s; training one (steps=%d)", VAE_ASSET, cached,
                training.steps)
    vae, report = train_vae(spec, training, device=device, progress=progress)
    save_vae(vae, cached, spec=spec, training=training, report=report)
    return load_vae(cached)


# ------------------------------------------------------------------------------------------------------- base folder


def shifted_cosine_betas(shift: float, steps: int = 1000, t_max: float = 0.9995) -> list[float]:
    """Betas of the cosine schedule whose log-SNR is lowered by ``2 ln shift`` at every timestep.

    The shift of "simple diffusion" (Hoogeboom et al. 2023): log-SNR(t) = -2 ln tan(pi t / 2) - 2 ln ``shift`` at
    t = (i + 1) / ``steps``, with t capped at ``t_max`` so that the last SNR is tiny but finite
    (``rescale_betas_zero_snr`` makes it exactly zero). ``shift`` = 1 is the plain cosine schedule. Diffusers
    schedulers take the result as ``trained_betas``.
    """
    if not shift > 0:
        raise ValueError(f"noise_shift must be > 0, got {shift}")
    t = np.minimum(np.arange(1, steps + 1, dtype=np.float64) / steps, t_max)
    log_snr = -2 * np.log(np.tan(np.pi * t / 2)) - 2 * np.log(shift)
    alphas_cumprod = 1 / (1 + np.exp(-log_snr))
    previous = np.concatenate([[1.0], alphas_cumprod[:-1]])
    return (1 - alphas_cumprod / previous).tolist()


def make_unet(spec: UNetSpec, latent_channels: int, cross_attention_dim: int, sample_size: int, seed: int = 0):
    """A randomly initialised text-to-image ``UNet2DConditionModel`` (``in_channels = latent_channels``)."""
    from diffusers import UNet2DConditionModel

    if len(spec.attention) != len(spec.block_out_channels):
        raise ValueError(f"unet attention={spec.attention} must have one flag per level of "
                         f"block_out_channels={spec.block_out_channels}")
    bad = [c for c in spec.block_out_channels if c % spec.norm_num_groups]
    if bad:
        raise ValueError(f"unet block_out_channels={spec.block_out_channels}: {bad} not divisible by "
                         f"norm_num_groups={spec.norm_num_groups}; use multiples of {spec.norm_num_groups}")
    if spec.pooled_text and cross_attention_dim % spec.attention_heads:
        raise ValueError(f"unet pooled_text pools the {cross_attention_dim}-wide text embeddings with "
                         f"attention_heads={spec.attention_heads} heads; make the text width a multiple of it")
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(spec.block_out_channels),
        layers_per_block=spec.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in spec.attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.attention)),
        cross_attention_dim=cross_attention_dim,
        # diffusers reads attention_head_dim as the number of heads (its documented naming slip)
        attention_head_dim=spec.attention_heads,
        norm_num_groups=spec.norm_num_groups,
        resnet_time_scale_shift="scale_shift" if spec.scale_shift else "default",
        **({"addition_embed_type": "text", "addition_embed_type_num_heads": spec.attention_heads}
           if spec.pooled_text else {}),
    )


# --------------------------------------------------------------------------------------------------- UNet pretraining

UNET_ASSET = ASSETS / "demo_unet.safetensors"
_UNET_HEADER = ("config", "spec", "report")
_PRETRAIN_SEED_BASE = 700_000  # scene stream of the pretraining scenes: _PRETRAIN_SEED_BASE + seed
CAPTION_EVAL_SEED = 800_000  # scene stream of the held-out captions of caption_report
CAPTION_EVAL_SCENES = 200
_SCENE_CHUNK = 4096


def scheduler_config(spec: BaseSpec) -> dict[str, Any]:
    """The base folder's scheduler config: SD v1's (or the shifted cosine betas, ``noise_shift``); for a pretrained
    UNet, with the prediction type and schedule it was pretrained on (x0, rescaled to zero terminal SNR)."""
    from ip2p import tiny

    config = dict(tiny.SD_SCHEDULER_CONFIG,
                  trained_betas=None if spec.noise_shift is None else shifted_cosine_betas(spec.noise_shift))
    if spec.unet_pretraining is not None:
        config.update(prediction_type="sample", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return config


def _scheduler(cls: type, config: dict[str, Any]):
    """``cls`` built from the keys of ``config`` that its constructor takes (PNDM's own keys dropped for others)."""
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in config.items() if k in accepted})


def _words(spec: BaseSpec) -> list[str]:
    """The tokenizer's whole-word tokens: the instructions' words, and the captions' too for a pretrained UNet."""
    from ip2p.synthetic import vocabulary

    captions = spec.unet_pretraining is not None or spec.text_pretraining is not None
    return vocabulary(captions=captions) if spec.text_words else []


def _tokenizer(spec: BaseSpec):
    """The base's tokenizer: whole-word tokens for :func:`_words`, characters otherwise."""
    from ip2p import tiny

    return tiny.tiny_tokenizer(_words(spec), max_length=spec.text_max_length)


def _random_text_encoder(spec: BaseSpec, vocab_size: int):
    """The seeded random tiny CLIP text model of ``spec`` (the starting point of a pretrained one too)."""
    from ip2p import tiny

    return tiny.tiny_text_encoder(vocab_size, seed=spec.seed + 2, hidden_size=spec.text_hidden_size,
                                  max_length=spec.text_max_length, num_layers=spec.text_layers)


def _text_components(spec: BaseSpec, cache_dir: str | os.PathLike | None = None, *, progress: bool = True):
    """The base's tokenizer, frozen text encoder (eval mode) and the text encoder's training report: random (report
    None), or :func:`ensure_text_encoder`'s."""
    tokenizer = _tokenizer(spec)
    if spec.text_pretraining is not None:
        text_encoder, header = ensure_text_encoder(
            spec, cache_dir if cache_dir is not None else tempfile.gettempdir(), progress=progress)
        return tokenizer, text_encoder, header["report"]
    return tokenizer, _random_text_encoder(spec, len(tokenizer)).eval().requires_grad_(False), None


def text_key(spec: BaseSpec) -> dict[str, Any]:
    """What a pretrained text encoder depends on: the tokenizer, the text model's shape and seed, the scenes, the
    training settings."""
    return {"words": _words(spec), "hidden_size": spec.text_hidden_size, "layers": spec.text_layers,
            "max_length": spec.text_max_length, "seed": spec.seed, "size": spec.vae.size,
            "training": dataclasses.asdict(spec.text_pretraining)}


def ensure_text_encoder(spec: BaseSpec, cache_dir: str | os.PathLike, *, progress: bool = True):
    """The text encoder of ``spec.text_pretraining``: the shipped asset if it matches :func:`text_key`, else
    ``cache_dir/text-<digest>.safetensors``, else a new :func:`ip2p.scene_clip.pretrain_text_encoder` run (minutes on
    a CPU), cached there. Returns ``(text_encoder, header)``."""
    from ip2p import scene_clip

    key = text_key(spec)
    if scene_clip.matches(TEXT_ASSET, key):
        return scene_clip.load_text_encoder(TEXT_ASSET)
    cached = Path(cache_dir) / f"text-{_digest(key)}.safetensors"
    if scene_clip.matches(cached, key):
        return scene_clip.load_text_encoder(cached)
    training = spec.text_pretraining
    logger.info("no pretrained text encoder for this spec in %s or %s; training one (%d steps)", TEXT_ASSET, cached,
                training.steps)
    text_encoder = _random_text_encoder(spec, len(_tokenizer(spec)))
    images, ids = captioned_scenes(training.scenes, scene_clip.TEXT_SEED_BASE + training.seed, spec,
                                   progress=progress)
    text_encoder, report = scene_clip.pretrain_text_encoder(text_encoder, images, ids, training, progress=progress)
    scene_clip.save_text_encoder(text_encoder, cached, key=key, report=report)
    return scene_clip.load_text_encoder(cached)


def _draw_captioned(seed: int, start: int, count: int, size: int, max_length: int, words: Sequence[str]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Scenes ``start .. start + count`` of stream ``seed``: images (count, H, W, 3) uint8 and the token ids of their
    captions with positions, (count, max_length) int32. Runs in worker processes."""
    from ip2p import tiny
    from ip2p.conditioning import tokenize
    from ip2p.synthetic import caption, random_scene, render_scene

    tokenizer = tiny.tiny_tokenizer(words, max_length=max_length)
    scenes = [random_scene(seed, i, size) for i in range(start, start + count)]
    ids = tokenize(tokenizer, [caption(s, positions=True) for s in scenes]).numpy()
    return np.stack([render_scene(s) for s in scenes]), ids.astype(np.int32)


def captioned_scenes(n: int, seed: int, spec: BaseSpec, *, workers: int | None = None, progress: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes of stream ``seed`` and their tokenised captions (see :func:`_draw_captioned`), drawn by
    ``workers`` processes (default: one per CPU core); the result does not depend on ``workers``."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tqdm.auto import tqdm

    jobs = [(seed, start, min(_SCENE_CHUNK, n - start), spec.vae.size, spec.text_max_length, _words(spec))
            for start in range(0, n, _SCENE_CHUNK)]
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    bar = dict(total=len(jobs), desc="scenes", unit="chunk", disable=not progress, dynamic_ncols=True)
    if workers <= 1:
        parts = [_draw_captioned(*job) for job in tqdm(jobs, **bar)]
    else:  # spawn: the parent may hold CUDA or OpenMP state that a forked child must not inherit
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            parts = list(tqdm(pool.map(_draw_captioned, *zip(*jobs)), **bar))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@torch.no_grad()
def _encode_latents(vae, images: np.ndarray, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Scaled posterior modes of uint8 images (N, H, W, 3), as the training targets: (N, C, h, w) float32 on
    ``device``."""
    scale = float(vae.config.scaling_factor)
    out = []
    for i in range(0, len(images), batch_size):
        out.append(vae.encode(to_model_range(images[i:i + batch_size], device)).latent_dist.mode() * scale)
    return torch.cat(out)


def _lr_scale(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def pretrain_unet(spec: BaseSpec, *, device: torch.device | str = "cpu", minutes: float | None = None,
                  cache_dir: str | os.PathLike | None = None, workers: int | None = None, progress: bool = True,
                  report_scenes: int = CAPTION_EVAL_SCENES):
    """Pretrain the UNet of ``spec`` as a text-to-image model (``spec.unet_pretraining``); returns ``(unet, spec,
    report)``: the UNet (EMA weights, on the CPU, eval mode), the spec with the steps actually run, and a report.

    ``minutes``: time the first 200 steps (or tenth of ``steps``), then run as many steps as fit in that many
    minutes of training (at most ``steps``) with the cosine decay fitted to them. The report holds the steps, times,
    the mean loss of the last
    100 steps and :func:`caption_report` of the result on ``report_scenes`` held-out captions.
    """
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from ip2p.conditioning import tokenize
    from ip2p.training import EMA

    training = spec.unet_pretraining
    if training is None:
        raise ValueError("spec.unet_pretraining is None; set it to an ip2p.base.UNetPretraining to pretrain")
    device = torch.device(device)
    started = time.perf_counter()
    images, ids = captioned_scenes(training.scenes, _PRETRAIN_SEED_BASE + training.seed, spec, workers=workers,
                                   progress=progress)
    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
    vae, _ = ensure_vae(spec.vae, spec.vae_training, cache, device=device, progress=progress)
    vae = vae.to(device)
    tokenizer, text_encoder, _ = _text_components(spec, cache, progress=progress)
    text_encoder = text_encoder.to(device)
    latents = _encode_latents(vae, images, device)
    del images
    ids = torch.from_numpy(ids).long().to(device)
    null_ids = tokenize(tokenizer, [""]).to(device)
    data_seconds = time.perf_counter() - started

    config = scheduler_config(spec)
    noise_scheduler = _scheduler(DDPMScheduler, config)
    timesteps = noise_scheduler.config.num_train_timesteps
    unet = make_unet(spec.unet, spec.vae.latent_channels, spec.text_hidden_size, latents.shape[-1],
                     seed=spec.seed).to(device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=training.lr, weight_decay=0.01)
    ema = EMA(params, training.ema_decay)
    generator = torch.Generator(device=device).manual_seed(training.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    total, warmup, calibrate = training.steps, min(500, training.steps // 10), min(200, max(1, training.steps // 10))
    loss_sum, recent = torch.zeros((), device=device), []
    bar = tqdm(total=total, desc="UNet", disable=not progress, dynamic_ncols=True)
    loop_started = time.perf_counter()
    step = 0
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = training.lr * _lr_scale(step, total, warmup)
        b = training.batch_size
        index = torch.randint(0, latents.shape[0], (b,), generator=generator, device=device)
        x0 = latents[index]
        drop = torch.rand(b, generator=generator, device=device) < training.caption_dropout
        tokens = torch.where(drop[:, None], null_ids, ids[index])
        with torch.no_grad():
            text = text_encoder(tokens)[0]
        t = torch.randint(0, timesteps, (b,), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        with autocast:
            pred = unet(noisy, t, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred.float(), x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.step(params)
        loss_sum += loss.detach()
        step += 1
        if step == calibrate and minutes is not None:
            per_step = (time.perf_counter() - loop_started) / step
            total = max(step, min(training.steps, int(minutes * 60 / per_step)))
            warmup = min(warmup, total // 10)
            bar.total = total
        if step % 100 == 0 or step == total:
            recent.append(loss_sum.item() / (100 if step % 100 == 0 else step % 100))
            loss_sum.zero_()
            bar.set_postfix(loss=f"{recent[-1]:.4f}")
        bar.update(1)
    bar.close()
    train_seconds = time.perf_counter() - loop_started
    ema.copy_to(params)
    unet.eval()
    spec = dataclasses.replace(spec, unet_pretraining=dataclasses.replace(training, steps=step))
    report = {"steps": step, "device": str(device), "data_seconds": round(data_seconds, 1),
              "train_seconds": round(train_seconds, 1), "loss_last": recent[-1] if recent else None,
              **caption_report(unet, vae, text_encoder, tokenizer, config, n=report_scenes)}
    logger.info("UNet pretrained: %d steps in %.0f s; held-out captions: %s", step, train_seconds,
                json.dumps({k: v for k, v in report.items() if k.startswith("caption")}))
    return unet.cpu(), spec, report


@torch.no_grad()
def caption_report(unet, vae, text_encoder, tokenizer, config: dict[str, Any], *, n: int = CAPTION_EVAL_SCENES,
                   steps: int = 20, guidance: Sequence[float] = (1.0, 3.0), seed: int = 0) -> dict[str, float]:
    """How well a text-to-image UNet draws ``n`` held-out captions (Euler, ``steps`` steps, each text guidance):
    the share of objects whose region's mean colour is nearest (Lab) to the captioned colour
    (``caption_objects_g<g>``), the same for backgrounds (``caption_backgrounds_g<g>``), and of scenes with every
    colour right (``caption_scenes_g<g>``). The regions are the caption's scene's exact masks, which a caption's
    coarse positions do not pin down: an object drawn a little off its place counts as wrong (a lower bound)."""
    from ip2p.conditioning import encode_text
    from ip2p.eval.metrics import mean_colour, nearest_palette_colour
    from ip2p.sampling import make_scheduler, sample
    from ip2p.synthetic import background_mask, caption, object_mask, random_scene

    device = next(unet.parameters()).device
    size = int(vae.config.sample_size)
    scenes = [random_scene(CAPTION_EVAL_SEED, i, size) for i in range(n)]
    cond = encode_text(text_encoder, tokenizer, [caption(s, positions=True) for s in scenes])
    uncond = encode_text(text_encoder, tokenizer, [""]).expand_as(cond)
    channels, side = int(unet.config.in_channels), int(unet.config.sample_size)
    report = {}
    for g in guidance:
        noise = torch.randn((n, channels, side, side), generator=torch.Generator().manual_seed(seed)).to(device)

        def denoiser(x: torch.Tensor, t: torch.Tensor, g: float = g) -> torch.Tensor:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, uncond])).sample
            c, u = out.chunk(2)
            return u + g * (c - u)

        latents = sample(denoiser, make_scheduler("euler", config), noise, steps=steps, progress=False)
        images = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        objects, backgrounds, whole = [], [], []
        for scene, image in zip(scenes, images):
            right = [nearest_palette_colour(mean_colour(image, object_mask(o, size))) == o.colour
                     for o in scene.objects]
            right.append(nearest_palette_colour(mean_colour(image, background_mask(scene))) == scene.background)
            objects += right[:-1]
            backgrounds.append(right[-1])
            whole.append(all(right))
        report[f"caption_objects_g{g:g}"] = float(np.mean(objects)) if objects else float("nan")
        report[f"caption_backgrounds_g{g:g}"] = float(np.mean(backgrounds))
        report[f"caption_scenes_g{g:g}"] = float(np.mean(whole))
    return report


def save_unet(unet, path: str | os.PathLike, *, spec: BaseSpec, report: dict) -> Path:
    """Write a pretrained UNet (float16 weights) to one safetensors file; its header holds config, the whole base
    spec it was pretrained for, and the report."""
    return _save_weights(unet, path, {"config": dict(unet.config), "spec": spec.to_dict(), "report": report},
                         dtype=torch.float16)


def read_unet_header(path: str | os.PathLike) -> dict[str, Any]:
    """``{"config", "spec", "report"}`` of a file written by :func:`save_unet`."""
    return _read_header(path, _UNET_HEADER, "save_unet")


def load_unet(path: str | os.PathLike):
    """Load a UNet written by :func:`save_unet` (float32); returns ``(unet, header)``."""
    from diffusers import UNet2DConditionModel

    header = read_unet_header(path)
    return _load_weights(UNet2DConditionModel, path, header), header


def _unet_matches(path: Path, spec: BaseSpec) -> bool:
    try:
        return read_unet_header(path)["spec"] == spec.to_dict()
    except (OSError, ValueError, json.JSONDecodeError):
        return False


def unet_cache_path(spec: BaseSpec, cache_dir: str | os.PathLike) -> Path:
    """Where :func:`ensure_unet` looks for (and caches) a pretrained UNet of ``spec`` besides the shipped asset."""
    return Path(cache_dir) / f"unet-{_digest(spec.to_dict())}.safetensors"


def ensure_unet(spec: BaseSpec, cache_dir: str | os.PathLike, *, device: torch.device | str = "cpu",
                progress: bool = True):
    """The pretrained UNet of ``spec``: the shipped asset if its header holds exactly this spec, else
    :func:`unet_cache_path`, else a new :func:`pretrain_unet` run (hours on a CPU; minutes on a GPU), cached there.
    Returns ``(unet, header)``."""
    if _unet_matches(UNET_ASSET, spec):
        return load_unet(UNET_ASSET)
    cached = unet_cache_path(spec, cache_dir)
    if _unet_matches(cached, spec):
        return load_unet(cached)
    training = spec.unet_pretraining
    logger.warning("no pretrained UNet for this spec in %s or %s; pretraining one on %s (%d steps of %d: wants a "
                   "GPU, see docs/demo.md)", UNET_ASSET, cached, device, training.steps, training.batch_size)
    unet, _, report = pretrain_unet(spec, device=device, cache_dir=cache_dir, progress=progress)
    save_unet(unet, cached, spec=spec, report=report)
    return load_unet(cached)


def build_base(out_dir: str | os.PathLike, spec: BaseSpec = BaseSpec(), *, cache_dir: str | os.PathLike | None = None,
               device: torch.device | str = "cpu", progress: bool = True, force: bool = False) -> Path:
    """Write the base model of ``spec`` as a diffusers ``StableDiffusionPipeline`` folder; returns ``out_dir``.

    A folder already holding the same spec (``ip2p_base.json``) is kept unless ``force``. The VAE comes from
    :func:`ensure_vae` (the shipped asset, or trained once and cached in ``cache_dir``, default ``out_dir``'s parent);
    with ``spec.unet_pretraining`` the UNet from :func:`ensure_unet` likewise, else a random one.
    """
    from diffusers import EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline

    out = Path(out_dir)
    meta = {"spec": spec.to_dict()}
    meta_path = out / BASE_META_FILE
    if out.is_dir() and any(out.iterdir()) and not meta_path.is_file():  # never replace what is not a base
        raise ValueError(f"out_dir={str(out)!r} exists and is not an ip2p base folder (no {BASE_META_FILE}); "
                         "refusing to replace it: pass a new or empty folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir={str(out)!r} is an existing file; pass a folder path for the base model")
    if not force and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()).get("spec") == meta["spec"]:
                logger.info("base model with the same spec found in %s; not rebuilding", out)
                return out
        except json.JSONDecodeError:
            pass
    cache = Path(cache_dir) if cache_dir is not None else out.parent
    vae, header = ensure_vae(spec.vae, spec.vae_training, cache, device=device, progress=progress)
    tokenizer, text_encoder, text_report = _text_components(spec, cache, progress=progress)
    if spec.unet_pretraining is None:
        latent_size = spec.vae.size // 2 ** (len(spec.vae.block_out_channels) - 1)
        unet = make_unet(spec.unet, spec.vae.latent_channels, spec.text_hidden_size, latent_size, seed=spec.seed)
        scheduler = _scheduler(PNDMScheduler, scheduler_config(spec))
    else:  # diffusers' PNDM cannot step the x0 predictions the UNet was pretrained to make
        unet, unet_header = ensure_unet(spec, cache, device=device, progress=progress)
        meta["unet_report"] = unet_header["report"]
        scheduler = _scheduler(EulerDiscreteScheduler, scheduler_config(spec))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    meta["vae_report"] = header["report"]
    if text_report is not None:
        meta["text_report"] = text_report
    meta["params"] = {name: sum(p.numel() for p in module.parameters())
                      for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    with atomic.writing_folder(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / BASE_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    logger.info("wrote the base model to %s (UNet %.2fM, VAE %.2fM, text encoder %.2fM parameters)", out,
                *(meta["params"][k] / 1e6 for k in ("unet", "vae", "text_encoder")))
    return out


def read_base_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``ip2p_base.json`` of a base folder written by :func:`build_base` ({} if absent)."""
    path = Path(folder) / BASE_META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------------------------------------------- CLI


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated whole numbers, e.g. 48,96,128") from None


def _flags(text: str) -> tuple[bool, ...]:
    values = text.split(",")
    if any(v not in ("0", "1") for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated 0/1 flags, e.g. 0,1,1")
    return tuple(v == "1" for v in values)


_UNET_PRETRAINING_OPTIONS = ("steps", "batch_size", "lr", "scenes", "caption_dropout", "ema_decay")
_VAE_TRAINING_OPTIONS = ("steps", "batch_size", "lr", "kl_weight", "seed")
_TEXT_PRETRAINING_OPTIONS = tuple(f.name for f in dataclasses.fields(TextPretraining))


def _add_field_options(parser: argparse.ArgumentParser, defaults: Any, names: Sequence[str], prefix: str,
                       what: str) -> None:
    """``--<prefix><name>`` for each dataclass field in ``names``, typed and defaulted from ``defaults``."""
    for name in names:
        default = getattr(defaults, name)
        parser.add_argument(f"--{prefix}{name.replace('_', '-')}", type=type(default), default=default,
                            help=f"{what} {name} (default {default})")


def _fields_from_args(parser: argparse.ArgumentParser, cls: type, args: argparse.Namespace, names: Sequence[str],
                      prefix: str) -> Any:
    """``cls`` with the fields in ``names`` read from the options :func:`_add_field_options` added; counts must be at
    least 1 (a seed at least 0), other numbers finite and not negative, a learning rate above 0."""
    values = {name: getattr(args, prefix.replace("-", "_") + name) for name in names}
    for name, value in values.items():
        lowest = 0 if name == "seed" or isinstance(value, float) else 1
        if not math.isfinite(value) or value < lowest or (name == "lr" and value <= 0):
            parser.error(f"--{prefix}{name.replace('_', '-')} {value} must be "
                         + ("a number > 0" if name == "lr" else f"a finite number >= {lowest}"))
    return cls(**values)


def _add_unet_options(parser: argparse.ArgumentParser) -> None:
    """The UNet, noise schedule and UNet pretraining options of ``build`` and ``unet``."""
    unet_defaults, base_defaults = UNetSpec(), BaseSpec()
    parser.add_argument("--unet-channels", type=_ints, default=unet_defaults.block_out_channels,
                        help="UNet block_out_channels, comma-separated")
    parser.add_argument("--unet-layers", type=int, default=unet_defaults.layers_per_block,
                        help="UNet layers per block")
    parser.add_argument("--unet-attention", type=_flags, default=None,
                        help="cross-attention per UNet level, comma-separated 0/1 (default: all but the first)")
    parser.add_argument("--pooled-text", action="store_true",
                        help="also add the attention-pooled instruction to the UNet's timestep embedding (default: "
                             "cross-attention only, as SD)")
    parser.add_argument("--scale-shift", action="store_true",
                        help="timestep conditioning as a scale and shift of the ResNets' features (default: an "
                             "added bias, as SD)")
    parser.add_argument("--noise-shift", type=float, default=base_defaults.noise_shift,
                        help="a shifted cosine noise schedule, log-SNR lowered by 2 ln k (default: SD v1's betas)")
    _add_field_options(parser, UNetPretraining(), _UNET_PRETRAINING_OPTIONS, "pretrain-", "UNet pretraining")


def _add_text_options(parser: argparse.ArgumentParser, *, choose: bool) -> None:
    """The text encoder's options; ``choose`` adds ``--pretrained-text`` (the ``text`` command always pretrains)."""
    base_defaults = BaseSpec()
    parser.add_argument("--text-hidden-size", type=int, default=base_defaults.text_hidden_size,
                        help="width of the text encoder (and the UNet's cross_attention_dim)")
    parser.add_argument("--text-layers", type=int, default=base_defaults.text_layers,
                        help="transformer layers of the text encoder (0: embeddings only)")
    if choose:
        parser.add_argument("--pretrained-text", action="store_true",
                            help="a text encoder trained as a tiny CLIP's text tower (the shipped asset, or one "
                                 "trained and cached now, minutes on a CPU) instead of a random one")
    _add_field_options(parser, TextPretraining(), _TEXT_PRETRAINING_OPTIONS, "text-", "text encoder pretraining")


def _spec_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, pretrained: bool) -> BaseSpec:
    """The :class:`BaseSpec` of the parsed options. A command without the UNet options (``text``) gets the default
    UNet, and one without ``--pretrained-text`` always pretrains the text encoder."""
    if not hasattr(args, "unet_channels"):
        unet, noise_shift = UNetSpec(), BaseSpec().noise_shift
    else:
        if min(args.unet_channels + (args.unet_layers,)) < 1:
            parser.error(f"--unet-channels {','.join(map(str, args.unet_channels))} and --unet-layers "
                         f"{args.unet_layers} must be at least 1")
        levels = len(args.unet_channels)
        attention = args.unet_attention if args.unet_attention is not None else (False,) + (True,) * (levels - 1)
        if len(attention) != levels:
            parser.error(f"--unet-attention has {len(attention)} flags; --unet-channels has {levels} levels")
        unet = UNetSpec(block_out_channels=args.unet_channels, layers_per_block=args.unet_layers,
                        attention=attention, pooled_text=args.pooled_text, scale_shift=args.scale_shift)
        noise_shift = args.noise_shift
    if args.text_hidden_size < 1 or args.text_layers < 0:
        parser.error(f"--text-hidden-size {args.text_hidden_size} must be at least 1 and --text-layers "
                     f"{args.text_layers} at least 0")
    from ip2p import tiny

    if args.text_hidden_size % tiny.TEXT_ATTENTION_HEADS:  # CLIPTextConfig refuses it, with a traceback
        parser.error(f"--text-hidden-size {args.text_hidden_size} must be a multiple of the text encoder's "
                     f"{tiny.TEXT_ATTENTION_HEADS} attention heads, e.g. 32")
    pretraining = (_fields_from_args(parser, UNetPretraining, args, _UNET_PRETRAINING_OPTIONS, "pretrain-")
                   if pretrained else None)
    text = (_fields_from_args(parser, TextPretraining, args, _TEXT_PRETRAINING_OPTIONS, "text-")
            if getattr(args, "pretrained_text", True) else None)
    return BaseSpec(unet=unet, text_hidden_size=args.text_hidden_size, text_layers=args.text_layers,
                    noise_shift=noise_shift, unet_pretraining=pretraining, text_pretraining=text)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ip2p.base vae``, ``python -m ip2p.base unet`` or ``python -m ip2p.base build OUT``."""
    parser = argparse.ArgumentParser(prog="python -m ip2p.base", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    vae_p = sub.add_parser("vae", help="train the base VAE on synthetic scenes and write it (default: the asset)")
    vae_p.add_argument("--out", default=str(VAE_ASSET), help=f"safetensors file to write (default {VAE_ASSET})")
    defaults_spec, defaults_training = VaeSpec(), VaeTraining()
    vae_p.add_argument("--channels", type=_ints, default=defaults_spec.block_out_channels,
                       help="block_out_channels, comma-separated (levels - 1 = log2 of the downsampling)")
    vae_p.add_argument("--latent-channels", type=int, default=defaults_spec.latent_channels)
    vae_p.add_argument("--layers-per-block", type=int, default=defaults_spec.layers_per_block)
    _add_field_options(vae_p, defaults_training, _VAE_TRAINING_OPTIONS, "", "VAE training")
    unet_p = sub.add_parser("unet", help="pretrain the base UNet as a text-to-image model on captioned scenes and "
                                         "write it (default: ip2p/assets/demo_unet.safetensors, not shipped yet; "
                                         "wants a GPU)")
    unet_p.add_argument("--out", default=str(UNET_ASSET), help=f"safetensors file to write (default {UNET_ASSET})")
    _add_unet_options(unet_p)
    _add_text_options(unet_p, choose=True)
    unet_p.add_argument("--minutes", type=float, default=None,
                        help="fit the number of steps (at most --pretrain-steps) to this many minutes of training")
    unet_p.add_argument("--workers", type=int, default=None, help="processes drawing scenes (default: CPU cores)")
    unet_p.add_argument("--cache-dir", default=None, help="where a VAE other than the shipped one is cached")
    text_p = sub.add_parser("text", help="train the base text encoder as a tiny CLIP's text tower on captioned "
                                         "scenes and write it (default: the asset)")
    text_p.add_argument("--out", default=str(TEXT_ASSET), help=f"safetensors file to write (default {TEXT_ASSET})")
    _add_text_options(text_p, choose=False)
    for p in (vae_p, unet_p):
        p.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    build_p = sub.add_parser("build", help="write the base model as a diffusers folder")
    build_p.add_argument("out", help="folder to write")
    build_p.add_argument("--force", action="store_true")
    build_p.add_argument("--pretrained-unet", action="store_true",
                         help="a UNet pretrained as text-to-image (ip2p/assets/demo_unet.safetensors, not shipped "
                              "yet, or one from `unet`, found in OUT's parent as unet-<digest>.safetensors; with "
                              f"neither, one is pretrained now: {UNetPretraining().steps} steps of "
                              f"{UNetPretraining().batch_size}, meant for a GPU) instead of a "
                              "random one")
    _add_unet_options(build_p)
    _add_text_options(build_p, choose=True)
    args = parser.parse_args(argv)
    # Errors in a command's options print that command's usage ("python -m ip2p.base build ..."), not the top one's.
    parser = {"vae": vae_p, "unet": unet_p, "text": text_p, "build": build_p}[args.command]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Settings that would fail (or write over a folder) after minutes of training fail here.
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            parser.error(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    if getattr(args, "device", None) is not None:
        from ip2p.devices import resolve_device

        try:
            args.device = str(resolve_device(args.device))
        except ValueError as e:
            parser.error(str(e))
    if args.command != "build" and Path(args.out).is_dir():
        parser.error(f"--out {args.out!r} is a folder; pass the .safetensors file to write")
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"{args.out!r} cannot be written ({e.strerror}); pass a path in a folder you can write to")
    if args.command == "vae":
        spec = VaeSpec(block_out_channels=args.channels, latent_channels=args.latent_channels,
                       layers_per_block=args.layers_per_block)
        training = _fields_from_args(parser, VaeTraining, args, _VAE_TRAINING_OPTIONS, "")
        if min(args.channels + (args.latent_channels, args.layers_per_block)) < 1:
            parser.error(f"--channels {','.join(map(str, args.channels))}, --latent-channels {args.latent_channels} "
                         f"and --layers-per-block {args.layers_per_block} must be at least 1")
        if Path(args.out).resolve() == VAE_ASSET.resolve() and (spec, training) != (VaeSpec(), VaeTraining()):
            # ensure_vae uses the asset only for the default settings: other ones would make every demo retrain it
            parser.error(f"--out defaults to the shipped {VAE_ASSET.name}, which holds the default settings; pass "
                         "--out FILE to write a VAE of other settings")
        vae, report = train_vae(spec, training, device=args.device)
        path = save_vae(vae, args.out, spec=spec, training=training, report=report)
        logger.info("wrote %s (%.2f MB): %s", path, path.stat().st_size / 1e6, json.dumps(report))
    elif args.command == "text":
        from ip2p import scene_clip

        spec = _spec_from_args(parser, args, pretrained=False)
        if scene_clip.matches(Path(args.out), text_key(spec)):
            logger.info("%s already holds the text encoder of these settings; nothing to do", args.out)
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            try:
                text_encoder, header = ensure_text_encoder(spec, tmp)
            except ValueError as e:
                parser.error(str(e))
            path = scene_clip.save_text_encoder(text_encoder, args.out, key=header["key"], report=header["report"])
        logger.info("wrote %s (%.2f MB): %s", path, path.stat().st_size / 1e6, json.dumps(header["report"]))
    elif args.command == "unet":
        if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
            parser.error(f"--minutes {args.minutes} must be a number > 0")
        spec = _spec_from_args(parser, args, pretrained=True)
        try:
            unet, spec, report = pretrain_unet(spec, device=args.device, minutes=args.minutes,
                                               cache_dir=args.cache_dir, workers=args.workers)
        except ValueError as e:
            parser.error(str(e))
        path = save_unet(unet, args.out, spec=spec, report=report)
        logger.info("wrote %s (%.2f MB), spec digest %s: %s", path, path.stat().st_size / 1e6,
                    unet_cache_path(spec, ".").name, json.dumps(report))
    else:
        spec = _spec_from_args(parser, args, pretrained=args.pretrained_unet)
        try:
            out = build_base(args.out, spec, force=args.force)
        except ValueError as e:
            parser.error(str(e))
        except OSError as e:  # OUT below a file, or on a read-only or full disk
            parser.error(f"cannot write the base model to {args.out!r}: {e.strerror or e}; pass a folder you can "
                         "write to")
        logger.info("base model: %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
