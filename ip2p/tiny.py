"""Tiny, seeded, offline Stable Diffusion components (for tests and smoke runs: no download).

Used by the tests and as a smoke test for users: ``python -m ip2p.tiny OUT_DIR`` writes a complete diffusers
pipeline folder (random weights) that ``infer.py`` and diffusers both load. Nothing is downloaded.

Two layouts:
- ``"small"``: a 2-level UNet/VAE, fastest; the VAE downsamples by 2.
- ``"sd"``: the Stable Diffusion block structure (4 levels, default block types, VAE x8), small widths. Needed for the
  original single-file key layout, which only maps faithfully from SD-shaped models.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)

LAYOUTS = ("small", "sd")

# Stable Diffusion v1's scheduler settings; what a diffusers SD folder ships.
SD_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    skip_prk_steps=True,
    steps_offset=1,
    set_alpha_to_one=False,
    prediction_type="epsilon",
)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE vocabulary is written in."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tokenizer_files(folder: str | os.PathLike, words: Sequence[str] = ()) -> Path:
    """Write a CLIP vocabulary that CLIPTokenizer accepts; returns the folder.

    Character-level by default. Each of ``words`` (lower-case letters) also gets BPE merges that build it, left to
    right, into one token (``word</w>``), as a BPE fitted on a corpus holding those words would; any other word
    still falls back to characters.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    for word in words:
        if not word.isalpha() or not word.islower() or not word.isascii():
            raise ValueError(f"words must be lower-case ASCII letters; got {word!r}")
    merges = _word_merges(sorted(set(words), key=lambda w: (-len(w), w)))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def _word_chain(word: str) -> list[tuple[str, str]]:
    """The merges that build ``word`` left to right into the single token ``word</w>``."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    return [("".join(pieces[:i]), pieces[i]) for i in range(1, len(pieces))]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one lower-case word: merge the lowest-ranked adjacent pair until none is ranked."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _word_merges(words: Sequence[str], rounds: int = 20) -> list[tuple[str, str]]:
    """Ranked merges under which every one of ``words`` is one token: a word that another word's merges split
    differently has its chain moved ahead, until none does."""
    order = list(words)
    for _ in range(rounds):
        merges = list(dict.fromkeys(m for w in order for m in _word_chain(w)))
        ranks = {m: r for r, m in enumerate(merges)}
        broken = [w for w in order if len(_bpe(w, ranks)) > 1]
        if not broken:
            return merges
        order = broken + [w for w in order if w not in broken]
    raise ValueError(f"could not make {broken} single tokens; pass fewer or other words")


def tiny_tokenizer(words: Sequence[str] = (), max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer of ``max_length`` positions, character-level except for ``words`` (see
    ``write_tokenizer_files``), built from files written to a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(tmp, words)
        return CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", model_max_length=max_length)


TEXT_ATTENTION_HEADS = 4
"""Attention heads of :func:`tiny_text_encoder`; its ``hidden_size`` must be a multiple of it."""


def tiny_text_encoder(vocab_size: int, seed: int = 0, hidden_size: int = 32, max_length: int = 77,
                      num_layers: int = 3) -> CLIPTextModel:
    """A randomly initialised CLIP text model. ``num_layers=0`` leaves only the embeddings and the final layer norm:
    each position's output is its own token's (and position's) embedding, with nothing mixed in from other tokens."""
    if num_layers < 0:
        raise ValueError(f"num_layers={num_layers} must be >= 0")
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=TEXT_ATTENTION_HEADS,
        num_hidden_layers=num_layers,
        max_position_embeddings=max_length,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=hidden_size,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def tiny_unet(layout: str = "small", in_channels: int = 4, seed: int = 0, cross_attention_dim: int = 32,
              sample_size: int = 32, prediction_type_hint: str | None = None) -> UNet2DConditionModel:
    """A randomly initialised UNet; ``in_channels=4`` is a text-to-image base, 8 an editor."""
    _check_layout(layout)
    torch.manual_seed(seed)
    if layout == "small":
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=16,
        )
    else:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=4,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=16,
        )
    # Random init leaves conv_in's bias tiny; make it visible so tests notice if surgery drops it.
    with torch.no_grad():
        unet.conv_in.bias.normal_(0.0, 0.1)
    return unet.eval()


def tiny_vae(layout: str = "small", seed: int = 0, sample_size: int = 64) -> AutoencoderKL:
    _check_layout(layout)
    torch.manual_seed(seed)
    channels = [32, 64] if layout == "small" else [32, 32, 64, 64]
    vae = AutoencoderKL(
        block_out_channels=channels,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        latent_channels=4,
        layers_per_block=1 if layout == "small" else 2,
        norm_num_groups=16,
        sample_size=sample_size,
    )
    return vae.eval()


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a tiny layout; expected one of {', '.join(LAYOUTS)}")


