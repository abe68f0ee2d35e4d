"""The built-in edit task end to end: ``python -m ip2p.demo [--quick] [--output DIR]`` (see docs/demo.md).

Nothing is downloaded. The run goes through the same public paths a user's fine-tune does:

1. data: ``ip2p.synthetic.write_dataset`` writes scenes, instructions, exact targets and masks as parquet
   (``OUT/data``; kept when the parameters match);
2. base: ``ip2p.base.build_base`` writes a tiny Stable Diffusion folder (``OUT/base``; its VAE is the trained one
   shipped in ``ip2p/assets``, the UNet random, the text encoder a frozen random tiny CLIP);
3. train: ``ip2p.training.train(load_config(configs/demo.yaml, [model.pretrained=OUT/base, data.path=OUT/data, ...]))``
   writes ``OUT/final`` (diffusers folder) and ``OUT/final.safetensors`` (original single-file layout);
4. evaluate both test splits (held-out shape/colour combinations, held-out phrasings) with ``ip2p.eval``;
5. edit a few held-out examples into ``OUT/grid.png`` (input, edit, target, with the instructions);
6. sweep the guidance scales: ``OUT/sweep.png``, ``OUT/sweep.csv``, ``OUT/sweep.json``;

and writes ``OUT/metrics.json`` (both splits' success, strict success and per-type numbers, the base VAE's
reconstruction quality, timings) and logs a one-line summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("ip2p.demo")

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MANAGED_KEYS = ("output_dir", "model.pretrained", "data.path")
"""Training config keys the demo sets from ``--output``; an override would train apart from the data and base it
evaluates."""
SPLIT_NAMES = {"heldout_combinations": "test_heldout_combinations", "heldout_phrasings": "test_heldout_phrasings"}
RESULTS = ("metrics.json", "sweep.json", "sweep.csv", "sweep.png", "grid.png")
"""The files a run writes after training, ``metrics.json`` (written last) first; with ``inputs/<k>.png``. A run deletes
an earlier run's before it starts, so that one stopped on the way never leaves them beside its model as if they
described it."""


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo decides besides the training config (which lives in ``config``, a YAML file)."""

    config: str
    """Training config, relative to the repository's configs/ folder (or absolute)."""
    n_train: int
    n_test: int
    """Examples in each test split; all of them are evaluated."""
    base: Any = None
    """``ip2p.base.BaseSpec`` (None: the default)."""
    seed: int = 0
    size: int = 64
    steps: int = 10
    scheduler: str | None = None
    """Sampler (None: ``ip2p.sampling.default_scheduler`` of the trained model's prediction type)."""
    text_guidance: float = 1.5
    image_guidance: float = 1.2
    batch_size: int = 64
    grid_per_split: tuple[int, int] = (6, 2)
    """Examples of (held-out combinations, held-out phrasings) in the grid; the first of each edit type first."""
    sweep_examples: int = 24
    sweep_steps: int = 6
    image_scales: tuple[float, ...] = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2)
    text_scales: tuple[float, ...] = (1.0, 1.5, 3.0, 5.0, 7.5)
    sweep_min_examples: int = 6
    """The sweep's floor when the time budget would leave it fewer examples (it then runs past the budget)."""
    max_minutes: float | None = None
    """The whole run's time budget (None: none). Before training, the demo measures what an edit costs on this
    machine and lowers ``train.max_minutes`` so that evaluation and the sweep fit after it; the sweep then takes as
    many of its examples as the time left allows (at least ``sweep_min_examples``)."""
    overrides: tuple[str, ...] = field(default_factory=tuple)
    """Extra ``key=value`` training overrides."""


def _quick_base() -> Any:
    from ip2p.base import BaseSpec, UNetSpec

    # The same (shipped) VAE, a much smaller UNet: the quick run checks the plumbing, not the quality.
    return BaseSpec(unet=UNetSpec(block_out_channels=(32, 32), layers_per_block=1, attention=(False, True),
                                  attention_heads=4))


