"""``python -m ip2p.eval --checkpoint DIR --data PATH [--sweep] [--clip PATH] --output DIR``.

Edits the test examples of a dataset with known targets (a folder written by ``ip2p.synthetic.write_dataset``, or
parquet files with its columns) and writes ``metrics.json`` (one summary per split: success, strict success, by edit
type, L1/PSNR, errors inside/outside the mask, CLIP similarities with ``--clip``, and under ``settings`` the checkpoint,
LoRA, data, limit and sampling settings that produced it); with ``--sweep`` also the guidance
sweep as ``sweep.json``, ``sweep.csv`` and ``sweep.png``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

from ip2p.sampling import DEFAULT_IMAGE_GUIDANCE, DEFAULT_TEXT_GUIDANCE, SCHEDULERS

logger = logging.getLogger("ip2p.eval")


def main(argv: Sequence[str] | None = None) -> int:
    from ip2p.eval.evaluate import DEFAULT_SPLITS

    parser = argparse.ArgumentParser(prog="python -m ip2p.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="editor: diffusers folder or single .safetensors file")
    parser.add_argument("--config-dir", default=None, help="diffusers folder describing a single-file checkpoint")
    parser.add_argument("--lora", default=None,
                        help="adapter file of a LoRA run (final.lora.safetensors), applied to --checkpoint, its base")
    parser.add_argument("--data", required=True,
                        help="synthetic dataset folder, parquet file or glob (of files: the rows of --split)")
    parser.add_argument("--split", action="append", dest="splits", default=None,
                        help=f"split to evaluate (repeatable; default: {', '.join(DEFAULT_SPLITS)})")
    parser.add_argument("--limit", type=int, default=None, help="first N examples of each split (default all)")
    parser.add_argument("--output", required=True, help="folder for metrics.json (and the sweep files)")
    parser.add_argument("--steps", type=int, default=20,
                        help="denoising steps (default 20; the demo evaluates with 10)")
    parser.add_argument("--text-guidance", type=float, default=DEFAULT_TEXT_GUIDANCE,
                        help=f"s_T (default {DEFAULT_TEXT_GUIDANCE:g}; the demo evaluates with 1.5)")
    parser.add_argument("--image-guidance", type=float, default=DEFAULT_IMAGE_GUIDANCE,
                        help=f"s_I (default {DEFAULT_IMAGE_GUIDANCE:g}; the demo evaluates with 1.2)")
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), default=None,
                        help="sampler (default: euler_a, or euler for a model trained with prediction_type=sample)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the edits' noise (default 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples edited at once (default 32)")
    parser.add_argument("--clip", default=None, help="CLIP model folder or hub id for CLIP similarities")
    parser.add_argument("--device", default="auto",
                        help="torch device: auto (a GPU if PyTorch sees one, else the CPU), cpu, cuda, ...")
    parser.add_argument("--sweep", action="store_true", help="also run the s_I and s_T guidance sweeps")
    parser.add_argument("--sweep-limit", type=int, default=None, help="examples in the sweep (default 60)")
    parser.add_argument("--image-scales", default=None, help="s_I values, comma-separated")
    parser.add_argument("--text-scales", default=None, help="s_T values, comma-separated")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from ip2p.atomic import output_folder
    from ip2p.eval.evaluate import clip_scorer, evaluate, load_examples, write_json
    from ip2p.eval.sweep import IMAGE_SCALES, TEXT_SCALES, guidance_sweep, plot_sweep, write_table
    from ip2p.inference import parse_scales
    from ip2p.devices import resolve_device
    from ip2p.models import load_editor

    splits = args.splits or DEFAULT_SPLITS
    try:
        if not args.sweep and not (args.image_scales is args.text_scales is args.sweep_limit is None):
            raise ValueError("--image-scales, --text-scales and --sweep-limit set the guidance sweep; add --sweep")
        sweep_limit = 60 if args.sweep_limit is None else args.sweep_limit
        for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--sweep-limit", sweep_limit),
                            ("--limit", 1 if args.limit is None else args.limit)):
            if value < 1:  # before the data and the model load, not after the first batch
                raise ValueError(f"{flag} {value} must be at least 1")
        for flag, value in (("--text-guidance", args.text_guidance), ("--image-guidance", args.image_guidance)):
            if not math.isfinite(value):
                raise ValueError(f"{flag} {value} must be a finite number, e.g. 1.5")
        image_scales, text_scales = (default if text is None else parse_scales(text, flag) for text, flag, default in (
            (args.image_scales, "--image-scales", IMAGE_SCALES), (args.text_scales, "--text-scales", TEXT_SCALES)))
        # Everything that can be wrong with the data, the output folder or the CLIP model fails before any edit.
        examples = {split: load_examples(args.data, split=split, limit=args.limit) for split in splits}
        for split, found in examples.items():
            if not found:
                raise ValueError(f"split {split!r} of --data {args.data!r} has no examples; expected at least one")
        sweep_examples = load_examples(args.data, split=splits[0], limit=sweep_limit) if args.sweep else []
        out = output_folder(args.output)
        clip = clip_scorer(args.clip)  # loaded once for every split and the sweep
        model = load_editor(args.checkpoint, config_dir=args.config_dir, expand=False, lora=args.lora,
                            device=resolve_device(args.device))
        # The files this run writes replace an earlier run's: delete those now, so that a run stopped on the way
        # never leaves them beside its own (an older sweep beside new metrics).
        for name in ("metrics.json",) + (("sweep.json", "sweep.csv", "sweep.png") if args.sweep else ()):
            (out / name).unlink(missing_ok=True)
        sampling = dict(steps=args.steps, text_guidance=args.text_guidance, image_guidance=args.image_guidance,
                        scheduler=args.scheduler, seed=args.seed, batch_size=args.batch_size)
        metrics = {}
        for split in splits:
            metrics[split] = evaluate(model, examples[split], split=split, clip=clip, **sampling)
            # What was scored, beside how: several evaluations' metrics.json files stay tellable apart.
            metrics[split]["settings"].update(checkpoint=args.checkpoint, lora=args.lora, data=args.data,
                                              limit=args.limit)
            logger.info("%s: success %.3f, strict success %.3f over %d examples", split, metrics[split]["success"],
                        metrics[split]["strict_success"], metrics[split]["n"])
        write_json(metrics, out / "metrics.json")
        logger.info("metrics: %s", out / "metrics.json")
        if args.sweep:
            rows = guidance_sweep(model, sweep_examples, image_scales=image_scales,
                                  text_scales=text_scales, clip=clip, **sampling)
            write_json(rows, out / "sweep.json")
            write_table(rows, out / "sweep.csv")
            plot_sweep(rows, out / "sweep.png", title=f"guidance sweep on {len(sweep_examples)} examples of "
                                                      f"{splits[0]}")
            logger.info("sweep: %s, %s, %s", out / "sweep.json", out / "sweep.csv", out / "sweep.png")
    except (ValueError, FileNotFoundError) as error:
        logger.error("error: %s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
