"""Settings of the data-generation stages, with the paper's / orig's values as defaults.

Plain dataclasses without model imports, so the command line (and its ``--help``) builds without loading torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["FilterConfig", "FinetuneConfig", "ImageConfig", "TextConfig"]


def _check_finite(config: object) -> None:
    """NaN passes every ``<``/``>`` check below (and inf some), and would run a whole stage for nothing."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name}={value} must be a finite number")


@dataclass
class TextConfig:
    """Sampling settings of the text stage (orig values as defaults)."""

    temperature: float = 0.7
    top_p: float = 1.0
    frequency_penalty: float = 0.1
    """OpenAI-style: subtract penalty x (times the token was generated so far) from its logit (orig: 0.1)."""
    presence_penalty: float = 0.0
    """OpenAI-style: subtract penalty from the logit of every token generated at least once (orig: 0)."""
    repetition_penalty: float = 1.0
    """transformers' multiplicative penalty over prompt and completion (1.0: off)."""
    max_new_tokens: int = 256
    num_retries: int = 3
    """Extra attempts for a caption whose completion was rejected."""
    batch_size: int = 64
    """Captions per generate() call (a 7B model on an H100 was ~6x faster per caption at 64 than at 16)."""
    seed: int = 0

    def __post_init__(self) -> None:
        _check_finite(self)
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.num_retries < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} and batch_size={self.batch_size} must be >= 1 "
                             f"and num_retries={self.num_retries} >= 0")


@dataclass
class FinetuneConfig:
    epochs: float = 1.0
    """Passes over the triples (paper: 1 epoch of 700); fractions stop part-way through the last epoch."""
    lr: float = 1e-5
    batch_size: int = 8
    gradient_accumulation: int = 1
    weight_decay: float = 0.0
    max_length: int = 512
    """Longer examples are cut; the prompt is never cut, so an over-long caption keeps no completion tokens."""
    seed: int = 0

    def __post_init__(self) -> None:
        _check_finite(self)
        if self.epochs <= 0 or self.lr <= 0 or self.batch_size < 1 or self.gradient_accumulation < 1:
            raise ValueError(f"epochs={self.epochs} and lr={self.lr} must be > 0, batch_size={self.batch_size} and "
                             f"gradient_accumulation={self.gradient_accumulation} >= 1")
        if self.max_length < 1:  # a negative one cut tokens off the end of every example, silently
            raise ValueError(f"max_length={self.max_length} must be at least 1")


@dataclass
class ImageConfig:
    """Sampling settings of the image stage (orig defaults)."""

    steps: int = 100
    height: int = 512
    width: int = 512
    scheduler: str = "euler_a"
    samples_per_pair: int = 100
    batch_size: int = 8
    """Samples per UNet forward; each takes 4 rows (2 branches x CFG). 8 (32 rows) was fastest per sample on an H100
    at 512 px (docs/datagen.md); lower it if memory is short."""
    p_min: float = 0.1
    p_max: float = 0.9
    cfg_min: float = 7.5
    cfg_max: float = 15.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_finite(self)
        if not 0.0 <= self.p_min <= self.p_max <= 1.0:
            raise ValueError(f"p range [{self.p_min}, {self.p_max}] must satisfy 0 <= min <= max <= 1")
        if self.cfg_min > self.cfg_max:
            raise ValueError(f"cfg range [{self.cfg_min}, {self.cfg_max}] must have min <= max")
        if self.steps < 1 or self.samples_per_pair < 1 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps}, samples_per_pair={self.samples_per_pair} and "
                             f"batch_size={self.batch_size} must be at least 1")
        if self.height < 1 or self.width < 1:  # 0 passes the sampler's multiple-of check, and fails in the UNet
            raise ValueError(f"image size {self.height}x{self.width} must be positive, e.g. 512x512")


@dataclass(frozen=True)
class FilterConfig:
    """CLIP thresholds and how many samples to keep per caption pair (orig defaults)."""

    min_image_sim: float = 0.7
    min_dir_sim: float = 0.2
    min_caption_sim: float = 0.2
    keep_top: int = 4

    def __post_init__(self) -> None:
        _check_finite(self)
        if self.keep_top < 1:
            raise ValueError(f"keep_top={self.keep_top} must be at least 1")
