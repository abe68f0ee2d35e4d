"""Fine-tuning loop: train step, EMA, checkpoints, validation, final export (SPEC sections 2 and 3).

Determinism across process counts: every per-example random draw (timestep, dropout, noise, VAE posterior sample,
augmentation) comes from a generator keyed by (seed, global example index), and each process takes its slice of the
same global batch, so 1 process and N processes reach the same weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import ip2p
from ip2p import config as cfgmod
from ip2p.atomic import chmod_tree, fsync_tree, remove_stale, remove_stale_under, swap_in, writing_file
from ip2p.conditioning import (
    apply_dropout,
    dropout_masks,
    encode_posterior,
    encode_source,
    encode_text,
    sample_posterior,
    vae_scaling_factor,
)
from ip2p.config import Config
from ip2p.models import expand_conv_in, load_components, vae_downsampling
from ip2p.sampling import trained_scheduler_config

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
# The example_generator stream of the train step's draws (timestep, dropout, noise, posterior sample, in that order);
# augmentation draws from its own stream, so changing one never shifts the other.
TRAIN_PURPOSE = 1  # == ip2p.data.Purpose.NOISE


# ---- EMA ---------------------------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of parameters with the warm-up ramp min(decay, (1 + n) / (10 + n)) (orig code)."""

    def __init__(self, parameters, decay: float = 0.9999):
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().float().clone() for p in parameters]

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def step(self, parameters) -> None:
        d = self.current_decay()
        for s, p in zip(self.shadow, parameters):
            s.mul_(d).add_(p.detach().float(), alpha=1 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, parameters) -> None:
        for s, p in zip(self.shadow, parameters):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.num_updates = int(state["num_updates"])
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors; the model has {len(self.shadow)}")
        self.shadow = [s.float().clone() for s in state["shadow"]]


# ---- pure pieces of the train step ---------------------------------------------------------------------------------

@dataclass
class StepDraws:
    """Per-example random draws for one micro-batch, each row from its own example's generator."""

    timesteps: torch.Tensor  # (B,) int64
    dropout_r: torch.Tensor  # (B,) in [0, 1)
    noise: torch.Tensor  # (B, C, h, w)
    posterior: list[torch.Generator]  # generators left positioned for the VAE posterior sample
    offset: torch.Tensor  # (B, C, 1, 1)


def draw_step(indices: list[int], seed: int, num_timesteps: int, latent_shape: tuple[int, int, int],
              timestep_bias: float = 1.0) -> StepDraws:
    """Draw timestep, dropout uniform, noise and offset noise for each global example index, in a fixed order.

    ``timestep_bias`` k maps each uniform timestep draw through :func:`bias_timesteps`; k = 1 leaves it uniform.
    """
    from ip2p.data import example_generator

    ts, rs, noise, offset, gens = [], [], [], [], []
    for index in indices:
        g = example_generator(seed, int(index), TRAIN_PURPOSE)
        t = torch.randint(0, num_timesteps, (1,), generator=g)
        ts.append(t if timestep_bias == 1 else bias_timesteps(t, num_timesteps, timestep_bias))
        rs.append(torch.rand(1, generator=g))
        noise.append(torch.randn(latent_shape, generator=g))
        offset.append(torch.randn(latent_shape[0], 1, 1, generator=g))
        gens.append(g)
    return StepDraws(torch.cat(ts), torch.cat(rs), torch.stack(noise), gens, torch.stack(offset))


def bias_timesteps(timesteps: torch.Tensor, num_timesteps: int, k: float) -> torch.Tensor:
    """Map uniform timestep draws t to T(1 - (1 - u)^k), u = (t + 1/2) / T, so that a share 0.2^(1/k) of them falls in
    the noisiest 20% of the schedule (k = 2: 45%, 3: 58%; uniform: 20%); the least noisy steps are then drawn about k
    apart. A deterministic function of the uniform draw, so the random stream (and resuming) is the same for every k."""
    u = (timesteps.double() + 0.5) / num_timesteps
    return (num_timesteps * (1 - (1 - u) ** k)).long().clamp(0, num_timesteps - 1)


def edit_region_weights(target: torch.Tensor, source: torch.Tensor, weight: float, threshold: float) -> torch.Tensor:
    """Per-latent-pixel loss weights: 1 + ``weight`` where the edit changes the latent (the channel-mean squared
    difference of ``target`` and ``source``, both on the UNet's latent scale, exceeds ``threshold``), else 1.
    (B, C, h, w) -> (B, 1, h, w)."""
    changed = (target.float() - source.float()).pow(2).mean(1, keepdim=True) > threshold
    return 1 + weight * changed.float()


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for epsilon, v or sample (x0) targets. Returns (B,).

    Each target's MSE is the x0 MSE times a factor of the SNR (snr for epsilon, snr + 1 for v, 1 for x0); the weight
    makes every one of them min(snr, gamma) times the x0 MSE.
    """
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "sample":
        return clipped
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def per_example_mse(pred: torch.Tensor, target: torch.Tensor, pixel_weights: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Mean squared error per example, in float32. (B, ...) -> (B,).

    ``pixel_weights`` (B, 1, h, w) makes it a weighted mean over the pixels (the weights are normalised per example,
    so the loss keeps its scale)."""
    se = F.mse_loss(pred.float(), target.float(), reduction="none")
    if pixel_weights is None:
        return se.flatten(1).mean(1)
    w = pixel_weights.float().expand_as(se)
    return (se * w).flatten(1).sum(1) / w.flatten(1).sum(1)


# ---- checkpoints ---------------------------------------------------------------------------------------------------