DEMOS: dict[str, DemoSettings] = {
    "full": DemoSettings(config="demo.yaml", n_train=6000, n_test=120, max_minutes=15.0),
    "quick": DemoSettings(config="demo-quick.yaml", n_train=48, n_test=12, base=_quick_base(), steps=4,
                          batch_size=16, grid_per_split=(3, 1), sweep_examples=6, sweep_steps=2, sweep_min_examples=2,
                          image_scales=(1.0, 1.6, 2.2), text_scales=(1.0, 3.0)),
}


@dataclass(frozen=True)
class EditCost:
    """What one edit costs on this machine, in seconds: ``fixed`` (encoding, decoding, set-up) plus ``per_step`` for
    each sampling step."""

    fixed: float
    per_step: float

    def seconds(self, edits: int, steps: int) -> float:
        return edits * (self.fixed + self.per_step * steps)


def measure_edit_cost(model: Any, examples: Sequence[Any], *, batch_size: int, **sampling: Any) -> EditCost:
    """Time ``ip2p.eval.run_edits`` on one batch of ``examples`` at 1 and 3 sampling steps (after a one-edit warm-up)
    and split the cost into its fixed and per-step parts."""
    from ip2p.eval.evaluate import run_edits

    batch = list(examples[:batch_size])
    if not batch:
        raise ValueError("no examples to time the edits on")
    sampling = dict(sampling, progress=False)
    run_edits(model, batch[:1], **dict(sampling, steps=1))  # first-call set-up (thread pools, allocator) not counted
    seconds = {}
    for steps in (1, 3):
        start = time.perf_counter()
        run_edits(model, batch, batch_size=batch_size, **dict(sampling, steps=steps))
        seconds[steps] = (time.perf_counter() - start) / len(batch)
    per_step = max(seconds[3] - seconds[1], 0.0) / 2
    return EditCost(fixed=max(seconds[1] - per_step, 0.0), per_step=per_step)


def sweep_settings(settings: DemoSettings) -> int:
    """Distinct (s_T, s_I) settings the sweep edits (the point both sweeps share is edited once)."""
    points = {(settings.text_guidance, s) for s in settings.image_scales}
    return len(points | {(s, settings.image_guidance) for s in settings.text_scales})


def after_training_seconds(settings: DemoSettings, cost: EditCost, margin: float = 1.25,
                           reserve: float = 30.0) -> float:
    """Estimated seconds from the end of training to the end of the run: both test splits, the sweep at its full size
    (times ``margin``, as the load of a shared machine varies), and ``reserve`` for loading, export and files."""
    edits = cost.seconds(2 * settings.n_test, settings.steps)
    edits += cost.seconds(settings.sweep_examples * sweep_settings(settings), settings.sweep_steps)
    return margin * edits + reserve


def training_minutes(budget_seconds: float, elapsed: float, after_training: float, cap: float,
                     floor: float = 1.0) -> float:
    """``train.max_minutes`` for a run that has ``budget_seconds`` in all, has spent ``elapsed`` and needs
    ``after_training`` seconds after training: the time left, at least ``floor`` minutes (a machine too slow for the
    budget still trains a little), and within ``cap`` (the config's own budget, 0 for none; it wins over the floor)."""
    minutes = max(round((budget_seconds - elapsed - after_training) / 60, 2), floor)
    return min(minutes, cap) if cap else minutes


