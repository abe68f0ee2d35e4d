"""Peak memory of one edit: ``--low-memory`` (``EditorModel.low_memory``) against the default, in the same run.

    python bench/edit_memory.py [--layout small|sd|sd15] [--size 512] [--steps 4] [--device cpu|cuda] [--dtype fp16]

Each mode runs in its own fresh process (so one mode's allocations cannot hide the other's). On a GPU it reports the
peak allocated by the edit above what the loaded model holds (``torch.cuda.max_memory_allocated``); on the CPU the
rise of the process's peak resident set over its size just before the edit (after a small edit has paged in the
memory-mapped weights). Prints both modes, the ratio
low-memory / default for memory (below 1 is the point) and for time (the price), and the largest pixel difference
between the two edits (0..255; the VAE's tiles blend at their seams above its native size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss_kib() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))


def measure(folder: str, args: argparse.Namespace, low_memory: bool, out: str) -> dict:
    """One edit in this process; returns its peak memory rise (MiB), its time and writes the image to ``out``."""
    import resource

    import numpy as np
    import torch

    from ip2p.inference import DTYPES
    from ip2p.models import load_editor
    from ip2p.sampling import edit, make_scheduler

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    model = load_editor(folder, expand=False, device=device, torch_dtype=dtype)
    if low_memory:
        model.low_memory()
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def run():
        return edit(model, image, ["make it winter"], steps=args.steps, scheduler=make_scheduler("euler_a",
                    model.scheduler.config), generator=torch.Generator().manual_seed(0), progress=False)

    if device.type == "cuda":
        run()  # warm-up: kernels, cuDNN workspaces
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        result = run()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        # The weights are memory-mapped and paged in by the first forward: a one-step edit of a small image first,
        # so that the rise measured below is the edit's own. (ru_maxrss never falls: the small edit must peak lower
        # than the measured one, which holds from a few hundred pixels on.)
        edit(model, image[..., :64, :64], ["warm-up"], steps=1, progress=False)
        before = _rss_kib()
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, 0) / 1024
    np.save(out, (result[0].float().cpu().permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    return {"peak_mib": round(peak, 1), "seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", choices=("small", "sd", "sd15"), default="sd",
                   help="tiny layouts, or sd15: Stable Diffusion 1.5's architecture with random weights")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--folder", help=argparse.SUPPRESS)  # the child's: a saved editor
    p.add_argument("--child", choices=("default", "low"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.folder, args, args.child == "low", args.result)))
        return 0

    import numpy as np
    from ip2p import tiny

    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny.save_tiny_pipeline(Path(tmp) / "editor", layout=args.layout, in_channels=8)
        results = {}
        for mode in ("default", "low"):
            out = str(Path(tmp) / f"{mode}.npy")
            command = [sys.executable, __file__, "--folder", str(folder), "--child", mode, "--result", out,
                       "--layout", args.layout, "--size", str(args.size), "--steps", str(args.steps), "--device",
                       args.device, "--dtype", args.dtype]
            child = subprocess.run(command, capture_output=True, text=True, check=False)
            if child.returncode:
                sys.stderr.write(child.stderr)
                return child.returncode
            results[mode] = json.loads(child.stdout.strip().splitlines()[-1])
            results[mode]["image"] = np.load(out).astype(int)
    d, low = results["default"], results["low"]
    print(f"layout={args.layout} size={args.size} steps={args.steps} device={args.device} dtype={args.dtype}")
    for name, r in (("default", d), ("--low-memory", low)):
        print(f"{name:>13}: peak +{r['peak_mib']:.1f} MiB over the loaded model, {r['seconds']:.2f} s")
    print(f"ratio low-memory / default: memory {low['peak_mib'] / max(d['peak_mib'], 1e-9):.3f}, "
          f"time {low['seconds'] / d['seconds']:.3f}; largest pixel difference "
          f"{int(np.abs(low['image'] - d['image']).max())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
