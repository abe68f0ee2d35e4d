"""Command-line editing: ``python infer.py --image in.png --instruction "make it winter"``.

Every output image gets a JSON sidecar with all parameters and the seed, so it can be reproduced exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

import ip2p
from ip2p import atomic
from ip2p import images as img
from ip2p.devices import resolve_device
from ip2p.models import load_editor
from ip2p.sampling import (
    DEFAULT_IMAGE_GUIDANCE,
    DEFAULT_SAMPLE_SCHEDULER,
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    DEFAULT_TEXT_GUIDANCE,
    SCHEDULERS,
    check_steps,
    default_scheduler,
    edit,
    make_scheduler,
)

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "timbrooks/instruct-pix2pix"
RANDOM_TEXT_GUIDANCE = (6.0, 9.0)
RANDOM_IMAGE_GUIDANCE = (1.2, 1.8)
"""The ranges ``--randomize-cfg`` draws s_T and s_I from (uniformly, to two decimals), as the paper's web app does."""
SWEEP_TEXT = "3,5,7.5,10"  # the --sweep grid's s_T and s_I values (the paper's Fig. 4)
SWEEP_IMAGE = "1.0,1.2,1.5,1.8,2.2"


def draw_cfg(draws: random.Random) -> tuple[float, float]:
    """(s_T, s_I) drawn as ``--randomize-cfg`` and the web UI's "random CFG" do: uniformly in their ranges, to two
    decimals, so that the numbers shown reproduce the edit."""
    return round(draws.uniform(*RANDOM_TEXT_GUIDANCE), 2), round(draws.uniform(*RANDOM_IMAGE_GUIDANCE), 2)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infer.py", description="Edit images by following written instructions.")
    add_model_arguments(p)
    p.add_argument("--image", required=True, help="an image file, a folder of images, or a glob pattern")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--instruction", help="the edit instruction")
    group.add_argument("--instructions-file", help="a text file with one instruction per line (applied to every image)")
    p.add_argument("--output", help="output file (one edit) or folder (several); default edited.png / edits/")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps (default: %(default)s)")
    p.add_argument("--text-guidance", type=float, default=DEFAULT_TEXT_GUIDANCE, help="s_T (default: %(default)s)")
    p.add_argument("--image-guidance", type=float, default=DEFAULT_IMAGE_GUIDANCE, help="s_I (default: %(default)s)")
    p.add_argument("--seed", type=int, help="random seed (a CPU generator; random and reported when absent)")
    p.add_argument("--resolution", type=int, default=512,
                   help="long side of the edited image; 0 keeps the input size (floored to --multiple, as diffusers' "
                        "pipeline does) (default: %(default)s)")
    p.add_argument("--multiple", type=int, default=None,
                   help="round both sides to a multiple of this (64 as in the paper's app; default: the VAE's "
                        "downsampling factor, 8 for Stable Diffusion)")
    p.add_argument("--keep-size", action="store_true", help="resize the result back to the input's original size")
    p.add_argument("--max-pixels", type=int, default=img.DEFAULT_MAX_PIXELS,
                   help="refuse larger input images, and a --resolution that would make larger ones")
    p.add_argument("--num-images", type=int, default=1, help="outputs per input and instruction (default: 1)")
    p.add_argument("--randomize-cfg", action="store_true",
                   help="give each output its own s_T in %g..%g and s_I in %g..%g (drawn from --seed, as the paper's "
                        "app does; each output is then seed, seed+1, ...), instead of --text-guidance and "
                        "--image-guidance; its sidecar records them" % (*RANDOM_TEXT_GUIDANCE, *RANDOM_IMAGE_GUIDANCE))
    p.add_argument("--sweep", action="store_true",
                   help="render a labelled grid over --sweep-text x --sweep-image (the paper's Fig. 4) instead")
    p.add_argument("--sweep-text", default=None, help=f"comma-separated s_T values for --sweep (default {SWEEP_TEXT})")
    p.add_argument("--sweep-image", default=None,
                   help=f"comma-separated s_I values for --sweep (default {SWEEP_IMAGE})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that choose, load and sample the model (infer.py and the web UI); see ``load_model``."""
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="diffusers folder, single .safetensors file, or hub id (default: %(default)s)")
    p.add_argument("--config-dir", help="local diffusers folder giving the architecture of a single-file checkpoint")
    p.add_argument("--lora", help="adapter file of a LoRA run (its final.lora.safetensors), applied to --checkpoint, "
                                  "the base model that run started from")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading a pickled .ckpt (with torch.load(weights_only=True)); off by default")
    p.add_argument("--scale-source-latent", choices=("auto", "yes", "no"), default="auto",
                   help="scale the source latent by the VAE factor (CosXL-style); auto: as the checkpoint says")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                   help=f"sampler (default: {DEFAULT_SCHEDULER}, or {DEFAULT_SAMPLE_SCHEDULER} for a model trained "
                        "with prediction_type=sample)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: %(default)s)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="weights' precision; auto: fp16 on GPUs, fp32 on the CPU")
    p.add_argument("--low-memory", action="store_true",
                   help="less peak memory, more time: the guidance branches through the UNet one at a time, the VAE "
                        "one image at a time and in tiles above its native size (docs: README)")