@dataclass
class TinyComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: PNDMScheduler


def tiny_components(layout: str = "small", in_channels: int = 8, seed: int = 0) -> TinyComponents:
    """All five components of an SD pipeline, seeded; ``in_channels=4`` gives a base model to run surgery on."""
    tokenizer = tiny_tokenizer()
    return TinyComponents(
        unet=tiny_unet(layout, in_channels=in_channels, seed=seed),
        vae=tiny_vae(layout, seed=seed + 1),
        text_encoder=tiny_text_encoder(len(tokenizer), seed=seed + 2),
        tokenizer=tokenizer,
        scheduler=PNDMScheduler(**SD_SCHEDULER_CONFIG),
    )


def save_tiny_pipeline(out_dir: str | os.PathLike, layout: str = "small", in_channels: int = 8, seed: int = 0) -> Path:
    """Write a diffusers pipeline folder (safetensors) holding tiny random components; returns its path.

    ``in_channels=8`` writes an InstructPix2Pix pipeline, 4 a plain Stable Diffusion one (a base to fine-tune).
    ``layout="sd15"`` writes Stable Diffusion 1.5's architecture instead (``sd15_random_components``, for benchmarks).
    """
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline

    c = (sd15_random_components(in_channels, seed) if layout == "sd15"
         else tiny_components(layout, in_channels=in_channels, seed=seed))
    cls = StableDiffusionInstructPix2PixPipeline if in_channels == 8 else StableDiffusionPipeline
    pipe = cls(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=c.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ip2p.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the diffusers pipeline to")
    parser.add_argument("--layout", choices=LAYOUTS, default="small")
    parser.add_argument("--in-channels", type=int, choices=(4, 8), default=8,
                        help="8: an InstructPix2Pix editor; 4: a text-to-image base to fine-tune")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = save_tiny_pipeline(args.out_dir, args.layout, args.in_channels, args.seed)
    logger.info("wrote a tiny %s pipeline (%d input channels) to %s", args.layout, args.in_channels, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --- Tiny CLIP and causal language models for the data-generation stages (ip2p.datagen, ip2p.eval.clip) ---
# Defined after the entry point only because this file grows by appending; importing the module defines them all.

# OpenAI CLIP's normalisation, what every CLIP ViT preprocessor config ships (transformers' OPENAI_CLIP_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_clip(seed: int = 0, image_size: int = 32, hidden_size: int = 32):
    """A random CLIPModel (ViT with 8-pixel patches, 2 layers) and its character-level CLIPTokenizer.

    Returns ``(model, tokenizer)``; the text tower uses the same vocabulary as ``tiny_tokenizer()``.
    """
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_tokenizer()
    vocab_size = len(tokenizer)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=hidden_size, intermediate_size=37,
                           num_attention_heads=4, num_hidden_layers=2),
        projection_dim=hidden_size,
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval(), tokenizer


def save_tiny_clip(out_dir: str | os.PathLike, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny CLIP folder (model, tokenizer, preprocessor_config.json) that ``ClipScorer`` loads; returns it."""
    out = Path(out_dir)
    model, tokenizer = tiny_clip(seed=seed, image_size=image_size)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Written by hand: transformers 5's CLIPImageProcessor wants torchvision, which ip2p does not need.
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size}, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3,
    }, indent=2))
    return out


def tiny_lm_tokenizer():
    """A byte-level tokenizer with no merges (one token per byte) plus ``<|endoftext|>``, built offline.

    Any text round-trips, including the newlines and ``##``/``%%`` markers of the data-generation prompt format.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(_bytes_to_unicode())}
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=512)


def tiny_causal_lm(seed: int = 0, hidden_size: int = 64, layers: int = 2):
    """A random GPT-2-style causal LM over ``tiny_lm_tokenizer()``'s 257 tokens; returns ``(model, tokenizer)``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_lm_tokenizer()
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=hidden_size, n_layer=layers, n_head=2,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval(), tokenizer


def save_tiny_causal_lm(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny causal LM folder that ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` load."""
    out = Path(out_dir)
    model, tokenizer = tiny_causal_lm(seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def sd15_random_components(in_channels: int = 4, seed: int = 0) -> TinyComponents:
    """Stable Diffusion 1.5's architecture (UNet 860M, VAE 84M, CLIP-L text 123M) with random weights.

    For benchmarks of real-sized compute with nothing downloaded; the character-level tokenizer stands in for CLIP's.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=in_channels, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
    )
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1,
    ))
    return TinyComponents(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer, PNDMScheduler(**SD_SCHEDULER_CONFIG))
