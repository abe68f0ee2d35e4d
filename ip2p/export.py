"""Checkpoint I/O in the formats other tools load: a diffusers pipeline folder and one original-layout single file.

- ``save_pipeline_folder``: what ``StableDiffusionInstructPix2PixPipeline.from_pretrained`` reads (safetensors), plus
  ``ip2p.json`` (ip2p version, ``scale_source_latent``, run config) which diffusers ignores.
- ``save_single_file`` / ``load_single_file``: one ``.safetensors`` in the original Stable Diffusion (LDM) key layout
  (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``) that ComfyUI, A1111 and diffusers'
  ``from_single_file`` load. The diffusers -> LDM key map is built from each model's config (levels, layers per block,
  which levels have attention), so any SD-shaped model maps, not only SD's exact sizes; a model whose structure the
  original layout cannot express is refused with a ValueError pointing at the folder format.

Both writers are atomic: they write beside the target and rename into place, so a killed save never leaves a broken
checkpoint at the target path (``ip2p.atomic``; the next save cleans up what a killed one left).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ip2p import __version__, atomic
from ip2p.models import (
    IP2P_META_FILE,
    check_tokenizer,
    first_line,
    hub_offline,
    hub_host,
    scheduler_from_config,
)

logger = logging.getLogger(__name__)

FORMAT_LDM = "ldm"
UNET_PREFIX = "model.diffusion_model."
TEXT_POOL = "add_embedding"  # a UNet with addition_embed_type="text" keeps this module's keys under UNET_PREFIX
VAE_PREFIX = "first_stage_model."
# SD 1.x keeps the Hugging Face CLIP module names; SD 2.x stores OpenCLIP's own names.
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIX = "conditioner.embedders."  # SDXL's two text encoders; SD 1.x/2.x files have one cond_stage_model
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PIPELINE_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


# ---- diffusers pipeline folder ---------------------------------------------------------------------------------------

def save_pipeline_folder(components: Any, out_dir: str | os.PathLike, *,
                         ip2p_metadata: dict | None = None) -> Path:
    """Write ``components`` (``.unet .vae .text_encoder .tokenizer .scheduler``) as a diffusers InstructPix2Pix folder.

    The folder loads with ``StableDiffusionInstructPix2PixPipeline.from_pretrained`` (no safety checker). Its
    ``ip2p.json`` holds the ip2p version, ``scale_source_latent`` (from ``components.scale_source_latent``, default
    False) and ``ip2p_metadata`` (e.g. the resolved run config). An existing pipeline folder at ``out_dir`` is replaced
    only after the new one is complete; any other existing non-empty folder is refused rather than deleted.
    """
    from diffusers import StableDiffusionInstructPix2PixPipeline

    out = Path(out_dir)
    _check_replaceable_folder(out)
    meta_json = json.dumps(_ip2p_meta(components, ip2p_metadata), indent=2, sort_keys=True, default=_json_default)
    with atomic.writing_folder(out) as tmp:
        pipe = StableDiffusionInstructPix2PixPipeline(
            vae=_plain(components.vae), text_encoder=_plain(components.text_encoder), tokenizer=components.tokenizer,
            unet=_plain(components.unet), scheduler=components.scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / IP2P_META_FILE).write_text(meta_json)
    logger.info("saved diffusers pipeline folder %s", out)
    return out


def _check_replaceable_folder(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"out_dir={str(out)!r} is an existing file; expected a folder path for the pipeline")
    # Never delete a folder that is not a checkpoint (e.g. a mistyped ".", or the run directory itself).
    if any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise ValueError(
            f"out_dir={str(out)!r} exists and is not a diffusers pipeline folder (no model_index.json); refusing to "
            "replace it: pass a new or empty folder"
        )


# ---- original (LDM) single file: saving -----------------------------------------------------------------------------

def save_single_file(components: Any, path: str | os.PathLike, *, ip2p_metadata: dict | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """Write UNet, VAE and text encoder as one ``.safetensors`` in the original Stable Diffusion key layout.

    ``dtype`` (e.g. ``torch.float16``) casts floating-point tensors to make the file smaller. The safetensors metadata
    holds ``format`` ("ldm"), ``ip2p_version``, ``scale_source_latent`` and ``ip2p_config`` (JSON of
    ``ip2p_metadata``). Raises ValueError for models the original layout cannot express (save a folder instead).
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"path={str(path)!r} must end in .safetensors (the single file is always safetensors)")
    if path.is_dir():
        raise ValueError(f"path={str(path)!r} is an existing folder; expected a file path for the single file")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype} is not a floating-point dtype; expected e.g. torch.float16 or torch.bfloat16")
    state = to_ldm_state_dict(components)
    tensors = {}
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous()
    meta = _ip2p_meta(components, ip2p_metadata)
    header = {
        "format": FORMAT_LDM,
        "ip2p_version": meta["ip2p_version"],
        "scale_source_latent": json.dumps(meta["scale_source_latent"]),
        "ip2p_config": json.dumps(meta["ip2p_config"], sort_keys=True, default=_json_default),
    }
    with atomic.writing_file(path) as tmp:
        save_file(tensors, tmp, metadata=header)
    logger.info("saved single-file checkpoint %s (%d tensors)", path, len(tensors))
    return path