def load_model(args: argparse.Namespace):
    """The editor the flags of ``add_model_arguments`` name, on its device and in its precision."""
    device = resolve_device(args.device)
    dtype = DTYPES["fp16" if device.type != "cpu" else "fp32"] if args.dtype == "auto" else DTYPES[args.dtype]
    if device.type == "cpu" and dtype == torch.float16:
        logger.warning("--dtype fp16 on the CPU is many times slower than fp32 (CPUs lack half-precision kernels "
                       "for most of the UNet); leave --dtype auto for fp32")
    scale = {"auto": None, "yes": True, "no": False}[args.scale_source_latent]
    model = load_editor(args.checkpoint, config_dir=args.config_dir, allow_pickle=args.allow_pickle,
                        scale_source_latent=scale, expand=False, torch_dtype=dtype, device=device, lora=args.lora)
    return model.low_memory() if args.low_memory else model


@dataclass
class EditJob:
    """One (image, instruction) pair and where its outputs go."""

    image_path: Path
    instruction: str
    outputs: list[Path] = field(default_factory=list)


def parse_scales(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}={text!r} must be comma-separated numbers, e.g. 1.0,1.5,2.0") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{flag}={text!r} must hold finite numbers, e.g. 1.0,1.5,2.0")
    if not values:
        raise ValueError(f"{flag} is empty; give comma-separated numbers")
    return values


def check_text(text: str, name: str) -> None:
    """Refuse an instruction with lone surrogates (how Python reads command-line bytes that are not UTF-8, and what
    JSON's "\\ud800" decodes to): the tokenizer fails on them with a TypeError that names nothing."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} {text!r} is not valid UTF-8 text; pass it in UTF-8") from None


def check_finite(out: torch.Tensor, text_guidance: float, image_guidance: float, dtype: torch.dtype, *,
                 scales: str = "--text-guidance/--image-guidance") -> None:
    """Refuse an edit whose pixels came out NaN (which would be saved as a black image without a word): guidance
    scales so large that the guided prediction overflows, or a model that overflows in half precision. ``scales``
    names the settings to lower, as the caller's user sets them."""
    if not torch.isfinite(out).all():
        half = dtype in (torch.float16, torch.bfloat16)
        raise ValueError(f"the edit came out as NaN (s_T={text_guidance:g}, s_I={image_guidance:g}, "
                         f"{str(dtype).removeprefix('torch.')}): the guidance scales are too large for this model"
                         f"{', or it overflows in half precision' if half else ''}; lower {scales}"
                         f"{', or use --dtype fp32' if half else ''}")