def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def recover_checkpoints(output_dir: str | os.PathLike) -> None:
    """Delete what killed saves and prunes left (``.tmp-step-*``, ``.del-step-*``) and put back a checkpoint that a
    killed save had moved aside to replace it (``.step-NNNNNN.old-*``: a resumed run saving a step again, killed
    between the two renames). Run by the main process before resuming and before each save."""
    root = checkpoint_dir(output_dir)
    if root.is_dir():
        for stale in root.glob(".*-step-*"):  # left by a save or a prune that was killed
            shutil.rmtree(stale, ignore_errors=True)
        for moved in root.glob(".step-*.old-*"):
            remove_stale(root / moved.name[1:].split(".old-")[0])


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (a folder only gets its final name once fully written), oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / "ip2p_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(resume: str | None, output_dir: str) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.info("resume=latest: no checkpoint in %s yet, starting from scratch", checkpoint_dir(output_dir))
            return None
        return found[-1][1]
    path = Path(resume)
    if not (path / "ip2p_state.json").is_file():
        raise FileNotFoundError(f"resume={resume!r} is not a checkpoint folder (no ip2p_state.json); use 'latest' "
                                f"or a path like {checkpoint_dir(output_dir)}/step-000100")
    return path


def damaged_file(folder: str | os.PathLike) -> Path | None:
    """The first file of checkpoint ``folder`` that a torn write (a copy or a disk that stopped halfway) left
    unreadable, by cheap checks of each file's structure: a safetensors header that does not cover the file, a torch
    zip archive without its directory, JSON that does not parse. None if each looks whole."""
    import zipfile

    from safetensors import safe_open

    for path in sorted(Path(folder).iterdir()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt"):
                    pass
            elif path.suffix in (".bin", ".pkl"):
                with open(path, "rb") as handle:
                    if handle.read(4) in (b"PK\x03\x04", b""):  # torch.save's zip format; empty is torn too
                        zipfile.ZipFile(path).close()
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception:  # each library raises its own type for a torn file
            return path
    return None


# Settings whose change makes a checkpoint's state unloadable (other shapes, other optimizer state).
_STATE_SHAPING = ("model.pretrained", "model.config_dir", "train.optimizer", "train.lora_rank", "train.lora_targets")


# ---- the loop ------------------------------------------------------------------------------------------------------

# Examples from the start of a run (or the whole dataset, if smaller) that may all be bad before the run stops.
_NO_VALID_LIMIT = 256


def _stack_to(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``torch.stack(parts)`` on ``device``: one copy when every part is in host memory (the caches), not one each."""
    if all(p.device.type == "cpu" for p in parts):
        return torch.stack(parts).to(device)
    return torch.stack([p.to(device) for p in parts])


class _Preemption:
    """SIGTERM (cluster preemption) sets a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_Preemption":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook helper thread): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _check_optional_packages(cfg: Config) -> None:
    """Refuse settings whose optional package is not installed (found without importing it)."""
    import importlib.util

    for key, value, package, alternative in (("model.attention", "xformers", "xformers", "sdpa"),
                                             ("train.optimizer", "adamw8bit", "bitsandbytes", "adamw")):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) == value and importlib.util.find_spec(package) is None:
            raise ValueError(f"{key}={value} needs {package}, which is not installed: pip install {package}, or use "
                             f"{key}={alternative}")


def _set_attention(unet, kind: str) -> None:
    if kind == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ValueError("model.attention=xformers but xformers is not installed; pip install xformers, or use "
                             "model.attention=sdpa (the default)") from None
        unet.enable_xformers_memory_efficient_attention()
    # sdpa: diffusers' default processors already use torch's scaled_dot_product_attention.


def _remove_earlier_export(path: Path, why: str) -> None:
    """Delete an earlier run's export file at ``path``, if there is one, and say so."""
    if path.exists():
        path.unlink()
        logger.info("removed the earlier export's %s (%s)", path, why)


def _trainable(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters training updates, in a fixed order (all of them, or LoRA's adapters and conv_in)."""
    return [p for p in unet.parameters() if p.requires_grad]


def _make_optimizer(cfg: Config, params):
    t = cfg.train
    kwargs = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes); "
                             "or use train.optimizer=adamw") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


_DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".tsv")