def to_ldm_state_dict(components: Any) -> dict[str, torch.Tensor]:
    """The UNet, VAE and text encoder weights under their original Stable Diffusion (LDM) key names."""
    unet, vae, text_encoder = _plain(components.unet), _plain(components.vae), _plain(components.text_encoder)
    _warn_ldm_defaults(unet.config, vae.config)
    state: dict[str, torch.Tensor] = {}
    state.update(_rename(unet.state_dict(), _unet_rules(unet.config), "unet", UNET_PREFIX))
    state.update(_rename(vae.state_dict(), _vae_rules(vae.config), "vae", VAE_PREFIX))
    state.update(_text_encoder_to_ldm(text_encoder))
    return state


@dataclass(frozen=True)
class _Rule:
    """Keys under diffusers prefix ``src`` go under LDM prefix ``dst``.

    ``modules`` renames the module path between prefix and parameter name; when given, any module not in it means the
    block holds something the original layout has no place for. ``conv1x1`` stores linear weights as 1x1 convs.
    """

    src: str
    dst: str
    modules: dict[str, str] | None = None
    conv1x1: bool = False


_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

# Block types whose parameters have a place in LDM's openaimodel UNet / autoencoder.
_UNET_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UNET_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_UNET_MID = "UNetMidBlock2DCrossAttn"

# Settings LDM hard-codes: tools that rebuild the model from keys alone (ComfyUI, A1111) assume these values.
_LDM_UNET_DEFAULTS = {"flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_num_groups": 32,
                      "center_input_sample": False, "resnet_time_scale_shift": "default", "downsample_padding": 1,
                      "only_cross_attention": False, "dual_cross_attention": False, "conv_in_kernel": 3,
                      "conv_out_kernel": 3, "addition_embed_type": None}
_LDM_VAE_DEFAULTS = {"act_fn": "silu", "norm_num_groups": 32}