def sweep_size(seconds_left: float, seconds_per_example: float, wanted: int, minimum: int) -> int:
    """The sweep examples that fit in ``seconds_left``: at most ``wanted``, at least ``minimum`` (or ``wanted``)."""
    fit = int(seconds_left // seconds_per_example) if seconds_per_example > 0 else wanted
    return max(min(minimum, wanted), min(wanted, fit))


def _config_path(name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else CONFIGS / name


def _grid_examples(examples: Sequence[Any], count: int) -> list[int]:
    """Indices of ``count`` examples, one per edit type first (in order of appearance), then the next ones."""
    picked: list[int] = []
    seen: set[str] = set()
    for i, e in enumerate(examples):
        if e.edit_type not in seen:
            seen.add(e.edit_type)
            picked.append(i)
    picked = picked[:count]
    picked += [i for i in range(len(examples)) if i not in picked][: count - len(picked)]
    return picked


def _grid(rows: Sequence[tuple[Any, Any, str]], scale: int = 3):
    """A labelled grid: one row per (example, output, split label): input | edited | target."""
    from PIL import Image

    from ip2p.eval.metrics import edit_success
    from ip2p.images import make_grid

    def big(array: Any) -> Image.Image:
        image = Image.fromarray(array)
        return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)

    cells, labels = [], []
    for example, output, split in rows:
        verdict = edit_success(output, example)
        mark = "strict success" if verdict["strict_success"] else ("success" if verdict["success"] else "failure")
        cells.append([big(example.source), big(output), big(example.target)])
        # One item a line, edit types with spaces: the narrow label column then breaks lines between words.
        labels.append(f'"{example.instruction}"\n{example.edit_type.replace("_", " ")}\n{split}: {mark}')
    return make_grid(cells, row_labels=labels, col_labels=["input", "edited by the model", "target"])


def _summary_line(metrics: dict[str, Any]) -> str:
    parts = []
    for key in SPLIT_NAMES:
        m = metrics[key]
        by_type = ", ".join(f"{t} {v['success']:.2f}" for t, v in m["by_type"].items())
        kept = f", objects kept {m['objects_kept']:.2f}" if "objects_kept" in m else ""
        parts.append(f"{key} success {m['success']:.2f} (strict {m['strict_success']:.2f}{kept}; {by_type})")
    training = metrics.get("training", {})
    if training.get("steps", 0) < training.get("max_steps", 0):
        # A slow or busy machine: the numbers above are for a model trained for a fraction of the demo's steps.
        parts.append(f"trained {training['steps']} of {training['max_steps']} steps (stopped by "
                     f"train.max_minutes={training['max_minutes']:g})")
    budget = metrics.get("budget", {}).get("max_minutes")
    over = f" (over the {budget:g}-minute budget)" if budget and metrics["wall_seconds"] > budget * 60 else ""
    return "; ".join(parts) + f"; {metrics['wall_seconds']:.0f} s{over}"


def run_demo(output: str | os.PathLike = "runs/demo", settings: DemoSettings = DEMOS["full"], *,
             config: str | os.PathLike | None = None, overrides: Sequence[str] = (), progress: bool = True,
             device: str | None = None) -> dict[str, Any]:
    """Run the whole demo into ``output``; returns the metrics written to ``output/metrics.json``.

    ``device``: where evaluation runs (default ``auto``: PyTorch's accelerator if any, as Accelerate picks for
    training, else the CPU); checked before any work starts.
    """
    from PIL import Image

    from ip2p import synthetic
    from ip2p.atomic import output_folder
    from ip2p.base import BaseSpec, build_base, read_base_meta
    from ip2p.config import load_config
    from ip2p.eval.evaluate import load_examples, run_edits, sampling_settings, score_edits, write_json
    from ip2p.eval.sweep import guidance_sweep, plot_sweep, write_table
    from ip2p.images import save_image
    from ip2p.devices import resolve_device
    from ip2p.models import load_editor, read_ip2p_meta
    from ip2p.sampling import default_scheduler
    from ip2p.training import train

    started = time.perf_counter()
    for item in overrides:
        if item.partition("=")[0].strip() in MANAGED_KEYS:
            raise ValueError(f"override {item!r}: the demo sets {', '.join(MANAGED_KEYS)} from its output folder; "
                             "use --output DIR instead")
    out = Path(output)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        logger.info("%s: %.1f s", name, timings[name])
        return now

    # The training config and the device first, so that a bad override, config file or device fails before minutes
    # of data and base (write_dataset and build_base write to exactly these two folders).
    eval_device = resolve_device(device or "auto")
    config_path = Path(config) if config is not None else _config_path(settings.config)
    cfg = load_config(config_path, [f"output_dir={out}", f"model.pretrained={out / 'base'}",
                                    f"data.path={out / 'data'}", f"seed={settings.seed}", *settings.overrides,
                                    *overrides])
    output_folder(out)  # only now: a bad config or device leaves no new empty folder behind
    old_results = [out / name for name in RESULTS if (out / name).is_file()]
    old_results += sorted(p for p in (out / "inputs").glob("*.png") if p.stem.isdigit())  # the names it writes only
    for path in old_results:
        path.unlink(missing_ok=True)
    if old_results:
        logger.info("deleted the previous run's results in %s (%s)", out,
                    ", ".join(str(p.relative_to(out)) for p in old_results))

    t = time.perf_counter()
    logger.info("1/6 data: %d training and 2 x %d test examples -> %s", settings.n_train, settings.n_test, out / "data")
    data = synthetic.write_dataset(out / "data", n_train=settings.n_train, n_test=settings.n_test,
                                   seed=settings.seed, size=settings.size, progress=progress)
    t = lap("data", t)

    logger.info("2/6 base model -> %s", out / "base")
    spec = settings.base if settings.base is not None else BaseSpec()
    base = build_base(out / "base", spec, progress=progress)
    base_meta = read_base_meta(base)
    t = lap("base", t)

    scheduler = settings.scheduler or default_scheduler(cfg.model.prediction_type)
    sampling = dict(steps=settings.steps, text_guidance=settings.text_guidance,
                    image_guidance=settings.image_guidance, scheduler=scheduler, seed=settings.seed)
    budget = settings.max_minutes * 60 if settings.max_minutes else None
    plan: dict[str, Any] = {}
    if budget:
        # Evaluation and the sweep come after training: time an edit on this machine now (the base has the trained
        # model's architecture) and leave them the time they will take.
        logger.info("timing edits on this machine with the base model, to fit the %g-minute budget",
                    settings.max_minutes)
        sampling_args = {k: v for k, v in sampling.items() if k != "steps"}
        cost = measure_edit_cost(load_editor(base, device=eval_device),
                                 load_examples(data, split=SPLIT_NAMES["heldout_combinations"]),
                                 batch_size=settings.batch_size, **sampling_args)
        after = after_training_seconds(settings, cost)
        minutes = training_minutes(budget, time.perf_counter() - started, after, cfg.train.max_minutes)
        logger.info("time budget %g min: an edit costs %.3f s + %.3f s per step here, so evaluation and the sweep "
                    "need about %.0f s; training may take %g min (config: %g)", settings.max_minutes, cost.fixed,
                    cost.per_step, after, minutes, cfg.train.max_minutes)
        shortened = not cfg.train.max_minutes or minutes < cfg.train.max_minutes
        cfg.train.max_minutes = minutes
        plan = {"max_minutes": settings.max_minutes, "edit_seconds": {"fixed": round(cost.fixed, 5),
                                                                      "per_step": round(cost.per_step, 5)},
                "after_training_seconds": round(after, 1), "train_max_minutes": minutes,
                "training_shortened": shortened}
        t = lap("plan", t)

    logger.info("3/6 training (%s: %d steps of %d) -> %s", config_path, cfg.train.max_steps, cfg.train.batch_size,
                out / "final")
    final = train(cfg)
    steps = read_ip2p_meta(final).get("ip2p_config", {}).get("step", cfg.train.max_steps)
    if steps < cfg.train.max_steps:
        why = (f"the share of the {settings.max_minutes:g}-minute budget left for training: this machine is slower "
               "than the one the demo was sized on" if plan.get("training_shortened")
               else "the config's own limit")
        logger.warning("training stopped at step %d of %d: train.max_minutes=%g (%s); the numbers below are for %d "
                       "steps", steps, cfg.train.max_steps, cfg.train.max_minutes, why, steps)
    t = lap("train", t)

    model = load_editor(final, expand=False, device=eval_device)
    if settings.scheduler is None:  # the trained model's own prediction type decides (a config may leave it unset)
        sampling["scheduler"] = default_scheduler(model.scheduler.config.get("prediction_type"))
    logger.info("4/6 evaluating both test splits (%s)", sampling)
    metrics: dict[str, Any] = {}
    examples, outputs = {}, {}
    for key, split in SPLIT_NAMES.items():
        examples[key] = load_examples(data, split=split)
        outputs[key] = run_edits(model, examples[key], batch_size=settings.batch_size, progress=progress, **sampling)
        metrics[key] = score_edits(examples[key], outputs[key])
        logger.info("%s: success %.3f, strict %.3f (n=%d)", key, metrics[key]["success"],
                    metrics[key]["strict_success"], metrics[key]["n"])
    t = lap("evaluate", t)

    logger.info("5/6 grid of held-out edits -> %s", out / "grid.png")
    grid_rows = []
    for (key, split), count in zip(SPLIT_NAMES.items(), settings.grid_per_split):
        for i in _grid_examples(examples[key], count):
            grid_rows.append((examples[key][i], outputs[key][i], key.replace("_", " ")))
    save_image(_grid(grid_rows), out / "grid.png")
    # The grid's held-out inputs as files, to try the model on with infer.py (the command is logged at the end).
    inputs = out / "inputs"
    for k, (example, _, _) in enumerate(grid_rows):
        save_image(Image.fromarray(example.source), inputs / f"{k}.png")
    t = lap("grid", t)

    n_sweep = settings.sweep_examples
    if budget:
        # The evaluation just measured today's speed with the trained model; the calibration gives the step split.
        speed = timings["evaluate"] / max(cost.seconds(2 * settings.n_test, settings.steps), 1e-6)
        per_example = speed * cost.seconds(sweep_settings(settings), settings.sweep_steps)
        left = budget - (time.perf_counter() - started) - 5
        n_sweep = sweep_size(left, per_example, settings.sweep_examples, settings.sweep_min_examples)
        if n_sweep < settings.sweep_examples:
            logger.warning("the sweep takes %d of its %d examples: %.0f s of the %g-minute budget are left and one "
                           "example costs about %.1f s here", n_sweep, settings.sweep_examples, max(left, 0),
                           settings.max_minutes, per_example)
        plan["sweep_examples"] = n_sweep
    logger.info("6/6 guidance sweep on %d held-out-combination examples", n_sweep)
    sweep_examples = examples["heldout_combinations"][:n_sweep]
    sweep_sampling = dict(sampling, steps=settings.sweep_steps)
    rows = guidance_sweep(model, sweep_examples, image_scales=settings.image_scales,
                          text_scales=settings.text_scales, batch_size=settings.batch_size, progress=progress,
                          **sweep_sampling)
    write_json(rows, out / "sweep.json")
    write_table(rows, out / "sweep.csv")
    plot_sweep(rows, out / "sweep.png", title=f"guidance sweep: {len(sweep_examples)} held-out-combination edits, "
                                                 f"{settings.sweep_steps} {sampling['scheduler']} steps")
    lap("sweep", t)

    metrics.update({
        "settings": {**sampling_settings(**sampling), "device": str(eval_device)},
        "sweep": {"file": "sweep.json", "examples": len(sweep_examples), **sampling_settings(**sweep_sampling)},
        "base": {"vae": base_meta.get("vae_report", {}), "params": base_meta.get("params", {}),
                 "spec": base_meta.get("spec", {})},
        "training": {"config": str(config_path), "steps": steps, "max_steps": cfg.train.max_steps,
                     "max_minutes": cfg.train.max_minutes, "batch_size": cfg.train.batch_size,
                     "samples": steps * cfg.train.batch_size,
                     "n_train": settings.n_train, "prediction_type": cfg.model.prediction_type,
                     "zero_terminal_snr": cfg.model.zero_terminal_snr},
        "timings": timings,
        "wall_seconds": round(time.perf_counter() - started, 1),
        **({"budget": plan} if plan else {}),
        "files": {name: str(out / name) for name in
                  ("final", "final.safetensors", "grid.png", "inputs", "metrics.json", "sweep.png", "sweep.csv",
                   "sweep.json")},
    })
    metrics["infer_command"] = infer_command(final, inputs / "0.png", grid_rows[0][0].instruction, sampling,
                                             out / "my_edit.png") if grid_rows else None
    metrics["webui_command"] = webui_command(final, sampling)
    write_json(metrics, out / "metrics.json")
    for name, path in metrics["files"].items():
        logger.info("%-17s %s%s", name, path, "" if Path(path).exists() else " (missing)")
    if metrics["infer_command"]:
        logger.info("edit with it (any instruction; the images in %s are held-out scenes): %s", inputs,
                    metrics["infer_command"])
        logger.info("or in a browser: %s", metrics["webui_command"])
    logger.info("summary: %s", _summary_line(metrics))
    return metrics


def _short(path: str | os.PathLike) -> str | None:
    """``path`` relative to the working folder, if it is below it."""
    relative = os.path.relpath(path)
    return None if relative.startswith("..") else relative


def _python() -> str:
    """This interpreter, short where it lives below the working folder (a project's .venv): run from elsewhere, a bare
    `python` would be whichever one the shell finds, often one without torch."""
    return (_short(sys.executable) or sys.executable) if sys.executable else "python"


def infer_command(checkpoint: str | os.PathLike, image: str | os.PathLike, instruction: str,
                  sampling: dict[str, Any], output: str | os.PathLike) -> str:
    """The ``infer.py`` command that edits ``image`` as the demo's evaluation does: the input's own 64 px size (not
    infer.py's 512 px default, which suits Stable Diffusion) and the evaluation's sampler and guidance scales."""
    import shlex

    script = CONFIGS.parent / "infer.py"
    args = [_python(), _short(script) or str(script), "--checkpoint", str(checkpoint), "--image", str(image),
            "--instruction", instruction, "--resolution", "0", "--steps", str(sampling["steps"]), "--scheduler",
            str(sampling["scheduler"]), "--text-guidance", f"{sampling['text_guidance']:g}", "--image-guidance",
            f"{sampling['image_guidance']:g}", "--seed", str(sampling["seed"]), "--output", str(output)]
    return shlex.join(args)


def webui_command(checkpoint: str | os.PathLike, sampling: dict[str, Any]) -> str:
    """The ``python -m ip2p.webui`` command that serves ``checkpoint`` with the evaluation's settings as defaults."""
    import shlex

    return shlex.join([_python(), "-m", "ip2p.webui", "--checkpoint", str(checkpoint), "--resolution", "0", "--steps",
                       str(sampling["steps"]), "--scheduler", str(sampling["scheduler"]), "--text-guidance",
                       f"{sampling['text_guidance']:g}", "--image-guidance", f"{sampling['image_guidance']:g}"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ip2p.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the whole path in about a minute")
    parser.add_argument("--output", default=None, help="output folder (default runs/demo, or runs/demo-quick)")
    parser.add_argument("--config", default=None, help="training YAML (default configs/demo.yaml or demo-quick.yaml)")
    parser.add_argument("--device", default="auto",
                        help="torch device for evaluation: auto (a GPU if PyTorch sees one, else the CPU), cpu, "
                             "cuda, ...")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="time budget of the whole run: training is shortened to leave evaluation and the sweep "
                             "their measured time (default 15 for the full demo, none for --quick; 0: no budget)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads} must be at least 1")
    if args.max_minutes is not None and not (args.max_minutes >= 0 and math.isfinite(args.max_minutes)):
        parser.error(f"--max-minutes {args.max_minutes:g} must be a number of minutes >= 0 (0: no budget)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    name = "quick" if args.quick else "full"
    settings = DEMOS[name]
    if args.max_minutes is not None:
        settings = dataclasses.replace(settings, max_minutes=args.max_minutes or None)
    output = args.output or ("runs/demo-quick" if args.quick else "runs/demo")
    from ip2p.config import ConfigError

    try:
        run_demo(output, settings, config=args.config, overrides=args.overrides, device=args.device)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        logger.error("error: %s", error)
        return 2
    except KeyboardInterrupt:
        # Every file the demo writes is written whole or not at all, so the same command simply starts again.
        logger.error("interrupted; run the same command again: the data and base model in %s are kept (as are the "
                     "latents cached so far), and training starts over", output)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