def _data_fingerprint(path: str) -> list[tuple[str, int, int]]:
    """Names, sizes and modification times of a local dataset's data and metadata files (parquet, arrow, JSON lines,
    CSV; not the images they name), so that an edited dataset at the same path does not reuse another's latent cache.
    Empty for a hub id."""
    root = Path(path)
    if root.is_file():
        st = root.stat()
        return [(root.name, st.st_size, st.st_mtime_ns)]
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(_DATA_SUFFIXES):
                full = Path(dirpath) / name
                st = full.stat()
                found.append((full.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return found


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


class Trainer:
    """Holds the run's state; ``run()`` trains to ``train.max_steps`` and exports the final model."""

    def __init__(self, cfg: Config):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        _check_optional_packages(cfg)  # before anything loads: a missing package must not cost a model download first
        trackers = list(cfg.trackers)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # Accelerate only sets up multi-process CPU training (gloo) when told it runs on the CPU; without this,
        # `torchrun` on a machine with no accelerator would start independent single-process runs.
        cpu = world > 1 and not torch.accelerator.is_available()
        self.accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.gradient_accumulation,
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        set_seed(cfg.seed)
        acc = self.accelerator
        if cfg.train.mixed_precision == "fp16" and acc.device.type == "cpu":  # it failed in the first matmul
            raise ValueError("train.mixed_precision=fp16 needs a GPU; on the CPU use train.mixed_precision=bf16 "
                             "or no")
        if world != acc.num_processes:
            raise ValueError(f"WORLD_SIZE={world} processes were launched but Accelerate set up {acc.num_processes}; "
                             "launch with `accelerate launch` or `torchrun`, and check the Accelerate config")
        self.is_main = acc.is_main_process
        if not self.is_main and not any(isinstance(f, _ErrorsOnly) for f in logger.filters):
            logger.addFilter(_ErrorsOnly())  # the run's messages once, from the main process; errors from every one
        if self.is_main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=self.out).close()  # an existing folder we cannot write to fails now too
            except OSError as e:  # a file in the way, no permission
                raise ValueError(f"output_dir={cfg.output_dir!r} cannot be used as the run folder ({e.strerror}: "
                                 f"{e.filename}); choose another output_dir") from None

        # The data is opened before the base model (minutes for Stable Diffusion) so that a wrong data.path, split or
        # column is an error now; every data loader of the run reads these records.
        from ip2p.data import ColumnMap, open_records

        d = cfg.data
        self.records = open_records(d.path, split=d.split, streaming=d.streaming, subset=d.subset,
                                    columns=ColumnMap(d.source_column, d.instruction_column, d.target_column))
        components, _ = load_components(cfg.model.pretrained, config_dir=cfg.model.config_dir)
        self.tokenizer = components["tokenizer"]
        self.base_scheduler_config = dict(components["scheduler"].config)
        self.base_scheduler_config = trained_scheduler_config(self.base_scheduler_config, cfg.model.prediction_type,
                                                              cfg.model.zero_terminal_snr)
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(self.base_scheduler_config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in cfgmod.PREDICTION_TYPES:
            raise ValueError(f"prediction type {self.prediction_type!r} of {cfg.model.pretrained} is not supported; "
                             f"set model.prediction_type to one of {', '.join(cfgmod.PREDICTION_TYPES)}")
        if self.base_scheduler_config.get("rescale_betas_zero_snr") and self.prediction_type == "epsilon":
            raise cfgmod.ConfigError("model.zero_terminal_snr: the noise at the last timestep says nothing about "
                                     "the image, so epsilon prediction cannot work; set model.prediction_type to "
                                     "v_prediction or sample")
        if cfg.validation.images:  # a sampler that cannot step this prediction type, or as many steps, fails now
            from ip2p.sampling import check_steps, make_scheduler

            try:
                sampler = make_scheduler(cfg.validation.scheduler, self.base_scheduler_config)
            except ValueError as e:
                raise cfgmod.ConfigError(f"validation.scheduler: {e}") from None
            try:
                check_steps(sampler, cfg.validation.steps)
            except ValueError as e:
                raise cfgmod.ConfigError(f"validation.steps: {e}") from None
            from ip2p.images import load_image

            for path in cfg.validation.images:  # a missing image would otherwise stop the run at its first validation
                try:
                    load_image(path)
                except (FileNotFoundError, ValueError) as e:
                    raise type(e)(f"validation.images: {e}") from None

        unet = components["unet"]
        self.latent_channels = int(components["vae"].config.latent_channels)
        # Every rank expands identically (zeros and copies), so all start from the same weights.
        expand_conv_in(unet, self.latent_channels)
        from ip2p.lora import DEFAULT_TARGETS

        if not cfg.train.lora_rank and (cfg.train.lora_alpha or list(cfg.train.lora_targets) != list(DEFAULT_TARGETS)):
            logger.warning("train.lora_alpha / train.lora_targets are set but train.lora_rank=0 trains the whole UNet; "
                           "set train.lora_rank=R for LoRA")
        if cfg.train.lora_rank:
            from ip2p.lora import add_lora

            wrapped = add_lora(unet, cfg.train.lora_rank, cfg.train.lora_alpha, cfg.train.lora_targets)
            log = logger.info if acc.is_main_process else logger.debug  # once per run, not once per process
            log("LoRA rank %d on %d layers and the whole conv_in: %d of %d UNet parameters train",
                cfg.train.lora_rank, wrapped, sum(p.numel() for p in _trainable(unet)),
                sum(p.numel() for p in unet.parameters()))
        _set_attention(unet, cfg.model.attention)
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            cfg.train.mixed_precision]
        self.vae = components["vae"].requires_grad_(False).eval()
        self.text_encoder = components["text_encoder"].requires_grad_(False).eval()
        for frozen in (self.vae, self.text_encoder):
            # The frozen encoders run in the mixed-precision dtype; only the trained UNet keeps fp32 master weights.
            frozen.to(acc.device, **({} if self.weight_dtype == torch.float32 else {"dtype": self.weight_dtype}))
        unet.to(acc.device)

        self.ema = EMA(_trainable(unet), cfg.train.ema_decay) if cfg.train.ema else None
        optimizer = _make_optimizer(cfg, _trainable(unet))
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(cfg.train.lr_schedule, optimizer=optimizer,
                                          num_warmup_steps=cfg.train.lr_warmup_steps,
                                          num_training_steps=cfg.train.max_steps)
        # The LR scheduler is stepped by hand once per optimizer step (accelerate would step it once per process).
        self.unet, self.optimizer = acc.prepare(unet, optimizer)
        acc.register_for_checkpointing(self.lr_scheduler)
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)

        self.null_text = encode_text(self.text_encoder, self.tokenizer, [""])  # (1, L, D), computed once
        # Both in-memory caches (data.cache) hold CPU tensors, up to data.cache_memory_gb together: a dataset of
        # millions of records would otherwise fill the GPU hours into a run (SD's 77 x 768 embedding is 118 kB).
        self.text_cache: dict[str, tuple[torch.Tensor]] = {}
        # record number -> (source latent, target posterior mean, std); filled in the first epoch (data.cache).
        self.latent_cache: dict[int, tuple[torch.Tensor, ...]] = {}
        self.cache_bytes = 0
        self._cache_budget = int(cfg.data.cache_memory_gb * 2**30)
        self._cache_full_logged = False
        self._cache_dir: Path | None = None
        self.global_step = 0
        self.saved_step: int | None = None  # the step of the checkpoint this run last saved or loaded
        self.global_batch = cfg.train.batch_size * acc.num_processes * cfg.train.gradient_accumulation
        self.samples_seen = 0
        self.bad_records = 0
        self.skipped_steps = 0  # steps whose whole batch was bad records (persisted with bad_records)
        self.resumed = False  # whether run() loaded a checkpoint
        self.vae_scale = vae_downsampling(self.vae)

    # -- data --
    def _batches(self, start_step: int, cached_records: frozenset[int] = frozenset()):
        """The data loader from micro-step ``start_step``; ``cached_records`` (in the latent cache) are not decoded."""
        from ip2p.data import AugmentConfig, EditBatches, make_dataloader

        d = self.cfg.data
        augment = AugmentConfig(resolution=d.resolution, random_resize=tuple(d.random_resize),
                                random_crop=d.random_crop, random_flip=d.random_flip)
        batches = EditBatches(self.records, batch_size=self.cfg.train.batch_size, rank=self.accelerator.process_index,
                              world_size=self.accelerator.num_processes, seed=self.cfg.seed, augment=augment,
                              shuffle=d.shuffle, start_step=start_step, num_workers=d.num_workers,
                              cached_records=cached_records)
        return make_dataloader(batches, num_workers=d.num_workers)

    def _remember(self, cache: dict, key: Any, value: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Put a CPU copy of ``value`` in ``cache`` while the caches stay within data.cache_memory_gb; returns it."""
        size = sum(t.numel() * t.element_size() for t in value) + 256  # + the dict entry and tensor objects
        if self.cache_bytes + size > self._cache_budget:
            if self._cache_budget and not self._cache_full_logged:
                self._cache_full_logged = True
                latents = (f" or read from {self._cache_folder()} (latents)"
                           if self.cfg.data.cache == "text+latents" else "")
                logger.info("data.cache: the in-memory caches reached data.cache_memory_gb=%g at %d instructions and "
                            "%d records; the rest are encoded each time (instructions)%s",
                            self.cfg.data.cache_memory_gb, len(self.text_cache), len(self.latent_cache), latents)
            return value
        self.cache_bytes += size
        cache[key] = stored = tuple(t.detach().to("cpu", copy=True) for t in value)
        return stored

    def _encode_instructions(self, instructions: list[str]) -> torch.Tensor:
        if self.cfg.data.cache == "none":
            return encode_text(self.text_encoder, self.tokenizer, instructions)
        found = {s: self.text_cache[s][0] for s in set(instructions) if s in self.text_cache}
        missing = sorted(set(instructions) - found.keys())
        if missing:
            for s, e in zip(missing, encode_text(self.text_encoder, self.tokenizer, missing)):
                found[s] = self._remember(self.text_cache, s, (e,))[0]
        device = self.accelerator.device
        return _stack_to([found[s] for s in instructions], device)

    def _encode_images(self, source: torch.Tensor, target: torch.Tensor, records: list[int], valid: list[bool]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Source latent and target posterior (mean, std), from the latent cache where ``data.cache`` allows.

        The cache holds the deterministic part of the encoding (the posterior's parameters, not a sample), so a cached
        run draws the same target latents as an uncached one. It lives in memory and on disk under
        ``<output_dir>/cache/`` (one small safetensors file per record, written atomically), so a resumed or
        restarted run does not encode again.
        """
        scale = self.cfg.model.scale_source_latent
        if self.cfg.data.cache != "text+latents":
            src = encode_source(self.vae, source, scale=scale).float()
            mean, std = encode_posterior(self.vae, target)
            return src, mean.float(), std.float()
        found: dict[int, tuple[torch.Tensor, ...]] = {}
        for r, ok in zip(records, valid):
            if ok and r not in found:
                entry = self.latent_cache.get(r) or self._load_cached(r)
                if entry is not None:
                    found[r] = entry
        todo = [i for i, (r, ok) in enumerate(zip(records, valid)) if ok and r not in found]
        if todo:
            src = encode_source(self.vae, source[todo], scale=scale).float()
            mean, std = encode_posterior(self.vae, target[todo])
            for j, i in enumerate(todo):
                entry = (src[j], mean[j].float(), std[j].float())
                found[records[i]] = self._remember(self.latent_cache, records[i], entry)
                self._store_cached(records[i], entry)
        h, w = source.shape[-2] // self.vae_scale, source.shape[-1] // self.vae_scale
        blank = torch.zeros(self.latent_channels, h, w)
        rows = [found[r] if ok else (blank, blank, blank) for r, ok in zip(records, valid)]
        return tuple(_stack_to([row[k] for row in rows], source.device) for k in range(3))

    def _cache_folder(self) -> Path:
        if self._cache_dir is None:
            d = self.cfg.data
            # A cache is only valid for the same data (its subset, columns and, for a local dataset, its data files'
            # names, sizes and times), split, preprocessing and VAE (in the precision it encodes with): they name its
            # folder. The keys added later join only when set, so that earlier caches stay valid.
            precision = self.cfg.train.mixed_precision
            key = json.dumps([d.path, d.split, d.resolution, d.random_resize, self.cfg.model.pretrained,
                              self.cfg.model.scale_source_latent, d.source_column, d.instruction_column,
                              d.target_column, _data_fingerprint(d.path)]
                             + ([d.subset] if d.subset is not None else [])
                             + ([precision] if precision != "no" else []), sort_keys=True)
            import hashlib

            digest = hashlib.sha256(key.encode()).hexdigest()[:16]
            self._cache_dir = self.out / "cache" / f"latents-{digest}"
        return self._cache_dir

    def _cache_path(self, record: int) -> Path:
        return self._cache_folder() / f"{record // 10000:04d}" / f"{record}.safetensors"

    def _load_cached(self, record: int) -> tuple[torch.Tensor, ...] | None:
        """The record's cached latents from disk (kept in memory within the budget), or None."""
        from safetensors.torch import load_file

        path = self._cache_path(record)
        if path.is_file():
            try:
                # Read on the CPU: safetensors refuses device names torch uses, e.g. "cpu:1" under torchrun on CPUs.
                t = load_file(str(path))
                return self._remember(self.latent_cache, record, (t["source"], t["mean"], t["std"]))
            except Exception as e:  # a torn or foreign file: encode again, never crash the run
                logger.warning("ignoring unreadable latent cache file %s (%s)", path, e)
        return None

    def _store_cached(self, record: int, entry: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        # Up to 10,000 files a folder: what killed writes leave is swept once per run (run()), not at each write.
        with writing_file(self._cache_path(record), clean=False) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in zip(("source", "mean", "std"), entry)}, str(tmp))

    # -- one micro-step --
    def micro_step(self, batch: dict, update: bool = True) -> torch.Tensor:
        """Forward/backward one per-process micro-batch; returns the detached per-process loss. ``update=False`` on a
        step's last micro-batch drops the step's gradients instead of taking the optimizer step."""
        cfg, acc = self.cfg, self.accelerator
        device = acc.device
        source = batch["source"].to(device, dtype=self.weight_dtype)
        target = batch["target"].to(device, dtype=self.weight_dtype)
        valid = batch["valid"].to(device)
        indices = batch["index"].tolist()
        b = source.shape[0]
        h, w = source.shape[-2] // self.vae_scale, source.shape[-1] // self.vae_scale
        draws = draw_step(indices, cfg.seed, self.noise_scheduler.config.num_train_timesteps,
                          (self.latent_channels, h, w), cfg.train.timestep_bias)
        with torch.no_grad():
            text = self._encode_instructions(list(batch["instruction"]))
            src_lat, mean, std = self._encode_images(source, target, batch["record"].tolist(), batch["valid"].tolist())
            tgt_lat = sample_posterior(self.vae, mean, std, draws.posterior).float()
            pixel_weights = None
            if cfg.train.edit_weight:
                sf = vae_scaling_factor(self.vae)
                pixel_weights = edit_region_weights(mean * sf, src_lat * (1 if cfg.model.scale_source_latent else sf),
                                                    cfg.train.edit_weight, cfg.train.edit_threshold)
        noise = draws.noise.to(device)
        if cfg.train.noise_offset:
            noise = noise + cfg.train.noise_offset * draws.offset.to(device)
        timesteps = draws.timesteps.to(device)
        drop_text, drop_image = dropout_masks(draws.dropout_r, cfg.train.condition_dropout)
        text, src_lat = apply_dropout(text, self.null_text, src_lat, drop_text, drop_image)
        noisy = self.noise_scheduler.add_noise(tgt_lat, noise, timesteps)
        if self.prediction_type == "v_prediction":
            goal = self.noise_scheduler.get_velocity(tgt_lat, noise, timesteps)
        elif self.prediction_type == "sample":
            goal = tgt_lat
        else:
            goal = noise
        weights = valid.float()
        if cfg.train.snr_gamma:
            weights = weights * snr_weights(self.noise_scheduler, timesteps, cfg.train.snr_gamma,
                                            self.prediction_type)
        with acc.accumulate(self.unet):
            with acc.autocast():
                pred = self.unet(torch.cat([noisy, src_lat], 1), timesteps, encoder_hidden_states=text).sample
            # Divide by the per-process batch: DDP's gradient mean over processes then gives the global-batch mean.
            loss = (per_example_mse(pred, goal, pixel_weights) * weights).sum() / b
            acc.backward(loss)
            if update and acc.sync_gradients and cfg.train.max_grad_norm > 0:
                acc.clip_grad_norm_(_trainable(self.unet), cfg.train.max_grad_norm)
            if update:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # -- checkpoints --
    def save_checkpoint(self) -> Path:
        """Write the full training state to a temporary folder, then rename it: a kill never leaves a broken one."""
        acc = self.accelerator
        root = checkpoint_dir(self.out)
        final = root / f"step-{self.global_step:06d}"
        tmp = root / f".tmp-step-{self.global_step:06d}"
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            recover_checkpoints(self.out)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()  # every rank writes its RNG state; rename only once all are done
        if self.is_main:
            cfgmod.save(self.cfg, tmp / "config.yaml")
            state = {"step": self.global_step, "samples_seen": self.samples_seen, "bad_records": self.bad_records,
                     "skipped_steps": self.skipped_steps,
                     "data_step": self.global_step * self.cfg.train.gradient_accumulation,
                     "global_batch": self.global_batch, "ip2p_version": ip2p.__version__}
            (tmp / "ip2p_state.json").write_text(json.dumps(state, indent=2))
            chmod_tree(tmp, (tmp / "ip2p_state.json").stat().st_mode & 0o777)  # safetensors writes owner-only files
            # The rename must not reach the disk before the files do: after a crash (not only a kill) the newest
            # complete-looking checkpoint would hold empty files, and pruning would have deleted the good ones.
            fsync_tree(tmp)
            # A resumed run saving a step again replaces it; swap_in moves the old one aside first, so a kill never
            # leaves it torn, and recover_checkpoints puts it back if the kill came between the two renames.
            swap_in(tmp, final)
            self._prune(keep=final)
            logger.info("saved checkpoint %s", final)
        self.saved_step = self.global_step
        acc.wait_for_everyone()
        return final

    def _prune(self, keep: Path) -> None:
        """Move the checkpoints newer than ``keep`` (the one just written) aside, then delete the oldest beyond
        ``train.checkpoints_total_limit``. Newer ones are left by the run that this one resumed before their step
        (to change a setting, or past a damaged one): left in place, resume=latest would go back to that abandoned
        run, and the pruning would delete this run's own checkpoints first. They are renamed ``abandoned-step-N``
        (nothing is lost; resume=<that folder> still works). Each deleted one is renamed before it is deleted, so a
        kill never leaves a half-deleted folder that looks complete."""
        limit = self.cfg.train.checkpoints_total_limit
        found = [(step, path) for step, path in list_checkpoints(self.out) if path != keep]
        for step, path in found:
            if step > self.global_step:
                aside = path.with_name(f"abandoned-{path.name}")
                n = 1
                while aside.exists():
                    n += 1
                    aside = path.with_name(f"abandoned-{path.name}-{n}")
                os.replace(path, aside)
                logger.warning("moved %s aside to %s: this run, %s, replaces the run that wrote it (delete it when "
                               "it is not needed)", path.name, aside.name,
                               "resumed from an older checkpoint" if self.resumed else "started from scratch")
        older = [path for step, path in found if step <= self.global_step]
        for path in older[: len(older) - (limit - 1)] if limit > 0 and len(older) > limit - 1 else []:
            doomed = path.with_name(f".del-{path.name}")
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        """Restore the training state from ``path``; a damaged checkpoint is a ValueError naming it, one saved with
        settings this run cannot load (train.ema, train.lora_alpha, the model) a ConfigError saying which."""
        saved = self._saved_settings(path)
        if saved.get("train.ema", self.cfg.train.ema) != self.cfg.train.ema:
            raise cfgmod.ConfigError(f"checkpoint {path} was saved with train.ema={str(saved['train.ema']).lower()}; "
                                     "resume with the same value (the EMA state cannot be added or dropped "
                                     "mid-run), or start a new output_dir")
        t = self.cfg.train
        if t.lora_rank and saved.get("train.lora_rank") == t.lora_rank:
            # The state loads with any alpha, but alpha / rank scales what the adapters add: another value changes
            # the saved model's output at once (0 means alpha = rank).
            was = saved.get("train.lora_alpha") or t.lora_rank
            if was != (t.lora_alpha or t.lora_rank):
                raise cfgmod.ConfigError(f"checkpoint {path} was saved with train.lora_alpha={was:g} (rank "
                                         f"{t.lora_rank}); resume with the same value (alpha scales the adapters' "
                                         "output: another one changes the model), or start a new output_dir")
        try:
            state = json.loads((path / "ip2p_state.json").read_text())
            step = int(state["step"])
            self.accelerator.load_state(str(path))
        except Exception as e:  # safetensors, torch, pickle and json each raise their own types for a torn file
            reason = " ".join(str(e).split())
            reason = reason if len(reason) <= 300 else reason[:300] + " ..."
            now = {key: cfgmod.setting(self.cfg, key) for key in _STATE_SHAPING}
            changed = [f"{key}={saved[key]!r} (this run: {now[key]!r})" for key in _STATE_SHAPING
                       if key in saved and saved[key] != now[key]]
            if changed:
                raise cfgmod.ConfigError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {reason}): it was "
                                         f"saved with {', '.join(changed)}; resume with the same settings, or "
                                         "start a new output_dir") from e
            torn = damaged_file(path)
            what = f": {torn.name} is damaged" if torn is not None else ""
            raise ValueError(f"checkpoint {path} cannot be loaded{what} ({type(e).__name__}: {reason}); resume from "
                             f"an older one (resume=<{checkpoint_dir(self.out)}/step-NNNNNN>, or resume=latest, which "
                             "skips damaged ones), or move it aside to start over") from e
        self.global_step = self.saved_step = step
        # Checkpoints sit at optimizer-step boundaries. load_state restores Accelerate's micro-step count, which is
        # only a multiple of the accumulation if train.gradient_accumulation is unchanged: otherwise every optimizer
        # step after the resume would take another window of micro-batches than the loop's.
        self.accelerator.step = 0
        self.samples_seen = int(state.get("samples_seen", 0))
        self.bad_records = int(state.get("bad_records", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._apply_hyperparameters()
        saved_batch = state.get("global_batch")
        if saved_batch is not None and int(saved_batch) != self.global_batch:
            t = self.cfg.train
            logger.warning("checkpoint %s was trained with a global batch of %d; this run's is %d (train.batch_size "
                           "%d x %d processes x train.gradient_accumulation %d): the data continue from position "
                           "%d, not after the %d examples it had seen, so the result will differ from a run that "
                           "kept one batch size", path, int(saved_batch), self.global_batch, t.batch_size,
                           self.accelerator.num_processes, t.gradient_accumulation, step * self.global_batch,
                           self.samples_seen)
        logger.info("resumed from %s at step %d", path, self.global_step)
        if self.global_step > self.cfg.train.max_steps:
            logger.warning("the checkpoint is at step %d, past train.max_steps=%d: nothing is trained, and the step-%d "
                           "model is exported as final; raise train.max_steps to train on", self.global_step,
                           self.cfg.train.max_steps, self.global_step)

    @staticmethod
    def _saved_settings(path: Path) -> dict:
        """The settings in ``path``'s config.yaml that decide what its state holds (empty if unreadable)."""
        try:
            saved = cfgmod.load_config(path / "config.yaml")
        except Exception:  # a damaged or foreign config: load_state will say what is wrong with the checkpoint
            return {}
        return {key: cfgmod.setting(saved, key) for key in ("train.ema", "train.lora_alpha", *_STATE_SHAPING)}

    def _apply_hyperparameters(self) -> None:
        """Give the loaded optimizer, LR schedule and EMA this run's hyperparameters: their saved states carry the old
        ones, so a run resumed with e.g. a lower train.lr would otherwise silently train with the old value."""
        t, schedule = self.cfg.train, self.lr_scheduler
        if self.ema is not None:
            self.ema.decay = t.ema_decay
        schedule.base_lrs = [t.lr] * len(schedule.base_lrs)
        schedule._last_lr = [t.lr * factor(schedule.last_epoch) for factor in schedule.lr_lambdas]
        for group, lr in zip(self.optimizer.param_groups, schedule._last_lr):
            group.update(lr=lr, initial_lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                         weight_decay=t.weight_decay)

    # -- validation --
    def validate(self) -> Path | None:
        from ip2p import images as img
        from ip2p.models import EditorModel
        from ip2p.sampling import edit, make_scheduler

        v = self.cfg.validation
        if not v.images or not self.is_main:
            return None
        unet = self.accelerator.unwrap_model(self.unet)
        was_training = unet.training
        unet.eval()
        model = EditorModel(unet, self.vae, self.text_encoder, self.tokenizer,
                            make_scheduler(v.scheduler, self.base_scheduler_config),
                            scale_source_latent=self.cfg.model.scale_source_latent)
        instructions = v.instructions * len(v.images) if len(v.instructions) == 1 else list(v.instructions)
        rows, labels = [], []
        for path, instruction in zip(v.images, instructions):
            source = img.resize_for_model(img.load_image(path), v.resolution, max(8, self.vae_scale))
            with self.accelerator.autocast():
                out = edit(model, img.images_to_batch([source]), [instruction], steps=v.steps,
                           text_guidance=v.text_guidance, image_guidance=v.image_guidance, scheduler=model.scheduler,
                           generator=torch.Generator().manual_seed(v.seed), progress=False)
            rows.append([source, img.tensor_to_images(out.float())[0]])
            labels.append(instruction)
        unet.train(was_training)
        grid = img.make_grid(rows, row_labels=labels, col_labels=["input", f"step {self.global_step}"])
        path = self.out / "validation" / f"step-{self.global_step:06d}.png"
        img.save_image(grid, path)
        self._log_image(grid)
        return path

    def _log_image(self, grid) -> None:
        import numpy as np

        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid), self.global_step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(grid)]}, step=self.global_step)

    # -- export --
    def export_final(self) -> Path:
        from ip2p.export import save_pipeline_folder, save_single_file

        acc = self.accelerator
        acc.wait_for_everyone()
        final = self.out / "final"
        if self.is_main:
            import copy

            import diffusers

            from ip2p.sampling import unsupported

            unet = copy.deepcopy(acc.unwrap_model(self.unet)).float().eval()
            if self.ema is not None:
                self.ema.copy_to(_trainable(unet))
            cls = getattr(diffusers, self.base_scheduler_config.get("_class_name", ""), diffusers.DDPMScheduler)
            if unsupported(cls, self.base_scheduler_config):  # e.g. SD's PNDM cannot step x0 predictions
                cls = diffusers.EulerDiscreteScheduler  # so that diffusers' pipeline samples the export as it is
            scheduler = cls.from_config(self.base_scheduler_config)
            adapter_path = self.out / "final.lora.safetensors"
            if self.cfg.train.lora_rank:
                from ip2p.lora import merge_lora, save_adapter

                save_adapter(unet, adapter_path, base=self.cfg.model.pretrained,  # final/'s scheduler, as written there
                             scheduler_config=json.loads(scheduler.to_json_string()),
                             scale_source_latent=self.cfg.model.scale_source_latent)
                logger.info("exported the LoRA adapters alone (%.1f MB): %s; infer.py --checkpoint %s --lora %s",
                            adapter_path.stat().st_size / 1e6, adapter_path, self.cfg.model.pretrained, adapter_path)
                merge_lora(unet)  # a whole model: every tool loads it without knowing about adapters
            else:  # an earlier LoRA run's in this folder: not this model's
                _remove_earlier_export(adapter_path, "this run trained the whole UNet")
            components = SimpleNamespace(unet=unet, vae=self.vae.float(), text_encoder=self.text_encoder.float(),
                                         tokenizer=self.tokenizer, scheduler=scheduler,
                                         scale_source_latent=self.cfg.model.scale_source_latent)
            meta = {"config": cfgmod.to_dict(self.cfg), "step": self.global_step, "ema": self.ema is not None}
            single_path = self.out / "final.safetensors"
            # Removed first, so that an earlier one never sits beside a newer final/ (a kill between the two writes,
            # train.final_single_file=false now, or a single file this model cannot have).
            _remove_earlier_export(single_path, "this export replaces it")
            save_pipeline_folder(components, final, ip2p_metadata=meta)
            logger.info("exported %s weights as a diffusers folder: %s", "EMA" if self.ema else "final", final)
            if self.cfg.train.final_single_file:
                try:
                    single = save_single_file(components, single_path, ip2p_metadata=meta)
                    logger.info("exported the single file %s", single)
                except ValueError as e:
                    logger.warning("skipped the single-file export: %s", e)
        acc.wait_for_everyone()
        return final

    # -- main loop --
    def run(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        if self.is_main:
            recover_checkpoints(self.out)
            if cfg.data.cache == "text+latents":
                remove_stale_under(self._cache_folder())
        acc.wait_for_everyone()
        resume = resolve_resume(cfg.resume, cfg.output_dir)
        if resume is not None:
            # resume=latest falls back past a damaged newest checkpoint (disk trouble, a hand-edited file).
            candidates = ([path for _, path in reversed(list_checkpoints(self.out))] if cfg.resume == "latest"
                          else [resume])
            for i, path in enumerate(candidates):
                try:
                    self.load_checkpoint(path)
                    break
                except cfgmod.ConfigError:  # every checkpoint of this run was saved with the same settings
                    raise
                except ValueError as e:
                    if i == len(candidates) - 1:
                        raise
                    logger.warning("%s; trying the one before it", e)
            self.resumed = True
        if self.is_main:  # only now: a run that fails to start (wrong data, a checkpoint it cannot load) must not
            cfgmod.save(cfg, self.out / "config.yaml")  # replace the config of the run already in output_dir
        # wandb writes its run (offline too, with WANDB_MODE=offline) inside the run folder, not the working directory.
        try:
            acc.init_trackers("ip2p", config=_flat(cfgmod.to_dict(cfg)),
                              init_kwargs={"wandb": {"dir": str(self.out), "name": self.out.name}})
        except Exception as e:  # wandb raises its own types: no API key, no network, a refused login
            if "wandb" not in cfg.trackers:
                raise
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            raise ValueError(f"trackers=[wandb]: wandb could not start ({reason}); run `wandb login`, set "
                             "WANDB_MODE=offline, or leave wandb out of trackers") from None
        accum = cfg.train.gradient_accumulation
        global_batch = self.global_batch
        data = self._batches(self.global_step * accum)
        loader = iter(data)
        # A dataset with no usable record (a wrong column, every image unreadable) stops the run with the reasons
        # instead of training on nothing; bad records later on are only counted.
        num_records = data.dataset.records.num_records
        check_valid = min(_NO_VALID_LIMIT, num_records or _NO_VALID_LIMIT)
        seen_valid = False
        # With every latent cached, decoding the images again each epoch is wasted work on the training process's
        # critical path: at each new epoch in which the cache has grown, the loader is rebuilt to skip cached records.
        per_data_step = cfg.train.batch_size * acc.num_processes
        cache_view = cfg.data.cache == "text+latents" and not cfg.data.streaming and bool(num_records)
        view_epoch, view_size = (self.global_step * accum * per_data_step // num_records if cache_view else 0), 0
        bar = tqdm(total=cfg.train.max_steps, initial=self.global_step, disable=not self.is_main, desc="training",
                   dynamic_ncols=True)
        started, start_step = time.perf_counter(), self.global_step
        window: list[float] = []  # losses since the last log line: one batch's loss is too noisy to read
        with _Preemption() as preempt:
            while self.global_step < cfg.train.max_steps:
                # The data loader logs the first reasons and then counts; the total goes to the trackers.
                bad = valid = 0
                losses = []
                for micro in range(accum):  # one micro-batch in memory at a time
                    batch = next(loader)
                    bad += int(batch["num_bad"])
                    valid += int(batch["valid"].sum())
                    if micro == accum - 1 and acc.num_processes > 1:  # every process, at the same point
                        valid = acc.reduce(torch.tensor(float(valid), device=acc.device), reduction="sum").item()
                    # A step whose whole global batch is bad updates nothing: an optimizer step on zero gradients
                    # would still move the weights (Adam's momentum, weight decay). Every process skips it alike.
                    losses.append(self.micro_step(batch, update=micro < accum - 1 or valid > 0))
                if not valid:
                    self.skipped_steps += 1
                    if self.skipped_steps == 1:
                        logger.warning("step %d: every record of its batch was bad; the step updates nothing "
                                       "(further such steps are counted)", self.global_step + 1)
                if not seen_valid:
                    seen_valid = valid > 0
                    seen = (self.global_step + 1 - start_step) * global_batch
                    if not seen_valid and (seen >= check_valid or self.global_step + 1 == cfg.train.max_steps):
                        first = data.bad_records.reasons[:1] or ["(on another process)"]
                        raise ValueError(f"the first {seen} examples of data.path={cfg.data.path!r} were all bad "
                                         f"records, e.g. {first[0]}; check data.path, data.split and the "
                                         "data.*_column keys")
                with warnings.catch_warnings():  # a skipped first step is on purpose, not PyTorch's wrong order
                    warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
                    self.lr_scheduler.step()
                if self.ema is not None and valid:  # a skipped step leaves the EMA (the exported weights) alone too
                    self.ema.step(_trainable(acc.unwrap_model(self.unet)))
                self.global_step += 1
                self.samples_seen += global_batch
                if cache_view:
                    epoch = self.global_step * accum * per_data_step // num_records
                    if epoch > view_epoch and len(self.latent_cache) > view_size:
                        view_epoch, view_size = epoch, len(self.latent_cache)
                        data = self._batches(self.global_step * accum, frozenset(self.latent_cache))
                        loader = iter(data)
                # Each process sees its slice of the batch: the run's loss is their mean, its bad records their sum.
                local = torch.stack([torch.stack(losses).mean(), torch.tensor(float(bad), device=acc.device)])
                totals = acc.reduce(local, reduction="sum")
                loss, bad = (totals / totals.new_tensor([acc.num_processes, 1])).tolist()  # one device sync
                self.bad_records += int(bad)
                if valid and not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {self.global_step}; lower train.lr or use "
                                             "train.mixed_precision=bf16 instead of fp16")
                lr = self.lr_scheduler.get_last_lr()[0]
                elapsed = time.perf_counter() - started
                rate = (self.global_step - start_step) * global_batch / max(elapsed, 1e-9)
                if valid:  # a skipped step computed no loss
                    window.append(loss)
                mean = sum(window) / len(window) if window else math.nan
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}", bad=self.bad_records)
                bar.update(1)
                if self.global_step % cfg.train.log_every == 0 or self.global_step == cfg.train.max_steps:
                    logs = {"loss": mean} if window else {}
                    acc.log({**logs, "lr": lr, "samples_per_s": rate, "bad_records": self.bad_records,
                             "skipped_steps": self.skipped_steps}, step=self.global_step)
                    window.clear()
                if cfg.validation.every and self.global_step % cfg.validation.every == 0:
                    self.validate()
                stop, out_of_time = self._stop_flags(preempt, elapsed)
                if out_of_time and not stop and self.global_step < cfg.train.max_steps:
                    logger.warning("train.max_minutes=%g reached at step %d of %d; saving and exporting",
                                   cfg.train.max_minutes, self.global_step, cfg.train.max_steps)
                    break
                if stop or (cfg.train.checkpoint_every and self.global_step % cfg.train.checkpoint_every == 0):
                    self.save_checkpoint()
                if stop:
                    logger.warning("SIGTERM: saved a checkpoint at step %d; resume with resume=latest",
                                   self.global_step)
                    bar.close()
                    acc.end_training()
                    raise SystemExit(143)
            bar.close()
            if self.bad_records:
                logger.warning("skipped %d bad records in total%s", self.bad_records,
                               f" ({self.skipped_steps} steps had no good record and updated nothing)"
                               if self.skipped_steps else "")
            # Still under the handler: a SIGTERM now would kill the last checkpoint or the export half-way (nothing
            # breaks, both are atomic, but the run's result would wait for a resume), and they take seconds.
            if self.saved_step != self.global_step:  # a checkpoint of this step on disk may be an abandoned run's
                self.save_checkpoint()
            final = self.export_final()
            if preempt.requested:
                logger.warning("SIGTERM arrived during the final checkpoint or export; finished them first: %s",
                               final)
        acc.end_training()
        return final

    def _stop_flags(self, preempt: _Preemption, elapsed: float) -> tuple[bool, bool]:
        """(SIGTERM received, train.max_minutes spent), on any process: every process stops at the same step."""
        budget = self.cfg.train.max_minutes
        flags = torch.tensor([float(preempt.requested), float(bool(budget) and elapsed >= budget * 60)],
                             device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        requested, spent = flags.tolist()  # one device sync per step, as the single flag had
        return requested > 0, spent > 0


def train(cfg: Config) -> Path:
    """Train with ``cfg``; returns the folder of the exported final model."""
    return Trainer(cfg).run()
