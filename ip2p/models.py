"""Load Stable Diffusion components from a folder, a hub id or a single file, and turn the UNet into an editor.

The editor's UNet takes ``cat([noisy_latent, source_latent], dim=1)``: ``expand_conv_in`` adds zero-initialised input
channels for the source latent and keeps the pretrained weights and bias, so at step 0 the model is the base model.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

IP2P_META_FILE = "ip2p.json"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass
class EditorModel:
    """The five pipeline components plus how the source latent is scaled."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    scale_source_latent: bool = False
    unet_batch: int | None = None
    """Most rows per UNet forward while sampling (None: all guidance branches of all images in one forward); 1 is
    what ``low_memory`` sets."""

    def low_memory(self) -> "EditorModel":
        """Trade speed for peak memory: the guidance branches go through the UNet one at a time, and the VAE encodes
        and decodes one image at a time, in tiles above its native size (diffusers' slicing and tiling; tiles blend
        at their seams, so large images differ slightly from an untiled decode)."""
        self.unet_batch = 1
        self.vae.enable_slicing()
        self.vae.enable_tiling()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        return vae_downsampling(self.vae)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "EditorModel":
        # Only what is asked: diffusers warns about any dtype argument passed to .to(), even None.
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(**kwargs)
        return self

    def eval(self) -> "EditorModel":
        for module in (self.unet, self.vae, self.text_encoder):
            module.eval()
        return self


