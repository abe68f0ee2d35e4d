"""Training throughput: samples/s and peak memory of ip2p's train step vs a bound measured in the same process.

The bound is a loop that runs only the UNet forward + backward + optimizer step on ready tensors of the same shapes
(no data loading, no VAE/text encoding, no dropout/noise draws). The ratio loop / bound says how much the rest costs;
with ``data.cache=text+latents`` a step should cost about one UNet forward + backward (aim: >= 0.8).

    python bench/train_throughput.py                          # CPU: tiny and tiny-sd, with and without caching
    python bench/train_throughput.py --gpu                    # GPU: SD 1.5's UNet (random weights) at 256 px, bf16

Each case runs in its own subprocess so peak memory (RSS on CPU, allocated on GPU) is per case.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM datasheet, dense bf16 tensor-core peak

CPU_CASES = [
    dict(name="tiny 32px", model="tiny", resolution=32, batch=8, steps=12),
    dict(name="tiny-sd 64px", model="tiny-sd", resolution=64, batch=4, steps=6),
    # Decoding in the training process, as configs/demo.yaml does (data.num_workers=0).
    dict(name="tiny 64px 0 workers", model="tiny", resolution=64, batch=16, steps=12, workers=0),
]
GPU_CASES = [dict(name="sd15 256px bf16", model="sd15-random", resolution=256, batch=32, steps=12)]


CACHE_MODES = [("none", False), ("text+latents", False), ("text+latents", True)]
"""(data.cache, skip decoding cached records as the trainer does after the first epoch); the middle one is the
baseline for the skip: the cache, with every image still decoded each step."""


def run_case(case: dict, cache: str, device_kind: str, skip: bool = True) -> dict:
    """Measure one (case, cache) in this process: the train loop first, then the bound on the same UNet."""
    import torch

    from ip2p.config import load_config
    from ip2p.training import Trainer

    gpu = device_kind == "gpu"
    res = case["resolution"]
    tmp = tempfile.mkdtemp()
    fixed = [] if cache == "none" else ["data.random_crop=false", "data.random_flip=false",
                                        f"data.random_resize=[{res},{res}]"]
    n = case["batch"] * 4  # a small set so cached runs reach their steady state (every record cached) quickly
    cfg = load_config(None, [
        f"output_dir={tmp}/run", f"model.pretrained={case['model']}", f"data.path=synthetic:n={n},size={max(32, res)}",
        f"data.resolution={res}", f"data.random_resize=[{res},{res + res // 8}]",
        f"data.num_workers={case.get('workers', 2)}",
        f"train.batch_size={case['batch']}", f"train.max_steps={case['steps'] * 3}", "train.checkpoint_every=0",
        "trackers=[]", f"data.cache={cache}", f"train.mixed_precision={'bf16' if gpu else 'no'}", *fixed])
    trainer = Trainer(cfg)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    loader = iter(trainer._batches(0))

    def loop_steps(k: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(k):
            trainer.micro_step(next(loader))
        sync()
        return time.perf_counter() - start

    warm = 4 + case["steps"]
    loop_steps(warm)  # warm-up, and with caching one full pass over the set
    if cache != "none" and skip:  # as Trainer.run does at the next epoch: cached records are no longer decoded
        loader = iter(trainer._batches(warm, frozenset(trainer.latent_cache)))
        loop_steps(4)  # the new loader's workers start up
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    loop_time = loop_steps(case["steps"])
    loop_mem = torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    unet, opt, acc = trainer.unet, trainer.optimizer, trainer.accelerator
    b, f = case["batch"], trainer.vae_scale
    dev = acc.device
    x = torch.randn(b, 2 * trainer.latent_channels, res // f, res // f, device=dev)
    t = torch.randint(0, 1000, (b,), device=dev)
    ctx = torch.randn(b, 77, trainer.null_text.shape[-1], device=dev)
    goal = torch.randn(b, trainer.latent_channels, res // f, res // f, device=dev)

    def bound_step():
        with acc.autocast():
            pred = unet(x, t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), goal)
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        bound_step()
    sync()
    start = time.perf_counter()
    for _ in range(case["steps"]):
        bound_step()
    sync()
    bound_time = time.perf_counter() - start
    out = dict(case=case["name"], cache=cache if cache == "none" or skip else f"{cache} (decoding)", batch=b,
               loop_samples_s=b * case["steps"] / loop_time,
               bound_samples_s=b * case["steps"] / bound_time, ratio=bound_time / loop_time,
               peak_memory_gib=loop_mem / 2**30)
    if gpu:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            bound_step()
        step_flops = counter.get_total_flops()
        out["mfu_bound"] = step_flops * case["steps"] / bound_time / H100_BF16_DENSE_FLOPS
        out["mfu_loop"] = step_flops * case["steps"] / loop_time / H100_BF16_DENSE_FLOPS
        out["device"] = torch.cuda.get_device_name()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="measure SD 1.5's UNet at 256 px bf16 on the GPU")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case as JSON, print the result
    args = p.parse_args(argv)
    if args.one:
        spec = json.loads(args.one)
        print("RESULT " + json.dumps(run_case(spec["case"], spec["cache"], spec["device"], spec["skip"])),
              flush=True)
        return 0
    cases, kind = (GPU_CASES, "gpu") if args.gpu else (CPU_CASES, "cpu")
    rows = []
    for case in cases:
        for cache, skip in CACHE_MODES:
            spec = json.dumps({"case": case, "cache": cache, "device": kind, "skip": skip})
            proc = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True,
                                  cwd=ROOT)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{case['name']} cache={cache}: failed\n{proc.stderr[-2000:]}")
                continue
            row = json.loads(line[0][len("RESULT "):])
            rows.append(row)
            extra = (f"  MFU loop {row['mfu_loop']:.1%} bound {row['mfu_bound']:.1%} ({row['device']})"
                     if "mfu_loop" in row else "")
            print(f"{row['case']:>18} cache={row['cache']:<24} batch={row['batch']:<3} "
                  f"loop {row['loop_samples_s']:8.2f} samples/s  bound {row['bound_samples_s']:8.2f} samples/s  "
                  f"ratio {row['ratio']:.2f}  peak {row['peak_memory_gib']:.2f} GiB{extra}", flush=True)
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