def warn_if_truncated(tokenizer, instruction: str) -> str | None:
    """Warn (and return the warning) when the text encoder will not read all of ``instruction``: CLIP reads 77
    tokens and the rest is cut, as in diffusers' pipeline."""
    limit = tokenizer.model_max_length
    # With the start and end tokens, as the limit counts them; verbose=False: transformers would warn that so long a
    # sequence "will result in indexing errors", which the cut at the limit (said below) prevents.
    count = len(tokenizer(instruction, verbose=False).input_ids)
    if count <= limit:
        return None
    shown = instruction if len(instruction) <= 80 else instruction[:77] + "..."
    message = f"the instruction {shown!r} is {count} tokens; the text encoder reads only the first {limit}"
    logger.warning("%s", message)
    return message


def read_instructions(args: argparse.Namespace) -> list[str]:
    if args.instruction is not None:
        if not args.instruction.strip():
            raise ValueError("--instruction is empty; say what to change, e.g. --instruction 'make it winter'")
        check_text(args.instruction, "--instruction")
        return [args.instruction]
    path = Path(args.instructions_file)
    if path.is_dir():
        raise ValueError(f"--instructions-file {path} is a folder; give a text file with one instruction per line")
    if not path.exists():  # other than a regular file (a pipe, /dev/stdin) is read as it is
        raise FileNotFoundError(f"--instructions-file {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--instructions-file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as "
                         "UTF-8 with one instruction per line") from None
    except OSError as e:
        raise ValueError(f"--instructions-file {path} cannot be read ({e.strerror or e}); check its "
                         "permissions") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--instructions-file {path} has no non-empty line")
    return lines


def plan_jobs(paths: list[Path], instructions: list[str], output: str | None, num_images: int, sweep: bool
              ) -> list[EditJob]:
    """Every image with every instruction; one output file, or a folder when there are several outputs."""
    jobs = [EditJob(p, ins) for p in paths for ins in instructions]
    names = _output_names(paths)
    single = len(jobs) == 1 and (num_images == 1 or sweep)
    if single:
        out = Path(output or ("sweep.png" if sweep else "edited.png"))
        if not _is_image_name(out):
            out = out / ("sweep.png" if sweep else f"{paths[0].stem}_edited.png")
        jobs[0].outputs = [out]
        return jobs
    folder = Path(output or "edits")
    if _is_image_name(folder):
        raise ValueError(f"--output {folder} is a file name, but this run writes {len(jobs) * num_images} images; "
                         "give a folder")
    for j, job in enumerate(jobs):
        tag = f"{names[j // len(instructions)]}_{j % len(instructions):03d}"
        job.outputs = ([folder / f"{tag}_sweep.png"] if sweep
                       else [folder / f"{tag}_{k}.png" for k in range(num_images)])
    return jobs


def _is_image_name(path: Path) -> bool:
    """Whether ``path`` names an image file (a suffix ``images.save_image`` can write: .png, .bmp, .tif, ...)."""
    return path.suffix.lower() in Image.registered_extensions()


def _output_names(paths: list[Path]) -> list[str]:
    """One output name per input: its stem, numbered where stems repeat (a.png and a.jpg, or x/1.png and y/1.png),
    so no output overwrites another."""
    counts = Counter(p.stem for p in paths)
    taken = set(counts)
    names = []
    for p in paths:
        name, k = p.stem, 1
        if counts[p.stem] > 1:
            while f"{p.stem}-{k}" in taken:
                k += 1
            name = f"{p.stem}-{k}"
            taken.add(name)
        names.append(name)
    return names


