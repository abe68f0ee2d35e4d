"""Edit-loop speed: ip2p's ``edit`` vs diffusers' ``StableDiffusionInstructPix2PixPipeline``, same process, same weights.

    python bench/edit_speed.py [--layout small|sd] [--size 64] [--steps 20] [--repeats 5] [--device cpu]

Prints median seconds per edit for both and the ratio ours / diffusers (target <= 1.0: the same work, no extra
overhead), plus the s_I = 1 case where ip2p skips the zero-weight branch (diffusers still runs three).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def median_time(fn, repeats: int, sync) -> float:
    fn()  # warm-up: allocator, kernels, lazy imports
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from ip2p import tiny
    from ip2p.inference import DTYPES
    from ip2p.models import load_editor
    from ip2p.sampling import edit, make_scheduler

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", choices=(*tiny.LAYOUTS, "sd15"), default="small",
                   help="tiny layouts, or sd15: Stable Diffusion 1.5's architecture with random weights")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scheduler", default="euler_a")
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint", help="an editor folder to use instead of a tiny random one")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            folder = args.checkpoint
        else:
            folder = tiny.save_tiny_pipeline(Path(tmp) / "editor", layout=args.layout)
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        model = load_editor(folder, expand=False, device=device, torch_dtype=dtype)
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device, dtype)

    def ours(s_i: float):
        return lambda: edit(model, image * 2 - 1, ["make it winter"], steps=args.steps, image_guidance=s_i,
                            scheduler=make_scheduler(args.scheduler, model.scheduler.config),
                            generator=torch.Generator().manual_seed(0), progress=False)

    def theirs(s_i: float):
        def run():
            pipe.scheduler = make_scheduler(args.scheduler, model.scheduler.config)
            return pipe("make it winter", image=image, num_inference_steps=args.steps, image_guidance_scale=s_i,
                        generator=torch.Generator().manual_seed(0), output_type="pt")
        return run

    print(f"device={device} dtype={args.dtype} layout={args.layout} size={args.size} steps={args.steps} scheduler={args.scheduler} "
          f"repeats={args.repeats} threads={torch.get_num_threads()}")
    for s_i in (1.5, 1.0):
        # Interleave the two to spread machine noise evenly.
        t_theirs = median_time(theirs(s_i), args.repeats, sync)
        t_ours = median_time(ours(s_i), args.repeats, sync)
        print(f"s_T=7.5 s_I={s_i}: diffusers {t_theirs:.3f} s/edit, ip2p {t_ours:.3f} s/edit, "
              f"ratio ip2p/diffusers = {t_ours / t_theirs:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
