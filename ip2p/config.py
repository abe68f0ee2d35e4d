"""The training configuration: one typed dataclass tree, loaded from YAML and overridden by ``key=value`` arguments.

Unknown keys and values of the wrong type are errors that list the valid choices. The resolved config is written
into the run folder and into every checkpoint, so resuming and sampling need nothing else.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
ATTENTION = ("sdpa", "xformers")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
CACHE_MODES = ("none", "text", "text+latents")
TRACKERS = ("tensorboard", "wandb")


@dataclass
class ModelConfig:
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Base model: diffusers folder, hub id, or single .safetensors (then set config_dir)."""
    config_dir: str | None = None
    """Local diffusers folder describing the architecture of a single-file base model."""
    prediction_type: str | None = None
    """Override the scheduler's prediction type: epsilon, v_prediction or sample (x0; None keeps the base model's)."""
    zero_terminal_snr: bool = False
    """Rescale the base's betas to zero terminal SNR with trailing timesteps (Lin et al. 2024), so that the last
    training step holds no trace of the target and sampling starts where training did; needs v_prediction or sample."""
    scale_source_latent: bool = False
    """Scale the source latent by the VAE factor (CosXL-style); the paper and released models do not."""
    attention: str = "sdpa"
    """Attention kernel: sdpa (PyTorch, default) or xformers (needs the optional xformers package)."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass: less memory, about 30% slower."""


@dataclass
class DataConfig:
    path: str = ""
    """Dataset: hub id, save_to_disk folder, parquet folder/glob, .jsonl, imagefolder, or original seeds.json folder."""
    split: str = "train"
    """Split to train on (for sources with several splits)."""
    subset: str | None = None
    """Configuration of a hub dataset with several (``load_dataset(path, subset)``; hub ids only)."""
    source_column: str | None = None
    """Column of the image to edit (None: detect input_image / original_image / ...)."""
    instruction_column: str | None = None
    """Column of the instruction (None: detect edit_prompt / instruction / ...)."""
    target_column: str | None = None
    """Column of the edited image (None: detect edited_image / output_image / ...)."""
    streaming: bool = False
    """Stream the dataset instead of loading it (for sets larger than disk or RAM)."""
    resolution: int = 256
    """Training resolution (square crops; a multiple of 8)."""
    random_resize: list[int] = field(default_factory=lambda: [256, 288])
    """Resize the short side to a random size in [lo, hi] before cropping (paper: 256-288)."""
    random_crop: bool = True
    """Random crop to resolution (False: center crop)."""
    random_flip: bool = True
    """Random horizontal flip, applied identically to source and target."""
    shuffle: bool = True
    """Shuffle the example order each epoch (streaming: a seeded shuffle buffer)."""
    num_workers: int = 2
    """DataLoader worker processes per training process."""
    cache: str = "none"
    """Cache frozen-encoder outputs: none, text (instruction embeddings, in memory), text+latents (also the VAE
    encodings, in memory and under <output_dir>/cache/; needs fixed preprocessing: one cached view per image; from the
    next epoch on, the images of cached records are not decoded again)."""
    cache_memory_gb: float = 4.0
    """Host memory per training process for the in-memory caches (GiB). Past it, instructions are encoded again and
    latents read from <output_dir>/cache/ each time: a large dataset fills the disk cache, not the RAM or the GPU (0: no
    in-memory cache; latents are still cached on disk)."""


