"""``python -m ip2p.datagen {finetune-lm,text,images,filter,run}``: the data-generation command line.

Each process of ``accelerate launch -m ip2p.datagen ...`` / ``torchrun -m ip2p.datagen ...`` picks its shard from
``RANK``/``WORLD_SIZE`` and its device from ``LOCAL_RANK``; ``--num-shards/--shard-index`` do the same by hand (e.g.
one job per machine of a cluster). Every stage resumes when run again with the same arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from ip2p.atomic import output_folder, writing_folder

logger = logging.getLogger("ip2p.datagen")

DTYPES = ("auto", "float32", "float16", "bfloat16")


def _device(name: str | None):
    """``--device`` (checked by ``ip2p.devices.resolve_device``), else (or ``auto``) this process's accelerator
    (``LOCAL_RANK`` picks among several), else the CPU."""
    import torch

    from ip2p.devices import resolve_device

    if name and name != "auto":
        return resolve_device(name)
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, int(os.environ.get("LOCAL_RANK", 0)))


def _dtype(name: str, device, *, training: bool = False):
    import torch

    if name == "auto":
        # Half precision for inference on accelerators (as the orig's autocast); training keeps float32 master weights.
        return torch.float32 if device.type == "cpu" or training else torch.float16
    return getattr(torch, name)


def _shard(args):
    from ip2p.datagen.shards import shard_from_env

    return shard_from_env(args.num_shards, args.shard_index)


# -- argument groups -------------------------------------------------------------------------------------------------
def _add_common(parser: argparse.ArgumentParser, *, shards: bool = True) -> None:
    group = parser.add_argument_group("execution")
    group.add_argument("--device", default=None,
                       help="torch device (default: this process's accelerator, LOCAL_RANK picking among several, "
                            "else cpu)")
    group.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="model precision (auto: float16 on an accelerator for inference, float32 on cpu and for "
                            "training)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    if shards:
        group.add_argument("--num-shards", type=int, default=None,
                           help="split the work over this many processes (default: WORLD_SIZE, else 1); item i goes "
                                "to shard i %% num_shards")
        group.add_argument("--shard-index", type=int, default=None,
                           help="this process's shard in [0, num_shards) (default: RANK, else 0)")


def _add_text_sampling(parser: argparse.ArgumentParser, batch_flag: str) -> None:
    from ip2p.datagen.config import TextConfig

    d = TextConfig()
    group = parser.add_argument_group("language-model sampling (orig defaults)")
    group.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature (0: greedy)")
    group.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass")
    group.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty,
                       help="OpenAI-style additive penalty per earlier occurrence of a token in the completion")
    group.add_argument("--presence-penalty", type=float, default=d.presence_penalty,
                       help="OpenAI-style additive penalty for any token already in the completion")
    group.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                       help="transformers' multiplicative repetition penalty (1.0: off)")
    group.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="completion length limit")
    group.add_argument("--num-retries", type=int, default=d.num_retries,
                       help="extra attempts for a caption whose completion is malformed, unchanged or unsafe")
    group.add_argument(batch_flag, dest="lm_batch_size", type=int, default=d.batch_size,
                       help="captions per generate() call")
    group.add_argument("--safety-words", default=None,
                       help="text file of words/phrases (one a line); captions and outputs containing one are dropped")
    group.add_argument("--caption-key", default=None,
                       help="JSON-lines caption files: the caption's key (default: caption, input, text, TEXT, prompt)")


def _add_image_sampling(parser: argparse.ArgumentParser) -> None:
    from ip2p.datagen.config import ImageConfig

    d = ImageConfig()
    group = parser.add_argument_group("image sampling (orig defaults)")
    group.add_argument("--steps", type=int, default=d.steps, help="denoising steps")
    group.add_argument("--height", type=int, default=d.height, help="image height in pixels")
    group.add_argument("--width", type=int, default=d.width, help="image width in pixels")
    group.add_argument("--scheduler", default=d.scheduler,
                       help="sampler, a short name of ip2p.sampling.SCHEDULERS (euler_a, euler, ddim, dpm++, unipc, "
                            "pndm, lms, heun, ddpm); both branches get the same noise from schedulers that draw it "
                            "from the step generator (euler_a, ddpm) or use none")
    group.add_argument("--samples-per-pair", type=int, default=d.samples_per_pair,
                       help="samples generated per caption pair before filtering (paper: 100)")
    group.add_argument("--batch-size", type=int, default=d.batch_size,
                       help="samples per UNet forward (4 rows each: 2 branches x CFG)")
    group.add_argument("--p-range", type=float, nargs=2, default=[d.p_min, d.p_max], metavar=("MIN", "MAX"),
                       help="fraction of steps with shared self-attention, uniform in [MIN, MAX]")
    group.add_argument("--cfg-range", type=float, nargs=2, default=[d.cfg_min, d.cfg_max], metavar=("MIN", "MAX"),
                       help="classifier-free guidance scale, uniform in [MIN, MAX]")


def _add_filter(parser: argparse.ArgumentParser, *, can_skip: bool) -> None:
    from ip2p.datagen.config import FilterConfig

    d = FilterConfig()
    group = parser.add_argument_group("CLIP filter (orig defaults)")
    group.add_argument("--clip", default=None,
                       help="CLIP model folder or hub id (paper: openai/clip-vit-large-patch14)"
                            + ("" if can_skip else "; only needed for rows without scores"))
    if can_skip:
        group.add_argument("--no-filter", action="store_true",
                           help="keep every sample (scored if --clip is given) for a later `filter` run")
    group.add_argument("--min-image-sim", type=float, default=d.min_image_sim, help="CLIP image-image threshold")
    group.add_argument("--min-dir-sim", type=float, default=d.min_dir_sim, help="CLIP directional threshold")
    group.add_argument("--min-caption-sim", type=float, default=d.min_caption_sim,
                       help="CLIP caption-image threshold, for each image")
    group.add_argument("--keep-top", type=int, default=d.keep_top,
                       help="samples kept per caption pair, best directional similarity first")


def _add_writer(parser: argparse.ArgumentParser) -> None:
    from ip2p.datagen.writer import FORMATS

    group = parser.add_argument_group("output")
    group.add_argument("--format", choices=FORMATS, default="parquet",
                       help="parquet: <out>/data/*.parquet (train.py reads <out>); seeds: the original release's "
                            "seeds.json layout; both")
    group.add_argument("--rows-per-file", type=int, default=1000, help="parquet rows per file")
    group.add_argument("--commit-every", type=float, default=600.0,
                       help="seconds between commits at most (bounds the work an interruption loses)")
    group.add_argument("--image-format", choices=("png", "jpg"), default="png", help="parquet image encoding")


# -- commands ---------------------------------------------------------------------------------------------------------
def _cmd_finetune(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ip2p.datagen.config import FinetuneConfig
    from ip2p.datagen.finetune import EXAMPLE_TRIPLES, finetune_lm, read_triples
    from ip2p.datagen.shards import output_errors

    triples = read_triples(args.triples or EXAMPLE_TRIPLES)
    config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            gradient_accumulation=args.gradient_accumulation, weight_decay=args.weight_decay,
                            max_length=args.max_length, seed=args.seed)
    device = _device(args.device)
    # save_pretrained only warns about a file there, and the fine-tune would be lost
    out = output_folder(args.out, "--out")
    # The new model replaces the folder whole (below): never one that holds something other than a model.
    if any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(f"--out {str(out)!r} is a folder with other files and no config.json; pass a new or empty "
                         "folder, or a fine-tuned model folder to replace")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=_dtype(args.dtype, device, training=True))
    except (OSError, ValueError) as e:  # ValueError: a folder of another kind of model (multi-line messages)
        raise FileNotFoundError(f"--model {args.model!r} could not be loaded ({type(e).__name__}); pass a causal LM "
                                "folder or a hub id available offline") from e
    torch.manual_seed(args.seed)
    losses = finetune_lm(model.to(device), tokenizer, triples, config, progress=not args.quiet)
    # Built beside --out and swapped in whole: a kill mid-save leaves the previous model (or none), never half of one.
    with output_errors(out, "rerun it (a model already there is kept as it was)"), writing_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    logger.info("fine-tuned on %d triples for %d steps (loss %.4f -> %.4f); saved to %s", len(triples), len(losses),
                losses[0], losses[-1], out)
    return 0


def _text_config(args):
    from ip2p.datagen.text import TextConfig

    return TextConfig(temperature=args.temperature, top_p=args.top_p, frequency_penalty=args.frequency_penalty,
                      presence_penalty=args.presence_penalty, repetition_penalty=args.repetition_penalty,
                      max_new_tokens=args.max_new_tokens, num_retries=args.num_retries,
                      batch_size=args.lm_batch_size, seed=args.seed)


def _run_text(args, lm: str, out: Path):
    from ip2p.datagen.shards import sharded_path
    from ip2p.datagen.text import HFGenerator, WordList, open_progress, read_captions, run_text_stage

    shard = _shard(args)
    captions = read_captions(args.captions, args.caption_key)
    safety = WordList.from_file(args.safety_words) if args.safety_words else None
    config = _text_config(args)
    path = sharded_path(out, shard)
    recorded = {"config": config, "shard": shard, "safety": safety, "model": lm, "caption_file": args.captions}
    state = open_progress(captions, path, **recorded)  # a resume with other settings fails before the LM loads
    device = _device(args.device)
    generator = HFGenerator.from_pretrained(lm, config, device=device, dtype=_dtype(args.dtype, device))
    stats = run_text_stage(captions, path, generator, **recorded, progress=not args.quiet, state=state)
    logger.info("wrote %d triples to %s", stats.kept, path)
    return path, stats


def _cmd_text(args) -> int:
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out!r} is a folder; pass the JSON-lines file to write, e.g. "
                         f"{str(Path(args.out) / 'prompts.jsonl')!r}")
    output_folder(Path(args.out).parent, "the folder of --out")
    _run_text(args, args.model, Path(args.out))
    return 0


def _filter_config(args):
    from ip2p.datagen.config import FilterConfig

    values = {k: getattr(args, k) for k in ("min_image_sim", "min_dir_sim", "min_caption_sim", "keep_top")}
    if getattr(args, "no_filter", False):
        d = FilterConfig()
        changed = [f"--{k.replace('_', '-')}" for k, v in values.items() if v != getattr(d, k)]
        if changed:
            logger.warning("--no-filter keeps every sample: %s not applied now (pass them to a later `filter` run)",
                           ", ".join(changed))
        return None
    return FilterConfig(**values)


def _writer(args, out: Path, settings: dict):
    from ip2p.datagen.writer import DatasetWriter

    return DatasetWriter(out, shard=_shard(args), formats=args.format, settings=settings,
                         rows_per_file=args.rows_per_file, commit_every_s=args.commit_every,
                         image_format=args.image_format)


def _run_images(args, sd_model: str, prompts: list[str], out: Path) -> None:
    from ip2p.datagen.config import ImageConfig
    from ip2p.datagen.images import PairSampler, generate_images, read_pairs
    from ip2p.eval.clip import ClipScorer
    from ip2p.sampling import SCHEDULERS

    if args.scheduler not in SCHEDULERS:  # before any model is loaded
        raise ValueError(f"--scheduler {args.scheduler!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
    config = ImageConfig(steps=args.steps, height=args.height, width=args.width, scheduler=args.scheduler,
                         samples_per_pair=args.samples_per_pair, batch_size=args.batch_size, p_min=args.p_range[0],
                         p_max=args.p_range[1], cfg_min=args.cfg_range[0], cfg_max=args.cfg_range[1], seed=args.seed)
    filter_config = _filter_config(args)
    if filter_config is not None and not args.clip:
        raise ValueError("filtering needs --clip MODEL (e.g. openai/clip-vit-large-patch14); or pass --no-filter")
    pairs = read_pairs(prompts)
    device = _device(args.device)
    output_folder(out, "--out")
    settings = {"model": sd_model, "clip": args.clip, "image": {k: v for k, v in asdict(config).items()
                                                               if k != "batch_size"},
                "filter": asdict(filter_config) if filter_config else None}
    writer = _writer(args, out, settings)
    writer.check_pairs(pair for pair in pairs if _shard(args).owns(pair.id))  # before the model loads
    sampler = PairSampler.from_pretrained(sd_model, config, device=device, dtype=_dtype(args.dtype, device))
    scorer = ClipScorer(args.clip, device=device) if args.clip else None
    generate_images(pairs, sampler, writer, scorer=scorer, filter_config=filter_config, shard=_shard(args),
                    progress=not args.quiet)
    logger.info("%s: kept %d of %d samples", out, writer.kept, writer.tried)


def _cmd_images(args) -> int:
    _run_images(args, args.model, args.prompts, Path(args.out))
    return 0


def _cmd_filter(args) -> int:
    from ip2p.datagen.filter import filter_dataset
    from ip2p.eval.clip import ClipScorer

    if Path(args.out).resolve() == Path(args.input).resolve():
        raise ValueError(f"--out {args.out} is the input folder; filter into a new folder")
    if not Path(args.input).is_dir():
        raise FileNotFoundError(f"--in {args.input!r} is not a folder; pass the output folder of the images stage")
    config = _filter_config(args)
    output_folder(args.out, "--out")
    scorer = ClipScorer(args.clip, device=_device(args.device)) if args.clip else None
    writer = _writer(args, Path(args.out), {"source": str(Path(args.input).resolve()), "clip": args.clip,
                                            "filter": asdict(config)})
    filter_dataset(args.input, writer, scorer, config, shard=_shard(args), progress=not args.quiet)
    logger.info("%s: kept %d of %d samples", args.out, writer.kept, writer.tried)
    return 0


def _cmd_run(args) -> int:
    out = output_folder(args.out, "--out")
    prompts, stats = _run_text(args, args.lm, out / "prompts.jsonl")
    if not stats.kept:
        if stats.captions:  # the images stage would write an empty dataset
            raise ValueError(f"the text stage kept none of {stats.captions} captions (dropped: {stats.dropped}); "
                             f"check --lm {args.lm!r} on a few captions with the text command")
        logger.info("no caption of --captions falls to shard %s; nothing to generate", _shard(args).tag)
        return 0
    _run_images(args, args.sd_model, [str(prompts)], out)
    return 0


# -- parser -----------------------------------------------------------------------------------------------------------
class _DefaultsFormatter(argparse.HelpFormatter):
    """Adds each flag's default to its help (docs/datagen.md promises them), unless the flag has none or its help
    already says it (argparse.ArgumentDefaultsHelpFormatter also prints "(default: None)" and "(default: False)")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default in (None, argparse.SUPPRESS) or action.default is False
                or "default" in text):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from ip2p.datagen.config import FinetuneConfig

    parser = argparse.ArgumentParser(prog="python -m ip2p.datagen",
                                     description="Generate an InstructPix2Pix training set from captions (the "
                                                 "paper, section 3.1).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("finetune-lm", help="fine-tune a causal LM on human-written triples",
                       description="Fine-tune a causal LM on JSON-lines triples {input, edit, output}; loss on the "
                                   "completion only; saves with save_pretrained.")
    d = FinetuneConfig()
    p.add_argument("--model", required=True, help="causal LM folder or hub id to start from")
    p.add_argument("--triples", default=None,
                   help="JSON-lines triples (default: the bundled ip2p/datagen/examples/triples.jsonl)")
    p.add_argument("--out", required=True, help="folder to save the fine-tuned model and tokenizer to")
    p.add_argument("--epochs", type=float, default=d.epochs, help="passes over the triples (paper: 1)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (constant)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="triples per micro-batch")
    p.add_argument("--gradient-accumulation", type=int, default=d.gradient_accumulation,
                   help="micro-batches per optimizer step")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example at most")
    p.add_argument("--seed", type=int, default=d.seed, help="data order and initialisation seed")
    _add_common(p, shards=False)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("text", help="captions -> (instruction, edited caption) JSON lines",
                       description="Generate {id, input, edit, output} JSON lines with a causal LM; resumable.")
    p.add_argument("--model", required=True, help="causal LM folder or hub id (fine-tuned with finetune-lm)")
    p.add_argument("--captions", required=True, help=".txt (one caption a line) or .jsonl caption file")
    p.add_argument("--out", required=True,
                   help="output .jsonl (with several shards: OUT.shard-<i>-of-<n>.jsonl)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    _add_text_sampling(p, "--batch-size")
    _add_common(p)
    p.set_defaults(func=_cmd_text)

    p = sub.add_parser("images", help="caption pairs -> filtered (input, edited) image pairs",
                       description="Sample each caption pair with Stable Diffusion and Prompt-to-Prompt, score with "
                                   "CLIP, keep the best, write a dataset; resumable and sharded.")
    p.add_argument("--model", required=True,
                   help="text-to-image SD checkpoint: diffusers folder, hub id, single file, or tiny")
    p.add_argument("--prompts", required=True, nargs="+",
                   help="text-stage JSON lines; OUT.jsonl also finds its OUT.shard-*-of-*.jsonl files")
    p.add_argument("--out", required=True, help="dataset folder")
    p.add_argument("--seed", type=int, default=0, help="run seed; sample seeds derive from it and the pair id")
    _add_image_sampling(p)
    _add_filter(p, can_skip=True)
    _add_writer(p)
    _add_common(p)
    p.set_defaults(func=_cmd_images)

    p = sub.add_parser("filter", help="apply the CLIP filter to an unfiltered images-stage dataset",
                       description="Score (where not yet scored) and filter a dataset written with `images "
                                   "--no-filter` into a new folder; resumable and sharded.")
    p.add_argument("--in", dest="input", required=True, help="images-stage output folder")
    p.add_argument("--out", required=True, help="filtered dataset folder")
    _add_filter(p, can_skip=False)
    _add_writer(p)
    _add_common(p)
    p.set_defaults(func=_cmd_filter)

    p = sub.add_parser("run", help="text -> images -> CLIP filter, end to end",
                       description="Run every stage into OUT (OUT/prompts.jsonl, OUT/data/*.parquet); rerun the same "
                                   "command to resume.")
    p.add_argument("--lm", required=True, help="causal LM folder or hub id for the text stage")
    p.add_argument("--captions", required=True, help=".txt or .jsonl caption file")
    p.add_argument("--sd-model", required=True, help="text-to-image SD checkpoint (folder, hub id, file, tiny)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of both stages")
    _add_text_sampling(p, "--lm-batch-size")
    _add_image_sampling(p)
    _add_filter(p, can_skip=True)
    _add_writer(p)
    _add_common(p)
    p.set_defaults(func=_cmd_run)
    for p in sub.choices.values():
        p.formatter_class = _DefaultsFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        logger.error("error: %s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
