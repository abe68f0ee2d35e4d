"""Image stage: turn caption pairs into (input image, edited image) samples with Stable Diffusion and Prompt-to-Prompt.

Per caption pair, ``samples_per_pair`` samples (paper: 100), each with its own seed. A sample's seed fixes everything
random about it: the initial noise, the ancestral noise of every step (the same for both branches), the P2P fraction
``p ~ U(0.1, 0.9)`` and the guidance scale ``s ~ U(7.5, 15)``. Seeds are derived from (run seed, pair id, sample
number), so a resumed or re-sharded run regenerates exactly the same samples, and every seed is recorded.

Defaults are the orig's: 512 x 512, 100 Euler-ancestral steps. The base model is any SD 1.x/2.x text-to-image
checkpoint ``ip2p.models.load_components`` reads (a diffusers folder, a hub id, a single file, ``tiny``).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ip2p.conditioning import encode_text, vae_scaling_factor
from ip2p.data.seeding import mix_seed
from ip2p.models import vae_downsampling
from ip2p.datagen.config import FilterConfig, ImageConfig
from ip2p.datagen.filter import passes, select
from ip2p.datagen.p2p import p2p_sample
from ip2p.datagen.shards import Shard
from ip2p.datagen.text import read_jsonl
from ip2p.datagen.writer import Pair, Sample

logger = logging.getLogger(__name__)

__all__ = ["ImageConfig", "PairSampler", "PairSamples", "generate_images", "read_pairs", "sample_params",
           "sample_seeds", "to_uint8"]


def sample_seeds(run_seed: int, pair_id: int, n: int) -> list[int]:
    """``n`` distinct 32-bit seeds for the samples of one pair (32 bits, like the orig's recorded seeds)."""
    seeds: list[int] = []
    j = 0
    while len(seeds) < n:
        seed = mix_seed(run_seed, pair_id, j) & 0xFFFFFFFF
        if seed not in seeds:
            seeds.append(seed)
        j += 1
    return seeds


def sample_params(seed: int, config: ImageConfig) -> tuple[float, float]:
    """(p, cfg scale) of a sample, uniform in the configured ranges, drawn from its own seed."""
    rng = random.Random(seed)
    p = config.p_min + rng.random() * (config.p_max - config.p_min)
    cfg = config.cfg_min + rng.random() * (config.cfg_max - config.cfg_min)
    return p, cfg


@dataclass
class PairSamples:
    """Samples of one caption pair: images (N, 3, H, W) in [0, 1] on the CPU; seeds, p, cfg scale per sample."""

    images_in: torch.Tensor
    images_out: torch.Tensor
    seeds: list[int]
    p: list[float]
    cfg_scale: list[float]


class PairSampler:
    """Samples caption pairs with a text-to-image SD model; see :func:`ip2p.datagen.p2p.p2p_sample`.

    ``components``: the dict ``ip2p.models.load_components`` returns (unet with 4 input channels, vae, text_encoder,
    tokenizer, scheduler). The models keep their device and dtype; noise is drawn on the CPU, so a seed gives the same
    sample on any device (up to kernel rounding).
    """

    def __init__(self, components: dict, config: ImageConfig = ImageConfig()) -> None:
        from ip2p.sampling import make_scheduler

        self.unet, self.vae = components["unet"], components["vae"]
        self.text_encoder, self.tokenizer = components["text_encoder"], components["tokenizer"]
        self.scheduler = make_scheduler(config.scheduler, components["scheduler"].config)
        self.config = config
        self.latent_channels = int(self.vae.config.latent_channels)
        if self.unet.config.in_channels != self.latent_channels:
            raise ValueError(f"unet has {self.unet.config.in_channels} input channels; the image stage needs a "
                             f"text-to-image base with {self.latent_channels} (e.g. SD 1.5), not an editor")
        self.vae_factor = vae_downsampling(self.vae)
        multiple = self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if config.height % multiple or config.width % multiple:
            raise ValueError(f"image size {config.height}x{config.width} must be a multiple of {multiple} for this "
                             "model (VAE and UNet downsampling)")
        self.null_text = encode_text(self.text_encoder, self.tokenizer, [""])  # (1, L, D)

    @classmethod
    def from_pretrained(cls, source: str, config: ImageConfig = ImageConfig(), *,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PairSampler":
        from ip2p.models import load_components

        # float32 is what loaders give by default; naming it makes diffusers warn about casting the built-ins.
        components, _ = load_components(source, torch_dtype=None if dtype in (None, torch.float32) else dtype)
        for key in ("unet", "vae", "text_encoder"):
            components[key].requires_grad_(False).eval()
            if device is not None:
                components[key].to(device)
        return cls(components, config)

    @torch.no_grad()
    def sample(self, input_caption: str, output_caption: str, seeds: Sequence[int], *,
               p: float | Sequence[float] | None = None, cfg_scale: float | Sequence[float] | None = None
               ) -> PairSamples:
        """All samples of one caption pair; ``p``/``cfg_scale`` override the per-seed draws (one value or one each)."""
        chunks = list(self.iter_samples(input_caption, output_caption, seeds, p=p, cfg_scale=cfg_scale))
        return PairSamples(torch.cat([c.images_in for c in chunks]), torch.cat([c.images_out for c in chunks]),
                           [s for c in chunks for s in c.seeds], [v for c in chunks for v in c.p],
                           [v for c in chunks for v in c.cfg_scale])

    @torch.no_grad()
    def iter_samples(self, input_caption: str, output_caption: str, seeds: Sequence[int], *,
                     p: float | Sequence[float] | None = None, cfg_scale: float | Sequence[float] | None = None
                     ) -> Iterator[PairSamples]:
        """The samples of one pair in chunks of ``config.batch_size`` (one UNet batch of 4 x chunk rows each)."""
        seeds = list(seeds)
        drawn = [sample_params(seed, self.config) for seed in seeds]
        ps = _per_sample(p, [d[0] for d in drawn], "p")
        cfgs = _per_sample(cfg_scale, [d[1] for d in drawn], "cfg_scale")
        unet_param = next(self.unet.parameters())
        device, dtype = unet_param.device, unet_param.dtype
        text = encode_text(self.text_encoder, self.tokenizer, [input_caption, output_caption]).to(dtype)  # (2, L, D)
        shape = (self.latent_channels, self.config.height // self.vae_factor, self.config.width // self.vae_factor)
        for start in range(0, len(seeds), self.config.batch_size):
            chunk = seeds[start:start + self.config.batch_size]
            n = len(chunk)
            noise, generators = [], []
            for seed in chunk:
                g_in = torch.Generator().manual_seed(seed)
                noise.append(torch.randn((1, *shape), generator=g_in))
                g_out = torch.Generator()
                g_out.set_state(g_in.get_state())  # the edited branch replays the input branch's step noise
                generators += [g_in, g_out]
            lat_in, lat_out = p2p_sample(
                self.unet, self.scheduler, text[:1].expand(n, -1, -1), text[1:].expand(n, -1, -1), self.null_text,
                torch.cat(noise).to(device=device, dtype=dtype),
                torch.tensor(ps[start:start + n]), torch.tensor(cfgs[start:start + n]),
                steps=self.config.steps, generators=generators)
            images = self.decode(torch.cat([lat_in, lat_out]))
            yield PairSamples(images[:n], images[n:], chunk, ps[start:start + n], cfgs[start:start + n])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], float32 on the CPU."""
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(latents.to(vae_dtype) / vae_scaling_factor(self.vae), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()


def _per_sample(value: float | Sequence[float] | None, drawn: list[float], name: str) -> list[float]:
    if value is None:
        return drawn
    if isinstance(value, (int, float)):
        return [float(value)] * len(drawn)
    value = [float(v) for v in value]
    if len(value) != len(drawn):
        raise ValueError(f"{name} has {len(value)} values for {len(drawn)} seeds; pass one value or one per seed")
    return value


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8, rounding as PIL-style savers do."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def read_pairs(paths: Sequence[str]) -> list[Pair]:
    """Caption pairs from text-stage JSON lines (``input``, ``edit``, ``output``, optional ``id``).

    Without ``id``, a line's id is its position over all files in the order given. ``out.jsonl`` that does not exist
    but has shard siblings (``out.shard-*-of-*.jsonl``) reads those. Ids must be unique.
    """
    from pathlib import Path

    files: list[Path] = []
    for name in paths:
        path = Path(name)
        siblings = sorted(path.parent.glob(f"{path.stem}.shard-*-of-*{path.suffix}"))
        if not path.exists() and siblings:
            files += siblings
        else:
            files.append(path)
    pairs: list[Pair] = []
    seen: dict[int, str] = {}
    for path in files:
        for number, row in read_jsonl(path, "prompts file"):
            where = f"{path}:{number}"
            bad = [k for k in ("input", "edit", "output") if not isinstance(row.get(k), str) or not row[k].strip()]
            if bad:
                raise ValueError(f"{where}: missing or empty {', '.join(bad)}; expected the text stage's "
                                 "{input, edit, output} lines")
            pair_id = row.get("id", len(pairs))
            if not isinstance(pair_id, int) or isinstance(pair_id, bool) or pair_id < 0:
                raise ValueError(f"{where}: id={pair_id!r} must be a non-negative integer")
            if pair_id in seen:
                raise ValueError(f"{where}: id {pair_id} was already used at {seen[pair_id]}; ids must be unique")
            seen[pair_id] = where
            pairs.append(Pair(pair_id, row["input"].strip(), row["edit"].strip(), row["output"].strip()))
    if not pairs:
        raise ValueError(f"no caption pairs in {', '.join(map(str, files))}; pass the text stage's output (JSON lines "
                         "with input, edit, output)")
    return pairs


def generate_images(pairs: Sequence[Pair], sampler: PairSampler, writer, *, scorer=None,
                    filter_config: FilterConfig | None = FilterConfig(), shard: Shard = Shard(),
                    progress: bool = True) -> None:
    """Generate, score, filter and write this shard's pairs not yet in ``writer`` (a ``DatasetWriter``).

    With a ``scorer`` (``ClipScorer``) and a ``filter_config``, only the best passing samples are kept (the orig's
    inline filter; failing samples are dropped chunk by chunk, so memory stays bounded at 100 samples per pair).
    Without a scorer every sample is written with NaN scores, for a later ``filter`` run.
    """
    from tqdm.auto import tqdm

    if filter_config is not None and scorer is None:
        raise ValueError("filtering needs a CLIP model; pass a scorer (--clip) or disable the filter (--no-filter)")
    mine = [pair for pair in pairs if shard.owns(pair.id)]
    writer.check_pairs(mine)
    todo = [pair for pair in mine if pair.id not in writer.done_ids]
    n = sampler.config.samples_per_pair
    logger.info("image stage %s: %d pairs, %d done, %d to generate (%d samples each)", shard.tag, len(mine),
                len(mine) - len(todo), len(todo), n)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="pairs", unit="pair", disable=not progress)
    for pair in todo:
        seeds = sample_seeds(sampler.config.seed, pair.id, n)
        candidates: list[Sample] = []
        for chunk in sampler.iter_samples(pair.input, pair.output, seeds):
            if scorer is not None:
                scores = scorer.scores(chunk.images_in, chunk.images_out, pair.input, pair.output)
            else:
                scores = {k: torch.full((len(chunk.seeds),), math.nan)
                          for k in ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")}
            keep = (passes(scores, filter_config) if filter_config is not None
                    else torch.ones(len(chunk.seeds), dtype=torch.bool))
            images_in, images_out = to_uint8(chunk.images_in), to_uint8(chunk.images_out)
            for i in torch.nonzero(keep).flatten().tolist():
                candidates.append(Sample(pair, chunk.seeds[i], chunk.p[i], chunk.cfg_scale[i], images_in[i],
                                         images_out[i], {k: float(v[i]) for k, v in scores.items()}))
        if filter_config is not None and candidates:
            scores = {k: torch.tensor([c.scores[k] for c in candidates]) for k in candidates[0].scores}
            candidates = [candidates[i] for i in select(scores, filter_config)]
        writer.add_pair(pair, candidates, tried=n)
        bar.update(1)
        bar.set_postfix(kept=writer.kept, tried=writer.tried)
    bar.close()
    writer.close()