@dataclass
class TrainConfig:
    max_steps: int = 10000
    """Optimizer steps."""
    max_minutes: float = 0.0
    """Wall-clock budget of this run's training loop in minutes (0: none). At the first step past it, training ends as
    at max_steps: a checkpoint, then the final export. The learning-rate schedule still runs over max_steps, so set
    max_steps to about what the budget reaches; a resumed run gets a new budget."""
    batch_size: int = 4
    """Examples per process per micro-step; global batch = batch_size x processes x gradient_accumulation."""
    gradient_accumulation: int = 1
    """Micro-steps per optimizer step."""
    lr: float = 1e-4
    """AdamW learning rate (paper: 1e-4; single-GPU fine-tuning: 5e-5)."""
    lr_schedule: str = "constant"
    """constant, constant_with_warmup, linear, cosine, cosine_with_restarts or polynomial (diffusers)."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps (paper: none)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    optimizer: str = "adamw"
    """adamw or adamw8bit (needs bitsandbytes)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables)."""
    mixed_precision: str = "no"
    """no, fp16 or bf16."""
    condition_dropout: float = 0.05
    """p: drop text, image, or both, each with probability p (the paper, section 3.2.1)."""
    ema: bool = True
    """Keep an EMA of the UNet weights; the final export uses it."""
    ema_decay: float = 0.9999
    """EMA decay, ramped as min(decay, (1 + n) / (10 + n)) (orig code)."""
    snr_gamma: float = 0.0
    """Min-SNR loss weighting gamma (0 disables; 5 is the usual value)."""
    noise_offset: float = 0.0
    """Offset noise strength (0 disables)."""
    timestep_bias: float = 1.0
    """k: draw training timesteps as T(1 - (1 - u)^k), u uniform. 1 is the paper's uniform draw; k > 1 trains the
    noisy steps more, where the edit must come from the conditions (share in the noisiest 20%: 0.2^(1/k), 45% at 2)."""
    edit_weight: float = 0.0
    """Extra loss weight w on the latent pixels the edit changes (1 + w there, 1 elsewhere, normalised per example;
    0: the paper's plain mean). Meant for edits of small regions, which the plain mean barely sees (docs/demo.md)."""
    edit_threshold: float = 0.05
    """A latent pixel counts as changed by the edit when the channel-mean squared difference of the target and
    source latents (both scaled by the VAE's scaling_factor) exceeds this."""
    checkpoint_every: int = 500
    """Save a resumable checkpoint every N optimizer steps (0: only at the end and on SIGTERM)."""
    checkpoints_total_limit: int = 3
    """Keep at most this many checkpoints (0: keep all)."""
    log_every: int = 10
    """Log loss, lr and throughput to the trackers every N optimizer steps."""
    final_single_file: bool = True
    """Also export <output_dir>/final.safetensors in the original SD layout (SD-shaped models only)."""
    lora_rank: int = 0
    """0 trains the whole UNet; r > 0 trains rank-r LoRA adapters of the lora_targets layers and the whole conv_in
    (ip2p.lora), the rest frozen: far less optimizer memory. The export merges them: final/ is a whole model; the
    adapters alone go to final.lora.safetensors (infer.py --checkpoint BASE --lora FILE)."""
    lora_alpha: float = 0.0
    """LoRA scale numerator: the adapters add (alpha / rank) B A x (0: alpha = rank, a scale of 1)."""
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Ends of the names of the UNet's linear layers that get adapters (the attention projections by default)."""


@dataclass
class ValidationConfig:
    every: int = 0
    """Run validation every N optimizer steps (0 disables)."""
    images: list[str] = field(default_factory=list)
    """Local image files to edit."""
    instructions: list[str] = field(default_factory=list)
    """One instruction per image (or a single one for all)."""
    steps: int = 20
    """Sampling steps for validation edits."""
    text_guidance: float = 7.5
    """Text guidance scale s_T for validation edits."""
    image_guidance: float = 1.5
    """Image guidance scale s_I for validation edits."""
    scheduler: str | None = None
    """Sampler for validation edits (see infer.py --scheduler; None: euler_a, or euler for prediction_type=sample)."""
    seed: int = 0
    """Seed of the validation edits' noise."""
    resolution: int = 256
    """Long side of validation inputs."""


@dataclass
class Config:
    output_dir: str = "runs/default"
    """Run folder: config, checkpoints, logs, validation images, final model."""
    seed: int = 0
    """Seed of all randomness (data order, augmentation, noise, dropout)."""
    resume: str | None = None
    """latest (the newest checkpoint in output_dir), or a checkpoint folder path."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Any of tensorboard, wandb (wandb honours WANDB_MODE=offline)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


_CHOICES = {
    "train.mixed_precision": MIXED_PRECISION,
    "train.optimizer": OPTIMIZERS,
    "train.lr_schedule": LR_SCHEDULES,
    "model.attention": ATTENTION,
    "model.prediction_type": (None, *PREDICTION_TYPES),
    "data.cache": CACHE_MODES,
}


# Smallest allowed value of each numeric key that has one (0 means "disabled" where the key's doc says so).
_MINIMUM = {
    "train.max_steps": 1, "train.max_minutes": 0, "train.batch_size": 1, "train.gradient_accumulation": 1,
    "train.log_every": 1, "train.lr_warmup_steps": 0, "train.checkpoint_every": 0, "train.checkpoints_total_limit": 0,
    "train.weight_decay": 0, "train.max_grad_norm": 0, "train.snr_gamma": 0, "train.noise_offset": 0,
    "train.lora_rank": 0, "train.lora_alpha": 0,
    "data.resolution": 8, "data.num_workers": 0, "validation.every": 0, "validation.steps": 1,
    "validation.resolution": 8,
}
_SECTIONS = {ModelConfig: "model", DataConfig: "data", TrainConfig: "train", ValidationConfig: "validation"}


def setting(cfg: "Config", key: str) -> Any:
    """The value of a dotted ``section.name`` key."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


class ConfigError(ValueError):
    """A config key or value is wrong; the message says which and what is allowed."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (allowing int -> float); raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r}: expected {_describe(tp)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list of {_describe(item)}, e.g. [a, b]")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; users mean a number.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            # YAML 1.1 reads a bare no/yes/off/on as a boolean; for a text field the user meant the word.
            return "no" if value is False else "yes"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise ConfigError(f"{key}: unsupported type {_describe(tp)}")


def _unknown(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], [v.split(".")[-1] for v in valid], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; valid keys here: {', '.join(valid)}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys to values, got {data!r}")
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise _unknown(full, [f"{prefix}{n}" for n in names])
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _home(path: str | None) -> str | None:
    return os.path.expanduser(path) if path else path


def validate(cfg: Config) -> Config:
    """Cross-field and choice checks; fail at load, not deep inside training."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {shown}")
    for tracker in cfg.trackers:
        if tracker not in TRACKERS:
            raise ConfigError(f"trackers: {tracker!r} is unknown; choose from {', '.join(TRACKERS)}")
    # "~/..." from YAML or a quoted override reaches us unexpanded: it would make a folder named "~" in the cwd.
    cfg.output_dir = _home(cfg.output_dir)
    cfg.resume = _home(cfg.resume)
    cfg.model.pretrained, cfg.model.config_dir = _home(cfg.model.pretrained), _home(cfg.model.config_dir)
    cfg.data.path = _home(cfg.data.path)
    cfg.validation.images = [_home(p) for p in cfg.validation.images]
    if not cfg.output_dir.strip():
        raise ConfigError("output_dir is empty; name the run folder, e.g. output_dir=runs/my-run")
    for section in (cfg, cfg.model, cfg.data, cfg.train, cfg.validation):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                key = f.name if section is cfg else f"{_SECTIONS[type(section)]}.{f.name}"
                raise ConfigError(f"{key}={value} must be a finite number")
    for key, minimum in _MINIMUM.items():
        value = setting(cfg, key)
        if value < minimum:
            raise ConfigError(f"{key}={value} must be at least {minimum}")
    if cfg.data.resolution % 8:
        # The VAE maps 8 pixels to one latent cell (SD): the rest of a crop would be trained on silently cut off.
        raise ConfigError(f"data.resolution={cfg.data.resolution} must be a multiple of 8 (the VAE's downsampling), "
                          f"e.g. {cfg.data.resolution // 8 * 8} or {cfg.data.resolution // 8 * 8 + 8}")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed} must be in [0, 2**32 - 1]")
    for key in ("train.adam_beta1", "train.adam_beta2"):
        if not 0 <= setting(cfg, key) < 1:
            raise ConfigError(f"{key}={setting(cfg, key)} must be in [0, 1)")
    if cfg.train.adam_eps <= 0:
        raise ConfigError(f"train.adam_eps={cfg.train.adam_eps} must be positive")
    if not 0 <= cfg.train.condition_dropout <= 1 / 3:
        raise ConfigError(f"train.condition_dropout={cfg.train.condition_dropout} must be in [0, 1/3]")
    if not 0 < cfg.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay={cfg.train.ema_decay} must be in (0, 1)")
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr={cfg.train.lr} must be positive")
    if cfg.train.timestep_bias <= 0:
        raise ConfigError(f"train.timestep_bias={cfg.train.timestep_bias} must be positive (1: uniform timesteps)")
    if cfg.train.edit_weight < 0:
        raise ConfigError(f"train.edit_weight={cfg.train.edit_weight} must be >= 0 (0: the plain mean)")
    if cfg.train.edit_threshold <= 0:
        raise ConfigError(f"train.edit_threshold={cfg.train.edit_threshold} must be positive")
    if cfg.train.lora_rank and not cfg.train.lora_targets:
        raise ConfigError("train.lora_targets is empty; name the linear layers that get adapters, e.g. "
                          "[to_q, to_k, to_v, to_out.0], or set train.lora_rank=0 to train the whole UNet")
    lo_hi = cfg.data.random_resize
    if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1] or lo_hi[0] < cfg.data.resolution:
        raise ConfigError(f"data.random_resize={lo_hi} must be [lo, hi] with data.resolution "
                          f"({cfg.data.resolution}) <= lo <= hi")
    if cfg.validation.every and not cfg.validation.images:
        raise ConfigError("validation.every is set but validation.images is empty; list local image files")
    if cfg.data.cache_memory_gb < 0:
        raise ConfigError(f"data.cache_memory_gb={cfg.data.cache_memory_gb} must be >= 0 (GiB per process; 0: no "
                          "in-memory cache)")
    if cfg.data.cache == "text+latents" and (cfg.data.random_crop or cfg.data.random_flip
                                              or cfg.data.random_resize[0] != cfg.data.random_resize[1]):
        # A cached latent is one fixed view of the image; random crops/flips would silently stop being random.
        raise ConfigError("data.cache=text+latents caches one view per image, so it needs fixed preprocessing: set "
                          "data.random_crop=false data.random_flip=false and data.random_resize=[R, R]")
    n_img, n_ins = len(cfg.validation.images), len(cfg.validation.instructions)
    if n_img and n_ins not in (1, n_img):
        raise ConfigError(f"validation.instructions has {n_ins} entries for {n_img} images; give 1 or {n_img}")
    if n_img and not n_ins:
        raise ConfigError("validation.images is set but validation.instructions is empty")
    return cfg