def vae_downsampling(vae) -> int:
    """How many pixels one latent cell spans per side (8 for Stable Diffusion's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def expand_conv_in(unet: torch.nn.Module, latent_channels: int = 4) -> bool:
    """Give ``unet`` ``2 * latent_channels`` input channels for the source latent; returns True if it changed.

    New channels get zero weights; the old weights and the bias are kept (diffusers' script drops the bias, #4960), so
    the expanded UNet's output equals the base UNet's for any source latent. An already-expanded UNet is left alone.
    """
    target = 2 * latent_channels
    conv = unet.conv_in
    current = conv.in_channels
    if current == target:
        return False
    if current != latent_channels:
        raise ValueError(
            f"unet.conv_in has {current} input channels; expected {latent_channels} (a text-to-image base to expand) "
            f"or {target} (an editor already); inpainting-style or other UNets are not supported"
        )
    new = torch.nn.Conv2d(target, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :current].copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    unet.conv_in = new
    # Keep the saved config truthful so diffusers rebuilds the right shape on load.
    unet.register_to_config(in_channels=target)
    return True


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` (or a legacy ``name``) as the hub spells ids; not a path that merely does not exist here."""
    return not text.startswith((".", "/", "~")) and "\\" not in text and _HUB_ID.fullmatch(text) is not None


def is_single_file(source: str | os.PathLike) -> bool:
    return str(source).lower().endswith(SINGLE_FILE_SUFFIXES)


def read_ip2p_meta(folder: str | os.PathLike) -> dict:
    """The ``ip2p.json`` we write beside a pipeline folder's components ({} when absent)."""
    path = Path(folder) / IP2P_META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it or restore it from the checkpoint") from e
    if not isinstance(meta, dict):  # a damaged file, not a caller's wrong type: the CLI reports ValueErrors
        raise ValueError(f"{path} holds a JSON {type(meta).__name__}, expected an object; delete it "  # noqa: TRY004
                         "or restore it from the checkpoint")
    return meta


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (diffusers' and hub errors run over several), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_tokenizer(tokenizer, where: str) -> None:
    """Refuse a tokenizer without a vocabulary: transformers builds one, silently, from a folder whose vocabulary files
    are missing, and every instruction would then encode to the same unknown tokens."""
    if len(tokenizer.get_vocab()) <= len(set(tokenizer.all_special_tokens)):
        raise ValueError(f"{where} has a tokenizer without a vocabulary (tokenizer/ lacks tokenizer.json, or "
                         "vocab.json and merges.txt); re-export or re-download it")


def scheduler_from_config(config: dict):
    """The scheduler a checkpoint's scheduler config names; PNDM (SD's) where it names none or one this diffusers
    lacks, with a warning in the latter case."""
    import diffusers

    name = config.get("_class_name", "PNDMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        logger.warning("scheduler %r is not in this diffusers version; using PNDMScheduler with its config (pick a "
                       "sampler with --scheduler)", name)
        cls = diffusers.PNDMScheduler
    return cls.from_config(config)


def hub_host() -> str:
    """The host name of the Hugging Face hub endpoint in use (``HF_ENDPOINT``, default huggingface.co)."""
    from urllib.parse import urlparse

    import huggingface_hub.constants

    return urlparse(huggingface_hub.constants.ENDPOINT).hostname or "huggingface.co"


def hub_unreachable() -> bool:
    """True when the hub's host name does not resolve (no network, no DNS) and no proxy is set (behind a proxy the
    proxy resolves it): loading from the hub cannot work."""
    import socket

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    try:
        socket.getaddrinfo(hub_host(), 443)
    except OSError:  # socket.gaierror
        return True
    return False


def hub_offline() -> bool:
    """True when nothing can come from the hub: HF_HUB_OFFLINE is set, or its host cannot be reached."""
    import huggingface_hub.constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return flag or bool(huggingface_hub.constants.HF_HUB_OFFLINE) or hub_unreachable()


def check_unet_supported(config: dict, source: str) -> None:
    """Refuse UNets that need conditioning beyond the instruction's embeddings (SDXL's pooled text and size ids, class
    labels, image embeddings): they would fail deep inside the first forward pass."""
    extra = config.get("addition_embed_type")
    if extra == "text_time":
        raise ValueError(f"{source} is a Stable Diffusion XL model (two text encoders, size conditioning); ip2p "
                         "supports the SD 1.x/2.x architecture: pass an SD 1.x/2.x base or InstructPix2Pix model")
    if extra not in (None, "text"):
        raise ValueError(f"{source}: unet.addition_embed_type={extra!r} needs inputs ip2p does not give; ip2p "
                         "supports the SD 1.x/2.x architecture (cross-attention on the instruction)")
    if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
        raise ValueError(f"{source}: the unet is conditioned on class labels (class_embed_type="
                         f"{config.get('class_embed_type')!r}, num_class_embeds={config.get('num_class_embeds')!r}), "
                         "e.g. an upscaler's noise level; ip2p supports the SD 1.x/2.x text-to-image architecture")


def _load_folder(source: str, torch_dtype: torch.dtype | None) -> dict:
    """Components from a diffusers folder or hub id (one code path: diffusers resolves both)."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(source)
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"checkpoint {source!r} is a file but not one of {', '.join(SINGLE_FILE_SUFFIXES)}")
        missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (local / s).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"checkpoint folder {source!r} lacks {', '.join(missing)}: expected a diffusers pipeline folder "
                "(model_index.json with unet/ vae/ text_encoder/ tokenizer/ scheduler/)"
            )
    # A hub id on a machine that cannot reach the hub: read the local hub cache only, at once, instead of retrying
    # every file for half a minute and then naming a missing scheduler_config.json.
    unreachable = not local.exists() and hub_unreachable()
    only = {"local_files_only": True} if unreachable else {}
    try:
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", **only)
        sched_config = diffusers.DDPMScheduler.load_config(source, subfolder="scheduler", **only)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **only)
    except (OSError, ValueError, TypeError) as e:  # a damaged tokenizer.json or tokenizer_config.json: the latter two
        raise _load_error(source, unreachable, e) from e
    # Before any weights: an SDXL UNet alone is 10 GB to read only to be refused.
    check_unet_supported(unet_config, source)
    check_tokenizer(tokenizer, f"checkpoint {source!r}")
    try:
        return {
            "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch_dtype, **only),
            "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype, **only),
            "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch_dtype,
                                                          **only),
            "tokenizer": tokenizer,
            "scheduler": scheduler_from_config(sched_config),
        }
    except (OSError, RuntimeError, ValueError) as e:  # weights that do not fit their config: ValueError (diffusers),
        raise _load_error(source, unreachable, e) from e  # RuntimeError (transformers)


def _load_error(source: str, unreachable: bool, e: Exception) -> Exception:
    """The one-line error for a diffusers folder or hub id that failed to load with ``e``."""
    if Path(source).exists():
        return ValueError(f"checkpoint folder {source!r} is incomplete or damaged ({first_line(e)}); re-export or "
                          "re-download it")
    if unreachable:
        return FileNotFoundError(
            f"could not load {source!r}: it is not a local folder, the hub ({hub_host()}) cannot be reached from "
            "this machine, and the local hub cache has no complete copy of it; pass a local diffusers folder or "
            f"single file, or download it where there is network (`hf download {source}`) into this machine's "
            "hub cache")
    return FileNotFoundError(
        f"could not load {source!r}: it is not a local folder, and as a hub id it failed ({type(e).__name__}: "
        f"{first_line(e)}); check the path, or download it first when offline")


def _builtin(name: str) -> dict:
    from ip2p import tiny

    c = tiny.sd15_random_components() if name == "sd15-random" else tiny.tiny_components(name, in_channels=4)
    return {"unet": c.unet, "vae": c.vae, "text_encoder": c.text_encoder, "tokenizer": c.tokenizer,
            "scheduler": c.scheduler}


# Built-in base models, by name, with random weights and nothing downloaded: tiny ones for smoke runs and tests,
# and SD 1.5's architecture for benchmarks.
BUILTIN_MODELS = {"tiny": lambda: _builtin("small"), "tiny-sd": lambda: _builtin("sd"),
                  "sd15-random": lambda: _builtin("sd15-random")}


def load_components(source: str | os.PathLike, *, config_dir: str | None = None, allow_pickle: bool = False,
                    torch_dtype: torch.dtype | None = None) -> tuple[dict, dict]:
    """Load unet, vae, text_encoder, tokenizer, scheduler; returns (components, ip2p metadata).

    ``source``: a diffusers folder, a hub id, a single checkpoint file, or a built-in name (``tiny``, ``tiny-sd``).
    """
    source = os.path.expanduser(str(source))  # "~/..." from YAML or a quoted argument: no shell expanded it
    if source in BUILTIN_MODELS and not Path(source).exists():
        components = BUILTIN_MODELS[source]()
        if torch_dtype is not None:
            for key in ("unet", "vae", "text_encoder"):
                components[key].to(torch_dtype)
        return components, {}
    if is_single_file(source):
        from ip2p.export import load_single_file

        loaded = load_single_file(source, config_dir=config_dir, allow_pickle=allow_pickle, torch_dtype=torch_dtype)
        check_unet_supported(loaded["unet"].config, source)
        meta = loaded.pop("metadata", {}) or {}
        return loaded, meta
    if not Path(source).exists() and not looks_like_hub_id(source):
        raise FileNotFoundError(f"checkpoint {source!r} does not exist: no such folder or file here, and it is not a "
                                "hub id (owner/name); check the path")
    if config_dir is not None:
        logger.warning("config_dir=%s is not used: %s is a diffusers folder or hub id, which carries its own "
                       "configs (config_dir is for single-file checkpoints)", config_dir, source)
    components = _load_folder(source, torch_dtype)
    return components, read_ip2p_meta(source) if Path(source).is_dir() else {}


def load_editor(source: str | os.PathLike, *, config_dir: str | None = None, allow_pickle: bool = False,
                torch_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                scale_source_latent: bool | None = None, expand: bool = True,
                lora: str | os.PathLike | None = None) -> EditorModel:
    """Load an editor (or a base model, expanded to an editor when ``expand``) ready for sampling or training.

    ``scale_source_latent``: None takes the checkpoint's own setting (ip2p metadata), else False (the paper's
    convention); pass True for CosXL-style models that scale the source latent. ``lora``: an adapter file a LoRA run
    wrote (``final.lora.safetensors``), applied to ``source``, the base it was trained on, with the run's scheduler.
    """
    if lora is not None:
        run = Path(lora).expanduser().resolve().parent  # a run writes final/, final.safetensors and the adapter there
        if Path(str(source)).expanduser().resolve() in (run / "final", run / "final.safetensors"):
            raise ValueError(f"--checkpoint {str(source)!r} is the model the LoRA run exported with {str(lora)!r} "
                             "already merged in; use it alone, or pass the base the run started from with --lora")
    components, meta = load_components(source, config_dir=config_dir, allow_pickle=allow_pickle,
                                       torch_dtype=torch_dtype)
    unet = components["unet"]
    latent_channels = int(components["vae"].config.latent_channels)
    if lora is not None:
        from ip2p.lora import load_adapter

        expand_conv_in(unet, latent_channels)  # the base as training started from it
        trained = load_adapter(unet, lora)
        if trained["scheduler_config"]:
            components["scheduler"] = scheduler_from_config(trained["scheduler_config"])
        meta = {**meta, "scale_source_latent": trained["scale_source_latent"]}
        if trained["base"] and os.path.abspath(str(trained["base"])) != os.path.abspath(str(source)):
            logger.warning("the LoRA adapters of %s were trained on %s; applying them to %s (fine if it is the same "
                           "model in another place, else the edits will be off)", lora, trained["base"], source)
        else:
            logger.info("applied the LoRA adapters of %s to %s", lora, source)
    if expand:
        if expand_conv_in(unet, latent_channels):
            logger.info("expanded unet.conv_in from %d to %d input channels (new ones zero)",
                        latent_channels, 2 * latent_channels)
    elif unet.conv_in.in_channels != 2 * latent_channels:
        hint = ("this looks like a base text-to-image model: fine-tune it with train.py first"
                if unet.conv_in.in_channels == latent_channels else
                "inpainting-style or other UNets are not InstructPix2Pix editors")
        raise ValueError(f"{source}: unet has {unet.conv_in.in_channels} input channels, an editor needs "
                         f"{2 * latent_channels}; {hint}")
    if scale_source_latent is None:
        scale_source_latent = _as_bool(meta.get("scale_source_latent", False))
    # requires_grad stays as loaded, as in diffusers' pipeline: sampling runs under no_grad anyway, and PyTorch picks
    # another matmul kernel for frozen weights (e.g. linear attention projections of SD 2.x UNets over a few tokens),
    # which would make edits differ from diffusers' in the last bits.
    model = EditorModel(**components, scale_source_latent=scale_source_latent)
    if device is not None:
        model.to(device=device)
    return model.eval()


def _as_bool(value: object) -> bool:
    """The checkpoint's ``scale_source_latent`` (a JSON bool, or a string in a safetensors header)."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no", "none", ""):
        return False
    raise ValueError(f"the checkpoint's metadata says scale_source_latent={value!r}, which is neither true nor false; "
                     "fix it there, or pass --scale-source-latent yes or no")