def _make_output_folders(jobs: list[EditJob]) -> None:
    """Create the output folders now, so an --output that cannot be written fails before the model loads."""
    for folder in sorted({out.parent for job in jobs for out in job.outputs}):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--output: cannot create the folder {str(folder)!r} ({e.strerror or e}); "
                             "choose another --output") from None
    for out in (out for job in jobs for out in job.outputs):
        if out.is_dir():
            raise ValueError(f"--output: {str(out)!r} is an existing folder, not an image file; choose another "
                             "--output")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        logger.error("error: %s", e)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be at least 1")
    if args.resolution < 0:
        raise ValueError(f"--resolution {args.resolution} must be positive, or 0 to keep the input size")
    if args.num_images < 1:
        raise ValueError(f"--num-images {args.num_images} must be at least 1")
    if args.max_pixels < 1:
        raise ValueError(f"--max-pixels {args.max_pixels} must be at least 1")
    if args.multiple is not None and args.multiple < 1:
        raise ValueError(f"--multiple {args.multiple} must be a positive multiple of the VAE's downsampling factor "
                         "(8 for Stable Diffusion)")
    for flag, value in (("--text-guidance", args.text_guidance), ("--image-guidance", args.image_guidance)):
        if not math.isfinite(value):
            raise ValueError(f"{flag} {value} must be a finite number, e.g. {flag} 1.5")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise ValueError(f"--seed {args.seed} must be between 0 and 2**64 - 1")
    if args.randomize_cfg and args.sweep:
        raise ValueError("--randomize-cfg and --sweep both choose the guidance scales; pass one of them")
    paths = img.expand_image_paths(args.image)
    instructions = read_instructions(args)
    if not args.sweep and (args.sweep_text is not None or args.sweep_image is not None):
        raise ValueError("--sweep-text and --sweep-image set the values of a --sweep grid; add --sweep")
    # `is None`, not `or`: an empty --sweep-text "" (an unset shell variable) is an error, not the default grid.
    sweep_text, sweep_image = ([] if not args.sweep else parse_scales(default if text is None else text, flag)
                               for text, flag, default in ((args.sweep_text, "--sweep-text", SWEEP_TEXT),
                                                           (args.sweep_image, "--sweep-image", SWEEP_IMAGE)))
    jobs = plan_jobs(paths, instructions, args.output, args.num_images, args.sweep)
    _make_output_folders(jobs)
    if len(paths) == 1:  # a broken lone input fails now, not after minutes of loading a model
        img.load_image(paths[0], max_pixels=args.max_pixels)
    resolve_device(args.device)  # a bad --device fails before the seed is drawn and reported
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    if args.seed is None:
        logger.info("seed: %d (pass --seed %d to reproduce)", seed, seed)

    model = load_model(args)
    scheduler = make_scheduler(args.scheduler, model.scheduler.config)
    args.scheduler = args.scheduler or default_scheduler(model.scheduler.config.get("prediction_type"))
    check_steps(scheduler, args.steps)
    for instruction in dict.fromkeys(instructions):
        warn_if_truncated(model.tokenizer, instruction)
    multiple = model.vae_scale_factor if args.multiple is None else args.multiple
    if multiple < 1 or multiple % model.vae_scale_factor:
        raise ValueError(f"--multiple {multiple} must be a positive multiple of the VAE's downsampling factor "
                         f"({model.vae_scale_factor})")
    if 0 < args.resolution < multiple:
        raise ValueError(f"--resolution {args.resolution} is below --multiple {multiple}; give at least {multiple}, "
                         "or 0 to keep the input size")

    settings = dict(checkpoint=str(args.checkpoint), steps=args.steps, scheduler=args.scheduler, seed=seed,
                    resolution=args.resolution, multiple=multiple, keep_size=args.keep_size,
                    dtype=str(model.dtype).removeprefix("torch."), scale_source_latent=model.scale_source_latent,
                    low_memory=args.low_memory, **({"lora": str(args.lora)} if args.lora else {}),
                    ip2p_version=ip2p.__version__)
    draws = random.Random(seed)  # --randomize-cfg's scales: the same command draws the same ones
    progress = tqdm(jobs, desc="images", disable=args.quiet or len(jobs) == 1)
    unreadable: dict[Path, str] = {}  # a bad input among several is skipped, so the others' edits are still made
    for job in progress:
        if job.image_path in unreadable:
            continue
        try:
            source = img.load_image(job.image_path, max_pixels=args.max_pixels)
            resized = img.resize_for_model(source, args.resolution, multiple, max_pixels=args.max_pixels)
        except (ValueError, FileNotFoundError) as e:  # ImageError, a file gone since listed, too large a --resolution
            if len(paths) == 1:
                raise
            unreadable[job.image_path] = str(e)
            logger.error("skipped %s: %s", job.image_path, e)
            continue
        batch = img.images_to_batch([resized])

        def run_edit(s_t: float, s_i: float, n: int, seed: int = seed) -> list:
            started = time.perf_counter()
            out = edit(model, batch, [job.instruction], steps=args.steps, text_guidance=s_t, image_guidance=s_i,
                       generator=torch.Generator().manual_seed(seed), num_images_per_input=n, scheduler=scheduler,
                       progress=not args.quiet)
            logger.debug("edit took %.2fs", time.perf_counter() - started)
            check_finite(out, s_t, s_i, model.dtype)
            results = img.tensor_to_images(out)
            if args.keep_size:
                results = [r.resize(source.size, resample=Image.Resampling.LANCZOS) for r in results]
            return results

        record = dict(settings, image=str(job.image_path), instruction=job.instruction,
                      input_size=list(source.size), model_size=list(resized.size))
        if args.sweep:
            rows = [[run_edit(s_t, s_i, 1)[0] for s_i in sweep_image] for s_t in sweep_text]
            grid = img.make_grid(rows, row_labels=[f"s_T={v:g}" for v in sweep_text],
                                 col_labels=[f"s_I={v:g}" for v in sweep_image], title=job.instruction)
            _write(grid, job.outputs[0], dict(record, sweep_text=sweep_text, sweep_image=sweep_image))
            continue
        if args.randomize_cfg:
            # One edit per output, each with its own scales and seed, so that each sidecar reproduces its image with
            # a plain run (--seed, --text-guidance, --image-guidance as recorded).
            for k, out_path in enumerate(job.outputs):
                s_t, s_i = draw_cfg(draws)
                output_seed = (seed + k) % 2**64
                logger.info("%s: s_T=%g, s_I=%g, seed %d", out_path, s_t, s_i, output_seed)
                _write(run_edit(s_t, s_i, 1, output_seed)[0], out_path,
                       dict(record, seed=output_seed, text_guidance=s_t, image_guidance=s_i, randomize_cfg=True,
                            num_images=1, index=0))
            continue
        for k, (result, out_path) in enumerate(zip(run_edit(args.text_guidance, args.image_guidance,
                                                            args.num_images), job.outputs)):
            _write(result, out_path, dict(record, text_guidance=args.text_guidance,
                                          image_guidance=args.image_guidance, num_images=args.num_images, index=k))
    written = sum(len(j.outputs) for j in jobs if j.image_path not in unreadable)
    logger.info("wrote %d file(s): %s", written,
                jobs[0].outputs[0] if len(jobs) == 1 == len(jobs[0].outputs) else jobs[0].outputs[0].parent)
    if unreadable:
        logger.error("error: skipped %d of %d input images that could not be used: %s", len(unreadable), len(paths),
                     ", ".join(str(p) for p in unreadable))
        return 2
    return 0


def _write(image, path: Path, record: dict) -> None:
    try:
        img.save_image(image, path)
        # Atomic like the image, so a kill or a full disk never leaves a previous run's sidecar cut short; no clean-up
        # pass over the folder (see save_image).
        with atomic.writing_file(path.with_suffix(".json"), clean=False) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as e:
        raise ValueError(f"cannot write {str(path)!r} ({e.strerror or e}); choose another --output") from None