def _unet_rules(config: Any) -> list[_Rule]:
    """Key rules for ``UNet2DConditionModel`` built from its config, mirroring how LDM numbers its blocks.

    LDM's ``input_blocks`` are conv_in, then per level ``layers_per_block`` (resnet[, attention]) entries and a
    downsampler on every level but the last; ``output_blocks`` run from the deepest level with one more resnet per
    level and the upsampler in the level's last entry, after the attention when there is one.
    """
    down, up = tuple(config.down_block_types), tuple(config.up_block_types)
    layers = config.layers_per_block
    levels = len(config.block_out_channels)
    problems = [f"down block {t!r}" for t in down if t not in _UNET_DOWN]
    problems += [f"up block {t!r}" for t in up if t not in _UNET_UP]
    if config.mid_block_type != _UNET_MID:
        problems.append(f"mid block {config.mid_block_type!r}")
    if config.addition_embed_type not in (None, "text"):
        problems.append(f"addition_embed_type={config.addition_embed_type!r}")
    if not isinstance(layers, int):
        problems.append(f"per-level layers_per_block={list(layers)}")
    if len(down) != levels or len(up) != levels:
        problems.append(f"{len(down)} down / {len(up)} up blocks for {levels} levels")
    if problems:
        _unmappable("unet", ", ".join(problems))

    rules = [_Rule("time_embedding.linear_1.", "time_embed.0."), _Rule("time_embedding.linear_2.", "time_embed.2."),
             _Rule("conv_in.", "input_blocks.0.0."), _Rule("conv_norm_out.", "out.0."), _Rule("conv_out.", "out.2.")]
    if config.addition_embed_type == "text":
        # LDM has no pooled-text embedding; it keeps its diffusers name, and load_single_file puts it back.
        rules.append(_Rule(f"{TEXT_POOL}.", f"{TEXT_POOL}."))
    block = 1
    for level, kind in enumerate(down):
        for j in range(layers):
            rules.append(_Rule(f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{block}.0.", _UNET_RESNET))
            if kind == "CrossAttnDownBlock2D":
                rules.append(_Rule(f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{block}.1."))
            block += 1
        if level < levels - 1:
            rules.append(_Rule(f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{block}.0.op."))
            block += 1
    rules += [_Rule("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
              _Rule("mid_block.attentions.0.", "middle_block.1."),
              _Rule("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)]
    block = 0
    for level, kind in enumerate(up):
        attention = kind == "CrossAttnUpBlock2D"
        for j in range(layers + 1):
            rules.append(_Rule(f"up_blocks.{level}.resnets.{j}.", f"output_blocks.{block}.0.", _UNET_RESNET))
            if attention:
                rules.append(_Rule(f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{block}.1."))
            if j == layers and level < levels - 1:
                slot = 2 if attention else 1
                rules.append(_Rule(f"up_blocks.{level}.upsamplers.0.conv.", f"output_blocks.{block}.{slot}.conv."))
            block += 1
    return rules


def _vae_rules(config: Any) -> list[_Rule]:
    """Key rules for ``AutoencoderKL`` built from its config; LDM numbers decoder levels from the full-size end."""
    problems = [f"down block {t!r}" for t in config.down_block_types if t != "DownEncoderBlock2D"]
    problems += [f"up block {t!r}" for t in config.up_block_types if t != "UpDecoderBlock2D"]
    if problems:
        _unmappable("vae", ", ".join(problems))
    levels = len(config.block_out_channels)
    layers = config.layers_per_block
    rules = [_Rule("quant_conv.", "quant_conv."), _Rule("post_quant_conv.", "post_quant_conv.")]
    for side in ("encoder", "decoder"):
        rules += [_Rule(f"{side}.conv_in.", f"{side}.conv_in."), _Rule(f"{side}.conv_out.", f"{side}.conv_out."),
                  _Rule(f"{side}.conv_norm_out.", f"{side}.norm_out."),
                  _Rule(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", _VAE_RESNET),
                  _Rule(f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", _VAE_RESNET),
                  _Rule(f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", _VAE_ATTENTION, conv1x1=True)]
    for level in range(levels):
        for j in range(layers):
            rules.append(_Rule(f"encoder.down_blocks.{level}.resnets.{j}.", f"encoder.down.{level}.block.{j}.",
                               _VAE_RESNET))
        ldm_level = levels - 1 - level
        for j in range(layers + 1):
            rules.append(_Rule(f"decoder.up_blocks.{level}.resnets.{j}.", f"decoder.up.{ldm_level}.block.{j}.",
                               _VAE_RESNET))
        if level < levels - 1:  # all encoder levels but the deepest downsample; all decoder ones but the last upsample
            rules += [_Rule(f"encoder.down_blocks.{level}.downsamplers.0.conv.",
                            f"encoder.down.{level}.downsample.conv."),
                      _Rule(f"decoder.up_blocks.{level}.upsamplers.0.conv.", f"decoder.up.{ldm_level}.upsample.conv.")]
    return rules


def _rename(state: dict[str, torch.Tensor], rules: list[_Rule], what: str, prefix: str) -> dict[str, torch.Tensor]:
    """Apply ``rules`` to every key of ``state``; any key without a rule makes the model unmappable."""
    by_src = {rule.src: rule for rule in rules}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        rule = None
        for cut in range(len(key) - 1, 0, -1):  # longest matching prefix wins
            if key[cut] == "." and key[: cut + 1] in by_src:
                rule = by_src[key[: cut + 1]]
                break
        if rule is None:
            _unmappable(what, f"parameter {key!r} has no place in the original layout")
        module, _, param = key[len(rule.src):].rpartition(".")
        if rule.modules is not None:
            if module not in rule.modules:
                _unmappable(what, f"parameter {key!r} has no place in the original layout")
            module = rule.modules[module]
        if rule.conv1x1 and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        new_key = prefix + rule.dst + (f"{module}.{param}" if module else param)
        if new_key in out:
            _unmappable(what, f"two parameters map to {new_key!r}")
        out[new_key] = tensor
    return out


def _text_encoder_to_ldm(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CLIP weights under SD 1.x names (OpenAI CLIP, quick_gelu) or SD 2.x OpenCLIP names (gelu).

    transformers 5 flattened ``CLIPTextModel`` (no ``text_model.`` prefix); older versions and
    ``CLIPTextModelWithProjection`` keep the prefix, so both are accepted.
    """
    state = _text_state(text_encoder)
    act = getattr(text_encoder.config, "hidden_act", None)
    if act == "quick_gelu":
        # Only the text transformer has a place in SD 1.x files (no projection head, e.g. CLIPTextModelWithProjection).
        extra = [k for k in state if not k.startswith(("embeddings.", "encoder.", "final_layer_norm."))]
        if extra:
            _unmappable("text_encoder", f"parameter {extra[0]!r} has no place in the original layout")
        return {f"{CLIP_PREFIX}text_model.{k}": v for k, v in state.items()}
    if act == "gelu":
        return _open_clip_state(state)
    _unmappable("text_encoder", f"hidden_act={act!r} is neither OpenAI CLIP's 'quick_gelu' (SD 1.x) nor "
                                "OpenCLIP's 'gelu' (SD 2.x)")


def _text_state(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP text model's weights without the ``text_model.`` prefix (present or not, by transformers version) and
    without the position-id buffer (a constant; loaders rebuild it)."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    state.pop("embeddings.position_ids", None)
    return state


def _open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP's names for a Hugging Face CLIP text model; q, k, v fuse into ``in_proj``.

    SD 2.x conditions on the penultimate OpenCLIP layer: diffusers stores only the layers used (23 of 24), and tools
    loading the original layout skip the last layer, so the missing one is never read.
    """
    simple = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    layer_modules = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                     "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key in simple:
            out[OPEN_CLIP_PREFIX + simple[key]] = tensor
            continue
        parts = key.split(".")
        if key.startswith("encoder.layers.") and len(parts) >= 5:
            layer, module, param = parts[2], ".".join(parts[3:-1]), parts[-1]
            base = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault(f"{base}attn.in_proj_{param}", {})[module.removeprefix("self_attn.")[0]] = tensor
                continue
            if module in layer_modules:
                out[f"{base}{layer_modules[module]}.{param}"] = tensor
                continue
        _unmappable("text_encoder", f"parameter {key!r} has no place in the OpenCLIP layout")
    for key, qkv in fused.items():
        out[key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def _warn_ldm_defaults(unet_config: Any, vae_config: Any) -> None:
    """Log settings that diffusers loads (with a config folder) but key-only loaders would silently replace."""
    diffs = [f"unet.{k}={unet_config.get(k)!r}" for k, v in _LDM_UNET_DEFAULTS.items() if unet_config.get(k, v) != v]
    diffs += [f"vae.{k}={vae_config.get(k)!r}" for k, v in _LDM_VAE_DEFAULTS.items() if vae_config.get(k, v) != v]
    if diffs:
        logger.warning("single file: %s differ from the original SD architecture; diffusers' from_single_file with a "
                       "config folder loads it exactly, ComfyUI/A1111 would assume SD's values", ", ".join(diffs))


class _Unmappable(ValueError):
    """A model the original layout cannot express; ``why`` says what, for readers that word the error their way."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what} cannot be written in the original Stable Diffusion single-file layout ({why}); "
                         "save a diffusers pipeline folder instead (save_pipeline_folder)")
        self.why = why


def _unmappable(what: str, why: str) -> NoReturn:
    raise _Unmappable(what, why)


# ---- original (LDM) single file: loading ----------------------------------------------------------------------------

def read_metadata(path: str | os.PathLike) -> dict:
    """The safetensors header metadata of ``path``, without loading tensors.

    ip2p's fields are decoded: ``scale_source_latent`` to a bool and ``ip2p_config`` to a dict; other entries stay
    strings. A file without metadata gives {}.
    """
    path = _existing_file(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors file; only safetensors files carry ip2p metadata")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a valid safetensors file ({e}); expected a .safetensors checkpoint") from e
    return _decode_metadata(raw, path)


def load_single_file(path: str | os.PathLike, *, config_dir: str | None = None, allow_pickle: bool = False,
                     torch_dtype: torch.dtype | None = None, extract_ema: bool = False) -> dict:
    """Load an original-layout SD checkpoint into diffusers components.

    Returns ``{"unet", "vae", "text_encoder", "tokenizer", "scheduler", "metadata"}``. ``config_dir`` is a diffusers
    pipeline folder (or, with network access, a hub id) giving the architecture, tokenizer and scheduler; without it
    the hub repo diffusers associates with the file is used, which needs network. The UNet's input channels come from
    the file, so an 8-channel editor loads with a 4-channel SD folder. Pickled files (``.ckpt``, ``.pt``, ``.bin``)
    load only with ``allow_pickle=True``, and then with ``torch.load(weights_only=True)``.

    Original training checkpoints (e.g. ``instruct-pix2pix-00-22000``) also hold EMA UNet weights (``model_ema.*``):
    by default the raw ones load, as in diffusers, ComfyUI and A1111; ``extract_ema=True`` loads the EMA ones, which
    the authors' own inference config uses.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = _existing_file(path)
    checkpoint = _read_checkpoint(path, allow_pickle)
    _check_ldm_layout(checkpoint, path)
    metadata = read_metadata(path) if path.suffix.lower() == ".safetensors" else {}
    source, local_only = _config_source(config_dir, checkpoint, path)
    in_channels = int(checkpoint[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1])
    # LDM names EMA copies after the parameter with its dots removed: model_ema.diffusion_modelinput_blocks00weight
    has_ema = any(k.startswith("model_ema.diffusion_model") for k in checkpoint)
    if extract_ema and not has_ema:
        raise ValueError(f"extract_ema=True but {path} holds no EMA weights (model_ema.*); load it without the flag")
    if has_ema and not extract_ema:
        logger.info("%s also holds EMA UNet weights; loading the raw ones (extract_ema=True loads the EMA ones)", path)
    try:
        _check_keys_present(checkpoint, path, source, in_channels, local_only)
    except OSError as e:  # the first read of the config: a hub id that cannot be reached or lacks it
        first = first_line(e)
        raise FileNotFoundError(f"could not read the architecture of {path} from {source!r} ({first}); pass "
                                "--config-dir, a local diffusers folder of the model family the file was trained "
                                "from") from e
    loaded: dict[str, Any] = {}
    try:
        # diffusers takes in_channels from the config folder; the file knows better (4-channel SD folder, 8-channel
        # editor), and from_single_file forwards config overrides given as keyword arguments.
        pooled = UNet2DConditionModel.load_config(source, subfolder="unet", local_files_only=local_only).get(
            "addition_embed_type") == "text"
        # diffusers' converter skips the pooled-text module; built on the meta device it would stay empty.
        loaded["unet"] = UNet2DConditionModel.from_single_file(
            checkpoint, config=source, subfolder="unet", in_channels=in_channels, torch_dtype=torch_dtype,
            local_files_only=local_only, extract_ema=extract_ema, **({"low_cpu_mem_usage": False} if pooled else {}))
        _load_text_pool(loaded["unet"], checkpoint)
        loaded["vae"] = AutoencoderKL.from_single_file(
            checkpoint, config=source, subfolder="vae", torch_dtype=torch_dtype, local_files_only=local_only)
        loaded["text_encoder"] = _load_text_encoder(checkpoint, source, torch_dtype, local_only)
    except (ValueError, RuntimeError, KeyError) as e:
        first = first_line(e)
        raise ValueError(f"{path} does not fit the architecture in config_dir={source!r} ({first}); pass the "
                         "--config-dir of the model family the file was trained from") from e
    for name, model in loaded.items():
        _check_materialised(model, name, path)
    loaded["tokenizer"], loaded["scheduler"] = _load_tokenizer_and_scheduler(source, local_only)
    loaded["scheduler"] = _as_trained(loaded["scheduler"], metadata)
    loaded["metadata"] = metadata
    logger.info("loaded single-file checkpoint %s (unet in_channels=%d, config from %s)", path, in_channels, source)
    return loaded


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    return path


def _read_checkpoint(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The file's tensors; pickles only when allowed, and then without executing arbitrary objects."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a valid safetensors file ({e}); expected an original-layout SD "
                             "checkpoint") from e
    elif suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ValueError(f"{path} is a pickle ({suffix}), which can run code when loaded; pass allow_pickle=True "
                             "(--allow-pickle) if you trust it, or convert it to .safetensors")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
            raise ValueError(f"{path} could not be read with torch.load(weights_only=True) ({type(e).__name__}); "
                             "expected a checkpoint of plain tensors") from e
        # Lightning and the original repos nest the weights under "state_dict".
        while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, expected a dict of tensors")
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    else:
        raise ValueError(f"{path} has suffix {suffix!r}; expected .safetensors (or {', '.join(PICKLE_SUFFIXES)} "
                         "with allow_pickle=True)")
    return state


def _check_ldm_layout(checkpoint: dict[str, torch.Tensor], path: Path) -> None:
    if any(k.startswith(SDXL_TEXT_PREFIX) for k in checkpoint):
        raise ValueError(f"{path} is a Stable Diffusion XL checkpoint ({SDXL_TEXT_PREFIX}* keys: two text encoders); "
                         "ip2p supports the SD 1.x/2.x architecture: pass an SD 1.x/2.x base or InstructPix2Pix file")
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    missing = []
    if conv_in not in checkpoint:
        missing.append(UNET_PREFIX + "*")
    if not any(k.startswith(VAE_PREFIX) for k in checkpoint):
        missing.append(VAE_PREFIX + "*")
    if not any(k.startswith((CLIP_PREFIX, OPEN_CLIP_PREFIX)) for k in checkpoint):
        missing.append(f"{CLIP_PREFIX}* or {OPEN_CLIP_PREFIX}*")
    if missing:
        hint = ""
        if any(".lora_A." in k or ".lora_down." in k for k in checkpoint):
            hint = (" (it holds LoRA adapters, not a whole model: pass the base model as --checkpoint and an ip2p "
                    "adapter file, final.lora.safetensors, as --lora)")
        elif any(k.startswith(("conv_in.", "down_blocks.", "encoder.down_blocks.", "text_model.", "embeddings."))
                 for k in checkpoint):
            hint = " (it looks like one diffusers component: load its pipeline folder instead)"
        raise ValueError(f"{path} is not an original-layout SD checkpoint: no {', '.join(missing)} keys{hint}; "
                         "expected a full SD/InstructPix2Pix single file")


def _config_source(config_dir: str | None, checkpoint: dict[str, torch.Tensor], path: Path) -> tuple[str, bool]:
    """Where the architecture comes from: the given folder, a hub id (online), or the repo diffusers infers (online);
    and whether to read it from local files only (a folder, or no hub: asked once, it may cost a DNS lookup)."""
    if config_dir is not None:
        folder = Path(config_dir)
        if folder.is_dir():
            missing = [s for s in PIPELINE_SUBFOLDERS if not (folder / s).is_dir()]
            if missing:
                raise ValueError(f"config_dir={config_dir!r} lacks {', '.join(missing)}; expected a diffusers pipeline "
                                 "folder of the same model family (unet/ vae/ text_encoder/ tokenizer/ scheduler/)")
            return str(folder), True
        if folder.exists() or str(config_dir).count("/") != 1:
            raise FileNotFoundError(f"config_dir={config_dir!r} is not a folder; expected a local diffusers pipeline "
                                    "folder of the model family the file was trained from")
        return str(config_dir), hub_offline()
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    repo = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]  # from the keys: no download
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo, "unet/config.json"), str):
            logger.info("no config_dir given: taking the architecture of %s from %s (hub cache)", path, repo)
            return repo, True
        # At once, not after diffusers has retried each file for half a minute.
        raise ValueError(f"loading {path} offline (HF_HUB_OFFLINE is set or {hub_host()} cannot be reached) needs a "
                         f"local diffusers folder giving the architecture ({repo} is not in the hub cache): pass "
                         "config_dir (--config-dir), e.g. a Stable Diffusion 1.5 pipeline folder")
    logger.info("no config_dir given: taking the architecture of %s from %s (hub)", path, repo)
    return repo, False


def _check_keys_present(checkpoint: dict[str, torch.Tensor], path: Path, source: str, in_channels: int,
                        local_only: bool) -> None:
    """Name the UNet/VAE weights the architecture needs but the file lacks (diffusers fails on them obscurely), and
    the UNet, VAE and text-encoder weights the file holds but the architecture has no place for (diffusers drops them
    silently: a file with two transformer layers per block read with a one-layer config would load as another, wrong
    model)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    for cls, name, prefix, rules, overrides in (
            (UNet2DConditionModel, "unet", UNET_PREFIX, _unet_rules, {"in_channels": in_channels}),
            (AutoencoderKL, "vae", VAE_PREFIX, _vae_rules, {})):
        config = {**cls.load_config(source, subfolder=name, local_files_only=local_only), **overrides}
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = cls.from_config(config)
        try:
            expected = _rename(model.state_dict(), rules(model.config), name, prefix)
        except _Unmappable as e:  # e.g. an SDXL folder: no original-layout file fits it, so neither does this one
            raise ValueError(f"config_dir={source!r} has a {name} that no original-layout file holds ({e.why}), so "
                             f"{path} cannot be read with it; pass the --config-dir of the SD 1.x/2.x model family "
                             "the file was trained from") from e
        missing = sorted(k for k in expected if k not in checkpoint)
        if missing:
            raise ValueError(f"{path} lacks {len(missing)} {name} weights that config_dir={source!r} needs (e.g. "
                             f"{missing[0]!r}); pass the --config-dir of the model family the file was trained from")
        _refuse_unused(sorted(k for k in checkpoint if k.startswith(prefix) and k not in expected), name, path, source)
    _check_text_encoder_keys(checkpoint, path, source, local_only)


def _refuse_unused(unused: list[str], name: str, path: Path, source: str) -> None:
    if unused:
        raise ValueError(f"{path} holds {len(unused)} {name} weights that config_dir={source!r} has no place for "
                         f"(e.g. {unused[0]!r}), which would be dropped; pass the --config-dir of the model family "
                         "the file was trained from")


def _check_text_encoder_keys(checkpoint: dict[str, torch.Tensor], path: Path, source: str, local_only: bool) -> None:
    """Refuse transformer layers of the text encoder that the config's CLIP has no place for: diffusers' converter
    drops them silently (a file with five text layers read with a three-layer config loads as a different, wrong text
    encoder). Other weights it has no place for (a projection head some tools save) are named in a warning, not
    refused, since diffusers reads such files as they are.

    Missing ones are caught after loading (:func:`_check_materialised`). Expected extras: the position-id buffer (SD
    1.x), OpenCLIP's projection, logit scale and attention mask, and the last OpenCLIP layer, which SD 2.x files hold
    but never use (it conditions on the penultimate layer, so diffusers' config has one layer fewer)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(source, subfolder="text_encoder", local_files_only=local_only)
    with torch.device("meta"):
        state = _text_state(CLIPTextModel(config))
    if any(k.startswith(CLIP_PREFIX) for k in checkpoint):  # the layout diffusers' converter reads, too
        prefix, expected = CLIP_PREFIX, {f"{CLIP_PREFIX}text_model.{k}" for k in state}
        allowed = (f"{CLIP_PREFIX}text_model.embeddings.position_ids",)
    else:
        prefix, expected = OPEN_CLIP_PREFIX, set(_open_clip_state(state))
        allowed = tuple(OPEN_CLIP_PREFIX + k for k in ("text_projection", "logit_scale", "attn_mask",
                                                         f"transformer.resblocks.{config.num_hidden_layers}."))
    unused = sorted(k for k in checkpoint if k.startswith(prefix) and k not in expected and not k.startswith(allowed))
    _refuse_unused([k for k in unused if ".encoder.layers." in k or ".resblocks." in k], "text_encoder", path, source)
    if unused:
        logger.warning("%s: %d text-encoder weights have no place in config_dir=%r's CLIP and are not read (e.g. %r)",
                       path, len(unused), source, unused[0])


def _load_text_encoder(checkpoint: dict[str, torch.Tensor], source: str, torch_dtype: torch.dtype | None,
                       local_only: bool) -> torch.nn.Module:
    """CLIP text model from either SD 1.x (Hugging Face names) or SD 2.x (OpenCLIP names) keys.

    diffusers' own converter is used (what ``from_single_file`` runs for pipelines) so that third-party files load
    exactly as diffusers loads them.
    """
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    return create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint=checkpoint, subfolder="text_encoder",
                                                config=source, torch_dtype=torch_dtype, local_files_only=local_only)


def _load_tokenizer_and_scheduler(source: str, local_only: bool) -> tuple[Any, Any]:
    import diffusers
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local_only)
        sched_config = diffusers.DDPMScheduler.load_config(source, subfolder="scheduler", local_files_only=local_only)
        scheduler = scheduler_from_config(sched_config)
    except (OSError, ValueError, TypeError, NotImplementedError) as e:  # damaged JSON, an unknown beta schedule
        raise ValueError(f"config_dir={source!r} has a damaged tokenizer or scheduler ({first_line(e)}); re-export or "
                         "re-download that folder") from e
    check_tokenizer(tokenizer, f"config_dir={source!r}")
    return tokenizer, scheduler


def _as_trained(scheduler: Any, metadata: dict) -> Any:
    """``scheduler`` (from ``config_dir``, usually the base model's) set up as the run in ``metadata`` trained the file:
    an x0-prediction or zero-terminal-SNR model sampled with the base's settings would give wrong images silently."""
    import diffusers

    from ip2p.sampling import trained_scheduler_config, unsupported

    run = metadata.get("ip2p_config")
    run = run.get("config") if isinstance(run, dict) else None  # what Trainer.export_final writes
    model = run.get("model") if isinstance(run, dict) else None
    if not isinstance(model, dict):
        return scheduler
    config = trained_scheduler_config(dict(scheduler.config), model.get("prediction_type"),
                                      bool(model.get("zero_terminal_snr")))
    if config == dict(scheduler.config):
        return scheduler
    cls = type(scheduler)
    if unsupported(cls, config):  # e.g. SD's PNDM cannot step x0 predictions; the exported folder uses Euler too
        cls = diffusers.EulerDiscreteScheduler
    logger.info("scheduler set up as the file was trained: %s",
                {k: config[k] for k in ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing") if k in config})
    return cls.from_config(config)


def _load_text_pool(unet: torch.nn.Module, checkpoint: dict[str, torch.Tensor]) -> None:
    """Fill a pooled-text UNet's ``add_embedding`` (no LDM counterpart, so diffusers' converter skips it).

    Its weights are the ones :func:`save_single_file` wrote; such files hold no EMA copies."""
    if unet.config.addition_embed_type != "text":
        return
    prefix = UNET_PREFIX + TEXT_POOL + "."
    dtype = unet.conv_in.weight.dtype
    state = {k[len(prefix):]: v.to(dtype) for k, v in checkpoint.items() if k.startswith(prefix)}
    unet.add_embedding.load_state_dict(state, strict=True)


def _check_materialised(model: torch.nn.Module, name: str, path: Path) -> None:
    """diffusers builds models on the meta device and fills them from the file; a key it missed stays empty."""
    empty = [k for k, v in model.state_dict().items() if v.is_meta]
    if empty:
        raise ValueError(f"{path} lacks {len(empty)} {name} weights (e.g. {empty[0]!r}) that the config_dir "
                         "architecture needs; pass the --config-dir of the model family the file was trained from")


def _decode_metadata(raw: dict[str, str], path: Path) -> dict:
    meta: dict[str, Any] = dict(raw)
    try:
        if "scale_source_latent" in meta:
            meta["scale_source_latent"] = bool(json.loads(meta["scale_source_latent"]))
        if "ip2p_config" in meta:
            meta["ip2p_config"] = json.loads(meta["ip2p_config"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: ip2p metadata is not valid JSON ({e}); re-export the checkpoint") from e
    return meta


# ---- shared helpers --------------------------------------------------------------------------------------------------

def _plain(module: Any) -> Any:
    """The module itself when wrapped by ``torch.compile``, whose state-dict keys carry an ``_orig_mod.`` prefix."""
    return getattr(module, "_orig_mod", module)


def _ip2p_meta(components: Any, ip2p_metadata: dict | None) -> dict:
    if ip2p_metadata is not None and not isinstance(ip2p_metadata, dict):
        raise ValueError(f"ip2p_metadata is a {type(ip2p_metadata).__name__}; expected a dict (e.g. the run config)")
    meta = {"ip2p_version": __version__,
            "scale_source_latent": bool(getattr(components, "scale_source_latent", False)),
            "ip2p_config": ip2p_metadata or {}}
    try:
        json.dumps(meta, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"ip2p_metadata cannot be stored as JSON ({e}); pass plain values (str, numbers, lists, "
                         "dicts)") from e
    return meta


def _json_default(value: Any) -> Any:
    """JSON for the values a run config holds besides plain ones: paths, dataclasses, dtypes."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