class _DuplicateKey(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"key {key!r} appears twice in one section (lines {seen[key]} and {line}); "
                                    "merge the two into one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", YAML-parsed value), so numbers, booleans, lists and null work as in the file."""
    if "=" not in text:
        if text.endswith((".yaml", ".yml")):
            raise ConfigError(f"override {text!r} must look like key=value; to read a config file, pass "
                              f"--config {text}")
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.max_steps=100")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file {p} is a folder, not a YAML file; see configs/ for examples")
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist; see configs/ for examples")
        try:
            data = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"config file {p} is not UTF-8 text; give a YAML file, e.g. configs/tiny.yaml") from None
        except yaml.YAMLError as e:
            if isinstance(e, _DuplicateKey):
                raise ConfigError(f"{p}: {e}") from None
            raise ConfigError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from e
        _apply(cfg, data)
    for text in overrides or []:
        key, value = parse_override(text)
        _apply(cfg, nest(key, value))
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data)
    return validate(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically."""
    from ip2p import atomic

    atomic.write_text(path, dump(cfg))


def reference() -> list[tuple[str, str, str]]:
    """(key, default, doc) for every key, read from the dataclasses' attribute docstrings (README table)."""
    import ast
    import inspect

    rows = []

    def docs(cls: type) -> dict[str, str]:
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        out = {}
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                out[node.target.id] = " ".join(str(nxt.value.value).split())
        return out

    def walk(obj: Any, prefix: str) -> None:
        d = docs(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                rows.append((f"{prefix}{f.name}", yaml.safe_dump(value, default_flow_style=True).strip()
                             .removesuffix("...").strip(), d.get(f.name, "")))

    walk(Config(), "")
    return rows
